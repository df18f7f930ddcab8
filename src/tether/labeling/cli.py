"""``tether label serve | add-user | create-project | export | progress``: the human labeling app.

The web stack (SQLAlchemy, the store, FastAPI, uvicorn: the ``labeling`` extra) is imported
inside the handlers, so ``tether --help`` and the training commands never load it.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether.config import add_renamed_flag
from tether.data.formats import write_records

if TYPE_CHECKING:  # the web stack is imported inside the handlers, never by `tether --help`
    from tether.labeling.store import LabelStore

DEFAULT_DB = "sqlite:///labeling.db"


def _db(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db",
        default=DEFAULT_DB,
        help=f"SQLAlchemy URL: a SQLite file or postgresql+psycopg://... (default {DEFAULT_DB})",
    )


def _password(env_name: str, prompt: str) -> str:
    """A password from the environment (never argv: it would show in `ps` and shell history)."""

    value = os.environ.get(env_name)
    if value:
        return value
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    raise ValueError(f"set the password in ${env_name} (or run in a terminal to be asked)")


def _store(args: argparse.Namespace, **options: Any) -> LabelStore:
    """The store at ``--db``; a URL that names no database, or one that cannot be opened, is a
    one-line error (exit 2), not a SQLAlchemy traceback."""
    from sqlalchemy.exc import ArgumentError, DBAPIError

    from tether.labeling.store import LabelStore

    try:
        return LabelStore(args.db, **options)
    except ArgumentError as e:  # an unknown dialect or a malformed URL
        raise ValueError(f"--db {args.db}: not a database URL ({e})") from None
    except DBAPIError as e:  # the driver could not open or create it
        reason = " ".join(str(e.orig).split())
        raise ValueError(f"--db {_shown(args.db)}: cannot open the database ({reason})") from None


def _shown(url: str) -> str:
    """The URL with any password masked, for messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tether.labeling.app import create_app
    from tether.labeling.store import Conflict

    store = _store(
        args,
        session_ttl=timedelta(hours=args.session_hours),
        lease=timedelta(minutes=args.lease_minutes),
    )
    if args.admin_user:
        try:
            store.add_user(
                args.admin_user,
                _password(args.admin_password_env, f"Password for {args.admin_user}: "),
                "admin",
            )
            print(f"created admin {args.admin_user!r}")
        except Conflict:
            pass  # already there: keep its password
    if not any(u.role == "admin" and u.active for u in store.list_users()):
        print("warning: no admin yet; create one with `tether label add-user --role admin`")
    app = create_app(store, secure_cookies=args.secure_cookies)
    print(f"tether labeling on http://{args.host}:{args.port} (database {_shown(args.db)})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    store.close()
    return 0


def cmd_add_user(args: argparse.Namespace) -> int:
    from tether.labeling.store import LabelingError

    store = _store(args)
    try:
        password = _password(args.password_env, f"Password for {args.username}: ")
        user = store.add_user(args.username, password, args.role)
    except LabelingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"added {user.role} {user.username!r} (id {user.id})")
    return 0


def cmd_create_project(args: argparse.Namespace) -> int:
    from tether.labeling.store import LabelingError

    kind, path = ("ranking", args.samples) if args.samples else ("demonstration", args.prompts)
    store = _store(args)
    try:
        pid = store.create_project_from_file(args.name or Path(path).stem, kind, path, overlap=args.overlap)
    except LabelingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p = store.progress(pid)[0]
    print(f"project {p.name!r} (id {p.id}): {p.tasks} {kind} tasks, overlap {p.overlap}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tether.labeling.store import LabelingError

    store = _store(args)
    try:
        result = store.export(store.find_project(args.project))
    except LabelingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = write_records(args.out, result.records)
    summary_path = Path(args.summary) if args.summary else out.with_suffix(".summary.json")
    summary_path.write_text(json.dumps(result.summary, indent=2, ensure_ascii=False) + "\n")
    s = result.summary
    rate = s["agreement"]["rate"]
    pairs = s["agreement"]["pairs"]
    agreement = "n/a" if rate is None else f"{100 * rate:.1f} % over {pairs} pairs"
    print(
        f"wrote {s['exported']} {s['format']} records to {out} "
        f"(excluded: {s['excluded_all_tie']} all-tie, {s['none_acceptable']} none acceptable; "
        f"{s['skipped']} skips); agreement {agreement}; summary in {summary_path}"
    )
    return 0


def cmd_progress(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = store.progress()
    if not rows:
        print("no projects")
    for p in rows:
        state = "active" if p.active else "paused"
        print(
            f"{p.id:>4}  {p.name:<30} {p.kind:<13} {p.done:>6}/{p.slots:<6} labels "
            f"({p.percent:5.1f} %)  {p.complete_tasks}/{p.tasks} tasks complete  {state}"
        )
    return 0


def add_label_commands(label_sub: argparse._SubParsersAction) -> None:
    """Add the human labeling app's subcommands to ``tether label``."""
    p = label_sub.add_parser("serve", help="run the labeling web app")
    _db(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--admin-user", help="create this admin on start if missing")
    p.add_argument(
        "--admin-password-env",
        default="TETHER_ADMIN_PASSWORD",
        help="environment variable holding --admin-user's password",
    )
    p.add_argument("--secure-cookies", action="store_true", help="mark cookies Secure (serving over HTTPS)")
    p.add_argument("--session-hours", type=float, default=12.0, help="login lifetime")
    p.add_argument(
        "--lease-minutes",
        type=float,
        default=120.0,
        help="how long a task stays reserved for the labeler it was handed to",
    )
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)

    p = label_sub.add_parser("add-user", help="add a labeler or admin to the labeling database")
    _db(p)
    p.add_argument("username")
    p.add_argument("--role", choices=("labeler", "admin"), default="labeler")
    p.add_argument(
        "--password-env",
        default="TETHER_PASSWORD",
        help="environment variable holding the password (asked for in a terminal if unset)",
    )
    p.set_defaults(func=cmd_add_user)

    p = label_sub.add_parser("create-project", help="create a labeling project from a sample or prompt file")
    _db(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--samples-file", dest="samples", metavar="FILE", help="sample JSONL (from `tether sample`): a ranking project"
    )
    src.add_argument("--samples", dest="samples", help=argparse.SUPPRESS)  # the former spelling
    src.add_argument(
        "--prompts-file", dest="prompts", metavar="FILE", help="prompt JSONL: a demonstration-writing project"
    )
    src.add_argument("--prompts", dest="prompts", help=argparse.SUPPRESS)  # the former spelling
    p.add_argument("--name", help="project name (default: the file's stem)")
    p.add_argument("--overlap", type=int, default=1, help="labelers per task")
    p.set_defaults(func=cmd_create_project)

    p = label_sub.add_parser("export", help="write a project's comparisons / demonstrations JSONL and a summary")
    _db(p)
    p.add_argument("--project", required=True, help="project name or id")
    add_renamed_flag(p, "--out-file", "--out", dest="out", required=True, help="output JSONL path")
    p.add_argument("--summary", help="summary JSON path (default: OUT with .summary.json)")
    p.set_defaults(func=cmd_export)

    p = label_sub.add_parser("progress", help="print every project's labeling progress")
    _db(p)
    p.set_defaults(func=cmd_progress)
