"""Prompt preprocessing as in InstructGPT §3.2 and Appendix A.

The paper's prompts come from API users. Before use they are: filtered for personally
identifiable information, heuristically deduplicated by long common prefix, capped at 200 per
user id, and split into train/valid/test **by user id**, so that the validation and test sets
hold only users the model never saw in training.

Every step is a pure, deterministic function returning ``(kept, dropped)``;
:func:`preprocess_prompts` runs them in order (PII → length → dedup → per-user cap → split) and
counts every removal, so nothing is dropped silently.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, TypeVar, get_args

from tether.config import SPLITS, check_fractions
from tether.data.formats import Conversation, Prompt, write_records

# The order preprocess_prompts runs its filters in; the keys of PreprocessReport.removed.
STEPS: tuple[str, ...] = ("pii", "length", "dedup", "user_cap")


@dataclass(frozen=True)
class Dropped:
    """A prompt a step removed, and why."""

    prompt: Prompt
    step: str  # one of STEPS
    reason: str  # human-readable; never quotes the prompt text (it may hold PII)

    def to_json(self) -> dict:
        # Ids only: writing the text of a prompt dropped for PII would leak the PII.
        return {
            "id": self.prompt.id,
            "user_id": self.prompt.user_id,
            "step": self.step,
            "reason": self.reason,
        }


# --------------------------------------------------------------------------------------------
# Personally identifiable information


@dataclass(frozen=True)
class PiiMatch:
    """One item of personal information found in a text: ``text[start:end]`` is of ``kind``."""

    kind: str
    start: int
    end: int


@dataclass(frozen=True)
class _Detector:
    kind: str
    pattern: re.Pattern[str]
    validate: Callable[[str], bool] | None = None
    group: int = 0  # the regex group to redact (SSN-by-keyword redacts the number, not "SSN:")


def _luhn_ok(candidate: str) -> bool:
    """The Luhn checksum every payment card number satisfies; random digit runs fail 90 %."""
    digits = [int(c) for c in candidate if c.isdigit()]
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:  # 0000... passes Luhn trivially
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _international_phone_ok(candidate: str) -> bool:
    # E.164 numbers have at most 15 digits; fewer than 8 is a signed quantity ("+25 points").
    n_digits = sum(c.isdigit() for c in candidate)
    return 8 <= n_digits <= 15 and "  " not in candidate


def _ipv4_ok(candidate: str) -> bool:
    # "1.2.3.4" is far more often an outline or section number than an address.
    return any(len(octet) >= 2 for octet in candidate.split("."))


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Lookarounds keep digits that belong to a longer number or a decimal ("3.14159...") out.
_NOT_AFTER_NUMBER = r"(?<![\w.,+-])"
_NOT_BEFORE_NUMBER = r"(?![\w]|[.,-]\d)"

# Priority order: where two detectors overlap, the earlier one wins (a URL's user info is also
# an email; a card number's digits could also read as a phone number).
_DETECTORS: tuple[_Detector, ...] = (
    _Detector(
        "url_userinfo",
        # The lookbehind (not \b) starts a scheme only once per run, which keeps this linear.
        re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#@]+@\S*[^\s.,;:!?)\]'\"]"),
    ),
    _Detector(
        "email",
        re.compile(
            r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@"
            r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
            r"\.[A-Za-z]{2,}\b"
        ),
    ),
    _Detector(
        "ssn",
        # Area 000/666/9xx, group 00 and serial 0000 are never issued.
        re.compile(_NOT_AFTER_NUMBER + r"(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}" + _NOT_BEFORE_NUMBER),
    ),
    _Detector(
        "ssn",
        # Nine bare digits are only an SSN when the text says so.
        re.compile(r"(?i:\b(?:ssn|social security(?: number| no\.?)?))\s*(?:#|:|is)?\s*(\d{9})\b"),
        group=1,
    ),
    _Detector(
        "credit_card",
        re.compile(
            _NOT_AFTER_NUMBER
            + r"(?:\d{13,19}"  # unformatted
            + r"|\d{4}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{1,3})?"  # 4-4-4-4 (Visa, Mastercard, ...)
            + r"|\d{4}([ -])\d{6}\2\d{4,5})"  # 4-6-5 (Amex), 4-6-4 (Diners)
            + _NOT_BEFORE_NUMBER
        ),
        validate=_luhn_ok,
    ),
    _Detector(
        "ipv4",
        re.compile(r"(?<![\w.])" + _OCTET + r"(?:\." + _OCTET + r"){3}(?![\w]|\.\d)"),
        validate=_ipv4_ok,
    ),
    _Detector(
        "phone",
        # International: "+" then 8..15 digits with spaces, dots, dashes or parentheses.
        re.compile(r"(?<![\w+(])\(?\+\d[\d ().-]{5,22}\d(?!\w)"),
        validate=_international_phone_ok,
    ),
    _Detector(
        "phone",
        # US formatted: (555) 123-4567, 555-123-4567, 555.123.4567, 1-800-555-0199.
        re.compile(
            _NOT_AFTER_NUMBER + r"(?:\+?1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}" + _NOT_BEFORE_NUMBER
        ),
    ),
    _Detector(
        "phone",
        # US unformatted: ten digits obeying the numbering plan (area code and exchange never
        # start with 0 or 1), which keeps most other ten-digit numbers out.
        re.compile(_NOT_AFTER_NUMBER + r"(?:\+?1)?[2-9]\d{2}[2-9]\d{6}" + _NOT_BEFORE_NUMBER),
    ),
)

PII_PLACEHOLDERS: dict[str, str] = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "credit_card": "[CREDIT_CARD]",
    "ipv4": "[IP_ADDRESS]",
    "ssn": "[SSN]",
    "url_userinfo": "[URL]",
}
PII_KINDS: tuple[str, ...] = tuple(PII_PLACEHOLDERS)


def find_pii(text: str) -> list[PiiMatch]:
    """Non-overlapping items of personal information in ``text``, in order of position.

    Detects emails, phone numbers (international ``+...`` and US formats), payment card numbers
    (Luhn-checked), IPv4 addresses, US SSNs and URLs carrying user info
    (``https://user:pass@host``). Ordinary numbers (years, prices, times, counts, dates,
    decimals) are not matched.
    """
    taken: list[PiiMatch] = []
    for det in _DETECTORS:
        for m in det.pattern.finditer(text):
            if det.validate is not None and not det.validate(m.group(0)):
                continue
            start, end = m.span(det.group)
            if any(start < t.end and t.start < end for t in taken):
                continue  # a higher-priority detector already claimed these characters
            taken.append(PiiMatch(det.kind, start, end))
    return sorted(taken, key=lambda t: t.start)


def redact_pii(text: str, matches: Sequence[PiiMatch] | None = None) -> str:
    """``text`` with each item of personal information replaced by its placeholder."""
    if matches is None:
        matches = find_pii(text)
    # Right to left, so earlier spans keep their offsets.
    for m in sorted(matches, key=lambda t: t.start, reverse=True):
        text = text[: m.start] + PII_PLACEHOLDERS[m.kind] + text[m.end :]
    return text


PiiMode = Literal["drop", "redact"]


def _apply_pii(
    prompts: Sequence[Prompt], matches: Sequence[list[PiiMatch]], mode: PiiMode
) -> tuple[list[Prompt], list[Dropped]]:
    if mode not in ("drop", "redact"):
        raise ValueError(f"pii mode must be 'drop' or 'redact', got {mode!r}")
    kept: list[Prompt] = []
    dropped: list[Dropped] = []
    for p, found in zip(prompts, matches, strict=True):
        if not found:
            kept.append(p)
        elif mode == "drop":
            kinds = ", ".join(sorted({m.kind for m in found}))
            dropped.append(Dropped(p, "pii", f"contains {kinds}"))
        elif isinstance(p.text, Conversation):  # each turn redacted: the turns stay turns
            turns = (replace(t, content=redact_pii(t.content)) for t in p.text.turns)
            kept.append(replace(p, text=Conversation(turns)))
        else:
            kept.append(replace(p, text=redact_pii(p.text, found)))
    return kept, dropped


def filter_pii(prompts: Sequence[Prompt], mode: PiiMode = "drop") -> tuple[list[Prompt], list[Dropped]]:
    """Drop every prompt holding personal information, or redact it with placeholders.

    ``mode="drop"`` removes the prompt; ``mode="redact"`` keeps it with each item replaced by a
    placeholder such as ``[EMAIL]`` (see :data:`PII_PLACEHOLDERS`) and drops nothing.
    """
    return _apply_pii(prompts, [find_pii(p.text) for p in prompts], mode)


# --------------------------------------------------------------------------------------------
# Length, duplicates, per-user cap


def filter_length(
    prompts: Sequence[Prompt],
    *,
    max_chars: int | None = None,
    max_words: int | None = None,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> tuple[list[Prompt], list[Dropped]]:
    """Drop prompts longer than any limit given (None = no limit).

    ``max_tokens`` needs ``count_tokens``, e.g. ``lambda s: len(tokenizer(s).input_ids)``, so
    that the limit is in the policy's own tokens.
    """
    if max_tokens is not None and count_tokens is None:
        raise ValueError("max_tokens needs count_tokens (a function text -> number of tokens)")
    limits = {"max_chars": max_chars, "max_words": max_words, "max_tokens": max_tokens}
    for name, value in limits.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1 (or None for no limit), got {value}")
    kept: list[Prompt] = []
    dropped: list[Dropped] = []
    for p in prompts:
        reason = None
        if max_chars is not None and len(p.text) > max_chars:
            reason = f"{len(p.text)} characters > max_chars {max_chars}"
        elif max_words is not None and (n := len(p.text.split())) > max_words:
            reason = f"{n} words > max_words {max_words}"
        elif max_tokens and count_tokens and (n := count_tokens(p.text)) > max_tokens:
            reason = f"{n} tokens > max_tokens {max_tokens}"
        if reason is None:
            kept.append(p)
        else:
            dropped.append(Dropped(p, "length", reason))
    return kept, dropped


def normalize_prefix(text: str, prefix_chars: int = 64) -> str:
    """The dedup key: the first ``prefix_chars`` characters after normalising case and spaces.

    NFKC folds look-alike characters (full-width letters, non-breaking spaces) so they compare
    equal; runs of whitespace become one space.
    """
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())[:prefix_chars]


def dedup_by_prefix(prompts: Sequence[Prompt], prefix_chars: int = 64) -> tuple[list[Prompt], list[Dropped]]:
    """Keep the first prompt of each group sharing a long common prefix (InstructGPT §3.2).

    Two prompts are duplicates when their first ``prefix_chars`` normalised characters
    (:func:`normalize_prefix`) are equal; a prompt shorter than that is compared whole. One
    hash lookup per prompt: O(n). A conversation is compared from its first turn after the
    system prompt: datasets often give every prompt the same system prompt, which says nothing
    about what was asked.
    """
    if prefix_chars < 1:
        raise ValueError(f"prefix_chars must be at least 1, got {prefix_chars}")
    first: dict[str, Prompt] = {}
    kept: list[Prompt] = []
    dropped: list[Dropped] = []
    for p in prompts:
        asked = p.text
        if isinstance(asked, Conversation) and asked.turns[0].role == "system":
            asked = "\n\n".join(t.content for t in asked.turns[1:])
        key = normalize_prefix(asked, prefix_chars)
        if key in first:
            reason = f"shares its first {prefix_chars} normalised characters with {first[key].id}"
            dropped.append(Dropped(p, "dedup", reason))
        else:
            first[key] = p
            kept.append(p)
    return kept, dropped


def _unit_hash(seed: int, kind: str, key: str) -> float:
    """A stable pseudo-random number in [0, 1) for ``key`` (unlike ``hash()``, same every run)."""
    digest = hashlib.blake2b(f"{seed}\x00{kind}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def cap_per_user(
    prompts: Sequence[Prompt], max_per_user: int = 200, seed: int = 0
) -> tuple[list[Prompt], list[Dropped]]:
    """At most ``max_per_user`` prompts per user id (InstructGPT §3.2: 200).

    Which prompts a user keeps is a seeded hash of the prompt id, not input order, so a heavy
    user's first session does not crowd out the rest; adding a prompt displaces at most one.
    Kept prompts stay in input order.
    """
    if max_per_user < 1:
        raise ValueError(f"max_per_user must be at least 1, got {max_per_user}")
    by_user: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_user.setdefault(user_key(p), []).append(i)
    keep: set[int] = set()
    for idxs in by_user.values():
        ranked = sorted(idxs, key=lambda i: (_unit_hash(seed, "cap", prompts[i].id), i))
        keep.update(ranked[:max_per_user])
    kept = [p for i, p in enumerate(prompts) if i in keep]
    reason = f"user has more than max_per_user {max_per_user} prompts"
    dropped = [Dropped(p, "user_cap", reason) for i, p in enumerate(prompts) if i not in keep]
    return kept, dropped


# --------------------------------------------------------------------------------------------
# Split by user


def user_key(prompt: Prompt) -> str:
    """Whose prompt it is, for the cap and the split: its user id, or, without one, the prompt
    itself (a split by prompt: valid and test then hold unseen prompts, not unseen users)."""
    return prompt.user_id if prompt.user_id is not None else "\x00prompt " + prompt.id


def split_by_user(
    prompts: Sequence[Prompt],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> dict[str, list[Prompt]]:
    """Split into train/valid/test **by user id**: no user has prompts in two splits.

    A user's split comes from a seeded hash of the user id alone, so adding prompts or users
    never moves an existing user (InstructGPT evaluates on users not seen in training). Every
    split with a positive fraction is non-empty: in the rare case the hash leaves one empty
    (only likely with a handful of users), the user whose hash lies nearest to that split's
    interval is moved in. Raises ValueError when there are fewer users than such splits.
    Prompts keep their input order within a split. A prompt without a user id is its own user
    (:func:`user_key`).
    """
    fractions = check_fractions(fractions)
    users = sorted({user_key(p) for p in prompts})
    needed = sum(f > 0 for f in fractions)
    if len(users) < needed:
        names = "/".join(s for s, f in zip(SPLITS, fractions, strict=True) if f > 0)
        raise ValueError(f"splitting by user needs at least {needed} distinct users to fill {names}, got {len(users)}")
    # Split s owns the interval [edges[s], edges[s + 1]) of the unit line.
    edges = [0.0, fractions[0], fractions[0] + fractions[1], 1.0]
    point = {u: _unit_hash(seed, "split", u) for u in users}
    assign = {u: min(bisect.bisect_right(edges, point[u]) - 1, len(SPLITS) - 1) for u in users}

    for s, frac in enumerate(fractions):
        members = Counter(assign.values())
        if frac == 0 or members[s] > 0:
            continue
        # Only take a user from a split that keeps at least one; with >= `needed` users one
        # always exists (the empty split leaves the others holding all users).
        donors = [u for u in users if members[assign[u]] > 1]

        def gap(u: str, s: int = s) -> tuple[float, str]:
            x = point[u]
            return (max(edges[s] - x, x - edges[s + 1], 0.0), u)

        assign[min(donors, key=gap)] = s

    splits: dict[str, list[Prompt]] = {name: [] for name in SPLITS}
    for p in prompts:
        splits[SPLITS[assign[user_key(p)]]].append(p)
    return splits


# --------------------------------------------------------------------------------------------
# The whole pipeline


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings for :func:`preprocess_prompts` (``tether data preprocess``)."""

    pii: PiiMode = "drop"
    """Prompts with personal information (emails, phones, cards, IPs, SSNs, URLs with user
    info): 'drop' them, or 'redact' each item with a placeholder such as [EMAIL]."""
    max_chars: int | None = None
    """Drop prompts longer than this many characters (None: no limit)."""
    max_words: int | None = 1000
    """Drop prompts longer than this many words (None: no limit). 1000 words (~1300 tokens)
    leave room for a response in a 2048-token context."""
    max_tokens: int | None = None
    """Drop prompts longer than this many tokens; needs count_tokens (Python API only)."""
    prefix_chars: int = 64
    """Prompts whose first this many characters match, ignoring case and whitespace, are
    duplicates; the first is kept."""
    max_per_user: int = 200
    """At most this many prompts per user id (paper: 200)."""
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Fractions of users (not prompts) in train, valid and test; must sum to 1."""
    seed: int = 0
    """Seed for the per-user cap and the user split; the same seed gives the same output."""

    def __post_init__(self) -> None:
        if self.pii not in get_args(PiiMode):
            raise ValueError(f"pii must be one of {', '.join(get_args(PiiMode))}; got {self.pii!r}")
        for name in ("max_chars", "max_words", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.prefix_chars < 1:
            raise ValueError(f"prefix_chars must be at least 1, got {self.prefix_chars}")
        if self.max_per_user < 1:
            raise ValueError(f"max_per_user must be at least 1, got {self.max_per_user}")
        # Lists (from JSON, YAML or argparse) become the declared tuple (frozen: set it the one way
        # __post_init__ can).
        object.__setattr__(self, "fractions", check_fractions(tuple(self.fractions)))


@dataclass
class PreprocessReport:
    """How many prompts each step removed; ``input == sum(removed.values()) + kept``."""

    input: int
    input_users: int
    removed: dict[str, int]  # step (STEPS, in order) -> prompts removed
    pii_redacted: int  # prompts kept with placeholders (pii="redact"); nothing removed
    pii_kinds: dict[str, int]  # PII kind -> prompts containing it (a prompt may count twice)
    kept: int
    split_prompts: dict[str, int]  # split -> prompts
    split_users: dict[str, int]  # split -> distinct users (a prompt without user_id counts as one)
    without_user: int = 0  # input prompts with no user_id: split by prompt, each its own user

    @property
    def split_by(self) -> str:
        """What the split keeps apart, in words for the log."""
        if not self.without_user:
            return "user"
        if self.without_user == self.input:
            return "prompt (no user_id in the prompts: valid and test hold unseen prompts, not unseen users)"
        return f"user, and by prompt for the {self.without_user} prompts without user_id"

    @property
    def total_removed(self) -> int:
        return sum(self.removed.values())

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class PreprocessResult:
    splits: dict[str, list[Prompt]]  # train / valid / test
    dropped: list[Dropped]  # every removed prompt, in step order
    report: PreprocessReport
    config: PreprocessConfig = field(default_factory=PreprocessConfig)

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``{train,valid,test}.jsonl``, ``dropped.jsonl`` (ids and reasons) and
        ``report.json`` (counts plus the resolved config) to ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [write_records(out / f"{name}.jsonl", self.splits[name]) for name in SPLITS]
        paths.append(write_records(out / "dropped.jsonl", [d.to_json() for d in self.dropped]))
        report = {**self.report.to_json(), "config": asdict(self.config)}
        report_path = out / "report.json"
        report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        paths.append(report_path)
        return paths


def _check_unique_ids(prompts: Iterable[Prompt]) -> None:
    counts = Counter(p.id for p in prompts)
    repeated = [i for i, n in counts.items() if n > 1]
    if repeated:
        shown = ", ".join(repr(i) for i in repeated[:5])
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        # Dropped prompts are reported by id, so an id must name one prompt.
        raise ValueError(f"prompt ids must be unique; repeated: {shown}{more}")


def preprocess_prompts(
    prompts: Sequence[Prompt],
    config: PreprocessConfig | None = None,
    *,
    count_tokens: Callable[[str], int] | None = None,
) -> PreprocessResult:
    """PII filter → length filter → dedup → per-user cap → split by user (InstructGPT §3.2).

    PII goes first so redacted prompts are what the later steps measure and compare; the cap
    comes after dedup so a user's duplicates do not use up their 200.
    """
    config = config or PreprocessConfig()
    _check_unique_ids(prompts)
    removed: dict[str, int] = {}
    dropped: list[Dropped] = []

    # 1. Personal information: find once, count by kind, then drop or redact.
    matches = [find_pii(p.text) for p in prompts]
    pii_kinds = Counter(kind for found in matches for kind in {m.kind for m in found})
    kept, gone = _apply_pii(prompts, matches, config.pii)
    pii_redacted = sum(1 for found in matches if found) if config.pii == "redact" else 0
    removed["pii"] = len(gone)
    dropped += gone

    # 2. Length.
    kept, gone = filter_length(
        kept,
        max_chars=config.max_chars,
        max_words=config.max_words,
        max_tokens=config.max_tokens,
        count_tokens=count_tokens,
    )
    removed["length"] = len(gone)
    dropped += gone

    # 3. Duplicates by long common prefix.
    kept, gone = dedup_by_prefix(kept, config.prefix_chars)
    removed["dedup"] = len(gone)
    dropped += gone

    # 4. At most max_per_user prompts per user.
    kept, gone = cap_per_user(kept, config.max_per_user, config.seed)
    removed["user_cap"] = len(gone)
    dropped += gone

    # 5. Split by user id (by prompt for prompts without one: PreprocessReport.split_by says so).
    splits = split_by_user(kept, config.fractions, config.seed)

    report = PreprocessReport(
        input=len(prompts),
        input_users=len({user_key(p) for p in prompts}),
        removed=removed,
        pii_redacted=pii_redacted,
        pii_kinds={k: pii_kinds[k] for k in PII_KINDS if pii_kinds[k]},
        kept=len(kept),
        split_prompts={name: len(splits[name]) for name in SPLITS},
        split_users={name: len({user_key(p) for p in splits[name]}) for name in SPLITS},
        without_user=sum(p.user_id is None for p in prompts),
    )
    # Nothing leaves silently: every prompt is either in a split or in `dropped`.
    assert report.input == report.total_removed + report.kept == len(dropped) + len(kept)
    return PreprocessResult(splits=splits, dropped=dropped, report=report, config=config)


# --------------------------------------------------------------------------------------------
# Prompts that fit the model's prompt length


def fit_prompt(prompt: str, max_tokens: int, count_tokens: Callable[[str], int]) -> tuple[str | None, int]:
    """``(prompt, turns cut)``: a prompt of at most ``max_tokens`` (``count_tokens`` counts it as
    the model sees it, chat template included), or None when it cannot fit.

    A conversation loses its oldest whole turns (with the assistant turns that answered them, so
    that it still opens on a user turn), never its system prompt or its last user turn; a prompt
    whose system prompt and last user turn alone are too long, or a plain prompt that is, cannot
    fit: cutting into a turn would change what is asked.
    """
    if count_tokens(prompt) <= max_tokens:
        return prompt, 0
    if not isinstance(prompt, Conversation):
        return None, 0
    head = list(prompt.turns[:1]) if prompt.turns[0].role == "system" else []
    body = list(prompt.turns[len(head) :])
    cut = 0
    while len(body) > 1:
        body, cut = body[1:], cut + 1
        while body[0].role != "user":  # the last turn is a user turn: the loop stops there
            body, cut = body[1:], cut + 1
        turns = head + body
        fitted = Conversation(turns) if len(turns) > 1 else turns[0].content
        if count_tokens(fitted) <= max_tokens:
            return fitted, cut
    return None, cut


@dataclass(frozen=True)
class PromptFit:
    """What :func:`fit_prompts` did, for the log and the run directory."""

    max_tokens: int
    prompts: int  # prompts read
    cut_prompts: int  # prompts that lost turns
    cut_turns: int  # turns cut, in all
    dropped: int  # prompts that could not fit

    def describe(self) -> str:
        return (
            f"prompts: {self.cut_prompts} of {self.prompts} lost their {self.cut_turns} oldest turns in all and "
            f"{self.dropped} were dropped (system prompt and last user turn alone over {self.max_tokens} tokens)"
        )


P = TypeVar("P", Prompt, str)


def fit_prompts(prompts: Sequence[P], max_tokens: int, count_tokens: Callable[[str], int]) -> tuple[list[P], PromptFit]:
    """Every prompt (a Prompt record or its text) made to fit, those that cannot dropped and counted."""
    kept: list[P] = []
    cut_prompts = cut_turns = dropped = 0
    for p in prompts:
        fitted, cut = fit_prompt(p.text if isinstance(p, Prompt) else p, max_tokens, count_tokens)
        if fitted is None:
            dropped += 1
            continue
        cut_prompts, cut_turns = cut_prompts + (cut > 0), cut_turns + cut
        kept.append(replace(p, text=fitted) if isinstance(p, Prompt) else fitted)
    return kept, PromptFit(max_tokens, len(prompts), cut_prompts, cut_turns, dropped)
