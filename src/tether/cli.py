"""The ``tether`` command: thin entry points, one function call per subcommand.

Each stage package exposes ``add_commands(subparsers)`` in its own ``cli.py``. Those modules import
only the config and the record formats at their top; what loads torch, numpy, rich or the labeling
app's web stack is imported inside the command's handler (and says so), so ``tether --help`` stays
fast and the training commands never import the web app.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

from tether import config_cli, pipeline_cli
from tether.allocator import keep_freed_memory
from tether.cluster import StageFailed
from tether.data import cli as data_cli
from tether.data.formats import DataError
from tether.eval import cli as eval_cli
from tether.labelers import cli as labelers_cli
from tether.labeling import cli as labeling_cli
from tether.models import cli as models_cli
from tether.ppo import cli as ppo_cli
from tether.reward import cli as reward_cli
from tether.sft import cli as sft_cli

# In the order of `tether --help`.
COMMANDS = (data_cli, sft_cli, models_cli, reward_cli, ppo_cli, eval_cli, pipeline_cli, config_cli)
# `tether label ...` gathers the simulated panel (labelers/) and the human app (labeling/).
LABEL_COMMANDS = (labelers_cli, labeling_cli)


def _version() -> str:
    """The installed distribution's version (pyproject's), not a second copy kept in the code."""
    try:
        return importlib.metadata.version("tether")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="InstructGPT-style RLHF: SFT, K-wise reward model, PPO-ptx, labeling, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"tether {_version()}")
    parser.add_argument(
        "--debug", action="store_true", help="show the Python traceback of any error (anywhere on the line)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_commands(sub)
    label = sub.add_parser("label", help="labels: the simulated panel and the human labeling app")
    label_sub = label.add_subparsers(dest="label_command", metavar="ACTION", required=True)
    for module in LABEL_COMMANDS:
        module.add_label_commands(label_sub)
    return parser


def _normalised(argv: list[str]) -> list[str]:
    """``--debug`` anywhere on the line (it is the top-level flag argparse knows), and a
    command's ``-h``/``--help`` last, so that the help shows the values of the ``--preset`` and
    ``--config`` typed after it."""
    tokens = [a for a in argv if a != "--debug"]
    debug = ["--debug"] if len(tokens) < len(argv) else []
    command = next((i for i, a in enumerate(tokens) if not a.startswith("-")), len(tokens))
    helps = [a for a in tokens[command:] if a in ("-h", "--help")]
    rest = tokens[:command] + [a for a in tokens[command:] if a not in ("-h", "--help")]
    return debug + rest + helps[:1]


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done, 1 the run stopped (non-finite training, an OS error, a
    cluster worker died),
    2 bad input (data, config, arguments), 130 interrupted. Tracebacks are for bugs (and --debug)."""

    args = build_parser().parse_args(_normalised(sys.argv[1:] if argv is None else argv))
    if args.command in ("run", "sample", "eval", "label", "data") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Only the trainers are data parallel; the rest would run once per rank, writing the same files.
        print(
            f"error: `tether {args.command}` does not run under torchrun (WORLD_SIZE > 1): launch the "
            "trainers (tether sft | rm | ppo) with torchrun one by one, or the whole pipeline with "
            "`tether run --ray-address ...`",
            file=sys.stderr,
        )
        return 2
    keep_freed_memory()  # large tensors reuse freed memory instead of faulting in fresh pages
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, DataError | ValueError | FileNotFoundError):
            code = 2
        elif isinstance(e, FloatingPointError | OSError | StageFailed):
            code = 1
        else:
            raise  # a bug: the traceback is what a report needs
        print(f"error: {e}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
