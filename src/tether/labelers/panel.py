"""The simulated labeler panel: tether's stand-in for the paper's human labelers.

Each labeler reads a (prompt, response) pair the way a careful person following the
InstructGPT guidelines would, from the text alone:

* **constraints** — the fraction of the prompt's verifiable constraints the response satisfies
  (parsed from the prompt wording, :func:`tether.data.constraints.parse_constraints`);
* **on topic** — the response talks about what was asked (topic keywords present);
* **helpful** — it attempts the task: has content about the subject, is no refusal, no loop
  and no echo of the prompt, and (closed-domain prompts) makes nothing up;
* **grounded** — each sentence can be checked against what the labeler knows: the quoted text
  of a closed-domain prompt (rewrite, summarize, answer from a text), or the facts packaged
  with a default-task topic;
* **fluency** — no repetition loops, no word salad, no junk characters, not cut off
  mid-sentence;
* **length** — some labelers like concise answers, some like detail.

A labeler's latent utility is a weighted sum of these (weights differ per labeler: they have
different tastes) plus per-judgement noise. The noise is Gumbel, so a single labeler prefers a
over b with probability ``sigmoid((u_a - u_b) / noise)`` — the Bradley-Terry model the reward
model's loss assumes — and ranking K responses by noisy utility is a Plackett-Luce draw.
Responses whose noisy utilities lie within the labeler's tie threshold are ranked equal.
Identical responses get identical noise within one judgement, so they always tie.

The default panel has 8 labelers; 2 of them are **held out**: their labels are never used for
training (:meth:`Panel.label` leaves them out unless asked), only for evaluation, to check that
a model did not just fit the training labelers' tastes (InstructGPT §4.1).

The noise and the spread of tastes are tuned to the paper's inter-labeler agreement
(72.6 ± 1.5 %): on the mixed-quality responses of :func:`synthetic_responses` (default task,
K = 4, six training labelers per sample) the default panel agrees on 73.7 % of judgement
pairs; on 128 temperature-1 samples of SmolLM2-135M-Instruct, 74.9 %; over panel seeds 0-5,
69.7-77.3 % (mean 72.7 %).

What earns a high score, so that reward hacking can be anticipated: every parsed constraint
satisfied, at least two of the topic's distinctive words, five or more content words, every
sentence built from words the labeler knows for that topic, a final ". ! ?", no repeated
trigrams, enough function words to read as sentences. Length matters little (±0.35 at most,
and labelers disagree on its sign). Truth beyond the packaged facts is not judged.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import numpy as np

from tether.data.constraints import (
    bullet_items,
    check,
    parse_constraints,
    split_sentences,
    words,
)
from tether.data.formats import FLAGS, LIKERT_MAX, LIKERT_MIN, Comparison, Prompt, Sample
from tether.data.task import (
    STOPWORDS,
    content_words,
    find_topic,
    load_topics,
    quoted_source,
    stem,
)
from tether.labelers.synthetic import synthetic_responses

__all__ = [
    "JUDGED_FLAGS",
    "Features",
    "Judgement",
    "Labeler",
    "Panel",
    "WinRate",
    "read_response",
    "synthetic_responses",
]

# The metadata flags the panel actually judges (a subset of formats.FLAGS). The others (sexual
# or violent content, harmful advice, denigration) need a content classifier; the panel leaves
# them out rather than claim a False it never checked.
JUDGED_FLAGS: tuple[str, ...] = (
    "fails_instruction",
    "satisfies_constraint",
    "hallucination",
    "inappropriate",
    "expresses_opinion",
)
assert set(JUDGED_FLAGS) <= set(FLAGS)

# Length is judged relative to this many words (about the default task's demonstrations).
_TYPICAL_WORDS = 25

_REFUSAL_RE = re.compile(
    r"\b(?:i cannot|i can't|i can not|i'm sorry|i am sorry|as an ai|i am unable|i'm unable|"
    r"i don't know|i do not know)\b",
    re.IGNORECASE,
)
_OPINION_RE = re.compile(
    r"\b(?:i think|i believe|in my opinion|i feel that|personally|i prefer|my favorite)\b",
    re.IGNORECASE,
)
_CONTACT_RE = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+|\(?\b\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b")
_RUDE = frozenset("idiot idiots stupid dumb moron damn crap".split())
# Words of the instruction itself, which say nothing about the subject of a prompt.
_INSTRUCTION_WORDS = frozenset(
    stem(w)
    for w in """write answer words word use using reply response sentence sentences bullet
    bullets point points letters lowercase capital capitals exactly most tell know short
    paragraph note list facts fun give summary summarize rewrite following text read based
    learn say says hi hello curious reading lately interesting thanks thank please start
    begin end finish include avoid phrase everything only""".split()
)


# --------------------------------------------------------------------------------------------
# Reading a response: noise-free features every labeler sees the same way


@dataclass(frozen=True)
class Features:
    """What a careful reader notices about one response to one prompt (no taste, no noise)."""

    satisfied: tuple[bool, ...]  # one per constraint parsed from the prompt
    on_topic: float  # [0, 1]: topic keywords present (2 distinct ones = fully on topic)
    helpful: float  # [0, 1]: has content, attempts the task, stays with a quoted source
    grounded: float  # [0, 1]: share of sentences the labeler can check against what they know
    fluency: float  # [0, 1]: 1 minus penalties for repetition, salad, junk, truncation
    length: float  # [-1, 1]: tanh of log length relative to a typical answer
    n_words: int
    empty: bool
    degenerate: bool  # a repetition loop, word salad or junk characters
    truncated: bool  # does not end with . ! or ? (bullets: last item alone lacks one)
    refusal: bool
    echo: bool  # mostly repeats the prompt
    hallucination: bool  # closed-domain prompt, response adds what the quoted text lacks
    opinion: bool
    inappropriate: bool  # rude, or leaks contact details

    @property
    def constraint_score(self) -> float:
        """Fraction of the prompt's constraints satisfied (1.0 when it states none)."""
        return sum(self.satisfied) / len(self.satisfied) if self.satisfied else 1.0


# Characters a model may legitimately write outside ASCII: typographic quotes and dashes.
_TYPOGRAPHIC = frozenset("\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u00a0")
_SYMBOL_RUN_RE = re.compile(r"[#@&$%^~|\\<>{}]{2,}")


def _is_junk(token: str) -> bool:
    """A whitespace-separated token holding mojibake, control characters or symbol runs."""
    for c in token:
        if c == "\ufffd" or (c.isascii() and not c.isprintable()):
            return True
        if not c.isascii() and not c.isalpha() and c not in _TYPOGRAPHIC:
            return True
    return _SYMBOL_RUN_RE.search(token) is not None


@cache
def _known_words(topic_name: str) -> frozenset[str]:
    """Content words of a default-task topic's packaged sentences: what the labelers know."""
    return frozenset(content_words(" ".join(load_topics()[topic_name].sentences)))


def _repetition(tokens: list[str]) -> float:
    """Fraction of repeated word trigrams (0 for natural text, near 1 for a loop)."""
    grams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    if len(grams) < 4:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@lru_cache(maxsize=65536)
def read_response(prompt: str, response: str) -> Features:
    """The features of ``response`` as an answer to ``prompt`` (cached: labelers share them)."""
    text = response.strip()
    tokens = [w.lower() for w in words(text)]
    n = len(tokens)
    satisfied = tuple(check(c, text) for c in parse_constraints(prompt))
    if n == 0:
        return Features(
            satisfied, on_topic=0.0, helpful=0.0, grounded=0.0, fluency=0.0, length=-1.0, n_words=0,
            empty=True, degenerate=True, truncated=True, refusal=False,
            echo=False, hallucination=False, opinion=False, inappropriate=False,
        )  # fmt: skip

    # On topic: the packaged topic's distinctive words, or else the prompt's own content words.
    said = set(content_words(text))
    topic = find_topic(prompt)
    source = quoted_source(prompt)
    if topic is not None:
        on_topic = min(1.0, len(said & topic.keywords) / 2)
    else:
        asked = set(content_words(prompt.replace(source or "", ""))) - _INSTRUCTION_WORDS
        on_topic = min(1.0, len(said & asked) / min(2, len(asked))) if asked else 1.0

    # Fluency: penalties a reader would notice, each capped.
    repetition = _repetition(tokens)
    pieces = text.split()
    junk = sum(1 for p in pieces if _is_junk(p)) / len(pieces)
    function_share = sum(t in STOPWORDS for t in tokens) / n
    salad = n >= 10 and function_share < 0.12  # lists of keywords, no sentences
    items = bullet_items(text)
    if items is not None:
        # Bullets need no full stop, but a last item without one when the others have it
        # was cut off.
        stops = [item.endswith((".", "!", "?")) for item in items]
        truncated = any(stops[:-1]) and not stops[-1]
    else:
        truncated = not text.rstrip("\"')]*").endswith((".", "!", "?"))
    # Natural text repeats a trigram now and then ("can be recycled"); loops repeat most.
    fluency = 1.0 - min(1.0, 2.5 * max(0.0, repetition - 0.1)) - min(1.0, 3.0 * junk)
    fluency -= 0.5 * salad + 0.5 * truncated
    fluency = max(0.0, fluency)
    degenerate = repetition > 0.3 or junk > 0.15 or salad

    # Helpful: attempts the task with some substance.
    refusal = _REFUSAL_RE.search(text) is not None
    prompt_tokens = [w.lower() for w in words(prompt.replace(source or "", ""))]
    prompt_grams = {tuple(prompt_tokens[i : i + 3]) for i in range(len(prompt_tokens) - 2)}
    grams = [tuple(tokens[i : i + 3]) for i in range(n - 2)]
    echo = bool(grams) and sum(g in prompt_grams for g in grams) / len(grams) > 0.5
    # Grounded: each sentence says something the labeler can check. Closed domain: against
    # the quoted text (a sentence that mostly is not from it is the paper's closed-domain
    # hallucination). A default-task topic: against the facts packaged with it, which is
    # what these labelers know. Any other prompt: not judged.
    known: set[str] | None = None
    if source is not None:
        known = set(content_words(prompt))
    elif topic is not None:
        known = set(content_words(prompt)) | _known_words(topic.name)
    claims = [set(content_words(s)) for s in split_sentences(text)]
    claims = [c for c in claims if len(c) >= 2]
    made_up = sum(len(c & known) / len(c) < 0.5 for c in claims) if known is not None else 0
    grounded = 1.0 - made_up / len(claims) if claims else 1.0
    hallucination = source is not None and made_up > 0

    # Substance, about the subject: an off-topic answer does not help however well written.
    helpful = min(1.0, len(said) / 5) * on_topic
    if hallucination:
        # One made-up sentence makes a closed-domain answer untrustworthy as a whole.
        helpful *= 0.4 * grounded
    if refusal:
        helpful = 0.0
    elif echo or degenerate:
        helpful *= 0.3  # the words may be on topic, but nobody is helped by a loop or an echo

    length = math.tanh((math.log(n + 1) - math.log(_TYPICAL_WORDS + 1)) / 0.6)
    opinion = _OPINION_RE.search(text) is not None
    inappropriate = bool(_RUDE & set(tokens)) or _CONTACT_RE.search(text) is not None
    return Features(
        satisfied=satisfied,
        on_topic=on_topic,
        helpful=helpful,
        grounded=grounded,
        fluency=fluency,
        length=length,
        n_words=n,
        empty=False,
        degenerate=degenerate,
        truncated=truncated,
        refusal=refusal,
        echo=echo,
        hallucination=hallucination,
        opinion=opinion,
        inappropriate=inappropriate,
    )


def judged_flags(features: Features) -> dict[str, bool]:
    """The metadata flags (InstructGPT Table 3) a labeler gives a response with ``features``.

    ``fails_instruction`` is the paper's "fails to follow the correct instruction / task": the
    response does not attempt what was asked (empty, degenerate, off topic, a refusal, an echo).
    Breaking a stated constraint is the separate ``satisfies_constraint`` (True when every
    constraint parsed from the prompt holds; vacuously True when the prompt states none).
    ``hallucination`` is judged for closed-domain prompts only (a quoted source text).
    """
    fails = features.empty or features.degenerate or features.refusal or features.echo or features.on_topic < 0.5
    return {
        "fails_instruction": fails,
        "satisfies_constraint": all(features.satisfied) and not features.empty,
        "hallucination": features.hallucination,
        "inappropriate": features.inappropriate,
        "expresses_opinion": features.opinion,
    }


# --------------------------------------------------------------------------------------------
# Labelers


@dataclass(frozen=True)
class Labeler:
    """One simulated labeler: how much they weigh each quality, and how noisy they are."""

    id: str
    heldout: bool
    w_constraints: float  # weight on the fraction of constraints satisfied
    w_topic: float
    w_helpful: float
    w_grounded: float
    w_fluency: float
    w_length: float  # > 0 likes detail, < 0 likes concise answers
    noise: float  # Gumbel scale of the per-judgement noise on the utility
    tie_threshold: float  # noisy utilities closer than this are ranked equal
    leniency: float  # shifts Likert scores (some people grade harder than others)

    @property
    def max_utility(self) -> float:
        """The noise-free utility of a perfect, typical-length response."""
        return self.w_constraints + self.w_topic + self.w_helpful + self.w_grounded + self.w_fluency

    def utility(self, f: Features) -> float:
        """Noise-free latent utility of a response with features ``f``."""
        if f.empty:
            return 0.0
        return (
            self.w_constraints * f.constraint_score
            + self.w_topic * f.on_topic
            + self.w_helpful * f.helpful
            + self.w_grounded * f.grounded
            + self.w_fluency * f.fluency
            + self.w_length * f.length
        )

    def likert(self, utility: float) -> int:
        """A 1-7 score from a (noisy) utility: linear in the share of the best utility."""
        share = utility / self.max_utility + self.leniency
        score = LIKERT_MIN + (LIKERT_MAX - LIKERT_MIN) * (share - _LIKERT_FLOOR) / (1 - _LIKERT_FLOOR)
        return int(min(LIKERT_MAX, max(LIKERT_MIN, round(score))))


# A response with less than this share of the best utility gets the lowest Likert score.
_LIKERT_FLOOR = 0.4


@dataclass(frozen=True)
class PanelConfig:
    """How a panel's labelers are drawn. Defaults are tuned to ~73 % inter-labeler agreement."""

    n_labelers: int = 8
    n_heldout: int = 2
    seed: int = 0
    # Mean weights; each labeler's weight is the mean times exp(N(0, taste_spread)).
    w_constraints: float = 2.0
    w_topic: float = 2.0
    w_helpful: float = 1.5
    w_grounded: float = 1.0
    w_fluency: float = 1.5
    length_spread: float = 0.35  # w_length ~ U(-length_spread, +length_spread)
    taste_spread: float = 0.5
    noise: float = 0.9  # mean Gumbel scale; each labeler's is within +-25 % of it
    tie_threshold: float = 0.06  # mean; each labeler's is within +-50 % of it
    leniency_spread: float = 0.05


@dataclass(frozen=True)
class Judgement:
    """One labeler's reading of one response: Likert 1-7, flags and the noisy utility."""

    likert: int
    flags: dict[str, bool]
    utility: float


@dataclass(frozen=True)
class WinRate:
    """How often responses beat baseline responses (ties count half), with a 95 % interval."""

    rate: float
    ci_low: float
    ci_high: float
    n: int  # prompts compared (bootstrap units)
    preferences: tuple[float, ...] = ()  # per response pair: the judges' mean preference


def _gumbel(rng: np.random.Generator, scale: float, size: int | None = None) -> Any:
    # Centred so that noise does not shift Likert scores on average; rankings are unaffected.
    return rng.gumbel(-np.euler_gamma * scale, scale, size)


def _tied_ranks(utilities: Sequence[float], threshold: float) -> list[int]:
    """Dense ranks (1 = best) of utilities, chaining values closer than ``threshold`` into ties."""
    order = sorted(range(len(utilities)), key=lambda i: -utilities[i])
    ranks = [0] * len(utilities)
    rank = 1
    for pos, i in enumerate(order):
        if pos > 0 and utilities[order[pos - 1]] - utilities[i] >= threshold:
            rank += 1
        ranks[i] = rank
    return ranks


class Panel:
    """A panel of simulated labelers; ``Panel()`` is the default 8 (2 held out)."""

    def __init__(self, config: PanelConfig | None = None, labelers: list[Labeler] | None = None):
        self.config = config or PanelConfig()
        self.labelers: list[Labeler] = labelers if labelers is not None else self._draw(self.config)
        ids = [lab.id for lab in self.labelers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"labeler ids must be unique, got {ids}")

    @staticmethod
    def _draw(c: PanelConfig) -> list[Labeler]:
        if not 0 <= c.n_heldout < c.n_labelers:
            raise ValueError("need 0 <= n_heldout < n_labelers")
        rng = np.random.default_rng([c.seed, 0x1ABE1])

        def taste(mean: float) -> float:
            # Log-normal around the mean, clipped at two spreads: tastes differ, but nobody
            # cares eight times as much about one quality as the average labeler does.
            z = float(np.clip(rng.normal(0.0, 1.0), -2.0, 2.0))
            return mean * math.exp(c.taste_spread * z)

        labelers = []
        for i in range(c.n_labelers):
            labelers.append(
                Labeler(
                    id=f"sim-{i + 1}",
                    heldout=i >= c.n_labelers - c.n_heldout,
                    w_constraints=taste(c.w_constraints),
                    w_topic=taste(c.w_topic),
                    w_helpful=taste(c.w_helpful),
                    w_grounded=taste(c.w_grounded),
                    w_fluency=taste(c.w_fluency),
                    w_length=float(rng.uniform(-c.length_spread, c.length_spread)),
                    noise=float(c.noise * rng.uniform(0.75, 1.25)),
                    tie_threshold=float(c.tie_threshold * rng.uniform(0.5, 1.5)),
                    leniency=float(rng.normal(0.0, c.leniency_spread)),
                )
            )
        return labelers

    @property
    def train_labelers(self) -> list[Labeler]:
        """Labelers whose labels may be trained on."""
        return [lab for lab in self.labelers if not lab.heldout]

    @property
    def heldout_labelers(self) -> list[Labeler]:
        """Labelers used only for evaluation, never for training data."""
        return [lab for lab in self.labelers if lab.heldout]

    def labeler(self, labeler_id: str) -> Labeler:
        """The labeler with this id."""
        for lab in self.labelers:
            if lab.id == labeler_id:
                return lab
        raise KeyError(f"no labeler {labeler_id!r} on this panel")

    def _resolve(self, labeler: Labeler | str) -> Labeler:
        return self.labeler(labeler) if isinstance(labeler, str) else labeler

    @staticmethod
    def _rng(seed: int, item: int, labeler: Labeler) -> np.random.Generator:
        # One stream per (seed, item, labeler): a judgement's noise never depends on which
        # other labelers or items are in the run.
        return np.random.default_rng([seed, item, zlib.crc32(labeler.id.encode())])

    # ---- single judgements -------------------------------------------------------------------

    def judge(self, labeler: Labeler | str, prompt: str, response: str, rng: np.random.Generator) -> Judgement:
        """One labeler's Likert score, flags and noisy utility for one response."""
        lab = self._resolve(labeler)
        f = read_response(prompt, response)
        utility = lab.utility(f) + float(_gumbel(rng, lab.noise))
        return Judgement(lab.likert(utility), judged_flags(f), utility)

    def prefer(self, labeler: Labeler | str, prompt: str, a: str, b: str, rng: np.random.Generator) -> float:
        """1.0 if the labeler prefers ``a``, 0.0 if ``b``, 0.5 for a tie."""
        lab = self._resolve(labeler)
        if a == b:
            return 0.5
        noise = _gumbel(rng, lab.noise, 2)
        ua = lab.utility(read_response(prompt, a)) + float(noise[0])
        ub = lab.utility(read_response(prompt, b)) + float(noise[1])
        if abs(ua - ub) < lab.tie_threshold:
            return 0.5
        return 1.0 if ua > ub else 0.0

    def expected_prefer(self, labeler: Labeler | str, prompt: str, a: str, b: str) -> float:
        """The exact expectation of :meth:`prefer` over the labeler's noise: P(a) + P(tie) / 2.

        Each utility gets independent Gumbel noise of scale s, so their difference is logistic:
        with d = u_a − u_b and tie threshold τ, P(a) = σ((d − τ)/s) and P(b) = σ((−d − τ)/s).
        """
        lab = self._resolve(labeler)
        if a == b:
            return 0.5
        d = lab.utility(read_response(prompt, a)) - lab.utility(read_response(prompt, b))
        return _expected_preference(np.asarray(d), lab.noise, lab.tie_threshold).item()

    def rank(
        self,
        labeler: Labeler | str,
        prompt: str,
        responses: Sequence[str],
        rng: np.random.Generator,
    ) -> tuple[list[int], list[float]]:
        """(ranks, noisy utilities) of K responses by one labeler; equal ranks are ties."""
        lab = self._resolve(labeler)
        # One noise draw per distinct text: the same words read the same way twice.
        distinct = list(dict.fromkeys(responses))
        noise = dict(zip(distinct, _gumbel(rng, lab.noise, len(distinct)), strict=True))
        utilities = [lab.utility(read_response(prompt, r)) + float(noise[r]) for r in responses]
        return _tied_ranks(utilities, lab.tie_threshold), utilities

    # ---- labeling and evaluation -------------------------------------------------------------

    def label(
        self,
        samples: list[Sample],
        labelers_per_sample: int = 1,
        labelers: list[Labeler] | None = None,
        seed: int = 0,
        first_index: int = 0,
    ) -> list[Comparison]:
        """Rank each sample's K responses by ``labelers_per_sample`` labelers each.

        Labelers default to the training labelers (never the held-out ones) and are assigned
        round-robin over an order shuffled by ``seed``, so workloads are even. Each comparison
        also carries per-response Likert scores and :data:`JUDGED_FLAGS`. A judgement that
        ties all K responses holds no pair and is left out (the comparison format rejects it),
        so the result can be shorter than ``len(samples) * labelers_per_sample``. Deterministic
        in ``seed``; one comparison's noise does not depend on any other's. ``samples`` may be a
        shard ``all[a:b]`` of a list (``first_index=a``): its comparisons are those the whole list
        gives for those samples, in order.
        """
        pool = list(labelers) if labelers is not None else self.train_labelers
        if not 1 <= labelers_per_sample <= len(pool):
            raise ValueError(
                f"labelers_per_sample must be 1..{len(pool)} (labelers available), got {labelers_per_sample}"
            )
        order = [pool[i] for i in np.random.default_rng([seed, 0x0DE7]).permutation(len(pool))]
        out = []
        for s_idx, sample in enumerate(samples, start=first_index):
            for j in range(labelers_per_sample):
                lab = order[(s_idx * labelers_per_sample + j) % len(order)]
                ranks, utilities = self.rank(lab, sample.prompt, sample.responses, self._rng(seed, s_idx, lab))
                if len(set(ranks)) == 1:
                    continue
                feats = [read_response(sample.prompt, r) for r in sample.responses]
                out.append(
                    Comparison(
                        prompt=sample.prompt,
                        responses=list(sample.responses),
                        ranking=ranks,
                        labeler_id=lab.id,
                        prompt_id=sample.prompt_id,
                        likert=[lab.likert(u) for u in utilities],
                        flags=[judged_flags(f) for f in feats],
                        policies=list(sample.policies) if sample.policies else None,
                        ended=list(sample.ended) if sample.ended is not None else None,
                        response_ids=sample.response_ids,
                    )
                )
        return out

    def _pairs(
        self,
        what: str,
        prompts: Sequence[str | Prompt],
        responses: Sequence[str],
        baseline_responses: Sequence[str],
        labelers: list[Labeler] | None,
        clusters: Sequence[int] | None,
    ) -> tuple[list[str], list[Labeler], np.ndarray]:
        """(prompt texts, judges, dense prompt id per pair) for the win rates, inputs checked."""
        if not (len(prompts) == len(responses) == len(baseline_responses)):
            raise ValueError("prompts, responses and baseline_responses must have equal length")
        if not prompts:
            raise ValueError(f"{what} needs at least one prompt")
        if clusters is not None and len(clusters) != len(prompts):
            raise ValueError(f"{what}: {len(clusters)} cluster ids for {len(prompts)} pairs")
        judges = list(labelers) if labelers is not None else self.heldout_labelers
        if not judges:
            raise ValueError("no labelers to judge with (this panel has no held-out labelers)")
        texts = [p.text if isinstance(p, Prompt) else p for p in prompts]
        ids = np.unique(np.asarray(clusters if clusters is not None else range(len(texts))), return_inverse=True)[1]
        return texts, judges, ids

    def win_rate(
        self,
        prompts: Sequence[str | Prompt],
        responses: Sequence[str],
        baseline_responses: Sequence[str],
        labelers: list[Labeler] | None = None,
        seed: int = 0,
        n_bootstrap: int = 2000,
        clusters: Sequence[int] | None = None,
    ) -> WinRate:
        """How often ``responses[i]`` is preferred over ``baseline_responses[i]``.

        Every labeler in ``labelers`` (default: the held-out ones, so that evaluation does not
        reuse the tastes the reward model was trained on) judges every pair; ties count half.
        ``clusters[i]`` names the prompt of pair ``i`` when a prompt has several sampled pairs
        (default: every pair its own prompt). The rate is the mean over prompts of each
        prompt's mean preference. The 95 % interval is a percentile bootstrap over prompts
        (``n_bootstrap`` resamples, seeded), which accounts for labelers judging the same
        prompt, and samples of the same prompt, not being independent.
        """
        texts, judges, ids = self._pairs("win_rate", prompts, responses, baseline_responses, labelers, clusters)
        per_pair = np.empty(len(texts))
        for i, (text, a, b) in enumerate(zip(texts, responses, baseline_responses, strict=True)):
            per_pair[i] = np.mean([self.prefer(lab, text, a, b, self._rng(seed, i, lab)) for lab in judges])
        per_prompt = np.bincount(ids, weights=per_pair) / np.bincount(ids)
        low, high = _bootstrap_interval(per_prompt, seed, n_bootstrap)
        return WinRate(float(per_prompt.mean()), low, high, len(per_prompt), tuple(per_pair.tolist()))

    def expected_win_rate(
        self,
        prompts: Sequence[str | Prompt],
        responses: Sequence[str],
        baseline_responses: Sequence[str],
        labelers: list[Labeler] | None = None,
        seed: int = 0,
        n_bootstrap: int = 2000,
        clusters: Sequence[int] | None = None,
    ) -> WinRate:
        """The win rate :meth:`win_rate` estimates, with the labelers' noise integrated out exactly.

        For every pair of a policy response and a baseline response to the same prompt (all
        n × n pairs when a prompt has n samples of each: each pair is an unbiased estimate of the
        same expectation, and using all of them averages out more sampling noise), every judge's
        :meth:`expected_prefer`; the rate is the mean over prompts of each prompt's mean, with a
        percentile bootstrap over prompts. ``preferences`` holds each response's mean over its
        prompt's baseline responses and the judges. Only a simulated panel allows this: people's
        noise model is unknown, so for them only sampled verdicts exist.
        """
        texts, judges, ids = self._pairs(
            "expected_win_rate", prompts, responses, baseline_responses, labelers, clusters
        )
        # Noise-free utilities, one row per judge: [J, N] for the policy and for the baseline.
        feats = [read_response(t, r) for t, r in zip(texts, responses, strict=True)]
        feats0 = [read_response(t, r) for t, r in zip(texts, baseline_responses, strict=True)]
        u = np.array([[lab.utility(f) for f in feats] for lab in judges])
        u0 = np.array([[lab.utility(f) for f in feats0] for lab in judges])
        per_response = np.empty(len(texts))
        for c in range(ids.max() + 1):
            rows = np.flatnonzero(ids == c)
            d = u[:, rows, None] - u0[:, None, rows]  # [J, n, n]: every policy × baseline pair
            pref = np.stack([_expected_preference(d[j], lab.noise, lab.tie_threshold) for j, lab in enumerate(judges)])
            same = np.array([[responses[int(i)] == baseline_responses[int(k)] for k in rows] for i in rows])
            pref = np.where(same[None], 0.5, pref)  # identical texts always tie
            per_response[rows] = pref.mean(axis=(0, 2))
        per_prompt = np.bincount(ids, weights=per_response) / np.bincount(ids)
        low, high = _bootstrap_interval(per_prompt, seed, n_bootstrap)
        return WinRate(float(per_prompt.mean()), low, high, len(per_prompt), tuple(per_response.tolist()))


def _expected_preference(d: np.ndarray, noise: float, tie: float) -> np.ndarray:
    """P(win) + P(tie)/2 for utility differences ``d`` under logistic(0, noise) noise, tie band τ."""

    def sigmoid(x: np.ndarray) -> np.ndarray:
        return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free

    return sigmoid((d - tie) / noise) + 0.5 * (1.0 - sigmoid((d - tie) / noise) - sigmoid((-d - tie) / noise))


def _bootstrap_interval(per_prompt: np.ndarray, seed: int, n_bootstrap: int) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean over prompts (seeded)."""
    rng = np.random.default_rng([seed, 0xB007])
    idx = rng.integers(0, len(per_prompt), size=(n_bootstrap, len(per_prompt)))
    low, high = np.percentile(per_prompt[idx].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)
