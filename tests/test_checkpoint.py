"""Resumable state under failure: nothing non-finite is written, a torn metrics log does not block
a resume, stale temporary folders are removed, and the optimiser step refuses non-finite updates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tether.checkpoint import (
    NonFiniteError,
    find_state,
    last_good_state,
    load_state,
    save_state,
    truncate_metrics,
)
from tether.metrics import MetricsLogger, read_metrics
from tether.optim import optimizer_step


def model_and_optimizer(lr: float = 0.1) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


def step_once(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_a_non_finite_state_is_never_written(tmp_path: Path) -> None:
    model, opt = model_and_optimizer()
    step_once(model, opt)
    good = save_state(tmp_path / "state", {"policy": model}, {"optimizer": opt}, {"step": 1})
    before = (good / "policy.trainable.safetensors").read_bytes()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"not saving .*state: 1 tensors are non-finite \(e.g. policy.weight\); "):
        save_state(tmp_path / "state", {"policy": model}, {"optimizer": opt}, {"step": 2})
    assert (good / "policy.trainable.safetensors").read_bytes() == before
    assert json.loads((good / "counters.json").read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state"]


def test_non_finite_optimizer_state_is_refused_too(tmp_path: Path) -> None:
    model, opt = model_and_optimizer()
    step_once(model, opt)
    next(iter(opt.state.values()))["exp_avg"].fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"optimizer\.state"):
        save_state(tmp_path / "state", {"policy": model}, {"optimizer": opt}, {"step": 1})
    assert find_state(tmp_path / "state") is None


def test_a_poisoned_state_from_an_older_tether_is_a_clear_error(tmp_path: Path) -> None:
    model, opt = model_and_optimizer()
    save_state(tmp_path / "state", {"policy": model}, {"optimizer": opt}, {"step": 1})
    from safetensors.torch import load_file, save_file

    path = tmp_path / "state" / "policy.trainable.safetensors"
    weights = load_file(str(path))
    weights["weight"].fill_(float("nan"))
    save_file(weights, str(path))
    with pytest.raises(NonFiniteError, match="holds non-finite policy weights .* delete it to start the run over"):
        load_state(tmp_path / "state", {"policy": model}, {"optimizer": opt})


def test_last_good_state_names_it_or_says_there_is_none(tmp_path: Path) -> None:
    assert last_good_state(tmp_path / "state").startswith("no good state yet")
    model, opt = model_and_optimizer()
    save_state(tmp_path / "state", {"policy": model}, {"optimizer": opt}, {"step": 1})
    assert last_good_state(tmp_path / "state") == f"the last good state is in {tmp_path / 'state'}"


def test_stale_temporary_state_folders_are_removed_on_resume(tmp_path: Path) -> None:
    model, opt = model_and_optimizer()
    save_state(tmp_path / "state", {"policy": model}, {"optimizer": opt}, {"step": 1})
    for name in ("state.tmp-abc123", "state.tmp-killed"):  # what a kill during save_state leaves
        (tmp_path / name).mkdir()
        (tmp_path / name / "policy.trainable.safetensors").write_bytes(b"\0" * 1024)
    (tmp_path / "other.tmp-keep").mkdir()
    assert find_state(tmp_path / "state") == tmp_path / "state"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.tmp-keep", "state"]


def log_steps(path: Path, steps: range) -> None:
    logger = MetricsLogger(path)
    for s in steps:
        logger.log({"step": s, "loss": 1.0 / (s + 1)})


@pytest.mark.parametrize(
    ("damage", "kept"),
    [
        (lambda p: p.write_text(""), []),  # emptied
        (lambda p: p.write_text(p.read_text()[:-9]), [0, 1, 2, 3]),  # the last line torn mid-append
        (lambda p: p.write_text(p.read_text()[:-60] + "\n"), [0, 1, 2, 3]),  # a torn line, then whole ones
        (lambda p: p.write_bytes(p.read_bytes() + b'{"step": 2, "lo\xff'), [0, 1, 2, 3]),  # a torn byte
    ],
)
def test_truncate_metrics_survives_a_torn_or_empty_log(tmp_path: Path, damage, kept: list[int]) -> None:
    path = tmp_path / "metrics.jsonl"
    log_steps(path, range(6))
    damage(path)
    truncate_metrics(path, 3)
    assert [r["step"] for r in read_metrics(path)] == kept
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    log_steps(path, range(4, 6))  # the resumed run appends whole lines after the kept ones
    assert [r["step"] for r in read_metrics(path)] == [*kept, 4, 5]


def test_truncate_metrics_keeps_up_to_the_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    log_steps(path, range(6))
    truncate_metrics(path, 3)
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3]


def test_optimizer_step_refuses_a_non_finite_gradient_norm() -> None:
    model, opt = model_and_optimizer()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 3)).sum().backward()
    model.weight.grad[0, 0] = float("inf")  # the loss was finite; one gradient is not
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm \(inf\), so the update was not applied"):
        optimizer_step(model, opt, sched, max_grad_norm=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_optimizer_step_refuses_an_update_that_overflows_the_weights() -> None:
    model, opt = model_and_optimizer(lr=1e30)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with torch.no_grad():
        model.weight.fill_(-3e38)
    model(torch.ones(1, 3)).sum().backward()
    with pytest.raises(NonFiniteError, match="the optimiser step made weights non-finite"):
        optimizer_step(model, opt, sched, max_grad_norm=0.0)
