"""``tether rm``: stage 2, train the reward model on ranked comparisons."""

from __future__ import annotations

import argparse

from tether.config import RMConfig, add_config_args, config_from_args


def add_commands(sub: argparse._SubParsersAction) -> None:
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
    # Imported here, not at the top: the trainer (torch, transformers) and rich, which `tether --help` must not load.
    from rich.console import Console
    from rich.table import Table

    from tether.data.sources import rm_sources
    from tether.labelers.panel import Panel
    from tether.metrics import percent
    from tether.reward.train import train_reward_model

    cfg = config_from_args(RMConfig, "rm", args)
    console = Console()
    cfg = rm_sources(cfg, console.print)  # own data: normalised on own demonstrations, never the built-in task's
    panel_heldout = [lab.id for lab in Panel().heldout_labelers] if cfg.heldout_panel_labelers else None
    result = train_reward_model(cfg, panel_heldout_labelers=panel_heldout, log=console.print)
    before, after = result.eval_before, result.eval_after

    agree = after.labeler_agreement
    table = Table(title="held-out pairwise accuracy (tied rankings make no pair)")
    for col in ("", "RM before", "RM after", "pairs", "labeler vs others"):
        table.add_column(col, justify="right" if col else "left")
    rows = [
        ("all comparisons", before["overall"], after.overall, percent(agree["rate"])),
        ("train labelers", before["train_labelers"], after.train_labelers, ""),
        ("held-out labelers", before["heldout_labelers"], after.heldout_labelers, ""),
    ]
    rows += [
        (f"  {name}", before["by_labeler"].get(name, {}), acc, percent(agree["by_labeler"].get(name, {}).get("rate")))
        for name, acc in after.by_labeler.items()
    ]
    for name, was, now, labelers in rows:
        table.add_row(name, percent(was.get("accuracy")), percent(now.accuracy), str(now.pairs), labelers)
    console.print(table)
    if not after.by_labeler:
        console.print(
            "no labeler_id in the comparisons: per-labeler and held-out-labeler accuracy and "
            "inter-labeler agreement skipped"
        )
    s = after.scores
    console.print(
        f"[bold green]rm done[/]: mean margin {after.margin:.3f}; held-out scores mean "
        f"{s['mean']:+.3f} std {s['std']:.3f} (p10 {s['p10']:+.3f}, p90 {s['p90']:+.3f}); "
        f"bias {result.normalization.bias:+.4f} (demonstrations score mean 0); "
        f"model: {result.final_dir}"
    )
    return 0
