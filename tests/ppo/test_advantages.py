"""tether.ppo.advantages: GAE against a naive per-episode loop, and whitening."""

from __future__ import annotations

import pytest
import torch

from tether.ppo.advantages import gae, leave_one_out, whiten_advantages


def _naive_gae(rewards, values, lengths, gamma, lam):
    """Per episode, per step: δ_t = r_t + γ V_{t+1} − V_t (V after the end = 0)."""
    b, t = rewards.shape
    adv = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        n = int(lengths[i])
        running = 0.0
        for s in reversed(range(n)):
            next_v = values[i, s + 1].item() if s + 1 < n else 0.0
            delta = rewards[i, s].item() + gamma * next_v - values[i, s].item()
            running = delta + gamma * lam * running
            adv[i, s] = running
    returns = adv + values * (torch.arange(t)[None] < lengths[:, None])
    return adv, returns


def _episode_batch(seed: int, b: int = 6, t: int = 9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t  # one full-length row
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    rewards = torch.randn(b, t, generator=g, dtype=torch.float64)
    values = torch.randn(b, t, generator=g, dtype=torch.float64)
    # Padding holds junk (even NaN) that must not leak into real positions.
    rewards = torch.where(mask.bool(), rewards, torch.nan)
    values = torch.where(mask.bool(), values, 1e3)
    return rewards, values, mask, lengths


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0)])
def test_gae_equals_naive_per_episode_loop(seed, gamma, lam):
    rewards, values, mask, lengths = _episode_batch(seed)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    clean_values = torch.where(mask.bool(), values, 0.0)
    clean_rewards = torch.where(mask.bool(), rewards, 0.0)
    exp_adv, exp_ret = _naive_gae(clean_rewards, clean_values, lengths, gamma, lam)
    torch.testing.assert_close(adv, exp_adv)
    torch.testing.assert_close(ret, exp_ret)
    assert torch.all(adv[~mask.bool()] == 0) and torch.all(ret[~mask.bool()] == 0)


def test_gae_with_lam_1_gamma_1_is_future_reward_sum_minus_value():
    rewards, values, mask, _ = _episode_batch(7)
    rewards = torch.where(mask.bool(), rewards, 0.0)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)
    keep = mask.bool()
    torch.testing.assert_close(adv[keep], (reward_to_go - values)[keep])
    torch.testing.assert_close(ret[keep], reward_to_go[keep])


def test_gae_bandit_terminal_score_only():
    # InstructGPT's shape: score at the last token, zero KL, γ = 1: with λ = 0 each advantage
    # is the one-step TD error.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.2, 0.5, 0.7, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.3, 0.2, 0.3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.5, 0.7, 1.0, 0.0]]))


def test_gae_has_no_gradient_and_rejects_left_padding():
    values = torch.randn(2, 3, requires_grad=True)
    adv, ret = gae(torch.randn(2, 3), values, torch.ones(2, 3))
    assert not adv.requires_grad and not ret.requires_grad
    with pytest.raises(ValueError, match="right-padded"):
        gae(torch.randn(1, 3), torch.randn(1, 3), torch.tensor([[0, 1, 1]]))


def test_gae_all_zero_row_is_all_zero():
    adv, ret = gae(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([[1, 1, 0], [0, 0, 0]]))
    assert torch.all(adv[1] == 0) and torch.all(ret[1] == 0)


def test_whiten_advantages_over_mask():
    _, values, mask, _ = _episode_batch(3)
    w = whiten_advantages(values, mask)
    keep = mask.bool()
    torch.testing.assert_close(w[keep].mean(), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(w[keep].std(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.all(w[~keep] == 0)


def test_leave_one_out_subtracts_the_other_responses_mean():
    scores = torch.tensor([1.0, 2.0, 6.0, -1.0, 0.5, 0.5, 3.0, 9.0, -4.0], dtype=torch.float64)
    out = leave_one_out(scores, 3)
    naive = [scores[i] - (scores[3 * (i // 3) : 3 * (i // 3) + 3].sum() - scores[i]) / 2 for i in range(9)]
    assert torch.allclose(out, torch.stack(naive))
    assert torch.allclose(out.view(3, 3).sum(-1), torch.zeros(3, dtype=torch.float64))
    # A prompt's level (the same shift for all its responses) is gone; the differences stay.
    shifted = scores + torch.tensor([5.0, -2.0, 100.0], dtype=torch.float64).repeat_interleave(3)
    assert torch.allclose(leave_one_out(shifted, 3), out)
    with pytest.raises(ValueError, match="groups of 2"):
        leave_one_out(scores[:3], 2)
    with pytest.raises(ValueError, match="groups of 1"):
        leave_one_out(scores, 1)
