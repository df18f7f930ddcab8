"""Property-based fuzzing of the labeling app: no request, however malformed, is a server error.

A bounded run (a fixed seed, so the suite is deterministic); benchmarks/fuzz_labeling.py runs the
same strategies for thousands of requests.
"""

from __future__ import annotations

from pathlib import Path

from fuzz_support import FuzzRequest, FuzzTarget, requests
from hypothesis import HealthCheck, Phase, given, seed, settings


def test_no_request_is_a_server_error(tmp_path: Path) -> None:
    target = FuzzTarget(tmp_path / "fuzz.db")

    @seed(14)
    @settings(
        max_examples=250,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests(target.ids))
    def check(req: FuzzRequest) -> None:
        r = target.send(req)
        assert r.status_code < 500, f"{req}\n{r.status_code}: {r.text[:500]}"
        if r.status_code >= 400 and "text/html" in r.headers.get("content-type", ""):
            assert 'class="error"' in r.text or 'action="/login"' in r.text, r.text[:500]

    try:
        check()
    finally:
        target.close()
