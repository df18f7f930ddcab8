"""The web app in-process (httpx ASGITransport): every route, roles, CSRF, bad input, escaping."""

from __future__ import annotations

import io
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from html import unescape
from pathlib import Path

import httpx
import pytest
from labeling_support import (
    PASSWORD,
    Clock,
    WebClient,
    csrf_of,
    make_prompts,
    make_samples,
    ranking_form,
)

from tether.data.formats import Sample, read_records
from tether.labeling.app import create_app, router
from tether.labeling.store import LabelStore

pytestmark = pytest.mark.anyio

XSS = '<img src=x onerror="alert(1)"><script>alert("xss")</script>'


@dataclass
class Env:
    store: LabelStore
    app: object
    rank_pid: int
    demo_pid: int
    clock: Clock


@pytest.fixture
def env(store: LabelStore, clock: Clock) -> Env:
    store.add_user("admin", PASSWORD, "admin")
    for name in ("alice", "bob", "carol"):
        store.add_user(name, PASSWORD)
    samples = make_samples(3)
    samples[0] = Sample(prompt=f"Prompt {XSS}", responses=[f"resp {XSS}", "b", "c", "d"])
    rank_pid = store.create_project("ranks", "ranking", samples, overlap=2)
    demo_pid = store.create_project("demos", "demonstration", make_prompts(2), overlap=1)
    return Env(store, create_app(store), rank_pid, demo_pid, clock)


@asynccontextmanager
async def browser(env: Env, user: str | None = None) -> AsyncIterator[WebClient]:
    transport = httpx.ASGITransport(app=env.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        client = WebClient(http)
        if user:
            r = await client.login(user)
            assert r.status_code == 303, r.text
        yield client


def shown_responses(html: str) -> list[str]:
    """Response texts in the order the page shows them."""
    return [unescape(m) for m in re.findall(r'class="text response-text">(.*?)</div>', html, re.S)]


def error_text(html: str) -> str:
    m = re.search(r'class="error"[^>]*>(.*?)</(?:div|p)>', html, re.S)
    assert m, "page shows no error"
    return unescape(re.sub(r"<[^>]+>", "", m.group(1)))


# ---------------------------------------------------------------------------------------------
# Every route needs the right role


ADMIN_ROUTES = [
    ("GET", "/admin"),
    ("POST", "/admin/projects"),
    ("GET", "/admin/projects/{project_id}"),
    ("POST", "/admin/projects/{project_id}"),
    ("GET", "/admin/projects/{project_id}/export"),
    ("GET", "/admin/projects/{project_id}/export/summary"),
    ("GET", "/admin/users"),
    ("POST", "/admin/users"),
    ("POST", "/admin/users/{user_id}"),
]
LABELER_ROUTES = [
    ("GET", "/label"),
    ("POST", "/label/projects/{project_id}/next"),
    ("GET", "/label/tasks/{task_id}"),
    ("POST", "/label/tasks/{task_id}"),
]
OPEN_ROUTES = [("GET", "/"), ("GET", "/login"), ("POST", "/login"), ("POST", "/logout")]


def test_the_route_lists_above_are_every_route() -> None:
    """So a new route cannot land without the role checks below covering it."""
    declared = {(method, route.path) for route in router.routes for method in route.methods if method != "HEAD"}
    assert declared == set(ADMIN_ROUTES + LABELER_ROUTES + OPEN_ROUTES)


def _url(env: Env, path: str) -> str:
    return path.format(project_id=env.rank_pid, task_id=1, user_id=1)


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES + LABELER_ROUTES)
async def test_anonymous_requests_get_401_and_the_login_form(env: Env, method, path) -> None:
    async with browser(env) as c:
        r = await c.http.request(method, _url(env, path), data={"csrf_token": "x"})
    assert r.status_code == 401
    assert 'action="/login"' in r.text


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
async def test_labelers_cannot_use_admin_routes(env: Env, method, path) -> None:
    async with browser(env, "alice") as c:
        r = await c.http.request(method, _url(env, path), data={"csrf_token": c.csrf})
    assert r.status_code == 403
    assert "for admins" in error_text(r.text)


@pytest.mark.parametrize(("method", "path"), LABELER_ROUTES)
async def test_admins_cannot_use_labeler_routes(env: Env, method, path) -> None:
    async with browser(env, "admin") as c:
        r = await c.http.request(method, _url(env, path), data={"csrf_token": c.csrf})
    assert r.status_code == 403


@pytest.mark.parametrize(
    ("user", "path"),
    [
        ("alice", "/label/projects/{project_id}/next"),
        ("alice", "/label/tasks/{task_id}"),
        ("admin", "/admin/projects/{project_id}"),
        ("admin", "/admin/users"),
        ("alice", "/logout"),
    ],
)
async def test_posts_without_the_csrf_token_are_refused(env: Env, user, path) -> None:
    async with browser(env, user) as c:
        missing = await c.http.post(_url(env, path), data={"overlap": "3"})
        wrong = await c.http.post(_url(env, path), data={"csrf_token": "forged"})
    assert missing.status_code == wrong.status_code == 403
    assert "CSRF" in error_text(missing.text)
    assert env.store.progress(env.rank_pid)[0].overlap == 2


async def test_cross_site_origin_is_refused_even_with_a_token(env: Env) -> None:
    async with browser(env, "alice") as c:
        r = await c.post(f"/label/projects/{env.rank_pid}/next", headers={"Origin": "https://evil.example"})
        same = await c.post(f"/label/projects/{env.rank_pid}/next", headers={"Origin": "http://testserver"})
    assert r.status_code == 403
    assert same.status_code == 303


# ---------------------------------------------------------------------------------------------
# Login and sessions


async def test_root_and_login_redirect_by_role(env: Env) -> None:
    async with browser(env) as c:
        assert (await c.http.get("/")).headers["location"] == "/login"
        page = await c.http.get("/login")
        assert page.status_code == 200 and "Log in" in page.text
    for user, home in (("admin", "/admin"), ("alice", "/label")):
        async with browser(env, user) as c:
            assert (await c.http.get("/")).headers["location"] == home
            assert (await c.http.get("/login")).headers["location"] == home


async def test_login_failures_are_401_or_403_never_500(env: Env) -> None:
    async with browser(env) as c:
        page = await c.http.get("/login")
        token = csrf_of(page.text)
        wrong = await c.http.post("/login", data={"username": "alice", "password": "nope", "csrf_token": token})
        assert wrong.status_code == 401 and "Wrong username or password" in wrong.text
        no_csrf = await c.http.post("/login", data={"username": "alice", "password": PASSWORD})
        assert no_csrf.status_code == 403
        missing = await c.http.post("/login", data={"csrf_token": csrf_of(no_csrf.text)})
        assert missing.status_code == 422 and "username" in error_text(missing.text)
        nul = {"username": "al\x00ice", "password": PASSWORD, "csrf_token": csrf_of(no_csrf.text)}
        assert (await c.http.post("/login", data=nul)).status_code == 422
    env.store.set_active(env.store.authenticate("bob", PASSWORD).id, False)
    async with browser(env) as c:
        assert (await c.login("bob")).status_code == 401


async def test_login_keeps_a_local_next_and_drops_an_external_one(env: Env) -> None:
    async with browser(env) as c:
        token = csrf_of((await c.http.get("/login")).text)
        data = {"username": "admin", "password": PASSWORD, "csrf_token": token}
        r = await c.http.post("/login", data={**data, "next": "//evil.example/x"})
        assert r.headers["location"] == "/admin"
    async with browser(env) as c:
        token = csrf_of((await c.http.get("/login")).text)
        data = {"username": "admin", "password": PASSWORD, "csrf_token": token}
        r = await c.http.post("/login", data={**data, "next": "/admin/users"})
        assert r.headers["location"] == "/admin/users"


async def test_session_cookie_flags(env: Env) -> None:
    async with browser(env) as c:
        r = await c.login("alice")
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie


async def test_expired_session_is_a_clear_401_and_saves_nothing(env: Env) -> None:
    async with browser(env, "alice") as c:
        task = await c.next_task(env.rank_pid)
        env.clock.advance(hours=13)
        page = await c.http.get(f"/label/tasks/{task}")
        assert page.status_code == 401
        assert "session has expired" in page.text
        r = await c.post(f"/label/tasks/{task}", ranking_form([1, 2, 3, 4]))
        assert r.status_code == 401
        assert "not saved" in r.text
    assert env.store.progress(env.rank_pid)[0].done == 0


async def test_logout_ends_the_session(env: Env) -> None:
    async with browser(env, "alice") as c:
        r = await c.post("/logout")
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert (await c.http.get("/label")).status_code == 401


# ---------------------------------------------------------------------------------------------
# Labeling


async def test_rank_submit_stores_one_comparison_and_moves_on(env: Env) -> None:
    async with browser(env, "alice") as c:
        home = await c.http.get("/label")
        assert "ranks" in home.text and "demos" in home.text
        task = await c.next_task(env.rank_pid)
        page = await c.http.get(f"/label/tasks/{task}")
        assert page.status_code == 200
        form = ranking_form([2, 1, 3, 3], [5, 6, 2, 2], flags_2="hallucination")
        r = await c.post(f"/label/tasks/{task}", form)
        assert r.status_code == 303
        assert r.headers["location"].endswith("?notice=saved")
        assert r.headers["location"] != f"/label/tasks/{task}?notice=saved"
        dup = await c.post(f"/label/tasks/{task}", form)
        assert dup.status_code == 409
        assert "already submitted" in error_text(dup.text)
        again = await c.http.get(f"/label/tasks/{task}")
        assert again.status_code == 409
    (comparison,) = env.store.export(env.rank_pid).records
    assert comparison.labeler_id == "alice"
    assert sorted(comparison.ranking) == [1, 2, 3, 3]
    assert sum(f["hallucination"] for f in comparison.flags) == 1


@pytest.mark.parametrize(
    ("form", "field"),
    [
        (ranking_form([1, 2, 3]) | {"likert_3": "4"}, "rank_3"),  # one rank short
        (ranking_form([1, 2, 3, 4]) | {"rank_7": "1"}, "rank_7"),  # one rank too many
        (ranking_form([1, 2, 3, 5]), "rank_3"),  # out of range
        (ranking_form([1, 2, 3, 4]) | {"rank_0": "first"}, "rank_0"),  # not a number
        (ranking_form([1, 2, 3, 4]) | {"rank_0": "9" * 30}, "rank_0"),  # no overflow, a 422
        (ranking_form([1, 2, 3, 4]) | {"rank_x": "1"}, "rank_x"),
        (ranking_form([1, 2, 3, 4]) | {"likert_2": "9"}, "likert_2"),
        ({k: v for k, v in ranking_form([1, 2, 3, 4]).items() if k != "likert_1"}, "likert_1"),
        (ranking_form([1, 2, 3, 4]) | {"flags_1": "made_up"}, "flags_1"),
        (ranking_form([1, 2, 3, 4]) | {"action": "approve"}, "action"),
    ],
)
async def test_malformed_submissions_are_422_naming_the_field(env: Env, form, field) -> None:
    async with browser(env, "alice") as c:
        task = await c.next_task(env.rank_pid)
        r = await c.post(f"/label/tasks/{task}", form)
        assert r.status_code == 422
        assert error_text(r.text).startswith(field)
        # The form comes back with what the labeler entered, and the task is still theirs.
        assert 'id="task-form"' in r.text
        ok = await c.post(f"/label/tasks/{task}", ranking_form([1, 2, 3, 4]))
        assert ok.status_code == 303


async def test_wrong_task_is_403_and_missing_task_404(env: Env) -> None:
    async with browser(env, "alice") as alice, browser(env, "bob") as bob:
        task = await alice.next_task(env.rank_pid)
        other = await bob.next_task(env.demo_pid)
        stolen = await bob.post(f"/label/tasks/{task}", ranking_form([1, 2, 3, 4]))
        assert stolen.status_code == 403 and "not assigned to you" in error_text(stolen.text)
        assert (await bob.http.get(f"/label/tasks/{task}")).status_code == 403
        assert (await alice.post(f"/label/tasks/{other}", {"action": "skip"})).status_code == 403
        assert (await alice.http.get("/label/tasks/9999")).status_code == 404
        assert (await alice.post("/label/tasks/9999", ranking_form([1, 2]))).status_code == 404
        for bad in ("abc", "0", "99999999999999999999999"):
            r = await alice.http.get(f"/label/tasks/{bad}")
            assert r.status_code == 422 and "task_id" in error_text(r.text)
        assert (await alice.post("/label/projects/9999/next")).status_code == 404
    assert env.store.progress(env.rank_pid)[0].done == 0


async def test_none_acceptable_and_skip(env: Env) -> None:
    async with browser(env, "alice") as c:
        first = await c.next_task(env.rank_pid)
        r = await c.post(f"/label/tasks/{first}", {"action": "none"})
        assert r.status_code == 303
        second = int(re.search(r"/label/tasks/(\d+)", r.headers["location"]).group(1))
        r = await c.post(f"/label/tasks/{second}", {"action": "skip"})
        assert r.headers["location"].endswith("notice=skipped")
    p = env.store.progress(env.rank_pid)[0]
    assert (p.none_acceptable, p.skipped, p.ranked) == (1, 1, 0)


async def test_queue_runs_dry_with_a_notice(env: Env) -> None:
    env.store.update_project(env.rank_pid, overlap=1)
    async with browser(env, "alice") as c:
        task = await c.next_task(env.rank_pid)
        for _ in range(5):  # 3 tasks; bounded
            r = await c.post(f"/label/tasks/{task}", ranking_form([1, 2, 3, 4]))
            m = re.search(r"/label/tasks/(\d+)", r.headers["location"])
            if not m:
                break
            task = int(m.group(1))
        assert r.headers["location"] == "/label?notice=finished"
        assert await c.next_task(env.rank_pid) is None
        home = await c.http.get("/label?notice=finished")
        assert "no more tasks" in home.text
    env.store.update_project(env.rank_pid, active=False)
    async with browser(env, "bob") as c:
        r = await c.post(f"/label/projects/{env.rank_pid}/next")
        assert r.status_code == 409 and "paused" in error_text(r.text)


async def test_demonstration_tasks(env: Env) -> None:
    async with browser(env, "alice") as c:
        task = await c.next_task(env.demo_pid)
        page = await c.http.get(f"/label/tasks/{task}")
        assert "<textarea" in page.text
        empty = await c.post(f"/label/tasks/{task}", {"action": "submit", "response": "  "})
        assert empty.status_code == 422 and error_text(empty.text).startswith("response")
        none = await c.post(f"/label/tasks/{task}", {"action": "none"})
        assert none.status_code == 422 and error_text(none.text).startswith("action")
        ok = await c.post(f"/label/tasks/{task}", {"action": "submit", "response": "An answer."})
        assert ok.status_code == 303
    (demo,) = env.store.export(env.demo_pid).records
    assert demo.response == "An answer." and demo.labeler_id == "alice"


async def test_untrusted_text_is_escaped_and_pages_forbid_inline_script(env: Env) -> None:
    async with browser(env, "alice") as c:
        task = await c.next_task(env.rank_pid)
        assert task == 1  # the sample holding the payload
        page = await c.http.get(f"/label/tasks/{task}")
    assert XSS not in page.text
    assert "&lt;script&gt;alert(&#34;xss&#34;)&lt;/script&gt;" in page.text
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page.text
    assert re.findall(r"<script[^>]*>", page.text) == ['<script src="/static/app.js" defer>']
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-store"


async def test_unknown_routes_and_methods_are_4xx_pages(env: Env) -> None:
    async with browser(env, "alice") as c:
        assert (await c.http.get("/nope")).status_code == 404
        assert (await c.http.put("/label")).status_code == 405
        assert (await c.http.get("/static/app.js")).status_code == 200


# ---------------------------------------------------------------------------------------------
# Admin


def upload(name: str, rows: list[dict] | str) -> dict:
    text = rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows)
    return {"file": (name, io.BytesIO(text.encode()), "application/json")}


async def test_admin_dashboard_and_project_page(env: Env) -> None:
    async with browser(env, "alice") as c:
        task = await c.next_task(env.rank_pid)
        await c.post(f"/label/tasks/{task}", ranking_form([1, 2, 3, 4]))
    async with browser(env, "admin") as c:
        home = await c.http.get("/admin")
        assert home.status_code == 200 and "ranks" in home.text
        page = await c.http.get(f"/admin/projects/{env.rank_pid}")
        assert page.status_code == 200
        assert re.search(r"1 / 6", page.text)  # labels done / slots
        assert "alice" in page.text
        assert (await c.http.get("/admin/projects/999")).status_code == 404


async def test_admin_creates_projects_from_files(env: Env) -> None:
    samples = [{"prompt": "p", "responses": ["a", "b", "c"], "prompt_id": "x"}]
    async with browser(env, "admin") as c:
        form = {"name": "new", "kind": "ranking", "overlap": "3"}
        r = await c.post("/admin/projects", form, files=upload("s.jsonl", samples))
        assert r.status_code == 303
        pid = int(re.search(r"/admin/projects/(\d+)", r.headers["location"]).group(1))
        again = await c.post("/admin/projects", form, files=upload("s.jsonl", samples))
        assert again.status_code == 409 and "already exists" in error_text(again.text)
        bad = [{"prompt": "p", "responses": ["only one"]}]
        r = await c.post("/admin/projects", form | {"name": "bad"}, files=upload("bad.jsonl", bad))
        assert r.status_code == 422
        assert "bad.jsonl line 1: field 'responses'" in error_text(r.text)
        r = await c.post("/admin/projects", form | {"name": "x"}, files=upload("j.jsonl", "{"))
        assert r.status_code == 422 and "not valid JSON" in error_text(r.text)
        r = await c.post("/admin/projects", form | {"name": "x"})
        assert r.status_code == 422 and error_text(r.text).startswith("file")
        r = await c.post("/admin/projects", form | {"name": "x", "overlap": "0"}, files=upload("s", samples))
        assert r.status_code == 422 and error_text(r.text).startswith("overlap")
        prompts = [{"id": "1", "text": "Say hi", "user_id": "u"}]
        r = await c.post(
            "/admin/projects",
            {"name": "writing", "kind": "demonstration", "overlap": "1"},
            files=upload("prompts.jsonl", prompts),
        )
        assert r.status_code == 303
    p = env.store.progress(pid)[0]
    assert (p.kind, p.tasks, p.overlap, p.source) == ("ranking", 1, 3, "s.jsonl")


async def test_admin_changes_overlap_and_pauses(env: Env) -> None:
    async with browser(env, "admin") as c:
        url = f"/admin/projects/{env.rank_pid}"
        assert (await c.post(url, {"overlap": "4"})).status_code == 303
        assert (await c.post(url, {"active": "0"})).status_code == 303
        bad = await c.post(url, {"overlap": "lots"})
        assert bad.status_code == 422 and error_text(bad.text).startswith("overlap")
        assert (await c.post(url, {"active": "maybe"})).status_code == 422
    p = env.store.progress(env.rank_pid)[0]
    assert (p.overlap, p.active) == (4, False)


async def test_admin_manages_users(env: Env) -> None:
    async with browser(env, "admin") as c:
        page = await c.http.get("/admin/users")
        assert "alice" in page.text
        r = await c.post("/admin/users", {"username": "dave", "password": "long-enough"})
        assert r.status_code == 303
        dup = await c.post("/admin/users", {"username": "dave", "password": "long-enough"})
        assert dup.status_code == 409
        short = await c.post("/admin/users", {"username": "erin", "password": "short"})
        assert short.status_code == 422 and error_text(short.text).startswith("password")
        role = await c.post("/admin/users", {"username": "erin", "password": "long-enough", "role": "root"})
        assert role.status_code == 422 and error_text(role.text).startswith("role")
        dave = next(u for u in env.store.list_users() if u.username == "dave")
        assert (await c.post(f"/admin/users/{dave.id}", {"active": "0"})).status_code == 303
        assert (await c.post("/admin/users/999", {"active": "0"})).status_code == 404
        me = next(u for u in env.store.list_users() if u.username == "admin")
        assert (await c.post(f"/admin/users/{me.id}", {"active": "0"})).status_code == 422
        r = await c.post(f"/admin/users/{dave.id}", {"password": "new-password"})
        assert r.status_code == 303
    assert env.store.authenticate("dave", "new-password") is None  # still deactivated
    env.store.set_active(dave.id, True)
    assert env.store.authenticate("dave", "new-password") is not None


async def test_export_downloads_read_back_with_no_conversion(env: Env, tmp_path: Path) -> None:
    original = env.store.export(env.rank_pid)  # nothing yet; responses come from the page
    assert original.records == []
    wanted = {f"resp {XSS}": 1, "b": 2, "c": 2, "d": 3}
    for user in ("alice", "bob"):
        async with browser(env, user) as c:
            task = await c.next_task(env.rank_pid)
            page = await c.http.get(f"/label/tasks/{task}")
            ranks = [wanted[text] for text in shown_responses(page.text)]
            r = await c.post(f"/label/tasks/{task}", ranking_form(ranks))
            assert r.status_code == 303
    async with browser(env, "alice") as c:
        task = await c.next_task(env.demo_pid)
        await c.post(f"/label/tasks/{task}", {"action": "submit", "response": "Done."})
    async with browser(env, "admin") as c:
        r = await c.http.get(f"/admin/projects/{env.rank_pid}/export")
        assert r.status_code == 200
        assert 'filename="ranks.comparisons.jsonl"' in r.headers["content-disposition"]
        (tmp_path / "c.jsonl").write_bytes(r.content)
        summary = (await c.http.get(f"/admin/projects/{env.rank_pid}/export/summary")).json()
        demos = await c.http.get(f"/admin/projects/{env.demo_pid}/export")
        (tmp_path / "d.jsonl").write_bytes(demos.content)
    comparisons = read_records(tmp_path / "c.jsonl", "comparison")
    assert {c.labeler_id for c in comparisons} == {"alice", "bob"}
    assert comparisons[0].responses[0] == f"resp {XSS}"  # the export keeps text as it came
    assert summary["exported"] == 2 and summary["agreement"]["pairs"] > 0
    assert summary["agreement"]["rate"] == 1.0  # both gave the same ranking
    (demo,) = read_records(tmp_path / "d.jsonl", "demonstration")
    assert demo.response == "Done."


# ---------------------------------------------------------------------------------------------
# Hostile input (issue 14): each a 4xx with a message, never a 500


async def test_non_ascii_csrf_tokens_are_refused_not_a_server_error(env: Env) -> None:
    async with browser(env) as c:
        r = await c.http.post(
            "/login",
            data={"csrf_token": "é", "username": "x", "password": "y"},
            cookies={"tether_login_csrf": "abc"},
        )
        assert r.status_code == 403 and "login form expired" in r.text
    async with browser(env, "alice") as c:
        r = await c.http.post(f"/label/projects/{env.rank_pid}/next", data={"csrf_token": "é" * 43})
        assert r.status_code == 403 and "CSRF" in error_text(r.text)


@pytest.mark.parametrize("key", ["rank_²", "likert_³", "flags_①", "rank_1²", "rank_٣", "rank_01", "rank_" + "9" * 5000])
async def test_form_keys_with_unicode_or_odd_digits_are_422(env: Env, key: str) -> None:
    async with browser(env, "alice") as c:
        task = await c.next_task(env.rank_pid)
        r = await c.post(f"/label/tasks/{task}", ranking_form([1, 2, 3, 4]) | {key: "1"})
        assert r.status_code == 422
        assert error_text(r.text).startswith(key[:40]) and "no such response" in error_text(r.text)


HOSTILE_UPLOADS = [
    ("[" * 100_000 + "]" * 100_000, "line 1: nests arrays or objects too deeply"),
    ('{"prompt": "p", "responses": ["a", "b"], "x": ' + "9" * 5000 + "}", "line 1: field 'x' is a 5000-digit"),
    ('{"prompt": "p", "responses": ["a", "b"], "ranking": [1, ' + "9" * 5000 + "]}", "field 'ranking[1]'"),
    ('{"prompt": "\\ud800", "responses": ["a", "b"]}', "field 'prompt' holds an unpaired surrogate"),
]


@pytest.mark.parametrize(("content", "message"), HOSTILE_UPLOADS)
async def test_hostile_sample_uploads_are_422_naming_the_problem(env: Env, content: str, message: str) -> None:
    form = {"name": "hostile", "kind": "ranking", "overlap": "1"}
    async with browser(env, "admin") as c:
        r = await c.post("/admin/projects", form, files=upload("h.jsonl", content))
    assert r.status_code == 422
    assert error_text(r.text).startswith("file: h.jsonl") and message in error_text(r.text)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"prompt": "é", "responses": ["a", "b"]}'.encode("latin-1"), "line 1: is not UTF-8 text (byte 0xe9"),
        ('{"prompt": "p", "responses": ["a", "b"]}'.encode("utf-16"), "file: is UTF-16"),
    ],
)
async def test_uploads_in_other_encodings_are_422(env: Env, body: bytes, message: str) -> None:
    form = {"name": "encoded", "kind": "ranking", "overlap": "1"}
    async with browser(env, "admin") as c:
        r = await c.post("/admin/projects", form, files={"file": ("e.jsonl", io.BytesIO(body))})
    assert r.status_code == 422 and message in error_text(r.text)


async def test_admin_user_forms_as_multipart(env: Env) -> None:
    extra = {"note": ("note.txt", io.BytesIO(b"attached"), "text/plain")}
    async with browser(env, "admin") as c:
        r = await c.post("/admin/users", {"username": "mpart", "password": "long-enough"}, files=extra)
        assert r.status_code == 303
        as_file = {"username": ("u.txt", io.BytesIO(b"mallory"), "text/plain")}
        r = await c.post("/admin/users", {"password": "long-enough"}, files=as_file)
        assert r.status_code == 422 and error_text(r.text).startswith("username: must be text")
        user = next(u for u in env.store.list_users() if u.username == "mpart")
        r = await c.post(f"/admin/users/{user.id}", {"password": "nul\x00inside"})
        assert r.status_code == 422 and error_text(r.text).startswith("password")
        as_file = {"password": ("p.txt", io.BytesIO(b"long-enough"), "text/plain")}
        r = await c.post(f"/admin/users/{user.id}", files=as_file)
        assert r.status_code == 422 and error_text(r.text).startswith("password: must be text")
