"""Helpers for the labeling tests: a fake clock, sample data, an in-process web client, and a
live uvicorn server on loopback that a test starts and stops."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx
from argon2 import PasswordHasher

from tether.data.formats import Prompt, Sample

# argon2 at its cheapest: real hashes, milliseconds instead of 64 MiB and ~50 ms each.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORD = "correct-horse"
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


class Clock:
    """A clock tests can move: sessions and leases expire without sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, 0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


def make_samples(n: int, k: int = 4, *, prefix: str = "Prompt") -> list[Sample]:
    return [
        Sample(
            prompt=f"{prefix} {i}: write something.",
            responses=[f"response {i}.{j}" for j in range(k)],
            prompt_id=f"p{i}",
            policies=[f"policy-{j}" for j in range(k)],
        )
        for i in range(n)
    ]


def make_prompts(n: int) -> list[Prompt]:
    return [Prompt(id=f"q{i}", text=f"Explain thing {i}.", user_id=f"u{i}") for i in range(n)]


def csrf_of(html: str) -> str:
    m = CSRF_RE.search(html)
    assert m, "page has no CSRF token"
    return m.group(1)


class WebClient:
    """One person's browser, minus the browser: cookies plus the CSRF token of their session."""

    def __init__(self, http: httpx.AsyncClient):
        self.http = http
        self.csrf = ""

    async def login(self, username: str, password: str = PASSWORD) -> httpx.Response:
        page = await self.http.get("/login")
        r = await self.http.post(
            "/login",
            data={"username": username, "password": password, "csrf_token": csrf_of(page.text)},
        )
        if r.status_code == 303:
            home = await self.http.get(r.headers["location"])
            self.csrf = csrf_of(home.text)
        return r

    async def post(self, url: str, data: dict | None = None, **kw) -> httpx.Response:
        return await self.http.post(url, data={"csrf_token": self.csrf, **(data or {})}, **kw)

    async def next_task(self, project_id: int) -> int | None:
        r = await self.post(f"/label/projects/{project_id}/next")
        assert r.status_code == 303, r.text
        m = re.match(r"/label/tasks/(\d+)", r.headers["location"])
        return int(m.group(1)) if m else None


def ranking_form(ranks: list[int], likert: list[int] | None = None, **extra: str) -> dict:
    likert = likert or [4] * len(ranks)
    data = {"action": "submit"}
    for i, (r, s) in enumerate(zip(ranks, likert, strict=True)):
        data[f"rank_{i}"] = str(r)
        data[f"likert_{i}"] = str(s)
    data.update(extra)
    return data


# ---------------------------------------------------------------------------------------------
# A live server on loopback, for the concurrency and browser tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``tether label serve`` in a subprocess on 127.0.0.1 and a free port."""

    def __init__(self, db_url: str, log_path: Path):
        self.db_url = db_url
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> str:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "tether.cli", "label", "serve", "--db", self.db_url]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/login", timeout=1.0).status_code == 200:
                    return self.url
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout}s: {self.log_path.read_text()[-2000:]}")

    def stop(self, *, crash: bool = False) -> None:
        """SIGTERM (graceful) or SIGKILL (a crash: nothing gets to flush)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if crash else signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HAVE_CHROMIUM = os.path.exists(CHROMIUM)


# ---------------------------------------------------------------------------------------------
# A throwaway PostgreSQL server, when its binaries are installed


def postgres_bin() -> Path | None:
    """The folder holding initdb and postgres, or None."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).parent
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "postgres").exists():
            return candidate
    return None


class PostgresServer:
    """initdb + postgres on 127.0.0.1 and a free port, in a temporary folder.

    PostgreSQL refuses to run as root, so under root it runs as the ``postgres`` user.
    """

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="tether-pg-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        # Run as that user directly (not through runuser, which would not pass on our signals).
        self._as: dict = {}
        if os.geteuid() == 0:
            import pwd

            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "PostgreSQL refuses to run as root and there is no 'postgres' user to run it as "
                    "(Debian's postgresql package creates one: bash scripts/setup.sh --test)"
                ) from None
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def start(self, timeout: float = 30.0) -> None:
        import psycopg

        data = self.dir / "data"
        self._log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres"]
            + ["-A", "trust", "--no-sync", "-E", "UTF8"],
            check=True,
            capture_output=True,
            cwd=self.dir,
            **self._as,
        )
        self.proc = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(data), "-p", str(self.port)]
            + ["-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}"]
            + ["-c", "fsync=off", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            cwd=self.dir,
            **self._as,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                psycopg.connect(self._dsn("postgres"), connect_timeout=1).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("PostgreSQL did not start")

    def _dsn(self, db: str) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={db}"

    def new_schema(self, name: str) -> str:
        """A fresh, empty schema (much cheaper than a database); returns a SQLAlchemy URL
        whose connections use it as their search path."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self._dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres?options=-csearch_path%3D{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
