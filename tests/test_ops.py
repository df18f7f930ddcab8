"""tether.ops: masked reductions, token log-probs, entropy, the LM loss, last-token index."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tether.ops import (
    IGNORE_INDEX,
    entropy_from_logits,
    last_token_index,
    lm_loss,
    masked_mean,
    masked_var,
    masked_whiten,
    token_logprobs,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_mask(b: int, t: int, g: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    return (torch.arange(t)[None, :] < lengths[:, None]).long()


# masked_mean / masked_var / masked_whiten ------------------------------------------------------


def test_masked_mean_matches_selected_elements_and_ignores_nan_padding():
    g = _gen()
    x = torch.randn(4, 7, generator=g)
    mask = _random_mask(4, 7, g)
    expected = x[mask.bool()].mean()
    x_padded = torch.where(mask.bool(), x, torch.nan)
    torch.testing.assert_close(masked_mean(x_padded, mask), expected)
    rows = masked_mean(x_padded, mask, dim=1)
    for i in range(4):
        torch.testing.assert_close(rows[i], x[i][mask[i].bool()].mean())


def test_masked_mean_of_empty_mask_is_zero_with_zero_gradient():
    x = torch.randn(2, 3, requires_grad=True)
    out = masked_mean(x, torch.zeros(2, 3))
    out.backward()
    assert out.item() == 0.0
    assert torch.equal(x.grad, torch.zeros(2, 3))


def test_masked_var_matches_torch_var():
    g = _gen(1)
    x = torch.randn(5, 6, generator=g)
    mask = _random_mask(5, 6, g)
    sel = x[mask.bool()]
    torch.testing.assert_close(masked_var(x, mask), sel.var(unbiased=True))
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), sel.var(unbiased=False))


def test_masked_var_rejects_empty_and_single_unbiased():
    with pytest.raises(ValueError):
        masked_var(torch.ones(2, 2), torch.zeros(2, 2))
    one = torch.tensor([[1, 0], [0, 0]])
    with pytest.raises(ValueError):
        masked_var(torch.ones(2, 2), one)
    assert masked_var(torch.ones(2, 2), one, unbiased=False).item() == 0.0


def test_masked_whiten_gives_mean_zero_std_one_over_mask_and_zero_outside():
    g = _gen(2)
    x = 3.0 + 5.0 * torch.randn(6, 9, generator=g, dtype=torch.float64)
    mask = _random_mask(6, 9, g)
    x = torch.where(mask.bool(), x, torch.tensor(1e6, dtype=torch.float64))  # padding is junk
    w = masked_whiten(x, mask)
    sel = w[mask.bool()]
    torch.testing.assert_close(sel.mean(), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(sel.std(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.all(w[~mask.bool()] == 0)


def test_masked_whiten_without_shift_keeps_mean():
    g = _gen(3)
    x = 2.0 + torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = _random_mask(3, 5, g)
    mask[0] = 1  # at least 5 elements
    w = masked_whiten(x, mask, shift_mean=False)
    sel = w[mask.bool()]
    torch.testing.assert_close(sel.mean(), x[mask.bool()].mean())
    torch.testing.assert_close(sel.std(), torch.tensor(1.0, dtype=torch.float64))


def test_masked_whiten_single_element_and_empty():
    x = torch.tensor([[4.0, 9.0]])
    assert torch.equal(masked_whiten(x, torch.tensor([[1, 0]])), torch.zeros(1, 2))
    with pytest.raises(ValueError):
        masked_whiten(x, torch.zeros(1, 2))


# token_logprobs / entropy ----------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("chunk_elements", [2**25, 1, 13, 40])
def test_token_logprobs_equals_log_softmax_gathered(temperature, chunk_elements):
    g = _gen(4)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    expected = F.log_softmax(logits / temperature, dim=-1).gather(-1, tokens[..., None])[..., 0]
    got = token_logprobs(logits, tokens, temperature, chunk_elements=chunk_elements)
    torch.testing.assert_close(got, expected)


def test_token_logprobs_temperature_changes_result():
    g = _gen(5)
    logits = torch.randn(2, 4, 7, generator=g)
    tokens = torch.randint(0, 7, (2, 4), generator=g)
    assert not torch.allclose(token_logprobs(logits, tokens, 1.0), token_logprobs(logits, tokens, 0.5))


@pytest.mark.parametrize("chunk_elements", [2**25, 1, 10])
def test_token_logprobs_gradient_matches_autograd_reference(chunk_elements):
    g = _gen(6)
    logits = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 6, (3, 4), generator=g)
    weights = torch.randn(3, 4, generator=g, dtype=torch.float64)
    (token_logprobs(logits, tokens, 0.8, chunk_elements=chunk_elements) * weights).sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    ref = F.log_softmax(logits / 0.8, -1).gather(-1, tokens[..., None])[..., 0]
    (ref * weights).sum().backward()
    torch.testing.assert_close(got, logits.grad)
    torch.autograd.gradcheck(lambda z: token_logprobs(z, tokens, 0.8, chunk_elements=chunk_elements), (logits,))


def test_token_logprobs_bf16_is_upcast_and_accepts_non_contiguous_views():
    g = _gen(7)
    full = torch.randn(2, 6, 50, generator=g).to(torch.bfloat16)
    view = full[:, :-1]  # the usual causal shift: a non-contiguous view
    tokens = torch.randint(0, 50, (2, 5), generator=g)
    got = token_logprobs(view, tokens, chunk_elements=60)
    assert got.dtype == torch.float32
    expected = F.log_softmax(view.float(), -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(got, expected)


def test_token_logprobs_rejects_bad_shapes_and_temperature():
    with pytest.raises(ValueError):
        token_logprobs(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        token_logprobs(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), 0.0)


@pytest.mark.parametrize("chunk_elements", [2**25, 1, 9])
def test_entropy_from_logits_matches_definition_and_has_gradient(chunk_elements):
    g = _gen(8)
    logits = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    got = entropy_from_logits(logits, 1.3, chunk_elements=chunk_elements)
    logp = F.log_softmax(logits / 1.3, -1)
    expected = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_entropy_of_uniform_is_log_v():
    h = entropy_from_logits(torch.zeros(2, 3, 8))
    torch.testing.assert_close(h, torch.full((2, 3), torch.log(torch.tensor(8.0)).item()))


# lm_loss -----------------------------------------------------------------------------------------
def test_lm_loss_shifts_labels_and_matches_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 13, generator=g)
    input_ids = torch.randint(0, 13, (3, 7), generator=g)
    labels = input_ids.clone()
    labels[:, :3] = -100  # prompt tokens
    labels[2, 5:] = -100  # padding
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(lm_loss(logits, labels), expected)


def test_lm_loss_logit_t_predicts_label_t_plus_1():
    # A model that puts all mass on token (t+1) at position t has near-zero loss.
    labels = torch.tensor([[3, 1, 4, 1, 5]])
    logits = torch.full((1, 5, 6), -1e4)
    for t in range(4):
        logits[0, t, labels[0, t + 1]] = 0.0
    assert lm_loss(logits, labels).item() < 1e-6


def test_lm_loss_gradient_and_all_ignored():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.full((2, 4), -100)
    loss = lm_loss(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(2, 4, 5))
    logits.grad = None
    labels[0, 2] = 1
    lm_loss(logits, labels).backward()
    assert logits.grad[0, 1].abs().sum() > 0  # position 1 predicts label 2
    assert logits.grad[0, 2].abs().sum() == 0 and logits.grad[1].abs().sum() == 0


def _old_lm_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two formulas lm_loss replaced: SFT's nll_sum (an fp32 copy of the logits through
    F.cross_entropy, summed) and PPO-ptx's token mean."""
    flat = logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()
    return (
        F.cross_entropy(*flat, ignore_index=IGNORE_INDEX, reduction="mean"),
        F.cross_entropy(*flat, ignore_index=IGNORE_INDEX, reduction="sum"),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [7, 2**25])
def test_lm_loss_equals_the_old_mean_and_sum_formulas_with_their_gradients(dtype, chunk_elements):
    g = _gen(3)
    labels = torch.randint(0, 50, (4, 9), generator=g)
    labels[:, :4] = IGNORE_INDEX  # prompt tokens
    labels[1, 6:] = IGNORE_INDEX  # padding
    labels[3] = IGNORE_INDEX  # a row with no target at all
    base = torch.randn(4, 9, 50, generator=g).to(dtype)
    old_in, new_in = base.clone().requires_grad_(), base.clone().requires_grad_()
    old_mean, old_sum = _old_lm_losses(old_in, labels)
    new_mean = lm_loss(new_in, labels, chunk_elements=chunk_elements)
    new_sum = lm_loss(new_in, labels, "sum", chunk_elements=chunk_elements)
    assert new_mean.dtype == new_sum.dtype == torch.float32
    torch.testing.assert_close(new_mean, old_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new_sum, old_sum, rtol=1e-5, atol=1e-5)
    n_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(new_sum / n_targets, new_mean)
    (old_mean + 0.3 * old_sum).backward()
    (new_mean + 0.3 * new_sum).backward()
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}  # bf16 gradients: bf16 rounding
    torch.testing.assert_close(new_in.grad, old_in.grad, **tol)
    assert new_in.grad.dtype == dtype and not new_in.grad[3].any()


def test_lm_loss_rejects_an_unknown_reduction():
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        lm_loss(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), "none")  # type: ignore[arg-type]


class _LargestFloat32(TorchDispatchMode):
    """Records the element count of the largest fp32 tensor any op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def test_lm_loss_never_holds_an_fp32_copy_of_bf16_logits():
    """bf16 logits [B, T, V]: forward and backward allocate fp32 only tile by tile, where the old
    SFT formula made a whole [B·T, V] fp32 copy (the control below: the detector sees it)."""
    b, t, v = 3, 17, 256
    labels = torch.randint(0, v, (b, t), generator=_gen(4))
    labels[:, :5] = IGNORE_INDEX
    logits = torch.randn(b, t, v, generator=_gen(5)).to(torch.bfloat16).requires_grad_()
    full_copy = b * (t - 1) * v
    with _LargestFloat32() as new:
        lm_loss(logits, labels, "sum", chunk_elements=4 * v).backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
    assert 0 < new.largest <= 4 * v < full_copy // 10
    with _LargestFloat32() as old:
        _old_lm_losses(logits, labels)[1].backward()
    assert old.largest >= full_copy


# last_token_index ------------------------------------------------------------------------------


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 0, 4]
    assert last_token_index(left).tolist() == [4, 4, 4]
    assert last_token_index(left.bool()).dtype == torch.long
    # A response mask inside a left-padded prompt ⊕ right-padded response.
    both = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    assert last_token_index(both).tolist() == [3, 4]


def test_last_token_index_rejects_empty_rows():
    with pytest.raises(ValueError, match=r"\[1\]"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


def test_masked_whiten_all_reduce_uses_every_ranks_tokens():
    """Two ranks holding the same [B, T] are one batch of 2B rows: an all-reduce that doubles."""
    torch.manual_seed(0)
    x = torch.randn(3, 5) * 4 + 1
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    both = masked_whiten(torch.cat([x, x]), torch.cat([mask, mask]))[:3]
    for shift_mean in (True, False):
        expected = masked_whiten(torch.cat([x, x]), torch.cat([mask, mask]), shift_mean=shift_mean)[:3]
        got = masked_whiten(x, mask, shift_mean=shift_mean, all_reduce=lambda t: 2 * t)
        torch.testing.assert_close(got, expected)
    assert not torch.allclose(both, masked_whiten(x, mask))  # (the statistics did change)
