"""Reward-model training throughput: K-wise batching vs the same rankings expanded into pairs.

InstructGPT §3.5: putting all C(K,2) comparisons of a prompt in one batch element needs K forward
passes per prompt, where shuffling the pairs as independent examples needs 2·C(K,2), so K-wise
batching should be about K-1 times faster for the same rankings (and it overfits less).

Both methods train on the same rankings, with the same model, the same number of sequences per
forward pass and the same number of optimiser steps (the pairwise batch holds the C(K,2) pairs
of the K-wise batch's prompts); each step is the trainer's own ``accumulate_gradients`` plus an
AdamW step. Prints rankings ("comparisons") per second, pairs per second and sequences per second.

    .venv/bin/python benchmarks/bench_rm.py                     # tiny random model, seconds
    .venv/bin/python benchmarks/bench_rm.py --model default --prompts 16 --k 4

``--trunk-cache --trainable-layers N`` times two K-wise epochs instead, without and then with the
frozen trunk's output kept across epochs (:class:`tether.models.trunk.TrunkCache`), in one process.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from math import comb

import torch

from tether.config import ModelConfig, OptimConfig
from tether.data.formats import Comparison
from tether.models.heads import load_scalar_model
from tether.models.trunk import TrunkCache
from tether.optim import build_optimizer
from tether.reward.data import RankedExample, encode_comparisons, expand_to_pairs
from tether.reward.train import accumulate_gradients

WORDS = (
    "the a river mountain quietly bright summer people build small houses near water and "
    "every morning birds sing over green fields while children walk to school slowly"
).split()


def synthetic_comparisons(n: int, k: int, response_words: int, seed: int = 0) -> list[Comparison]:
    """``n`` prompts, each with ``k`` distinct random responses and a random strict ranking."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = f"Write about {' '.join(rng.choices(WORDS, k=6))}."
        responses = [" ".join(rng.choices(WORDS, k=response_words)) + f" ({j})" for j in range(k)]
        ranking = rng.sample(range(1, k + 1), k)
        out.append(Comparison(prompt, responses, ranking, labeler_id=f"l{i % 4}"))
    return out


@dataclass
class Method:
    name: str
    examples: list[RankedExample]  # rankings (kwise) or one pair each (pairwise)
    loss: str
    per_step: int  # examples per optimiser step
    micro: int  # examples per forward
    forwards: int  # sequences forwarded per ranking


def run(model, examples: list[RankedExample], loss: str, per_step: int, micro: int, pad: int, trunk=None) -> float:
    """Seconds to train one pass over ``examples``: ``per_step`` per optimiser step."""
    optimizer = build_optimizer(model.parameters(), OptimConfig(lr=1e-6))
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for i in range(0, len(examples), per_step):
        accumulate_gradients(model, examples[i : i + per_step], micro, pad, loss, trunk=trunk)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny', 'default' or an HF directory")
    parser.add_argument("--prompts", type=int, default=64, help="rankings to train on")
    parser.add_argument("--k", type=int, default=4, help="responses per ranking (paper: 4..9)")
    parser.add_argument("--response-words", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per optimiser step")
    parser.add_argument("--seqs-per-forward", type=int, default=16, help="sequences per forward")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes (best is kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trainable-layers", type=int, default=None, help="train only the top N blocks")
    parser.add_argument("--trunk-cache", action="store_true", help="time 2 K-wise epochs without and with it")
    args = parser.parse_args()
    if args.seqs_per_forward % args.k or args.seqs_per_forward % 2:
        parser.error("--seqs-per-forward must be a multiple of --k and of 2")

    torch.manual_seed(0)
    model_cfg = ModelConfig(name_or_path=args.model, trainable_layers=args.trainable_layers, device=args.device)
    model, tok = load_scalar_model(model_cfg, trainable=True)
    model.to(args.device)
    rankings, _ = encode_comparisons(tok, synthetic_comparisons(args.prompts, args.k, args.response_words), 512)
    pairs = expand_to_pairs(rankings)
    n_pairs_per_ranking = comb(args.k, 2)
    tokens = sum(len(s) for ex in rankings for s in ex.sequences) / (args.prompts * args.k)
    print(
        f"model {args.model} on {args.device} ({torch.get_num_threads()} CPU threads); "
        f"{args.prompts} rankings of K={args.k} ({len(pairs)} pairs), ~{tokens:.0f} tokens per "
        f"sequence; {args.batch_size} prompts per step, "
        f"{args.seqs_per_forward} sequences per forward"
    )
    pad = tok.pad_token_id
    if args.trunk_cache:
        compare_trunk_cache(model, rankings, args.batch_size, args.seqs_per_forward // args.k, pad)
        return
    methods = [
        Method("kwise", rankings, "kwise", args.batch_size, args.seqs_per_forward // args.k, args.k),
        # The same rankings' pairs, the same optimiser steps: C(K,2) pairs per prompt per step.
        Method(
            "pairs",
            pairs,
            "pairwise",
            args.batch_size * n_pairs_per_ranking,
            args.seqs_per_forward // 2,
            2 * n_pairs_per_ranking,
        ),
    ]
    for m in methods:  # warm-up: allocator, kernels, lazy imports
        run(model, m.examples[: m.per_step], m.loss, m.per_step, m.micro, pad)
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for m in methods:
            seconds = run(model, m.examples, m.loss, m.per_step, m.micro, pad)
            best[m.name] = min(best.get(m.name, float("inf")), seconds)
    print(f"{'method':8} {'seconds':>8} {'comparisons/s':>14} {'pairs/s':>9} {'sequences/s':>12}")
    for m in methods:
        s = best[m.name]
        print(
            f"{m.name:8} {s:8.2f} {args.prompts / s:14.2f} "
            f"{args.prompts * n_pairs_per_ranking / s:9.1f} {args.prompts * m.forwards / s:12.1f}"
        )
    print(
        f"K-wise is {best['pairs'] / best['kwise']:.2f}x faster per ranking "
        f"(forward count alone predicts {2 * n_pairs_per_ranking / args.k:.2f}x = K-1)"
    )


def compare_trunk_cache(model, rankings: list[RankedExample], per_step: int, micro: int, pad: int) -> None:
    n_tokens = sum(len(s) for s in {tuple(s) for ex in rankings for s in ex.sequences})
    cache, how = TrunkCache.plan(model, n_tokens=n_tokens, epochs_left=2, limit_mib=4096, parallel="none")
    print(f"trunk cache {how}")
    if cache is None:
        return
    off = [run(model, rankings, "kwise", per_step, micro, pad) for _ in range(2)]
    on = [run(model, rankings, "kwise", per_step, micro, pad, trunk=cache) for _ in range(2)]
    for name, seconds in (("off", off), ("on", on)):
        print(f"trunk cache {name:3}  epoch 1: {seconds[0]:7.2f} s  epoch 2: {seconds[1]:7.2f} s")
    print(f"epoch 2: with the cache {on[1] / off[1]:.2f}x the time without ({off[1] / on[1]:.2f}x faster)")


if __name__ == "__main__":
    main()
