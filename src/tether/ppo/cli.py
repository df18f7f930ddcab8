"""``tether ppo``: stage 3, PPO / PPO-ptx against a reward model."""

from __future__ import annotations

import argparse

from tether.config import PPOConfig, add_config_args, config_from_args


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ppo",
        help="stage 3: optimise the SFT policy against the reward model (PPO, PPO-ptx)",
        description="PPO with a per-token KL penalty to the SFT model and, when ptx_coef > 0, "
        "the pretraining loss mixed in (PPO-ptx). Rerun the same command after a crash to "
        "resume exactly.",
    )
    add_config_args(p, PPOConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the trainer (torch, transformers) and rich, which `tether --help` must not load.
    from rich.console import Console

    from tether.data.sources import ppo_sources
    from tether.ppo.train import train_ppo

    cfg = config_from_args(PPOConfig, "ppo", args)
    console = Console()
    cfg = ppo_sources(cfg, console.print)  # own prompts: no built-in prompts or pretraining text mixed in
    result = train_ppo(cfg, log=console.print)
    first, last = result.metrics[0], result.metrics[-1]
    console.print(
        f"[bold green]ppo done[/] after {result.iterations} iterations: score "
        f"{first['score']:.3f} → {last['score']:.3f}, KL {last['kl']:.3f} "
        f"({last['kl_estimator']}, β {last['kl_coef']:.4g}), response length "
        f"{last['response_length']:.1f}, EOS rate {last['eos_rate']:.2f}; "
        f"policy: {result.policy_dir}"
    )
    return 0
