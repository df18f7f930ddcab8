"""``tether label simulate``: rank sampled responses with the simulated labeler panel."""

from __future__ import annotations

import argparse

from tether.config import add_renamed_flag
from tether.data.formats import read_records, write_records


def add_label_commands(sub: argparse._SubParsersAction) -> None:
    """Add the simulated panel's subcommands to the ``tether label`` group."""
    p = sub.add_parser(
        "simulate",
        help="rank sampled responses with the simulated labeler panel",
        description=(
            "Rank the K responses of each sample record with simulated labelers (training "
            "labelers only, unless --include-heldout), writing comparison records with "
            "Likert scores and metadata flags. With --labelers-per-sample 2 or more, prints "
            "the inter-labeler agreement."
        ),
    )
    add_renamed_flag(
        p, "--samples-file", "--samples", dest="samples", required=True, help="sample records (K responses per prompt)"
    )
    add_renamed_flag(p, "--out-file", "--out", dest="out", required=True, help="comparison records to write (JSONL)")
    p.add_argument(
        "--labelers-per-sample",
        type=int,
        default=1,
        metavar="N",
        help="how many labelers rank each sample (default: 1)",
    )
    p.add_argument(
        "--include-heldout",
        action="store_true",
        help="let the held-out labelers label too (their labels should not be trained on)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for assignment and noise (default: 0)")
    p.set_defaults(func=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the panel (numpy), which `tether --help` must not load.
    from tether.data.agreement import pairwise_agreement
    from tether.labelers.panel import Panel

    samples = read_records(args.samples, "sample")
    panel = Panel()
    labelers = panel.labelers if args.include_heldout else panel.train_labelers
    comparisons = panel.label(samples, labelers_per_sample=args.labelers_per_sample, labelers=labelers, seed=args.seed)
    write_records(args.out, comparisons)

    expected = len(samples) * args.labelers_per_sample
    pairs = sum(len(c.pairs()) for c in comparisons)
    used = sorted({c.labeler_id for c in comparisons if c.labeler_id is not None})
    print(
        f"labeled {len(samples)} samples: {len(comparisons)} comparisons, {pairs} ranked pairs, "
        f"by {len(used)} labelers ({', '.join(used)})"
    )
    if len(comparisons) < expected:
        print(f"  left out {expected - len(comparisons)} judgements that tied every response")
    if args.labelers_per_sample >= 2:
        print(pairwise_agreement(comparisons))
    print(f"wrote {args.out}")
    return 0
