"""tether.cluster without a cluster: shards, the flags of `tether run`, errors and exit codes."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tether import cli
from tether.cluster import Local, StageFailed, split


def test_split_covers_every_item_once_in_order_and_evenly():
    for n in range(0, 12):
        for parts in range(1, 6):
            ranges = split(n, parts)
            assert [i for a, b in ranges for i in range(a, b)] == list(range(n))
            sizes = [b - a for a, b in ranges]
            assert len(ranges) == max(1, min(parts, n)) and max(sizes) - min(sizes) <= 1
            assert n == 0 or min(sizes) >= 1


def test_local_runs_everything_here_in_one_shard():
    local = Local()
    assert local.shards(7) == [(0, 7)] and local.map([lambda: 1, lambda: 2]) == [1, 2]
    assert local.train("sft", lambda x, log: {"x": x, "log": log}, 3, log=print) == {"x": 3, "log": print}


def test_ray_flags_without_an_address_are_refused(tmp_path, capsys):
    rc = cli.main(["run", "--preset", "tiny", "--out-dir", str(tmp_path), "--num-workers", "2", "--use-gpu"])
    assert rc == 2
    assert "--num-workers, --use-gpu need --ray-address" in capsys.readouterr().err
    assert not (tmp_path / "manifest.json").exists()


def test_an_address_without_ray_installed_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    rc = cli.main(["run", "--preset", "tiny", "--out-dir", str(tmp_path), "--ray-address", "local"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--ray-address needs Ray, which is not installed" in err and "tether[ray]" in err
    assert not (tmp_path / "manifest.json").exists()


def test_a_stage_that_failed_on_the_cluster_exits_1_with_its_one_line(tmp_path, capsys, monkeypatch):
    import tether.pipeline

    def died(*_a, **_k):
        raise StageFailed("round-1/ppo_ptx: Ray Train worker rank 1 died (ActorDiedError); rerun the same command")

    monkeypatch.setattr(tether.pipeline, "run_pipeline", died)
    assert cli.main(["run", "--preset", "tiny", "--out-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: round-1/ppo_ptx: Ray Train worker rank 1 died (ActorDiedError); rerun the same command"
    )


def test_bad_worker_counts_are_refused_before_connecting():
    from tether.cluster import RayCluster

    with pytest.raises(ValueError, match="--num-workers must be >= 1, got 0"):
        RayCluster("local", 0)
    with pytest.raises(ValueError, match="--cpus-per-worker must be >= 1"):
        RayCluster("local", 2, cpus_per_worker=0)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the ray extra is not installed")
def test_ray_train_failures_become_one_line_or_the_trainers_own_error():
    """What ``RayCluster.train`` makes of Ray Train v2's own exceptions (the real classes, built
    here without a cluster): a dead worker is named with how to resume, ahead of the collective
    errors it causes in the other ranks; a worker's bad-input error keeps its type and message."""
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import TrainingFailedError, WorkerGroupError

    from tether.cluster import _stage_error

    died = WorkerHealthCheckFailedError("worker 1 failed its health check", ActorDiedError())
    peer = RuntimeError("[../third_party/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    failed = WorkerGroupError("Training failed due to worker errors", {0: peer, 1: died})
    assert isinstance(failed, TrainingFailedError)  # what RayCluster.train catches
    line = str(_stage_error("round-1/ppo_ptx", failed))
    assert line == (
        "round-1/ppo_ptx: Ray Train worker rank 1 died (ActorDiedError); "
        "rerun the same command to resume from the last checkpoint"
    )
    bad = ValueError("prompts.jsonl line 3: field 'prompt' is missing")
    assert _stage_error("sft", WorkerGroupError("failed", {0: bad})) is bad
    line = str(_stage_error("sft", WorkerGroupError("failed", {1: peer})))
    assert line.startswith("sft failed on Ray Train worker rank 1: [../third_party/gloo") and "rerun the same" in line
