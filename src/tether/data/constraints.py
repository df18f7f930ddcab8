"""Verifiable constraints in instructions: render them, parse them back, check a response.

The default task's prompts carry one or two constraints ("Use at most 30 words.", "Use only
lowercase letters.") that a labeler can check without knowing anything but the prompt text.
That is the point of this module: :func:`parse_constraints` recovers the constraints from the
*wording* of a prompt, so the simulated panel can judge any prompt/response file (exported from
the labeling app, sampled by a policy, written by hand), not only the in-memory objects the
generator made.

Every phrasing the generator uses is in :data:`PHRASINGS`; :func:`parse_constraints` recognises
all of them (and a few close variants a person might write), and the tests round-trip each one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# The kinds of constraint, in the order they are usually written in a prompt.
CONSTRAINT_KINDS: tuple[str, ...] = (
    "max_words",  # value: int, the word limit
    "num_sentences",  # value: int, exact number of sentences
    "bullets",  # value: int, exact number of "- " bullet lines and nothing else
    "include_word",  # value: str, a word that must appear
    "exclude_word",  # value: str, a word that must not appear
    "lowercase",  # no value: no capital letter anywhere
    "uppercase",  # no value: no small letter anywhere
    "starts_with",  # value: str, the phrase the response opens with
    "ends_with",  # value: str, the phrase the response closes with
)

# Pairs that cannot both hold (or that make one constraint pointless); the generator avoids them.
INCOMPATIBLE: frozenset[frozenset[str]] = frozenset(
    frozenset(p)
    for p in (
        ("lowercase", "uppercase"),
        ("bullets", "num_sentences"),
        ("bullets", "starts_with"),
        ("bullets", "ends_with"),
        ("num_sentences", "ends_with"),  # the closing phrase is itself a sentence
        ("include_word", "exclude_word"),
    )
)

_NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)


@dataclass(frozen=True)
class Constraint:
    """One verifiable requirement of an instruction, e.g. ``Constraint("max_words", 30)``."""

    kind: str  # one of CONSTRAINT_KINDS
    value: int | str | None = None

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise ValueError(f"unknown constraint kind {self.kind!r}; known: {CONSTRAINT_KINDS}")

    def render(self, variant: int = 0) -> str:
        """The instruction sentence for this constraint, in phrasing ``variant``."""
        phrasings = PHRASINGS[self.kind]
        template = phrasings[variant % len(phrasings)]
        value = self.value
        n = value if isinstance(value, int) else 0
        if isinstance(value, str) and value.endswith((".", "!", "?")) and template.endswith('".'):
            template = template[:-1]  # 'End with "That is all."', not '"That is all.".'
        return template.format(
            n=n,
            w=_NUMBER_WORDS[n] if 0 <= n < len(_NUMBER_WORDS) else str(n),
            s="" if n == 1 else "s",
            x=value,
        )


# How the generator words each constraint. {n}: a number in digits, {w}: the same in words,
# {s}: plural "s", {x}: the word or phrase. Quoted values never contain a double quote.
PHRASINGS: dict[str, tuple[str, ...]] = {
    "max_words": ("Use at most {n} words.", "Answer in no more than {n} words."),
    "num_sentences": ("Answer in exactly {w} sentence{s}.", "Use exactly {w} sentence{s}."),
    "bullets": (
        'Answer with exactly {w} bullet points, each beginning with "- ".',
        'Format your answer as exactly {w} bullet points using "- ".',
    ),
    "include_word": ('Use the word "{x}".', 'Include the word "{x}" in your answer.'),
    "exclude_word": ('Do not use the word "{x}".', 'Avoid the word "{x}".'),
    "lowercase": ("Use only lowercase letters.", "Write everything in lowercase."),
    "uppercase": ("Use only capital letters.", "Write everything in capital letters."),
    "starts_with": ('Start your answer with "{x}".', 'Begin your reply with "{x}".'),
    "ends_with": ('End your answer with "{x}".', 'Finish your reply with "{x}".'),
}
# The word limit can also be folded into the request itself: "Write about tea in at most 30 words."
EMBEDDED_MAX_WORDS = " in at most {n} words"

_NUM = r"(\d+|" + "|".join(_NUMBER_WORDS) + r")"
_QUOTED = r'"([^"\n]*)"'
# One pattern per kind; group 1 is the value where the kind has one. Patterns are matched
# case-insensitively against the whole prompt (see the re.I below).
_PATTERNS: dict[str, re.Pattern] = {
    # Group 1: an inclusive limit ("at most 30"); group 2: a strict one ("under 30" = 29).
    "max_words": re.compile(
        r"\b(?:(?:at most|no more than|not more than|up to)\s+(\d+)"
        r"|(?:under|fewer than|less than)\s+(\d+))\s+words\b"
    ),
    # "exactly" is optional: people write "in two sentences" and "with 3 bullet points".
    "num_sentences": re.compile(r"\b(?:exactly\s+)?" + _NUM + r"\s+sentences?\b"),
    "bullets": re.compile(r"\b(?:exactly\s+)?" + _NUM + r"\s+bullet(?:\s+point)?s?\b"),
    "exclude_word": re.compile(
        r"\b(?:(?:do not|don't|never)\s+(?:use|include|mention|say)|avoid(?:\s+using)?)"
        r"\s+the\s+word\s+" + _QUOTED
    ),
    "include_word": re.compile(r"\b(?:use|include|mention)\s+the\s+word\s+" + _QUOTED),
    "lowercase": re.compile(r"\b(?:only lowercase letters|(?:everything |all )?in (?:all )?lowercase|all lowercase)\b"),
    "uppercase": re.compile(
        r"\b(?:only (?:capital|uppercase) letters|(?:everything |all )?in (?:all )?"
        r"(?:capital letters|uppercase|all caps)|all caps)\b"
    ),
    "starts_with": re.compile(
        r"\b(?:start|begin)\s+(?:your\s+(?:answer|reply|response)\s+)?with\s+"
        r"(?:the\s+(?:phrase|words)\s+)?" + _QUOTED
    ),
    "ends_with": re.compile(
        r"\b(?:end|finish)\s+(?:your\s+(?:answer|reply|response)\s+)?with\s+"
        r"(?:the\s+(?:phrase|words)\s+)?" + _QUOTED
    ),
}
_PATTERNS = {kind: re.compile(p.pattern, re.IGNORECASE) for kind, p in _PATTERNS.items()}


def _number(token: str) -> int:
    token = token.lower()
    return int(token) if token.isdigit() else _NUMBER_WORDS.index(token)


@lru_cache(maxsize=65536)
def _parse_cached(prompt_text: str) -> tuple[Constraint, ...]:
    found: list[tuple[int, Constraint]] = []
    text = prompt_text
    for kind in ("exclude_word", *[k for k in CONSTRAINT_KINDS if k != "exclude_word"]):
        pattern = _PATTERNS[kind]
        for m in pattern.finditer(text):
            value: int | str | None = None
            if kind == "max_words":
                value = int(m.group(1)) if m.group(1) else int(m.group(2)) - 1
            elif kind in ("num_sentences", "bullets"):
                value = _number(m.group(1))
            elif pattern.groups:
                value = m.group(1)  # quoted text, returned as written
            found.append((m.start(), Constraint(kind, value)))
        if kind == "exclude_word":
            # "Do not use the word X" contains "use the word X": blank it out so that the
            # include pattern cannot read it as the opposite instruction.
            text = pattern.sub(lambda m: " " * (m.end() - m.start()), text)
    found.sort(key=lambda p: p[0])
    unique: list[Constraint] = []
    for _, c in found:
        if c not in unique:
            unique.append(c)
    return tuple(unique)


def parse_constraints(prompt_text: str) -> list[Constraint]:
    """The constraints an instruction states, in the order they appear in its text.

    Recognises every phrasing in :data:`PHRASINGS` (and :data:`EMBEDDED_MAX_WORDS`) plus close
    variants ("no more than 30 words", "in all caps", "avoid using the word"). A prompt with no
    recognisable constraint gives ``[]``.
    """
    return list(_parse_cached(prompt_text))


# --------------------------------------------------------------------------------------------
# Counting, as a labeler would: words are runs of letters/digits (a "- " bullet marker is not a
# word; "wood-fired" and "don't" are one word each); sentences end at . ! or ? followed by
# space, or at a line break (one bullet = one sentence).

_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:['\u2019-][A-Za-z0-9]+)*")
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|\n+")
_ALNUM_RE = re.compile(r"[A-Za-z0-9]")


def words(text: str) -> list[str]:
    """The words of ``text`` as :func:`count_words` counts them."""
    return _WORD_RE.findall(text)


def count_words(text: str) -> int:
    """Number of words (runs of letters and digits, joined by ' or -)."""
    return len(_WORD_RE.findall(text))


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after . ! ? + whitespace, and at line breaks."""
    return [s.strip() for s in _SENTENCE_SPLIT_RE.split(text.strip()) if _ALNUM_RE.search(s)]


def count_sentences(text: str) -> int:
    """Number of sentences as :func:`split_sentences` finds them."""
    return len(split_sentences(text))


def bullet_items(text: str) -> list[str] | None:
    """The items of a response made only of "- " bullet lines, or None if it is not one."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines or not all(line.startswith("- ") and line[2:].strip() for line in lines):
        return None
    return [line[2:].strip() for line in lines]


def contains_word(text: str, word: str) -> bool:
    """Whether ``word`` occurs in ``text`` as a whole word, ignoring case ("cat" ≠ "cats")."""
    return re.search(r"(?<![A-Za-z0-9])" + re.escape(word) + r"(?![A-Za-z0-9])", text, re.I) is not None


def check(constraint: Constraint, response: str) -> bool:
    """Whether ``response`` satisfies ``constraint``; an empty response satisfies nothing."""
    kind, value = constraint.kind, constraint.value
    text = response.strip()
    if not _ALNUM_RE.search(text):
        return False
    if kind == "max_words":
        return count_words(text) <= int(value)  # type: ignore[arg-type]
    if kind == "num_sentences":
        return count_sentences(text) == value
    if kind == "bullets":
        items = bullet_items(text)
        return items is not None and len(items) == value
    if kind == "include_word":
        return contains_word(text, str(value))
    if kind == "exclude_word":
        return not contains_word(text, str(value))
    if kind == "lowercase":
        return not any(c.isupper() for c in text)
    if kind == "uppercase":
        return not any(c.islower() for c in text)
    if kind == "starts_with":
        return text.lower().startswith(str(value).strip().lower())
    if kind == "ends_with":
        return text.lower().endswith(str(value).strip().lower())
    raise ValueError(f"unknown constraint kind {kind!r}")


def check_all(prompt_text: str, response: str) -> list[bool]:
    """One verdict per constraint parsed from ``prompt_text`` (``[]`` if it states none)."""
    return [check(c, response) for c in _parse_cached(prompt_text)]
