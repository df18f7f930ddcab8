"""``tether data``: validate and preprocess data files."""

from __future__ import annotations

import argparse
from typing import get_args

from tether.data.formats import read_records, validate_file
from tether.data.preprocess import PiiMode, PreprocessConfig, preprocess_prompts


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="validate and preprocess data files")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    v = dsub.add_parser("validate", help="check a data file against its record contract")
    v.add_argument("files", nargs="+", help="JSONL / Parquet file or datasets directory")
    v.add_argument("--kind", choices=["prompt", "demonstration", "sample", "comparison", "pretrain"])
    v.set_defaults(func=_validate)

    # Defaults are SUPPRESSed so that PreprocessConfig stays the one place they are set.
    keep = argparse.SUPPRESS
    pp = dsub.add_parser(
        "preprocess",
        help="PII filter, length filter, dedup, per-user cap and train/valid/test split by user",
    )
    pp.add_argument("prompts", help="prompt records: JSONL / Parquet file or datasets directory")
    pp.add_argument(
        "--out",
        required=True,
        help="directory for train/valid/test.jsonl, dropped.jsonl (ids and reasons), report.json",
    )
    pp.add_argument(
        "--pii",
        choices=get_args(PiiMode),
        default=keep,
        help="drop prompts with personal information, or redact it (default: drop)",
    )
    pp.add_argument(
        "--max-chars", type=int, default=keep, help="drop prompts longer than this many characters (default: no limit)"
    )
    pp.add_argument(
        "--max-words", type=int, default=keep, help="drop prompts longer than this many words (default: 1000)"
    )
    pp.add_argument(
        "--prefix-chars",
        type=int,
        default=keep,
        help="duplicates share this many leading characters, case and spacing ignored (default: 64)",
    )
    pp.add_argument(
        "--max-per-user", type=int, default=keep, help="at most this many prompts per user id (default: 200)"
    )
    pp.add_argument(
        "--fractions",
        type=float,
        nargs=3,
        metavar=("TRAIN", "VALID", "TEST"),
        default=keep,
        help="fractions of users per split (default: 0.8 0.1 0.1)",
    )
    pp.add_argument("--seed", type=int, default=keep, help="seed for the cap and the split (default: 0)")
    pp.set_defaults(func=_preprocess)

    dt = dsub.add_parser(
        "default-task",
        help="write the built-in task: prompts, demonstrations and pretraining text",
    )
    dt.add_argument("--out", required=True, help="directory for the four JSONL files")
    dt.add_argument("--seed", type=int, default=0, help="generation seed (default: 0)")
    dt.set_defaults(func=_default_task)


def _validate(args: argparse.Namespace) -> int:
    for f in args.files:
        report = validate_file(f, args.kind)
        extra = "".join(f", {k}={v}" for k, v in report.stats.items())
        print(f"ok: {report.path}: {report.count} {report.kind} records{extra}")
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    names = ("pii", "max_chars", "max_words", "prefix_chars", "max_per_user", "fractions", "seed")
    config = PreprocessConfig(**{n: getattr(args, n) for n in names if hasattr(args, n)})
    result = preprocess_prompts(read_records(args.prompts, "prompt"), config)
    result.save(args.out)

    r = result.report
    print(f"read {r.input} prompts from {r.input_users} users: {args.prompts}")
    for step, n in r.removed.items():
        print(f"  removed {n:>7}  {step}")
    if r.pii_redacted:
        print(f"  redacted {r.pii_redacted:>6}  pii ({', '.join(r.pii_kinds)})")
    print(f"kept {r.kept} prompts")
    for name, n in r.split_prompts.items():
        print(f"  {name:<6} {n:>7} prompts  {r.split_users[name]:>6} users")
    print(f"wrote {args.out}/{{train,valid,test}}.jsonl, dropped.jsonl, report.json")
    return 0


def _default_task(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the default task (its topic tables), which `tether --help` must not load.
    from tether.data.task import build_default_task

    task = build_default_task(seed=args.seed)
    for name, path in task.write(args.out).items():
        print(f"wrote {path}  ({len(getattr(task, name))} {name.replace('_', ' ')})")
    return 0
