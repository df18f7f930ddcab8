"""How good is a reward model: pairwise accuracy on held-out comparisons (InstructGPT §4, App. E).

The paper reports the accuracy of the RM at predicting which of two responses a labeler preferred:
72.4 % for training labelers, 69.6 % for held-out labelers, next to the labelers' own agreement
with each other (~73 %), which is about the ceiling an RM can reach. :func:`evaluate_rm` gives the
same numbers: overall, per labeler, training vs held-out labelers; plus the mean margin and the
score distribution (a collapsed or exploding score scale shows up here before it wrecks PPO).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from tether.data.agreement import pairwise_agreement
from tether.data.formats import Comparison
from tether.metrics import percent
from tether.reward.data import RankedExample, unique_sequences
from tether.reward.score import score_sequences


@dataclass
class Accuracy:
    """Pairwise accuracy over a set of (winner, loser) pairs; ties in ranking make no pair."""

    accuracy: float | None  # fraction of pairs with s_w > s_l (an exact score tie counts 1/2)
    pairs: int
    comparisons: int


@dataclass
class RMEval:
    """Held-out evaluation of a reward model (see the module docstring)."""

    overall: Accuracy
    margin: float | None  # mean s_w - s_l over all held-out pairs
    by_labeler: dict[str, Accuracy]
    train_labelers: Accuracy  # comparisons by labelers the RM was trained on
    heldout_labelers: Accuracy  # comparisons by held-out labelers (never trained on)
    labeler_agreement: dict[str, Any]  # {"rate", "pairs"}: labelers agreeing with each other
    scores: dict[str, float]  # distribution of every held-out response's score
    histogram: dict[str, list[float]] = field(default_factory=dict)  # {"edges": [B+1], "counts": [B]}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        def pct(a: Accuracy) -> str:
            return percent(a.accuracy) + ("" if a.accuracy is None else f" ({a.pairs} pairs)")

        return (
            f"accuracy {pct(self.overall)}; train labelers {pct(self.train_labelers)}; "
            f"held-out labelers {pct(self.heldout_labelers)}; labelers agree "
            + percent(self.labeler_agreement.get("rate"))
            + (f"; margin {self.margin:.3f}" if self.margin is not None else "")
        )


def pair_outcomes(scores: torch.Tensor, ranks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For one ranking: (correct [M], margin [M]) over its M untied (winner, loser) pairs.

    ``scores``: ``[K]``. ``correct`` is 1 where s_w > s_l, 0.5 on an exact score tie (so a
    constant RM sits at chance, 50 %), else 0. ``margin`` is s_w - s_l.
    """
    r = torch.as_tensor(list(ranks))
    winner, loser = (r[:, None] < r[None, :]).nonzero(as_tuple=True)
    margin = scores[winner] - scores[loser]
    correct = (margin > 0).float() + 0.5 * (margin == 0).float()
    return correct, margin


def _accuracy(outcomes: Iterable[torch.Tensor]) -> Accuracy:
    parts = list(outcomes)
    pairs = sum(int(o.numel()) for o in parts)
    total = sum(float(o.sum()) for o in parts)
    return Accuracy(total / pairs if pairs else None, pairs, len(parts))


def labeler_agreement(comparisons: Sequence[Comparison]) -> dict[str, Any]:
    """Inter-labeler pairwise agreement on the comparisons that several labelers ranked.

    ``{"rate": None, "pairs": 0, ...}`` when no task was ranked twice. The definition (tasks
    matched by prompt and response texts, ties excluded) is the panel's, shared with it.
    """

    return pairwise_agreement(comparisons).to_json()


def score_distribution(scores: torch.Tensor, bins: int = 10) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Summary statistics and a ``bins``-bin histogram of ``[N]`` scores."""
    s = scores.float()
    if s.numel() == 0:
        return {}, {}
    q = torch.quantile(s, torch.tensor([0.1, 0.5, 0.9]))
    stats = {
        "n": float(s.numel()),
        "mean": float(s.mean()),
        "std": float(s.std()) if s.numel() > 1 else 0.0,
        "min": float(s.min()),
        "p10": float(q[0]),
        "p50": float(q[1]),
        "p90": float(q[2]),
        "max": float(s.max()),
    }
    lo, hi = stats["min"], stats["max"]
    if math.isclose(lo, hi):
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(s, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1)
    return stats, {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def evaluate_rm(
    model: PreTrainedModel,
    examples: Sequence[RankedExample],
    pad_token_id: int,
    *,
    heldout_labelers: Iterable[str] = (),
    comparisons: Sequence[Comparison] | None = None,
    batch_size: int = 32,
) -> RMEval:
    """Score every response of ``examples`` once and report pairwise accuracy and the scores.

    ``comparisons`` (the held-out records the examples came from) give the labelers' own
    agreement; the scores include the model's bias (the normalised score scale).
    """
    heldout = set(heldout_labelers)
    # Each distinct sequence is scored once, however many labelers ranked it.
    distinct, index = unique_sequences(examples)
    scores = score_sequences(model, distinct, pad_token_id, batch_size) if distinct else torch.zeros(0)
    per_example = scores[torch.tensor(index, dtype=torch.long)].split([ex.k for ex in examples]) if distinct else []
    outcomes = [pair_outcomes(s, ex.ranks) for s, ex in zip(per_example, examples, strict=True)]

    by_labeler: dict[str | None, list[torch.Tensor]] = defaultdict(list)
    for ex, (correct, _) in zip(examples, outcomes, strict=True):
        by_labeler[ex.labeler_id].append(correct)
    margins = torch.cat([m for _, m in outcomes]) if outcomes else torch.zeros(0)
    stats, histogram = score_distribution(scores)
    return RMEval(
        overall=_accuracy(c for c, _ in outcomes),
        margin=float(margins.mean()) if margins.numel() else None,
        by_labeler={name: _accuracy(by_labeler[name]) for name in sorted(n for n in by_labeler if n is not None)},
        train_labelers=_accuracy(c for name, v in by_labeler.items() if name not in heldout for c in v),
        heldout_labelers=_accuracy(c for name, v in by_labeler.items() if name in heldout for c in v),
        labeler_agreement=labeler_agreement(comparisons or []),
        scores=stats,
        histogram=histogram,
    )
