"""Fuzzing the labeling app: hypothesis strategies for hostile requests, and the app to send them
to. Used by test_label_fuzz.py (a bounded run in the suite) and benchmarks/fuzz_labeling.py (a
long run whose figure is in docs/labeling.md).

A request is drawn as who sends it (nobody, a labeler or an admin, each with a live session),
which route (every route of the app, path ids valid, out of range or not numbers), which form
fields (the app's own names, Unicode-digit indexes, arbitrary text), which CSRF token (right,
missing, wrong, non-ASCII), how it is encoded (urlencoded, multipart with fields sent as files,
raw bytes) and, for uploads, what the file holds (valid samples, deep nesting, huge integers,
other encodings, random bytes, random JSON).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import hypothesis.strategies as st
from labeling_support import CSRF_RE, FAST_HASHER, PASSWORD, make_prompts, make_samples
from starlette.testclient import TestClient

from tether.labeling.app import create_app, router
from tether.labeling.store import LabelStore

# Every route of the app (so a new one is fuzzed too), plus static files, traversal, unknowns.
ROUTES: list[tuple[str, str]] = sorted(
    {(m, r.path) for r in router.routes for m in r.methods if m != "HEAD"}
    | {("GET", "/static/app.js"), ("GET", "/static/../../etc/passwd"), ("PUT", "/admin/users"), ("GET", "/no/page")}
)
FIELD_NAMES = [
    "csrf_token", "username", "password", "next", "action", "response", "name", "kind",
    "overlap", "active", "role", "file",
]  # fmt: skip
PERSONAS = ("anonymous", "labeler", "admin")

# Text that can go over the wire (httpx encodes UTF-8: no lone surrogates), with the awkward
# cases drawn often: Unicode digits ("²", "①", "٣"), NULs, very long strings.
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)
DIGITS = st.text(st.characters(categories=["Nd", "No", "Nl"]) | st.sampled_from("0123456789"), min_size=1, max_size=6)
NUMBERS = st.one_of(
    st.integers(-3, 12).map(str),
    st.integers().map(str),
    st.just("9" * 5000),
    DIGITS,
    st.sampled_from(["", " ", "1.5", "1e3", "NaN", "inf", "-0", "0x10", "１"]),
)
VALUES = st.one_of(NUMBERS, TEXT, st.sampled_from(["submit", "none", "skip", "ranking", "demonstration",
                                                    "labeler", "admin", "0", "1", "\x00", "x" * 2000]))  # fmt: skip
INDEXED = st.builds(
    lambda prefix, index: f"{prefix}_{index}",
    st.sampled_from(["rank", "likert", "flags"]),
    st.one_of(st.integers(-1, 10).map(str), DIGITS, TEXT),
)
KEYS = st.one_of(st.sampled_from(FIELD_NAMES), INDEXED, TEXT)

JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON_VALUES = st.recursive(JSON_LEAVES, lambda c: st.lists(c, max_size=4) | st.dictionaries(TEXT, c, max_size=4))


def _jsonl(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


GOOD_SAMPLE = {"prompt": "p", "responses": ["a", "b", "c"], "prompt_id": "x"}
UPLOADS = st.one_of(
    st.just(_jsonl([GOOD_SAMPLE])),
    st.just(_jsonl([{"id": "1", "text": "Say hi", "user_id": "u"}])),
    st.integers(10, 200_000).map(lambda n: ("[" * n + "]" * n).encode()),
    st.integers(10, 200_000).map(lambda n: ('{"prompt": ' + "[" * n + "]" * n + "}").encode()),
    st.integers(4000, 20_000).map(lambda n: ('{"prompt": "p", "responses": ["a", "b"], "x": ' + "9" * n + "}").encode()),  # noqa: E501
    st.just(json.dumps(GOOD_SAMPLE, ensure_ascii=False).replace('"p"', '"é"').encode("latin-1")),
    st.just(json.dumps(GOOD_SAMPLE).encode("utf-16")),
    st.just(_jsonl([{**GOOD_SAMPLE, "prompt": "\ud800"}])),  # json.dumps writes the escape "\\ud800"
    st.lists(JSON_VALUES, max_size=4).map(_jsonl),
    st.binary(max_size=300),
)  # fmt: skip


@dataclass
class FuzzRequest:
    persona: str
    method: str
    path: str
    fields: list[tuple[str, str]]
    csrf: str | None  # None: the persona's own token
    encoding: str  # "form", "multipart" or "raw"
    files: list[tuple[str, tuple[str, bytes]]] = field(default_factory=list)
    raw: bytes = b""
    raw_type: str = ""
    origin: str | None = None


@st.composite
def requests(draw: st.DrawFn, ids: dict[str, list[int]]) -> FuzzRequest:
    """One hostile request; ``ids`` holds the valid project, task and user ids to mix in."""
    method, template = draw(st.sampled_from(ROUTES))
    # Mostly the role the route is for, so requests get past the role check into the handler.
    role = "admin" if template.startswith("/admin") else "labeler" if template.startswith("/label") else None
    persona = draw(st.sampled_from(PERSONAS) | st.just(role or "anonymous") | st.just(role or "anonymous"))
    if template == "/logout" and persona != "anonymous":
        template = "/login"  # keep the fuzzing sessions alive

    def path_id(kind: str) -> str:
        value = draw(
            st.one_of(
                st.sampled_from(ids[kind]).map(str),
                st.integers(-(2**70), 2**70).map(str),
                DIGITS,
                TEXT,
            )
        )
        return quote(value, safe="")

    path = template.format(project_id=path_id("project"), task_id=path_id("task"), user_id=path_id("user"))
    fields = draw(st.lists(st.tuples(KEYS, VALUES), max_size=10))
    # None: the persona's own token (most requests), else missing, wrong or non-ASCII.
    csrf = draw(st.one_of(*[st.none()] * 6, st.just(""), TEXT, st.just("é" * 43)))
    encoding = draw(st.sampled_from(["form", "form", "multipart", "raw"]))
    request = FuzzRequest(persona, method, path, fields, csrf, encoding)
    if encoding == "multipart":
        names = st.one_of(st.sampled_from(FIELD_NAMES), KEYS)
        request.files = draw(st.lists(st.tuples(names, st.tuples(TEXT, UPLOADS)), min_size=1, max_size=3))
    elif encoding == "raw":
        request.raw = draw(st.binary(max_size=400) | UPLOADS)
        request.raw_type = draw(
            st.sampled_from(
                [
                    "application/x-www-form-urlencoded",
                    "multipart/form-data",
                    "multipart/form-data; boundary=xyz",
                    "application/json",
                    "text/plain; charset=latin-1",
                ]
            )
        )
    request.origin = draw(st.sampled_from([None] * 6 + ["null", "https://evil.example", "http://testserver"]))
    return request


class FuzzTarget:
    """The app over a fresh SQLite database, with a logged-in labeler and admin."""

    def __init__(self, db_path: Path):
        self.store = LabelStore(f"sqlite:///{db_path}", hasher=FAST_HASHER)
        self.store.add_user("admin", PASSWORD, "admin")
        self.store.add_user("alice", PASSWORD)
        victim = self.store.add_user("victim", PASSWORD)
        rank = self.store.create_project("ranks", "ranking", make_samples(20), overlap=3)
        demo = self.store.create_project("demos", "demonstration", make_prompts(5), overlap=2)
        app = create_app(self.store)
        # raise_server_exceptions=False: an unhandled error comes back as the 500 a user would see.
        self.clients = {p: TestClient(app, raise_server_exceptions=False) for p in PERSONAS}
        self.tokens = {"anonymous": ""}
        for persona, user in (("labeler", "alice"), ("admin", "admin")):
            self.tokens[persona] = self._login(self.clients[persona], user)
        self.ids = {
            "project": [rank, demo],
            "task": list(range(1, 26)),
            "user": [victim.id],
        }

    @staticmethod
    def _login(client: TestClient, username: str) -> str:
        page = client.get("/login")
        token = re.search(CSRF_RE, page.text)
        assert token, "login page has no CSRF token"
        r = client.post(
            "/login",
            data={"username": username, "password": PASSWORD, "csrf_token": token.group(1)},
            follow_redirects=True,
        )
        assert r.status_code == 200, r.text
        home = re.search(CSRF_RE, r.text)
        assert home, "home page has no CSRF token"
        return home.group(1)

    def send(self, req: FuzzRequest):
        client = self.clients[req.persona]
        if req.persona == "anonymous":
            client.cookies.clear()
            if req.path == "/login":
                client.cookies.set("tether_login_csrf", "abc")  # the double-submit cookie
        csrf = self.tokens[req.persona] if req.csrf is None else req.csrf
        headers = {"origin": req.origin} if req.origin else {}
        if req.encoding == "raw":
            headers["content-type"] = req.raw_type
            return client.request(req.method, req.path, content=req.raw, headers=headers, follow_redirects=False)
        data = [("csrf_token", csrf), *req.fields]
        if req.encoding == "multipart":
            return client.request(
                req.method, req.path, data=_as_dict(data), files=req.files, headers=headers, follow_redirects=False
            )
        return client.request(req.method, req.path, data=_as_dict(data), headers=headers, follow_redirects=False)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.store.close()


def _as_dict(pairs: list[tuple[str, str]]) -> dict[str, str | list[str]]:
    """httpx's form shape; repeated keys (``flags_0`` twice) become lists."""
    out: dict[str, str | list[str]] = {}
    for k, v in pairs:
        if k in out:
            prev = out[k]
            out[k] = [*prev, v] if isinstance(prev, list) else [prev, v]
        else:
            out[k] = v
    return out
