"""The ``tether`` command: thin entry points, one function call per subcommand.

Each stage package exposes ``add_commands(subparsers)`` in its own ``cli.py``; those modules import
only argparse at import time, so ``tether --help`` stays fast and the web app is never imported by
the training commands.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "tether.data.cli",
    "tether.sft.cli",
    "tether.labelers.cli",
    "tether.reward.cli",
    "tether.ppo.cli",
    "tether.eval.cli",
    "tether.labeling.cli",
    "tether.pipeline_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="InstructGPT-style RLHF: SFT, K-wise reward model, PPO-ptx, labeling, evaluation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a stage not built yet
                continue
            raise
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tether.data.formats import DataError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
