"""``tether data``: validate and preprocess data files."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="validate and preprocess data files")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    v = dsub.add_parser("validate", help="check a data file against its record contract")
    v.add_argument("files", nargs="+", help="JSONL / Parquet file or datasets directory")
    v.add_argument("--kind", choices=["prompt", "demonstration", "sample", "comparison", "pretrain"])
    v.set_defaults(func=_validate)


def _validate(args) -> int:
    from tether.data.formats import validate_file

    for f in args.files:
        report = validate_file(f, args.kind)
        extra = "".join(f", {k}={v}" for k, v in report.stats.items())
        print(f"ok: {report.path}: {report.count} {report.kind} records{extra}")
    return 0
