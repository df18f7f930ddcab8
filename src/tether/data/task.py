"""The default task: constrained instructions about everyday topics, generated offline.

People are not available to tests, the demo or the benchmarks, so tether ships a task that a
small chat model (SmolLM2-135M-Instruct) does not already solve and whose quality a simulated
labeler can judge from the prompt text alone (:mod:`tether.labelers.panel`):

    Write about volcanoes in at most 30 words. Use only lowercase letters.

Each prompt asks about one **topic** (40 topics, each with seven short, true sentences packaged
in ``assets/topics.json``) and states one or two **verifiable constraints**
(:mod:`tether.data.constraints`: word limit, sentence count, bullets, required / forbidden word,
lowercase, capitals, opening / closing phrase). Prompts come from simulated users, carry the
paper's categories, and include a few near-duplicates (sharing a long prefix) and a few with
fake personal information, so that preprocessing has real work to do.

Demonstrations are composed from the topic sentences and then made to satisfy the constraints
(truncated at a sentence boundary, lowercased, bulleted...), so they read as natural text and
pass :func:`check` on every constraint. The pretraining corpus for PPO-ptx and the
alignment-tax perplexity is prose from Python's own documentation (``pydoc_data.topics``),
which every Python installation ships.

Everything is deterministic given the seed; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from pydoc_data.topics import topics

from tether.data.constraints import (
    EMBEDDED_MAX_WORDS,
    INCOMPATIBLE,
    PHRASINGS,
    Constraint,
    check,
    contains_word,
    count_words,
    parse_constraints,
    words,
)
from tether.data.formats import Demonstration, PretrainText, Prompt, Record, write_records
from tether.data.preprocess import PreprocessConfig, preprocess_prompts

__all__ = [
    "CATEGORIES",
    "Constraint",
    "DefaultTask",
    "Topic",
    "build_default_task",
    "check",
    "compose_response",
    "find_topic",
    "load_topics",
    "parse_constraints",
    "pretrain_corpus",
    "quoted_source",
]

# The paper's use-case categories (InstructGPT Table 1) that this task's templates fit, with
# roughly the paper's proportions (generation dominates; closed QA and summarization are rare).
CATEGORY_WEIGHTS: dict[str, float] = {
    "generation": 0.40,
    "open_qa": 0.15,
    "brainstorming": 0.13,
    "chat": 0.09,
    "rewrite": 0.09,
    "summarization": 0.07,
    "closed_qa": 0.07,
}
CATEGORIES: tuple[str, ...] = tuple(CATEGORY_WEIGHTS)

# Request wording per category. {t}: the topic; {src}: two or three topic sentences the
# request is about (closed-domain tasks: the answer must come from this text).
TASK_TEMPLATES: dict[str, tuple[str, ...]] = {
    "generation": (
        "Write a short paragraph about {t}.",
        "Write about {t}.",
        "Write a short note about {t}.",
    ),
    "open_qa": (
        "What should I know about {t}?",
        "Can you tell me about {t}?",
        "What is interesting about {t}?",
    ),
    "brainstorming": ("List some facts about {t}.", "Give me some fun facts about {t}."),
    "chat": (
        "Hi! I have been reading about {t} lately. Tell me more.",
        "Hello, I am curious about {t}. What can you tell me?",
    ),
    "rewrite": (
        'Rewrite this text about {t}: "{src}"',
        'Rewrite the following note about {t}: "{src}"',
    ),
    "summarization": (
        'Summarize this text about {t}: "{src}"',
        'Give a short summary of this text about {t}: "{src}"',
    ),
    "closed_qa": (
        'Read this text: "{src}" What does it say about {t}?',
        'Based only on this text, what do we learn about {t}? "{src}"',
    ),
}
# Categories whose answer must come from the quoted text (the paper's closed-domain tasks,
# where "hallucination" means adding what the input does not say).
CLOSED_DOMAIN: frozenset[str] = frozenset({"rewrite", "summarization", "closed_qa"})

# Which constraints fit which request, and how often they are drawn. A rewrite keeps all of its
# text, so word and sentence limits or a forbidden word would make it something else.
_KIND_WEIGHTS: dict[str, float] = {
    "max_words": 3.0,
    "num_sentences": 2.0,
    "bullets": 2.0,
    "include_word": 2.0,
    "exclude_word": 2.0,
    "lowercase": 2.0,
    "uppercase": 1.0,
    "starts_with": 1.5,
    "ends_with": 1.5,
}
_CATEGORY_KINDS: dict[str, tuple[str, ...]] = {
    "rewrite": ("bullets", "include_word", "lowercase", "uppercase", "starts_with", "ends_with"),
    "summarization": (
        "max_words",
        "num_sentences",
        "include_word",
        "lowercase",
        "uppercase",
        "starts_with",
        "ends_with",
    ),
}
STARTERS: tuple[str, ...] = ("Here you go:", "Fun fact:", "Quick answer:", "Here is what I know:")
ENDINGS: tuple[str, ...] = ("Hope this helps!", "Thanks for asking!", "That is all.")

# Appended to a copy of an earlier prompt: the near-duplicates that dedup by prefix must catch.
_NEAR_DUPLICATE_ENDINGS: tuple[str, ...] = (
    " Thanks!",
    " Thank you!",
    " Please help.",
    " Thanks a lot.",
)
_FIRST = ("alex", "dana", "sam", "maria", "li", "omar", "jane", "raj", "ana", "tom", "noor", "eva")
_LAST = ("kim", "lopez", "smith", "chen", "patel", "novak", "garcia", "brown", "okafor", "berg")

MAX_PROMPT_WORDS = 60
MAX_DEMONSTRATION_WORDS = 80

# Function words: never keywords, never required/forbidden words. Also used by the panel to
# tell natural sentences from keyword salad.
STOPWORDS: frozenset[str] = frozenset(
    """a about above after again against all almost also am an and any are around as at be
    because been before being below between both but by can cannot could did do does doing
    down during each either else even ever every few for from further had has have having he
    her here hers him his how however i if in into is it its itself just least less like lot
    lots made make makes many may me might more most much must my near never no nor not now of
    off often on once one only or other our ours out over own per quite rather same she should
    so some such than that the their theirs them then there these they this those though
    through to too under until up upon us usually very was we well were what when where which
    while who whom whose why will with within without would yet you your yours""".split()
)


# Too plain to make a telling required or forbidden word ("Use the word "come"").
_BLAND: frozenset[str] = frozenset(
    """away back called come comes first gets give gives grow help helps keep keeps means
    much several show shows start starts take takes used whole""".split()
)


def stem(word: str) -> str:
    """A crude singular: enough that "volcano" matches "volcanoes" and "fly" matches "flies"."""
    w = word.lower().replace("\u2019", "'")
    if w.endswith("'s"):
        w = w[:-2]
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 4 and w.endswith(("oes", "ches", "shes", "sses", "xes")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def content_words(text: str) -> list[str]:
    """Stemmed, lowercased words of ``text`` that are not function words."""
    return [stem(w) for w in words(text) if w.lower() not in STOPWORDS and not w.isdigit()]


# --------------------------------------------------------------------------------------------
# Topics


@dataclass(frozen=True)
class Topic:
    """One everyday topic: its name as written in prompts and the sentences answers draw on."""

    name: str  # e.g. "volcanoes", "the moon"
    sentences: tuple[str, ...]
    keywords: frozenset[str]  # stemmed words that say an answer is about this topic

    @property
    def key(self) -> tuple[str, ...]:
        """The stemmed name words a prompt must contain to be about this topic."""
        return tuple(stem(w) for w in words(self.name) if w.lower() != "the")


@lru_cache(maxsize=1)
def load_topics() -> dict[str, Topic]:
    """The packaged topics, by name, with keywords that are distinctive for each."""
    raw = json.loads(resources.files("tether.data").joinpath("assets/topics.json").read_text("utf-8"))
    entries = [(t["name"], tuple(t["sentences"])) for t in raw["topics"]]
    vocab = {name: set(content_words(" ".join(s))) for name, s in entries}
    # A keyword must be distinctive: "water" or "light" appear under many topics and say little.
    spread: dict[str, int] = {}
    for ws in vocab.values():
        for w in ws:
            spread[w] = spread.get(w, 0) + 1
    topics = {}
    for name, sentences in entries:
        name_words = {stem(w) for w in words(name) if w.lower() != "the"}
        keywords = {w for w in vocab[name] if spread[w] <= 2 and len(w) >= 3} | name_words
        topics[name] = Topic(name, sentences, frozenset(keywords))
    return topics


@lru_cache(maxsize=65536)
def find_topic(prompt_text: str) -> Topic | None:
    """The topic a prompt asks about: the packaged topic whose name appears first in it."""
    tokens = [stem(w) for w in words(prompt_text)]
    best: tuple[int, int, Topic] | None = None
    for topic in load_topics().values():
        key = topic.key
        for i in range(len(tokens) - len(key) + 1):
            if tuple(tokens[i : i + len(key)]) == key:
                # Earliest mention wins (a quoted text may mention another topic later on).
                if best is None or (i, -len(key)) < (best[0], -best[1]):
                    best = (i, len(key), topic)
                break
    return best[2] if best else None


_QUOTED_RE = re.compile(r'"([^"]+)"')


def quoted_source(prompt_text: str) -> str | None:
    """The text a closed-domain prompt quotes for the answer to work from, if any.

    Constraint values are quoted too ("Fun fact:", "tea"); the source is the longest quoted
    span, and only counts if it is at least six words long.
    """
    spans = _QUOTED_RE.findall(prompt_text)
    if not spans:
        return None
    longest = max(spans, key=count_words)
    return longest if count_words(longest) >= 6 else None


# --------------------------------------------------------------------------------------------
# Composing a response that satisfies constraints


def compose_response(
    sentences: list[str] | tuple[str, ...],
    constraints: list[Constraint],
    count: int | None = None,
) -> str | None:
    """Join ``sentences`` (in order) into a response that satisfies ``constraints``, or None.

    ``count`` is how many sentences to use when no constraint fixes it (default: all). The
    constraints are enforced the way a careful writer would: drop sentences with a forbidden
    word, lead with one holding the required word, stop at the sentence that would break the
    word limit, bullet, add the opening / closing phrase, change the case.
    """
    by_kind = {c.kind: c.value for c in constraints}
    pool = list(sentences)
    if "exclude_word" in by_kind:
        pool = [s for s in pool if not contains_word(s, str(by_kind["exclude_word"]))]
    if "include_word" in by_kind:
        hits = [s for s in pool if contains_word(s, str(by_kind["include_word"]))]
        if not hits:
            return None
        pool.remove(hits[0])
        pool.insert(0, hits[0])
    fixed = by_kind.get("bullets", by_kind.get("num_sentences"))
    n = int(fixed) if fixed is not None else (count if count is not None else len(pool))
    if n < 1 or len(pool) < n:
        return None
    prefix = f"{by_kind['starts_with']} " if "starts_with" in by_kind else ""
    suffix = f" {by_kind['ends_with']}" if "ends_with" in by_kind else ""
    chosen = pool[:n]
    if "max_words" in by_kind:
        budget = int(by_kind["max_words"] or 0) - count_words(prefix) - count_words(suffix)
        if fixed is None:
            # Truncate at a sentence boundary, never mid-sentence.
            kept: list[str] = []
            for s in chosen:
                if count_words(" ".join([*kept, s])) > budget:
                    break
                kept.append(s)
            chosen = kept
        if not chosen or count_words(" ".join(chosen)) > budget:
            return None
    body = "\n".join(f"- {s}" for s in chosen) if "bullets" in by_kind else " ".join(chosen)
    text = prefix + body + suffix
    if "lowercase" in by_kind:
        text = text.lower()
    if "uppercase" in by_kind:
        text = text.upper()
    return text


# --------------------------------------------------------------------------------------------
# Generating prompts


@lru_cache(maxsize=1)
def _lowercase_vocabulary() -> frozenset[str]:
    return frozenset(w for t in load_topics().values() for s in t.sentences for w in words(s) if w.islower())


def _as_written(word: str, position: int) -> str | None:
    """How a word from a topic sentence is quoted in a prompt: "Italy" keeps its capital,
    "Compost" at the start of a sentence does not. None when it cannot be told apart from a
    name (capitalised, first in its sentence, never seen in lower case)."""
    if word[0].isupper() and position > 0:
        return word
    if word.lower() in _lowercase_vocabulary():
        return word.lower()
    return None


def _draw_value(kind: str, category: str, pool: list[str], topic: Topic, rng: random.Random) -> int | str | None:
    """A value for a constraint of ``kind`` that has a chance of being satisfiable."""
    if kind == "max_words":
        return rng.choice((12, 15, 20)) if category == "summarization" else rng.choice((15, 20, 25, 30, 35, 40))
    if kind == "num_sentences":
        return rng.randint(1, min(3, len(pool) - (1 if category == "summarization" else 0)))
    if kind == "bullets":
        return len(pool) if category == "rewrite" else rng.randint(2, min(4, len(pool)))
    if kind in ("include_word", "exclude_word"):
        name_words = set(topic.key)
        written = {
            _as_written(w, i)
            for s in pool
            for i, w in enumerate(words(s))
            if w.lower() not in STOPWORDS | _BLAND
            and len(w) >= 4
            and not w.isdigit()
            and (kind == "exclude_word" or stem(w) not in name_words)
        }
        candidates = sorted(w for w in written if w is not None)
        if kind == "exclude_word":
            # A forbidden word is only a test if it is tempting: prefer words used often.
            weights = [1 + sum(contains_word(s, w) for s in pool) for w in candidates]
            return rng.choices(candidates, weights)[0] if candidates else None
        return rng.choice(candidates) if candidates else None
    if kind == "starts_with":
        return rng.choice(STARTERS)
    if kind == "ends_with":
        return rng.choice(ENDINGS)
    return None  # lowercase, uppercase


def _draw_constraints(category: str, pool: list[str], topic: Topic, rng: random.Random) -> list[Constraint]:
    kinds = list(_CATEGORY_KINDS.get(category, _KIND_WEIGHTS))
    weights = [_KIND_WEIGHTS[k] * (3 if category == "brainstorming" and k == "bullets" else 1) for k in kinds]
    n = 1 if rng.random() < 0.5 else 2
    chosen: list[Constraint] = []
    while len(chosen) < n:
        kind = rng.choices(kinds, weights)[0]
        if any(c.kind == kind or frozenset((c.kind, kind)) in INCOMPATIBLE for c in chosen):
            continue
        value = _draw_value(kind, category, pool, topic, rng)
        if kind not in ("lowercase", "uppercase") and value is None:
            continue
        chosen.append(Constraint(kind, value))
    return chosen


def _render_prompt(
    category: str,
    topic: Topic,
    source: list[str],
    constraints: list[Constraint],
    rng: random.Random,
) -> tuple[str, list[Constraint]]:
    """The prompt text and its constraints in the order the text states them."""
    task = rng.choice(TASK_TEMPLATES[category]).format(t=topic.name, src=" ".join(source))
    rest = list(constraints)
    ordered: list[Constraint] = []
    if rest[0].kind == "max_words" and task.endswith(".") and '"' not in task and rng.random() < 0.5:
        # "Write about tea in at most 30 words." reads more naturally than a separate sentence.
        task = task[:-1] + EMBEDDED_MAX_WORDS.format(n=rest[0].value) + "."
        ordered.append(rest.pop(0))
    sentences = [task]
    for c in rest:
        sentences.append(c.render(rng.randrange(len(PHRASINGS[c.kind]))))
        ordered.append(c)
    return " ".join(sentences), ordered


@dataclass(frozen=True)
class _Draft:
    text: str
    category: str
    topic: Topic
    constraints: list[Constraint]
    demonstration: str


def _draft_prompt(topics: list[Topic], rng: random.Random) -> _Draft:
    """One prompt and its demonstration; redraws until the demonstration checks out."""
    for _ in range(1000):
        category = rng.choices(CATEGORIES, list(CATEGORY_WEIGHTS.values()))[0]
        topic = rng.choice(topics)
        shuffled = list(topic.sentences)
        rng.shuffle(shuffled)
        source: list[str] = []
        if category in CLOSED_DOMAIN:
            source = [s for s in topic.sentences if s in shuffled[: rng.choice((2, 3))]]
            pool, count = list(source), (1 if category == "summarization" else len(source))
        else:
            pool, count = shuffled, rng.randint(2, 4)
        constraints = _draw_constraints(category, pool, topic, rng)
        demo = compose_response(pool, constraints, count)
        if demo is None:
            continue
        text, constraints = _render_prompt(category, topic, source, constraints, rng)
        if count_words(text) >= MAX_PROMPT_WORDS - 10 or count_words(demo) >= MAX_DEMONSTRATION_WORDS:
            continue  # the 10 spare words leave room for personal details added later
        if parse_constraints(text) != constraints:  # pragma: no cover - a template bug
            raise AssertionError(f"constraints do not round-trip through {text!r}")
        if not all(check(c, demo) for c in constraints):  # pragma: no cover - a composer bug
            raise AssertionError(f"demonstration {demo!r} fails {text!r}")
        return _Draft(text, category, topic, constraints, demo)
    raise RuntimeError("could not draw a satisfiable prompt in 1000 tries")  # pragma: no cover


def _with_personal_details(text: str, rng: random.Random) -> str:
    """The prompt with a fake email or phone number, as API users sometimes paste in."""
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    detail = rng.choice(
        (
            f"My email is {first}.{last}@example.com.",
            f"You can reach me at 555-{rng.randint(200, 989)}-{rng.randint(1000, 9999)}.",
            f"I am {first.title()} {last.title()}, call me at (555) {rng.randint(200, 989)}-{rng.randint(1000, 9999)}.",
            f"Reply to {first}{rng.randint(1, 99)}@example.org please.",
        )
    )
    return f"{detail} {text}" if rng.random() < 0.5 else f"{text} {detail}"


# --------------------------------------------------------------------------------------------
# Pretraining text

_HEADING_UNDERLINE_RE = re.compile(r"^[*=\-~^]{3,}$")
_FOOTNOTE_RE = re.compile(r"\s?\[\d+\]")
_EMPHASIS_RE = re.compile(r"\*(\w[^*]*?)\*")
_ASCII = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2014": "-",
        "\u2013": "-",
        "\u2026": "...",
        "\u00a0": " ",
    }
)


def _prose_paragraphs(doc: str) -> list[str]:
    """The natural-language paragraphs of one pydoc topic: no code, grammar, tables, headings."""
    out = []
    for block in re.split(r"\n\s*\n", doc):
        lines = block.rstrip().splitlines()
        if len(lines) > 1 and not lines[0].startswith(" ") and lines[1].startswith(" "):
            lines = lines[1:]  # a definition list: keep the definition, drop the term
        elif not lines or lines[0].startswith((" ", "\t")):
            continue  # indented: code samples, grammar rules, "See also" entries
        if any(_HEADING_UNDERLINE_RE.match(line.strip()) for line in lines):
            continue  # a section heading
        if any(line.lstrip().startswith(("+", "|", ">>>")) or "::=" in line for line in lines):
            continue  # a table, a doctest or a grammar rule
        text = " ".join(line.strip() for line in lines)
        text = _FOOTNOTE_RE.sub("", text.translate(_ASCII)).replace("**", "")
        text = _EMPHASIS_RE.sub(r"\1", text)
        text = re.sub(r"\s+", " ", text).strip()
        if text.startswith(
            (
                "Changed in version",
                "New in version",
                "Added in version",
                "Deprecated",
                "See also",
                "Note:",
            )
        ):
            continue
        # A paragraph that ends in ":" introduces a code block that was just dropped.
        if not text.endswith((".", ".)")) or not text.isascii():
            continue
        out.append(text)
    return out


def _bounded(paragraph: str, max_words: int) -> list[str]:
    """Split a long paragraph at sentence boundaries into pieces of at most ``max_words``."""
    pieces: list[str] = []
    current: list[str] = []
    for sentence in re.split(r"(?<=\.)\s+(?=[A-Z\"(])", paragraph):
        if current and count_words(" ".join([*current, sentence])) > max_words:
            pieces.append(" ".join(current))
            current = []
        current.append(sentence)
    pieces.append(" ".join(current))
    return [p for p in pieces if count_words(p) <= max_words]


def pretrain_corpus(
    min_words: int = 20, max_words: int = 120, heldout_fraction: float = 0.1
) -> tuple[list[PretrainText], list[PretrainText]]:
    """(train, held-out) prose paragraphs from Python's documentation (``pydoc_data.topics``).

    Paragraphs are cleaned (no code, grammar, tables, markup), cut at sentence boundaries to at
    most ``max_words`` words (about 160 tokens, within the 256-token sequences tether trains on)
    and deduplicated. The split hashes each paragraph's text, so a paragraph's side never
    depends on the seed or on which other paragraphs exist: held-out perplexity stays
    comparable across runs. (The text itself follows the running Python's documentation.)
    """

    seen: set[str] = set()
    train: list[PretrainText] = []
    heldout: list[PretrainText] = []
    for name in sorted(topics):
        for paragraph in _prose_paragraphs(topics[name]):
            for piece in _bounded(paragraph, max_words):
                if count_words(piece) < min_words or piece in seen:
                    continue
                seen.add(piece)
                bucket = int.from_bytes(hashlib.sha256(piece.encode()).digest()[:8], "big")
                side = heldout if bucket / 2**64 < heldout_fraction else train
                side.append(PretrainText(piece))
    return train, heldout


# --------------------------------------------------------------------------------------------
# The task


@dataclass
class DefaultTask:
    """Prompts from simulated users, one demonstration each, and pretraining text."""

    prompts: list[Prompt]
    demonstrations: list[Demonstration]  # one per prompt, same order, with prompt_id
    pretrain_train: list[PretrainText]
    pretrain_heldout: list[PretrainText]
    # Ground truth for tests and reports (not written to the files):
    constraints: dict[str, list[Constraint]] = field(default_factory=dict)  # prompt id -> ...
    topics: dict[str, str] = field(default_factory=dict)  # prompt id -> topic name
    near_duplicates: dict[str, str] = field(default_factory=dict)  # id -> id of the original
    pii_prompt_ids: list[str] = field(default_factory=list)

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write the four JSONL files into ``out_dir``; returns {name: path}."""
        out = Path(out_dir)
        files: dict[str, tuple[Path, Sequence[Record]]] = {
            "prompts": (out / "prompts.jsonl", self.prompts),
            "demonstrations": (out / "demonstrations.jsonl", self.demonstrations),
            "pretrain_train": (out / "pretrain_train.jsonl", self.pretrain_train),
            "pretrain_heldout": (out / "pretrain_heldout.jsonl", self.pretrain_heldout),
        }
        return {name: write_records(path, records) for name, (path, records) in files.items()}


def build_default_task(seed: int = 0, n_users: int = 60, prompts_per_user: int = 8) -> DefaultTask:
    """Generate the default task: ``n_users * prompts_per_user`` prompts with demonstrations.

    About 4 % of the prompts repeat one of the same user's earlier prompts with a few words
    added at the end (they share the whole original as a prefix, at least 64 characters), and
    about 3 % contain a fake email address or phone number; both are at least one when there
    are 30 prompts or more. Same seed, same task.
    """
    if n_users < 1 or prompts_per_user < 1:
        raise ValueError("n_users and prompts_per_user must be at least 1")
    rng = random.Random(seed)
    topics = list(load_topics().values())
    total = n_users * prompts_per_user
    # Which slots hold a near-duplicate or personal details (never the first of a user's
    # prompts, so that a near-duplicate always has an earlier prompt to repeat).
    later = [i for i in range(total) if i % prompts_per_user > 0]
    n_dup = min(len(later), max(1 if total >= 30 else 0, round(0.04 * total)))
    dup_slots = set(rng.sample(later, n_dup))
    rest = [i for i in range(total) if i not in dup_slots]
    pii_slots = set(rng.sample(rest, min(len(rest), max(1 if total >= 30 else 0, round(0.03 * total)))))

    task = DefaultTask([], [], [], [])
    drafts: dict[int, tuple[str, _Draft]] = {}  # slot -> (prompt id, draft) for this user
    for u in range(n_users):
        user_id = f"user-{u + 1:03d}"
        drafts.clear()
        for j in range(prompts_per_user):
            slot = u * prompts_per_user + j
            pid = f"dt{seed}-{slot:05d}"
            originals = [(i, d) for i, d in drafts.values() if len(d.text) >= 70]
            if slot in dup_slots and originals:
                original_id, draft = rng.choice(originals)
                text = draft.text + rng.choice(_NEAR_DUPLICATE_ENDINGS)
                task.near_duplicates[pid] = original_id
            else:
                draft = _draft_prompt(topics, rng)
                text = draft.text
                drafts[slot] = (pid, draft)
            if slot in pii_slots:
                text = _with_personal_details(text, rng)
                task.pii_prompt_ids.append(pid)
            task.prompts.append(Prompt(id=pid, text=text, user_id=user_id, category=draft.category))
            task.demonstrations.append(
                Demonstration(
                    prompt=text,
                    response=draft.demonstration,
                    prompt_id=pid,
                    labeler_id="default-task",
                )
            )
            task.constraints[pid] = list(draft.constraints)
            task.topics[pid] = draft.topic.name
    task.pretrain_train, task.pretrain_heldout = pretrain_corpus()
    return task


def default_splits(seed: int = 0, n_users: int = 60, prompts_per_user: int = 8) -> dict[str, list[Prompt]]:
    """The default task's prompts, preprocessed as in the paper and split by user.

    The one owner of "the default task's train / valid / test prompts" for commands run without
    files (``tether ppo``, ``tether eval``); a ``tether run`` writes its own split to
    ``RUN/data/`` and everything after reads that.
    """
    task = build_default_task(seed=seed, n_users=n_users, prompts_per_user=prompts_per_user)
    return preprocess_prompts(task.prompts, PreprocessConfig(seed=seed)).splits
