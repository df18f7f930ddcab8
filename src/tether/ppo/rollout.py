"""The PPO rollout's records and the forward passes that fill them.

An episode is a bandit one (InstructGPT §3.5): a prompt, one sampled response, one RM score. Two
records carry a batch of them, one per phase, each computed from the one before and never
changed after: :class:`Rollout` (what was sampled and scored: step 1) and :class:`Targets` (the
per-token rewards, advantages and returns computed from it: steps 2 and 3). Every per-token field
is aligned with ``response_ids`` (position ``t`` is response token ``t``).

The forward helpers are shared by the rollout (no gradient), the update (gradient) and the
evaluation: :func:`response_logprobs`, :func:`response_values` and :func:`episode_scores` run a
model whole; :func:`logprobs_from_logits`, :func:`values_from_scalars` and
:func:`scores_with_penalty` are their second halves, for a caller that computed the model's
output another way (:class:`tether.ppo.roles.PPORoles` with a shared trunk). Positions are
counted over real tokens, so left-padded prompts of different lengths get the positions they had
while sampling.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from tether.models.generation import Generation, position_ids_from_mask
from tether.models.heads import reward_scores, token_values
from tether.ops import entropy_from_logits, token_logprobs
from tether.reward.foreign import ForeignReward

# A reward source other than a reward model (tests, toy tasks): (prompts, responses) -> [B].
RewardFn = Callable[[list[str], list[str]], Tensor]


@dataclass(frozen=True)
class Rollout:
    """A batch of sampled and scored episodes (step 1). ``B`` episodes, ``P`` prompt and ``R``
    response tokens."""

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

    @property
    def inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(query_ids, query_mask, response_ids, response_mask)``: what every forward reads."""
        return self.query_ids, self.query_mask, self.response_ids, self.response_mask

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


@dataclass(frozen=True)
class Targets:
    """What the update trains towards, computed from a :class:`Rollout` (steps 2 and 3): every
    field ``[B, R]``, aligned with the rollout's responses, 0 on padding."""

    kl: Tensor  # per-token KL estimate (the configured estimator)
    non_score_rewards: Tensor  # −β·kl
    rewards: Tensor  # non_score_rewards plus the score at the last response token
    advantages: Tensor  # GAE advantages (whitened if configured)
    returns: Tensor  # GAE returns: value targets

    def select(self, index: Tensor | Sequence[int], width: int) -> Targets:
        """The episodes at ``index``, ``width`` response columns (a :meth:`Rollout.select`'s)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.kl.device)
        return Targets(**{f.name: getattr(self, f.name)[index][:, :width] for f in fields(self)})

    @staticmethod
    def cat(parts: Sequence[Targets]) -> Targets:
        """Concatenate batches, re-padded on the right with zeros."""
        width = max(p.kl.shape[1] for p in parts)
        return Targets(
            **{
                f.name: torch.cat([_pad(getattr(p, f.name), width, 0.0, left=False) for p in parts])
                for f in fields(Targets)
            }
        )


def _pad(x: Tensor, width: int, fill: float, *, left: bool) -> Tensor:
    """``[B, T, ...]`` → ``[B, width, ...]`` with ``fill`` on the left or the right."""
    extra = width - x.shape[1]
    if extra == 0:
        return x
    pad = torch.full((x.shape[0], extra, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def joined(query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
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
) -> tuple[Tensor, Tensor | None]:
    """log π(a_t | s_t) of every response token under ``softmax(logits / temperature)``.

    One forward over prompt ⊕ response; only the ``R + 1`` last positions go through the LM head
    (``logits_to_keep``), and ``logits[:, P - 1 + t]`` predicts response token ``t``. The
    temperature must be the sampling one, or the PPO ratio and the KL use a distribution that
    was never sampled (a biased, even negative, KL estimate).

    Args:
        query_ids, query_mask: ``[B, P]``, left-padded (every row's last prompt token is real).
        response_ids, response_mask: ``[B, R]``, right-padded.

    Returns:
        ``(logprobs [B, R], entropy [B, R] or None)``, fp32, 0 on padding; differentiable
        unless called under ``no_grad``.
    """
    ids, mask = joined(query_ids, query_mask, response_ids, response_mask)
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        logits_to_keep=response_ids.shape[1] + 1,
        use_cache=False,
    ).logits[:, :-1]
    return logprobs_from_logits(logits, response_ids, response_mask, temperature, with_entropy=with_entropy)


def logprobs_from_logits(
    logits: Tensor, response_ids: Tensor, response_mask: Tensor, temperature: float, *, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """:func:`response_logprobs` from the logits that predict each response token, ``[B, R, V]``."""
    keep = response_mask.bool()
    logprobs = torch.where(keep, token_logprobs(logits, response_ids, temperature), 0.0)
    entropy = None
    if with_entropy:  # a statistic, never differentiated
        with torch.no_grad():
            entropy = torch.where(keep, entropy_from_logits(logits, temperature), 0.0)
    return logprobs, entropy


def response_values(
    value_model: PreTrainedModel, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor
) -> Tensor:
    """V(s_t) for every response token: the scalar head at the position before it. ``[B, R]``."""
    ids, mask = joined(query_ids, query_mask, response_ids, response_mask)
    return values_from_scalars(token_values(value_model, ids, mask), query_ids.shape[1], response_mask)


def values_from_scalars(per_token: Tensor, prompt_width: int, response_mask: Tensor) -> Tensor:
    """:func:`response_values` from the (normalised) head's output at every position ``[B, P + R]``."""
    values = per_token[:, prompt_width - 1 : -1]
    return torch.where(response_mask.bool(), values, 0.0)


def reference(
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
) -> Tensor:
    """The score of each episode: ``[B]`` float32 on the generation's device.

    A reward model reads the very token ids that were sampled (prompt ⊕ response, EOS included
    when reached) at the last real token, normalised; one of another tokenizer
    (:class:`~tether.reward.foreign.ForeignReward`) reads them decoded and re-encoded as its own,
    its turn end where the policy ended; a ``RewardFn`` gets the decoded texts. A response that
    never reached EOS gets ``missing_eos_penalty`` added (None: nothing).
    """
    if isinstance(reward, torch.nn.Module):
        reward.eval()
        scores = reward_scores(reward, *joined(gen.query_ids, gen.query_mask, gen.response_ids, gen.response_mask))
    elif isinstance(reward, ForeignReward):
        scores = reward.score(gen, prompts)
    else:
        scores = torch.as_tensor(reward(list(prompts), list(responses)), dtype=torch.float32)
    return scores_with_penalty(scores, gen, missing_eos_penalty)


def scores_with_penalty(scores: Tensor, gen: Generation, missing_eos_penalty: float | None) -> Tensor:
    """:func:`episode_scores` from the reward's raw output ``[B]``: checked, float32 on the
    generation's device, the penalty added to the responses that never reached EOS."""
    n = gen.response_ids.shape[0]
    if scores.shape != (n,):
        raise ValueError(f"the reward gave shape {tuple(scores.shape)} for {n} episodes")
    scores = scores.float().to(gen.response_ids.device)
    if missing_eos_penalty is not None:
        scores = torch.where(gen.finished, scores, scores + missing_eos_penalty)
    return scores


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
