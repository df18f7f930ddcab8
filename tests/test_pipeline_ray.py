"""``tether run --preset tiny`` started in one process and continued on a local Ray cluster (2 workers,
2 CPUs), against the same run in one process: a run moves between executors mid-way, its Ray Train workers
killed mid-stage are restarted (``--max-failures 1``) and resume from the last checkpoint, and the
finished run has the single-process run's manifest, eval and report, its figures within tolerance.

Each Ray Train stage costs ~50 s of process spawns on this 2-core machine (Ray Train v2 starts 7
processes per run), so SFT, sampling, labeling and the RM run in one process here and PPO-ptx
(killed and recovered) and the evaluation's shards on Ray: the same ``RayCluster.train`` and
``RayCluster.map`` calls SFT, the RM and sampling make; each trainer's two-rank equality with one
process is tests/test_distributed.py's.

Deselect with ``-m "not ray"``; it needs the ray extra (``scripts/setup.sh --test`` installs it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

# Found, not imported: this process stays free of Ray; the runs are subprocesses.
pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(
        importlib.util.find_spec("ray") is None, reason="the ray extra is not installed (pip install -e '.[ray]')"
    ),
]

# The single-process run, asserting on the way out that nothing imported Ray.
NO_RAY = (
    "import sys; from tether.cli import main; rc = main(sys.argv[1:]); "
    "assert 'ray' not in sys.modules, 'a run without --ray-address imported ray'; sys.exit(rc)"
)


def stages(run: Path) -> dict:
    path = run / "manifest.json"
    return json.loads(path.read_text())["stages"] if path.exists() else {}


def train_workers(driver: subprocess.Popen) -> list[psutil.Process]:
    """The Ray Train worker processes under this test's own driver (never anyone else's)."""
    try:
        children = psutil.Process(driver.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in children:
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture
def ray_tmp():
    """A private Ray temp dir (short: Ray's socket paths must fit 107 bytes). Afterwards nothing of
    this cluster may still run: the driver stops it, and any straggler found here is an error."""
    path = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    yield path
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if path in " ".join(p.info["cmdline"] or []):
                left.append(p)
        except psutil.Error:
            pass
    for p in left:
        p.kill()
    shutil.rmtree(path, ignore_errors=True)
    assert not left, f"Ray processes left running after the test: {[p.pid for p in left]}"


@pytest.mark.timeout(900)
def test_tiny_run_on_a_local_ray_cluster_matches_one_process(tmp_path, ray_tmp):
    # Without the plain-PPO baseline: one Ray Train start less, and the same trainer as PPO-ptx.
    common = ["run", "--preset", "tiny", "--run-ppo-baseline", "false"]
    one_dir, ray_dir = tmp_path / "one", tmp_path / "ray"
    t0 = time.time()
    one = subprocess.run(
        [sys.executable, "-c", NO_RAY, *common, "--out-dir", str(one_dir)], capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-3000:]
    t_one = time.time() - t0

    # 0. The same run in one process until its RM is done, then killed: the rest goes to Ray.
    local = subprocess.Popen(
        [sys.executable, "-c", NO_RAY, *common, "--out-dir", str(ray_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    state = ray_dir / "round-1" / "ppo_ptx" / "state"
    deadline = time.time() + 300
    while time.time() < deadline and stages(ray_dir).get("round-1/rm", {}).get("status") != "done":
        assert local.poll() is None, "the one-process run ended before the RM was done:\n" + local.stderr.read()[-3000:]
        time.sleep(0.02)
    local.kill()
    local.communicate()
    assert not state.exists(), "killed too late: PPO-ptx had written a checkpoint in one process"
    attempts_local = stages(ray_dir).get("round-1/ppo_ptx", {}).get("attempts", 0)  # 0 or 1: started, no state

    # --max-failures 1: Ray Train restarts a stage's worker group once after a worker dies, and the
    # restarted group resumes from the last checkpoint, inside the same command. (With 0, the
    # default, the stage fails with one line and the rerun resumes: tests/test_cluster.py; the
    # rerun's resume itself is tests/test_pipeline.py's, in one process.)
    cmd = [sys.executable, "-m", "tether.cli", *common, "--out-dir", str(ray_dir)]
    cmd += ["--ray-address", "local", "--num-workers", "2", "--max-failures", "1"]
    env = os.environ | {"RAY_TMPDIR": ray_tmp}
    # 1. Kill every Ray Train worker once PPO-ptx has written its first checkpoint.
    t0 = time.time()
    log = tmp_path / "driver.log"  # a file, not a pipe: nobody reads the driver while it runs
    with log.open("w") as sink:
        driver = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and not state.exists():
        assert driver.poll() is None, "the run ended before it could be killed:\n" + log.read_text()[-3000:]
        time.sleep(0.05)
    # Every Ray Train worker process under the driver (PPO-ptx is its only Ray Train stage).
    victims = train_workers(driver)
    assert victims, "no Ray Train worker found under the driver"
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()
    # 2. The worker group restarted, PPO-ptx resumed from its checkpoint, the rest ran: exit 0.
    driver.wait(timeout=600)
    output = log.read_text()
    assert driver.returncode == 0, f"killed {len(victims)} Ray Train workers:\n" + output[-3000:]
    t_ray = time.time() - t0
    a, b = stages(one_dir), stages(ray_dir)
    assert b["round-1/ppo_ptx"]["attempts"] == attempts_local + 1  # one command: recovered inside it
    assert all(b[n]["attempts"] == 1 for n in ("sft", "round-1/sample", "round-1/label", "round-1/rm"))
    assert "ppo: resuming at iteration 3/4" in output  # from the checkpoint, not from scratch
    print(f"one process {t_one:.0f} s; Ray (2 workers, killed once, recovered) {t_ray:.0f} s")

    # 3. The same structure as one process: stages, their outputs, the eval and the report.
    assert list(a) == list(b) and all(s["status"] == "done" for s in b.values())
    on_ray = ("round-1/ppo_ptx", "eval")
    for name in a:
        assert set(a[name]["outputs"]) == set(b[name]["outputs"]), name
        assert a[name]["executor"] == "local", name
        assert b[name]["executor"] == ("ray (local): 2 workers" if name in on_ray else "local"), name
    # The stages before the switch ran as in the one-process run: the same samples, rankings and
    # RM training data (sampling and labeling are seeded per prompt, wherever they run).
    same_text = ["round-1/sample/samples", "round-1/label/comparisons", "round-1/label/valid_comparisons"]
    for key in same_text:
        stage, field = key.rsplit("/", 1)
        # (paths relative to each run directory)
        assert (one_dir / a[stage]["outputs"][field]).read_text() == (ray_dir / b[stage]["outputs"][field]).read_text()
    # Every trainer gives one process's update to float round-off on 2 ranks (the data-parallel
    # tests: max |dw| ~1e-6), and PPO's rollouts are seeded per episode, not per rank, so the
    # figures agree to float round-off too: measured on this machine, every response and verdict
    # identical, RM scores within 3e-7, perplexities equal to 1e-12. The bounds leave room for
    # round-off only; one token sampled differently would show as a different response.
    sft_a, sft_b = a["sft"]["outputs"], b["sft"]["outputs"]
    assert sft_b["valid_loss_after"] == pytest.approx(sft_a["valid_loss_after"], rel=1e-5)
    rm_a, rm_b = a["round-1/rm"]["outputs"], b["round-1/rm"]["outputs"]
    assert rm_b["accuracy"] == rm_a["accuracy"] and rm_b["gain"] == pytest.approx(rm_a["gain"], rel=1e-4)
    ev_a = json.loads((one_dir / "eval" / "eval.json").read_text())
    ev_b = json.loads((ray_dir / "eval" / "eval.json").read_text())
    assert ev_a["prompts"] == ev_b["prompts"] and ev_a["config"] == ev_b["config"]
    pa, pb = ({p["name"]: p for p in ev["policies"]} for ev in (ev_a, ev_b))
    assert list(pa) == list(pb) == ["base", "sft", "sft_bo2", "ppo_ptx@16", "ppo_ptx"]
    tolerance = dict.fromkeys(["win_rate", "expected_win_rate", "likert", "flag_rates", "preferences"], 1e-9)
    tolerance |= {"length": 1e-9, "eos_rate": 1e-9, "rm_score": 1e-4, "kl_to_ref": 1e-4}
    for name in pa:
        x, y = pa[name], pb[name]
        assert set(x) == set(y) and x["responses"] == y["responses"], name
        for key, tol in tolerance.items():
            assert (x[key] is None and y[key] is None) or x[key] == pytest.approx(y[key], abs=tol), (name, key)
        ppl = y["pretrain_ppl"]
        assert x["pretrain_ppl"] == (None if ppl is None else pytest.approx(ppl, rel=1e-4)), name
    report_a = (one_dir / "report" / "report.html").read_text()
    report_b = (ray_dir / "report" / "report.html").read_text()
    for marker in ("Win rate against sft", "Win rate against compute", "ppo_ptx", "is not a trained policy"):
        assert (marker in report_a) and (marker in report_b), marker
    assert sorted(p.name for p in (one_dir / "report").iterdir()) == sorted(
        p.name for p in (ray_dir / "report").iterdir()
    )
