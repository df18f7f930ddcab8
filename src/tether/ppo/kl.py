"""The per-token KL penalty of InstructGPT eq. (2) and the KL-coefficient controllers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, get_args

import torch
from torch import Tensor

from tether.config import KLEstimator
from tether.ops import last_token_index

# Each estimator as a function of log_ratio = log π − log π_ref; the names are config.KLEstimator's.
_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "k1": lambda log_ratio: log_ratio,
    "k2": lambda log_ratio: 0.5 * log_ratio**2,
    # expm1 keeps the result exact near 0 and ≥ 0 (expm1(x) ≥ x) where exp(x) - 1 rounds.
    "k3": lambda log_ratio: torch.expm1(-log_ratio) + log_ratio,
    "abs": lambda log_ratio: log_ratio.abs(),
}
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
assert set(_ESTIMATORS) == set(KL_ESTIMATORS), "tether.config.KLEstimator and the table disagree"


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of ``KL(π || π_ref)`` from log-probs of tokens sampled from π.

    Estimators from Schulman, "Approximating KL Divergence" (2020), with
    ``log_ratio = logprobs - ref_logprobs``:

    * ``k1``: ``log_ratio`` — unbiased, the InstructGPT eq. (2) penalty; negative per token.
    * ``k2``: ``0.5 · log_ratio²`` — biased, low variance, ≥ 0.
    * ``k3``: ``(exp(-log_ratio) - 1) + log_ratio`` — unbiased and ≥ 0.
    * ``abs``: ``|log_ratio|``.

    All are exactly 0 where ``logprobs == ref_logprobs``.

    Args:
        logprobs: ``[B, T]`` log π(a_t) of the sampled tokens.
        ref_logprobs: ``[B, T]`` log π_ref(a_t) of the same tokens.
        estimator: one of :data:`KL_ESTIMATORS`.

    Returns:
        ``[B, T]``; the caller masks padding.
    """
    if estimator not in _ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; known: {', '.join(KL_ESTIMATORS)}")
    return _ESTIMATORS[estimator](logprobs - ref_logprobs)


def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token PPO rewards: ``−β·KL_t`` everywhere, plus the RM score at the last token.

    InstructGPT eq. (2) / Ziegler et al. 2019: the KL to the SFT policy is paid per token and
    the reward model's score arrives once, at the last real response token (found with
    :func:`tether.ops.last_token_index`, so it is right under any padding and any length).

    Args:
        scores: ``[B]`` RM score of each (prompt, response).
        logprobs: ``[B, T]`` policy log-probs of the response tokens.
        ref_logprobs: ``[B, T]`` reference (SFT) log-probs of the same tokens.
        response_mask: ``[B, T]`` 1 on real response tokens; every row needs at least one.
        kl_coef: β.
        estimator: see :func:`kl_penalty`.

    Returns:
        ``(rewards, non_score_reward, kl)``, each ``[B, T]`` and 0 outside the mask;
        ``non_score_reward = -kl_coef * kl`` and ``rewards = non_score_reward + score at the
        last token``.

    Raises:
        ValueError: a row of ``response_mask`` is empty (no token to put the score on).
    """
    if not logprobs.shape == ref_logprobs.shape == response_mask.shape or scores.shape != (logprobs.shape[0],):
        raise ValueError(
            f"compute_rewards: expected scores [B] and [B, T] log-probs / mask; got "
            f"{tuple(scores.shape)}, {tuple(logprobs.shape)}, {tuple(ref_logprobs.shape)}, "
            f"{tuple(response_mask.shape)}"
        )
    keep = response_mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = torch.where(keep, kl_penalty(logprobs, ref_logprobs, estimator), zero)
    non_score_reward = -kl_coef * kl
    last = last_token_index(response_mask)
    score_at_last = torch.zeros_like(non_score_reward).scatter(
        1, last.unsqueeze(1), scores.to(non_score_reward.dtype).unsqueeze(1)
    )
    return non_score_reward + score_at_last, non_score_reward, kl


class FixedKLController:
    """A constant β (InstructGPT uses β = 0.02)."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; present so trainers treat both controllers alike."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive β that steers the measured KL towards a target (Ziegler et al. 2019, §2.2).

    ``e = clip(KL / target − 1, −0.2, 0.2)``; ``β ← β · (1 + e · n_steps / horizon)``. The
    clip bounds how fast β can move on one noisy KL estimate.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                "AdaptiveKLController needs init_kl_coef >= 0, target > 0 and horizon > 0; got "
                f"{init_kl_coef}, {target}, {horizon}"
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move β after ``n_steps`` episodes (or samples) whose mean KL was ``current_kl``."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        # β is the state that evolves; target/horizon travel with it so a resume with a changed
        # config is caught by the caller rather than silently mixing two schedules.
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))
