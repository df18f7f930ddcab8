"""The labeling web app: server-rendered pages over :class:`~tether.labeling.store.LabelStore`.

Labelers rank K responses (drag and drop or keyboard, ties allowed, Likert 1-7 and the paper's
metadata flags per response) or write demonstrations; admins create projects, manage labelers,
watch progress and agreement, and export JSONL that ``tether rm`` / ``tether sft`` read as is.

Security, in one place:
- prompts and model outputs are untrusted: Jinja2 autoescapes every template, and the CSP
  forbids inline script, so even a template mistake could not run an injected ``<script>``;
- every page but the login form needs a session (DB-backed, random token, expiry); admin pages
  need the admin role, labeling pages the labeler role;
- every POST carries the session's CSRF token (the login form a double-submit cookie), and a
  cross-site ``Origin`` is refused;
- passwords are argon2 hashes; SQL is built by SQLAlchemy with bound parameters only.
"""

from __future__ import annotations

import hmac
import json
import secrets
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from tether.data.formats import FLAGS, LIKERT_MAX, LIKERT_MIN, DataError, read_records, to_json
from tether.labeling.store import (
    AlreadyDone,
    Conflict,
    InvalidInput,
    LabelingError,
    LabelInput,
    LabelStore,
    NotAssigned,
    NotFound,
    SessionInfo,
    TaskView,
)

HERE = Path(__file__).parent
SESSION_COOKIE = "tether_session"
LOGIN_CSRF_COOKIE = "tether_login_csrf"
MAX_UPLOAD_BYTES = 64 * 1024 * 1024

# InstructGPT Appendix B.3: the metadata labelers record for each output.
FLAG_LABELS: dict[str, str] = {
    "fails_instruction": "Fails to follow the instruction / task",
    "inappropriate": "Inappropriate for a customer assistant",
    "hallucination": "Hallucination (made-up facts)",
    "satisfies_constraint": "Satisfies the constraint in the instruction",
    "sexual_content": "Sexual content",
    "violent_content": "Violent content",
    "harmful_advice": "Encourages or fails to discourage harm",
    "denigrates_protected_class": "Denigrates a protected class",
    "expresses_opinion": "Expresses an opinion or moral judgment",
}
assert set(FLAG_LABELS) == set(FLAGS), "every flag in the data contract needs a label"

LIKERT_LABELS = {1: "Terrible", 4: "Okay", 7: "Excellent"}

# Fixed notices chosen by a code in the query string, so no request text is ever echoed.
NOTICES = {
    "saved": "Saved. Here is your next task.",
    "skipped": "Skipped. Here is your next task.",
    "finished": "Saved. There are no more tasks for you in this project right now — thank you!",
    "empty": "There are no tasks for you in this project right now.",
    "project": "Project created.",
    "updated": "Project updated.",
    "user": "User created.",
    "user-updated": "User updated.",
}

STATUS_FOR: dict[type[LabelingError], int] = {
    NotFound: 404,
    NotAssigned: 403,
    AlreadyDone: 409,
    Conflict: 409,
    InvalidInput: 422,
}


class AuthRequired(Exception):
    """No valid session: answered 401 with the login form."""

    def __init__(self, message: str):
        self.message = message


class Forbidden(Exception):
    def __init__(self, message: str):
        self.message = message


@dataclass(frozen=True)
class Viewer:
    """The logged-in user of a request, with their session's CSRF token."""

    session: SessionInfo

    @property
    def user_id(self) -> int:
        return self.session.user.id

    @property
    def username(self) -> str:
        return self.session.user.username

    @property
    def role(self) -> str:
        return self.session.user.role


# ---------------------------------------------------------------------------------------------
# Templates


def _templates() -> Jinja2Templates:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        # Everything rendered into .html is escaped unless a template says otherwise (none do).
        autoescape=select_autoescape(["html"], default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(
        FLAGS=FLAGS,
        FLAG_LABELS=FLAG_LABELS,
        LIKERT_MIN=LIKERT_MIN,
        LIKERT_MAX=LIKERT_MAX,
        LIKERT_LABELS=LIKERT_LABELS,
        letter=lambda i: chr(ord("A") + i),
    )
    return Jinja2Templates(env=env)


TEMPLATES = _templates()


def render(
    request: Request,
    name: str,
    context: dict[str, Any] | None = None,
    *,
    status: int = 200,
    viewer: Viewer | None = None,
) -> HTMLResponse:
    ctx = {"viewer": viewer, "notice": NOTICES.get(request.query_params.get("notice", ""))}
    ctx.update(context or {})
    return TEMPLATES.TemplateResponse(request, name, ctx, status_code=status)


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    viewer = getattr(request.state, "viewer", None)
    return render(request, "error.html", {"status": status, "message": message}, status=status, viewer=viewer)


def login_page(request: Request, message: str | None, *, status: int, next_url: str = "/") -> HTMLResponse:
    token = secrets.token_urlsafe(32)
    response = render(
        request,
        "login.html",
        {"message": message, "login_csrf": token, "next": _safe_next(next_url)},
        status=status,
    )
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        token,
        max_age=3600,
        httponly=True,
        samesite="strict",
        secure=request.app.state.secure_cookies,
    )
    return response


def _safe_next(url: str | None) -> str:
    """Only same-site paths: never redirect a fresh login to another host."""
    if not url or not url.startswith("/") or url.startswith("//") or "\\" in url:
        return "/"
    return url


# ---------------------------------------------------------------------------------------------
# Dependencies: store, viewer, roles, CSRF-checked forms


def get_store(request: Request) -> LabelStore:
    return request.app.state.store


Store = Annotated[LabelStore, Depends(get_store)]


def get_viewer(request: Request, store: Store) -> Viewer:
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise AuthRequired("Please log in.")
    session = store.get_session(token)
    if session is None:
        raise AuthRequired("Your session has expired. Please log in again.")
    viewer = Viewer(session)
    request.state.viewer = viewer
    return viewer


AnyViewer = Annotated[Viewer, Depends(get_viewer)]


def require_admin(viewer: AnyViewer) -> Viewer:
    if viewer.role != "admin":
        raise Forbidden("This page is for admins.")
    return viewer


def require_labeler(viewer: AnyViewer) -> Viewer:
    if viewer.role != "labeler":
        raise Forbidden("This page is for labelers; admins manage projects from the dashboard.")
    return viewer


AdminViewer = Annotated[Viewer, Depends(require_admin)]
LabelerViewer = Annotated[Viewer, Depends(require_labeler)]


async def read_form(request: Request) -> AsyncIterator[FormData]:
    form = await request.form(max_files=1, max_fields=500)
    try:
        yield form
    finally:
        await form.close()  # uploads are spooled to temporary files


Form = Annotated[FormData, Depends(read_form)]


def _check_origin(request: Request) -> None:
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
        raise Forbidden("Cross-site form submission refused.")
    if origin == "null":
        raise Forbidden("Cross-site form submission refused.")


def same_token(sent: object, expected: str | None) -> bool:
    """Constant-time comparison of a submitted token with the expected one.

    On bytes: ``hmac.compare_digest`` refuses str with non-ASCII characters (a TypeError, so a 500),
    and anyone can post ``csrf_token=é``. surrogatepass keeps the encoding lossless for any str.
    """
    if not isinstance(sent, str) or not expected:
        return False
    return hmac.compare_digest(sent.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def _check_csrf(request: Request, viewer: Viewer, form: FormData) -> None:
    _check_origin(request)
    if not same_token(form.get("csrf_token"), viewer.session.csrf_token):
        raise Forbidden("Missing or wrong CSRF token: reload the page and try again.")


def admin_form(request: Request, viewer: AdminViewer, form: Form) -> tuple[Viewer, FormData]:
    _check_csrf(request, viewer, form)
    return viewer, form


def labeler_form(
    request: Request,
    viewer: LabelerViewer,
    form: Form,
) -> tuple[Viewer, FormData]:
    _check_csrf(request, viewer, form)
    return viewer, form


def any_form(request: Request, viewer: AnyViewer, form: Form) -> tuple[Viewer, FormData]:
    _check_csrf(request, viewer, form)
    return viewer, form


AdminPost = Annotated[tuple[Viewer, FormData], Depends(admin_form)]
LabelerPost = Annotated[tuple[Viewer, FormData], Depends(labeler_form)]
AnyPost = Annotated[tuple[Viewer, FormData], Depends(any_form)]


# ---------------------------------------------------------------------------------------------
# Form parsing: errors name the form field


def _form_str(form: FormData, name: str, *, required: bool = True, max_len: int = 1000) -> str:
    value = form.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InvalidInput(name, "is missing")
        return ""
    if not isinstance(value, str):
        raise InvalidInput(name, "must be text")
    if len(value) > max_len:
        raise InvalidInput(name, f"is longer than {max_len} characters")
    if "\x00" in value:
        raise InvalidInput(name, "holds a NUL character")  # PostgreSQL text cannot
    return value


def _form_int(form: FormData, name: str, lo: int, hi: int, what: str = "") -> int:
    raw = form.get(name)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise InvalidInput(name, f"is missing{what}")
    if not isinstance(raw, str):
        raise InvalidInput(name, "must be a number")
    try:
        value = int(raw.strip())
    except ValueError:
        raise InvalidInput(name, f"must be an integer {lo}..{hi}, got {raw[:20]!r}") from None
    if not lo <= value <= hi:
        raise InvalidInput(name, f"must be an integer {lo}..{hi}, got {value}")
    return value


def parse_label_form(form: FormData, k: int, *, need_ranking: bool) -> LabelInput:
    """The ranking form (fields ``rank_i``, ``likert_i``, ``flags_i`` per shown response i)."""
    # Exactly "0".."k-1": str.isdigit() also accepts "²" and "①", which int() refuses.
    indexes = {str(i) for i in range(k)}
    for key in form.keys():
        prefix, _, index = key.partition("_")
        if prefix in ("rank", "likert", "flags") and index not in indexes:
            raise InvalidInput(key[:40], f"no such response: this task has {k} (0..{k - 1})")
    # Likert is required with a ranking; with "none acceptable" it is all or nothing.
    want_likert = need_ranking or any(form.get(f"likert_{i}") for i in range(k))
    ranking: list[int] | None = [] if need_ranking else None
    likert: list[int] | None = [] if want_likert else None
    flags: list[list[str]] = []
    for i in range(k):
        which = f" (response {chr(ord('A') + i)})"
        if ranking is not None:
            ranking.append(_form_int(form, f"rank_{i}", 1, k, f"{which}: rank every response"))
        if likert is not None:
            likert.append(_form_int(form, f"likert_{i}", LIKERT_MIN, LIKERT_MAX, which))
        names = [v for v in form.getlist(f"flags_{i}") if isinstance(v, str)]
        for name in names:
            if name not in FLAGS:
                raise InvalidInput(f"flags_{i}", f"unknown flag {name[:40]!r}")
        flags.append(sorted(set(names)))
    return LabelInput(ranking=ranking, likert=likert, flags=flags)


def _parse_bool(form: FormData, name: str) -> bool | None:
    raw = form.get(name)
    if raw is None:
        return None
    if raw not in ("0", "1"):
        raise InvalidInput(name, "must be 0 or 1")
    return raw == "1"


# ---------------------------------------------------------------------------------------------
# Routes: login


router = APIRouter()

# Row ids in URLs: bounded, so a huge number is a 422 rather than a database overflow.
Id = Annotated[int, PathParam(ge=1, le=2**31 - 1)]


def _set_session_cookie(request: Request, response: Response, token: str) -> None:
    store: LabelStore = request.app.state.store
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(store.session_ttl.total_seconds()),
        httponly=True,
        samesite="lax",
        secure=request.app.state.secure_cookies,
    )


def _home_for(role: str) -> str:
    return "/admin" if role == "admin" else "/label"


@router.get("/")
def root(request: Request, store: Store) -> Response:
    token = request.cookies.get(SESSION_COOKIE)
    session = store.get_session(token) if token else None
    if session is None:
        return RedirectResponse("/login", status_code=303)
    return RedirectResponse(_home_for(session.user.role), status_code=303)


@router.get("/login")
def login_form(request: Request, store: Store) -> Response:
    token = request.cookies.get(SESSION_COOKIE)
    session = store.get_session(token) if token else None
    if session is not None:
        return RedirectResponse(_home_for(session.user.role), status_code=303)
    return login_page(request, None, status=200, next_url=request.query_params.get("next", "/"))


@router.post("/login")
def login(
    request: Request,
    form: Form,
    store: Store,
) -> Response:
    _check_origin(request)
    if not same_token(form.get("csrf_token"), request.cookies.get(LOGIN_CSRF_COOKIE)):
        return login_page(request, "The login form expired; please try again.", status=403, next_url="/")
    username = _form_str(form, "username", max_len=200)
    password = _form_str(form, "password", max_len=1000)
    next_url = form.get("next")
    user = store.authenticate(username.strip(), password)
    if user is None:
        return login_page(
            request,
            "Wrong username or password.",
            status=401,
            next_url=next_url if isinstance(next_url, str) else "/",
        )
    old = request.cookies.get(SESSION_COOKIE)
    if old:
        store.delete_session(old)  # a login always starts a fresh session (no fixation)
    token, _ = store.create_session(user.id)
    target = _safe_next(next_url if isinstance(next_url, str) else None)
    if target == "/":
        target = _home_for(user.role)
    response = RedirectResponse(target, status_code=303)
    _set_session_cookie(request, response, token)
    response.delete_cookie(LOGIN_CSRF_COOKIE)
    return response


@router.post("/logout")
def logout(
    request: Request,
    posted: AnyPost,
    store: Store,
) -> Response:
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        store.delete_session(token)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


# ---------------------------------------------------------------------------------------------
# Routes: labelers


@router.get("/label")
def label_home(
    request: Request,
    viewer: LabelerViewer,
    store: Store,
) -> Response:
    available = store.available(viewer.user_id)
    projects = [p for p in store.progress() if p.active]
    rows = [
        {
            "project": p,
            "available": available.get(p.id, 0),
            "mine": p.by_labeler.get(viewer.username, 0),
        }
        for p in projects
    ]
    return render(request, "label_home.html", {"rows": rows}, viewer=viewer)


def _next_redirect(store: LabelStore, viewer: Viewer, project_id: int, notice: str) -> Response:
    task_id = store.next_task(viewer.user_id, project_id)
    if task_id is None:
        done = "finished" if notice in ("saved", "skipped") else "empty"
        return RedirectResponse(f"/label?notice={done}", status_code=303)
    suffix = f"?notice={notice}" if notice else ""
    return RedirectResponse(f"/label/tasks/{task_id}{suffix}", status_code=303)


@router.post("/label/projects/{project_id}/next")
def next_task(
    project_id: Id,
    posted: LabelerPost,
    store: Store,
) -> Response:
    viewer, _ = posted
    return _next_redirect(store, viewer, project_id, "")


def _task_page(
    request: Request,
    viewer: Viewer,
    view: TaskView,
    *,
    status: int = 200,
    error: InvalidInput | None = None,
    values: FormData | None = None,
) -> HTMLResponse:
    template = "rank.html" if view.kind == "ranking" else "demonstration.html"
    return render(
        request,
        template,
        {"task": view, "error": error, "values": values},
        status=status,
        viewer=viewer,
    )


@router.get("/label/tasks/{task_id}")
def task_page(
    request: Request,
    task_id: Id,
    viewer: LabelerViewer,
    store: Store,
) -> Response:
    return _task_page(request, viewer, store.task_view(viewer.user_id, task_id))


@router.post("/label/tasks/{task_id}")
def submit_task(
    request: Request,
    task_id: Id,
    posted: LabelerPost,
    store: Store,
) -> Response:
    viewer, form = posted
    # Raises NotFound / NotAssigned / AlreadyDone before any parsing: a wrong task is a 4xx
    # whatever the form holds.
    view = store.task_view(viewer.user_id, task_id)
    action = form.get("action", "submit")
    try:
        if action == "skip":
            store.skip(viewer.user_id, task_id)
            return _next_redirect(store, viewer, view.project_id, "skipped")
        if view.kind == "demonstration":
            if action != "submit":
                raise InvalidInput("action", "must be 'submit' or 'skip' for a demonstration")
            text = form.get("response")
            if not isinstance(text, str):
                raise InvalidInput("response", "is missing")
            store.submit_demonstration(viewer.user_id, task_id, text)
        elif action == "submit":
            label = parse_label_form(form, len(view.responses), need_ranking=True)
            store.submit_ranking(viewer.user_id, task_id, label)
        elif action == "none":
            label = parse_label_form(form, len(view.responses), need_ranking=False)
            store.submit_none_acceptable(viewer.user_id, task_id, label)
        else:
            raise InvalidInput("action", "must be 'submit', 'none' or 'skip'")
    except InvalidInput as e:
        # Show the task again with the labeler's input kept and the bad field named.
        return _task_page(request, viewer, view, status=422, error=e, values=form)
    return _next_redirect(store, viewer, view.project_id, "saved")


# ---------------------------------------------------------------------------------------------
# Routes: admins


@router.get("/admin")
def admin_home(
    request: Request,
    viewer: AdminViewer,
    store: Store,
) -> Response:
    projects = store.progress()
    agreement = {p.id: store.agreement(p.id) for p in projects if p.kind == "ranking"}
    return render(
        request,
        "admin_home.html",
        {"projects": projects, "agreement": agreement},
        viewer=viewer,
    )


@router.post("/admin/projects")
def create_project(
    request: Request,
    posted: AdminPost,
    store: Store,
) -> Response:
    viewer, form = posted
    try:
        name = _form_str(form, "name", max_len=200)
        kind = _form_str(form, "kind", max_len=20)
        if kind not in ("ranking", "demonstration"):
            raise InvalidInput("kind", "must be 'ranking' (a sample file) or 'demonstration'")
        overlap = _form_int(form, "overlap", 1, 100)
        upload = form.get("file")
        if not isinstance(upload, UploadFile) or not upload.filename:
            raise InvalidInput("file", "is missing: choose a JSONL file")
        data = upload.file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise InvalidInput("file", f"is larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
        filename = Path(upload.filename).name
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "upload.jsonl"
            path.write_bytes(data)
            try:
                records = read_records(path, "sample" if kind == "ranking" else "prompt")
            except DataError as e:
                where = f"line {e.line}" if e.line is not None else "file"
                what = f" field '{e.field}'" if e.field else ""
                raise InvalidInput("file", f"{filename} {where}:{what} {e.message}") from None
        project_id = store.create_project(name, kind, records, overlap=overlap, source=filename)
    except (InvalidInput, Conflict) as e:
        status = 409 if isinstance(e, Conflict) else 422
        return render(
            request,
            "admin_home.html",
            {
                "projects": store.progress(),
                "agreement": {},
                "form_error": str(e),
                "values": form,
            },
            status=status,
            viewer=viewer,
        )
    return RedirectResponse(f"/admin/projects/{project_id}?notice=project", status_code=303)


@router.get("/admin/projects/{project_id}")
def project_page(
    request: Request,
    project_id: Id,
    viewer: AdminViewer,
    store: Store,
) -> Response:
    progress = store.progress(project_id)[0]
    agreement = store.agreement(project_id) if progress.kind == "ranking" else None
    return render(
        request,
        "admin_project.html",
        {"p": progress, "agreement": agreement},
        viewer=viewer,
    )


@router.post("/admin/projects/{project_id}")
def update_project(
    project_id: Id,
    posted: AdminPost,
    store: Store,
) -> Response:
    _, form = posted
    overlap = _form_int(form, "overlap", 1, 100) if form.get("overlap") is not None else None
    store.update_project(project_id, overlap=overlap, active=_parse_bool(form, "active"))
    return RedirectResponse(f"/admin/projects/{project_id}?notice=updated", status_code=303)


def _export_name(name: str, kind: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name).strip("-") or "project"
    return f"{safe}.{'comparisons' if kind == 'ranking' else 'demonstrations'}.jsonl"


@router.get("/admin/projects/{project_id}/export")
def export_records(
    project_id: Id,
    viewer: AdminViewer,
    store: Store,
) -> Response:
    result = store.export(project_id)
    body = "".join(json.dumps(to_json(r), ensure_ascii=False) + "\n" for r in result.records)
    filename = _export_name(result.summary["project"], result.kind)
    return Response(
        body,
        media_type="application/x-ndjson; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/admin/projects/{project_id}/export/summary")
def export_summary(
    project_id: Id,
    viewer: AdminViewer,
    store: Store,
) -> Response:
    result = store.export(project_id)
    filename = _export_name(result.summary["project"], result.kind).replace(".jsonl", ".summary.json")
    return Response(
        json.dumps(result.summary, indent=2, ensure_ascii=False),
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/admin/users")
def users_page(
    request: Request,
    viewer: AdminViewer,
    store: Store,
) -> Response:
    return render(request, "admin_users.html", {"users": store.list_users()}, viewer=viewer)


@router.post("/admin/users")
def create_user(
    request: Request,
    posted: AdminPost,
    store: Store,
) -> Response:
    viewer, form = posted
    try:
        username = _form_str(form, "username", max_len=200).strip()
        password = _form_str(form, "password", max_len=1000)
        role = form.get("role", "labeler")
        store.add_user(username, password, role if isinstance(role, str) else "")
    except (InvalidInput, Conflict) as e:
        return render(
            request,
            "admin_users.html",
            {"users": store.list_users(), "form_error": str(e), "values": form},
            status=409 if isinstance(e, Conflict) else 422,
            viewer=viewer,
        )
    return RedirectResponse("/admin/users?notice=user", status_code=303)


@router.post("/admin/users/{user_id}")
def update_user(
    user_id: Id,
    posted: AdminPost,
    store: Store,
) -> Response:
    viewer, form = posted
    store.get_user(user_id)  # 404 before anything else
    active = _parse_bool(form, "active")
    if active is not None:
        if user_id == viewer.user_id and not active:
            raise InvalidInput("active", "you cannot deactivate yourself")
        store.set_active(user_id, active)
    password = _form_str(form, "password", required=False, max_len=1000)
    if password:
        store.set_password(user_id, password)
    return RedirectResponse("/admin/users?notice=user-updated", status_code=303)


# ---------------------------------------------------------------------------------------------
# The application


CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def create_app(store: LabelStore | str, *, secure_cookies: bool = False) -> FastAPI:
    """The ASGI app over ``store`` (a LabelStore or a SQLAlchemy URL).

    ``secure_cookies`` marks cookies Secure; turn it on when serving over HTTPS.
    """
    if isinstance(store, str):
        store = LabelStore(store)
    # No OpenAPI or docs routes: every route but /login needs a session.
    app = FastAPI(title="tether labeling", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    app.state.secure_cookies = secure_cookies
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Frame-Options"] = "DENY"
        if not request.url.path.startswith("/static/"):
            # Pages show labels and prompts: never keep them in a shared or back-button cache.
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(AuthRequired)
    async def on_auth_required(request: Request, exc: AuthRequired) -> Response:
        message = exc.message
        if request.method != "GET":
            message += " Your last action was not saved."
        next_url = request.url.path if request.method == "GET" else "/"
        response = login_page(request, message, status=401, next_url=next_url)
        if request.cookies.get(SESSION_COOKIE):
            response.delete_cookie(SESSION_COOKIE)
        return response

    @app.exception_handler(Forbidden)
    async def on_forbidden(request: Request, exc: Forbidden) -> Response:
        return error_page(request, 403, exc.message)

    @app.exception_handler(LabelingError)
    async def on_labeling_error(request: Request, exc: LabelingError) -> Response:
        return error_page(request, STATUS_FOR.get(type(exc), 400), str(exc))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("path", "query"))
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        return error_page(request, 422, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_page(request, exc.status_code, str(exc.detail))

    return app
