"""Shared fixtures: tiny random models built from a config and small data files. No downloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# One OpenMP thread per test process, and so per process a test starts (they inherit it), unless
# the caller says otherwise: under `pytest -n 2` on 2 cores, two workers at torch's default of one
# thread per core, plus the subprocesses and Ray workers tests start, oversubscribe the cores and
# OpenMP's spinning threads burn the difference (measured: tests/sft under -n 2, 237 s wall and
# 249 s user CPU at the default, 129 s and 96 s at one thread). Set before anything imports torch.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

# CI installs everything the suite needs (bash scripts/setup.sh --test: Chromium, PostgreSQL), so
# under CI=true a test that skips (a missing browser or database, a missing extra) fails the run:
# otherwise the browser and PostgreSQL paths could go untested without anyone noticing.
CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"CI=true: a test may not skip ({reason}); bash scripts/setup.sh --test installs it"
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The minutes-long runs first (the Ray pipeline, then the others marked ``long``): under
    ``pytest -n 2`` each starts at once on its own worker while the other worker and then both
    share out the short tests, instead of one of them starting last and running alone."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("ray") else 1 if item.get_closest_marker("long") else 2)


COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
THINGS = ["apple", "car", "house", "bird", "boat", "cup", "door", "lamp"]


def make_demonstrations(n: int = 24) -> list[dict]:
    """A learnable toy behaviour: answer in capitals, ending with a fixed phrase."""
    out = []
    for i in range(n):
        c, t = COLORS[i % len(COLORS)], THINGS[(i * 3) % len(THINGS)]
        out.append(
            {
                "prompt": f"Describe a {c} {t} in capitals.",
                "response": f"A {c.upper()} {t.upper()}. DONE.",
                "prompt_id": f"p{i}",
            }
        )
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from tether.models.loading import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_gemma2_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-block Gemma 2 with the tiny tokenizer: embeddings scaled by √hidden and logits
    soft-capped in its own forward, sliding-window attention of 4 tokens in every other block (what
    a frozen trunk's output fed back as ``inputs_embeds`` gets wrong)."""
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    from tether.models.loading import save_model

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    special = {name: getattr(tok, name) for name in ("pad_token_id", "eos_token_id", "bos_token_id")}
    config = Gemma2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4, final_logit_softcapping=3.0, query_pre_attn_scalar=16,
        **special,
    )  # fmt: skip
    torch.manual_seed(0)
    return save_model(Gemma2ForCausalLM(config), tok, tmp_path_factory.mktemp("gemma2") / "model")


@pytest.fixture(scope="session")
def demonstrations() -> list[dict]:
    """The toy demonstrations (:func:`make_demonstrations`), for fixtures wider than a test."""
    return make_demonstrations()


@pytest.fixture
def demos_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "demos.jsonl", make_demonstrations())


@pytest.fixture
def poison_gradients(monkeypatch: pytest.MonkeyPatch):
    """``poison(trainer_module, step)``: from optimiser step ``step`` on, every gradient is inf while
    the loss stays finite (what a huge learning rate does a few steps in). The trainer's own
    ``optimizer_step`` still runs on them."""

    def poison(module, step: int) -> None:
        real = module.optimizer_step
        calls = []

        def poisoned(model, *args, **kwargs):
            calls.append(1)
            if len(calls) >= step:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.fill_(float("inf"))
            return real(model, *args, **kwargs)

        monkeypatch.setattr(module, "optimizer_step", poisoned)

    return poison


# PPO: prompts, a policy that ends its responses, a reward model (shared by tests/ppo and the
# data-parallel tests).


@pytest.fixture(scope="session")
def ppo_data(tmp_path_factory) -> dict[str, Path]:
    """RL prompts (Prompt records, two users) and a small pretraining corpus."""
    root = tmp_path_factory.mktemp("ppo_data")
    colors = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
    things = ["apple", "car", "house", "bird", "boat", "cup", "door", "lamp"]
    pairs = [(colors[i % 8], things[(i * 3) % 8]) for i in range(24)]
    prompts = [
        {"id": f"p{i}", "text": f"Describe a {c} {t} in capitals.", "user_id": f"u{i % 2}"}
        for i, (c, t) in enumerate(pairs)
    ]
    pretrain = [{"text": f"The {c} {t} is here. It is a plain sentence number {i}."} for i, (c, t) in enumerate(pairs)]
    return {
        "prompts": write_jsonl(root / "prompts.jsonl", prompts),
        "pretrain": write_jsonl(root / "pretrain.jsonl", pretrain),
    }


@pytest.fixture(scope="session")
def eos_policy(tiny_dir, tmp_path_factory, ppo_data) -> Path:
    """The tiny random Llama with EOS made likely (about 1 in 8 per response token).

    A random 49k-token model almost never samples EOS, so every response would have the same
    length; this one ends responses at varied lengths, which the padding tests and the toy
    length reward need. The LM head is untied from the embeddings and its EOS row set so that
    the EOS logit is about 8.8 at the positions that predict response tokens (least squares
    over sampled responses), whatever the position.
    """
    import torch

    from tether.models.generation import position_ids_from_mask, sample
    from tether.models.loading import load_causal_lm, save_model

    model, tok = load_causal_lm(str(tiny_dir))
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    texts = [json.loads(line)["text"] for line in ppo_data["prompts"].read_text().splitlines()]
    gen = sample(model, tok, texts, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    ids = torch.cat([gen.query_ids, gen.response_ids], 1)
    mask = torch.cat([gen.query_mask, gen.response_mask], 1)
    p = gen.query_ids.shape[1]
    with torch.no_grad():
        hidden = model.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).last_hidden_state[:, p - 1 : -1][gen.response_mask.bool()]
        target = torch.full((hidden.shape[0], 1), 8.8)
        model.lm_head.weight[tok.eos_token_id] = torch.linalg.lstsq(hidden, target).solution[:, 0]
    return save_model(model, tok, tmp_path_factory.mktemp("eos_policy") / "policy")


@pytest.fixture(scope="session")
def tiny_rm(eos_policy, tmp_path_factory) -> Path:
    """A "reward model": the policy with a random scalar head and a normalisation gain and bias."""
    import torch

    from tether.models.heads import load_scalar_model, save_scalar_model, set_reward_normalization

    torch.manual_seed(0)
    rm, tok = load_scalar_model(str(eos_policy))
    set_reward_normalization(rm, gain=1.7, bias=0.25)
    return save_scalar_model(rm, tok, tmp_path_factory.mktemp("tiny_rm") / "rm")
