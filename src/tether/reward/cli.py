"""``tether rm``: stage 2, train the reward model on ranked comparisons."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    from tether.config import RMConfig, add_config_args

    p = sub.add_parser(
        "rm",
        help="stage 2: train a reward model on ranked comparisons (K-wise loss, paper eq. 1)",
        description=(
            "Reward model: the SFT model with a scalar head, trained on K-wise rankings, then "
            "normalised so demonstrations score mean 0. Rerun the same command after a crash to "
            "resume exactly."
        ),
    )
    add_config_args(p, RMConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tether.config import RMConfig, config_from_args
    from tether.reward.train import train_reward_model

    cfg = config_from_args(RMConfig, "rm", args)
    console = Console()
    result = train_reward_model(cfg, log=console.print)
    before, after = result.eval_before, result.eval_after

    def pct(acc: float | None) -> str:
        return "n/a" if acc is None else f"{100 * acc:.1f} %"

    table = Table(title="held-out pairwise accuracy (ties in ranking make no pair)")
    for col in ("", "before", "after", "pairs"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row(
        "all comparisons",
        pct(before["overall"]["accuracy"]),
        pct(after.overall.accuracy),
        str(after.overall.pairs),
    )
    table.add_row(
        "train labelers",
        pct(before["train_labelers"]["accuracy"]),
        pct(after.train_labelers.accuracy),
        str(after.train_labelers.pairs),
    )
    table.add_row(
        "held-out labelers",
        pct(before["heldout_labelers"]["accuracy"]),
        pct(after.heldout_labelers.accuracy),
        str(after.heldout_labelers.pairs),
    )
    for name, acc in after.by_labeler.items():
        was = before["by_labeler"].get(name, {}).get("accuracy")
        table.add_row(f"  {name}", pct(was), pct(acc.accuracy), str(acc.pairs))
    agree = after.labeler_agreement
    table.add_row("labelers agree with each other", "", pct(agree["rate"]), str(agree["pairs"]))
    console.print(table)
    s = after.scores
    console.print(
        f"[bold green]rm done[/]: mean margin {after.margin:.3f}; held-out scores mean "
        f"{s['mean']:+.3f} std {s['std']:.3f} (p10 {s['p10']:+.3f}, p90 {s['p90']:+.3f}); "
        f"bias {result.normalization.bias:+.4f} (demonstrations score mean 0); "
        f"model: {result.final_dir}"
    )
    return 0
