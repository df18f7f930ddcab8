"""What a large run needs from model loading: gradient checkpointing (the same gradients) and
bf16 weights by default on a GPU that has it (float32 on a CPU, as before)."""

from __future__ import annotations

import pytest
import torch

from tether.config import ModelConfig
from tether.models.lm_batch import collate, encode_demonstration
from tether.models.loading import load_causal_lm, weights_dtype
from tether.ops import lm_loss


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir):
    """--model.gradient-checkpointing recomputes activations in backward: same loss, same gradients
    (dropout on, so the recomputation must also replay the random stream)."""
    grads, losses = [], []
    for checkpointing in (False, True):
        cfg = ModelConfig(name_or_path=str(tiny_dir), residual_dropout=0.1, gradient_checkpointing=checkpointing)
        model, tok = load_causal_lm(cfg, trainable=True)
        assert model.is_activation_checkpointing is checkpointing
        batch = collate(
            [
                encode_demonstration(tok, p, r, 64)
                for p, r in [("Name a colour.", "Blue."), ("Count to three.", "1 2 3")]
            ],
            tok.pad_token_id,
        )
        torch.manual_seed(0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = lm_loss(logits, batch["labels"], "mean")
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert losses[0] == losses[1]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize(
    ("dtype", "device", "bf16_native", "expected"),
    [
        ("auto", "cpu", True, torch.float32),  # CPUs train in float32, as before
        ("auto", "cuda", True, torch.bfloat16),  # an Ampere-or-later GPU
        ("auto", "cuda", False, torch.float32),  # a GPU without native bf16 (T4, V100)
        ("float32", "cuda", True, torch.float32),  # asked for: kept
        ("float16", "cpu", False, torch.float16),
    ],
)
def test_weights_dtype_defaults_to_bf16_on_a_gpu_that_has_it(monkeypatch, dtype, device, bf16_native, expected):
    asked: list[bool] = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return bf16_native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert ModelConfig().dtype == "auto"
    assert weights_dtype(ModelConfig(dtype=dtype), torch.device(device)) == expected
    assert all(flag is False for flag in asked)  # native support, not emulation


def test_a_cpu_run_still_loads_float32_weights(tiny_dir):
    model, _ = load_causal_lm(ModelConfig(name_or_path=str(tiny_dir), device="cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
