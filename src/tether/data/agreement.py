"""Inter-labeler agreement: the one measure the simulated panel, the labeling app's store and the
reward model's evaluation all report (InstructGPT §3.4 / Appendix B.4)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from tether.data.formats import Comparison


@dataclass
class AgreementReport:
    """Pairwise agreement between labelers who ranked the same responses to the same prompt.

    A *judgement pair* is (two labelers, two responses) where both labelers ranked the two
    responses untied; they agree when they order them the same way. The one result type for
    agreement in tether: the panel, the labeling app and the RM's evaluation all report it.
    """

    rate: float | None  # agreeing judgement pairs / all judgement pairs (None when there are none)
    n_pairs: int
    n_agree: int
    n_prompts: int  # prompts (with the same responses) ranked by at least two labelers
    per_labeler: dict[str, float] = field(default_factory=dict)  # labeler vs all the others
    per_labeler_pairs: dict[str, int] = field(default_factory=dict)
    per_labeler_pair: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def pairs(self) -> int:
        return self.n_pairs

    @property
    def by_labeler(self) -> dict[str, dict[str, float | int | None]]:
        """{labeler: {"rate", "pairs"}}: each labeler against all the others."""
        return {
            name: {"rate": self.per_labeler.get(name), "pairs": n} for name, n in sorted(self.per_labeler_pairs.items())
        }

    def to_json(self) -> dict[str, Any]:
        return {"rate": self.rate, "pairs": self.n_pairs, "by_labeler": self.by_labeler}

    def __str__(self) -> str:
        if not self.n_pairs:
            return "agreement: no prompt ranked by two labelers"
        who = ", ".join(f"{k} {v:.1%}" for k, v in sorted(self.per_labeler.items()))
        return (
            f"agreement {self.rate:.1%} ({self.n_agree}/{self.n_pairs} judgement pairs on "
            f"{self.n_prompts} prompts); per labeler: {who}"
        )


def agreement_of(
    rankings: Mapping[Any, Mapping[str, Sequence[int]] | Sequence[tuple[str, Sequence[int]]]],
) -> AgreementReport:
    """Agreement from ``{task: {labeler: ranking}}`` (or ``{task: [(labeler, ranking), ...]}``
    when a labeler ranked a task more than once), the rankings of a task aligned by response.

    Within a task, every two rankings by different labelers are compared on every pair of
    responses both ranked strictly (a tie is no preference); a labeler agreeing with themself is
    not inter-labeler agreement.
    """
    agree_by: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # labeler -> [agree, total]
    agree_pair: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    n_agree = n_pairs = n_prompts = 0
    for task in rankings.values():
        entries = sorted(task.items() if isinstance(task, Mapping) else task, key=lambda e: e[0])
        n_prompts += len({lab for lab, _ in entries}) >= 2
        for (la, ra), (lb, rb) in combinations(entries, 2):
            if la == lb:
                continue
            for x, y in combinations(range(min(len(ra), len(rb))), 2):
                da, db = ra[x] - ra[y], rb[x] - rb[y]
                if da == 0 or db == 0:
                    continue
                agree = int((da > 0) == (db > 0))
                n_agree += agree
                n_pairs += 1
                for lab in (la, lb):
                    agree_by[lab][0] += agree
                    agree_by[lab][1] += 1
                agree_pair[(la, lb)][0] += agree
                agree_pair[(la, lb)][1] += 1
    return AgreementReport(
        rate=n_agree / n_pairs if n_pairs else None,
        n_pairs=n_pairs,
        n_agree=n_agree,
        n_prompts=n_prompts,
        per_labeler={k: a / t for k, (a, t) in agree_by.items()},
        per_labeler_pairs={k: t for k, (_, t) in agree_by.items()},
        per_labeler_pair={k: a / t for k, (a, t) in agree_pair.items()},
    )


def pairwise_agreement(comparisons: Sequence[Comparison]) -> AgreementReport:
    """Inter-labeler agreement (InstructGPT §3.4 / Appendix B.4) over ``comparisons``.

    Comparisons are grouped by prompt and the *set* of response texts, so a labeler who saw the
    same responses in another order still counts (a text listed twice keeps its first rank);
    then :func:`agreement_of`.
    """
    tasks: dict[tuple[str, tuple[str, ...]], list[tuple[str, list[int]]]] = defaultdict(list)
    for c in comparisons:
        if c.labeler_id is None:  # a pair from elsewhere, without who ranked it: no agreement to measure
            continue
        texts = tuple(sorted(set(c.responses)))
        ranks: dict[str, int] = {}
        for text, rank in zip(c.responses, c.ranking, strict=True):
            ranks.setdefault(text, rank)
        tasks[(c.prompt, texts)].append((c.labeler_id, [ranks[t] for t in texts]))
    return agreement_of(tasks)
