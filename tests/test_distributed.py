"""Data parallel (tether.distributed): sharding and seeding by hand, then 2 gloo ranks against 1
process on SFT, RM and PPO with the same global batch, and a 2-rank PPO run killed and rerun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether.config import PPOConfig, RMConfig, SFTConfig, resolve
from tether.distributed import Dist, micro_batches, rank_seed, shard, shard_range
from tether.metrics import read_metrics
from tether.ppo.train import train_ppo
from tether.reward.train import train_reward_model
from tether.sft.train import train_sft


@pytest.mark.parametrize("n", [0, 1, 5, 8])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_are_contiguous_blocks_that_tile_the_items_in_order(n, world_size):
    blocks = [shard(list(range(n)), Dist(rank, world_size)) for rank in range(world_size)]
    assert [i for b in blocks for i in b] == list(range(n))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert [len(shard_range(n, Dist(r, world_size))) for r in range(world_size)] == list(map(len, blocks))


def test_every_rank_gets_a_micro_batch_and_fillers_are_marked():
    items = ["a", "b", "c"]
    # 3 items over 4 ranks: rank 0 has none and gets a filler (its loss is multiplied by 0).
    assert micro_batches(items, 2, Dist(0, 4)) == [(["a"], False)]
    others = [micro_batches(items, 2, Dist(r, 4)) for r in (1, 2, 3)]
    assert others == [[(["a"], True)], [(["b"], True)], [(["c"], True)]]
    # 5 items over 2 ranks in micro-batches of 2: ranks hold 2 and 3 items.
    assert micro_batches(list("abcde"), 2, Dist(0, 2)) == [(["a", "b"], True)]
    assert micro_batches(list("abcde"), 2, Dist(1, 2)) == [(["c", "d"], True), (["e"], True)]
    # equal (FSDP2): every rank runs as many micro-batches as the largest share needs.
    assert micro_batches(list("abcde"), 2, Dist(0, 2), equal=True) == [(["a", "b"], True), (["a"], False)]
    # One process: the batch cut into micro-batches, as without data parallel.
    assert micro_batches(list("abcde"), 2, Dist()) == [(["a", "b"], True), (["c", "d"], True), (["e"], True)]
    with pytest.raises(ValueError, match="no items"):
        micro_batches([], 2, Dist())


def test_rank_seeds_differ_by_rank_and_seed():
    seeds = {rank_seed(s, r) for s in range(3) for r in range(4)}
    assert len(seeds) == 12
    assert all(0 <= s < 2**63 for s in seeds)
    torch.manual_seed(rank_seed(0, 1))  # a valid torch seed


# --------------------------------------------------------------------------------------------
# Two gloo ranks (spawned processes) against one process with the same global batch


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, jobs: list[tuple[str, object, dict]]) -> None:
    """One rank: the torchrun environment by hand, then the trainers, called as users call them."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from tether.checkpoint import StopAfter
    from tether.ppo.train import train_ppo
    from tether.reward.train import train_reward_model
    from tether.sft.train import train_sft

    trainers = {"sft": train_sft, "rm": train_reward_model, "ppo": train_ppo}
    try:
        for kind, cfg, kwargs in jobs:
            try:
                trainers[kind](cfg, log=lambda _: None, **kwargs)
            except StopAfter:  # a simulated crash: the next job resumes it
                pass
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(world_size: int, jobs: list[tuple[str, object, dict]]) -> None:
    torch.multiprocessing.start_processes(
        _rank_main, args=(world_size, _free_port(), jobs), nprocs=world_size, start_method="spawn"
    )


def sft_cfg(out: Path, demos: Path, extra: dict | None = None) -> SFTConfig:
    # 22 training examples in batches of 8: steps of 8, 8 and 6 examples, 2 ranks holding 4, 4
    # and 3 each, in micro-batches of 2 (accumulation under no_sync, one uneven).
    overrides = {"train_file": str(demos), "out_dir": str(out), "valid_fraction": 0.1, "select_by": "last"}
    overrides |= {"epochs": 1, "micro_batch_size": 2, "save_every_steps": 1}
    return resolve(SFTConfig, "sft", "tiny", overrides=overrides | (extra or {}))


def comparisons(n: int) -> list[dict]:
    """K = 2..4 responses per prompt, ranked by how many of their words are "good"."""
    good, bad = ["sunny", "kind", "calm", "warm"], ["dark", "cold", "sad", "rude"]
    rows = []
    for i in range(n):
        k = 2 + i % 3
        words = [
            [(good if (i * 7 + j * 3 + w) % 5 < 2 + j % 2 else bad)[(i + j + w) % 4] for w in range(3)]
            for j in range(k)
        ]
        quality = [sum(w in good for w in ws) for ws in words]
        levels = sorted(set(quality), reverse=True)
        ranks = [levels.index(q) + 1 for q in quality] if len(levels) > 1 else [1] + [2] * (k - 1)
        rows.append(
            {
                "prompt": f"Describe thing {i}.",
                "responses": [" ".join(ws) + f" {j}" for j, ws in enumerate(words)],
                "ranking": ranks,
                "labeler_id": "ann",
                "prompt_id": f"q{i}",
            }
        )
    return rows


def rm_cfg(out: Path, data: Path, extra: dict | None = None) -> RMConfig:
    # 17 training prompts in batches of 8: the last step's one prompt leaves rank 1 a filler.
    overrides = {
        "train_file": str(data / "comparisons.jsonl"),
        "valid_file": str(data / "valid.jsonl"),
        "demonstrations_file": str(data / "demos.jsonl"),
        "out_dir": str(out),
        "micro_batch_size": 2,
    }
    return resolve(RMConfig, "rm", "tiny", overrides=overrides | (extra or {}))


# PPO with everything a data-parallel step touches: PPO-ptx (pretraining examples shared out),
# two PPO epochs of 2 minibatches (a rank may hold none of a minibatch's episodes), adaptive β
# (the global KL), the EMA, samples (rank 0), a state every iteration (every rank's RNG), and the
# top block trained: the four roles share the frozen bottom one (SharedTrunk), so the policy and
# value forwards DDP must see run outside the models' own forward (through ModelCall).
PPO_ARGS = {
    "policy.trainable_layers": 1,
    "total_episodes": 24,
    "save_every": 1,
    "ema_decay": 0.9,
    "adaptive_kl": True,
    "kl_target": 0.05,
    "kl_horizon": 20,
    "ppo_epochs": 2,
    "sample_every": 1,
}


def ppo_cfg(out: Path, data: dict[str, Path], policy: Path, rm: Path) -> PPOConfig:
    paths = {
        "policy.name_or_path": str(policy),
        "reward_model": str(rm),
        "prompts_file": str(data["prompts"]),
        "pretrain_file": str(data["pretrain"]),
        "out_dir": str(out),
    }
    return resolve(PPOConfig, "ppo", "tiny", overrides=paths | PPO_ARGS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir, demonstrations, ppo_data, eos_policy, tiny_rm) -> dict[str, Path]:
    """Every stage trained once by 2 ranks (one spawn for all) and once in this process."""
    root = tmp_path_factory.mktemp("dp")
    demos = write_jsonl(root / "demos.jsonl", demonstrations)
    rows = comparisons(21)
    write_jsonl(root / "comparisons.jsonl", rows[:17])
    write_jsonl(root / "valid.jsonl", rows[17:])
    jobs = {
        "sft": lambda out: sft_cfg(out, demos),
        "rm": lambda out: rm_cfg(out, root),
        "ppo": lambda out: ppo_cfg(out, ppo_data, eos_policy, tiny_rm),
    }
    out = {f"{kind}{n}": root / f"{kind}-{n}-ranks" for kind in jobs for n in (1, 2)}
    out |= {name: root / name for name in ("sft-fsdp", "rm-fsdp", "sft-dropout", "sft-dropout-resumed")}
    fsdp, dropout = {"model.parallel": "fsdp"}, {"model.residual_dropout": 0.2}
    sft_fsdp = sft_cfg(out["sft-fsdp"], demos, fsdp)
    run_ranks(
        2,
        [(kind, make(out[f"{kind}2"]), {}) for kind, make in jobs.items()]
        # FSDP2: SFT stopped after 2 of 3 steps and resumed (sharded state gathered and re-sharded).
        + [("sft", sft_fsdp, {"stop_after_steps": 2}), ("sft", sft_fsdp, {})]
        + [("rm", rm_cfg(out["rm-fsdp"], root, fsdp), {})]
        # Dropout: each rank its own stream, saved and restored per rank across a resume.
        + [("sft", sft_cfg(out["sft-dropout"], demos, dropout), {})]
        + [("sft", sft_cfg(out["sft-dropout-resumed"], demos, dropout), {"stop_after_steps": 2})]
        + [("sft", sft_cfg(out["sft-dropout-resumed"], demos, dropout), {})],
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_sft(jobs["sft"](out["sft1"]), log=lambda _: None)
        train_reward_model(jobs["rm"](out["rm1"]), log=lambda _: None)
        logs: list[str] = []
        train_ppo(jobs["ppo"](out["ppo1"]), log=logs.append)
        assert any("share 1 of 2 blocks" in line for line in logs)
    finally:
        torch.set_num_threads(before)
    return out


def max_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def test_sft_two_ranks_equal_one_process(runs):
    diff = max_difference(runs["sft1"] / "final" / "model.safetensors", runs["sft2"] / "final" / "model.safetensors")
    print("sft max |Δw|", diff)
    assert diff < 1e-5
    m1, m2 = (read_metrics(runs[k] / "metrics.jsonl") for k in ("sft1", "sft2"))
    assert [m["step"] for m in m1] == [m["step"] for m in m2]
    for a, b in zip(m1, m2, strict=True):
        for key in ("loss", "valid_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert json.loads((runs["sft2"] / "state" / "counters.json").read_text())["world_size"] == 2


def test_fsdp2_sft_resumed_and_rm_equal_one_process(runs):
    """parallel: fsdp (FSDP2 fully_shard per block): each rank holds half of every weight; SFT
    stopped after 2 of its 3 steps and rerun (the sharded state gathered, saved, re-sharded)."""
    for stage, final in (("sft", "final/model.safetensors"), ("rm", "final/model.safetensors")):
        diff = max_difference(runs[f"{stage}1"] / final, runs[f"{stage}-fsdp"] / final)
        print(f"{stage} fsdp max |Δw|", diff)
        assert diff < 1e-5, stage
    steps = [m["step"] for m in read_metrics(runs["sft-fsdp"] / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3, 3]  # no step logged twice across the resume


def test_each_rank_has_its_own_dropout_stream_and_gets_it_back_on_resume(runs):
    """2 ranks with dropout, stopped after 2 of 3 steps and rerun, equal the uninterrupted run bit
    for bit: every rank's RNG stream was saved and restored, not rank 0's everywhere."""
    final = "final/model.safetensors"
    assert max_difference(runs["sft-dropout"] / final, runs["sft-dropout-resumed"] / final) == 0.0
    assert max_difference(runs["sft-dropout"] / final, runs["sft2"] / final) > 1e-4  # (dropout did act)
    state = torch.load(runs["sft-dropout"] / "state" / "trainer_state.pt", weights_only=False)
    streams = [r["torch"] for r in state["rng_per_rank"]]
    assert len(streams) == 2 and not torch.equal(*streams)


def test_rm_two_ranks_equal_one_process(runs):
    diff = max_difference(runs["rm1"] / "final" / "model.safetensors", runs["rm2"] / "final" / "model.safetensors")
    print("rm max |Δw|", diff)
    assert diff < 1e-5
    m1, m2 = (read_metrics(runs[k] / "metrics.jsonl") for k in ("rm1", "rm2"))
    assert len(m1) == len(m2) == 5  # before, 3 steps, after
    for a, b in zip(m1, m2, strict=True):
        for key in ("loss", "accuracy", "pairs", "grad_norm", "valid_accuracy", "valid_score_mean", "bias", "gain"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    e1, e2 = (json.loads((runs[k] / "eval.json").read_text()) for k in ("rm1", "rm2"))
    assert e1["eval_after"]["overall"] == e2["eval_after"]["overall"]
    assert json.loads((runs["rm2"] / "state" / "counters.json").read_text())["world_size"] == 2


def test_ppo_two_ranks_equal_one_process(runs):
    """Each rank samples and scores half of every batch (episode seeds make the tokens the same),
    whitens with the whole batch's statistics, trains on its episodes of each minibatch."""
    for role in ("policy", "value"):
        diff = max_difference(runs["ppo1"] / role / "model.safetensors", runs["ppo2"] / role / "model.safetensors")
        print(f"ppo {role} max |Δw|", diff)
        assert diff < 1e-5, role
    m1, m2 = (read_metrics(runs[k] / "metrics.jsonl") for k in ("ppo1", "ppo2"))
    assert [m["episodes"] for m in m2] == [8, 16, 24]
    for a, b in zip(m1, m2, strict=True):
        assert a["response_length"] == b["response_length"] and a["eos_rate"] == b["eos_rate"]  # same tokens
        for key in ("score", "kl", "kl_coef", "entropy", "policy_loss", "value_loss", "ptx_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    samples = [
        [json.loads(x)["response"] for x in (runs[k] / "samples.jsonl").read_text().splitlines()]
        for k in ("ppo1", "ppo2")
    ]
    assert samples[0] == samples[1]
    assert json.loads((runs["ppo2"] / "state" / "counters.json").read_text())["world_size"] == 2


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.timeout(300)
def test_ppo_two_ranks_killed_and_rerun_equal_the_uninterrupted_two_ranks(
    runs, tmp_path, ppo_data, eos_policy, tiny_rm
):
    """torchrun, 2 ranks: SIGKILL to the whole job once the first state is written, the same
    command again: it resumes (every rank from the same state, each with its own RNG streams)
    and ends with the weights of the uninterrupted 2-rank run, bit for bit."""
    run = tmp_path / "killed"
    flags = {
        "policy.name-or-path": eos_policy,
        "reward-model": tiny_rm,
        "prompts-file": ppo_data["prompts"],
        "pretrain-file": ppo_data["pretrain"],
        "out-dir": run,
    } | {k.replace("_", "-"): str(v).lower() if isinstance(v, bool) else v for k, v in PPO_ARGS.items()}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = [*torchrun, "-m", "tether", "ppo", "--preset", "tiny"] + [
        x for k, v in flags.items() for x in (f"--{k}", str(v))
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 200
    while time.time() < deadline and not (run / "state" / "counters.json").exists():
        time.sleep(0.02)
    # The ranks and the launcher at once, as a lost machine (torchrun starts each rank in a
    # session of its own, so killing the launcher alone would leave them running).
    for pid in [*_children(proc.pid), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "policy").exists(), "the run finished before it could be killed"
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    assert "resuming" in done.stdout and "share 1 of 2 blocks" in done.stdout
    for role in ("policy", "value"):
        assert max_difference(runs["ppo2"] / role / "model.safetensors", run / role / "model.safetensors") == 0.0
    assert (run / "samples.jsonl").read_text() == (runs["ppo2"] / "samples.jsonl").read_text()


def test_commands_that_are_not_data_parallel_refuse_torchrun(monkeypatch, capsys):
    from tether.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "--preset", "tiny", "--out-dir", "/nonexistent"]) == 2
    assert "does not run under torchrun" in capsys.readouterr().err
