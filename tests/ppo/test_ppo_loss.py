"""tether.ppo.loss: clipped policy and value losses, next-token LM loss."""

from __future__ import annotations

import pytest
import torch

from tether.ppo.loss import policy_loss, value_loss


def _batch(seed: int, b: int = 4, t: int = 6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return g, mask


def test_policy_loss_when_old_equals_new_is_minus_mean_advantage():
    g, mask = _batch(0)
    logp = (-torch.rand(mask.shape, generator=g)).requires_grad_()
    adv = torch.randn(mask.shape, generator=g)
    loss, stats = policy_loss(logp, logp.detach().clone(), adv, mask)
    keep = mask.bool()
    torch.testing.assert_close(loss, -adv[keep].mean())
    assert stats["ratio_mean"].item() == 1.0
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    assert stats["approx_kl_k3"].item() == 0.0
    # Policy gradient: d loss / d logp = −A / n at real tokens, 0 on padding.
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.where(keep, -adv / keep.sum(), 0.0))


def test_policy_clipping_engages_beyond_one_plus_minus_clip():
    old = torch.zeros(1, 4)
    # ratios 1.5, 1.1, 0.5, 0.9 with positive, positive, negative, negative advantages
    logp = torch.log(torch.tensor([[1.5, 1.1, 0.5, 0.9]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, stats = policy_loss(logp, old, adv, torch.ones(1, 4), clip_range=0.2)
    # Clipped where the ratio left [0.8, 1.2] in the direction the advantage rewards.
    expected = torch.tensor([-1.2, -1.1, 0.8, 0.9]).mean()
    torch.testing.assert_close(loss, expected)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 2] == 0  # clipped: no gradient
    assert logp.grad[0, 1] != 0 and logp.grad[0, 3] != 0


def test_policy_clipping_is_pessimistic_the_other_way():
    # Ratio 1.5 with a negative advantage is NOT clipped: the loss keeps the worse term.
    logp = torch.log(torch.tensor([[1.5]]))
    loss, stats = policy_loss(logp, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1))
    torch.testing.assert_close(loss, torch.tensor(1.5))
    assert stats["clipfrac"].item() == 0.0


def test_policy_loss_ignores_padding_junk_in_loss_and_gradient():
    logp = torch.tensor([[-1.0, torch.nan]], requires_grad=True)
    old = torch.tensor([[-1.0, 0.0]])
    adv = torch.tensor([[2.0, torch.inf]])
    loss, stats = policy_loss(logp, old, adv, torch.tensor([[1, 0]]))
    torch.testing.assert_close(loss, torch.tensor(-2.0))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, 0.0]]))
    assert all(torch.isfinite(v) for v in stats.values())


def test_value_loss_unclipped_inside_range():
    values = torch.tensor([[1.0, 2.0]], requires_grad=True)
    old = torch.tensor([[0.9, 2.1]])
    returns = torch.tensor([[1.5, 1.0]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 2), clip_range_value=0.2)
    torch.testing.assert_close(loss, 0.5 * torch.tensor([0.25, 1.0]).mean())
    assert stats["vf_clipfrac"].item() == 0.0
    torch.testing.assert_close(stats["value_error"], torch.tensor([0.25, 1.0]).mean())


def test_value_loss_clipping_engages():
    # The new value jumped 1.0 away from old towards... past the return: the clipped value
    # (old + 0.2) is further from the return, so the max picks it and cuts the gradient.
    values = torch.tensor([[2.0, 0.0]], requires_grad=True)
    old = torch.tensor([[1.0, 0.0]])
    returns = torch.tensor([[3.0, 0.5]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 2), clip_range_value=0.2)
    # token 0: unclipped (2-3)^2 = 1, clipped (1.2-3)^2 = 3.24 -> 3.24; token 1: 0.25 both.
    torch.testing.assert_close(loss, 0.5 * torch.tensor([3.24, 0.25]).mean())
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)
    torch.testing.assert_close(stats["value_error"], torch.tensor([1.0, 0.25]).mean())
    loss.backward()
    assert values.grad[0, 0] == 0 and values.grad[0, 1] != 0


def test_value_loss_masks_padding_in_loss_and_gradient():
    values = torch.tensor([[1.0, torch.nan]], requires_grad=True)
    old = torch.tensor([[1.0, 100.0]])
    loss, _ = value_loss(values, old, torch.tensor([[0.0, torch.inf]]), torch.tensor([[1, 0]]))
    torch.testing.assert_close(loss, torch.tensor(0.5))
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[1.0, 0.0]]))
