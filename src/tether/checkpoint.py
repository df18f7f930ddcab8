"""Resumable training state, written atomically, shared by the SFT, RM and PPO trainers.

A state directory holds the trainable weights (all of them, or only the LoRA adapters and heads),
every optimiser and scheduler, the Python / NumPy / torch RNG states and a small JSON-able dict of
loop counters (epoch, step, data position, KL controller, ...). It is built in a temporary sibling
and swapped in with renames, so a ``kill -9`` at any instant leaves either the old or the new state,
never half of one.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "trainable.safetensors"
STATE = "trainer_state.pt"
COUNTERS = "counters.json"


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
) -> Path:
    """Atomically write a resumable state.

    models: name → module whose trainable parameters are saved; stateful: name → object with
    ``state_dict()`` (optimisers, schedulers, controllers, EMA); counters: JSON-able loop position.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
    try:
        for name, model in models.items():
            save_file(trainable_state(model), str(tmp / f"{name}.{WEIGHTS}"))
        torch.save(
            {
                "stateful": {k: v.state_dict() for k, v in stateful.items()},
                "rng": rng_state(),
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
) -> dict[str, Any]:
    """Restore what :func:`save_state` wrote, in place; returns the counters."""
    directory = Path(directory)
    for name, model in models.items():
        weights = load_file(str(directory / f"{name}.{WEIGHTS}"))
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(weights) != expected:
            missing = sorted(expected - set(weights))[:3]
            raise ValueError(f"{directory}: saved {name} weights do not match the model (missing e.g. {missing})")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
    blob = torch.load(directory / STATE, weights_only=False)
    for k, obj in stateful.items():
        obj.load_state_dict(blob["stateful"][k])
    for k, g in (generators or {}).items():
        g.set_state(blob["generators"][k])
    set_rng_state(blob["rng"])
    return json.loads((directory / COUNTERS).read_text())


def truncate_metrics(path: Path, keep_until_step: int) -> None:
    """Drop metric lines logged after the resumed step, so a resumed log has no duplicates."""
    if not path.exists():
        return
    kept = [
        ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= keep_until_step
    ]
    path.write_text("".join(ln + "\n" for ln in kept))


def epoch_order(n_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of ``n_items`` in ``epoch``: a function of (seed, epoch) alone.

    A resumed run recomputes the interrupted epoch's order from the checkpointed epoch and takes
    up at the checkpointed step, so it sees exactly the batches an uninterrupted run would.
    """
    # CPU: the permutation is made on the CPU whatever device trains (randperm's default device).
    return torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
