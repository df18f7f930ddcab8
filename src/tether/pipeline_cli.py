"""``tether run``: the whole pipeline in one command (resumable: rerun it after a crash)."""

from __future__ import annotations

import argparse

from tether.config import RunConfig, add_config_args, config_from_args


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="the whole InstructGPT loop: data → SFT → sample → rank → RM → PPO-ptx (+PPO) → eval → report",
        description="Runs every stage, records provenance in manifest.json and resumes where it stopped. "
        "Stage settings are nested flags, e.g. --sft.epochs 2 --ppo.kl-coef 0.05 --rm.optim.lr 1e-5.",
    )
    add_config_args(p, RunConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the pipeline (torch, transformers) and rich, which `tether --help` must not load.
    from rich.console import Console

    from tether.pipeline import run_pipeline

    cfg = config_from_args(RunConfig, "run", args)
    console = Console()
    result = run_pipeline(cfg, log=console.print)
    ev = result.manifest["stages"]["eval"]["outputs"]
    console.print(
        f"[bold green]run done[/]; win rates vs {cfg.eval.baseline} (held-out labelers, expected / sampled): "
        + ", ".join(f"{k} {ev['expected_win_rates'][k]:.3f} / {v:.3f}" for k, v in ev["win_rates"].items())
    )
    console.print(f"report: [bold]{result.report}[/]")
    return 0
