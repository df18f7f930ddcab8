"""The PPO rollout: sampled episodes scored by the policy, reference, value and reward models.

An episode is a bandit one (InstructGPT §3.5): a prompt, one sampled response, one RM score. The
:class:`Rollout` record carries a batch of them from the rollout to the PPO update; every
per-token field is aligned with ``response_ids`` (position ``t`` is response token ``t``).

:func:`collect_rollout` is step 1 of the trainer: sample a batch in chunks, score each chunk.
Two forward-pass helpers are shared by the rollout (no gradient) and the update (gradient):
:func:`response_logprobs` and :func:`response_values`. Both run prompt ⊕ response through the
model with position ids counted over real tokens, so left-padded prompts of different lengths get
the positions they had while sampling.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.config import PPOConfig
from tether.models.generation import Generation, Sampler, decode_responses, position_ids_from_mask, sample
from tether.models.heads import apply_normalization, reward_scores, score_at_last_token, token_values
from tether.models.trunk import SharedTrunk
from tether.ops import entropy_from_logits, token_logprobs

# A reward source other than a reward model (tests, toy tasks): (prompts, responses) -> [B].
RewardFn = Callable[[list[str], list[str]], Tensor]


@dataclass
class Rollout:
    """A batch of scored episodes. ``B`` episodes, ``P`` prompt and ``R`` response tokens.

    Steps 1 (sampling and scoring) fill everything up to ``finished``; steps 2 and 3 of the
    trainer fill ``kl`` … ``returns`` (created as zeros until then).
    """

    query_ids: Tensor  # [B, P] chat-formatted prompt tokens, LEFT-padded
    query_mask: Tensor  # [B, P] 1 on real prompt tokens
    response_ids: Tensor  # [B, R] sampled tokens, RIGHT-padded (EOS included when reached)
    response_mask: Tensor  # [B, R] 1 on real response tokens
    sample_logprobs: Tensor  # [B, R] log π at sampling time (KV-cached loop); a consistency check
    logprobs: Tensor  # [B, R] log π(a_t) from a full forward at rollout time: PPO's "old" log-probs
    ref_logprobs: Tensor  # [B, R] log π_SFT(a_t), same forward procedure as `logprobs`
    values: Tensor  # [B, R] V(s_t), the value of the prefix before response token t
    entropy: Tensor  # [B, R] entropy of π(· | s_t) at temperature T (nats)
    scores: Tensor  # [B] RM score (normalised) plus the missing-EOS penalty where it applies
    finished: Tensor  # [B] bool: the response ended with EOS
    kl: Tensor  # [B, R] per-token KL estimate (the configured estimator); 0 on padding
    non_score_rewards: Tensor  # [B, R] −β·kl
    rewards: Tensor  # [B, R] non_score_rewards plus the score at the last response token
    advantages: Tensor  # [B, R] GAE advantages (whitened if configured)
    returns: Tensor  # [B, R] GAE returns: value targets
    # [B, P + R, H] the shared frozen trunk's output on prompt ⊕ response (None without sharing):
    # frozen, so the update's forwards start from it instead of recomputing the shared blocks.
    trunk_hidden: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.query_ids.shape[0]

    @property
    def n_tokens(self) -> int:
        """Real response tokens in the batch."""
        return int(self.response_mask.sum())

    def select(self, index: Tensor | Sequence[int]) -> Rollout:
        """The episodes at ``index``, with columns that are padding in every row trimmed away.

        Trimming keeps a minibatch of short responses from paying for the longest one in the
        batch; positions come from the masks, so it changes no result.
        """
        index = torch.as_tensor(index, dtype=torch.long, device=self.query_ids.device)
        query_mask = self.query_mask[index]
        response_mask = self.response_mask[index]
        q_real = query_mask.any(0).nonzero()
        r_real = response_mask.any(0).nonzero()
        q0 = int(q_real[0]) if len(q_real) else query_mask.shape[1]
        r1 = int(r_real[-1]) + 1 if len(r_real) else 0
        out: dict[str, Any] = {}
        width_q = self.query_ids.shape[1]
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = None
                continue
            value = value[index]
            if f.name == "trunk_hidden":
                value = value[:, q0 : width_q + r1]
            elif f.name.startswith("query_"):
                value = value[:, q0:]
            elif value.dim() == 2:
                value = value[:, :r1]
            out[f.name] = value
        return Rollout(**out)

    @staticmethod
    def cat(parts: Sequence[Rollout], pad_token_id: int) -> Rollout:
        """Concatenate batches: prompts re-padded on the left, responses on the right."""
        width_q = max(p.query_ids.shape[1] for p in parts)
        width_r = max(p.response_ids.shape[1] for p in parts)
        out: dict[str, Any] = {}
        for f in fields(Rollout):
            if f.name == "trunk_hidden":  # [B, P + R, H]: prompt part left-padded, response part right
                hidden = [
                    _pad(
                        _pad(p.trunk_hidden, width_q + p.response_ids.shape[1], 0.0, left=True),
                        width_q + width_r,
                        0.0,
                        left=False,
                    )
                    for p in parts
                    if p.trunk_hidden is not None
                ]
                out[f.name] = torch.cat(hidden) if len(hidden) == len(parts) else None
                continue
            tensors = []
            for p in parts:
                value = getattr(p, f.name)
                if value.dim() == 2:
                    left = f.name.startswith("query_")
                    width = width_q if left else width_r
                    fill = pad_token_id if f.name.endswith("_ids") else 0
                    value = _pad(value, width, fill, left=left)
                tensors.append(value)
            out[f.name] = torch.cat(tensors, dim=0)
        return Rollout(**out)


def _pad(x: Tensor, width: int, fill: float, *, left: bool) -> Tensor:
    """``[B, T, ...]`` → ``[B, width, ...]`` with ``fill`` on the left or the right."""
    extra = width - x.shape[1]
    if extra == 0:
        return x
    pad = torch.full((x.shape[0], extra, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def _joined(
    query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Prompt ⊕ response ids and attention mask, ``[B, P + R]`` each."""
    ids = torch.cat([query_ids, response_ids], dim=1)
    mask = torch.cat([query_mask, response_mask], dim=1).long()
    return ids, mask


def response_logprobs(
    model: PreTrainedModel,
    query_ids: Tensor,
    query_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    temperature: float,
    *,
    with_entropy: bool = False,
    trunk: SharedTrunk | None = None,
    hidden: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """log π(a_t | s_t) of every response token under ``softmax(logits / temperature)``.

    One forward over prompt ⊕ response; only the ``R + 1`` last positions go through the LM head
    (``logits_to_keep``), and ``logits[:, P - 1 + t]`` predicts response token ``t``. The
    temperature must be the sampling one, or the PPO ratio and the KL use a distribution that
    was never sampled (a biased, even negative, KL estimate).

    Args:
        query_ids, query_mask: ``[B, P]``, left-padded (every row's last prompt token is real).
        response_ids, response_mask: ``[B, R]``, right-padded.

        trunk, hidden: a :class:`SharedTrunk` and its output ``[B, P + R, H]`` on these ids: only
            the model's own blocks run (the same computation as the full forward).

    Returns:
        ``(logprobs [B, R], entropy [B, R] or None)``, fp32, 0 on padding; differentiable
        unless called under ``no_grad``.
    """
    ids, mask = _joined(query_ids, query_mask, response_ids, response_mask)
    r = response_ids.shape[1]
    if trunk is not None and hidden is not None:  # the shared blocks' output is given: run the rest
        logits = trunk.logits(model, hidden, mask, r + 1)[:, :-1]
    else:
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            logits_to_keep=r + 1,
            use_cache=False,
        ).logits[:, :-1]
    keep = response_mask.bool()
    logprobs = torch.where(keep, token_logprobs(logits, response_ids, temperature), 0.0)
    entropy = None
    if with_entropy:  # a statistic, never differentiated
        with torch.no_grad():
            entropy = torch.where(keep, entropy_from_logits(logits, temperature), 0.0)
    return logprobs, entropy


def response_values(
    value_model: PreTrainedModel,
    query_ids: Tensor,
    query_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    *,
    trunk: SharedTrunk | None = None,
    hidden: Tensor | None = None,
) -> Tensor:
    """V(s_t) for every response token: the scalar head at the position before it. ``[B, R]``.

    With ``trunk`` and its ``hidden`` output, only the value model's own blocks run.
    """
    ids, mask = _joined(query_ids, query_mask, response_ids, response_mask)
    p = query_ids.shape[1]
    if trunk is not None and hidden is not None:
        per_token = apply_normalization(value_model, trunk.scalars(value_model, hidden, mask))
    else:
        per_token = token_values(value_model, ids, mask)
    values = per_token[:, p - 1 : -1]
    return torch.where(response_mask.bool(), values, 0.0)


def _reference(
    policy: PreTrainedModel, ref_policy: PreTrainedModel | None
) -> tuple[PreTrainedModel, contextlib.AbstractContextManager]:
    """(model, context) computing π_SFT: a frozen copy, or the LoRA policy with adapters off."""
    if ref_policy is not None:
        return ref_policy, contextlib.nullcontext()
    if not hasattr(policy, "disable_adapter"):
        raise ValueError("ref_policy may only be None for a LoRA (peft) policy")
    return policy, policy.disable_adapter()


@torch.no_grad()
def episode_scores(
    gen: Generation,
    prompts: Sequence[str],
    responses: Sequence[str],
    reward: PreTrainedModel | RewardFn,
    missing_eos_penalty: float | None,
    *,
    trunk: SharedTrunk | None = None,
    hidden: Tensor | None = None,
) -> Tensor:
    """The score of each episode: ``[B]`` float32 on the generation's device.

    A reward model reads the very token ids that were sampled (prompt ⊕ response, EOS included
    when reached) at the last real token, normalised; a ``RewardFn`` gets the decoded texts. A
    response that never reached EOS gets ``missing_eos_penalty`` added (None: nothing).
    """
    if isinstance(reward, torch.nn.Module):
        reward.eval()
        ids, mask = _joined(gen.query_ids, gen.query_mask, gen.response_ids, gen.response_mask)
        if trunk is not None and hidden is not None:
            scores = score_at_last_token(reward, trunk.scalars(reward, hidden, mask), mask)
        else:
            scores = reward_scores(reward, ids, mask)
    else:
        scores = torch.as_tensor(reward(list(prompts), list(responses)), dtype=torch.float32)
    if scores.shape != (len(prompts),):
        raise ValueError(f"the reward gave shape {tuple(scores.shape)} for {len(prompts)} episodes")
    scores = scores.float().to(gen.response_ids.device)
    if missing_eos_penalty is not None:
        scores = torch.where(gen.finished, scores, scores + missing_eos_penalty)
    return scores


@torch.no_grad()
def score_episodes(
    gen: Generation,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    policy: PreTrainedModel,
    ref_policy: PreTrainedModel | None,
    value_model: PreTrainedModel,
    reward: PreTrainedModel | RewardFn,
    temperature: float,
    missing_eos_penalty: float | None,
    trunk: SharedTrunk | None = None,
    policy_and_value: bool = True,
) -> Rollout:
    """Step 1b of the rollout: score sampled episodes with every model, in eval mode.

    The policy and the reference go through the same forward procedure (:func:`response_logprobs`)
    on the same ids, so when their weights are equal their log-probs are bitwise equal and the KL
    is exactly 0. Scores come from :func:`episode_scores`.

    Args:
        gen: the sampled batch (``B`` episodes).
        prompts, responses: the prompt texts and decoded responses, ``B`` each.
        ref_policy: the frozen SFT model, or None for a LoRA policy (adapters disabled).
        reward: a reward model (scalar head, normalised) or a ``RewardFn``.
        trunk: the bottom blocks the models share (:class:`SharedTrunk`): their output is the one
            sampling kept (``gen.hidden``) or else computed once here, and is kept in the rollout
            for the update; None runs every model whole.
        policy_and_value: False skips the policy's and the value model's forwards: ``logprobs``,
            ``entropy`` and ``values`` are then NaN, for the update's first forward to fill
            (``PPOConfig.fuse_first_forward``); anything that read them first would fail loudly.

    Returns:
        A :class:`Rollout` whose ``kl`` … ``returns`` are zeros (steps 2–3 fill them).
    """
    for model in (policy, ref_policy, value_model, reward):
        if isinstance(model, torch.nn.Module):
            model.eval()  # dropout off in every model: RL must score what it sampled
    q_ids, q_mask = gen.query_ids, gen.query_mask
    r_ids, r_mask = gen.response_ids, gen.response_mask
    hidden = None
    if trunk is not None:
        hidden = gen.hidden if gen.hidden is not None else trunk.hidden(*_joined(q_ids, q_mask, r_ids, r_mask))
    shared: dict[str, Any] = {"trunk": trunk, "hidden": hidden}
    ref_model, ref_context = _reference(policy, ref_policy)
    with ref_context:
        ref_logprobs, _ = response_logprobs(ref_model, q_ids, q_mask, r_ids, r_mask, temperature, **shared)
    if policy_and_value:
        logprobs, entropy = response_logprobs(
            policy, q_ids, q_mask, r_ids, r_mask, temperature, with_entropy=True, **shared
        )
        values = response_values(value_model, q_ids, q_mask, r_ids, r_mask, **shared)
    else:
        logprobs, entropy, values = (torch.full_like(ref_logprobs, math.nan) for _ in range(3))
    scores = episode_scores(gen, prompts, responses, reward, missing_eos_penalty, **shared)
    zeros = torch.zeros_like(logprobs)
    assert entropy is not None
    return Rollout(
        query_ids=q_ids,
        query_mask=q_mask,
        response_ids=r_ids,
        response_mask=r_mask,
        sample_logprobs=gen.logprobs.float(),
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        entropy=entropy,
        scores=scores,
        finished=gen.finished,
        kl=zeros,
        non_score_rewards=zeros.clone(),
        rewards=zeros.clone(),
        advantages=zeros.clone(),
        returns=zeros.clone(),
        trunk_hidden=hidden,
    )


@dataclass
class RolloutTime:
    """Where a rollout's wall-clock time went, in seconds."""

    generation: float = 0.0  # sampling (the KV-cached loop)
    scoring: float = 0.0  # the policy, reference, value and reward forwards


def device_time(device: torch.device) -> float:
    """A timestamp after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def sample_responses(
    sampler: Sampler,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    cfg: PPOConfig,
    generator: torch.Generator | Sequence[torch.Generator],
    capture: torch.nn.Module | None = None,
) -> Generation:
    """One response per prompt, sampled as the rollout samples (temperature, prompt and response
    lengths); ``generator``: one stream, or one per prompt; ``capture``: see :func:`sample`."""
    return sample(
        sampler,
        tokenizer,
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        generator=generator,
        max_prompt_length=cfg.max_prompt_length,
        capture=capture,
    )


def sampling_trunk(sampler: Sampler, trunk: SharedTrunk | None, autocast: bool) -> torch.nn.Module | None:
    """The block to capture while sampling so that scoring skips the shared trunk, or None.

    Only when the sampler runs the trunk's very modules eagerly and in the precision scoring runs
    them in (``autocast``: whether scoring runs under an autocast): not a low-precision copy (its
    output is not the trunk's), not a fixed sampling dtype that turns that autocast off, and not
    compiled decode steps (hooks may not fire there).
    """
    if trunk is None or sampler.is_copy or sampler.compiled or (autocast and sampler.dtype is not None):
        return None
    return trunk.last_block(sampler.module)


def collect_rollout(
    prompts: Sequence[str],
    *,
    sampler: Sampler,
    tokenizer: PreTrainedTokenizerBase,
    policy: PreTrainedModel,
    ref_policy: PreTrainedModel | None,
    value_model: PreTrainedModel,
    reward: PreTrainedModel | RewardFn,
    cfg: PPOConfig,
    generator: torch.Generator | Sequence[torch.Generator],
    precision: contextlib.AbstractContextManager,
    trunk: SharedTrunk | None = None,
    policy_and_value: bool = True,
) -> tuple[Rollout, RolloutTime]:
    """Step 1 of an iteration: one sampled response per prompt, scored by every model.

    The prompts go in chunks of ``cfg.generation_batch_size``: each chunk is sampled from
    ``sampler`` (KV cache, temperature ``cfg.temperature``, drawing from ``generator``, or from
    each prompt's own generator when it is a list), then
    scored (:func:`score_episodes`) before the next one is sampled, so no more than a chunk's
    activations are alive at once. Returns the ``B = len(prompts)`` episodes as one
    :class:`Rollout` (``kl`` … ``returns`` zeros) and the time spent sampling and scoring.

    With a shared ``trunk`` that the sampler itself runs (:func:`sampling_trunk`), sampling keeps
    the trunk's output at every position it feeds and scoring starts from it: the trunk's blocks
    then run once per token for the whole rollout, not twice (the same numbers as recomputing it
    in a full forward over prompt ⊕ response, up to float round-off). ``policy_and_value=False``:
    see :func:`score_episodes`.
    """
    device = next(policy.parameters()).device
    with precision:
        capture = sampling_trunk(sampler, trunk, torch.is_autocast_enabled(device.type))
    parts: list[Rollout] = []
    timing = RolloutTime()
    for s in range(0, len(prompts), cfg.generation_batch_size):
        chunk = list(prompts[s : s + cfg.generation_batch_size])
        streams = generator[s : s + len(chunk)] if isinstance(generator, Sequence) else generator
        t0 = device_time(device)
        with precision:
            gen = sample_responses(sampler, tokenizer, chunk, cfg, streams, capture)
        t1 = device_time(device)
        with precision:
            parts.append(
                score_episodes(
                    gen,
                    chunk,
                    decode_responses(tokenizer, gen),
                    policy=policy,
                    ref_policy=ref_policy,
                    value_model=value_model,
                    reward=reward,
                    temperature=cfg.temperature,
                    missing_eos_penalty=cfg.missing_eos_penalty,
                    trunk=trunk,
                    policy_and_value=policy_and_value,
                )
            )
        timing.generation += t1 - t0
        timing.scoring += device_time(device) - t1
    return Rollout.cat(parts, tokenizer.pad_token_id), timing
