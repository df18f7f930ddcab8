"""Generalised advantage estimation over response tokens (Schulman et al. 2016)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tether.ops import masked_whiten


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """GAE(γ, λ) advantages and returns for bandit episodes of response tokens.

    Schulman et al. 2016 GAE: ``δ_t = r_t + γ·V_{t+1} - V_t`` and
    ``A_t = δ_t + γλ·A_{t+1}``, scanned backwards over time (a loop over T, vectorised over B).
    The episode ends after the last real token, so ``V`` and ``A`` beyond it are 0: the value
    of padding never leaks into the last real token's target. InstructGPT uses ``γ = 1`` (no
    discount within a response).

    Args:
        rewards: ``[B, T]`` per-token rewards (−β·KL, plus the score at the last real token).
        values: ``[B, T]`` value estimates ``V(s_t)``.
        mask: ``[B, T]`` response mask, 1 on real response tokens, right-padded
            (each row a run of 1s followed by 0s; rows may be all 0).
        gamma: discount γ.
        lam: GAE λ.

    Returns:
        ``(advantages, returns)``, both ``[B, T]``, ``returns = advantages + values``; both are
        0 outside the mask. Computed under ``no_grad``: they are regression / policy targets.

    Raises:
        ValueError: the mask is not right-padded (a 1 after a 0 in some row).
    """
    if not rewards.shape == values.shape == mask.shape or rewards.dim() != 2:
        raise ValueError(
            f"gae: rewards, values and mask must all be [B, T]; got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    keep = mask.bool()
    if bool((keep[:, 1:] & ~keep[:, :-1]).any()):
        raise ValueError("gae: mask must be right-padded (1s, then 0s) in every row")
    with torch.no_grad():
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        # Select (not multiply) so NaN/inf in padding cannot reach real positions.
        r = torch.where(keep, rewards.to(values.dtype), zero)
        v = torch.where(keep, values, zero)
        t_len = rewards.shape[1]
        advantages = torch.zeros_like(v)
        next_value = torch.zeros_like(v[:, 0])
        next_adv = torch.zeros_like(v[:, 0])
        for t in reversed(range(t_len)):
            delta = r[:, t] + gamma * next_value - v[:, t]
            # Padding has r = V = 0 and zero successors, so its advantage stays 0 by itself.
            next_adv = delta + gamma * lam * next_adv
            advantages[:, t] = next_adv
            next_value = v[:, t]
        returns = torch.where(keep, advantages + v, zero)
    return advantages, returns


def whiten_advantages(
    adv: Tensor, mask: Tensor, shift_mean: bool = True, *, all_reduce: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Whiten advantages over the real response tokens of the whole batch (``[B, T]``).

    See :func:`tether.ops.masked_whiten`; padding is 0 on return. ``all_reduce`` (data parallel):
    the batch is every rank's ``adv`` together.
    """
    return masked_whiten(adv, mask, shift_mean=shift_mean, all_reduce=all_reduce)


def leave_one_out(scores: Tensor, group_size: int) -> Tensor:
    """Each score minus the mean of the other scores of its group (consecutive runs of ``group_size``).

    With the responses of one prompt as a group this removes the prompt's level, which a reward
    model trained on rankings within prompts never learned, and keeps the differences it did.
    The baseline of an episode does not depend on that episode's own response, so the policy
    gradient stays unbiased (the RLOO estimator, Kool et al. 2019; Ahmadian et al. 2024).
    Every group's adjusted scores sum to 0.
    """
    if group_size < 2 or scores.ndim != 1 or scores.numel() % group_size:
        raise ValueError(f"leave_one_out: {tuple(scores.shape)} scores do not split into groups of {group_size} >= 2")
    groups = scores.view(-1, group_size)
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).view(-1)
