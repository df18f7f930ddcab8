"""Autocast without re-casting frozen weights at every forward.

Under ``torch.autocast`` a linear layer casts its float32 weight to the low-precision dtype on
every call. PyTorch caches that cast inside one autocast region, but only for weights that
require grad: a frozen weight (the shared trunk under ``trainable_layers``, the reference policy,
the reward model, an evaluated policy, a LoRA base) is cast again by every forward, and in a
decode loop that is every sampled token. With the default model at batch 16 on a CPU with
AVX512-BF16, sampling under bf16 autocast took 7.46 s with the casts re-made and 5.10 s with them
kept (1.46x; a bfloat16 copy of the model: 5.39 s), measured 2026-12-01 with
``benchmarks/bench_generation.py``.

:func:`cache_frozen_casts` makes every plain ``nn.Linear`` of a model keep the cast of its frozen
weight from one call to the next. The result is bit for bit what autocast computes (the same
round-to-nearest cast, done once instead of every time); the cache is dropped as soon as the
weight changes (in place, by its version counter, or replaced), when it starts requiring grad,
and outside autocast the layer is a plain ``nn.Linear``. The float32 weight stays the parameter:
checkpoints, optimisers and weight hashes never see the copy.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

# layer -> (what the cast was made from, the cast); weak, so a dropped model frees its casts,
# and outside the module so deepcopy, pickling and state_dict never carry them.
_CASTS: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


class CastCachedLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is cast for autocast once, not at every call."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's own name
        weight, kind = self.weight, input.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        if dtype is None or weight.requires_grad or weight.dtype == dtype or not weight.is_floating_point():
            return F.linear(input, weight, self.bias)  # nothing to cast, or autocast's own cache
        key = (weight.data_ptr(), weight._version, weight.device, dtype)
        cached = _CASTS.get(self)
        if cached is None or cached[0] != key:
            cached = (key, weight.detach().to(dtype))
            _CASTS[self] = cached
        # Autocast casts the input (and a bias) as it would have; the weight already has the dtype.
        return F.linear(input, cached[1], self.bias)


def cache_frozen_casts(model: nn.Module) -> nn.Module:
    """Make every plain ``nn.Linear`` in ``model`` a :class:`CastCachedLinear` (in place).

    Subclasses of ``nn.Linear`` (quantised layers, wrappers) are left as they are. Returns ``model``.
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = CastCachedLinear
    return model


def uncache_frozen_casts(model: nn.Module) -> nn.Module:
    """The inverse of :func:`cache_frozen_casts` (in place): autocast as PyTorch does it, every
    frozen weight cast at every call, for comparisons (benchmarks, tests). Returns ``model``."""
    for module in model.modules():
        if type(module) is CastCachedLinear:
            module.__class__ = nn.Linear  # type: ignore[assignment]
            _CASTS.pop(module, None)
    return model
