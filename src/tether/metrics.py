"""Metrics to JSONL (always) and TensorBoard (optional), and the rich progress bar."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def percent(x: float | None, missing: str = "n/a") -> str:
    """A rate as the reports and logs print it: ``0.582`` -> ``58.2 %``; None -> ``missing``."""
    return missing if x is None else f"{100 * x:.1f} %"


class MetricsLogger:
    """Appends one JSON object per call to ``path``; mirrors scalars to TensorBoard if asked.

    ``enabled=False`` (every data-parallel rank but 0) writes nothing.
    """

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None, *, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard_dir is not None:
            try:  # the optional tensorboard extra, imported only when asked for
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("tensorboard logging needs `pip install tether[tensorboard]`") from e
            self._tb = SummaryWriter(str(tensorboard_dir))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def parse_jsonl_lines(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for every line of a metrics log that is a whole JSON object.

    A kill in the middle of an append leaves a torn last line; it is skipped, not fatal, so a
    resumed run (and the report) can still read everything logged before it.
    """
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a torn or empty line
            continue
        if isinstance(record, dict):
            out.append((line, record))
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [record for _, record in parse_jsonl_lines(path.read_text(encoding="utf-8", errors="replace"))]


def progress_bar(description: str, *, enabled: bool = True) -> Progress:
    """A rich bar: description, bar, n/total, live stats text, elapsed, ETA (``enabled=False``:
    never shown, as on every data-parallel rank but 0)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
        disable=not enabled or (not sys.stderr.isatty() and not sys.stdout.isatty()),
    )
