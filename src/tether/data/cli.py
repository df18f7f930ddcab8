"""``tether data``: validate, convert and preprocess data files."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, get_args

from tether.config import add_renamed_flag
from tether.data.formats import (
    KINDS,
    RECORD_TYPES,
    kind_of,
    read_records,
    read_rows,
    to_json,
    validate_file,
    write_records,
)
from tether.data.preprocess import PiiMode, PreprocessConfig, preprocess_prompts


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="validate and preprocess data files")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    v = dsub.add_parser(
        "validate",
        help="check data files against their record contract: every bad line of every file, exit 2 if any",
    )
    v.add_argument("files", nargs="+", help="JSONL / Parquet file, datasets directory, or datasets NAME[:SPLIT]")
    v.add_argument("--kind", choices=KINDS, help="read the files as this kind (default: guessed from the fields)")
    v.add_argument(
        "--max-errors", type=int, default=50, help="list at most this many bad lines per file (all are counted)"
    )
    v.set_defaults(func=_validate)

    c = dsub.add_parser(
        "convert",
        help="write files of any shape tether reads as one JSONL file of tether's own records, each with its source",
    )
    c.add_argument(
        "inputs", nargs="+", metavar="input", help="JSONL / Parquet file, datasets directory, or datasets NAME[:SPLIT]"
    )
    c.add_argument("output", help="JSONL file to write: the inputs' records in order (one kind)")
    c.add_argument("--kind", choices=KINDS, help="the record kind to write (default: guessed from the fields)")
    c.set_defaults(func=_convert)

    # Defaults are SUPPRESSed so that PreprocessConfig stays the one place they are set.
    keep = argparse.SUPPRESS
    pp = dsub.add_parser(
        "preprocess",
        help="PII filter, length filter, dedup, per-user cap and train/valid/test split by user",
    )
    pp.add_argument("prompts", help="prompt records: JSONL / Parquet file or datasets directory")
    add_renamed_flag(
        pp,
        "--out-dir",
        "--out",
        dest="out",
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
        "--split-fractions",
        dest="fractions",
        action=_Fractions,
        metavar="TRAIN,VALID,TEST",
        default=keep,
        help="fractions of users per split, as `tether run --split-fractions` takes them (default: 0.8,0.1,0.1)",
    )
    # The former spelling, three numbers spaced.
    pp.add_argument("--fractions", dest="fractions", nargs=3, action=_Fractions, default=keep, help=keep)
    pp.add_argument("--seed", type=int, default=keep, help="seed for the cap and the split (default: 0)")
    pp.set_defaults(func=_preprocess)

    dt = dsub.add_parser(
        "default-task",
        help="write the built-in task: prompts, demonstrations and pretraining text",
    )
    add_renamed_flag(dt, "--out-dir", "--out", dest="out", required=True, help="directory for the four JSONL files")
    dt.add_argument("--seed", type=int, default=0, help="generation seed (default: 0)")
    dt.set_defaults(func=_default_task)


class _Fractions(argparse.Action):
    """Three numbers, comma-separated as everywhere else (0.8,0.1,0.1) or, as before, spaced."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        values = [values] if isinstance(values, str) else values
        parts = [p for v in values for p in v.split(",") if p]
        try:
            fractions = [float(p) for p in parts]
        except ValueError:
            parser.error(f"{option} takes three numbers, e.g. 0.8,0.1,0.1; got {' '.join(values)}")
        if len(fractions) != 3:
            parser.error(f"{option} takes three numbers (train, valid, test), got {len(fractions)}")
        setattr(namespace, self.dest, fractions)


def _validate(args: argparse.Namespace) -> int:
    if args.max_errors < 1:
        raise ValueError(f"--max-errors must be at least 1, got {args.max_errors}")
    bad_files = 0
    for f in args.files:
        report = validate_file(f, args.kind, max_errors=args.max_errors)
        extra = "".join(f", {k}={v}" for k, v in report.stats.items())
        if not report.bad_rows:
            print(f"ok: {report.path}: {report.count} {report.kind} records{extra}")
            continue
        bad_files += 1
        for e in report.errors:
            print(f"error: {e}", file=sys.stderr)
        more = report.bad_rows - len(report.errors)
        listed = f" ({more} more not listed: --max-errors {args.max_errors})" if more > 0 else ""
        print(f"bad: {report.path}: {report.bad_rows} bad, {report.count} good {report.kind or ''} records{listed}")
    if bad_files:
        print(f"{bad_files} of {len(args.files)} files have bad records")
        return 2
    return 0


# The fields the shapes tether reads are made of; a converted record keeps any other column in "meta".
_SHAPE_FIELDS = frozenset({"messages", "completion", "chosen", "rejected", "prompt", "text", "id", "prompt_id"})


def _convert(args: argparse.Namespace) -> int:
    records, kind = [], args.kind
    for source in args.inputs:  # the first file's kind is every later file's (an empty file adds nothing)
        for row in read_rows(source, kind):
            if row.error is not None or row.record is None:
                raise row.error or ValueError(f"{source}:{row.line}: unreadable")
            kind = kind_of(row.record)
            own = {f.name for f in dataclasses.fields(RECORD_TYPES[kind])} | _SHAPE_FIELDS | {"source", "meta"}
            meta = {k: v for k, v in row.raw.items() if k not in own}
            out = to_json(row.record) | {"source": f"{source}:{row.line}"}
            records.append(out | ({"meta": meta} if meta else {}))
    if not records:
        raise ValueError(f"{', '.join(args.inputs)}: hold no records")
    write_records(args.output, records)
    print(f"wrote {len(records)} {kind} records to {args.output}, each with its source (FILE:LINE)")
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
    print(f"kept {r.kept} prompts; split by {r.split_by}")
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
