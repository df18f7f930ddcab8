"""``tether sft``: stage 1, supervised fine-tuning on demonstrations."""

from __future__ import annotations

import argparse

from tether.config import SFTConfig, add_config_args, config_from_args


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sft",
        help="stage 1: fine-tune a causal LM on demonstrations (response-only loss)",
        description="Supervised fine-tuning. Rerun the same command after a crash to resume exactly.",
    )
    add_config_args(p, SFTConfig)
    p.add_argument("--show-samples", type=int, default=3, help="print N validation generations before/after")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the trainer (torch, transformers) and rich, which `tether --help` must not load.
    from rich.console import Console
    from rich.table import Table

    from tether.data.sources import sft_sources
    from tether.reward.score import rm_scorer
    from tether.sft.train import train_sft

    cfg = config_from_args(SFTConfig, "sft", args)
    cfg.validate()  # before the scorer is built from it
    console = Console()
    cfg = sft_sources(cfg, console.print)  # own data: nothing more from the built-in task
    # The paper's checkpoint selection by RM score: the scorer is built here, so that the SFT
    # trainer does not depend on the reward stage.
    by_rm = cfg.select_by == "rm_score"  # validate() made sure of a reward_model then
    scorer = rm_scorer(cfg.reward_model, cfg.max_new_tokens, cfg.seed) if by_rm and cfg.reward_model else None
    result = train_sft(cfg, scorer, show_samples=args.show_samples, log=console.print)
    console.print(
        f"[bold green]sft done[/]: held-out loss {result.valid_loss_before:.4f} → {result.valid_loss_after:.4f} "
        f"(epoch {result.selected_epoch} selected by {cfg.select_by}); model: {result.final_dir}"
    )
    if result.samples_after:
        table = Table(title="validation prompts: before → after SFT (greedy)", show_lines=True)
        table.add_column("prompt", ratio=2)
        table.add_column("before", ratio=3)
        table.add_column("after", ratio=3)
        for (prompt, before), (_, after) in zip(result.samples_before, result.samples_after, strict=False):
            table.add_row(prompt, before, after)
        console.print(table)
    return 0
