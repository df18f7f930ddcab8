"""The roofline arithmetic of benchmarks/bench_generation.py (the figures are measured on a GPU;
the arithmetic is checked here, on the CPU, against naive counts)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tether.models.generation import Sampler
from tether.models.loading import TINY_CONFIG

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_generation", BENCHMARKS / "bench_generation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_generation", module)
    spec.loader.exec_module(module)
    return module


def tiny_llama(tied: bool):
    """tether's tiny Llama (2 layers, width 64, 4 heads, 2 key-value heads) with 100 tokens."""
    config = AutoConfig.for_model(vocab_size=100, **{**TINY_CONFIG, "tie_word_embeddings": tied})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_decode_bytes_equal_a_count_step_by_step(bench):
    weights, kv_per_token, lengths, new_tokens = 1000, 7, [3, 5, 11], 6
    w, kv = bench.decode_bytes(weights, kv_per_token, lengths, new_tokens)
    # The prefill reads every weight once; so does each of the new_tokens - 1 decode steps, and
    # step s reads the K and V of the L + s positions of each row up to its own.
    naive_kv = sum(kv_per_token * (length + s) for s in range(1, new_tokens) for length in lengths)
    assert (w, kv) == (weights * new_tokens, naive_kv)
    assert bench.decode_bytes(weights, kv_per_token, lengths, 1) == (weights, 0)


def test_roofline_share_is_bytes_over_time_over_the_peak(bench):
    # The default model's bf16 copy (134.5M parameters, 2 bytes each) read 64 times in 0.1 s.
    gbps, share = bench.roofline_share(269_030_016 * 64, 0.1, 4800.0)
    assert gbps == pytest.approx(172.179, abs=1e-3)
    assert share == pytest.approx(172.179 / 4800, abs=1e-6)


def test_weight_bytes_count_the_lm_head_once_and_follow_the_dtype(bench):
    tied, untied = tiny_llama(tied=True), tiny_llama(tied=False)
    embedding = 100 * 64
    per_model = {name: p.numel() for name, p in untied.named_parameters()}
    assert per_model["model.embed_tokens.weight"] == per_model["lm_head.weight"] == embedding
    # Untied: the input embedding is only indexed (B rows a step), the LM head is read whole.
    assert bench.weight_bytes(untied) == 4 * (sum(per_model.values()) - embedding)
    # Tied: the one matrix is the LM head, read once.
    assert bench.weight_bytes(tied) == 4 * (sum(per_model.values()) - embedding)
    assert bench.weight_bytes(Sampler(tied, "bfloat16").module) == bench.weight_bytes(tied) // 2


def test_kv_bytes_per_token_read_off_a_forward(bench):
    model = tiny_llama(tied=True)
    head_dim = 64 // 4
    # K and V, 2 layers, 2 key-value heads (grouped-query attention), float32.
    assert bench.kv_bytes_per_token(model, torch.no_grad) == 2 * 2 * 2 * head_dim * 4
    assert bench.kv_bytes_per_token(Sampler(model, "bfloat16").module, torch.no_grad) == 2 * 2 * 2 * head_dim * 2


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H200", 4800.0),
        ("NVIDIA H200 NVL", 4800.0),
        ("NVIDIA H100 80GB HBM3", 3350.0),
        ("NVIDIA H100 PCIe", None),
        ("NVIDIA A100-SXM4-80GB", None),
    ],
)
def test_peak_bandwidth_known_by_device_name_only_where_the_datasheet_is_sure(bench, name, peak):
    assert bench.peak_gbps_for(name) == peak
