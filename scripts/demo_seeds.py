"""The demo on several seeds, one after another, then one table and the bar checked on every seed.

    .venv/bin/python scripts/demo_seeds.py                         # seeds 0 1 2 of --preset demo
    .venv/bin/python scripts/demo_seeds.py --seeds 0 --preset tiny   # the machinery, in minutes
    .venv/bin/python scripts/demo_seeds.py --table-only             # the table of the runs so far

Each seed runs as ``tether run --preset PRESET --seed S --out-dir OUT_ROOT/PRESET-seedS`` (a run
that was interrupted resumes where it stopped; a finished one is not run again). Arguments after
``--`` go to every ``tether run``. The table (markdown, for docs/results.md) gives each seed's
expected win rates against SFT with their 95 % intervals, PPO-ptx's KL, the reward model's accuracy
on held-out labelers' comparisons against the labelers' own agreement, and the run's minutes; then
each criterion of the bar (:mod:`tether.eval.seeds`) with ``ok`` or ``NOT MET``. ``--check`` exits 1
when a criterion is not met.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from tether.eval.seeds import check_bar, markdown_table, read_run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--preset", default="demo")
    p.add_argument("--out-root", default="runs", help="each seed's run is OUT_ROOT/PRESET-seedS")
    p.add_argument("--table-only", action="store_true", help="run nothing: the table of the finished runs")
    p.add_argument("--check", action="store_true", help="exit 1 when a criterion of the bar is not met")
    args = p.parse_args(argv)

    run_dirs = [Path(args.out_root) / f"{args.preset}-seed{seed}" for seed in args.seeds]
    for seed, run_dir in zip(args.seeds, run_dirs, strict=True):
        if args.table_only or (run_dir / "eval" / "eval.json").exists():
            continue
        cmd = [sys.executable, "-m", "tether.cli", "run", "--preset", args.preset, "--seed", str(seed)]
        cmd += ["--out-dir", str(run_dir), *extra]
        print("demo_seeds:", " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"demo_seeds: seed {seed} failed; rerun to resume it ({run_dir})", file=sys.stderr)
            return 2
    rows = [read_run(d) for d in run_dirs if (d / "eval" / "eval.json").exists()]
    if not rows:
        print(f"demo_seeds: no finished run under {args.out_root} for seeds {args.seeds}", file=sys.stderr)
        return 2
    print(markdown_table(rows))
    print()
    checks = check_bar(rows)
    for what, ok in checks:
        print(f"{'ok     ' if ok else 'NOT MET'}  {what}")
    return 1 if args.check and not all(ok for _, ok in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
