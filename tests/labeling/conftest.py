"""Fixtures for the labeling tests; the helpers they use live in labeling_support.py."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from labeling_support import FAST_HASHER, Clock, LiveServer, PostgresServer, postgres_bin

from tether.labeling.store import LabelStore

_db_numbers = itertools.count()


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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (initdb/postgres not found)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install -e '.[labeling]')")
    server = PostgresServer(bindir)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres: PostgresServer, request: pytest.FixtureRequest) -> str:
    """A fresh PostgreSQL schema for one test."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[-50:]
    return postgres.new_schema(f"{name}_{next(_db_numbers)}")
