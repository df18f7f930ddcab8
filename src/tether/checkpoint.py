"""Resumable training state, written atomically, shared by the SFT, RM and PPO trainers.

A state directory holds the trainable weights (all of them, or only the LoRA adapters and heads),
every optimiser and scheduler, the Python / NumPy / torch RNG states and a small JSON-able dict of
loop counters (epoch, step, data position, KL controller, ...). It is built in a temporary sibling
and swapped in with renames, so a ``kill -9`` at any instant leaves either the old or the new state,
never half of one. A state is only written if every tensor and number in it is finite: a NaN
that reached the weights must stop the run, not become the state that every rerun resumes from.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tether.config import save_config
from tether.metrics import parse_jsonl_lines

WEIGHTS = "trainable.safetensors"
STATE = "trainer_state.pt"
COUNTERS = "counters.json"


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or an infinity: the run stops, and nothing non-finite is saved."""


class StopAfter(Exception):
    """A trainer's ``stop_after_*`` limit was reached: the process stops there, as if killed.

    Tests use it to simulate a crash between two checkpoints; a rerun resumes from the last state.
    """


def last_good_state(directory: str | Path) -> str:
    """Where a stopped run's last good state is, or that there is none yet (for error messages)."""
    state = find_state(directory)
    if state is None:
        return f"no good state yet ({directory} was never written), so a rerun starts from the beginning"
    return f"the last good state is in {state}"


def non_finite(named: Iterable[tuple[str, Any]]) -> list[str]:
    """Names of the tensors and floats that hold a NaN or an infinity; containers are walked."""
    bad: list[str] = []
    stack = list(named)
    while stack:
        name, value = stack.pop()
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(name)
        elif isinstance(value, float):
            if not math.isfinite(value):
                bad.append(name)
        elif isinstance(value, dict):
            stack.extend((f"{name}.{k}", v) for k, v in value.items())
        elif isinstance(value, list | tuple):
            stack.extend((f"{name}[{i}]", v) for i, v in enumerate(value))
    return sorted(bad)


def non_finite_weights(models: dict[str, torch.nn.Module]) -> list[str]:
    """``model.parameter`` names of the trainable parameters that hold a NaN or an infinity."""
    return non_finite(
        (f"{m}.{n}", p.detach()) for m, model in models.items() for n, p in model.named_parameters() if p.requires_grad
    )


def require_finite_weights(models: dict[str, torch.nn.Module], what: str) -> None:
    """Raise NonFiniteError naming ``what`` if a trainable parameter holds a NaN or an infinity."""
    bad = non_finite_weights(models)
    if bad:
        raise NonFiniteError(f"{what}: {len(bad)} tensors are non-finite (e.g. {bad[0]})")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (tied weights appear once)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(
    directory: str | Path,
    models: dict[str, torch.nn.Module],
    stateful: dict[str, Any],
    counters: dict[str, Any],
    generators: dict[str, torch.Generator] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Atomically write a resumable state.

    models: name → module whose trainable parameters are saved; stateful: name → object with
    ``state_dict()`` (optimisers, schedulers, controllers, EMA); counters: JSON-able loop position;
    rng_states: every rank's :func:`rng_state` in rank order (data parallel; default: this
    process's own).
    """
    directory = Path(directory)
    states = {k: v.state_dict() for k, v in stateful.items()}
    bad = non_finite_weights(models) + non_finite(states.items())
    if bad:
        raise NonFiniteError(
            f"not saving {directory}: {len(bad)} tensors are non-finite (e.g. {bad[0]}); {last_good_state(directory)}"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
    try:
        for name, model in models.items():
            save_file(trainable_state(model), str(tmp / f"{name}.{WEIGHTS}"))
        torch.save(
            {
                "stateful": states,
                "rng": rng_states[0] if rng_states else rng_state(),
                "rng_per_rank": rng_states or None,
                "generators": {k: g.get_state() for k, g in (generators or {}).items()},
            },
            tmp / STATE,
        )
        (tmp / COUNTERS).write_text(json.dumps(counters, indent=1))
        old = directory.with_name(directory.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def find_state(directory: str | Path) -> Path | None:
    """The state to resume from, also recovering from a crash between the two renames."""
    directory = Path(directory)
    if directory.parent.is_dir():
        # A kill during save_state leaves its temporary folder (tens of MB): no state is ever
        # read from one, and one trainer owns a run directory, so any found here is stale.
        for stale in directory.parent.glob(directory.name + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    if (directory / COUNTERS).exists():
        return directory
    old = directory.with_name(directory.name + ".old")
    if (old / COUNTERS).exists():
        return old
    return None


def load_state(
    directory: str | Path,
    models: dict[str, torch.nn.Module],
    stateful: dict[str, Any],
    generators: dict[str, torch.Generator] | None = None,
    rank: int = 0,
) -> dict[str, Any]:
    """Restore what :func:`save_state` wrote, in place; returns the counters.

    ``rank`` restores that rank's RNG streams; a rank the state has none for (the job now has
    more ranks than the one that saved it) keeps the streams it has.
    """
    directory = Path(directory)
    blob = torch.load(directory / STATE, weights_only=False)
    missing = sorted(set(stateful) - set(blob["stateful"]))
    if missing:
        raise ValueError(
            f"{directory} holds no {', '.join(missing)}: it was written by another configuration "
            f"(it holds {', '.join(sorted(blob['stateful']))}; e.g. another model.parallel); "
            "resume with that one or delete the state to start over"
        )
    for name, model in models.items():
        weights = load_file(str(directory / f"{name}.{WEIGHTS}"))
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(weights) != expected:
            missing = sorted(expected - set(weights))[:3]
            raise ValueError(f"{directory}: saved {name} weights do not match the model (missing e.g. {missing})")
        bad = non_finite(weights.items())
        if bad:
            # Written by a tether that saved whatever the step produced; resuming would fail again.
            raise NonFiniteError(
                f"{directory} holds non-finite {name} weights ({len(bad)} tensors, e.g. {bad[0]}): "
                "delete it to start the run over"
            )
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
    for k, obj in stateful.items():
        obj.load_state_dict(blob["stateful"][k])
    for k, g in (generators or {}).items():
        g.set_state(blob["generators"][k])
    per_rank = blob.get("rng_per_rank") or [blob["rng"]]
    if rank < len(per_rank):
        set_rng_state(per_rank[rank])
    return json.loads((directory / COUNTERS).read_text())


def truncate_metrics(path: Path, keep_until_step: int) -> None:
    """Drop metric lines logged after the resumed step, so a resumed log has no duplicates.

    The log is rewritten atomically (temporary file + rename): a kill in the middle leaves the old
    log or the new one. A torn last line (a kill during an append) is dropped.
    """
    if not path.exists():
        return
    lines = parse_jsonl_lines(path.read_text(encoding="utf-8", errors="replace"))
    kept = "".join(line + "\n" for line, record in lines if record.get("step", 0) <= keep_until_step)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(kept, encoding="utf-8")
    os.replace(tmp, path)


def epoch_order(n_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of ``n_items`` in ``epoch``: a function of (seed, epoch) alone.

    A resumed run recomputes the interrupted epoch's order from the checkpointed epoch and takes
    up at the checkpointed step, so it sees exactly the batches an uninterrupted run would.
    """
    # CPU: the permutation is made on the CPU whatever device trains (randperm's default device).
    return torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def start_run_dir(cfg: Any, is_main: bool) -> Path:
    """A trainer's ``cfg.out_dir``, created, with the resolved config saved in it (by the main
    process); torch's and Python's global RNGs seeded with ``cfg.seed`` (the same on every rank)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main:
        save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    return out
