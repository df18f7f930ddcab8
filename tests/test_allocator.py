"""Freed memory kept in the process: a large tensor allocated again faults in no fresh pages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only"
)

PROBE = """
import resource, sys, torch
from tether.allocator import keep_freed_memory
print(keep_freed_memory(sys.argv[1] == "keep"))
faults = []
for _ in range(16):  # a 64 MiB temporary, made and freed as a training loop makes its logits
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 * 2**20, dtype=torch.float32)
    x.fill_(1.0)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The heap grows over the first few (aligned allocations leave fragments): the steady state.
print(sum(faults[-3:]))
"""


def probe(mode: str, **env: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env={**os.environ, **env}
    ).stdout.split()
    return out[0] == "True", int(out[1])


def test_kept_memory_is_reused_without_page_faults():
    took, kept = probe("keep")
    assert took
    default_took, default = probe("default")
    assert default_took
    # glibc's default: every 64 MiB temporary is a fresh mmap, all of its pages faulted in again:
    # 16,384 faults of 4 KiB each time, or at least 32 where transparent huge pages are always on.
    fewest = 32 if "[always]" in thp_mode() else 64 * 2**20 // os.sysconf("SC_PAGE_SIZE") // 2
    assert default >= 3 * fewest
    assert kept * 8 < default
    # The switch: the default behaviour, asked for by the environment.
    off_took, off = probe("keep", TETHER_KEEP_FREED_MEMORY="0")
    assert not off_took and off >= 3 * fewest


def thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            return fh.read()
    except OSError:
        return ""


def test_the_tether_command_keeps_freed_memory(monkeypatch, tmp_path):
    import tether.cli

    calls = []
    monkeypatch.setattr(tether.cli, "keep_freed_memory", lambda: calls.append(True) or True)
    assert tether.cli.main(["data", "default-task", "--out", str(tmp_path)]) == 0
    assert calls == [True]
