"""The suite's own rules (tests/conftest.py): under CI=true a skipped test fails the run."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

INNER = """
import pytest

@pytest.fixture
def postgres():
    pytest.skip("PostgreSQL is not installed")

def test_database(postgres):
    pass

@pytest.mark.skipif(True, reason="needs Debian's chromium")
def test_browser():
    pass

@pytest.mark.xfail(reason="a known failure is not a skip")
def test_known_failure():
    assert False

def test_plain():
    pass
"""


@pytest.mark.parametrize("ci", ["true", ""])
def test_under_ci_a_missing_dependency_fails_instead_of_skipping(pytester: pytest.Pytester, monkeypatch, ci):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(test_inner=INNER)
    monkeypatch.setenv("CI", ci)
    result = pytester.runpytest("-p", "no:cacheprovider", "-rA")
    if ci:
        result.assert_outcomes(passed=1, errors=2, xfailed=1)
        result.stdout.fnmatch_lines(["*CI=true: a test may not skip (PostgreSQL is not installed)*"])
        result.stdout.fnmatch_lines(["*CI=true: a test may not skip (needs Debian's chromium)*"])
    else:
        result.assert_outcomes(passed=1, skipped=2, xfailed=1)
