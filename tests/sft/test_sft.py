"""Stage 1 behaviour on a tiny random Llama: masking, padding, accumulation, learning, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether.config import SFTConfig, resolve
from tether.models.loading import load_causal_lm
from tether.sft.data import IGNORE, collate, count_target_tokens, encode_demonstration
from tether.sft.train import nll_sum, train_sft


def tiny_cfg(tmp_path: Path, demos_file: Path, **overrides) -> SFTConfig:
    base = {"train_file": str(demos_file), "out_dir": str(tmp_path / "run"), "valid_fraction": 0.2, "select_by": "last"}
    base.update(overrides)
    return resolve(SFTConfig, "sft", "tiny", overrides=base)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def test_prompt_tokens_carry_no_loss(tiny_dir):
    model, tok = load_causal_lm(str(tiny_dir))
    ex = encode_demonstration(tok, "Describe a red car.", "A RED CAR.", max_length=128)
    n_response = len(tok("A RED CAR.", add_special_tokens=False).input_ids) + 1  # + EOS
    assert sum(lab != IGNORE for lab in ex.labels) == n_response
    assert ex.labels[-1] == tok.eos_token_id
    batch = collate([ex], tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"]).logits
    # Changing the logits at every prompt position (except the last, which predicts the first
    # response token) leaves the loss unchanged.
    n_prompt = len(ex.labels) - n_response
    perturbed = logits.clone()
    perturbed[:, : n_prompt - 1] += torch.randn_like(perturbed[:, : n_prompt - 1]) * 5
    assert torch.allclose(nll_sum(logits, batch["labels"]), nll_sum(perturbed, batch["labels"]))
    assert count_target_tokens(batch["labels"]) == n_response


def test_padding_changes_nothing(tiny_dir):
    model, tok = load_causal_lm(str(tiny_dir))
    short = encode_demonstration(tok, "Hi.", "OK.", 128)
    long = encode_demonstration(tok, "Describe a very long purple boat please.", "A PURPLE BOAT IS LONG AND SLOW.", 128)
    alone = collate([short], tok.pad_token_id)
    padded = collate([short, long], tok.pad_token_id)
    with torch.no_grad():
        a = nll_sum(model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits, alone["labels"])
        out = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        b = nll_sum(out[:1], padded["labels"][:1])
    assert torch.allclose(a, b, atol=1e-5)


def test_loss_falls_when_overfitting(tmp_path, demos_file):
    cfg = tiny_cfg(tmp_path, demos_file, epochs=10, batch_size=4, micro_batch_size=4)
    result = train_sft(cfg, log=lambda _: None)
    assert result.valid_loss_after < 0.4 * result.valid_loss_before
    from tether.metrics import read_metrics

    losses = [m["loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert sum(losses[-5:]) / 5 < 0.35 * sum(losses[:5]) / 5


def test_gradient_accumulation_invariance(tmp_path, demos_file):
    """One optimiser step over 8 examples: 8 micro-batches of 1 == 4 of 2 == 1 of 8."""
    weights = []
    for micro in (1, 2, 8):
        cfg = tiny_cfg(
            tmp_path / f"m{micro}", demos_file, epochs=1, batch_size=8, micro_batch_size=micro, valid_fraction=0.67
        )
        train_sft(cfg, log=lambda _: None)
        weights.append(final_weights(tmp_path / f"m{micro}" / "run"))
    base = load_file(str(Path(tiny_dir_path()) / "model.safetensors"))
    for name in weights[0]:
        assert torch.allclose(weights[0][name], weights[1][name], atol=2e-6), name
        assert torch.allclose(weights[0][name], weights[2][name], atol=2e-6), name
    assert any(not torch.equal(weights[0][n], base[n]) for n in base)  # training moved the weights


def tiny_dir_path() -> Path:
    from tether.models.loading import tiny_model_dir

    return tiny_model_dir()


def test_resume_equals_uninterrupted(tmp_path, demos_file):
    """Stopping mid-epoch and rerunning ends with the same weights; dropout makes RNG state matter."""
    common = dict(epochs=2, batch_size=4, micro_batch_size=2, save_every_steps=2)
    common["model.residual_dropout"] = 0.1
    full = tiny_cfg(tmp_path / "full", demos_file, **common)
    train_sft(full, log=lambda _: None)
    broken = tiny_cfg(tmp_path / "broken", demos_file, **common)
    assert train_sft(broken, log=lambda _: None, stop_after_steps=3) is None  # "crash" after step 3
    train_sft(broken, log=lambda _: None)  # resumes from the state saved at step 2
    a, b = final_weights(tmp_path / "full" / "run"), final_weights(tmp_path / "broken" / "run")
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.timeout(300)
def test_kill_9_mid_epoch_then_rerun_resumes(tmp_path, demos_file):
    args = [
        "--preset",
        "tiny",
        "--train-file",
        str(demos_file),
        "--epochs",
        "3",
        "--batch-size",
        "2",
        "--micro-batch-size",
        "2",
        "--save-every-steps",
        "3",
        "--select-by",
        "last",
        "--show-samples",
        "0",
    ]
    tether = [sys.executable, "-m", "tether.cli", "sft"]
    subprocess.run(tether + args + ["--out-dir", str(tmp_path / "full")], check=True, capture_output=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        tether + args + ["--out-dir", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "state" / "counters.json").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists(), "the run finished before it could be killed"
    done = subprocess.run(tether + args + ["--out-dir", str(run)], check=True, capture_output=True, text=True)
    assert "resuming" in done.stdout
    a, b = final_weights(tmp_path / "full"), final_weights(run)
    for name in a:
        assert torch.equal(a[name], b[name]), name
