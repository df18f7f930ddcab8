"""tether.ops: masked reductions, token log-probs, entropy, last-token index."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tether.ops import (
    entropy_from_logits,
    last_token_index,
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
    assert not torch.allclose(
        token_logprobs(logits, tokens, 1.0), token_logprobs(logits, tokens, 0.5)
    )


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
    torch.autograd.gradcheck(
        lambda z: token_logprobs(z, tokens, 0.8, chunk_elements=chunk_elements), (logits,)
    )


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
