"""Scoring (prompt, response) texts with a reward model, in batches; the SFT selection hook.

Texts are re-tokenised with the reward model's own tokenizer (never the policy's token ids), so a
policy and an RM with different tokenizers still score correctly: the policy's ids would be other
words to the RM.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.distributed import ParallelModel, all_gather_object, as_parallel, micro_batches
from tether.models.generation import decode_responses, sample
from tether.models.heads import load_scalar_model, reward_scores
from tether.models.loading import load_causal_lm
from tether.reward.data import encode_response, pad_right, prompt_ids


def encode_texts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int | None = None,
    ended: Sequence[bool] | None = None,
) -> tuple[list[list[int]], int]:
    """Token ids of ``chat_prompt(prompt) ⊕ response ⊕ EOS`` per pair, and how many were cut.

    ``ended[i] = False`` leaves EOS off response i (a sample that hit max_new_tokens).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
    if ended is not None and len(ended) != len(responses):
        raise ValueError(f"score: {len(ended)} 'ended' flags for {len(responses)} responses")
    cache: dict[str, list[int]] = {}
    out, n_cut = [], 0
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if p not in cache:
            cache[p] = prompt_ids(tokenizer, p)
        limit = max_length if max_length is not None else sys.maxsize
        if len(cache[p]) >= limit:
            raise ValueError(f"score: prompt {i} alone is {len(cache[p])} tokens >= max_length={limit}")
        ids, cut = encode_response(tokenizer, cache[p], r, limit, ended=True if ended is None else ended[i])
        out.append(ids)
        n_cut += cut
    return out, n_cut


@torch.no_grad()
def score_sequences(
    model: PreTrainedModel | ParallelModel,
    sequences: Sequence[list[int]],
    pad_token_id: int,
    batch_size: int = 32,
    *,
    normalized: bool = True,
) -> torch.Tensor:
    """RM score of each token sequence, read at its last real token: ``[N]`` float32 on CPU.

    Sequences are batched by length (less padding) and returned in the given order; the score
    does not depend on the batch or the padding (tested). Given a :class:`ParallelModel`, each
    rank scores a block of the batches and every rank returns all the scores.
    """
    par = as_parallel(model)
    was_training = par.module.training
    par.module.eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    mine: list[tuple[list[int], torch.Tensor]] = []
    for chunk, real in micro_batches(batches, 1, par.dist, equal=par.sharded) if batches else []:
        idx = chunk[0]
        ids, mask = pad_right([sequences[i] for i in idx], pad_token_id)
        device = next(par.module.parameters()).device
        out = par.run(reward_scores, ids.to(device), mask.to(device), normalized=normalized).cpu()
        if real:
            mine.append((idx, out))
    scores = torch.empty(len(sequences), dtype=torch.float32)
    for part in all_gather_object(mine):
        for idx, out in part:
            scores[idx] = out
    if was_training:
        par.module.train()
    return scores


def score_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 32,
    *,
    max_length: int | None = None,
    ended: Sequence[bool] | None = None,
    normalized: bool = True,
) -> torch.Tensor:
    """r(x, y) for each (prompt, response) pair: ``[N]`` float32 (bias included if normalized).

    ``max_length`` cuts responses keeping the prompt (None = no cut); ``ended`` as in
    :func:`encode_texts`.
    """
    sequences, _ = encode_texts(tokenizer, prompts, responses, max_length, ended)
    return score_sequences(model, sequences, tokenizer.pad_token_id, batch_size, normalized=normalized)


def rm_scorer(reward_model_dir: str | Path, max_new_tokens: int, seed: int) -> Callable[[Path, Sequence[str]], float]:
    """A checkpoint scorer for SFT selection (paper §3.5: pick the SFT epoch by RM score).

    Returns ``scorer(policy_dir, prompts) -> float``: the mean normalised RM score of the policy's
    temperature-1 samples (seeded, so every checkpoint answers with the same random stream) to
    ``prompts``. The RM is loaded at the first call and kept; each policy is loaded, sampled and
    released.
    """

    if not Path(reward_model_dir).is_dir():
        raise FileNotFoundError(f"rm_scorer: the reward model {reward_model_dir} is not a directory")
    loaded: list = []  # [reward_model, tokenizer] once loaded: not while SFT is still training

    def scorer(policy_dir: Path, prompts: Sequence[str]) -> float:
        prompts = list(prompts)
        if not prompts:
            raise ValueError("rm_scorer: no validation prompts to score")
        if not loaded:
            loaded.extend(load_scalar_model(str(reward_model_dir)))
        reward_model, rm_tokenizer = loaded
        policy, tokenizer = load_causal_lm(str(policy_dir))
        generator = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
        texts: list[str] = []
        ended: list[bool] = []
        for start in range(0, len(prompts), 16):
            gen = sample(
                policy,
                tokenizer,
                prompts[start : start + 16],
                max_new_tokens=max_new_tokens,
                temperature=1.0,
                generator=generator,
            )
            texts += decode_responses(tokenizer, gen)
            ended += gen.finished.tolist()
        del policy
        scores = score_texts(reward_model, rm_tokenizer, prompts, texts, ended=ended)
        return float(scores.mean())

    return scorer
