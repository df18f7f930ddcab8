"""The ``tether`` command line: what it installs against, what it says about itself."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from tether.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_torch_is_a_range_that_keeps_the_users_torch():
    """pyproject asks for a torch range (a user's CUDA torch stays), admitting the torch the tests
    run on and at least the minor release before it."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_req,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    assert not any(s.operator in ("==", "===", "~=") for s in torch_req.specifier), torch_req
    installed = Version(torch.__version__.split("+")[0])
    earlier = Version(f"{installed.major}.{installed.minor - 1}.0")
    assert torch_req.specifier.contains(installed) and torch_req.specifier.contains(earlier), torch_req


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"tether {importlib.metadata.version('tether')}"
