"""The ``tether`` command line: what it installs against, what it says about itself."""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from tether.cli import build_parser, main
from tether.config import (
    HIDDEN_FLAGS,
    PRESETS,
    EvalConfig,
    PPOConfig,
    RMConfig,
    RunConfig,
    SFTConfig,
    config_from_args,
    from_dict,
    resolve,
    set_dotted,
    to_dict,
)
from tether.data.formats import DataError

ROOT = Path(__file__).resolve().parents[1]


def test_torch_is_a_range_that_keeps_the_users_torch():
    """pyproject asks for a torch range (a user's CUDA torch stays), admitting the torch the tests
    run on and at least the minor release before it."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_req,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    assert not any(s.operator in ("==", "===", "~=") for s in torch_req.specifier), torch_req
    installed = Version(torch.__version__.split("+")[0])
    earlier = Version(f"{installed.major}.{installed.minor - 1}.0")
    assert torch_req.specifier.contains(installed) and torch_req.specifier.contains(earlier), torch_req


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"tether {importlib.metadata.version('tether')}"


COMMANDS = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "eval": EvalConfig, "run": RunConfig}


def help_text(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def help_defaults(text: str) -> dict[str, str]:
    """``{dotted.name: shown default}`` from a --help page printed without wrapping."""
    out, flag, lines = {}, None, []
    for line in [*text.splitlines(), ""]:
        if (m := re.match(r"  (--[\w.-]+)", line)) or not line.strip():
            found = re.search(r"\(default: (.*)\)$", " ".join(" ".join(lines).split()))
            if flag and found:
                out[flag[2:].replace("-", "_")] = found.group(1)
            flag, lines = (m.group(1) if m else None), [line]
        else:
            lines.append(line)
    return out


def leaf_names(data: dict, prefix: str = "") -> set[str]:
    """The dotted names of a to_dict config's values."""
    names = set()
    for key, value in data.items():
        names |= leaf_names(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
    return names


@pytest.mark.parametrize(
    ("command", "preset"),
    [(c, p) for c in COMMANDS for p in [None, *PRESETS.get(c, {})]],
)
def test_help_shows_the_values_the_run_uses(capsys, monkeypatch, command, preset):
    """Every flag's --help default, typed back on the command line, is the config the command
    resolves and saves as config.yaml: with no preset (a nested config's defaults come from its
    parent, e.g. sft's optim.lr 9.65e-6) and with each preset (``--preset P --help``, and
    ``--help --preset P``)."""
    monkeypatch.setenv("COLUMNS", "1000")  # one help text per line: no wrapping inside a value
    cls = COMMANDS[command]
    chosen = ["--preset", preset] if preset else []
    shown = help_defaults(help_text(capsys, [command, *chosen, "--help"]))
    assert shown == help_defaults(help_text(capsys, [command, "--help", *chosen]))
    shown_fields = {n for n in leaf_names(to_dict(cls())) if n.rsplit(".", 1)[-1] not in HIDDEN_FLAGS}
    assert set(shown) == shown_fields  # every field has a flag showing its default
    typed_back: dict = {}
    for name, value in shown.items():
        set_dotted(typed_back, name, "" if value == '""' else value)
    expected = resolve(cls, command, preset, validate=False)  # sft's paper preset alone needs an RM
    assert from_dict(cls, typed_back) == expected
    if preset != "paper" or command != "sft":  # what the command itself builds and saves
        args = build_parser().parse_args([command, *chosen])
        saved = yaml.safe_load(yaml.safe_dump(to_dict(config_from_args(cls, command, args))))
        assert saved == yaml.safe_load(yaml.safe_dump(to_dict(from_dict(cls, typed_back))))


def test_help_defaults_of_nested_configs_are_their_parents():
    """The figures the help got wrong: a nested config's default comes from its parent's factory."""
    for argv, flag, value in [
        (["sft"], "optim.lr", "9.65e-06"),
        (["rm"], "optim.lr", "9e-06"),
        (["ppo"], "optim.schedule", "constant"),
        (["ppo"], "optim.warmup_steps", "10"),
        (["ppo"], "value_optim.lr", "9e-06"),
        (["ppo"], "value_optim.schedule", "constant"),
        (["run"], "sft.pretrain_fraction", "0.1"),
    ]:
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
        action = next(a for a in sub._actions if a.dest == "cfg__" + flag)
        assert action.help.endswith(f"(default: {value})"), (argv, flag, action.help)


def sft_config(argv: list[str]) -> SFTConfig:
    args = build_parser().parse_args(["sft", *argv])
    return config_from_args(SFTConfig, "sft", args)


def test_booleans_take_a_bare_flag_a_no_flag_or_a_value():
    assert sft_config(["--model.lora.enabled"]).model.lora.enabled is True
    assert sft_config(["--model.lora.enabled", "false"]).model.lora.enabled is False
    assert sft_config(["--model.lora.enabled", "true"]).model.lora.enabled is True
    cfg = sft_config(["--model.lora.enabled", "--no-model.lora.enabled", "--epochs", "3"])  # later wins
    assert cfg.model.lora.enabled is False and cfg.epochs == 3
    assert sft_config(["--no-keep-epoch-checkpoints"]).keep_epoch_checkpoints is False
    assert sft_config(["--keep-epoch-checkpoints"]).keep_epoch_checkpoints is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sft", "--no-model.lora.enabled", "true"])


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_anywhere_on_the_line_shows_the_traceback(tmp_path, capsys, where):
    missing = str(tmp_path / "missing.jsonl")
    argv = ["data", "preprocess", missing, "--out-dir", str(tmp_path / "out")]
    assert main(argv) == 2 and "missing.jsonl" in capsys.readouterr().err  # without --debug: one line
    with pytest.raises(DataError, match="missing.jsonl"):  # with --debug: the exception itself
        main(["--debug", *argv] if where == "before" else [*argv, "--debug"])


def subparsers(parser: argparse.ArgumentParser, path: str = "tether"):
    """(command line, parser) for every command and subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{path} {name}", sub
                yield from subparsers(sub, f"{path} {name}")


# Spellings replaced by one spelling per thing: a directory is --out-dir, a file written --out-file,
# records read --prompts-file / --samples-file, a policy --policy [NAME=]PATH, split fractions
# --split-fractions A,B,C.
OLD_SPELLINGS = {"--out", "--prompts", "--policy-name", "--pretrain", "--samples", "--fractions"}


def test_one_spelling_per_thing_and_the_old_ones_still_work(tmp_path):
    for command, parser in subparsers(build_parser()):
        shown = {s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
        assert not shown & OLD_SPELLINGS, (command, shown & OLD_SPELLINGS)
        assert not {"--output", "--output-dir", "--prompt-file", "--out_dir"} & shown, command
    parse = build_parser().parse_args
    new = parse(["sample", "--policy", "tiny", "--prompts-file", "p.jsonl", "--out-file", "s.jsonl"])
    old = parse(["sample", "--policy", "tiny", "--prompts", "p.jsonl", "--out", "s.jsonl"])
    assert vars(new) == vars(old) and new.out == "s.jsonl" and new.prompts == "p.jsonl"
    for argv in (["data", "default-task"], ["label", "simulate", "--samples-file", "s"]):
        assert (
            parse([*argv, "--out", "x"]).out
            == parse([*argv, "--out-dir" if argv[0] == "data" else "--out-file", "x"]).out
        )
    assert parse(["eval", "--out", "x"]).out == parse(["eval", "--out-dir", "x"]).out == "x"
    simulate = ["label", "simulate", "--out-file", "c.jsonl"]
    assert parse([*simulate, "--samples", "s"]).samples == parse([*simulate, "--samples-file", "s"]).samples == "s"
    preprocess = ["data", "preprocess", "p.jsonl", "--out-dir", "d"]
    fractions = [0.7, 0.2, 0.1]  # run's comma form, and the former three spaced numbers
    assert parse([*preprocess, "--split-fractions", "0.7,0.2,0.1"]).fractions == fractions
    assert parse([*preprocess, "--fractions", "0.7", "0.2", "0.1"]).fractions == fractions
    cfg = config_from_args(EvalConfig, "eval", parse(["eval", "--prompts", "p.jsonl", "--pretrain", "t.jsonl"]))
    assert (cfg.prompts_file, cfg.pretrain_file) == ("p.jsonl", "t.jsonl")
    saved = tmp_path / "config.yaml"  # a run directory's config.yaml from before the rename still loads
    saved.write_text(yaml.safe_dump({"eval": {"prompts": "p.jsonl", "pretrain": "t.jsonl"}}))
    run = resolve(RunConfig, "run", yaml_path=str(saved))
    assert (run.eval.prompts_file, run.eval.pretrain_file) == ("p.jsonl", "t.jsonl")


def test_sample_names_its_policy_like_eval():
    from tether.models.cli import policy_name_and_path

    assert policy_name_and_path("sft=runs/sft/final") == ("sft", "runs/sft/final")
    assert policy_name_and_path("runs/sft/final") == ("runs/sft/final", "runs/sft/final")
    assert policy_name_and_path("runs/lr=1e-4/final") == ("runs/lr=1e-4/final", "runs/lr=1e-4/final")


def test_help_after_a_config_file_shows_its_values(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 0.5}, "model": {"lora": {"enabled": True}}}))
    shown = help_defaults(help_text(capsys, ["sft", "--preset", "tiny", "--help", "--config", str(path)]))
    assert shown["optim.lr"] == "0.5" and shown["model.lora.enabled"] == "true"  # the file over the preset
    assert shown["model.name_or_path"] == "tiny"  # the preset where the file says nothing
