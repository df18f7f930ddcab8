"""Fixtures for the labeling tests; the helpers they use live in labeling_support.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from labeling_support import FAST_HASHER, Clock, LiveServer

from tether.labeling.store import LabelStore


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'labeling.db'}"


@pytest.fixture
def store(db_url: str, clock: Clock) -> Iterator[LabelStore]:
    s = LabelStore(db_url, hasher=FAST_HASHER, now=clock)
    yield s
    s.close()


@pytest.fixture
def live_server(tmp_path: Path, db_url: str) -> Iterator[LiveServer]:
    server = LiveServer(db_url, tmp_path / "server.log")
    yield server
    server.stop()
