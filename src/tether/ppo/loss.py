"""PPO's clipped policy and value losses (the LM loss of PPO-ptx is :func:`tether.ops.lm_loss`).

Losses are token-level means over the masked tokens of the whole (mini)batch. Stats are
detached 0-dim tensors; ``float(v)`` them to log.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tether.ops import masked_mean


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate objective of PPO (Schulman et al. 2017, eq. 7), as a loss to minimise.

    ``ratio = exp(logprobs − old_logprobs)``;
    ``loss = mean(max(−A·ratio, −A·clip(ratio, 1 − ε, 1 + ε)))`` over the masked tokens.

    Args:
        logprobs: ``[B, T]`` current policy log-probs (carry the gradient).
        old_logprobs: ``[B, T]`` log-probs at rollout time (no gradient).
        advantages: ``[B, T]`` (usually whitened).
        mask: ``[B, T]`` response mask.
        clip_range: ε.

    Returns:
        ``(loss, stats)``: ``clipfrac`` (fraction of tokens where the clipped term is the one
        used, i.e. its gradient is cut), ``approx_kl`` (k2 estimator ``mean(0.5·(logp −
        old)²)`` of KL(old || new)), ``approx_kl_k3`` (the unbiased k3 estimator),
        ``ratio_mean`` and ``ratio_max``.
    """
    keep = mask.bool()
    # Select real tokens up front: padding junk (NaN/inf) then cannot reach the loss *or* the
    # gradient (a NaN multiplied by a zero gradient is still NaN).
    log_ratio = torch.where(keep, logprobs - old_logprobs.detach(), 0.0)
    ratio = torch.exp(log_ratio)
    advantages = torch.where(keep, advantages.detach(), 0.0)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            # Samples come from old, so k3 with r = new/old: (r - 1) - log r.
            "approx_kl_k3": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(keep, ratio, torch.zeros_like(ratio)).max(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (as in OpenAI baselines' PPO2 and Ziegler et al. 2019).

    ``v_clipped = old + clip(v − old, −ε_v, ε_v)``;
    ``loss = 0.5 · mean(max((v − R)², (v_clipped − R)²))`` over the masked tokens. The
    clipped term keeps one noisy minibatch from moving the value far from its rollout-time
    estimate.

    Args:
        values: ``[B, T]`` current value predictions (carry the gradient).
        old_values: ``[B, T]`` values at rollout time.
        returns: ``[B, T]`` GAE returns (targets).
        mask: ``[B, T]`` response mask.
        clip_range_value: ε_v.

    Returns:
        ``(loss, stats)``: ``vf_clipfrac`` (fraction of tokens where the clipped term wins),
        ``value_error`` (mean squared error ``(v − R)²`` of the unclipped values),
        ``value_mean``.
    """
    keep = mask.bool()
    # As in policy_loss: select first so padding junk reaches neither loss nor gradient.
    values = torch.where(keep, values, 0.0)
    old_values = torch.where(keep, old_values.detach(), 0.0)
    returns = torch.where(keep, returns.detach(), 0.0)
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask),
            "value_error": masked_mean(loss_unclipped, mask),
            "value_mean": masked_mean(values, mask),
        }
    return loss, {k: v.detach() for k, v in stats.items()}
