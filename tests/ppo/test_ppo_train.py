"""Stage 3 behaviour on tiny random Llamas: exact KL 0, log-prob consistency, score placement,
PPO-ptx with γ = 0, adaptive β, learning on a toy reward, failure handling and exact resume."""

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
from ppo_support import length_reward, scoring_roles, update_fixture  # this folder is on sys.path
from safetensors.torch import load_file

from tether.checkpoint import StopAfter
from tether.config import PPOConfig, resolve
from tether.models.generation import sample
from tether.models.heads import load_scalar_model, reward_scores
from tether.models.loading import load_causal_lm, save_model
from tether.ops import last_token_index
from tether.ppo.rollout import Rollout
from tether.ppo.train import EMA, ppo_step, take_cyclic, train_ppo

QUIET = {"log": lambda _: None}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in the CLI subprocesses (OMP_NUM_THREADS below).

    The tiny models gain nothing from threads, a shared 2-core machine loses a lot to
    oversubscription, and in-process and subprocess runs must reduce in the same order to be
    bitwise comparable.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ppo_cfg(out: Path, data: dict[str, Path], policy: Path, **overrides) -> PPOConfig:
    base = {
        "policy.name_or_path": str(policy),
        "prompts_file": str(data["prompts"]),
        "pretrain_file": str(data["pretrain"]),
        "out_dir": str(out),
    }
    base.update(overrides)
    return resolve(PPOConfig, "ppo", "tiny", overrides=base)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


# --------------------------------------------------------------------------------------------
# The rollout


def test_recomputed_logprobs_equal_sampling_logprobs_under_left_padding(eos_policy):
    policy, tok = load_causal_lm(str(eos_policy))
    prompts = ["hi", "a much longer prompt that forces left padding of the others", "mid one"]
    for temperature in (1.0, 0.7):
        gen = sample(
            policy, tok, prompts, max_new_tokens=10, temperature=temperature, generator=torch.Generator().manual_seed(1)
        )
        assert len(set(gen.query_mask.sum(1).tolist())) == 3  # three prompt lengths
        value_model = load_scalar_model(str(eos_policy))[0]
        roles = scoring_roles(policy, value_model, tok, temperature=temperature, missing_eos_penalty=None)
        rollout = roles.score(gen, prompts)
        # The least-squares EOS row gives logits of large magnitude at some positions; there the
        # KV-cached and the full float32 forward differ by up to ~1e-4 in log-prob.
        assert torch.allclose(rollout.logprobs, gen.logprobs, atol=1e-4, rtol=0)
        # The same forward for policy and reference: bitwise equal when the weights are.
        assert torch.equal(rollout.logprobs, rollout.ref_logprobs)


def test_score_lands_on_the_last_real_token_under_padding(eos_policy, tiny_rm):
    policy, tok = load_causal_lm(str(eos_policy))
    rm, _ = load_scalar_model(str(tiny_rm))
    value_model, _ = load_scalar_model(str(eos_policy))
    prompts = ["hi", "a much longer prompt that forces left padding of the others", "mid", "x y"]
    gen = sample(policy, tok, prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(3))
    lengths = gen.response_mask.sum(1)
    assert len(set(lengths.tolist())) > 1 and gen.finished.any()  # ragged responses
    rollout = scoring_roles(policy, value_model, tok, rm).score(gen, prompts)
    for i in range(len(prompts)):
        # Each episode alone, no padding at all: prompt ⊕ response as sampled.
        q = gen.query_ids[i][gen.query_mask[i].bool()]
        r = gen.response_ids[i][gen.response_mask[i].bool()]
        ids = torch.cat([q, r])[None]
        alone = reward_scores(rm, ids, torch.ones_like(ids))
        expected = alone + (0.0 if gen.finished[i] else -1.0)
        assert torch.allclose(rollout.scores[i], expected[0], atol=1e-5), i
    from tether.ppo.kl import compute_rewards

    rewards, non_score, _ = compute_rewards(
        rollout.scores, rollout.logprobs, rollout.ref_logprobs, rollout.response_mask, 0.1
    )
    score_part = rewards - non_score
    last = last_token_index(rollout.response_mask)
    assert torch.equal(last + 1, lengths)
    assert torch.allclose(score_part[torch.arange(len(prompts)), last], rollout.scores)
    score_part[torch.arange(len(prompts)), last] = 0
    assert not score_part.any()


def test_rollout_select_trims_padding_and_cat_repads():
    def part(p: int, r: int, qlen: list[int], rlen: list[int]) -> Rollout:
        b = len(qlen)
        qm = torch.tensor([[0] * (p - n) + [1] * n for n in qlen])
        rm = torch.tensor([[1] * n + [0] * (r - n) for n in rlen])
        f = torch.rand(b, r) * rm
        return Rollout(qm * 7, qm, rm * 5, rm, f, f, f, f, f, torch.rand(b), rm[:, -1] == 0)

    a, b = part(4, 3, [4, 2], [3, 1]), part(2, 5, [1], [5])
    both = Rollout.cat([a, b], pad_token_id=0)
    assert both.query_ids.shape == (3, 4) and both.response_ids.shape == (3, 5)
    assert torch.equal(both.query_mask[2], torch.tensor([0, 0, 0, 1]))
    assert torch.equal(both.response_mask[0], torch.tensor([1, 1, 1, 0, 0]))
    sub = both.select([1, 0])
    assert sub.query_ids.shape == (2, 4) and sub.response_ids.shape == (2, 3)
    assert torch.equal(sub.logprobs, both.logprobs[[1, 0], :3])
    small = both.select([1])  # prompt 2 tokens, response 1 token
    assert small.query_ids.shape == (1, 2) and small.response_ids.shape == (1, 1)


def test_take_cyclic_walks_seeded_permutations_and_resumes():
    first, pos = take_cyclic(5, 3, (0, 0), seed=1)
    second, pos = take_cyclic(5, 4, pos, seed=1)
    assert sorted(first + second[:2]) == list(range(5))  # epoch 0 is a permutation
    assert pos == (1, 2)
    whole, _ = take_cyclic(5, 7, (0, 0), seed=1)
    assert whole == first + second


def test_ema_tracks_weights_and_applies_temporarily():
    model = torch.nn.Linear(2, 1)
    frozen = torch.nn.Linear(2, 1).requires_grad_(False)
    model.add_module("frozen", frozen)
    ema = EMA(model, decay=0.75)
    assert set(ema.shadow) == {"weight", "bias"}  # trainable parameters only
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], start + 1.0)  # 0.75·w0 + 0.25·(w0 + 4)
    with ema.applied(model):
        assert torch.equal(model.weight, ema.shadow["weight"])
    assert torch.equal(model.weight, start + 4.0)
    restored = EMA(model, decay=0.75)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.shadow["weight"], ema.shadow["weight"])


# --------------------------------------------------------------------------------------------
# The trainer


@pytest.mark.parametrize("lora", [False, True])
def test_first_rollout_has_exactly_zero_kl(tmp_path, ppo_data, eos_policy, lora):
    """Untrained policy vs reference (a copy, or under LoRA the adapters disabled): KL == 0."""
    cfg = ppo_cfg(
        tmp_path / "run",
        ppo_data,
        eos_policy,
        total_episodes=8,
        sample_every=0,
        ptx_examples_per_episode=0,
        **{"policy.lora.enabled": lora, "policy.lora.r": 4},
    )
    result = train_ppo(cfg, length_reward, **QUIET)
    first = result.metrics[0]
    assert first["kl"] == 0.0 and first["non_score_reward"] == 0.0
    assert first["kl_estimator"] == "k1"
    assert first["logprob_gap"] < 1e-5
    assert first["reward_total"] == pytest.approx(first["score"])
    assert (result.policy_dir / "model.safetensors").exists()  # LoRA merged on export
    assert (result.value_dir / "model.safetensors").exists()


def test_ptx_coef_zero_equals_plain_ppo_and_skips_the_pretraining_pass(tmp_path, ppo_data, eos_policy):
    """γ = 0 gives the very weights of PPO without pretraining data, and pays for no ptx forward."""
    common = dict(total_episodes=8, sample_every=0)  # one iteration, two optimiser steps
    plain = ppo_cfg(tmp_path / "plain", ppo_data, eos_policy, ptx_examples_per_episode=0, **common)
    zero = ppo_cfg(tmp_path / "zero", ppo_data, eos_policy, ptx_coef=0.0, **common)
    ptx = ppo_cfg(tmp_path / "ptx", ppo_data, eos_policy, ptx_coef=1.0, **common)
    results = [train_ppo(c, length_reward, **QUIET) for c in (plain, zero, ptx)]
    assert results[0].metrics[-1]["ptx_loss"] is None
    assert results[1].metrics[-1]["ptx_loss"] is None  # γ = 0: no pretraining forward or backward
    assert results[2].metrics[-1]["ptx_loss"] > 0
    assert results[2].metrics[-1]["ptx_grad_ratio"] > 0 and results[1].metrics[-1]["ptx_grad_ratio"] is None
    assert_same_weights(results[0].policy_dir, results[1].policy_dir)
    assert_same_weights(results[0].value_dir, results[1].value_dir)
    a, c = weights(results[0].policy_dir), weights(results[2].policy_dir)
    assert any(not torch.equal(a[n], c[n]) for n in a)  # γ > 0 does change the policy


def test_ptx_step_with_zero_coefficient_adds_no_gradient(ppo_data, eos_policy):
    """The ptx pass scaled by γ = 0 leaves ppo_step's gradients exactly as without it."""
    roles, rollout, targets, ptx = update_fixture(ppo_data, eos_policy, ptx_coef=0.0)
    policy = roles.policy
    grads = []
    for examples in ([], ptx):
        policy.zero_grad(set_to_none=True)
        ppo_step(roles, rollout, targets, examples)
        grads.append([p.grad.clone() for p in policy.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    # ptx_grad_ratio = ‖γ ∇L_ptx‖ / ‖∇L_PPO‖: linear in γ.
    ratios = []
    for coef in (1.0, 2.0):
        policy.zero_grad(set_to_none=True)
        with_coef = dataclasses.replace(roles, cfg=dataclasses.replace(roles.cfg, ptx_coef=coef))
        stats = ppo_step(with_coef, rollout, targets, ptx)
        ratios.append(stats["ptx_grad_ratio"])
    assert ratios[0] > 0 and ratios[1] == pytest.approx(2 * ratios[0], rel=1e-4)


def test_pretraining_examples_per_episode_do_not_multiply_with_ppo_epochs(tmp_path, ppo_data, eos_policy):
    """ptx_examples_per_episode counts distinct pretraining examples per episode, whatever ppo_epochs."""
    taken = {}
    for epochs in (1, 2):
        cfg = ppo_cfg(
            tmp_path / f"e{epochs}", ppo_data, eos_policy, total_episodes=8, sample_every=0, ppo_epochs=epochs
        )
        train_ppo(cfg, length_reward, **QUIET)
        counters = json.loads((tmp_path / f"e{epochs}" / "state" / "counters.json").read_text())
        epoch, index = counters["ptx_position"]
        taken[epochs] = epoch * 24 + index  # 24 pretraining texts in the fixture
    # 8 episodes × 0.5 examples per episode (the tiny preset) = 4, with one epoch or two.
    assert taken == {1: 4, 2: 4}


def test_micro_batch_size_does_not_change_the_gradient(ppo_data, eos_policy):
    """Losses are token means over the minibatch, however it is split into micro-batches."""
    roles, rollout, targets, ptx = update_fixture(ppo_data, eos_policy)
    policy, value_model = roles.policy, roles.value_model
    grads = []
    for micro in (1, 4):
        cfg = dataclasses.replace(roles.cfg, micro_batch_size=micro)
        ppo_step(dataclasses.replace(roles, cfg=cfg), rollout, targets, ptx)
        grads.append({n: p.grad.clone() for n, p in [*policy.named_parameters(), *value_model.named_parameters()]})
        policy.zero_grad()
        value_model.zero_grad()
    for name, g in grads[0].items():
        # Summation order differs between 1 and 4 sequences per pass: compare relative to the
        # gradient's norm (float32 round-off), not element by element near zero.
        assert (g - grads[1][name]).norm() <= 1e-5 * g.norm() + 1e-10, name


def test_toy_reward_rises_while_kl_stays_bounded(tmp_path, ppo_data, eos_policy):
    cfg = ppo_cfg(
        tmp_path / "run",
        ppo_data,
        eos_policy,
        total_episodes=80,
        batch_size=16,
        mini_batch_size=8,
        micro_batch_size=8,
        generation_batch_size=16,
        ptx_examples_per_episode=0,
        sample_every=2,
        save_every=100,
    )
    metrics = train_ppo(cfg, length_reward, **QUIET).metrics
    scores = [m["score"] for m in metrics]
    assert min(scores[1:]) > scores[0] + 0.75, scores
    assert metrics[-1]["response_length"] < metrics[0]["response_length"]
    kls = [m["kl"] for m in metrics]
    # Per-episode KL (nats) stays small: β·KL keeps the policy near π_SFT.
    assert all(0.0 <= k < 5.0 for k in kls), kls
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 2, 4, 5}  # every 2 iterations, and the last


def test_samples_per_prompt_with_leave_one_out_baseline(tmp_path, ppo_data, eos_policy):
    """Each prompt's responses are consecutive; the prompt's level leaves the reward, not the log."""
    seen: list[list[str]] = []
    level = {}  # a large per-prompt offset, the part of a score an RM never learned

    def reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
        seen.append(list(prompts))
        return length_reward(prompts, responses) + torch.tensor(
            [level.setdefault(p, 50.0 * len(level)) for p in prompts]
        )

    cfg = ppo_cfg(
        tmp_path / "run",
        ppo_data,
        eos_policy,
        total_episodes=16,
        samples_per_prompt=4,
        score_baseline="leave_one_out",
        sample_every=0,
        ptx_examples_per_episode=0,
    )
    metrics = train_ppo(cfg, reward, **QUIET).metrics
    assert len(metrics) == 2 and len(seen) == 2 and all(len(b) == 8 for b in seen)  # 2 iterations of 8
    for b in seen:
        assert all(len(set(b[i : i + 4])) == 1 for i in range(0, 8, 4)) and b[0] != b[4]
    for m in metrics:
        assert m["score"] > 10  # the logged score is the raw one, offsets included
        # The reward the policy saw: leave-one-out scores average exactly 0 over the batch.
        assert m["reward_total"] - m["non_score_reward"] == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        ppo_cfg(tmp_path / "bad", ppo_data, eos_policy, score_baseline="leave_one_out")
    with pytest.raises(ValueError, match="multiple of samples_per_prompt"):
        ppo_cfg(tmp_path / "bad", ppo_data, eos_policy, samples_per_prompt=3)


def test_tokenizer_mismatch_is_a_clear_error(tmp_path, ppo_data, eos_policy, tiny_rm):
    """A value model must read the policy's ids (a reward model of another tokenizer is scored
    through its own: tests/reward/test_foreign_rm.py)."""
    from transformers import AutoTokenizer

    other = tmp_path / "rm_other_tokenizer"
    other.mkdir()
    for f in tiny_rm.iterdir():
        (other / f.name).symlink_to(f)
    for f in other.glob("tok*"):
        f.unlink()
    tok = AutoTokenizer.from_pretrained(tiny_rm)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    cfg = ppo_cfg(tmp_path / "run", ppo_data, eos_policy, reward_model=str(tiny_rm), value_model=str(other))
    with pytest.raises(ValueError, match="value model's tokenizer differs from the policy's"):
        train_ppo(cfg, **QUIET)


def test_gpt2_trains_with_trunk_sharing_on(tmp_path, ppo_data, tiny_dir):
    """GPT-2 keeps its blocks in ``.h`` (no ``.layers``): it shares no trunk and runs whole
    under the default share_trunk = true, policy and value model both trained."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    policy = save_model(GPT2LMHeadModel(config), tok, tmp_path / "gpt2")
    lines: list[str] = []
    cfg = ppo_cfg(tmp_path / "run", ppo_data, policy, total_episodes=8, sample_every=0)
    assert cfg.share_trunk
    result = train_ppo(cfg, length_reward, log=lines.append)
    assert "ppo: the models share no frozen block; each runs whole" in lines
    assert result.metrics[0]["ptx_loss"] > 0  # the pretraining pass runs on GPT-2 too
    before, after = weights(policy), weights(result.policy_dir)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_non_finite_score_stops_and_keeps_the_last_good_state(tmp_path, ppo_data, eos_policy):
    calls = []

    def reward(prompts, responses):
        calls.append(1)
        # Iteration 3's rollout (one generation chunk per iteration) goes bad.
        bad = len(calls) == 3
        return torch.full((len(responses),), float("nan") if bad else 0.5)

    cfg = ppo_cfg(tmp_path / "run", ppo_data, eos_policy, save_every=1, sample_every=0, ptx_examples_per_episode=0)
    with pytest.raises(FloatingPointError, match="non-finite scores at iteration 3"):
        train_ppo(cfg, reward, **QUIET)
    counters = json.loads((tmp_path / "run" / "state" / "counters.json").read_text())
    assert counters["iteration"] == 2


def _drop_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time") and "per_s" not in k} for r in records]


# Everything with state a resume must restore: EMA, adaptive β, PPO-ptx data position, two PPO
# epochs (minibatch RNG), mid-run prompt position, the sampling RNG, a reward model directory; and
# the policy kept after every iteration (iter-N/: the compute curve's checkpoints).
RESUME_ARGS = (
    "--preset tiny --total-episodes 24 --save-every 1 --ema-decay 0.9 --adaptive-kl true "
    "--kl-target 0.05 --kl-horizon 20 --ppo-epochs 2 --sample-every 1 --keep-policy-every 1"
).split()


def resume_cfg(out: Path, data: dict[str, Path], policy: Path, rm: Path) -> PPOConfig:
    return ppo_cfg(
        out,
        data,
        policy,
        reward_model=str(rm),
        total_episodes=24,
        save_every=1,
        ema_decay=0.9,
        adaptive_kl=True,
        kl_target=0.05,
        kl_horizon=20,
        ppo_epochs=2,
        sample_every=1,
        keep_policy_every=1,
    )


def assert_same_kept_policies(uninterrupted: Path, resumed: Path) -> None:
    """The policies kept along the way (iter-N/): each once, nothing half-written, the same weights."""
    kept = sorted(p.name for p in resumed.iterdir() if p.name.startswith("iter-"))
    assert kept == ["iter-1", "iter-2", "iter-3"]
    assert not list(resumed.glob("*.tmp-*")), "a killed save's temporary folder was left behind"
    for name in kept:
        assert_same_weights(uninterrupted / name, resumed / name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, ppo_data, eos_policy, tiny_rm):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    return train_ppo(resume_cfg(out, ppo_data, eos_policy, tiny_rm), **QUIET)


def test_resume_equals_uninterrupted_and_adaptive_beta(tmp_path, ppo_data, eos_policy, tiny_rm, uninterrupted):
    """Stop after iteration 2 of 3, rerun: same weights, EMA, β, metrics, samples and kept policies."""
    broken = resume_cfg(tmp_path / "run", ppo_data, eos_policy, tiny_rm)
    with pytest.raises(StopAfter, match="after 2 iterations"):
        train_ppo(broken, stop_after_iterations=2, **QUIET)
    # What a kill during iteration 3 can leave: iter-3/ written before the state was (a stale copy
    # here: iter-2's weights), and the temporary folder of a save of it that was killed.
    run = tmp_path / "run"
    shutil.copytree(run / "iter-2", run / "iter-3")
    shutil.copytree(run / "iter-2", run / "iter-3.tmp-killed")
    resumed = train_ppo(broken, **QUIET)
    assert_same_weights(uninterrupted.policy_dir, resumed.policy_dir)
    assert_same_weights(uninterrupted.value_dir, resumed.value_dir)
    assert_same_kept_policies(uninterrupted.policy_dir.parent, run)
    assert _drop_timing(uninterrupted.metrics) == _drop_timing(resumed.metrics)
    samples = [(d / "samples.jsonl").read_text() for d in (uninterrupted.policy_dir.parent, tmp_path / "run")]
    assert samples[0] == samples[1]
    # Adaptive β moves towards the target: down after a KL below it, up after one above.
    m = uninterrupted.metrics
    assert m[0]["kl"] == 0.0 and m[1]["kl_coef"] < m[0]["kl_coef"]
    for before, after in zip(m, m[1:], strict=False):
        assert (after["kl_coef"] > before["kl_coef"]) == (before["kl"] > 0.05)


@pytest.mark.timeout(300)
def test_kill_9_then_rerun_resumes(tmp_path, ppo_data, eos_policy, tiny_rm, uninterrupted):
    """The CLI with a reward model directory: kill -9 mid-run, rerun, same result."""
    run = tmp_path / "killed"
    paths = {
        "--policy.name-or-path": eos_policy,
        "--reward-model": tiny_rm,
        "--prompts-file": ppo_data["prompts"],
        "--pretrain-file": ppo_data["pretrain"],
        "--out-dir": run,
    }
    tether = [sys.executable, "-m", "tether.cli", "ppo", *RESUME_ARGS]
    tether += [x for flag, path in paths.items() for x in (flag, str(path))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(tether, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "state" / "counters.json").exists():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "policy").exists(), "the run finished before it could be killed"
    done = subprocess.run(tether, check=True, capture_output=True, text=True, env=env)
    assert "resuming" in done.stdout
    assert_same_weights(uninterrupted.policy_dir, run / "policy")
    assert_same_weights(uninterrupted.value_dir, run / "value")
    assert_same_kept_policies(uninterrupted.policy_dir.parent, run)


def test_non_finite_first_iteration_says_there_is_no_good_state(tmp_path, ppo_data, eos_policy):
    def reward(prompts, responses):
        return torch.full((len(responses),), float("inf"))

    cfg = ppo_cfg(tmp_path / "run", ppo_data, eos_policy, sample_every=0, ptx_examples_per_episode=0)
    with pytest.raises(FloatingPointError, match=r"iteration 1; no good state yet \(.*state was never written\)"):
        train_ppo(cfg, reward, **QUIET)
    assert not (tmp_path / "run" / "state").exists()


def test_an_update_that_makes_weights_non_finite_is_never_saved(tmp_path, ppo_data, eos_policy, monkeypatch):
    """Finite losses and gradient norms, but a step that leaves an inf in the weights (what an
    overflow in low precision does): the run stops before the state at iteration 1 is written."""
    import tether.ppo.train as ppo_train

    real = ppo_train.build_optimizer

    def build(params, cfg, *args, **kwargs):
        opt = real(params, cfg, *args, **kwargs)

        def overflow(optimizer, *_):
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("inf"))

        opt.register_step_post_hook(overflow)
        return opt

    monkeypatch.setattr(ppo_train, "build_optimizer", build)
    cfg = ppo_cfg(tmp_path / "run", ppo_data, eos_policy, sample_every=0, ptx_examples_per_episode=0, save_every=1)
    with pytest.raises(FloatingPointError, match=r"iteration 1 made 2 weight tensors non-finite .* no good state"):
        train_ppo(cfg, lambda p, r: torch.rand(len(r)), **QUIET)
    assert not (tmp_path / "run" / "state").exists()


@pytest.mark.parametrize(
    ("rollout_dtype", "native_bf16", "kept"),
    [
        ("auto", True, True),  # native bf16: the policy itself under its bf16 autocast, trunk kept
        ("auto", False, False),  # emulated bf16: 'auto' samples without autocast, so never kept
        ("bfloat16", True, False),  # a copy asked for: its trunk output is not the policy's
        ("float32", True, False),  # float32 sampling, bf16-autocast scoring: other numbers
    ],
)
def test_the_trunk_is_kept_from_sampling_only_when_sampling_computes_it_as_scoring_does(
    tmp_path, ppo_data, eos_policy, tiny_rm, monkeypatch, rollout_dtype, native_bf16, kept
):
    """A bf16-autocast policy: sampling hands its trunk output to scoring only when it ran the
    trunk's own modules under the same autocast (never a copy's, never another precision's)."""
    import tether.ppo.roles as ppo_roles
    from tether.models.generation import Sampler

    monkeypatch.setattr(ppo_roles, "fast_bf16", lambda device: native_bf16)
    hidden, copies, logs = [], [], []
    real_score, real_init = ppo_roles.PPORoles.score, Sampler.__init__
    monkeypatch.setattr(
        ppo_roles.PPORoles,
        "score",
        lambda self, gen, *a, **k: hidden.append(gen.hidden is not None) or real_score(self, gen, *a, **k),
    )
    monkeypatch.setattr(
        Sampler, "__init__", lambda self, *a, **k: real_init(self, *a, **k) or copies.append(self.is_copy)
    )
    overrides = {"policy.autocast": "bfloat16", "policy.trainable_layers": 1, "reward_model": str(tiny_rm)}
    cfg = ppo_cfg(
        tmp_path, ppo_data, eos_policy, rollout_dtype=rollout_dtype, total_episodes=8, sample_every=0, **overrides
    )
    train_ppo(cfg, log=logs.append)
    assert any("models share 1 of 2 blocks" in line for line in logs)
    assert hidden and set(hidden) == {kept}
    assert any("sampling keeps the shared blocks' output" in line for line in logs) == kept
    if rollout_dtype == "auto" and native_bf16:
        assert copies == [False]  # no bf16 copy of the policy: its frozen weights' casts are cached


def test_the_removed_fuse_first_forward_field_is_a_readable_error(tmp_path, ppo_data, eos_policy):
    """A config that still sets ``fuse_first_forward`` is told it was removed and what to do."""
    with pytest.raises(ValueError, match=r"config field 'fuse_first_forward' was removed: .*Delete the line"):
        ppo_cfg(tmp_path, ppo_data, eos_policy, fuse_first_forward=True)


def test_bf16_rollouts_sample_a_copy_synced_after_every_optimiser_step(tmp_path, ppo_data, eos_policy, monkeypatch):
    """rollout_dtype: the copy is refreshed after each step; old log-probs stay the policy's own."""
    from tether.models.generation import Sampler

    syncs = []
    real_sync = Sampler.sync
    monkeypatch.setattr(Sampler, "sync", lambda self: syncs.append(self.is_copy) or real_sync(self))
    common = dict(total_episodes=16, sample_every=0, ptx_examples_per_episode=0)  # 2 iterations × 2 steps
    fp32 = train_ppo(
        ppo_cfg(tmp_path / "fp32", ppo_data, eos_policy, rollout_dtype="float32", **common), length_reward, **QUIET
    )
    assert syncs == [False] * 4  # the fp32 policy is sampled directly: nothing to copy
    plain = train_ppo(ppo_cfg(tmp_path / "plain", ppo_data, eos_policy, **common), length_reward, **QUIET)
    assert_same_weights(fp32.policy_dir, plain.policy_dir)  # float32 = the old behaviour on an fp32 policy
    syncs.clear()
    bf16 = train_ppo(
        ppo_cfg(tmp_path / "bf16", ppo_data, eos_policy, rollout_dtype="bfloat16", **common), length_reward, **QUIET
    )
    assert syncs == [True] * 4
    # The sampled log-probs are bf16's, the PPO ones the fp32 policy's: a small, visible gap.
    assert all(0 < m["logprob_gap"] < 0.5 for m in bf16.metrics)
    assert all(m["logprob_gap"] < 1e-4 for m in fp32.metrics)


def test_the_critic_starts_without_a_constant_offset(tmp_path, ppo_data, eos_policy):
    """Scores 20 above anything the fresh value head says: before the first update the critic's
    output is shifted so that at iteration 1 its token mean equals the returns' (said in the log)."""
    lines: list[str] = []
    cfg = ppo_cfg(tmp_path / "run", ppo_data, eos_policy, total_episodes=8, sample_every=0, ptx_examples_per_episode=0)
    result = train_ppo(cfg, lambda p, r: length_reward(p, r) + 20.0, log=lines.append)
    first = result.metrics[0]
    assert abs(first["value_mean"] - first["return_mean"]) < 1e-4, first
    said = [line for line in lines if "the critic's offset at iteration 1: |value mean - return mean|" in line]
    assert len(said) == 1 and float(said[0].split("|value mean - return mean| ")[1].split(";")[0]) > 2.0, said
