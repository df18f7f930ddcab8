"""Model loading, the embedded default, KV-cached sampling and scalar heads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tether.config import ModelConfig
from tether.models.generation import decode_responses, encode_prompts, position_ids_from_mask, sample
from tether.models.heads import load_scalar_model, reward_scores
from tether.models.loading import autocast_dtype, fast_bf16, load_causal_lm, resolve_model_dir
from tether.ops import token_logprobs


def test_tokenizer_pad_differs_from_eos(tiny_dir):
    _, tok = load_causal_lm(str(tiny_dir))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id


def test_missing_model_dir_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="downloads only when asked"):
        resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(FileNotFoundError, match="not a local directory nor a hub id"):
        resolve_model_dir(str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_dir(str(tmp_path))


def test_sampling_logprobs_equal_recomputed_under_left_padding(tiny_dir):
    model, tok = load_causal_lm(str(tiny_dir))
    prompts = ["hi", "a much longer prompt that forces left padding of the others", "mid length one"]
    for temperature in (1.0, 0.7):
        gen = sample(
            model, tok, prompts, max_new_tokens=12, temperature=temperature, generator=torch.Generator().manual_seed(0)
        )
        ids = torch.cat([gen.query_ids, gen.response_ids], 1)
        mask = torch.cat([gen.query_mask, gen.response_mask], 1)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        p = gen.query_ids.shape[1]
        recomputed = token_logprobs(logits[:, p - 1 : -1], gen.response_ids, temperature) * gen.response_mask
        assert torch.allclose(recomputed, gen.logprobs, atol=1e-5)


def test_sampling_logprobs_are_exact_near_probability_one(tiny_dir):
    """Sampling-time log-probs match a float64 log-softmax even where p(token) is close to 1
    (float32 F.log_softmax is off by ~1e-4 there on AVX2 CPUs; the PPO ratio check needs 1e-5)."""
    model, tok = load_causal_lm(str(tiny_dir))
    model.lm_head.register_forward_hook(
        lambda _m, _i, logits: logits.index_add(
            -1, torch.tensor([tok.eos_token_id]), torch.full((*logits.shape[:-1], 1), 17.0)
        )
    )
    gen = sample(model, tok, ["x", "a longer one"], max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    ids = torch.cat([gen.query_ids, gen.response_ids], 1)
    mask = torch.cat([gen.query_mask, gen.response_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    p = gen.query_ids.shape[1]
    exact = torch.log_softmax(logits[:, p - 1 : -1].double(), -1).gather(-1, gen.response_ids[..., None])[..., 0]
    assert (exact.exp() > 0.99).any()  # the regime that matters
    assert torch.allclose(gen.logprobs.double(), exact * gen.response_mask, atol=1e-5)


def test_sampling_runs_no_forward_after_the_last_token(tiny_dir):
    """max_new_tokens tokens cost the prefill and max_new_tokens - 1 decode forwards."""
    model, tok = load_causal_lm(str(tiny_dir))
    positions = []  # the first position each forward feeds: decode forwards start past the prompt
    model.register_forward_pre_hook(
        lambda _m, _a, kw: positions.append(int(kw["position_ids"].min())), with_kwargs=True
    )
    gen = sample(model, tok, ["x", "y"], max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert gen.response_ids.shape[1] == 5 and not gen.finished.any()
    prompt_length = int(gen.query_mask.sum(1).min())
    assert sum(p >= prompt_length for p in positions) == 4


def test_greedy_batch_equals_one_by_one(tiny_dir):
    """Left padding and batching do not change what a prompt generates."""
    model, tok = load_causal_lm(str(tiny_dir))
    prompts = ["short", "a considerably longer prompt here"]
    batched = decode_responses(tok, sample(model, tok, prompts, max_new_tokens=10, temperature=0))
    alone = [decode_responses(tok, sample(model, tok, [p], max_new_tokens=10, temperature=0))[0] for p in prompts]
    assert batched == alone


def test_response_mask_stops_after_eos(tiny_dir):
    model, tok = load_causal_lm(str(tiny_dir))

    # Make EOS likely (about 1 in 3) so rows end at different steps.
    def boost_eos(_module, _inputs, logits):
        logits[..., tok.eos_token_id] += 10.0
        return logits

    model.lm_head.register_forward_hook(boost_eos)
    gen = sample(
        model, tok, ["x", "y", "z", "w"], max_new_tokens=40, temperature=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert gen.finished.all() and len(set(gen.lengths.tolist())) > 1
    for ids, m in zip(gen.response_ids, gen.response_mask, strict=True):
        n = int(m.sum())
        assert ids[n - 1] == tok.eos_token_id and (ids[n:] == tok.pad_token_id).all()


def test_reward_score_at_last_real_token_any_padding(tiny_dir):
    rm, tok = load_scalar_model(str(tiny_dir))
    texts = ["one two three four five<|im_end|>", "six<|im_end|>"]
    scores = []
    for side in ("right", "left"):
        tok.padding_side = side
        enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        scores.append(reward_scores(rm, enc.input_ids, enc.attention_mask))
    alone = torch.cat(
        [reward_scores(rm, *tok(t, return_tensors="pt", add_special_tokens=False).values()) for t in texts]
    )
    assert torch.allclose(scores[0], scores[1], atol=1e-5) and torch.allclose(scores[0], alone, atol=1e-5)


def test_lora_trains_only_adapters(tiny_dir):
    from tether.config import LoraConfig, ModelConfig

    model, _ = load_causal_lm(
        ModelConfig(name_or_path=str(tiny_dir), lora=LoraConfig(enabled=True, r=4)), trainable=True
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("capability, native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_is_fast_on_gpus_from_ampere_on_only(monkeypatch, capability, native):
    """A V100 (7.0) or T4 (7.5) runs bf16 emulated, which torch.cuda.is_bf16_supported() counts as
    supported by default: autocast 'auto' must stay in float32 there. And the GPU asked about is
    the one named, not the current one."""
    asked = []

    def get_device_capability(device=None):
        asked.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    # torch's own answer: yes from Ampere on, and yes where it can emulate unless told not to.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert fast_bf16("cuda") is native
    assert autocast_dtype(ModelConfig(autocast="auto"), "cuda:1") == ("bfloat16" if native else None)
    assert asked == [0, 1]


@pytest.mark.slow
def test_embedded_default_loads_and_generates():
    model, tok = load_causal_lm("default")
    assert model.config.num_hidden_layers == 30 and tok.eos_token == "<|im_end|>"
    assert not hasattr(model.config, "quantization_config")
    ids, _ = encode_prompts(tok, ["What is the capital of France?"])
    gen = sample(model, tok, ["What is the capital of France? Answer in one word."], max_new_tokens=12, temperature=0)
    text = decode_responses(tok, gen)[0]
    assert "Paris" in text, text


# --------------------------------------------------------------------------------------------
# Models by name: a hub id from the local Hugging Face cache, offline


def _cached_hub_model(hub: Path, repo_id: str, files: Path) -> Path:
    """The layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/REV/...}."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(files, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


def test_a_hub_id_loads_from_the_local_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _cached_hub_model(tmp_path / "hf" / "hub", "acme/tiny-chat", resolve_model_dir("tiny-llama3"))
    assert resolve_model_dir("acme/tiny-chat") == snapshot
    model, tok = load_causal_lm("acme/tiny-chat")
    assert tok.eos_token == "<|eot_id|>" and model.config.vocab_size == len(tok)
    # $HF_HUB_CACHE wins over $HF_HOME, as in huggingface_hub.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="acme/tiny-chat"):
        resolve_model_dir("acme/tiny-chat")


def test_a_hub_id_missing_from_the_cache_names_the_command_and_exits_2(tmp_path, monkeypatch, capsys):
    from tether import cli

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    argv = ["sft", "--preset", "tiny", "--model.name-or-path", "acme/not-here", "--out-dir", str(tmp_path / "sft")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "hf download acme/not-here" in err and "--model.allow-download" in err


def test_downloading_happens_only_when_allowed(tmp_path, monkeypatch):
    """(No test downloads: the hub call is replaced, and records whether it was allowed to.)"""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, *, cache_dir, local_files_only):
        calls.append(local_files_only)
        return str(_cached_hub_model(Path(cache_dir), repo_id, resolve_model_dir("tiny-gpt2")))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    resolve_model_dir("acme/a")
    resolve_model_dir("acme/b", allow_download=True)
    load_causal_lm(ModelConfig(name_or_path="acme/c", allow_download=True))
    assert calls == [True, False, False]
