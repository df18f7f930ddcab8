"""tether.cluster without a cluster: shards, the flags of `tether run`, errors and exit codes."""

from __future__ import annotations

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
