"""Config: defaults → preset → YAML → flags, typed coercion, readable errors, saved resolved."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

import tether
from tether.config import (
    PRESETS,
    STAGE_CONFIGS,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PPOConfig,
    RMConfig,
    RunConfig,
    SFTConfig,
    add_config_args,
    config_from_args,
    field_docs,
    literal_choices,
    resolve,
    save_config,
    to_dict,
)
from tether.data.preprocess import PreprocessConfig


def parse(argv: list[str]) -> SFTConfig:
    parser = argparse.ArgumentParser()
    add_config_args(parser, SFTConfig)
    return config_from_args(SFTConfig, "sft", parser.parse_args(argv))


def test_precedence_preset_yaml_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"epochs": 5, "optim": {"lr": 0.5}, "model": {"lora": {"enabled": True}}}))
    cfg = parse(["--preset", "tiny", "--config", str(path), "--epochs", "7", "--optim.betas", "0.8,0.9"])
    assert cfg.model.name_or_path == "tiny"  # preset
    assert cfg.optim.lr == 0.5 and cfg.model.lora.enabled is True  # YAML over preset
    assert cfg.epochs == 7  # flag over YAML
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.batch_size == 8  # preset value untouched


def test_paper_preset_has_paper_settings():
    cfg = resolve(SFTConfig, "sft", "paper", overrides={"reward_model": "rm"})
    assert cfg.epochs == 16 and cfg.optim.betas == (0.9, 0.95) and cfg.model.residual_dropout == 0.2
    assert cfg.optim.final_lr_fraction == 0.1 and cfg.optim.warmup_steps == 0 and cfg.select_by == "rm_score"


def test_saved_config_resolves_to_the_same(tmp_path):
    cfg = resolve(SFTConfig, "sft", "demo", overrides={"seed": 3})
    path = save_config(cfg, tmp_path / "config.yaml")
    assert resolve(SFTConfig, "sft", yaml_path=str(path)) == cfg


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"epochs": "many"}, "config field 'epochs': expected int"),
        ({"nope": 1}, "unknown config field 'nope'"),
        ({"optim.lrr": 1}, "unknown config field 'optim.lrr'"),
        ({"batch_size": 10, "micro_batch_size": 4}, "multiple of micro_batch_size"),
        ({"select_by": "rm_score"}, "needs sft.reward_model"),
        ({"epochs": 0}, "epochs must be > 0"),
        ({"model.lora.enabled": "maybe"}, "expected true/false"),
    ],
)
def test_bad_config_is_a_readable_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve(SFTConfig, "sft", overrides=overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        resolve(SFTConfig, "sft", "huge")


def test_field_docstrings_are_help():
    assert "Training epochs" in field_docs(SFTConfig)["epochs"]


# Where a `run` preset's stage differs from that stage's own preset, on purpose (each file's comment
# says why): (run preset, stage) -> the stage preset it repeats and the fields it sets otherwise.
RUN_PRESET_CHANGES: dict[tuple[str, str], tuple[str, dict]] = {
    ("tiny", "sft"): ("tiny", {"epochs": 1}),
    ("full", "sft"): ("demo", {}),
    ("full", "rm"): ("demo", {}),
    ("full", "ppo"): ("demo", {"total_episodes": 960}),
    ("full", "eval"): ("demo", {"sft_best_of": 0, "base": False}),
}


STAGE_CLASSES = [("sft", SFTConfig), ("rm", RMConfig), ("ppo", PPOConfig), ("eval", EvalConfig)]


@pytest.mark.parametrize(
    "stage,cls,preset",
    [
        (stage, cls, preset)
        for preset in ("tiny", "demo", "paper", "full")
        for stage, cls in STAGE_CLASSES
        # a pair whose stage has no such preset (eval has no paper preset) has nothing to compare
        if RUN_PRESET_CHANGES.get((preset, stage), (preset, {}))[0] in PRESETS[stage]
    ],
)
def test_stage_presets_are_the_run_presets_stages(stage, cls, preset):
    """`tether ppo --preset demo` trains as `tether run --preset demo` does (one set of settings):
    each run preset file repeats its stages' own files, and a test (this one) holds them equal.

    By design the run's SFT is the PPO-init model (10 % pretraining mix) and selects its checkpoint
    by validation loss (no RM exists yet when SFT runs); beyond that only RUN_PRESET_CHANGES differ.
    """
    run = resolve(RunConfig, "run", preset)
    run.validate()  # the run preset itself must be valid (`tether run --preset paper` once was not)
    in_run = getattr(run, stage)
    own, changed = RUN_PRESET_CHANGES.get((preset, stage), (preset, {}))
    # The paper's SFT selection needs an RM to select with.
    alone = resolve(cls, stage, own, overrides={"reward_model": "rm"} if (stage, own) == ("sft", "paper") else {})
    alone = dataclasses.replace(alone, **changed)
    if stage == "sft":
        fields = {k: getattr(alone, k) for k in ("select_by", "reward_model")}
        in_run = dataclasses.replace(in_run, pretrain_fraction=0.0, **fields)
    assert alone == in_run


@pytest.mark.parametrize(("stage", "preset"), [(s, p) for s in STAGE_CONFIGS for p in PRESETS[s]])
def test_a_preset_is_a_config_file(tmp_path, capsys, stage, preset):
    """A preset is a YAML file shipped in the package, read by the --config loader; `tether config
    show STAGE --preset P` prints the whole resolved config, which resolves to the same again."""
    from tether.cli import main

    cls = STAGE_CONFIGS[stage]
    path = PRESETS[stage][preset]
    assert path.parent.parent == Path(tether.__file__).parent / "presets" and path.suffix == ".yaml"
    wanted = resolve(cls, stage, preset, validate=False)
    assert resolve(cls, stage, yaml_path=str(path), validate=False) == wanted
    assert main(["config", "show", stage, "--preset", preset]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"# tether {stage} --preset {preset}: every field, resolved.")
    (tmp_path / "mine.yaml").write_text(shown)
    assert resolve(cls, stage, yaml_path=str(tmp_path / "mine.yaml"), validate=False) == wanted
    assert yaml.safe_load(shown) == to_dict(wanted)  # every field, not only the preset's


def test_config_show_defaults_to_the_run(capsys):
    from tether.cli import main

    assert main(["config", "show", "--preset", "demo"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == to_dict(resolve(RunConfig, "run", "demo")) and shown["task_users"] == 80
    assert main(["config", "show", "eval", "--preset", "paper"]) == 2  # eval has no paper preset
    assert "unknown preset 'paper' for eval; known: tiny, demo" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override,message",
    [
        ({"ppo.cliprange": -1}, "cliprange must be > 0"),
        ({"rm.loss": "listwise"}, "config field 'rm.loss' must be one of kwise, pairwise; got 'listwise'"),
        ({"eval.samples_per_prompt": 0}, "samples_per_prompt must be > 0"),
        ({"eval.sft_best_of": 1}, "sft_best_of must be 0"),
        # 4 iterations of 8 episodes: every 4th keeps no checkpoint before the final policy (no curve).
        ({"curve_every": 4}, "run.curve_every .4. must be below the PPO iterations .4 = ppo.total_episodes 32"),
    ],
)
def test_run_validates_every_stage_before_the_first(override, message):
    """A bad --ppo.* (or --rm.*, --eval.*) value fails at once, not after SFT and the RM have run."""
    with pytest.raises(ValueError, match=message):
        resolve(RunConfig, "run", "tiny", overrides=override)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optim.lr", "inf"], "config field 'optim.lr': must be a finite number, got 'inf'"),
        (["--optim.lr", "nan"], "config field 'optim.lr': must be a finite number, got 'nan'"),
        (["--optim.lr=-1e-5"], "config field 'optim.lr' must be in (0, inf), got -1e-05"),
        (["--optim.lr", "0"], "config field 'optim.lr' must be in (0, inf), got 0.0"),
        (["--optim.betas", "0.9,1.5"], "config field 'optim.betas' must be in [0, 1), got 1.5"),
        (["--optim.eps", "-1"], "config field 'optim.eps' must be in (0, inf)"),
        (["--optim.max-grad-norm=-inf"], "config field 'optim.max_grad_norm': must be a finite number"),
        (["--optim.final-lr-fraction", "1.5"], "config field 'optim.final_lr_fraction' must be in [0, 1]"),
        (["--model.residual-dropout", "1"], "config field 'model.residual_dropout' must be in [0, 1), got 1.0"),
        (["--model.lora.r", "0"], "config field 'model.lora.r' must be in (0, inf), got 0"),
        (["--save-every-steps", "0"], "config field 'save_every_steps' must be in (0, inf), got 0"),
        (["--valid-fraction", "1e400"], "config field 'valid_fraction': must be a finite number"),
        (["--epochs", "1e400"], "config field 'epochs': expected int, got '1e400'"),
        (["--epochs", "9" * 5000], "config field 'epochs': expected int, got '" + "9" * 36 + "..."),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_refused_up_front(argv, message):
    with pytest.raises(ValueError) as info:
        parse(["--preset", "tiny", *argv])
    assert str(info.value).startswith(message)


def test_every_stage_checks_its_numbers_even_when_built_in_python():
    """Configs built in code (not through resolve) are checked by the trainers' validate()."""
    bad_optim = dataclasses.replace(SFTConfig().optim, lr=float("inf"))
    for cfg, name in [
        (SFTConfig(optim=bad_optim), "optim.lr"),
        (RMConfig(optim=bad_optim), "optim.lr"),
        (PPOConfig(value_optim=bad_optim), "value_optim.lr"),
        (RunConfig(ppo=PPOConfig(optim=bad_optim)), "ppo.optim.lr"),
    ]:
        with pytest.raises(ValueError, match=f"config field '{name}' must be a finite number, got inf"):
            cfg.validate()


def test_yaml_numbers_and_syntax_errors(tmp_path, capsys):
    from tether.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: .inf\n")
    with pytest.raises(ValueError, match="'optim.lr': must be a finite number, got inf"):
        parse(["--config", str(path)])
    path.write_text("epochs: yes\n")
    with pytest.raises(ValueError, match="'epochs': expected int, got True"):
        parse(["--config", str(path)])
    path.write_text("optim: [unclosed\n")
    assert main(["sft", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}:2: not valid YAML (expected ',' or ']', but got '<stream end>')\n"


def _literal_fields(cls: type, prefix: str = "") -> list[tuple[str, tuple[str, ...]]]:
    """Every string-choice field of ``cls`` (nested configs included), as (dotted name, choices)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _literal_fields(tp, prefix + f.name + ".")
        elif literal_choices(tp):
            out.append((prefix + f.name, literal_choices(tp)))
    return out


RUN_CHOICES = _literal_fields(RunConfig)


def test_the_choice_fields_are_all_found():
    names = {name.rsplit(".", 1)[-1] for name, _ in RUN_CHOICES}
    assert names == {
        "dtype", "autocast", "schedule", "select_by", "overlength", "loss", "kl_estimator", "score_baseline",
        "rollout_dtype", "parallel",
    }  # fmt: skip


@pytest.mark.parametrize(("name", "choices"), RUN_CHOICES, ids=[n for n, _ in RUN_CHOICES])
def test_every_string_choice_refuses_other_values_naming_the_field(name, choices):
    """Through the CLI/YAML path and for a config built in Python: one check, one message."""
    message = f"config field '{name}' must be one of {', '.join(choices)}"
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve(RunConfig, "run", "tiny", overrides={name: "bogus"})
    cfg = resolve(RunConfig, "run", "tiny")
    for value in choices:  # every listed choice passes the choice check (another rule may still refuse it)
        try:
            resolve(RunConfig, "run", "tiny", overrides={name: value})
        except ValueError as e:
            assert "must be one of" not in str(e)
    # Built in Python: replace the nested field, validate() refuses it.
    *parents, leaf = name.split(".")
    nodes = [cfg]
    for p in parents:
        nodes.append(getattr(nodes[-1], p))
    bad = dataclasses.replace(nodes[-1], **{leaf: "bogus"})
    for node, p in zip(reversed(nodes[:-1]), reversed(parents), strict=True):
        bad = dataclasses.replace(node, **{p: bad})
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        bad.validate()
    assert str(info.value).endswith("; got 'bogus'")


def test_full_preset_is_the_demo_with_three_times_its_ppo_and_a_compute_curve():
    """`tether run --preset full` (issue 13): the demo but for the fields that make the curve."""
    demo, full = resolve(RunConfig, "run", "demo"), resolve(RunConfig, "run", "full")
    full.validate()

    def flat(d: dict, prefix: str = "") -> dict:
        out: dict = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
        return out

    a, b = flat(dataclasses.asdict(demo)), flat(dataclasses.asdict(full))
    assert {k for k in a if a[k] != b[k]} == {
        "out_dir", "ppo.total_episodes", "curve_every", "run_ppo_baseline", "eval.base", "eval.sft_best_of"
    }  # fmt: skip
    assert full.ppo.total_episodes == 3 * demo.ppo.total_episodes
    # The checkpoints the pipeline keeps (pipeline._train_ppo), then the final policy: 4 PPO-ptx points.
    kept = [it * full.ppo.batch_size for it in range(full.curve_every, full.ppo.iterations, full.curve_every)]
    assert kept == [240, 480, 720] and full.ppo.iterations * full.ppo.batch_size == 960
    # The state is saved where a checkpoint is kept: a resume never redoes more than save_every.
    assert all(full.curve_every * k % full.ppo.save_every == 0 for k in (1, 2, 3))
    parser = argparse.ArgumentParser()
    add_config_args(parser, RunConfig)
    assert "full (the demo with 3x its PPO-ptx episodes" in " ".join(parser.format_help().split())
    parser = argparse.ArgumentParser()
    add_config_args(parser, SFTConfig)  # a stage's own presets: no full
    assert "paper (the paper's hyperparameters)" in " ".join(parser.format_help().split())
    assert "; full (" not in " ".join(parser.format_help().split())


def test_help_lists_the_choices():
    parser = argparse.ArgumentParser()
    add_config_args(parser, PPOConfig)
    text = " ".join(parser.format_help().split())
    assert "--kl-estimator {k1,k2,k3,abs}" in text
    assert "--rollout-dtype {float32,bfloat16,auto}" in text
    assert "--policy.autocast {auto,bfloat16,float16}" in text


@pytest.mark.parametrize(
    "cfg",
    [LoraConfig(), ModelConfig(), OptimConfig(), SFTConfig(), RMConfig(), PPOConfig(), EvalConfig(), RunConfig(),
     PreprocessConfig()],
    ids=lambda c: type(c).__name__,
)  # fmt: skip
def test_configs_are_frozen(cfg):
    """A config is changed with dataclasses.replace, never in place (a run's config.yaml stays true)."""
    name = dataclasses.fields(cfg)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, name, getattr(cfg, name))
    assert dataclasses.replace(cfg) == cfg


def test_run_split_fractions_reach_the_data_stage(tmp_path):
    from tether.pipeline import _stage_data

    sizes = {}
    for fractions in ((0.8, 0.1, 0.1), (0.5, 0.1, 0.4)):
        cfg = resolve(RunConfig, "run", "tiny", overrides={"split_fractions": list(fractions)})
        out = _stage_data(cfg, tmp_path / str(fractions[2]), lambda *_: None)
        sizes[fractions[2]] = {s: len(getattr(out, f"prompts_{s}").read_text().splitlines()) for s in ("train", "test")}
    assert sizes[0.4]["test"] > 2 * sizes[0.1]["test"]
    assert sizes[0.4]["train"] < sizes[0.1]["train"]


def test_run_split_fractions_must_sum_to_one():
    with pytest.raises(ValueError, match="run.split_fractions"):
        resolve(RunConfig, "run", "tiny", overrides={"split_fractions": "0.6,0.2,0.3"})
