"""The demo's bar over seeds (tether.eval.seeds): each criterion fails on its own when its figure misses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tether.eval.seeds import SeedRow, Win, check_bar, markdown_table, read_run

GOOD = Win(0.62, 0.56, 0.68)


def row(seed: int, ptx: Win | None = GOOD, **kw) -> SeedRow:
    wins = {"base": Win(0.31, 0.28, 0.34), "sft_bo4": Win(0.6, 0.57, 0.63), "ppo": Win(0.6, 0.55, 0.65)}
    if ptx is not None:
        wins["ppo_ptx"] = ptx
    fields = dict(seed=seed, run_dir=Path("."), wins=wins, kl={"ppo_ptx": 1.5}, rm_heldout_labelers=0.70,
                  labeler_agreement=0.74, minutes=55.0)  # fmt: skip
    return dataclasses.replace(SeedRow(**fields), **kw)  # type: ignore[arg-type]


def failed(rows: list[SeedRow]) -> list[str]:
    return [what for what, ok in check_bar(rows) if not ok]


def test_every_criterion_holds_for_good_seeds_and_fails_alone_when_its_figure_misses():
    good = [row(0), row(1), row(2)]
    assert failed(good) == []
    # One seed's interval touches one half: that check alone (the mean is still above 0.60).
    assert failed([row(0), row(1, Win(0.61, 0.50, 0.70)), row(2)]) == [
        "seed 1: PPO-ptx's 95 % interval above 0.5 (0.610 [0.500, 0.700])"
    ]
    # Every interval above one half but the mean below 0.60.
    low = [row(s, Win(0.58, 0.53, 0.63)) for s in range(3)]
    assert failed(low) == ["mean of PPO-ptx's win rates over the seeds >= 0.6 (0.580)"]
    # The RM 9 points under the labelers' agreement.
    assert failed([row(0, rm_heldout_labelers=0.65)]) == [
        "seed 0: RM on held-out labelers within 8 pts of agreement (65.0 % vs 74.0 %)"
    ]
    # PPO-ptx below plain PPO by more than the intervals allow.
    beaten = row(0, wins={**row(0).wins, "ppo": Win(0.75, 0.70, 0.80)})
    assert failed([beaten]) == ["seed 0: PPO-ptx not below PPO beyond the intervals"]
    # Base above SFT breaks the order.
    upside = row(0, wins={**row(0).wins, "base": Win(0.55, 0.52, 0.58)})
    assert failed([upside]) == ["seed 0: base < SFT < PPO-ptx"]
    # A run without PPO-ptx fails every criterion that needs it, and says so.
    assert len(failed([row(0, None)])) == 4 and "missing" in failed([row(0, None)])[0]


def test_the_table_has_a_line_per_seed_and_the_mean():
    table = markdown_table([row(0), row(1, Win(0.58, 0.53, 0.63))]).splitlines()
    assert table[2].startswith("| 0 | 0.310 [0.280, 0.340] | 0.600 [0.570, 0.630] | 0.600 [0.550, 0.650] |")
    assert "| 0.580 [0.530, 0.630] | 1.50 | 70.0 % / 74.0 % | 55 |" in table[3]
    assert table[-1] == "PPO-ptx's expected win rate vs SFT, mean over 2 seed(s): 0.600"


def test_an_unfinished_run_is_named(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="eval.json does not exist"):
        read_run(tmp_path)
