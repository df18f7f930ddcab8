"""tether.ppo.kl: KL estimators, per-token rewards, KL controllers."""

from __future__ import annotations

import io
import math

import pytest
import torch

from tether.ppo.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    compute_rewards,
    kl_penalty,
)


def _logprobs(seed: int, shape=(4, 6)):
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(shape, generator=g) * 5, -torch.rand(shape, generator=g) * 5


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_kl_is_exactly_zero_for_identical_logprobs(estimator):
    logp, _ = _logprobs(0)
    assert torch.equal(kl_penalty(logp, logp.clone(), estimator), torch.zeros_like(logp))


def test_estimator_formulas():
    logp, ref = _logprobs(1)
    d = logp - ref
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), d)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), 0.5 * d**2)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), (torch.exp(ref - logp) - 1) - (ref - logp))
    torch.testing.assert_close(kl_penalty(logp, ref, "abs"), d.abs())


def test_k3_is_non_negative_even_for_tiny_differences():
    logp, ref = _logprobs(2, shape=(1000,))
    assert torch.all(kl_penalty(logp, ref, "k3") >= 0)
    tiny = logp + torch.linspace(-1e-6, 1e-6, 1000)
    assert torch.all(kl_penalty(logp, tiny, "k3") >= 0)


def test_k1_and_k3_are_unbiased_estimates_of_the_true_kl():
    # Sample from p, compare the mean estimate with the exact KL(p || q).
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(5, generator=g), 0)
    q = torch.softmax(torch.randn(5, generator=g), 0)
    true_kl = (p * (p.log() - q.log())).sum()
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    for est in ("k1", "k3"):
        mean = kl_penalty(p.log()[x], q.log()[x], est).mean()
        assert mean.item() == pytest.approx(true_kl.item(), abs=0.01)


def test_unknown_estimator_lists_known_ones():
    with pytest.raises(ValueError, match="k1, k2, k3, abs"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_compute_rewards_places_score_at_last_real_token_under_right_padding():
    logp, ref = _logprobs(4, shape=(3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    scores = torch.tensor([2.0, -1.0, 0.5])
    rewards, non_score, kl = compute_rewards(scores, logp, ref, mask, kl_coef=0.1)
    keep = mask.bool()
    torch.testing.assert_close(kl, torch.where(keep, logp - ref, 0.0))
    torch.testing.assert_close(non_score, -0.1 * kl)
    expected = non_score.clone()
    for i, last in enumerate([4, 1, 0]):
        expected[i, last] += scores[i]
    torch.testing.assert_close(rewards, expected)
    assert torch.all(rewards[~keep] == 0)
    # The sum of a row's rewards is score − β·Σ KL: nothing lost, nothing doubled.
    torch.testing.assert_close(rewards.sum(1), scores - 0.1 * kl.sum(1))


def test_compute_rewards_ignores_junk_in_padding_and_rejects_empty_responses():
    logp = torch.tensor([[-1.0, torch.nan]])
    ref = torch.tensor([[-1.5, 0.0]])
    rewards, _, kl = compute_rewards(torch.tensor([1.0]), logp, ref, torch.tensor([[1, 0]]), 0.2)
    torch.testing.assert_close(rewards, torch.tensor([[1.0 - 0.2 * 0.5, 0.0]]))
    with pytest.raises(ValueError):
        compute_rewards(torch.tensor([1.0]), logp, ref, torch.tensor([[0, 0]]), 0.2)


def test_compute_rewards_with_k3_estimator():
    logp, ref = _logprobs(5, shape=(2, 3))
    mask = torch.ones(2, 3)
    _, _, kl = compute_rewards(torch.zeros(2), logp, ref, mask, 0.05, estimator="k3")
    torch.testing.assert_close(kl, kl_penalty(logp, ref, "k3"))


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.02)
    ctl.update(current_kl=100.0, n_steps=512)
    assert ctl.value == 0.02
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.02


def test_adaptive_controller_follows_ziegler_update():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=6.6, n_steps=256)  # e = 0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.1 * 256 / 10_000))
    before = ctl.value
    ctl.update(current_kl=600.0, n_steps=256)  # e clipped to 0.2
    assert ctl.value == pytest.approx(before * (1 + 0.2 * 256 / 10_000))


def test_adaptive_controller_moves_beta_up_above_target_and_down_below():
    ctl = AdaptiveKLController(0.05, target=1.0, horizon=1000)
    ctl.update(2.0, 100)
    assert ctl.value > 0.05
    high = ctl.value
    ctl.update(0.5, 100)
    assert ctl.value < high
    same = ctl.value
    ctl.update(1.0, 100)
    assert ctl.value == same


def test_adaptive_controller_state_round_trips_exactly():
    ctl = AdaptiveKLController(0.05, target=1.0, horizon=1000)
    for kl in (0.3, 2.5, 1.7, 0.9):
        ctl.update(kl, 64)
    resumed = AdaptiveKLController(0.05, target=1.0, horizon=1000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    ctl.update(3.0, 64)
    resumed.update(3.0, 64)
    assert resumed.value == ctl.value
    # The state survives torch.save / torch.load like any checkpoint entry.
    buf = io.BytesIO()
    torch.save(ctl.state_dict(), buf)
    buf.seek(0)
    again = AdaptiveKLController(1.0, target=1.0, horizon=1000)
    again.load_state_dict(torch.load(buf))
    assert again.value == ctl.value and not math.isnan(again.value)


def test_controllers_reject_bad_arguments():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError):
        FixedKLController(-1.0)
