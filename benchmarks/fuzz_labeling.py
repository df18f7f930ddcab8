"""A long fuzzing run of the labeling app: thousands of hostile requests, counting server errors.

The same hypothesis strategies as tests/labeling/test_label_fuzz.py (which runs a bounded number
of them in the suite), here without stopping at the first failure: every request is sent, and
the script prints how many there were, how many came back 5xx (with the first few), the status
mix and the time. Exits 1 if any request was a 5xx.

    .venv/bin/python benchmarks/fuzz_labeling.py                    # 5,000 requests, seed 0
    .venv/bin/python benchmarks/fuzz_labeling.py --requests 20000 --seed 3
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "labeling"))

from fuzz_support import FuzzRequest, FuzzTarget, requests  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="requests to send (default: 5000)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default: 0)")
    args = parser.parse_args()
    logging.getLogger("python_multipart").setLevel(logging.ERROR)  # one warning per malformed body

    statuses: Counter[int] = Counter()
    errors: list[tuple[FuzzRequest, int, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        target = FuzzTarget(Path(tmp) / "fuzz.db")

        @seed(args.seed)
        @settings(
            max_examples=args.requests,
            deadline=None,
            database=None,
            phases=[Phase.generate],  # no shrinking: every drawn request is sent once
            suppress_health_check=list(HealthCheck),
        )
        @given(requests(target.ids))
        def send(req: FuzzRequest) -> None:
            r = target.send(req)
            statuses[r.status_code] += 1
            if r.status_code >= 500:
                errors.append((req, r.status_code, r.text[:300]))

        start = time.perf_counter()
        try:
            send()
        finally:
            target.close()
        seconds = time.perf_counter() - start

    total = sum(statuses.values())
    print(
        f"{total} requests (seed {args.seed}) in {seconds:.1f} s ({total / seconds:.0f}/s): {len(errors)} server errors"
    )
    print("status mix: " + ", ".join(f"{code} x{n}" for code, n in sorted(statuses.items())))
    for req, code, text in errors[:10]:
        print(f"  {code}: {req}\n      {text!r}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
