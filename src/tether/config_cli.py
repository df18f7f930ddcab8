"""``tether config show``: a command's resolved config as YAML, to copy and edit for ``--config``."""

from __future__ import annotations

import argparse
import sys

import yaml

from tether.config import PRESET_HELP, PRESETS, STAGE_CONFIGS, resolve, to_dict


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print a command's resolved config (a preset's, a file's) as YAML")
    actions = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = actions.add_parser(
        "show",
        help="the resolved config of a command, every field, as YAML",
        description="Prints every field of COMMAND's config as --preset and --config resolve it: save it, edit it, "
        "and pass it back with `tether COMMAND --config FILE`. Example: tether config show sft --preset tiny",
    )
    show.add_argument(
        "command_name",
        nargs="?",
        default="run",
        choices=list(STAGE_CONFIGS),
        metavar="COMMAND",
        help=f"{', '.join(STAGE_CONFIGS)} (default: run)",
    )
    names = sorted({name for presets in PRESETS.values() for name in presets}, key=list(PRESET_HELP).index)
    show.add_argument("--preset", help=f"start from a preset: {', '.join(names)} (each command has its own)")
    show.add_argument("--config", help="YAML file with config fields, on top of the preset")
    show.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    stage = args.command_name
    # A preset need not run on its own to be shown (sft's paper preset needs --reward-model).
    cfg = resolve(STAGE_CONFIGS[stage], stage, args.preset, args.config, validate=False)
    given = " ".join(f"--{k} {v}" for k, v in (("preset", args.preset), ("config", args.config)) if v)
    sys.stdout.write(
        f"# tether {stage} {given}".rstrip() + ": every field, resolved. Save this file, edit it, run\n"
        f"# `tether {stage} --config FILE`.\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False)
    )
    return 0
