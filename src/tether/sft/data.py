"""Stage 1 data: the demonstrations and pretraining text SFT trains on (tokenised by
:mod:`tether.models.lm_batch`)."""

from __future__ import annotations

from tether.data.formats import Demonstration, PretrainText, read_records
from tether.data.task import build_default_task


def load_demonstrations(path: str | None) -> list[Demonstration]:
    """Demonstrations from a file (validated whole) or the default task's."""
    if path is None:
        return list(build_default_task().demonstrations)
    return read_records(path, "demonstration")


def load_pretrain(path: str | None) -> list[PretrainText]:
    if path is None:
        return list(build_default_task().pretrain_train)
    return read_records(path, "pretrain")
