"""50 concurrent labelers against a live server on loopback, then a crash and a restart.

The server is ``tether label serve`` in a subprocess (uvicorn on 127.0.0.1 and a free port),
started and stopped by the test. Every client loop is bounded.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from labeling_support import FAST_HASHER, PASSWORD, LiveServer, WebClient, make_samples
from sqlalchemy import select

from tether.data.formats import read_records
from tether.labeling.store import Label, LabelStore, User

N_LABELERS = 50
N_TASKS, K, OVERLAP = 40, 4, 3  # 120 label slots for up to 50 × ROUNDS submissions
ROUNDS = 6
RANKINGS = ([1, 2, 3, 4], [1, 1, 2, 3], [2, 1, 3, 3], [1, 2, 2, 2], [4, 3, 2, 1])


@dataclass
class Tally:
    acked: list[tuple[int, str]] = field(default_factory=list)  # (task, labeler) answered 303
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds per acknowledged submit
    duplicates_refused: int = 0
    races: list[list[int]] = field(default_factory=list)  # statuses of simultaneous twin posts


def next_from(response: httpx.Response) -> int | None:
    m = re.match(r"/label/tasks/(\d+)", response.headers["location"])
    return int(m.group(1)) if m else None


async def labeler(base: str, name: str, index: int, pid: int, tally: Tally, start: asyncio.Barrier) -> None:
    rng = random.Random(index)
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        client = WebClient(http)
        login = await client.login(name)
        tally.statuses[login.status_code] += 1
        task = await client.next_task(pid)
        # Everyone holds a task before anyone submits: round 0 is 50 submissions at once.
        await start.wait()
        for round_ in range(ROUNDS):
            if task is None:
                return
            page = await http.get(f"/label/tasks/{task}")
            tally.statuses[page.status_code] += 1
            form = {"action": "submit"}
            for i, r in enumerate(rng.choice(RANKINGS)):
                form[f"rank_{i}"], form[f"likert_{i}"] = str(r), str(rng.randint(1, 7))
            t0 = time.perf_counter()
            if round_ == 0 and index % 5 == 0:
                # The same submission twice at once (a double click): one wins, one is a 409.
                twins = await asyncio.gather(
                    client.post(f"/label/tasks/{task}", form),
                    client.post(f"/label/tasks/{task}", form),
                )
                tally.races.append(sorted(r.status_code for r in twins))
                ok = [r for r in twins if r.status_code == 303]
                response = ok[0] if ok else twins[0]
                for r in twins:
                    tally.statuses[r.status_code] += 1
            else:
                response = await client.post(f"/label/tasks/{task}", form)
                tally.statuses[response.status_code] += 1
            if response.status_code != 303:
                return
            tally.latencies.append(time.perf_counter() - t0)
            tally.acked.append((task, name))
            if round_ == 0:
                again = await client.post(f"/label/tasks/{task}", form)
                tally.statuses[again.status_code] += 1
                tally.duplicates_refused += again.status_code == 409
            task = next_from(response)


def stored_labels(db_url: str) -> Counter:
    store = LabelStore(db_url, hasher=FAST_HASHER)
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(select(Label.task_id, User.username).join(User, User.id == Label.labeler_id)).all()
    finally:
        store.close()
    return Counter((task, name) for task, name in rows)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_50_concurrent_labelers_then_crash_and_restart(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    db_url = request.getfixturevalue("db_url" if backend == "sqlite" else "pg_url")
    live_server = LiveServer(db_url, tmp_path / "server.log")
    request.addfinalizer(live_server.stop)
    store = LabelStore(db_url, hasher=FAST_HASHER)
    pid = store.create_project("load", "ranking", make_samples(N_TASKS, K), overlap=OVERLAP)
    names = [f"labeler{i:02d}" for i in range(N_LABELERS)]
    for name in names:
        store.add_user(name, PASSWORD)
    store.add_user("admin", PASSWORD, "admin")
    store.close()

    base = live_server.start()
    tally = Tally()

    async def everyone() -> float:
        start = asyncio.Barrier(N_LABELERS)
        t0 = time.perf_counter()
        await asyncio.gather(*(labeler(base, n, i, pid, tally, start) for i, n in enumerate(names)))
        return time.perf_counter() - t0

    wall = asyncio.run(everyone())

    # 1. Nothing failed server-side, and the queue ran dry with every slot filled.
    assert not [s for s in tally.statuses if s >= 500], tally.statuses
    assert len(tally.acked) == N_TASKS * OVERLAP
    # 2. Double clicks: exactly one of each twin pair stored; re-posts all refused.
    assert len(tally.races) == N_LABELERS // 5
    assert all(r == [303, 409] for r in tally.races), tally.races
    assert tally.duplicates_refused == N_LABELERS
    # 3. Every acknowledged label is stored exactly once, and nothing unacknowledged is.
    stored = stored_labels(db_url)
    assert stored == Counter(tally.acked)
    assert set(stored.values()) == {1}
    assert set(Counter(task for task, _ in stored).values()) == {OVERLAP}

    # 4. A crash (SIGKILL, no shutdown) loses nothing that was acknowledged.
    live_server.stop(crash=True)
    assert stored_labels(db_url) == Counter(tally.acked)

    # 5. After a restart the export over HTTP holds every label.
    base = live_server.start()

    async def export() -> bytes:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            admin = WebClient(http)
            assert (await admin.login("admin")).status_code == 303
            r = await http.get(f"/admin/projects/{pid}/export")
            assert r.status_code == 200
            return r.content

    path = tmp_path / "comparisons.jsonl"
    path.write_bytes(asyncio.run(export()))
    comparisons = read_records(path, "comparison")
    assert len(comparisons) == N_TASKS * OVERLAP
    assert Counter(c.labeler_id for c in comparisons) == Counter(n for _, n in tally.acked)

    latencies = sorted(tally.latencies)
    report = {
        "backend": backend,
        "labelers": N_LABELERS,
        "acknowledged": len(tally.acked),
        "stored": sum(stored.values()),
        "double_click_pairs": len(tally.races),
        "duplicates_refused": tally.duplicates_refused,
        "requests": sum(tally.statuses.values()),
        "statuses": dict(sorted(tally.statuses.items())),
        "wall_s": round(wall, 2),
        "submits_per_s": round(len(latencies) / wall, 1),
        "submit_p50_ms": round(1000 * statistics.median(latencies), 1),
        "submit_p95_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 1),
        "submit_max_ms": round(1000 * latencies[-1], 1),
    }
    (tmp_path / "concurrency.json").write_text(json.dumps(report, indent=2))
    print("\nconcurrency:", json.dumps(report))


def test_restart_keeps_sessions_and_labels(live_server: LiveServer, db_url: str) -> None:
    """A labeler logged in before a restart stays logged in (sessions live in the database)."""
    store = LabelStore(db_url, hasher=FAST_HASHER)
    pid = store.create_project("p", "ranking", make_samples(2, K), overlap=1)
    store.add_user("alice", PASSWORD)
    store.close()
    base = live_server.start()

    async def run() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            client = WebClient(http)
            await client.login("alice")
            task = await client.next_task(pid)
            form = {"action": "submit"}
            for i in range(K):
                form[f"rank_{i}"], form[f"likert_{i}"] = str(i + 1), "4"
            assert (await client.post(f"/label/tasks/{task}", form)).status_code == 303
            live_server.stop()
            live_server.start()
            http.base_url = httpx.URL(live_server.url)
            assert (await http.get("/label")).status_code == 200
            dup = await client.post(f"/label/tasks/{task}", form)
            assert dup.status_code == 409

    asyncio.run(run())
    assert sum(stored_labels(db_url).values()) == 1


def test_hostile_requests_get_4xx_and_the_server_stays_up(live_server: LiveServer, db_url: str) -> None:
    """The requests that used to be 500s or dropped connections, against the real server."""
    store = LabelStore(db_url, hasher=FAST_HASHER)
    pid = store.create_project("p", "ranking", make_samples(2, K), overlap=1)
    store.add_user("alice", PASSWORD)
    store.add_user("admin", PASSWORD, "admin")
    store.close()
    base = live_server.start()
    deep = ("[" * 200_000 + "]" * 200_000).encode()
    huge = ('{"prompt": "p", "responses": ["a", "b"], "x": ' + "9" * 5000 + "}").encode()

    async def run() -> list[int]:
        statuses = []
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            r = await http.post(
                "/login",
                data={"csrf_token": "é", "username": "x", "password": "y"},
                cookies={"tether_login_csrf": "abc"},
            )
            statuses.append(r.status_code)
            labeler = WebClient(http)
            await labeler.login("alice")
            task = await labeler.next_task(pid)
            for key in ("rank_²", "likert_³", "flags_①", "rank_1²"):
                statuses.append(
                    (await labeler.post(f"/label/tasks/{task}", {"action": "submit", key: "1"})).status_code
                )
            statuses.append((await http.post(f"/label/tasks/{task}", data={"csrf_token": "é"})).status_code)
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            admin = WebClient(http)
            await admin.login("admin")
            form = {"name": "x", "kind": "ranking", "overlap": "1"}
            for body in (deep, huge):
                r = await admin.post("/admin/projects", form, files={"file": ("s.jsonl", body)})
                statuses.append(r.status_code)
            files = {"username": ("u.txt", b"mallory")}
            statuses.append((await admin.post("/admin/users", {"password": "long-enough"}, files=files)).status_code)
            statuses.append((await http.get("/login")).status_code)
        return statuses

    statuses = asyncio.run(run())
    assert statuses == [403, 422, 422, 422, 422, 403, 422, 422, 422, 303]  # the last: /login, logged in
    assert live_server.proc is not None and live_server.proc.poll() is None
