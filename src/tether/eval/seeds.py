"""One table over several seeds of a run, and whether the demo's bar holds on every one of them.

``scripts/demo_seeds.py`` runs ``tether run --preset demo --seed S`` for each seed and prints
:func:`markdown_table` and :func:`check_bar` of the finished runs. The figures come from each run's
own files: ``eval/eval.json`` (expected win rates against SFT with their bootstrap intervals) and
``manifest.json`` (the last round's reward-model accuracy on held-out labelers' comparisons, the
labelers' own agreement, each stage's seconds).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The demo's bar (see docs/results.md): PPO-ptx preferred to SFT with the whole 95 % interval above
# one half on every seed and by this much on average; the RM within this many points of the labelers.
MEAN_WIN = 0.60
RM_GAP = 0.08


@dataclass(frozen=True)
class Win:
    """A policy's expected win rate against the baseline and its 95 % bootstrap interval."""

    rate: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.rate:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True)
class SeedRow:
    """What one finished run says about the bar."""

    seed: int | None
    run_dir: Path
    wins: dict[str, Win]  # policy name -> expected win rate vs the baseline
    kl: dict[str, float | None]
    rm_heldout_labelers: float | None  # the last round's RM on held-out labelers' comparisons
    labeler_agreement: float | None
    minutes: float  # the stages' seconds (last attempts), summed


def read_run(run_dir: str | Path) -> SeedRow:
    """The row of a finished run directory (``tether run --out-dir``); a clear error when the run
    has not finished its evaluation."""
    run_dir = Path(run_dir)
    manifest_path, eval_path = run_dir / "manifest.json", run_dir / "eval" / "eval.json"
    for path in (manifest_path, eval_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a finished tether run")
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    report: dict[str, Any] = json.loads(eval_path.read_text())
    wins, kl = {}, {}
    for p in report["policies"]:
        if p.get("expected_win_rate") is not None and p.get("expected_win_ci"):
            wins[p["name"]] = Win(p["expected_win_rate"], *p["expected_win_ci"])
        kl[p["name"]] = p.get("kl_to_ref")
    stages: dict[str, Any] = manifest["stages"]
    rms = [e.get("outputs") or {} for name, e in stages.items() if name.endswith("/rm")]
    rm = rms[-1] if rms else {}
    seconds = sum(e.get("seconds_last_attempt") or 0.0 for e in stages.values())
    return SeedRow(
        seed=manifest["config"].get("seed"),
        run_dir=run_dir,
        wins=wins,
        kl=kl,
        rm_heldout_labelers=rm.get("heldout_labeler_accuracy"),
        labeler_agreement=rm.get("labeler_agreement"),
        minutes=seconds / 60,
    )


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def check_bar(rows: Sequence[SeedRow]) -> list[tuple[str, bool]]:
    """Each criterion of the demo's bar over ``rows``, and whether it holds (a missing figure fails)."""
    checks = []
    rates = []
    for r in rows:
        base, ppo, ptx = r.wins.get("base"), r.wins.get("ppo"), r.wins.get("ppo_ptx")
        if ptx is not None:
            rates.append(ptx.rate)
        checks.append(
            (f"seed {r.seed}: PPO-ptx's 95 % interval above 0.5 ({ptx or 'missing'})", bool(ptx and ptx.low > 0.5))
        )
        checks.append((f"seed {r.seed}: base < SFT < PPO-ptx", bool(base and ptx and base.rate < 0.5 < ptx.rate)))
        # Not below PPO by more than the intervals allow: PPO-ptx's upper end reaches PPO's lower end.
        checks.append(
            (f"seed {r.seed}: PPO-ptx not below PPO beyond the intervals", bool(ppo and ptx and ptx.high >= ppo.low))
        )
        acc, agree = r.rm_heldout_labelers, r.labeler_agreement
        near = acc is not None and agree is not None and agree - acc <= RM_GAP
        what = f"{_pct(acc)} vs {_pct(agree)}"
        checks.append(
            (
                f"seed {r.seed}: RM on held-out labelers within {100 * RM_GAP:.0f} pts of agreement ({what})",
                near,
            )
        )
    mean = sum(rates) / len(rates) if rates and len(rates) == len(rows) else None
    shown = "missing" if mean is None else f"{mean:.3f}"
    checks.append(
        (f"mean of PPO-ptx's win rates over the seeds >= {MEAN_WIN} ({shown})", mean is not None and mean >= MEAN_WIN)
    )
    return checks


def markdown_table(rows: Sequence[SeedRow]) -> str:
    """One line per seed: each policy's expected win rate vs SFT [95 % CI], PPO-ptx's KL, the RM
    against the labelers and the run's minutes; then the mean of PPO-ptx's win rates."""
    head = [
        "seed",
        "base",
        "SFT best-of-n",
        "PPO",
        "PPO-ptx",
        "KL of PPO-ptx",
        "RM on held-out labelers / their agreement",
        "minutes",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kl = r.kl.get("ppo_ptx")
        best_of = next((p for p in r.wins if p.startswith("sft_bo")), "sft_bo")  # sft_bo4 in the demo
        cells = [str(r.seed), *(str(r.wins[p]) if p in r.wins else "–" for p in ("base", best_of, "ppo", "ppo_ptx"))]
        cells += [
            "–" if kl is None else f"{kl:.2f}",
            f"{_pct(r.rm_heldout_labelers)} / {_pct(r.labeler_agreement)}",
            f"{r.minutes:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    rates = [r.wins["ppo_ptx"].rate for r in rows if "ppo_ptx" in r.wins]
    if rates:
        lines.append(
            f"\nPPO-ptx's expected win rate vs SFT, mean over {len(rates)} seed(s): {sum(rates) / len(rates):.3f}"
        )
    return "\n".join(lines)
