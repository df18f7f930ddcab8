"""The whole pipeline on the tiny preset: two rounds, a kill -9 mid-run, the run moved elsewhere, and a resume."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tether import cli
from tether.data.formats import read_records
from tether.eval.seeds import Win, check_bar, read_run
from tether.models.loading import load_causal_lm


def stages(run: Path) -> dict:
    path = run / "manifest.json"
    return json.loads(path.read_text())["stages"] if path.exists() else {}


@pytest.mark.long
@pytest.mark.timeout(600)
def test_two_rounds_killed_moved_and_resumed(tmp_path, capsys):
    first = tmp_path / "disk-a" / "run"
    cmd = [sys.executable, "-m", "tether.cli", "run", "--preset", "tiny", "--rounds", "2", "--out-dir", str(first)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    # Kill once round 1's RM has finished and its PPO-ptx stage is under way.
    while time.time() < deadline and stages(first).get("round-1/ppo_ptx", {}).get("status") != "running":
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.1)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = stages(first)
    assert before["round-1/rm"]["status"] == "done" and before["round-1/ppo_ptx"]["status"] == "running"
    # The run moves to another place (another disk, another machine): nothing points back.
    run = tmp_path / "disk-b" / "moved"
    run.parent.mkdir()
    shutil.move(first, run)
    shutil.rmtree(tmp_path / "disk-a")
    assert str(first) not in (run / "manifest.json").read_text()
    cmd[-1] = str(run)

    # The rerun asserts on its way out that a run without --ray-address never imported Ray.
    no_ray = (
        "import sys; from tether.cli import main; rc = main(sys.argv[1:]); "
        "assert 'ray' not in sys.modules, 'a run without --ray-address imported ray'; sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", no_ray, *cmd[3:]], capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already done, skipping" in done.stdout
    after = stages(run)
    # Finished stages were not repeated; the interrupted one ran again and finished.
    for name in ("data", "sft", "round-1/sample", "round-1/label", "round-1/rm"):
        assert after[name]["attempts"] == 1, name
    assert after["round-1/ppo_ptx"]["attempts"] == 2
    assert all(s["status"] == "done" for s in after.values())

    # Provenance: round 2 ranks samples of round 1's PPO-ptx policy; its RM saw both rounds.
    r2 = read_records(run / after["round-2/sample"]["outputs"]["samples"], "sample")
    assert set(r2[0].policies) == {"ppo_ptx@round-1"}
    assert after["round-2/sample"]["inputs"]["policy"] == after["round-1/ppo_ptx"]["outputs"]["policy"]
    assert len(after["round-2/rm"]["outputs"]["trained_on"]) == 2
    assert after["round-2/ppo_ptx"]["inputs"]["reward_model"] == after["round-2/rm"]["outputs"]["reward_model"]
    assert "round-1/ppo" not in after and after["round-2/ppo"]["outputs"]["ptx_coef"] == 0.0

    # Users never cross splits; evaluation used the test split only.
    users = {
        s: {p.user_id for p in read_records(run / "data" / f"prompts_{s}.jsonl", "prompt")}
        for s in ("train", "valid", "test")
    }
    assert not (users["train"] & users["test"]) and not (users["valid"] & users["test"])
    report = (run / "report" / "report.html").read_text()
    assert "Win rate against sft" in report and "ppo_ptx" in report
    # Run facts: each round's RM accuracy beside the labelers' own agreement, from the manifest.
    for r in (1, 2):
        rm = after[f"round-{r}/rm"]["outputs"]
        assert f"round-{r} reward model" in report and f"accuracy {100 * rm['accuracy']:.1f} %" in report
        assert f"agree with each other {100 * rm['labeler_agreement']:.1f} %" in report
    ev = json.loads((run / "eval" / "eval.json").read_text())
    # run.curve_every 2 in the tiny preset: round 2's PPO-ptx kept after 2 of its 4 iterations too.
    assert {p["name"] for p in ev["policies"]} == {"base", "sft", "sft_bo2", "ppo", "ppo_ptx@16", "ppo_ptx"}
    by_name = {p["name"]: p for p in ev["policies"]}
    # Best-of-2 by the final RM; the model itself is SFT (no tax of its own). Candidate 0 of each
    # response is SFT's own response (common random numbers), so the RM's pick never scores below
    # it: equal when the RM prefers candidate 0 on all 4 test prompts (1 in 16 for a tiny random RM).
    bo2, sft = by_name["sft_bo2"], by_name["sft"]
    assert bo2["best_of"] == 2 and bo2["rm_score"] >= sft["rm_score"]
    assert by_name["sft_bo2"]["pretrain_ppl"] is None and "is not a trained policy" in report
    assert all(p["pretrain_ppl"] > 0 for n, p in by_name.items() if n != "sft_bo2")
    # Samples record which responses ended (EOS) and the comparisons carry it to the RM.
    r1 = read_records(run / after["round-1/sample"]["outputs"]["samples"], "sample")
    assert all(s.ended is not None and len(s.ended) == len(s.responses) for s in r1)
    comparisons = read_records(run / after["round-1/label"]["outputs"]["comparisons"], "comparison")
    assert all(c.ended is not None for c in comparisons)
    assert by_name["ppo_ptx"]["expected_win_rate"] is not None and by_name["ppo_ptx"]["expected_win_ci"]
    # The compute curve: SFT at 0 episodes, the checkpoint at 16, the final policy at 32.
    assert after["round-2/ppo_ptx"]["outputs"]["episodes"] == 32
    assert "Win rate against compute" in report and (run / "report" / "win_vs_episodes.png").stat().st_size > 1000
    for n in ("16", "32"):
        assert f"<tr><td>{n}</td>" in report
    # ... and its figures beside eval.json: each point its policy's own, the last the final policy's.
    assert after["eval"]["outputs"]["curve"] == "eval/curve.json"  # relative to the run directory
    assert str(tmp_path) not in (run / "manifest.json").read_text()  # no path names a place
    curve = json.loads((run / "eval" / "curve.json").read_text())["points"]
    assert [(p["episodes"], p["policy"]) for p in curve] == [(0, "sft"), (16, "ppo_ptx@16"), (32, "ppo_ptx")]
    for point in curve:
        for key in ("expected_win_rate", "expected_win_ci", "win_rate", "win_ci", "rm_score", "kl_to_ref"):
            assert point[key] == by_name[point["policy"]][key], (point["policy"], key)
        assert point["expected_win_ci"][0] <= point["expected_win_rate"] <= point["expected_win_ci"][1]
    # The checkpoint is a Hugging Face model directory of its own: neither SFT nor the final policy.
    checkpoint = run / after["round-2/ppo_ptx"]["outputs"]["checkpoints"]["16"]
    assert by_name["ppo_ptx@16"]["path"] == str(checkpoint)
    kept = load_causal_lm(checkpoint)[0].state_dict()
    for other in (by_name["sft"]["path"], by_name["ppo_ptx"]["path"]):
        weights = load_causal_lm(other)[0].state_dict()
        assert any(not torch.equal(w, weights[n]) for n, w in kept.items()), other

    # The seeds table reads the run's own figures: the final RM's (round 2's), every stage's seconds.
    row = read_run(run)
    ptx = by_name["ppo_ptx"]
    assert row.wins["ppo_ptx"] == Win(ptx["expected_win_rate"], *ptx["expected_win_ci"]) and "sft" in row.wins
    assert row.rm_heldout_labelers == after["round-2/rm"]["outputs"]["heldout_labeler_accuracy"] is not None
    assert row.minutes == pytest.approx(sum(s["seconds_last_attempt"] for s in after.values()) / 60)
    (tmp_path / "seeds").mkdir()
    (tmp_path / "seeds" / "tiny-seed0").symlink_to(run)
    script = Path(__file__).parents[1] / "scripts" / "demo_seeds.py"
    args = ["--table-only", "--preset", "tiny", "--seeds", "0", "--out-root", str(tmp_path / "seeds"), "--check"]
    table = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)
    assert (
        f"| 0 | {row.wins['base']} | {row.wins['sft_bo2']} | {row.wins['ppo']} | {row.wins['ppo_ptx']} |"
        in table.stdout
    )
    assert table.returncode == (0 if all(ok for _, ok in check_bar([row])) else 1), table.stdout + table.stderr

    # `tether eval --run` re-evaluates the run: its policies, its test split, flags on top of its settings.
    out = tmp_path / "re-eval"
    # (In this process: the CLI as a user calls it, without a third interpreter start.)
    assert cli.main(["eval", "--run", str(run), "--samples-per-prompt", "2", "--limit", "4", "--out", str(out)]) == 0
    again = json.loads((out / "eval.json").read_text())
    test_prompts = [p.text for p in read_records(run / "data" / "prompts_test.jsonl", "prompt")]
    assert again["prompts"] == test_prompts[:4] and again["samples_per_prompt"] == 2
    assert {p["name"] for p in again["policies"]} == set(by_name)
    assert again["config"]["sft_best_of"] == 2  # the run's own setting, kept
    assert (out / "report.html").exists() and "expected win" in capsys.readouterr().out
    assert [p["episodes"] for p in json.loads((out / "curve.json").read_text())["points"]] == [0, 16, 32]


def test_run_facts_put_each_rms_accuracy_beside_the_labelers_agreement():
    from tether.pipeline import run_facts

    stages = {
        "data": {"outputs": {"preprocess_report": {"split_prompts": {"train": 5, "valid": 2, "test": 3}}}},
        "sft": {
            "outputs": {"valid_loss_before": 2.5, "valid_loss_after": 1.25, "selected_epoch": 2},
            "seconds_last_attempt": 12.4,
        },
        "round-1/rm": {
            "outputs": {
                "accuracy": 0.582,
                "train_labeler_accuracy": 0.604,
                "heldout_labeler_accuracy": None,
                "labeler_agreement": 0.739,
            },
            "seconds_last_attempt": 7.0,
        },
        "round-1/ppo_ptx": {"status": "running"},  # unfinished: no seconds, no facts
    }
    facts = run_facts(stages)
    assert facts["prompts (split by user)"] == "train 5 / valid 2 / test 3"
    assert facts["SFT held-out demonstration loss"] == "2.500 → 1.250 (epoch 2 kept)"
    assert facts["round-1 reward model, held-out comparisons"] == (
        "accuracy 58.2 % (training labelers 60.4 %, held-out labelers –); the labelers agree with each other 73.9 %"
    )
    assert facts["stage seconds (last attempt)"] == "sft 12, round-1/rm 7"
    assert run_facts({}) == {}


def test_a_moved_manifest_gives_each_stage_its_record_at_the_new_place(tmp_path):
    """Stage outputs are typed records; manifest.json keeps their paths relative to the run
    directory and names no place, so the run reads back wherever it was moved."""
    from tether.config import RunConfig, resolve, to_dict
    from tether.pipeline import Manifest, PPOOutputs, SFTOutputs

    first = tmp_path / "a" / "run"
    first.mkdir(parents=True)
    cfg = resolve(RunConfig, "run", "tiny", overrides={"out_dir": str(first)})
    manifest = Manifest(first / "manifest.json", to_dict(cfg))
    sft = SFTOutputs(policy=first / "sft" / "epoch-1", selected_epoch=1, valid_loss_before=2.0, valid_loss_after=1.0)
    ppo = PPOOutputs(policy=first / "round-1" / "ppo_ptx" / "policy", ptx_coef=1.0, episodes=32)
    ppo.checkpoints = {"16": first / "round-1" / "ppo_ptx" / "iter-2"}
    assert manifest.run("sft", SFTOutputs, lambda: sft, {"base": "tiny"}, log=lambda _: None) == sft
    manifest.run("round-1/ppo_ptx", PPOOutputs, lambda: ppo, {"init": sft.policy}, log=lambda _: None)
    text = (first / "manifest.json").read_text()
    assert str(tmp_path) not in text and '"policy": "sft/epoch-1"' in text

    moved = tmp_path / "b" / "elsewhere"
    moved.parent.mkdir()
    shutil.move(first, moved)
    again = Manifest(moved / "manifest.json", to_dict(dataclasses.replace(cfg, out_dir=str(moved))))
    assert again.outputs("sft", SFTOutputs).policy == moved / "sft" / "epoch-1"
    back = again.outputs("round-1/ppo_ptx", PPOOutputs)
    assert back.checkpoints == {"16": moved / "round-1" / "ppo_ptx" / "iter-2"} and back.episodes == 32
    # Done stages are not run again; another config in the same place is still an error.
    assert again.run("sft", SFTOutputs, lambda: pytest.fail("ran again"), {}, log=lambda _: None).selected_epoch == 1
    with pytest.raises(ValueError, match=r"different config \(fields \['k'\]\)"):
        Manifest(moved / "manifest.json", to_dict(dataclasses.replace(cfg, k=3)))
