"""Where each stage's data comes from, with no silent fall-back to the built-in task.

A stage given none of its data inputs runs on the built-in task (the tutorial path). Once it is
given any input of its own, every other input that would come from the built-in task is either
required (a ValueError naming the flag: exit 2), taken from the user's data where that is
meaningful (the RM is normalised on the demonstrations its SFT model was trained on, found in
the SFT run's config.yaml), or turned off with the reason logged (no pretraining text: PPO's
γ = 0, SFT's pretraining mix 0, eval's alignment tax off). The files given are read first, so a
bad file is reported before a missing flag. ``config.input_sources`` then records the source of
every input in the stage's config.yaml.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml

from tether.config import EvalConfig, PPOConfig, RMConfig, RunConfig, SFTConfig, save_config
from tether.data.formats import read_records

Log = Callable[[str], None]
C = TypeVar("C", SFTConfig, RMConfig, PPOConfig, EvalConfig)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check(cfg: object, kinds: dict[str, str]) -> list[str]:
    """Read (validate) each given input file; the names of the given ones."""
    given = []
    for name, kind in kinds.items():
        path = getattr(cfg, name)
        if path:
            read_records(path, kind)
            given.append(name)
    return given


def _require(stage: str, missing: str, given: list[str], why: str) -> ValueError:
    flags = ", ".join(_flag(g) for g in given)
    return ValueError(f"{stage}: {_flag(missing)} is required with {flags}: {why}")


def _own_data(stage: str, cfg: C, kinds: dict[str, str], main: str, would: str, mix: str | None, log: Log) -> C:
    """The rule for a stage whose inputs are ``kinds`` (field -> record kind): with any given,
    ``main`` is required, and ``mix`` (a pretraining-text weight) is 0 without a pretrain_file."""
    given = _check(cfg, kinds)
    if not given:
        return cfg
    if not getattr(cfg, main):
        raise _require(stage, main, given, f"without it {stage} would {would}")
    if mix and getattr(cfg, mix) > 0 and not getattr(cfg, "pretrain_file", None):
        log(
            f"{stage}: {mix} {getattr(cfg, mix):g} -> 0: no --pretrain-file (the built-in task's "
            "pretraining text is not mixed into your data)"
        )
        cfg = dataclasses.replace(cfg, **{mix: 0.0})  # type: ignore[arg-type]  # mix names a float field
    return cfg


def sft_sources(cfg: SFTConfig, log: Log) -> SFTConfig:
    kinds = {"train_file": "demonstration", "valid_file": "demonstration", "pretrain_file": "pretrain"}
    would = "train on the built-in task's demonstrations"
    return _own_data("sft", cfg, kinds, "train_file", would, "pretrain_fraction", log)


def sft_demonstrations(model_dir: str) -> tuple[str | None, Path | None]:
    """The demonstrations file the SFT run that wrote ``model_dir`` trained on, from its config.yaml
    (``OUT/final`` or ``OUT/epoch-N`` → ``OUT/config.yaml``); (None, None) when there is none."""
    for config in (Path(model_dir) / "config.yaml", Path(model_dir).parent / "config.yaml"):
        if config.is_file():
            saved = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
            if isinstance(saved, dict) and "select_by" in saved:  # an SFT config, not another stage's
                return saved.get("train_file"), config
    return None, None


def rm_sources(cfg: RMConfig, log: Log) -> RMConfig:
    given = _check(
        cfg, {"train_file": "comparison", "valid_file": "comparison", "demonstrations_file": "demonstration"}
    )
    if not given or cfg.demonstrations_file:
        return cfg
    demos, config = sft_demonstrations(cfg.model.name_or_path)
    if demos:
        read_records(demos, "demonstration")
        log(f"rm: normalising on the SFT model's demonstrations {demos} (from {config})")
        return dataclasses.replace(cfg, demonstrations_file=demos)
    where = f" ({config} names none)" if config else ""
    raise _require(
        "rm",
        "demonstrations_file",
        given,
        "the RM is normalised so that demonstrations score mean 0, and without your own they would be "
        f"the built-in task's; the SFT model's run names no demonstrations file{where}",
    )


def ppo_sources(cfg: PPOConfig, log: Log) -> PPOConfig:
    kinds = {"prompts_file": "prompt", "pretrain_file": "pretrain"}
    return _own_data("ppo", cfg, kinds, "prompts_file", "sample the built-in task's prompts", "ptx_coef", log)


def eval_sources(cfg: EvalConfig, log: Log) -> EvalConfig:
    """Own prompts without own held-out pretraining text: the alignment tax is off
    (:func:`alignment_tax_off`; the caller passes no text) and the log says so."""
    kinds = {"prompts_file": "prompt", "pretrain_file": "pretrain"}
    cfg = _own_data("eval", cfg, kinds, "prompts_file", "answer the built-in task's prompts", None, log)
    if alignment_tax_off(cfg):
        log(
            "eval: alignment tax off: no --pretrain-file (perplexity on the built-in task's pydoc text "
            "says little about your model)"
        )
    return cfg


def alignment_tax_off(cfg: EvalConfig) -> bool:
    """Own prompts without own held-out pretraining text: no perplexity to measure."""
    return bool(cfg.prompts_file) and not cfg.pretrain_file


def record_inputs(cfg: EvalConfig, out_dir: str | Path) -> Path:
    """``OUT/config.yaml`` of an evaluation: its settings and the source of every input."""
    return save_config(cfg, Path(out_dir) / "config.yaml")


def run_sources(cfg: RunConfig, log: Log) -> RunConfig:
    """``tether run``: with any data file of the user's own, the prompts, demonstrations and held-out
    pretraining text are required, and without a pretraining file SFT mixes none in and PPO-ptx is
    plain PPO (γ = 0; the plain-PPO baseline, then the same run, is left out). Rankings from people
    (comparisons_file) join the built-in task as well as the user's data, so they alone change nothing."""
    kinds = {
        "prompts_file": "prompt",
        "demonstrations_file": "demonstration",
        "pretrain_file": "pretrain",
        "pretrain_heldout_file": "pretrain",
    }
    given = _check(cfg, kinds)
    if not given:
        return cfg
    whys = {
        "prompts_file": "without it the run would sample the built-in task's prompts",
        "demonstrations_file": "without it SFT would train on the built-in task's demonstrations",
        "pretrain_heldout_file": "without it the alignment tax would be measured on the built-in task's pydoc text",
    }
    for name, why in whys.items():
        if not getattr(cfg, name):
            raise _require("run", name, given, why)
    if not cfg.pretrain_file:
        log(
            "run: no --pretrain-file: SFT mixes in no pretraining text (sft.pretrain_fraction 0) and PPO-ptx "
            "is plain PPO (ppo.ptx_coef 0; the separate plain-PPO baseline is left out)"
        )
        cfg = dataclasses.replace(
            cfg,
            sft=dataclasses.replace(cfg.sft, pretrain_fraction=0.0),
            ppo=dataclasses.replace(cfg.ppo, ptx_coef=0.0),
            run_ppo_baseline=False,
        )
    return cfg
