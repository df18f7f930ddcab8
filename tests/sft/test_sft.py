"""Stage 1 behaviour on a tiny random Llama: masking, padding, accumulation, learning, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether import cli
from tether.checkpoint import StopAfter
from tether.config import SFTConfig, resolve
from tether.metrics import read_metrics
from tether.models.lm_batch import collate, count_target_tokens, encode_demonstration
from tether.models.loading import load_causal_lm
from tether.ops import IGNORE_INDEX, lm_loss
from tether.sft.train import train_sft


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
    assert sum(lab != IGNORE_INDEX for lab in ex.labels) == n_response
    assert ex.labels[-1] == tok.eos_token_id
    batch = collate([ex], tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"]).logits
    # Changing the logits at every prompt position (except the last, which predicts the first
    # response token) leaves the loss unchanged.
    n_prompt = len(ex.labels) - n_response
    perturbed = logits.clone()
    perturbed[:, : n_prompt - 1] += torch.randn_like(perturbed[:, : n_prompt - 1]) * 5
    assert torch.allclose(lm_loss(logits, batch["labels"], "sum"), lm_loss(perturbed, batch["labels"], "sum"))
    assert count_target_tokens(batch["labels"]) == n_response


def test_padding_changes_nothing(tiny_dir):
    model, tok = load_causal_lm(str(tiny_dir))
    short = encode_demonstration(tok, "Hi.", "OK.", 128)
    long = encode_demonstration(tok, "Describe a very long purple boat please.", "A PURPLE BOAT IS LONG AND SLOW.", 128)
    alone = collate([short], tok.pad_token_id)
    padded = collate([short, long], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits
        a = lm_loss(logits, alone["labels"], "sum")
        out = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        b = lm_loss(out[:1], padded["labels"][:1], "sum")
    assert torch.allclose(a, b, atol=1e-5)


def test_loss_falls_when_overfitting(tmp_path, demos_file):
    cfg = tiny_cfg(tmp_path, demos_file, epochs=10, batch_size=4, micro_batch_size=4)
    result = train_sft(cfg, log=lambda _: None)
    assert result.valid_loss_after < 0.4 * result.valid_loss_before

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
    with pytest.raises(StopAfter, match="after 3 steps"):  # "crash" after step 3
        train_sft(broken, log=lambda _: None, stop_after_steps=3)
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
    # The uninterrupted reference in this process (the same CLI, without a second interpreter start).
    assert cli.main(["sft", *args, "--out-dir", str(tmp_path / "full")]) == 0
    tether = [sys.executable, "-m", "tether.cli", "sft"]

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


def test_a_non_finite_gradient_never_reaches_a_checkpoint(tmp_path, demos_file, monkeypatch, poison_gradients):
    import tether.sft.train as sft_train
    from tether.checkpoint import NonFiniteError

    cfg = tiny_cfg(tmp_path, demos_file, epochs=1, batch_size=4, micro_batch_size=2, save_every_steps=2)
    poison_gradients(sft_train, step=4)  # step 4 is also a save step
    with pytest.raises(NonFiniteError) as info:
        train_sft(cfg, log=lambda _: None)
    state = Path(cfg.out_dir) / "state"
    assert str(info.value) == (
        f"sft: step 4: non-finite gradient norm (inf), so the update was not applied; the last good state is in {state}"
    )
    assert json.loads((state / "counters.json").read_text())["global_step"] == 2
    assert all(torch.isfinite(w).all() for w in load_file(str(state / "policy.trainable.safetensors")).values())
    monkeypatch.undo()
    train_sft(cfg, log=lambda _: None)  # the rerun resumes from step 2 and finishes
    assert all(torch.isfinite(w).all() for w in final_weights(Path(cfg.out_dir)).values())


def test_a_non_finite_first_step_says_there_is_no_good_state(tmp_path, demos_file, poison_gradients):
    import tether.sft.train as sft_train
    from tether.checkpoint import NonFiniteError

    cfg = tiny_cfg(tmp_path, demos_file, epochs=1, batch_size=4, micro_batch_size=2, save_every_steps=2)
    poison_gradients(sft_train, step=1)
    with pytest.raises(NonFiniteError, match=r"sft: step 1: .* no good state yet \(.*state was never written\)"):
        train_sft(cfg, log=lambda _: None)
    assert not (Path(cfg.out_dir) / "state").exists()


def test_cli_huge_learning_rate_stops_with_one_line_and_exit_1(tmp_path, demos_file, capsys):
    """The issue's run: `tether sft --preset tiny --optim.lr 1e7` used to save an all-NaN state at
    step 5 (a finite loss, an infinite gradient norm), then stop with a traceback."""
    from tether.cli import main

    out = tmp_path / "run"
    argv = ["sft", "--preset", "tiny", "--train-file", str(demos_file), "--epochs", "1", "--batch-size", "2"]
    argv += ["--micro-batch-size", "2", "--optim.lr", "1e7", "--out-dir", str(out), "--show-samples", "0"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: sft: step ") and err.count("\n") == 1, err
    assert "non-finite" in err
    state = out / "state"
    if state.exists():  # whatever was saved before the stop is finite
        assert all(torch.isfinite(w).all() for w in load_file(str(state / "policy.trainable.safetensors")).values())
    else:
        assert "no good state yet" in err


def test_selection_by_rm_score_without_a_scorer_fails_before_training(tmp_path, demos_file):
    """The trainer does not build the RM scorer (`tether sft` does): asking for the paper's
    selection without one is an error at the start, not after every epoch has trained."""
    cfg = tiny_cfg(tmp_path, demos_file, select_by="rm_score", reward_model=str(tmp_path / "rm"))
    with pytest.raises(ValueError, match="select_by = 'rm_score' needs a scorer"):
        train_sft(cfg, log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_resume_with_an_emptied_metrics_log(tmp_path, demos_file):
    """A kill while the metrics log was rewritten used to make every rerun fail (IndexError)."""
    cfg = tiny_cfg(tmp_path, demos_file, epochs=1, batch_size=4, micro_batch_size=2, save_every_steps=2)
    with pytest.raises(StopAfter):
        train_sft(cfg, log=lambda _: None, stop_after_steps=3)
    (Path(cfg.out_dir) / "metrics.jsonl").write_text('{"step": 0, "va')  # torn
    result = train_sft(cfg, log=lambda _: None)
    assert math.isfinite(result.valid_loss_before)
    assert [m["step"] for m in read_metrics(Path(cfg.out_dir) / "metrics.jsonl") if "loss" in m][0] == 3


def _trunk_spy(monkeypatch) -> list[bool]:
    """One entry per trunk cache lookup, in order: whether it ran the trunk's forward."""
    from tether.models.trunk import SharedTrunk, TrunkCache

    ran: list[bool] = []
    lookup, forward = TrunkCache.hidden, SharedTrunk.hidden

    def counted_lookup(self, *args):
        ran.append(False)
        return lookup(self, *args)

    def counted_forward(self, *args):
        if ran:  # (the set-up probe's forward, before any lookup, is not a lookup)
            ran[-1] = True
        return forward(self, *args)

    monkeypatch.setattr(TrunkCache, "hidden", counted_lookup)
    monkeypatch.setattr(SharedTrunk, "hidden", counted_forward)
    return ran


def _change_a_frozen_weight_in_epoch(monkeypatch, epoch: int) -> None:
    """At the start of ``epoch`` (0-based) the trained model's bottom block changes in place."""
    import tether.sft.train as sft_train

    models = []
    load, order = sft_train.load_causal_lm, sft_train.epoch_order

    def load_and_keep(*args, **kwargs):
        out = load(*args, **kwargs)
        models.append(out[0])
        return out

    def order_and_change(n, seed, e):
        if e == epoch:
            with torch.no_grad():
                models[-1].model.layers[0].mlp.down_proj.weight.mul_(1.5)  # this run's
        return order(n, seed, e)

    monkeypatch.setattr(sft_train, "load_causal_lm", load_and_keep)
    monkeypatch.setattr(sft_train, "epoch_order", order_and_change)


def _assert_close_weights(a: dict, b: dict, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    # float32 round-off only: a sequence's trunk output computed in one batch (its padding) and
    # reused in another
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol), name


def test_trunk_cache_trains_the_same_weights(tmp_path, demos_file, monkeypatch):
    """2 epochs with the bottom block frozen: epoch 2 runs no trunk forward, same weights."""
    common = {"epochs": 2, "batch_size": 4, "micro_batch_size": 2, "model.trainable_layers": 1}
    off = tiny_cfg(tmp_path / "off", demos_file, trunk_cache_mib=0, **common)
    logs: list[str] = []
    train_sft(off, log=logs.append)
    assert "sft: trunk cache off (trunk_cache_mib = 0)" in logs
    ran = _trunk_spy(monkeypatch)
    on = tiny_cfg(tmp_path / "on", demos_file, **common)
    logs = []
    train_sft(on, log=logs.append)
    assert any(line.startswith("sft: trunk cache on: the output of the embeddings and 1 of 2 blocks") for line in logs)
    # The toy demonstrations are 8 distinct ones, repeated: each is kept once.
    assert any("valid loss" in line and "trunk cache: 8 sequences" in line for line in logs), logs
    # Epoch 1 ran the trunk (except on micro-batches of repeats), epoch 2 never did.
    assert len(ran) == 20 and any(ran[:10]) and not any(ran[10:])
    _assert_close_weights(final_weights(tmp_path / "on" / "run"), final_weights(tmp_path / "off" / "run"))


def test_trunk_cache_is_rebuilt_when_a_frozen_weight_changes(tmp_path, demos_file, monkeypatch):
    """A frozen weight changed between epochs: the kept states are stale and must not be used."""
    from tether.models.trunk import TrunkCache

    common = {"epochs": 2, "batch_size": 4, "micro_batch_size": 2, "model.trainable_layers": 1}
    _change_a_frozen_weight_in_epoch(monkeypatch, 1)
    train_sft(tiny_cfg(tmp_path / "off", demos_file, trunk_cache_mib=0, **common), log=lambda _: None)
    train_sft(tiny_cfg(tmp_path / "on", demos_file, **common), log=lambda _: None)
    off, on = final_weights(tmp_path / "off" / "run"), final_weights(tmp_path / "on" / "run")
    _assert_close_weights(on, off)
    # Without the check the test above fails: the stale states train other weights.
    monkeypatch.setattr(TrunkCache, "_check_fresh", lambda self: None)
    train_sft(tiny_cfg(tmp_path / "stale", demos_file, **common), log=lambda _: None)
    stale = final_weights(tmp_path / "stale" / "run")
    assert max(float((stale[n] - off[n]).abs().max()) for n in off) > 1e-3


def test_resume_with_the_trunk_cache_equals_uninterrupted(tmp_path, demos_file):
    """Stopped in epoch 2 of 3: the resumed run rebuilds the cache (it is never saved)."""
    common = {"epochs": 3, "batch_size": 4, "micro_batch_size": 2, "save_every_steps": 2}
    common["model.trainable_layers"] = 1
    full = tiny_cfg(tmp_path / "full", demos_file, **common)
    train_sft(full, log=lambda _: None)
    broken = tiny_cfg(tmp_path / "broken", demos_file, **common)
    with pytest.raises(StopAfter, match="after 7 steps"):  # 5 steps per epoch: in epoch 2
        train_sft(broken, log=lambda _: None, stop_after_steps=7)
    assert not any("trunk" in p.name for p in (tmp_path / "broken" / "run" / "state").rglob("*"))
    logs: list[str] = []
    train_sft(broken, log=logs.append)  # resumes from the state saved at step 6
    assert any(line.startswith("sft: resuming at epoch 2, step 1/5") for line in logs), logs
    assert any(line.startswith("sft: trunk cache on") for line in logs)
    _assert_close_weights(final_weights(tmp_path / "broken" / "run"), final_weights(tmp_path / "full" / "run"))


def test_at_most_the_best_and_the_last_epoch_are_on_disk(tmp_path, demos_file, monkeypatch):
    """A 7B run cannot keep 16 full checkpoints: while training, only the best epoch so far and
    the last exist; afterwards only the selected one (``final`` links to it)."""
    import tether.sft.train as sft_train

    seen: list[set[str]] = []
    save = sft_train.save_model

    def watching(*args, **kwargs):
        path = save(*args, **kwargs)
        seen.append({p.name for p in (tmp_path / "run").glob("epoch-*")})
        return path

    monkeypatch.setattr(sft_train, "save_model", watching)
    # Validation losses that rise and fall (before training, then epochs 1-4): the best is not the last.
    losses = iter([5.0, 3.0, 4.0, 2.5, 3.5])
    monkeypatch.setattr(sft_train, "evaluate_loss", lambda *args, **kwargs: next(losses))
    cfg = tiny_cfg(tmp_path, demos_file, epochs=4, batch_size=8, select_by="valid_loss")
    result = train_sft(cfg, log=lambda _: None)
    # After each epoch's save: the best before it (if another) and itself.
    assert seen == [{"epoch-1"}, {"epoch-1", "epoch-2"}, {"epoch-1", "epoch-3"}, {"epoch-3", "epoch-4"}]
    assert result.selected_epoch == 3 and result.valid_loss_after == 2.5
    assert {p.name for p in (tmp_path / "run").glob("epoch-*")} == {"epoch-3"}
    assert (tmp_path / "run" / "final").resolve().name == "epoch-3"


def test_keep_epoch_checkpoints_keeps_every_epoch(tmp_path, demos_file):
    cfg = tiny_cfg(tmp_path, demos_file, epochs=3, batch_size=8, keep_epoch_checkpoints=True)
    train_sft(cfg, log=lambda _: None)
    assert {p.name for p in (tmp_path / "run").glob("epoch-*")} == {"epoch-1", "epoch-2", "epoch-3"}


def test_lora_saves_peft_adapters_and_a_merged_copy_only_on_request(tmp_path, demos_file, tiny_dir):
    """The checkpoint is peft's adapter format (PeftModel.from_pretrained reads it); a merged
    model is written (in merged/) only with model.lora.save_merged; the RM stage starts from it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tether.config import ModelConfig
    from tether.models.heads import load_scalar_model

    lora = {"model.lora.enabled": True, "model.lora.r": 4, "epochs": 1, "batch_size": 8}
    train_sft(tiny_cfg(tmp_path / "a", demos_file, **lora), log=lambda _: None)
    final = tmp_path / "a" / "run" / "final"
    assert (final / "adapter_config.json").exists() and not (final / "config.json").exists()
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), final).eval()
    ours, _ = load_causal_lm(str(final))
    base, _ = load_causal_lm(str(tiny_dir))
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base(input_ids=ids).logits, expected, atol=1e-4)  # the adapters trained
    rm, _ = load_scalar_model(str(final))  # the RM stage's start: the adapters merged, a fresh head
    torch.testing.assert_close(rm.model.layers[0].self_attn.q_proj.weight, ours.model.layers[0].self_attn.q_proj.weight)
    # ... and trained in full by the next stage (peft hands merged weights back frozen).
    for load in (load_causal_lm, load_scalar_model):
        model, _ = load(ModelConfig(name_or_path=str(final)), trainable=True)
        assert all(p.requires_grad for p in model.parameters()), load.__name__

    train_sft(tiny_cfg(tmp_path / "b", demos_file, **lora, **{"model.lora.save_merged": True}), log=lambda _: None)
    final = tmp_path / "b" / "run" / "final"
    assert (final / "adapter_config.json").exists() and not (final / "config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    assert not (final / "merged" / "adapter_config.json").exists()  # (transformers would apply it twice)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), final).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
