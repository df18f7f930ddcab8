"""Responses of mixed quality to the default task's prompts, for tuning and testing the panel.

A reward model is trained on rankings of *model samples*, which are mostly on topic and
partly follow the instructions; some are cut off, loop, or drift. :func:`synthetic_responses`
builds that mix without a model, from the task's own material, so the panel's agreement and
preferences can be measured in milliseconds:

==================  ============================================================================
``demonstration``   the task's demonstration (satisfies everything)
``alternative``     another correct answer from other sentences / another order
``broken``          the demonstration's sentences with one constraint broken
``unconstrained``   a natural answer that ignores the constraints (what a base model does)
``off_topic``       follows the constraints, but about another topic
``hallucinated``    closed-domain only: adds a sentence the quoted text does not contain
``truncated``       cut off mid-sentence (the generation hit its token limit)
``repetitive``      a repetition loop
``junk``            mojibake and stray symbols in otherwise fine text
==================  ============================================================================

The variant of each response is recorded in ``Sample.policies`` as ``"synthetic:<variant>"``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from tether.data.constraints import Constraint, check, contains_word, split_sentences, words
from tether.data.formats import Sample
from tether.data.task import (
    CLOSED_DOMAIN,
    DefaultTask,
    Topic,
    compose_response,
    find_topic,
    load_topics,
    parse_constraints,
    quoted_source,
)

__all__ = ["VARIANT_WEIGHTS", "break_constraint", "sentences_of", "synthetic_responses"]

# How often each kind of response is drawn (relative). Broken-constraint and unconstrained
# answers dominate, as they do among a small SFT model's samples.
VARIANT_WEIGHTS: dict[str, float] = {
    "demonstration": 1.0,
    "alternative": 1.0,
    "broken": 2.0,
    "unconstrained": 1.5,
    "off_topic": 0.5,
    "hallucinated": 0.7,
    "truncated": 1.0,
    "repetitive": 0.5,
    "junk": 0.3,
}
_MOJIBAKE = ("\u00e2\u20ac\u2122", "\u00c3\u00a9", "\ufffd", "\u00e2\u20ac\u0153", "#@", "&&")


def sentences_of(response: str, sentences: list[str] | tuple[str, ...]) -> list[str]:
    """The ``sentences`` a composed response contains, in the order it contains them.

    Matching ignores case, so it undoes lowercasing, capitals, bullets and added phrases.
    """
    low = response.lower()
    found = [(low.find(s.lower()), s) for s in sentences if s.lower() in low]
    return [s for _, s in sorted(found)]


def break_constraint(
    units: list[str],
    constraints: list[Constraint],
    target: Constraint,
    pool: list[str],
    rng: random.Random,
) -> str | None:
    """``units`` composed under ``constraints`` except that ``target`` is broken, or None.

    The other constraints still hold where they can; ``pool`` supplies extra sentences
    (to exceed a limit, or to bring in a forbidden word).
    """
    others = [c for c in constraints if c != target]
    spare = [s for s in pool if s not in units]
    rng.shuffle(spare)
    kind, value = target.kind, target.value
    text: str | None
    if kind in ("lowercase", "uppercase", "starts_with", "ends_with"):
        text = compose_response(units, others, len(units))
    elif kind == "max_words":
        text = None
        for m in range(len(units) + 1, len(units) + len(spare) + 1):
            extended = units + spare[: m - len(units)]
            text = compose_response(extended, others, len(extended))
            if text is not None and not check(target, text):
                break
    elif kind in ("num_sentences", "bullets"):
        n = int(value)  # type: ignore[arg-type]
        if kind == "bullets" and rng.random() < 0.3:
            text = compose_response(units, others, len(units))  # a paragraph, not a list
        elif spare and (n == 1 or rng.random() < 0.6):
            text = compose_response(units + spare[:1], [*others, Constraint(kind, n + 1)])
        elif n > 1:
            text = compose_response(units[:-1], [*others, Constraint(kind, n - 1)])
        else:
            return None
    elif kind == "include_word":
        # Swap the sentences holding the required word for others.
        kept = [s for s in units if not contains_word(s, str(value))]
        fill = [s for s in spare if not contains_word(s, str(value))]
        text = compose_response(kept + fill, others, len(units))
    elif kind == "exclude_word":
        tempting = [s for s in spare if contains_word(s, str(value))]
        if not tempting:
            return None
        at = rng.randrange(len(units) + 1)
        extended = units[:at] + tempting[:1] + units[at:]
        text = compose_response(extended, others, len(extended))
    else:  # pragma: no cover - every kind is handled above
        raise ValueError(kind)
    return text if text is not None and not check(target, text) else None


def _truncate(text: str, rng: random.Random) -> str | None:
    tokens = text.split(" ")
    if len(tokens) < 6:
        return None
    cut = " ".join(tokens[: rng.randint(int(0.4 * len(tokens)) + 1, len(tokens) - 2)])
    return cut.rstrip(".!?,;: ")


def _repeat(sentence: str, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return " ".join([sentence] * rng.randint(3, 6))
    # A phrase loop, the classic failure of greedy decoding in small models.
    phrase = " ".join(sentence.rstrip(".").split()[: rng.randint(3, 5)])
    return " ".join([phrase] * rng.randint(4, 8)) + "."


def _junk(text: str, rng: random.Random) -> str:
    tokens = text.split(" ")
    for _ in range(max(2, len(tokens) // 4)):
        i = rng.randrange(len(tokens))
        tokens[i] = tokens[i] + rng.choice(_MOJIBAKE)
    return " ".join(tokens)


def _variants(
    prompt_text: str,
    demo: str,
    topic: Topic,
    category: str | None,
    constraints: list[Constraint],
    rng: random.Random,
) -> dict[str, Callable[[], str | None]]:
    """A maker per variant for one prompt; each may return None when it does not apply."""
    source = quoted_source(prompt_text)
    closed = source is not None or category in CLOSED_DOMAIN
    pool = split_sentences(source) if source else list(topic.sentences)
    units = sentences_of(demo, pool) or sentences_of(demo, topic.sentences)
    others = [t for t in load_topics().values() if t.name != topic.name]

    def shuffled(sentences: Iterable[str]) -> list[str]:
        out = list(sentences)
        rng.shuffle(out)
        return out

    def natural_count() -> int:
        return len(pool) if closed else rng.randint(2, 4)

    def alternative() -> str | None:
        return compose_response(shuffled(pool), constraints, natural_count())

    def broken() -> str | None:
        for target in rng.sample(constraints, len(constraints)):
            text = break_constraint(units, constraints, target, list(topic.sentences), rng)
            if text is not None:
                return text
        return None

    def unconstrained() -> str | None:
        return compose_response(shuffled(pool), [], natural_count())

    def off_topic() -> str | None:
        other = rng.choice(others)
        sentences = shuffled(other.sentences)
        kept = [c for c in constraints if c.kind not in ("include_word", "exclude_word")]
        return compose_response(sentences, constraints, natural_count()) or compose_response(
            sentences, kept, natural_count()
        )

    def hallucinated() -> str | None:
        if not closed:
            return None
        extra = [s for s in topic.sentences if s not in pool]
        if not extra or not units:
            return None
        # One sentence the quoted text does not contain, slipped in among the real ones.
        at = rng.randrange(1, len(units) + 1)
        padded = units[:at] + shuffled(extra)[:1] + units[at:]
        adjusted = [
            Constraint(c.kind, len(padded)) if c.kind in ("bullets", "num_sentences") else c
            for c in constraints
            if c.kind != "max_words"
        ]
        return compose_response(padded, adjusted, len(padded))

    def truncated() -> str | None:
        return _truncate(rng.choice([demo, unconstrained() or demo]), rng)

    def repetitive() -> str:
        return _repeat(rng.choice(pool), rng)

    def junk() -> str | None:
        base = unconstrained()
        return _junk(base, rng) if base else None

    return {
        "demonstration": lambda: demo,
        "alternative": alternative,
        "broken": broken,
        "unconstrained": unconstrained,
        "off_topic": off_topic,
        "hallucinated": hallucinated,
        "truncated": truncated,
        "repetitive": repetitive,
        "junk": junk,
    }


def synthetic_responses(task: DefaultTask, k: int = 4, seed: int = 0) -> list[Sample]:
    """One sample of ``k`` distinct responses of mixed quality per prompt of ``task``.

    Variants are drawn by :data:`VARIANT_WEIGHTS` (a variant may appear twice, e.g. two
    different broken constraints). Deterministic in ``seed``.
    """
    if not 2 <= k <= 9:
        raise ValueError(f"k must be 2..9, got {k}")
    topics = load_topics()
    names, weights = list(VARIANT_WEIGHTS), list(VARIANT_WEIGHTS.values())
    samples = []
    for i, (prompt, demo) in enumerate(zip(task.prompts, task.demonstrations, strict=True)):
        rng = random.Random(f"{seed}:{i}")
        topic = topics.get(task.topics.get(prompt.id, "")) or find_topic(prompt.text)
        if topic is None:
            raise ValueError(f"prompt {prompt.id} is about none of the default task's topics")
        constraints = task.constraints.get(prompt.id) or parse_constraints(prompt.text)
        makers = _variants(prompt.text, demo.response, topic, prompt.category, constraints, rng)
        responses: list[str] = []
        policies: list[str] = []
        for _ in range(200):
            if len(responses) == k:
                break
            variant = rng.choices(names, weights)[0]
            text = makers[variant]()
            if text is None or not words(text) or text in responses:
                continue
            responses.append(text)
            policies.append(f"synthetic:{variant}")
        order = list(range(len(responses)))
        rng.shuffle(order)
        samples.append(
            Sample(
                prompt=prompt.text,
                responses=[responses[j] for j in order],
                prompt_id=prompt.id,
                policies=[policies[j] for j in order],
                user_id=prompt.user_id,
                category=prompt.category,
            )
        )
    return samples
