"""Masked reductions, token-level log-prob math and the LM loss shared by the SFT, RM and PPO stages.

Conventions used throughout tether:

* ``B`` batch, ``T`` sequence (or response) length, ``V`` vocabulary size.
* A *mask* is a ``[B, T]`` tensor of 0/1 (bool, int or float). Only its non-zero-ness is used:
  positions outside the mask never reach a result, even when they hold NaN or inf (padding
  log-probs often do), because they are selected away with :func:`torch.where` rather than
  multiplied by 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor

# Elements of [*, V] float32 work memory handled at once by the vocabulary-sized ops below:
# 2**25 floats = 128 MiB, small next to a model yet large enough to keep a GPU busy.
CHUNK_ELEMENTS = 2**25

# The label of a position that carries no loss (prompt tokens, padding): PyTorch's and HF's value.
IGNORE_INDEX = -100


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is non-zero.

    Args:
        x: ``[B, T]`` (any shape broadcastable with ``mask``).
        mask: same shape as ``x``; non-zero = counted.
        dim: reduce over this dimension only (``[B, T]`` -> ``[B]`` for ``dim=1``); ``None``
            reduces over everything (a token-level mean: every unmasked token weighs the same).

    Returns:
        A scalar (``dim=None``) or ``x`` reduced over ``dim``. Where the mask is empty the result
        is 0 (not NaN), and the graph stays connected, so an empty batch yields a zero gradient
        instead of poisoning the optimiser state.
    """
    keep = mask.bool()
    total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    count = keep.sum() if dim is None else keep.sum(dim)
    total = total.sum() if dim is None else total.sum(dim)
    return total / count.clamp_min(1).to(total.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the masked positions (all of them pooled), as a scalar.

    Args:
        x: ``[B, T]``.
        mask: ``[B, T]``; non-zero = counted.
        unbiased: apply Bessel's correction ``n / (n - 1)``.

    Raises:
        ValueError: the mask selects nothing, or one element with ``unbiased=True`` (the
            unbiased variance of one sample is undefined; silently returning 0 hides bugs).
    """
    keep = mask.bool()
    n = int(keep.sum())
    if n == 0:
        raise ValueError("masked_var: the mask selects no elements")
    if unbiased and n == 1:
        raise ValueError("masked_var: unbiased variance of a single element is undefined")
    mean = masked_mean(x, keep)
    centered = torch.where(keep, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
    var = (centered**2).sum() / n
    return var * (n / (n - 1)) if unbiased else var


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    *,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Standardise ``x`` to mean 0 / std 1 using statistics of the masked positions only.

    Used to whiten PPO advantages (Schulman et al. 2017; Ziegler et al. 2019 whiten both
    advantages and rewards): padding must not enter the statistics, or the advantage scale
    depends on how much padding the batch happens to have.

    Args:
        x: ``[B, T]``.
        mask: ``[B, T]``; non-zero = real.
        shift_mean: subtract the mean; ``False`` only rescales (keeps the sign of e.g. rewards).
        eps: added to the variance so a constant ``x`` does not divide by zero.
        all_reduce: sums a tensor over data-parallel ranks (:func:`tether.distributed.all_reduce_sum`):
            the statistics are then those of every rank's ``x`` together, computed in the same two
            passes (mean, then the centred sum of squares) as in one process.

    Returns:
        ``[B, T]``; the std is the unbiased one (a single element uses the biased one, i.e.
        whitens to 0). Positions outside the mask are 0.

    Raises:
        ValueError: the mask selects nothing.
    """
    keep = mask.bool()
    if all_reduce is not None:
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        total, count = all_reduce(torch.stack([torch.where(keep, x, zero).sum(), keep.sum().to(x.dtype)]))
        if int(count) == 0:
            raise ValueError("masked_whiten: the mask selects no elements")
        mean = total / count
        sq = all_reduce(torch.where(keep, x - mean, zero).pow(2).sum())
        var = sq / (count - 1) if int(count) > 1 else sq / count
        whitened = (x - mean) * torch.rsqrt(var + eps)
        if not shift_mean:
            whitened = whitened + mean
        return torch.where(keep, whitened, zero)
    n = int(keep.sum())
    if n == 0:
        raise ValueError("masked_whiten: the mask selects no elements")
    mean = masked_mean(x, keep)
    var = masked_var(x, keep, unbiased=n > 1)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(keep, whitened, torch.zeros((), dtype=x.dtype, device=x.device))


def _chunks(b: int, t: int, v: int, chunk_elements: int) -> Iterator[tuple[slice, slice]]:
    """Tile a ``[b, t, v]`` tensor into ``(batch, time)`` slices of about ``chunk_elements``.

    Slicing the two leading dims (never reshaping) keeps every tile a view, so a non-contiguous
    ``logits[:, :-1]`` is never copied whole.
    """
    if b == 0 or t == 0:
        return
    tokens_per_chunk = max(1, chunk_elements // max(v, 1))
    if t <= tokens_per_chunk:
        rows = max(1, tokens_per_chunk // t)
        for b0 in range(0, b, rows):
            yield slice(b0, b0 + rows), slice(None)
    else:
        for b0 in range(b):
            for t0 in range(0, t, tokens_per_chunk):
                yield slice(b0, b0 + 1), slice(t0, t0 + tokens_per_chunk)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 log-softmax over 50k+ logits loses several bits of the result; compute in fp32
    # (or fp64 when given fp64, which gradcheck needs).
    return torch.promote_types(dtype, torch.float32)


def _scaled(logits: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    """``logits / temperature`` in ``dtype``; at temperature 1 no pass over the tile (x / 1 == x)."""
    logits = logits.to(dtype)
    return logits if temperature == 1.0 else logits / temperature


class _TokenLogprobs(torch.autograd.Function):
    """log_softmax(logits / T) gathered at ``tokens``, chunked in forward *and* backward.

    Autograd through ``log_softmax(...).gather(...)`` would keep a ``[B, T, V]`` fp32 copy of
    the logits (or of the log-softmax) alive until backward. Here backward recomputes the
    softmax tile by tile from the logits the caller already holds, so the only extra saved
    tensor is the ``[B, T]`` log-normaliser.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, tokens: Tensor, temperature: float, chunk_elements: int) -> Tensor:
        b, t, v = logits.shape
        dtype = _compute_dtype(logits.dtype)
        out = torch.empty(b, t, dtype=dtype, device=logits.device)
        lse = torch.empty(b, t, dtype=dtype, device=logits.device)
        for bs, ts in _chunks(b, t, v, chunk_elements):
            z = _scaled(logits[bs, ts], dtype, temperature)
            lse[bs, ts] = torch.logsumexp(z, dim=-1)
            out[bs, ts] = z.gather(-1, tokens[bs, ts].unsqueeze(-1)).squeeze(-1) - lse[bs, ts]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        ctx.chunk_elements = chunk_elements
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        logits, tokens, lse = ctx.saved_tensors
        temperature = ctx.temperature
        b, t, v = logits.shape
        grad_logits = torch.empty(b, t, v, dtype=logits.dtype, device=logits.device)
        for bs, ts in _chunks(b, t, v, ctx.chunk_elements):
            z = _scaled(logits[bs, ts], lse.dtype, temperature)
            go = grad_out[bs, ts].to(lse.dtype).unsqueeze(-1)
            # d log p(tok) / d logits = (onehot(tok) - softmax(z)) / temperature
            g = torch.sub(z, lse[bs, ts].unsqueeze(-1)).exp_().mul_(-go)
            g.scatter_add_(-1, tokens[bs, ts].unsqueeze(-1), go)
            grad_logits[bs, ts] = g if temperature == 1.0 else g.div_(temperature)
        return grad_logits, None, None, None


def token_logprobs(
    logits: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Tensor:
    """Log-probability of each token under ``softmax(logits / temperature)``.

    The caller aligns the two: for a causal LM, ``logits[:, t]`` predicts ``input_ids[:, t+1]``,
    so pass ``logits[:, :-1]`` with ``input_ids[:, 1:]`` (or the response slice of both).
    ``temperature`` must be the one used for sampling: log-probs of a different distribution
    than the one sampled make the KL estimate biased, even negative.

    Memory: work is done in tiles of about ``chunk_elements`` logits upcast to fp32, in forward
    and in backward; nothing ``[B, T, V]``-sized is allocated except the gradient itself.

    Args:
        logits: ``[B, T, V]`` in any float dtype.
        tokens: ``[B, T]`` integer token ids in ``[0, V)``.
        temperature: > 0.
        chunk_elements: tile size in logits (tests use a tiny one to exercise tiling).

    Returns:
        ``[B, T]`` log-probs in fp32 (fp64 if ``logits`` is fp64), differentiable w.r.t. logits.
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"token_logprobs: expected logits [B, T, V] and tokens [B, T], got "
            f"{tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    return _TokenLogprobs.apply(logits, tokens.long(), float(temperature), int(chunk_elements))


def entropy_from_logits(logits: Tensor, temperature: float = 1.0, *, chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` at every position, in nats.

    ``H = logsumexp(z) - Σ_v softmax(z)_v · z_v`` with ``z = logits / temperature``, computed
    tile by tile in fp32 (see :func:`token_logprobs`). Differentiable through plain autograd.

    Args:
        logits: ``[B, T, V]``.
        temperature: > 0.

    Returns:
        ``[B, T]`` in fp32 (fp64 if ``logits`` is fp64).
    """
    if logits.dim() != 3:
        raise ValueError(f"entropy_from_logits: expected [B, T, V], got {tuple(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"entropy_from_logits: temperature must be > 0, got {temperature}")
    b, t, v = logits.shape
    out = logits.new_empty(b, t, dtype=_compute_dtype(logits.dtype))
    for bs, ts in _chunks(b, t, v, chunk_elements):
        z = logits[bs, ts].to(out.dtype) / temperature
        # Writing tiles into `out` is tracked by autograd (CopySlices), so gradients still flow.
        out[bs, ts] = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)
    return out


def lm_loss(
    logits: Tensor,
    labels: Tensor,
    reduction: Literal["mean", "sum"] = "mean",
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Tensor:
    """Next-token cross-entropy over the labels that are not :data:`IGNORE_INDEX`.

    Shift convention (the Hugging Face one): pass **un-shifted** ``labels`` aligned with the
    model input, i.e. ``labels = input_ids`` with positions that should not be learned (prompt
    tokens for SFT, padding) set to ``IGNORE_INDEX``. The shift happens here: ``logits[:, t]`` is
    scored against ``labels[:, t + 1]``; the last logit and the first label are unused.

    The one LM loss of tether: SFT (``L_SFT = −Σ log P(y | x)`` on response tokens), the PPO-ptx
    pretraining term (InstructGPT eq. (2), ``γ · E[log π(x)]`` as a loss to minimise) and the
    perplexities of the evaluation. It is :func:`token_logprobs`, so no ``[B, T, V]`` fp32 copy
    of the logits is ever made, in forward or backward.

    Args:
        logits: ``[B, T, V]`` in any float dtype.
        labels: ``[B, T]`` long, ``IGNORE_INDEX`` = no loss.
        reduction: ``"mean"`` per target token, or ``"sum"`` (to divide by the target tokens of a
            whole optimiser batch, so that splitting it into micro-batches changes no gradient).

    Returns:
        A scalar fp32 loss (fp64 for fp64 logits); 0, with a zero gradient, when every label is
        ignored.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"lm_loss: expected logits [B, T, V] and labels [B, T]; got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"lm_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    # Ignored labels are swapped for token 0 so the gather is valid, then selected away.
    logprobs = token_logprobs(logits[:, :-1], torch.where(keep, targets, 0), chunk_elements=chunk_elements)
    if reduction == "mean":
        return -masked_mean(logprobs, keep)
    return -torch.where(keep, logprobs, 0.0).sum()


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last non-zero position in each row of a ``[B, T]`` mask.

    Where a score or a terminal reward is read (the RM score at the last real token of
    prompt ⊕ response; the PPO score at the last response token). Correct under left padding
    (``0 0 1 1`` -> 3), right padding (``1 1 0 0`` -> 1) and both; it never assumes
    ``mask.sum() - 1`` is the index, which is the classic wrong-token bug under left padding.

    Args:
        mask: ``[B, T]`` attention or response mask.

    Returns:
        ``LongTensor[B]``.

    Raises:
        ValueError: a row has no non-zero entry (there is no token to read).
    """
    if mask.dim() != 2:
        raise ValueError(f"last_token_index: expected a [B, T] mask, got {tuple(mask.shape)}")
    b, t = mask.shape
    if b == 0:
        return torch.zeros(0, dtype=torch.long, device=mask.device)
    if t == 0:
        raise ValueError(f"last_token_index: rows {list(range(b))} have no 1 in the mask")
    positions = torch.arange(t, device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).amax(dim=1)
    empty = (last < 0).nonzero().flatten()
    if empty.numel() > 0:
        raise ValueError(f"last_token_index: rows {empty.tolist()} have no 1 in the mask")
    return last
