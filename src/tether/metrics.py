"""Metrics to JSONL (always), TensorBoard and Weights & Biases (``report_to``), and the rich progress bar."""

from __future__ import annotations

import importlib.util
import json
import math
import netrc
import os
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def percent(x: float | None, missing: str = "n/a") -> str:
    """A rate as the reports and logs print it: ``0.582`` -> ``58.2 %``; None -> ``missing``."""
    return missing if x is None else f"{100 * x:.1f} %"


# Each report_to target beyond jsonl: the module it imports and the command that installs it.
REPORTERS = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'tether[wandb]'"),
}


def report_targets(cfg: Any) -> tuple[str, ...]:
    """Where a stage config's metrics go: jsonl first (always), then its report_to, plus
    tensorboard when the older ``tensorboard: true`` asks for it."""
    extra = ("tensorboard",) if getattr(cfg, "tensorboard", False) else ()
    return tuple(dict.fromkeys(("jsonl", *getattr(cfg, "report_to", ()), *extra)))


def check_reporters(targets: tuple[str, ...], field: str = "report_to") -> None:
    """A target whose package is missing is a config error (exit 2) naming the pip command; run
    before any model loads."""
    for target in targets:
        if target in REPORTERS and importlib.util.find_spec(REPORTERS[target][0]) is None:
            module, command = REPORTERS[target]
            raise ValueError(f"config field '{field}' asks for {target}, but {module} is not installed: {command}")


def wandb_key_configured() -> bool:
    """An API key in WANDB_API_KEY or in ~/.netrc for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):  # no ~/.netrc, or one that does not parse
        return False


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record, ``step`` aside: what TensorBoard and W&B get of each line."""
    return {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"}


class MetricsLogger:
    """Appends one JSON object per call to ``path``; mirrors its scalars to TensorBoard
    (``DIR/tensorboard``) and W&B (``DIR/wandb``), DIR being ``path``'s directory, where the
    stage config ``cfg`` asks for them (report_to).

    W&B runs offline (``wandb sync`` uploads it later) unless an API key is configured or
    WANDB_MODE says otherwise; a resumed stage logs into the same W&B run. ``enabled=False``
    (every data-parallel rank but 0) writes nothing.
    """

    def __init__(self, path: str | Path, cfg: Any = None, *, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._tb: Any = None
        self._wandb: Any = None
        if not enabled:
            return
        targets = report_targets(cfg)
        check_reporters(targets)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter  # imported only when asked for

            self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
        if "wandb" in targets:
            self._wandb = self._start_wandb(cfg)

    def _start_wandb(self, cfg: Any) -> Any:
        import dataclasses

        import wandb  # the optional wandb extra, imported only when asked for

        offline = not os.environ.get("WANDB_MODE") and not wandb_key_configured()
        if offline:
            print(
                f"W&B: no API key (WANDB_API_KEY unset, no ~/.netrc entry): logging offline under "
                f"{self.path.parent / 'wandb'}; `wandb sync` uploads it later",
                file=sys.stderr,
            )
        # A rerun that resumes the stage continues the same W&B run: its id is kept in the run directory.
        id_file = self.path.parent / "wandb" / "tether-run-id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:16]
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
        return wandb.init(
            project=os.environ.get("WANDB_PROJECT", "tether"),
            name=self.path.parent.name,
            dir=str(self.path.parent),
            id=run_id,
            resume="allow",
            config=dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type) else None,
            mode="offline" if offline else None,
        )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")
        step = int(record.get("step", 0))
        if self._tb is not None:
            for k, v in scalars(record).items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars(record), step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


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
