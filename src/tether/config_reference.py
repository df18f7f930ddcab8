"""The configuration reference page (docs/configuration.md), generated from the config dataclasses.

Each field's description is its docstring, the text ``--help`` shows; its default is the one the
stage really starts from (nested configs included, e.g. PPO's constant-LR optimiser). Regenerate
the page after changing a config field (tests/test_docs.py fails while it is stale)::

    .venv/bin/python -m tether.config_reference docs/configuration.md
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from tether.config import PRESET_HELP, PRESETS, STAGE_CONFIGS, RunConfig, field_docs, literal_choices

COMMAND = ".venv/bin/python -m tether.config_reference docs/configuration.md"

TITLES = {
    "sft": "Stage 1: SFT",
    "rm": "Stage 2: reward model",
    "ppo": "Stage 3: PPO and PPO-ptx",
    "eval": "Evaluation",
    "run": "The pipeline",
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One flag of the page: a leaf field of a (nested) config dataclass."""

    name: str  # dotted field name, e.g. "model.lora.r"
    kind: str  # the accepted values
    default: Any
    doc: str


def rows(cfg: Any, prefix: str = "") -> list[Row]:
    """Every leaf field of the config instance ``cfg`` (its values are the defaults shown)."""
    out: list[Row] = []
    cls: type = type(cfg)
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(rows(value, prefix + f.name + "."))
            continue
        out.append(Row(prefix + f.name, _kind(hints[f.name], str(f.type)), value, docs.get(f.name, "")))
    return out


def groups(cfg: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted name, docstring) of each nested config that has one, e.g. PPO's ``policy``."""
    out: list[tuple[str, str]] = []
    cls: type = type(cfg)
    docs = field_docs(cls)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            if docs.get(f.name):
                out.append((prefix + f.name, docs[f.name]))
            out.extend(groups(value, prefix + f.name + "."))
    return out


def _kind(tp: Any, annotation: str) -> str:
    """The accepted values, in words: a Literal's choices, else the annotation (``X | None`` as 'X or None')."""
    optional = annotation.endswith("| None")
    if choices := literal_choices(tp):
        return "one of " + ", ".join(f"`{c}`" for c in choices) + (" or `None`" if optional else "")
    return " or ".join(f"`{part.strip()}`" for part in annotation.split("|"))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _cell(text: str) -> str:
    """Table-cell safe: pipes and angle brackets escaped, one line."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        value = str(value).lower()  # as typed on the command line and in YAML
    elif isinstance(value, tuple):
        value = ",".join(str(v) for v in value) if value else "()"
    return f"`{value}`"


def _table(items: list[Row], flag_prefix: str = "") -> list[str]:
    lines = ["| flag | values | default | description |", "|---|---|---|---|"]
    for r in items:
        lines.append(
            f"| `{_flag(flag_prefix + r.name)}` | {_cell(r.kind)} | {_cell(_value(r.default))} | {_cell(r.doc)} |"
        )
    return lines


def _preset_overrides(stage: str, name: str) -> dict[str, Any]:
    """A preset's fields by dotted name (a preset is a partial config: a YAML file or a mapping)."""
    source: Any = PRESETS[stage][name]
    data = source if isinstance(source, dict) else yaml.safe_load(Path(source).read_text()) or {}
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(data, "")
    return flat


def _presets(stage: str) -> list[str]:
    names = list(PRESETS.get(stage, {}))
    if not names:
        return []
    lines = ["", "Presets (`--preset NAME`) change these fields:", ""]
    for name in names:
        changes = ", ".join(f"`{key}` = {_value(value)}" for key, value in _preset_overrides(stage, name).items())
        lines.append(f"- `{name}` ({_cell(PRESET_HELP.get(name, ''))}): {_cell(changes)}")
    return lines


def render() -> str:
    """The whole page, as committed in docs/configuration.md."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from src/tether/config.py: do not edit by hand. Regenerate with",
        f"     {COMMAND} -->",
        "",
        "Every stage is configured by a typed dataclass in `tether.config`; each field is a flag of its",
        "command (nested fields with dots: `--model.lora.r 8`), a key of a YAML file given with",
        "`--config` (the same nesting as the `config.yaml` every run saves), and its description is the",
        "field's docstring, the text `--help` shows. Later wins: the defaults below, then `--preset`,",
        "then `--config`, then the flags. Booleans are `true` / `false`, pairs and lists `a,b`, and `None`",
        "is written `null` in YAML. In Python the configs are frozen dataclasses: change one with",
        "`dataclasses.replace`.",
    ]
    run_defaults = RunConfig()
    for stage, cls in STAGE_CONFIGS.items():
        command = f"tether {stage}"
        out += ["", f"## {TITLES[stage]}: `{command}` {{#{stage}}}", ""]
        if stage == "run":
            own = [r for r in rows(run_defaults) if r.name.split(".")[0] not in ("sft", "rm", "ppo", "eval")]
            out.append(
                "The pipeline's own fields; every field of the stages above is a flag here too, prefixed with "
                "its stage: `--sft.epochs`, `--rm.model.lora.enabled`, `--ppo.kl-coef`, `--eval.samples-per-prompt`."
            )
            out += [""] + _table(own)
            changed = _run_stage_defaults(run_defaults)
            if changed:
                out += ["", "Inside `tether run` these stage defaults differ from the stage commands' own:", ""]
                out += [f"- `{_flag(name)}`: {_value(value)}" for name, value in changed]
        else:
            out.append(f"`{command} --help` lists the same flags.")
            if notes := groups(cls()):
                out += ["", "Groups of flags:", ""] + [f"- `{_flag(name)}.*`: {_cell(doc)}" for name, doc in notes]
            out += [""] + _table(rows(cls()))
        out += _presets(stage)
    return "\n".join(out) + "\n"


def _run_stage_defaults(run: RunConfig) -> list[tuple[str, Any]]:
    """(dotted run flag, value) for each stage field whose default inside a run differs from the stage's."""
    changed = []
    for stage in ("sft", "rm", "ppo", "eval"):
        inside = {r.name: r.default for r in rows(getattr(run, stage))}
        alone = {r.name: r.default for r in rows(STAGE_CONFIGS[stage]())}
        changed += [(f"{stage}.{name}", value) for name, value in inside.items() if alone.get(name) != value]
    return changed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: {COMMAND}", file=sys.stderr)
        return 2
    Path(args[0]).write_text(render())
    print(f"wrote {args[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
