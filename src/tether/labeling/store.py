"""The labeling database: users, sessions, projects, the task queue, labels and export.

One SQLAlchemy schema serves SQLite (the default, a file) and PostgreSQL (any SQLAlchemy URL).
Every rule that must hold under concurrency is a constraint in the database, not a check in
Python, so two racing requests cannot both win:

- ``unique(task_id, labeler_id)`` on assignments: a labeler is never given, and never labels,
  the same task twice;
- ``unique(task_id, slot)`` on assignments, slots numbered ``0..overlap-1``: a task never has
  more live assignments than its project's overlap;
- ``unique(assignment_id)`` on labels: one submission per assignment, and submitting flips the
  assignment ``open -> done`` with a conditional UPDATE, so a duplicate POST finds nothing open.

A label is acknowledged only after its transaction commits; SQLite runs in WAL mode with
``synchronous=FULL``, so a committed label survives a crash or restart of the server.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, cast

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    exists,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.sql.dml import Update

from tether.data.agreement import AgreementReport, agreement_of
from tether.data.formats import (
    FLAGS,
    LIKERT_MAX,
    LIKERT_MIN,
    Comparison,
    Conversation,
    Demonstration,
    Prompt,
    Sample,
    Turn,
    read_records,
)

Role = Literal["admin", "labeler"]
ROLES: tuple[str, ...] = ("admin", "labeler")
ProjectKind = Literal["ranking", "demonstration"]
PROJECT_KINDS: tuple[str, ...] = ("ranking", "demonstration")

# Assignment life cycle. `open` and `done` hold a slot; `skipped` and `expired` give it back but
# keep the row, so the labeler is never handed that task again.
OPEN, DONE, SKIPPED, EXPIRED = "open", "done", "skipped", "expired"
# What a finished assignment holds. `none_acceptable` fills its slot (it is a judgment) but is
# not a comparison.
RANKED, NONE_ACCEPTABLE, DEMONSTRATED = "ranked", "none_acceptable", "demonstration"

USERNAME_MAX = 64
PASSWORD_MIN = 8
RESPONSE_MAX_CHARS = 20_000
# Claiming a slot can lose a race on PostgreSQL (unique violation); retry a few times.
_CLAIM_RETRIES = 10


class _LostRace(Exception):
    """Another transaction took what this one was about to take; retry from the start."""


def _retryable(e: Exception) -> bool:
    """Unique violations (a slot taken under us), deadlocks and serialization failures."""
    if isinstance(e, IntegrityError | _LostRace):
        return True
    return getattr(getattr(e, "orig", None), "sqlstate", None) in ("40001", "40P01")


def _backoff(attempt: int) -> None:
    """Jittered wait before a retry, so racing transactions stop meeting in lockstep."""
    time.sleep(random.uniform(0, 0.005 * 2**attempt))


def utcnow() -> datetime:
    """Naive UTC: SQLite keeps no time zone, so every timestamp is stored as naive UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


# ---------------------------------------------------------------------------------------------
# Errors: each maps to one HTTP status in the app.


class LabelingError(Exception):
    """Base class; ``str(e)`` is a message meant for the person who caused it."""


class NotFound(LabelingError):
    pass


class NotAssigned(LabelingError):
    """The task exists but is not this labeler's to label."""


class AlreadyDone(LabelingError):
    """A duplicate submission, or a submission for a task the labeler already skipped."""


class Conflict(LabelingError):
    """A name already taken, or a task that filled up while the labeler's lease had lapsed."""


class InvalidInput(LabelingError):
    """Bad input; ``field`` names the form field or argument that is wrong."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        self.message = message
        super().__init__(f"{field_name}: {message}")


# ---------------------------------------------------------------------------------------------
# Schema


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(USERNAME_MAX), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class LoginSession(Base):
    """A login. The cookie holds a random token; only its SHA-256 is stored."""

    __tablename__ = "sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    overlap: Mapped[int] = mapped_column(Integer)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    source: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)


def _rowcount(s: Session, statement: Update) -> int:
    """Rows an UPDATE changed (a Session returns a CursorResult for one; its type says Result)."""
    return cast(CursorResult, s.execute(statement)).rowcount


def _add_missing_columns(engine: Engine) -> None:
    """Add the nullable columns a newer tether defines to the tables of an older database.

    ``create_all`` creates missing tables but never alters existing ones; every column added
    since a table's creation is nullable, so adding it keeps every existing row valid.
    """
    inspector = inspect(engine)
    for table in Base.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                kind = column.type.compile(dialect=engine.dialect)
                with engine.begin() as conn:
                    conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


class Task(Base):
    """One prompt (demonstration projects) or one prompt with K responses (ranking projects)."""

    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("project_id", "position"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    # Text, not VARCHAR(n): ids and categories come from user files, and PostgreSQL would
    # reject an over-long one where SQLite silently accepts it.
    prompt_id: Mapped[str | None] = mapped_column(Text)
    responses: Mapped[list[str] | None] = mapped_column(JSON)
    policies: Mapped[list[str] | None] = mapped_column(JSON)
    user_id: Mapped[str | None] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(Text)
    # Per response: it ended with EOS (None: all did). Carried into the exported comparisons so
    # the reward model trains on a cut-off sample as cut off.
    ended: Mapped[list[bool] | None] = mapped_column(JSON)
    # A conversation prompt's turns ([{role, content}]; None for a plain prompt): ``prompt`` holds
    # them as plain text, these are what the labeler is shown and what the export hands back.
    turns: Mapped[list[dict[str, str]] | None] = mapped_column(JSON)

    @property
    def full_prompt(self) -> str:
        """The prompt as the records had it: a Conversation when it has turns."""
        return Conversation(Turn(t["role"], t["content"]) for t in self.turns) if self.turns else self.prompt


def _turns(prompt: str) -> list[dict[str, str]] | None:
    return prompt.messages() if isinstance(prompt, Conversation) else None


class Assignment(Base):
    """A task handed to one labeler: holds one of the task's ``overlap`` slots while live."""

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("task_id", "labeler_id"),
        # NULL slots (skipped, expired) never collide: NULLs are distinct in unique constraints
        # on both SQLite and PostgreSQL.
        UniqueConstraint("task_id", "slot"),
        Index("ix_assignments_labeler_status", "labeler_id", "status"),
        Index("ix_assignments_status_expires", "status", "expires_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    labeler_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    slot: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    # display_order[i] = index (in task.responses) of the response shown in position i.
    display_order: Mapped[list[int] | None] = mapped_column(JSON)
    assigned_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime)


class Label(Base):
    """What a labeler submitted, in the task's original response order."""

    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"), unique=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    outcome: Mapped[str] = mapped_column(String(20))
    ranking: Mapped[list[int] | None] = mapped_column(JSON)
    likert: Mapped[list[int] | None] = mapped_column(JSON)
    flags: Mapped[list[list[str]] | None] = mapped_column(JSON)
    response: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)


# ---------------------------------------------------------------------------------------------
# Plain records handed to the web app and the CLI (never live ORM objects).


@dataclass(frozen=True)
class UserInfo:
    id: int
    username: str
    role: str
    active: bool


@dataclass(frozen=True)
class SessionInfo:
    user: UserInfo
    csrf_token: str
    expires_at: datetime


@dataclass(frozen=True)
class TaskView:
    """A task as one labeler sees it: responses already in that labeler's display order."""

    task_id: int
    project_id: int
    project_name: str
    kind: str
    prompt: str
    responses: list[str]  # display order; [] for demonstration tasks
    category: str | None
    turns: list[dict[str, str]] | None = None  # a conversation prompt: its turns, the last one the user's


@dataclass(frozen=True)
class LabelInput:
    """A ranking submission in display order (what the labeler saw), validated by the caller."""

    ranking: list[int] | None = None  # [K], 1 = best, equal = tie
    likert: list[int] | None = None  # [K], 1..7
    flags: list[list[str]] | None = None  # [K], names from FLAGS that apply


@dataclass
class ProjectProgress:
    id: int
    name: str
    kind: str
    overlap: int
    active: bool
    source: str | None
    tasks: int
    slots: int  # tasks × overlap
    done: int  # slots holding a finished label (ranked, none acceptable or demonstration)
    in_progress: int  # slots held by open assignments
    complete_tasks: int  # tasks with `overlap` finished labels
    ranked: int
    none_acceptable: int
    demonstrations: int
    skipped: int
    by_labeler: dict[str, int] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.slots if self.slots else 0.0


@dataclass
class ExportResult:
    kind: str
    records: list[Comparison] | list[Demonstration]
    summary: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Pure functions


def dense_ranking(ranks: Sequence[int]) -> list[int]:
    """Renumber ranks 1, 2, ... keeping order and ties: [1, 3, 3, 4] -> [1, 2, 2, 3]."""
    order = {r: i + 1 for i, r in enumerate(sorted(set(ranks)))}
    return [order[r] for r in ranks]


def validate_label(k: int, label: LabelInput) -> None:
    """Check a ranking submission for K responses; raises InvalidInput naming the field."""
    if label.ranking is None:
        raise InvalidInput("ranking", "is missing")
    if len(label.ranking) != k:
        raise InvalidInput("ranking", f"has {len(label.ranking)} ranks for {k} responses")
    for i, r in enumerate(label.ranking):
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= k:
            raise InvalidInput(f"ranking[{i}]", f"must be an integer 1..{k} (1 = best)")
    if label.likert is not None:
        if len(label.likert) != k:
            raise InvalidInput("likert", f"has {len(label.likert)} scores for {k} responses")
        for i, s in enumerate(label.likert):
            if isinstance(s, bool) or not isinstance(s, int) or not LIKERT_MIN <= s <= LIKERT_MAX:
                raise InvalidInput(f"likert[{i}]", f"must be an integer {LIKERT_MIN}..{LIKERT_MAX}")
    if label.flags is not None:
        if len(label.flags) != k:
            raise InvalidInput("flags", f"has {len(label.flags)} entries for {k} responses")
        for i, names in enumerate(label.flags):
            for name in names:
                if name not in FLAGS:
                    raise InvalidInput(f"flags[{i}]", f"unknown flag {name!r}")


def _check_no_nul(record: Sample | Prompt, where: str) -> None:
    """PostgreSQL text cannot hold NUL (SQLite can): refuse it up front on every backend."""
    for name, value in vars(record).items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and "\x00" in v for v in values):
            raise InvalidInput(name, f"{where} holds a NUL character")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _user_info(u: User) -> UserInfo:
    return UserInfo(u.id, u.username, u.role, u.active)


def _reorder(values: Sequence[Any] | None, display_order: Sequence[int]) -> list[Any] | None:
    """Values given in display order -> values in the task's original response order."""
    if values is None:
        return None
    out: list[Any] = [None] * len(display_order)
    for shown, original in enumerate(display_order):
        out[original] = values[shown]
    return out


# ---------------------------------------------------------------------------------------------
# The store


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, full fsync, foreign keys and explicit BEGINs."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    if url in ("sqlite://", "sqlite:///:memory:"):
        raise ValueError("an in-memory SQLite database is lost on restart; give a file path")
    engine = create_engine(url, connect_args={"timeout": 30}, pool_size=10, max_overflow=20)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's BEGIN below, not the sqlite3 module, open transactions.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")  # a commit is on disk before we acknowledge
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Write transactions take the write lock up front (BEGIN IMMEDIATE). A deferred one that
        # reads then writes fails with SQLITE_BUSY, without waiting, when another writer
        # committed in between; taking the lock first makes writers queue on busy_timeout.
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


class LabelStore:
    """All reads and writes of the labeling app; safe to share between threads.

    ``hasher`` is an argon2 ``PasswordHasher`` (tests pass a cheap one). ``now`` is the clock,
    injectable so tests can expire sessions and leases.
    """

    def __init__(
        self,
        url: str,
        *,
        hasher: Any = None,
        now: Callable[[], datetime] = utcnow,
        session_ttl: timedelta = timedelta(hours=12),
        lease: timedelta = timedelta(hours=2),
        hash_concurrency: int = 2,
    ):

        self.url = url
        self.engine = make_engine(url)
        self._write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        self.hasher = hasher or PasswordHasher()
        self.now = now
        self.session_ttl = session_ttl
        self.lease = lease
        # argon2 is memory-hard (64 MiB per hash by default): bound how many run at once so a
        # burst of logins cannot exhaust the server's memory.
        self._hash_slots = threading.BoundedSemaphore(hash_concurrency)
        self._dummy_hash: str | None = None
        Base.metadata.create_all(self.engine)
        _add_missing_columns(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with Session(self._write_engine, expire_on_commit=False) as s, s.begin():
            yield s

    # -- users and passwords -------------------------------------------------------------------

    def _hash(self, password: str) -> str:
        with self._hash_slots:
            return self.hasher.hash(password)

    def _verify(self, password_hash: str, password: str) -> bool:
        with self._hash_slots:
            try:
                return bool(self.hasher.verify(password_hash, password))
            except (VerificationError, InvalidHashError):
                return False

    @staticmethod
    def _check_credentials(username: str, password: str | None) -> None:
        if not username or len(username) > USERNAME_MAX:
            raise InvalidInput("username", f"must be 1..{USERNAME_MAX} characters")
        if not all(c.isalnum() or c in "._-@" for c in username):
            raise InvalidInput("username", "may hold only letters, digits and . _ - @")
        if password is not None and len(password) < PASSWORD_MIN:
            raise InvalidInput("password", f"must be at least {PASSWORD_MIN} characters")

    def add_user(self, username: str, password: str, role: str = "labeler") -> UserInfo:
        if role not in ROLES:
            raise InvalidInput("role", f"must be one of {', '.join(ROLES)}")
        self._check_credentials(username, password)
        password_hash = self._hash(password)
        try:
            with self._write() as s:
                user = User(
                    username=username,
                    password_hash=password_hash,
                    role=role,
                    active=True,
                    created_at=self.now(),
                )
                s.add(user)
                s.flush()
                return _user_info(user)
        except IntegrityError:
            raise Conflict(f"user {username!r} already exists") from None

    def list_users(self) -> list[UserInfo]:
        with self._read() as s:
            return [_user_info(u) for u in s.scalars(select(User).order_by(User.username))]

    def get_user(self, user_id: int) -> UserInfo:
        with self._read() as s:
            user = s.get(User, user_id)
            if user is None:
                raise NotFound(f"no user {user_id}")
            return _user_info(user)

    def set_password(self, user_id: int, password: str) -> None:
        if len(password) < PASSWORD_MIN:
            raise InvalidInput("password", f"must be at least {PASSWORD_MIN} characters")
        password_hash = self._hash(password)
        with self._write() as s:
            user = s.get(User, user_id)
            if user is None:
                raise NotFound(f"no user {user_id}")
            user.password_hash = password_hash
            # A new password ends every existing login of that user.
            s.execute(delete(LoginSession).where(LoginSession.user_id == user_id))

    def set_active(self, user_id: int, active: bool) -> None:
        """Deactivating ends the user's sessions and hands their open tasks back to the queue."""
        with self._write() as s:
            user = s.get(User, user_id)
            if user is None:
                raise NotFound(f"no user {user_id}")
            user.active = active
            if not active:
                s.execute(delete(LoginSession).where(LoginSession.user_id == user_id))
                s.execute(
                    update(Assignment)
                    .where(Assignment.labeler_id == user_id, Assignment.status == OPEN)
                    .values(status=EXPIRED, slot=None)
                )

    def authenticate(self, username: str, password: str) -> UserInfo | None:
        with self._read() as s:
            user = s.scalar(select(User).where(User.username == username))
            info = _user_info(user) if user else None
            stored = user.password_hash if user else None
        if stored is None:
            # Spend the same time as a real check so response times do not reveal usernames.
            if self._dummy_hash is None:
                self._dummy_hash = self._hash(secrets.token_hex(8))
            self._verify(self._dummy_hash, password)
            return None
        if not self._verify(stored, password) or info is None or not info.active:
            return None
        return info

    # -- sessions ------------------------------------------------------------------------------

    def create_session(self, user_id: int) -> tuple[str, SessionInfo]:
        """A new login for ``user_id``: (cookie token, session)."""
        token = secrets.token_urlsafe(32)
        now = self.now()
        with self._write() as s:
            # Opportunistic cleanup keeps the table from growing without bound.
            s.execute(delete(LoginSession).where(LoginSession.expires_at < now))
            user = s.get(User, user_id)
            if user is None or not user.active:
                raise NotFound(f"no active user {user_id}")
            row = LoginSession(
                token_hash=_token_hash(token),
                user_id=user_id,
                csrf_token=secrets.token_urlsafe(32),
                created_at=now,
                expires_at=now + self.session_ttl,
            )
            s.add(row)
            return token, SessionInfo(_user_info(user), row.csrf_token, row.expires_at)

    def get_session(self, token: str) -> SessionInfo | None:
        """The live session for a cookie token; None if unknown, expired or the user is inactive."""
        with self._read() as s:
            row = s.execute(
                select(LoginSession, User)
                .join(User, User.id == LoginSession.user_id)
                .where(LoginSession.token_hash == _token_hash(token))
            ).first()
            if row is None:
                return None
            sess, user = row
            if sess.expires_at <= self.now() or not user.active:
                return None
            return SessionInfo(_user_info(user), sess.csrf_token, sess.expires_at)

    def delete_session(self, token: str) -> None:
        with self._write() as s:
            s.execute(delete(LoginSession).where(LoginSession.token_hash == _token_hash(token)))

    # -- projects ------------------------------------------------------------------------------

    def create_project(
        self,
        name: str,
        kind: str,
        records: Sequence[Sample] | Sequence[Prompt],
        *,
        overlap: int = 1,
        source: str | None = None,
    ) -> int:
        """A project from samples (ranking) or prompts (demonstration); returns its id."""
        name = name.strip()
        if not name or len(name) > 200:
            raise InvalidInput("name", "must be 1..200 characters")
        if kind not in PROJECT_KINDS:
            raise InvalidInput("kind", f"must be one of {', '.join(PROJECT_KINDS)}")
        if not isinstance(overlap, int) or not 1 <= overlap <= 100:
            raise InvalidInput("overlap", "must be an integer 1..100")
        if not records:
            raise InvalidInput("records", "the file holds no records")
        want = Sample if kind == "ranking" else Prompt
        for i, r in enumerate(records):
            if not isinstance(r, want):
                raise InvalidInput("records", f"record {i + 1} is not a {want.__name__}")
            _check_no_nul(r, f"record {i + 1}")
        if "\x00" in name:
            raise InvalidInput("name", "holds a NUL character")
        try:
            with self._write() as s:
                project = Project(
                    name=name,
                    kind=kind,
                    overlap=overlap,
                    active=True,
                    source=source,
                    created_at=self.now(),
                )
                s.add(project)
                s.flush()
                for position, r in enumerate(records):
                    if isinstance(r, Sample):
                        task = Task(
                            project_id=project.id,
                            position=position,
                            prompt=r.prompt,
                            turns=_turns(r.prompt),
                            prompt_id=r.prompt_id,
                            responses=list(r.responses),
                            policies=list(r.policies) if r.policies else None,
                            user_id=r.user_id,
                            category=r.category,
                            ended=list(r.ended) if r.ended is not None else None,
                        )
                    else:
                        assert isinstance(r, Prompt)  # checked above
                        task = Task(
                            project_id=project.id,
                            position=position,
                            prompt=r.text,
                            turns=_turns(r.text),
                            prompt_id=r.id,
                            user_id=r.user_id,
                            category=r.category,
                        )
                    s.add(task)
                return project.id
        except IntegrityError:
            raise Conflict(f"a project named {name!r} already exists") from None

    def create_project_from_file(self, name: str, kind: str, path: str | Path, *, overlap: int = 1) -> int:
        """Read a sample file (ranking) or prompt file (demonstration) whole, then create."""
        if kind not in PROJECT_KINDS:
            raise InvalidInput("kind", f"must be one of {', '.join(PROJECT_KINDS)}")
        records = read_records(path, "sample" if kind == "ranking" else "prompt")
        return self.create_project(name, kind, records, overlap=overlap, source=Path(path).name)

    def update_project(self, project_id: int, *, overlap: int | None = None, active: bool | None = None) -> None:
        """Change overlap or pause a project. Lowering overlap never deletes labels."""
        if overlap is not None and not 1 <= overlap <= 100:
            raise InvalidInput("overlap", "must be an integer 1..100")
        with self._write() as s:
            project = s.get(Project, project_id)
            if project is None:
                raise NotFound(f"no project {project_id}")
            if overlap is not None:
                project.overlap = overlap
            if active is not None:
                project.active = active

    def find_project(self, name_or_id: str) -> int:
        with self._read() as s:
            if name_or_id.isdigit() and s.get(Project, int(name_or_id)) is not None:
                return int(name_or_id)
            pid = s.scalar(select(Project.id).where(Project.name == name_or_id))
            if pid is None:
                raise NotFound(f"no project named {name_or_id!r}")
            return pid

    def progress(self, project_id: int | None = None) -> list[ProjectProgress]:
        """Progress of one project or all of them (newest first)."""
        with self._read() as s:
            q = select(Project).order_by(Project.id.desc())
            if project_id is not None:
                q = q.where(Project.id == project_id)
            projects = list(s.scalars(q))
            if project_id is not None and not projects:
                raise NotFound(f"no project {project_id}")
            out = []
            for p in projects:
                n_tasks = s.scalar(select(func.count()).where(Task.project_id == p.id)) or 0
                status_counts = dict(
                    s.execute(
                        select(Assignment.status, func.count())
                        .join(Task, Task.id == Assignment.task_id)
                        .where(Task.project_id == p.id)
                        .group_by(Assignment.status)
                    ).all()
                )
                outcome_counts = dict(
                    s.execute(
                        select(Label.outcome, func.count())
                        .join(Task, Task.id == Label.task_id)
                        .where(Task.project_id == p.id)
                        .group_by(Label.outcome)
                    ).all()
                )
                per_task = (
                    select(Label.task_id, func.count().label("n"))
                    .join(Task, Task.id == Label.task_id)
                    .where(Task.project_id == p.id)
                    .group_by(Label.task_id)
                    .subquery()
                )
                complete = s.scalar(select(func.count()).select_from(per_task).where(per_task.c.n >= p.overlap))
                by_labeler = dict(
                    s.execute(
                        select(User.username, func.count())
                        .join(Label, Label.labeler_id == User.id)
                        .join(Task, Task.id == Label.task_id)
                        .where(Task.project_id == p.id)
                        .group_by(User.username)
                        .order_by(User.username)
                    ).all()
                )
                out.append(
                    ProjectProgress(
                        id=p.id,
                        name=p.name,
                        kind=p.kind,
                        overlap=p.overlap,
                        active=p.active,
                        source=p.source,
                        tasks=n_tasks,
                        slots=n_tasks * p.overlap,
                        done=status_counts.get(DONE, 0),
                        in_progress=status_counts.get(OPEN, 0),
                        complete_tasks=complete or 0,
                        ranked=outcome_counts.get(RANKED, 0),
                        none_acceptable=outcome_counts.get(NONE_ACCEPTABLE, 0),
                        demonstrations=outcome_counts.get(DEMONSTRATED, 0),
                        skipped=status_counts.get(SKIPPED, 0),
                        by_labeler=by_labeler,
                    )
                )
            return out

    def available(self, labeler_id: int) -> dict[int, int]:
        """{project id: tasks this labeler could still be given} over active projects."""
        with self._read() as s:
            held = self._held_count()
            mine = self._mine(labeler_id)
            rows = s.execute(
                select(Task.project_id, func.count())
                .join(Project, Project.id == Task.project_id)
                .where(Project.active, ~mine, held < Project.overlap)
                .group_by(Task.project_id)
            ).all()
            return {pid: n for pid, n in rows}

    # -- the queue -----------------------------------------------------------------------------

    @staticmethod
    def _held_count() -> Any:
        """Correlated count of the slots a task's live assignments hold."""
        return (
            select(func.count())
            .where(Assignment.task_id == Task.id, Assignment.slot.is_not(None))
            .correlate(Task)
            .scalar_subquery()
        )

    @staticmethod
    def _mine(labeler_id: int) -> Any:
        return exists().where(Assignment.task_id == Task.id, Assignment.labeler_id == labeler_id).correlate(Task)

    def next_task(self, labeler_id: int, project_id: int) -> int | None:
        """The task this labeler should do next in a project (claiming a slot), or None.

        An open assignment of the labeler's is resumed first. Otherwise the labeler gets a task
        they have never been given whose live assignments fill fewer slots than the overlap,
        preferring tasks others have started (so overlapping labels complete and agreement can
        be measured early), then file order.
        """
        for attempt in range(_CLAIM_RETRIES):
            try:
                with self._write() as s:
                    return self._claim(s, labeler_id, project_id)
            except (IntegrityError, _LostRace, OperationalError) as e:
                # Another labeler took the same slot between our read and insert (PostgreSQL
                # at READ COMMITTED; SQLite serialises writers). Nothing was written: try again.
                if not _retryable(e):
                    raise
                _backoff(attempt)
        raise Conflict("the queue is very busy; try again")

    def _claim(self, s: Session, labeler_id: int, project_id: int) -> int | None:
        now = self.now()
        project = s.get(Project, project_id)
        if project is None:
            raise NotFound(f"no project {project_id}")
        if not project.active:
            raise Conflict(f"project {project.name!r} is paused")
        # Lapsed leases give their slot back (the row stays: that labeler won't get it again).
        s.execute(
            update(Assignment)
            .where(Assignment.status == OPEN, Assignment.expires_at < now)
            .values(status=EXPIRED, slot=None)
        )
        resumed = s.scalar(
            select(Assignment.task_id)
            .join(Task, Task.id == Assignment.task_id)
            .where(
                Assignment.labeler_id == labeler_id,
                Assignment.status == OPEN,
                Task.project_id == project_id,
            )
            .order_by(Assignment.id)
            .limit(1)
        )
        if resumed is not None:
            return resumed
        held = self._held_count()
        open_tasks = (
            select(Task.id, Task.responses)
            .where(
                Task.project_id == project_id,
                ~self._mine(labeler_id),
                held < project.overlap,
            )
            .order_by(held.desc(), Task.position)
            .limit(1)
        )
        # PostgreSQL: lock the chosen task until commit and let concurrent claimers pass over it
        # to the next one instead of colliding on its slots. (SQLite renders nothing here:
        # BEGIN IMMEDIATE already serialises claims.)
        row = s.execute(open_tasks.with_for_update(of=Task, skip_locked=True)).first()
        if row is None and self.engine.dialect.name != "sqlite":
            # Nothing unlocked: every open task may be one another claim holds right now. Wait for
            # those locks rather than tell this labeler the queue is empty while a slot is free.
            # (SQLite has no row locks: the query above already saw every task.)
            row = s.execute(open_tasks.with_for_update(of=Task)).first()
        if row is None:
            return None
        task_id, responses = row
        used = set(
            s.scalars(select(Assignment.slot).where(Assignment.task_id == task_id, Assignment.slot.is_not(None)))
        )
        free = set(range(project.overlap)) - used
        if not free:
            raise _LostRace  # filled since the query above (READ COMMITTED: new snapshot)
        slot = min(free)
        order = None
        if responses:
            order = list(range(len(responses)))
            random.SystemRandom().shuffle(order)
        s.add(
            Assignment(
                task_id=task_id,
                labeler_id=labeler_id,
                slot=slot,
                status=OPEN,
                display_order=order,
                assigned_at=now,
                expires_at=now + self.lease,
            )
        )
        s.flush()  # raises IntegrityError here, inside the retry loop, if we lost a race
        return task_id

    def _assignment(self, s: Session, labeler_id: int, task_id: int) -> tuple[Task, Assignment]:
        task = s.get(Task, task_id)
        if task is None:
            raise NotFound(f"no task {task_id}")
        a = s.scalar(select(Assignment).where(Assignment.task_id == task_id, Assignment.labeler_id == labeler_id))
        if a is None:
            raise NotAssigned(f"task {task_id} is not assigned to you")
        return task, a

    def task_view(self, labeler_id: int, task_id: int) -> TaskView:
        """The task as this labeler sees it; raises unless it is their open assignment."""
        with self._read() as s:
            task, a = self._assignment(s, labeler_id, task_id)
            if a.status == DONE:
                raise AlreadyDone(f"you already submitted task {task_id}")
            if a.status == SKIPPED:
                raise AlreadyDone(f"you skipped task {task_id}")
            project = s.get(Project, task.project_id)
            assert project is not None
            responses: list[str] = []
            if task.responses:
                assert a.display_order is not None  # every assignment of a ranking task has one
                responses = [task.responses[i] for i in a.display_order]
            return TaskView(
                task_id=task.id,
                project_id=project.id,
                project_name=project.name,
                kind=project.kind,
                prompt=task.prompt,
                responses=responses,
                category=task.category,
                turns=task.turns,
            )

    def _finish(self, s: Session, task: Task, a: Assignment, status: str) -> None:
        """Flip the assignment to ``status`` exactly once, even against a racing request."""
        if a.status == OPEN:
            n = _rowcount(
                s,
                update(Assignment)
                .where(Assignment.id == a.id, Assignment.status == OPEN)
                .values(status=status, slot=a.slot if status == DONE else None)
                .execution_options(synchronize_session=False),
            )
            if n == 1:
                return
            s.refresh(a)
        if a.status == DONE:
            raise AlreadyDone(f"task {task.id} was already submitted")
        if a.status == SKIPPED:
            raise AlreadyDone(f"you skipped task {task.id}")
        if a.status == EXPIRED and status == DONE:
            # The lease lapsed and its slot went back to the queue; take a free slot if one is
            # left rather than throw the labeler's work away.
            project = s.get(Project, task.project_id)
            assert project is not None
            used = set(
                s.scalars(select(Assignment.slot).where(Assignment.task_id == task.id, Assignment.slot.is_not(None)))
            )
            free = set(range(project.overlap)) - used
            if len(used) >= project.overlap or not free:
                raise Conflict(f"your reservation of task {task.id} expired and other labelers filled it")
            n = _rowcount(
                s,
                update(Assignment)
                .where(Assignment.id == a.id, Assignment.status == EXPIRED)
                .values(status=DONE, slot=min(free))
                .execution_options(synchronize_session=False),
            )
            if n != 1:
                raise AlreadyDone(f"task {task.id} was already submitted")
            return
        if a.status == EXPIRED:
            return  # skipping a lapsed task: nothing to give back
        raise AlreadyDone(f"task {task.id} is {a.status}")

    def submit_ranking(self, labeler_id: int, task_id: int, label: LabelInput) -> int:
        """Store a ranking given in the labeler's display order; returns the label id."""
        for attempt in range(_CLAIM_RETRIES):
            try:
                with self._write() as s:
                    task, a = self._assignment(s, labeler_id, task_id)
                    if not task.responses or a.display_order is None:
                        raise InvalidInput("task", f"task {task_id} asks for a demonstration")
                    validate_label(len(task.responses), label)
                    assert label.ranking is not None
                    self._finish(s, task, a, DONE)
                    row = Label(
                        assignment_id=a.id,
                        task_id=task.id,
                        labeler_id=labeler_id,
                        outcome=RANKED,
                        ranking=_reorder(dense_ranking(label.ranking), a.display_order),
                        likert=_reorder(label.likert, a.display_order),
                        flags=_reorder(label.flags, a.display_order),
                        created_at=self.now(),
                    )
                    s.add(row)
                    s.flush()
                    return row.id
            except (IntegrityError, OperationalError) as e:
                if not _retryable(e):
                    raise
                _backoff(attempt)  # lost a race for a freed slot (PostgreSQL): look again
        raise Conflict("the queue is very busy; try again")

    def submit_none_acceptable(self, labeler_id: int, task_id: int, label: LabelInput | None = None) -> int:
        """Record that no response is acceptable (Likert and flags kept if given)."""
        label = label or LabelInput()
        with self._write() as s:
            task, a = self._assignment(s, labeler_id, task_id)
            if not task.responses or a.display_order is None:
                raise InvalidInput("task", f"task {task_id} asks for a demonstration")
            k = len(task.responses)
            validate_label(k, LabelInput(ranking=[1] * k, likert=label.likert, flags=label.flags))
            self._finish(s, task, a, DONE)
            row = Label(
                assignment_id=a.id,
                task_id=task.id,
                labeler_id=labeler_id,
                outcome=NONE_ACCEPTABLE,
                likert=_reorder(label.likert, a.display_order),
                flags=_reorder(label.flags, a.display_order),
                created_at=self.now(),
            )
            s.add(row)
            s.flush()
            return row.id

    def submit_demonstration(self, labeler_id: int, task_id: int, response: str) -> int:
        if not response.strip():
            raise InvalidInput("response", "is empty; write the response you would give")
        if len(response) > RESPONSE_MAX_CHARS:
            raise InvalidInput("response", f"is longer than {RESPONSE_MAX_CHARS} characters")
        if "\x00" in response:
            raise InvalidInput("response", "holds a NUL character")
        with self._write() as s:
            task, a = self._assignment(s, labeler_id, task_id)
            if task.responses:
                raise InvalidInput("task", f"task {task_id} asks for a ranking")
            self._finish(s, task, a, DONE)
            row = Label(
                assignment_id=a.id,
                task_id=task.id,
                labeler_id=labeler_id,
                outcome=DEMONSTRATED,
                response=response,
                created_at=self.now(),
            )
            s.add(row)
            s.flush()
            return row.id

    def skip(self, labeler_id: int, task_id: int) -> None:
        """Give the task back to the queue; this labeler will not be offered it again."""
        with self._write() as s:
            task, a = self._assignment(s, labeler_id, task_id)
            self._finish(s, task, a, SKIPPED)

    # -- export --------------------------------------------------------------------------------

    def _label_rows(self, s: Session, project_id: int) -> list[tuple[Task, Label, str]]:
        return [
            (t, lab, name)
            for t, lab, name in s.execute(
                select(Task, Label, User.username)
                .join(Label, Label.task_id == Task.id)
                .join(User, User.id == Label.labeler_id)
                .where(Task.project_id == project_id)
                .order_by(Task.position, Label.id)
            ).all()
        ]

    def agreement(self, project_id: int) -> AgreementReport:
        with self._read() as s:
            rankings: dict[int, dict[str, list[int]]] = defaultdict(dict)
            for task, lab, name in self._label_rows(s, project_id):
                if lab.outcome == RANKED and lab.ranking:
                    rankings[task.id][name] = lab.ranking
            return agreement_of(rankings)

    def export(self, project_id: int) -> ExportResult:
        """Records in the formats ``tether rm`` / ``tether sft`` read, plus a summary.

        Ranking projects give one Comparison per ranked label; "none acceptable" labels and
        rankings where every response ties hold no preference pair, so they are counted in the
        summary instead of exported.
        """
        progress = self.progress(project_id)[0]
        with self._read() as s:
            records: list[Any] = []
            all_tie = 0
            for task, lab, name in self._label_rows(s, project_id):
                if lab.outcome == DEMONSTRATED and lab.response is not None:
                    records.append(
                        Demonstration(
                            prompt=task.full_prompt,
                            response=lab.response,
                            prompt_id=task.prompt_id,
                            labeler_id=name,
                        )
                    )
                elif lab.outcome == RANKED and lab.ranking and task.responses:
                    if len(set(lab.ranking)) == 1:
                        all_tie += 1
                        continue
                    records.append(
                        Comparison(
                            prompt=task.full_prompt,
                            responses=list(task.responses),
                            ranking=list(lab.ranking),
                            labeler_id=name,
                            prompt_id=task.prompt_id,
                            likert=list(lab.likert) if lab.likert else None,
                            flags=([{f: f in set(fl or ()) for f in FLAGS} for fl in lab.flags] if lab.flags else None),
                            policies=list(task.policies) if task.policies else None,
                            ended=list(task.ended) if task.ended is not None else None,
                        )
                    )
        agreement = self.agreement(project_id)
        summary = {
            "project": progress.name,
            "kind": progress.kind,
            "format": "comparison" if progress.kind == "ranking" else "demonstration",
            "tasks": progress.tasks,
            "overlap": progress.overlap,
            "exported": len(records),
            "excluded_all_tie": all_tie,
            "none_acceptable": progress.none_acceptable,
            "skipped": progress.skipped,
            "labelers": len(progress.by_labeler),
            "agreement": agreement.to_json(),
        }
        return ExportResult(progress.kind, records, summary)
