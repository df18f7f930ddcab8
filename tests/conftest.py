"""Shared fixtures: tiny random models built from a config and small data files. No downloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

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
