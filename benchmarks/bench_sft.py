"""SFT throughput and peak memory for a given config (not a test: prints figures).

    python benchmarks/bench_sft.py --preset demo --steps 4      # bf16 autocast, top 8 blocks trained
    python benchmarks/bench_sft.py --preset demo --model.autocast none --model.trainable-layers none

Runs a few optimiser steps of the real SFT step (forward, response-only loss, backward, AdamW) on
the default task's demonstrations and prints tokens/s (padded tokens through the model) and the
process's peak resident memory (and peak CUDA memory on a GPU). Compare settings within one
invocation of a machine: these machines are shared, so absolute figures drift.

``--time-epochs`` times ``--epochs`` passes over the first ``--examples`` demonstrations instead, twice in one
process: without and with the frozen trunk's output kept across epochs (``trunk_cache_mib``,
:class:`tether.models.trunk.TrunkCache`; needs ``--model.trainable-layers``), and prints each
epoch's seconds and the ratio of the later epochs. ``--trunk-cache-mib 0`` runs only the first.

    python benchmarks/bench_sft.py --preset tiny --model.trainable-layers 1 --time-epochs --epochs 2 --examples 64
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from tether.config import SFTConfig, add_config_args, config_from_args
from tether.models.lm_batch import collate, count_target_tokens, encode_demonstrations, forward_logits
from tether.models.loading import autocast, load_causal_lm
from tether.models.trunk import TrunkCache
from tether.ops import lm_loss
from tether.optim import build_optimizer
from tether.sft.data import load_demonstrations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, SFTConfig)
    parser.add_argument("--steps", type=int, default=4, help="timed optimiser steps (after 1 warm-up step)")
    parser.add_argument(
        "--time-epochs", action="store_true", help="time --epochs epochs without and with the trunk cache"
    )
    parser.add_argument("--examples", type=int, default=64, help="demonstrations per epoch (with --epochs)")
    args = parser.parse_args()
    cfg = config_from_args(SFTConfig, "sft", args)
    if args.time_epochs:
        compare_trunk_cache(cfg, cfg.epochs, args.examples)
        return

    model, tok = load_causal_lm(cfg.model, trainable=True)
    device = next(model.parameters()).device
    precision = autocast(cfg.model, device)
    examples, _ = encode_demonstrations(tok, load_demonstrations(cfg.train_file), cfg.max_length)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def step(i: int) -> int:
        batch = examples[(i * cfg.batch_size) % len(examples) :][: cfg.batch_size]
        micro = [
            collate(batch[j : j + cfg.micro_batch_size], tok.pad_token_id)
            for j in range(0, len(batch), cfg.micro_batch_size)
        ]
        n_target = sum(count_target_tokens(m["labels"]) for m in micro)
        for m in micro:
            loss = lm_loss(forward_logits(model, m, precision), m["labels"].to(device), "sum") / n_target
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(int(m["input_ids"].numel()) for m in micro)

    step(0)  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tokens = sum(step(i) for i in range(1, args.steps + 1))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    print(
        f"model            {cfg.model.name_or_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"{n_trainable / 1e6:.1f}M trainable)"
    )
    print(
        f"settings         device={device} autocast={cfg.model.autocast} trainable_layers={cfg.model.trainable_layers} "
        f"lora={cfg.model.lora.enabled} batch={cfg.batch_size} micro={cfg.micro_batch_size} "
        f"max_length={cfg.max_length} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"steps            {args.steps} in {seconds:.1f} s ({seconds / args.steps:.2f} s/step)")
    print(f"tokens/s         {tokens / seconds:,.0f}")
    print(f"peak RSS         {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    if device.type == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")


def time_epochs(cfg: SFTConfig, epochs: int, n_examples: int, cache_mib: float) -> tuple[list[float], str]:
    """Seconds per epoch of the trainer's step (forward, loss, backward, AdamW) over the first
    ``n_examples`` demonstrations, in order, with the trunk cache as ``cache_mib`` allows."""
    torch.manual_seed(cfg.seed)
    model, tok = load_causal_lm(cfg.model, trainable=True)
    device = next(model.parameters()).device
    precision = autocast(cfg.model, device)
    examples, _ = encode_demonstrations(tok, load_demonstrations(cfg.train_file), cfg.max_length)
    examples = examples[:n_examples]
    n_tokens = sum(len(ex.input_ids) for ex in examples)
    cache, how = TrunkCache.plan(model, n_tokens=n_tokens, epochs_left=epochs, limit_mib=cache_mib, parallel="none")
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = []
    for _ in range(epochs):
        sync()
        t0 = time.perf_counter()
        for i in range(0, len(examples), cfg.batch_size):
            batch = examples[i : i + cfg.batch_size]
            micro = [
                collate(batch[j : j + cfg.micro_batch_size], tok.pad_token_id)
                for j in range(0, len(batch), cfg.micro_batch_size)
            ]
            n_target = sum(count_target_tokens(m["labels"]) for m in micro)
            for m in micro:
                logits = forward_logits(model, m, precision, cache)
                (lm_loss(logits, m["labels"].to(device), "sum") / n_target).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
        seconds.append(time.perf_counter() - t0)
    return seconds, how


def compare_trunk_cache(cfg: SFTConfig, epochs: int, n_examples: int) -> None:
    runs = {"off": time_epochs(cfg, epochs, n_examples, 0)}
    if cfg.trunk_cache_mib > 0:
        runs["on"] = time_epochs(cfg, epochs, n_examples, cfg.trunk_cache_mib)
    print(
        f"model {cfg.model.name_or_path}, trainable_layers={cfg.model.trainable_layers}, {n_examples} examples, "
        f"batch {cfg.batch_size}, micro {cfg.micro_batch_size}, {torch.get_num_threads()} threads"
    )
    for name, (seconds, how) in runs.items():
        print(f"trunk cache {name:3}  " + "  ".join(f"epoch {i + 1}: {s:7.2f} s" for i, s in enumerate(seconds)))
        print(f"                 ({how})")
    if "on" in runs and epochs > 1:
        off, on = sum(runs["off"][0][1:]), sum(runs["on"][0][1:])
        print(f"epochs 2..{epochs}: with the cache {on / off:.2f}x the time without ({off / on:.2f}x faster)")


if __name__ == "__main__":
    main()
