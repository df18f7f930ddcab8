"""Fixtures of the PPO tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module: tiny models gain nothing from more, and bf16 round-off
    comparisons should not depend on how a matmul is split over threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
