"""Frozen weights' autocast casts kept between forwards: autocast's numbers, never a stale cast."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tether.config import ModelConfig
from tether.models import precision
from tether.models.generation import sample
from tether.models.loading import load_causal_lm
from tether.models.precision import CastCachedLinear, cache_frozen_casts, uncache_frozen_casts

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def pair(requires_grad: bool = False) -> tuple[nn.Linear, nn.Linear]:
    """A plain linear layer and a cast-caching copy of it."""
    torch.manual_seed(0)
    plain = nn.Linear(16, 8).requires_grad_(requires_grad)
    return plain, cache_frozen_casts(copy.deepcopy(plain))


def test_the_cached_cast_gives_autocast_s_numbers_and_is_made_once():
    plain, cached = pair()
    assert type(cached) is CastCachedLinear
    x = torch.randn(4, 16)
    with torch.autocast(**BF16):
        first = cached(x)
        cast = precision._CASTS[cached][1]
        second = cached(x)
        assert precision._CASTS[cached][1] is cast  # the very same cast served the second call
        want = plain(x)
    assert first.dtype == torch.bfloat16
    assert torch.equal(first, want) and torch.equal(second, want)
    # Outside autocast it is a float32 nn.Linear.
    assert torch.equal(cached(x), plain(x)) and cached(x).dtype == torch.float32


@pytest.mark.parametrize(
    "change",
    [
        "in place",  # an optimiser step, load_state_dict, a LoRA merge: the version counter moves
        "replaced",  # `.data =` a new tensor: the storage moves
        "unfrozen",  # requires grad again: autocast's own cache is the right one, gradients flow
    ],
)
def test_a_changed_weight_is_never_served_from_a_stale_cast(change):
    plain, cached = pair()
    x = torch.randn(4, 16)
    with torch.autocast(**BF16):
        cached(x)  # the cast is made
        with torch.no_grad():
            if change == "in place":
                cached.weight.mul_(-2.0)
            elif change == "replaced":
                cached.weight.data = torch.randn_like(cached.weight)
            else:
                cached.weight.requires_grad_(True)
        plain.weight.data = cached.weight.detach().clone()
        out = cached(x)
        assert torch.equal(out, plain(x))
    if change == "unfrozen":
        out.float().sum().backward()
        assert cached.weight.grad is not None and cached.weight.grad.abs().sum() > 0


def test_the_cast_is_not_part_of_the_model():
    plain, cached = pair()
    with torch.autocast(**BF16):
        cached(torch.randn(2, 16))
    assert cached.state_dict().keys() == plain.state_dict().keys()
    twin = copy.deepcopy(cached)  # deepcopy (a Sampler's copy, a frozen reference) carries no cast
    assert twin not in precision._CASTS and cached in precision._CASTS


def test_only_plain_linear_layers_are_converted():
    class Quantised(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Quantised(4, 4), nn.Embedding(3, 4))
    cache_frozen_casts(model)
    assert [type(m).__name__ for m in model] == ["CastCachedLinear", "Quantised", "Embedding"]


@pytest.mark.parametrize("trainable_layers", [None, 1])
def test_a_loaded_model_samples_and_scores_as_plain_autocast_does(tiny_dir, trainable_layers):
    """Frozen (an evaluated policy, a reference) or partly trainable: the same logits and the
    same tokens as the model with plain nn.Linear layers under the same autocast."""
    cfg = ModelConfig(name_or_path=str(tiny_dir), trainable_layers=trainable_layers)
    model, tok = load_causal_lm(cfg, trainable=trainable_layers is not None)
    assert any(type(m) is CastCachedLinear for m in model.modules())
    plain = uncache_frozen_casts(copy.deepcopy(model))
    assert not any(type(m) is CastCachedLinear for m in plain.modules())
    ids = torch.tensor([[5, 9, 2, 7, 11, 3]])
    prompts = ["hi there", "a longer prompt to pad"]
    with torch.autocast(**BF16):
        for _ in range(2):  # the second forward is served from the casts
            assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
        got, want = (
            sample(m, tok, prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(3))
            for m in (model, plain)
        )
    assert torch.equal(got.response_ids, want.response_ids)
    assert torch.equal(got.logprobs, want.logprobs)
