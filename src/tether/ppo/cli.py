"""``tether ppo``: stage 3, PPO / PPO-ptx against a reward model."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from tether.config import PPOConfig, add_config_args, config_from_args
from tether.data.formats import read_records, to_json


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
    cfg = _fit_prompts(cfg, console.print)
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


def _fit_prompts(cfg: PPOConfig, log: Callable[[str], None]) -> PPOConfig:
    """Own prompts made to fit ``max_prompt_length`` by whole turns (never the system prompt or the
    last user turn; :func:`tether.data.preprocess.fit_prompt`), those that cannot dropped. The
    counts go to the log and ``OUT/prompt_fit.json``, the fitted prompts to
    ``OUT/prompts.fitted.jsonl``, which PPO then reads. The built-in prompts are short single turns."""
    from tether.data.preprocess import fit_prompts
    from tether.models.generation import chat_prompt
    from tether.models.loading import load_tokenizer

    if not cfg.prompts_file:
        return cfg
    tokenizer = load_tokenizer(cfg.policy.name_or_path, cfg.policy)

    def count(prompt: str) -> int:
        return len(tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False).input_ids)

    prompts, fit = fit_prompts(read_records(cfg.prompts_file, "prompt"), cfg.max_prompt_length, count)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _replace_text(out / "prompt_fit.json", json.dumps({"prompts_file": cfg.prompts_file, **asdict(fit)}, indent=1))
    if not fit.cut_prompts and not fit.dropped:
        return cfg
    log(f"ppo: {fit.describe()}")
    if not prompts:
        raise ValueError(f"ppo: no prompt of {cfg.prompts_file} fits max_prompt_length {cfg.max_prompt_length}")
    fitted = out / "prompts.fitted.jsonl"
    _replace_text(fitted, "".join(json.dumps(to_json(p), ensure_ascii=False) + "\n" for p in prompts))
    return dataclasses.replace(cfg, prompts_file=str(fitted))


def _replace_text(path: Path, text: str) -> None:
    """Write through a file of this process's own, then rename: every torchrun rank writes the same
    text, and none reads a half-written file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
