"""`tether eval` on tiny random policies: invariances of the win rate, KL and perplexity, the report."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tether.cluster import Local, split
from tether.config import EvalConfig, ModelConfig
from tether.data.formats import PretrainText, Prompt
from tether.data.task import build_default_task
from tether.eval.evaluate import compute_curve, evaluate_policies, load_eval, pretrain_perplexity, save_eval
from tether.eval.report import write_report
from tether.labelers.panel import Panel
from tether.models.generation import decode_responses, row_generators, sample
from tether.models.heads import load_scalar_model, save_scalar_model
from tether.models.loading import autocast, load_causal_lm, resolve_device
from tether.ppo.rollout import episode_scores, response_logprobs

QUIET = dict(log=lambda _: None)


@pytest.fixture(scope="module")
def prompts() -> list[Prompt]:
    return [Prompt(id=f"t{i}", text=p.text, user_id="u") for i, p in enumerate(build_default_task().prompts[:5])]


def nudge(tiny_dir: Path, out: Path, scale: float) -> Path:
    """The tiny model with every weight nudged by ``scale`` × N(0, 1): another policy, the same tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    for f in tiny_dir.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    gen = torch.Generator().manual_seed(0)
    original = load_file(tiny_dir / "model.safetensors")
    weights = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in original.items()}
    save_file(weights, out / "model.safetensors")
    return out


@pytest.fixture(scope="module")
def perturbed(tiny_dir, tmp_path_factory) -> Path:
    return nudge(tiny_dir, tmp_path_factory.mktemp("perturbed"), 0.05)


def test_a_policy_against_itself_ties_with_zero_kl(tiny_dir, prompts):
    """The same weights and seed answer identically: every judgement a tie, KL exactly 0."""
    report = evaluate_policies(
        {"sft": str(tiny_dir), "copy": str(tiny_dir)},
        prompts,
        # batch_size 4: batches cut across prompts, and alignment must not depend on it
        EvalConfig(samples_per_prompt=3, max_new_tokens=12, batch_size=4),
        ref_policy=str(tiny_dir),
        **QUIET,
    )
    sft, copy = report.by_name("sft"), report.by_name("copy")
    assert report.prompts == [p.text for p in prompts] and report.samples_per_prompt == 3
    assert len(copy.responses) == 15 and copy.responses == sft.responses
    assert (copy.win_rate, *copy.win_ci) == (0.5, 0.5, 0.5)
    # by symmetry, to float round-off (a prompt's mean of 9 pair preferences)
    assert (copy.expected_win_rate, *copy.expected_win_ci) == pytest.approx((0.5, 0.5, 0.5), abs=1e-12)
    assert copy.preferences == [0.5] * 15
    # Expected: response j against every baseline response k of its prompt; by symmetry each
    # prompt's mean is exactly one half (pref(a, b) + pref(b, a) = 1).
    assert all(sum(copy.expected_preferences[3 * i : 3 * i + 3]) / 3 == pytest.approx(0.5) for i in range(5))
    assert copy.kl_to_ref == 0.0 and sft.kl_to_ref == 0.0
    # Three samples of one prompt are three draws, not one answer copied three times.
    assert any(len(set(sft.responses[3 * i : 3 * i + 3])) > 1 for i in range(5))


@pytest.mark.parametrize("autocast_dtype", [None, "bfloat16"])
def test_the_kl_is_the_full_forwards_in_either_precision(tiny_dir, prompts, tmp_path, autocast_dtype):
    """The KL is read from sampling's own numbers (the policy's log-probs and the shared blocks'
    output, in the decode steps' shapes) and the reference's top: the mean KL is the oracle's (full
    forwards in the same precision) to round-off: 1e-5 in float32; under bf16 autocast, where the
    decode steps round otherwise, 1.5 % on this tiny model (whose shared block is half of it; 0.1 %
    with 24 new tokens on 16 prompts): within 3 %."""
    ppo_dir = nudge_top(tiny_dir, tmp_path / "ppo", 0.05)
    cfg = EvalConfig(max_new_tokens=16, batch_size=4)
    policies = {"sft": str(tiny_dir), "ppo": str(ppo_dir)}
    common = dict(ref_policy=str(tiny_dir), autocast_dtype=autocast_dtype, **QUIET)
    kl = evaluate_policies(policies, prompts, cfg, **common).by_name("ppo").kl_to_ref
    policy, tok = load_causal_lm(str(ppo_dir))
    ref, _ = load_causal_lm(str(tiny_dir))
    texts, kls = [p.text for p in prompts], []
    with autocast(ModelConfig(autocast=autocast_dtype), resolve_device("auto")):
        for start in range(0, len(texts), 4):
            batch = texts[start : start + 4]
            generators = row_generators(0, [(start + i, 0) for i in range(len(batch))], "cpu")
            gen = sample(policy, tok, batch, max_new_tokens=16, temperature=1.0, generator=generators)
            inputs = (gen.query_ids, gen.query_mask, gen.response_ids, gen.response_mask)
            own, theirs = response_logprobs(policy, *inputs, 1.0)[0], response_logprobs(ref, *inputs, 1.0)[0]
            kls += (own.sum(-1) - theirs.sum(-1)).tolist()
    oracle = float(np.mean(kls))
    assert oracle > 0.05
    assert kl == pytest.approx(oracle, rel=3e-2 if autocast_dtype else 1e-5, abs=1e-6)


def test_samples_per_prompt_keeps_prompt_and_response_aligned(tiny_dir, perturbed, prompts):
    """Response j of prompt i is judged against the baseline's response j of prompt i."""
    one = evaluate_policies(
        {"sft": str(tiny_dir), "other": str(perturbed)}, prompts, EvalConfig(max_new_tokens=12), **QUIET
    )
    three = evaluate_policies(
        {"sft": str(tiny_dir), "other": str(perturbed)},
        prompts,
        EvalConfig(samples_per_prompt=3, max_new_tokens=12),
        **QUIET,
    )
    other = three.by_name("other")
    assert len(other.preferences) == 15 and all(0 <= p <= 1 for p in other.preferences)
    per_prompt = [sum(other.preferences[3 * i : 3 * i + 3]) / 3 for i in range(5)]
    assert other.win_rate == pytest.approx(sum(per_prompt) / 5)
    assert other.win_ci[0] <= other.win_rate <= other.win_ci[1]
    assert len(one.by_name("other").responses) == 5 and len(one.by_name("other").preferences) == 5
    # The expected win rate: every response against every baseline response of its prompt, each
    # held-out labeler's exact preference probability, by hand.
    panel, base = Panel(), three.by_name("sft")
    by_hand = [
        sum(
            panel.expected_prefer(lab, prompts[i].text, other.responses[3 * i + j], base.responses[3 * i + k])
            for j in range(3)
            for k in range(3)
            for lab in panel.heldout_labelers
        )
        / (9 * len(panel.heldout_labelers))
        for i in range(5)
    ]
    assert other.expected_win_rate == pytest.approx(sum(by_hand) / 5)
    assert other.expected_win_ci[0] <= other.expected_win_rate <= other.expected_win_ci[1]
    with pytest.raises(ValueError, match="samples_per_prompt"):
        evaluate_policies({"sft": str(tiny_dir)}, prompts, EvalConfig(samples_per_prompt=0), **QUIET)


def test_pretrain_perplexity_is_exp_of_the_token_mean_nll(tiny_dir):
    model, tok = load_causal_lm(str(tiny_dir))
    texts = [PretrainText("The cat sat on the mat."), PretrainText("Rivers run to the sea, and rain falls again.")]
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            # The text's own tokens: neither the turn end nor the document end is scored.
            ids = tok(t.text, add_special_tokens=False).input_ids
            logits = model(torch.tensor([ids])).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
            n += len(ids) - 1
    assert pretrain_perplexity(model, tok, texts) == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_report_shows_verdicts_and_round_trips(tiny_dir, perturbed, prompts, tmp_path):
    report = evaluate_policies(
        {"sft": str(tiny_dir), "ppo_ptx": str(perturbed)},
        prompts,
        EvalConfig(samples_per_prompt=2, max_new_tokens=8),
        pretrain_heldout=[PretrainText("The cat sat on the mat.")],
        **QUIET,
    )
    path = write_report(report, tmp_path / "report")
    page = path.read_text()
    assert "held-out labelers</th>" in page and page.count("<td class=prompt>") == 5
    assert "2 sampled" in page
    for png in ("win_rates.png", "alignment_tax.png"):  # training curves need a run directory
        assert (tmp_path / "report" / png).stat().st_size > 1000
    again = load_eval(save_eval(report, tmp_path / "eval.json"))
    assert again.samples_per_prompt == 2
    assert again.by_name("ppo_ptx").preferences == report.by_name("ppo_ptx").preferences
    assert again.by_name("ppo_ptx").expected_win_ci == report.by_name("ppo_ptx").expected_win_ci
    assert "expected win rate [95 % CI]" in page and again.config["samples_per_prompt"] == 2


def test_best_of_n_keeps_the_reward_models_pick(tiny_dir, prompts, tmp_path, monkeypatch):
    """Best-of-4: each response is the RM's top-scored of 4 samples; KL is the analytic bound. The
    plain policy of the same model is candidate 0 of each response (the same stream): sampled once,
    by best-of-4's shards, with the responses and RM scores it gets when evaluated alone."""
    import tether.eval.evaluate as ev

    shards = []
    real = ev.sample_policy_shard
    monkeypatch.setattr(ev, "sample_policy_shard", lambda *a, **kw: shards.append(kw["n_best"]) or real(*a, **kw))
    torch.manual_seed(0)
    rm, tok = load_scalar_model(str(tiny_dir))  # the tiny LM with a random scalar head
    rm_dir = save_scalar_model(rm, tok, tmp_path / "rm")
    common = dict(reward_model=str(rm_dir), ref_policy=str(tiny_dir))
    cfg = EvalConfig(max_new_tokens=10, batch_size=8)
    report = evaluate_policies(
        {"sft": str(tiny_dir), "bo4": str(tiny_dir)}, prompts, cfg, best_of={"bo4": 4}, **common, **QUIET
    )
    bo4, sft = report.by_name("bo4"), report.by_name("sft")

    # An independent oracle: the same draws (candidate c of prompt i seeded by (seed, i, c)), one
    # prompt per forward where the evaluation batched two, scored.
    model, _ = load_causal_lm(str(tiny_dir))
    picks, candidate_scores, firsts = [], [], []
    for i in range(len(prompts)):
        texts = [prompts[i].text] * 4
        generators = row_generators(0, [(i, c) for c in range(4)], "cpu")
        gen = sample(model, tok, texts, max_new_tokens=10, temperature=1.0, generator=generators)
        responses = decode_responses(tok, gen)
        scores = episode_scores(gen, texts, responses, rm, None).view(-1, 4)
        picks.append(responses[int(scores[0].argmax())])
        candidate_scores.append(scores)
        firsts.append(responses[0])
    best = torch.cat(candidate_scores).max(-1).values
    assert bo4.responses == picks and bo4.best_of == 4 and sft.best_of == 1
    assert bo4.rm_score == pytest.approx(float(best.mean()), abs=1e-5)
    assert bo4.rm_score > float(torch.cat(candidate_scores).mean())
    assert bo4.kl_to_ref == pytest.approx(math.log(4) - 0.75) and bo4.pretrain_ppl is None
    assert "≤ 0.64" in write_report(report, tmp_path / "report").read_text()
    assert shards == [4]  # sft had no shard of its own
    assert sft.responses == firsts and sft.kl_to_ref == 0.0
    assert sft.rm_score == pytest.approx(float(torch.cat(candidate_scores)[:, 0].mean()), abs=1e-5)
    alone = evaluate_policies({"sft": str(tiny_dir)}, prompts, cfg, **common, **QUIET).by_name("sft")
    assert alone.responses == sft.responses and alone.rm_score == pytest.approx(sft.rm_score, abs=1e-5)
    assert (alone.likert, alone.flag_rates, alone.length) == (sft.likert, sft.flag_rates, sft.length)
    with pytest.raises(ValueError, match="needs a reward model"):
        evaluate_policies({"sft": str(tiny_dir)}, prompts, best_of={"sft": 2}, **QUIET)
    with pytest.raises(ValueError, match="not among the policies"):
        evaluate_policies({"sft": str(tiny_dir)}, prompts, best_of={"bo": 2}, **QUIET)


class ThreeShards(Local):
    """In-process stand-in for a 3-worker cluster: every list cut into 3 shards."""

    workers = 3

    def shards(self, n: int) -> list[tuple[int, int]]:
        return split(n, 3)


def test_evaluation_over_shards_equals_one_process(tiny_dir, perturbed, prompts):
    """Ray tasks evaluate prompt shards: seeded per response, never per shard, so 3 shards (cutting
    across prompts: 5 prompts x 2 samples) give the same responses, judgements and win rates."""
    texts = [PretrainText(text="The quick brown fox jumps over the lazy dog. " * 4)]
    cfg = EvalConfig(samples_per_prompt=2, max_new_tokens=8)
    args = ({"sft": str(tiny_dir), "other": str(perturbed)}, prompts, cfg)
    kwargs = dict(ref_policy=str(tiny_dir), pretrain_heldout=texts, **QUIET)
    one = evaluate_policies(*args, **kwargs)
    three = evaluate_policies(*args, executor=ThreeShards(), **kwargs)
    for a, b in zip(one.policies, three.policies, strict=True):
        assert a.responses == b.responses and a.preferences == b.preferences
        assert (a.win_rate, a.expected_win_rate, a.likert) == (b.win_rate, b.expected_win_rate, b.likert)
        assert a.flag_rates == b.flag_rates and (a.length, a.eos_rate) == (b.length, b.eos_rate)
        # forwards of other batch shapes: float round-off only
        assert b.kl_to_ref == pytest.approx(a.kl_to_ref, abs=1e-4) and b.pretrain_ppl == pytest.approx(a.pretrain_ppl)
    assert one.by_name("other").kl_to_ref > 0


def test_compute_curve_is_the_evaluations_own_figures(tiny_dir, perturbed, prompts, tmp_path):
    """The compute curve (run.curve_every): SFT at 0 episodes, the checkpoint ppo_ptx@8, the final
    policy at 16, each point the very figures of its policy in the evaluation; a checkpoint
    evaluated beside the final policy leaves the final policy's figures exactly as without it."""
    cfg = EvalConfig(samples_per_prompt=2, max_new_tokens=8)
    halfway = nudge(tiny_dir, tmp_path / "halfway", 0.02)
    common = dict(ref_policy=str(tiny_dir), **QUIET)
    # The checkpoint after the final policy in the dict: the curve is ordered by episodes.
    policies = {"sft": str(tiny_dir), "ppo_ptx": str(perturbed), "ppo_ptx@8": str(halfway)}
    report = evaluate_policies(policies, prompts, cfg, **common)
    alone = evaluate_policies({"sft": str(tiny_dir), "ppo_ptx": str(perturbed)}, prompts, cfg, **common)
    curve = compute_curve(report, final_episodes=16)
    assert [(p.episodes, p.policy) for p in curve] == [(0, "sft"), (8, "ppo_ptx@8"), (16, "ppo_ptx")]
    assert (curve[0].expected_win_rate, curve[0].win_rate, curve[0].kl_to_ref) == (0.5, 0.5, 0.0)
    final, without = report.by_name("ppo_ptx"), alone.by_name("ppo_ptx")
    for key in ("expected_win_rate", "expected_win_ci", "win_rate", "win_ci", "kl_to_ref", "length", "likert"):
        assert getattr(curve[-1], key) == getattr(final, key) == getattr(without, key), key
    assert curve[1].expected_win_rate == report.by_name("ppo_ptx@8").expected_win_rate != final.expected_win_rate
    for p in curve:
        assert p.expected_win_ci[0] <= p.expected_win_rate <= p.expected_win_ci[1], p.policy
        assert p.win_ci[0] <= p.win_rate <= p.win_ci[1], p.policy
    assert compute_curve(alone, final_episodes=16) == []  # no checkpoint, no curve

    out = tmp_path / "report"
    page = write_report(report, out, final_episodes=16).read_text()
    assert "Win rate against compute" in page and (out / "win_vs_episodes.png").stat().st_size > 1000
    saved = json.loads((out / "curve.json").read_text())
    assert [p["episodes"] for p in saved["points"]] == [0, 8, 16] and saved["samples_per_prompt"] == 2
    assert (
        saved["points"][-1]["expected_win_rate"]
        == json.loads((out / "eval.json").read_text())["policies"][1]["expected_win_rate"]
    )
    write_report(alone, tmp_path / "plain", final_episodes=16)
    assert (
        not (tmp_path / "plain" / "curve.json").exists() and not (tmp_path / "plain" / "win_vs_episodes.png").exists()
    )


class ReversedTasks:
    """Like a 3-worker cluster (not :class:`Local`: no in-process progress hook), whose calls finish
    in reverse order."""

    workers = 3

    def shards(self, n: int) -> list[tuple[int, int]]:
        return split(n, 3)

    def map(self, calls, what="", on_done=None):
        results = {}
        for i in reversed(range(len(calls))):
            results[i] = calls[i]()
            if on_done is not None:
                on_done(i)
        return [results[i] for i in range(len(calls))]


@pytest.mark.parametrize("executor", [Local(), ThreeShards(), ReversedTasks()], ids=["one", "shards", "cluster"])
def test_the_log_reports_each_policys_progress_to_completion(tiny_dir, perturbed, prompts, executor):
    """A line per forward batch in this process, per finished shard on a cluster: each policy's
    responses done out of all of them, counting up to a final "done"; the numbers are unchanged."""
    texts = [PretrainText(text="The quick brown fox jumps over the lazy dog. " * 4)]
    cfg = EvalConfig(samples_per_prompt=2, max_new_tokens=8, batch_size=4)
    policies = {"sft": str(tiny_dir), "other": str(perturbed)}
    lines: list[str] = []
    report = evaluate_policies(policies, prompts, cfg, pretrain_heldout=texts, executor=executor, log=lines.append)
    for name in policies:
        counts = [int(m.group(1)) for line in lines if (m := re.match(rf"eval: {name}: (\d+)/10 responses", line))]
        assert counts == sorted(counts) and counts[-1] == 10, (name, lines)
        assert sum(line.startswith(f"eval: {name}: 10/10 responses, done (") for line in lines) == 1
        assert sum(f"eval: {name}: held-out pretraining perplexity done" in line for line in lines) == 1
    # One process: batches of 4 (4, 8, then the last batch's line is the "done" one); shards of
    # 3, 3 and 4 responses, one batch each: a line per shard, in this process as on a cluster,
    # where the last shard finishes first.
    expected = {Local: [4, 8, 10], ThreeShards: [3, 6, 10], ReversedTasks: [4, 7, 10]}[type(executor)]
    assert [int(m.group(1)) for line in lines if (m := re.match(r"eval: sft: (\d+)/10", line))] == expected
    one = evaluate_policies(policies, prompts, cfg, pretrain_heldout=texts, **QUIET)
    for a, b in zip(one.policies, report.policies, strict=True):
        assert a.responses == b.responses and a.win_rate == b.win_rate and a.expected_win_rate == b.expected_win_rate


def test_an_interrupted_evaluation_resumes_from_its_finished_shards(tiny_dir, prompts, tmp_path, monkeypatch):
    """keep_dir: a shard that finished is read back on the rerun, never redone; one that did not
    (a kill in the middle of it) is redone; the report equals an uninterrupted evaluation's. Other
    settings or other weights at the same path are other shards."""
    import tether.eval.evaluate as ev

    other = nudge(tiny_dir, tmp_path / "other", 0.05)
    texts = [PretrainText(text="The quick brown fox jumps over the lazy dog. " * 4)]
    cfg = EvalConfig(samples_per_prompt=2, max_new_tokens=8)
    policies = {"sft": str(tiny_dir), "other": str(other)}
    kwargs = dict(ref_policy=str(tiny_dir), pretrain_heldout=texts, executor=ThreeShards(), **QUIET)
    whole = evaluate_policies(policies, prompts, cfg, **kwargs)

    real, ran = ev.sample_policy_shard, []

    def killed_in_the_fourth(path, *args, **kw):
        ran.append(path)
        if len(ran) == 4:
            raise KeyboardInterrupt  # the process dies in its 4th of 6 shards
        return real(path, *args, **kw)

    keep = tmp_path / "shards"
    monkeypatch.setattr(ev, "sample_policy_shard", killed_in_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        evaluate_policies(policies, prompts, cfg, keep_dir=keep, **kwargs)
    assert len(list(keep.glob("*.pkl"))) == 3 and not list(keep.glob("*.tmp*"))

    def counted(path, *args, **kw):
        ran.append(path)
        return real(path, *args, **kw)

    ran.clear()
    monkeypatch.setattr(ev, "sample_policy_shard", counted)
    resumed = evaluate_policies(policies, prompts, cfg, keep_dir=keep, **kwargs)
    assert ran == [str(other)] * 3  # only the 3 shards that had not finished
    for a, b in zip(whole.policies, resumed.policies, strict=True):
        assert a.responses == b.responses and a.preferences == b.preferences and a.flag_rates == b.flag_rates
        assert (a.expected_win_rate, a.expected_win_ci, a.likert, a.kl_to_ref, a.pretrain_ppl) == (
            b.expected_win_rate,
            b.expected_win_ci,
            b.likert,
            b.kl_to_ref,
            b.pretrain_ppl,
        )

    ran.clear()  # another temperature: every shard is another one
    warmer = EvalConfig(samples_per_prompt=2, max_new_tokens=8, temperature=0.7)
    evaluate_policies(policies, prompts, warmer, keep_dir=keep, **kwargs)
    assert len(ran) == 6
    ran.clear()  # other weights at the same path: that policy's shards are redone
    retrained = nudge(tiny_dir, tmp_path / "retrained", 0.1) / "model.safetensors"
    (other / "model.safetensors").write_bytes(retrained.read_bytes())
    evaluate_policies(policies, prompts, cfg, keep_dir=keep, **kwargs)
    assert ran == [str(other)] * 3


def test_a_shard_that_cannot_be_kept_is_still_returned(tmp_path):
    """A worker whose node lacks the run's directory: the result comes back, nothing is written."""
    from tether.eval.evaluate import _kept_shard

    missing = tmp_path / "not-on-this-node" / "shard.pkl"
    assert _kept_shard(str(missing), lambda: "result") == "result"
    assert not missing.parent.exists()


def nudge_top(tiny_dir: Path, out: Path, scale: float) -> Path:
    """The tiny model with only its top block and final norm nudged: a policy partial fine-tuning
    could have trained from it (bottom block and embeddings bit for bit the tiny model's)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in tiny_dir.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    gen = torch.Generator().manual_seed(1)
    weights = {
        k: v + scale * torch.randn(v.shape, generator=gen) if (".layers.1." in k or k == "model.norm.weight") else v
        for k, v in load_file(tiny_dir / "model.safetensors").items()
    }
    save_file(weights, out / "model.safetensors")
    return out


def test_shared_blocks_run_once_and_give_the_full_forwards_figures(tiny_dir, prompts, tmp_path, monkeypatch):
    """The policy, the reference and the RM share the tiny model's bottom block, as partial
    fine-tuning leaves them: sampling keeps that block's output and the reference and the RM run
    only their own tops on it (the block never runs again after the set-up probe), each model is
    loaded once, and the figures are the plain path's (the oracle below: the engine's samples in
    the same batches, each model's full forward): the same responses token for token, RM scores
    and KL to float round-off (the policy's log-probs are the ones it sampled with)."""
    import tether.eval.evaluate as ev
    from tether.models.trunk import SharedTrunk
    from tether.ppo.rollout import response_logprobs

    ppo_dir = nudge_top(tiny_dir, tmp_path / "ppo", 0.05)
    torch.manual_seed(0)
    rm, tok = load_scalar_model(str(tiny_dir))
    rm_dir = save_scalar_model(rm, tok, tmp_path / "rm")
    runs, loads = [], []
    monkeypatch.setattr(
        SharedTrunk, "hidden", lambda self, *a, real=SharedTrunk.hidden: runs.append(1) or real(self, *a)
    )
    for name, real in (("load_causal_lm", ev.load_causal_lm), ("load_scalar_model", ev.load_scalar_model)):
        monkeypatch.setattr(ev, name, lambda path, real=real: loads.append(path) or real(path))
    cfg = EvalConfig(samples_per_prompt=2, max_new_tokens=10, batch_size=4)
    pretrain = [PretrainText(text="The quick brown fox jumps over the lazy dog. " * 4)]
    policies = {"sft": str(tiny_dir), "ppo": str(ppo_dir)}
    common = dict(reward_model=str(rm_dir), ref_policy=str(tiny_dir), pretrain_heldout=pretrain, **QUIET)
    report = evaluate_policies(policies, prompts, cfg, **common)
    # Only the set-up probe's pass for each model that reads through the trunk (ppo: the policy, the
    # reference, the RM; sft, the reference itself, KL 0: the policy and the RM): no batch runs it.
    assert len(runs) == 3 + 2
    assert sorted(loads) == sorted([str(tiny_dir), str(ppo_dir), str(rm_dir)])  # each model once

    policy, _ = load_causal_lm(str(ppo_dir))
    ref, _ = load_causal_lm(str(tiny_dir))
    rm, _ = load_scalar_model(str(rm_dir))
    texts = [p.text for p in prompts for _ in range(2)]
    responses, scores, kls = [], [], []
    for start in range(0, len(texts), 4):
        batch = texts[start : start + 4]
        generators = row_generators(0, [(start + i, 0) for i in range(len(batch))], "cpu")
        gen = sample(policy, tok, batch, max_new_tokens=10, temperature=1.0, generator=generators)
        inputs = (gen.query_ids, gen.query_mask, gen.response_ids, gen.response_mask)
        responses += decode_responses(tok, gen)
        scores += episode_scores(gen, batch, [], rm, None).tolist()
        kls += (
            response_logprobs(policy, *inputs, 1.0)[0].sum(-1) - response_logprobs(ref, *inputs, 1.0)[0].sum(-1)
        ).tolist()
    ppo = report.by_name("ppo")
    assert ppo.responses == responses
    assert ppo.rm_score == pytest.approx(float(np.mean(scores)), rel=1e-5, abs=1e-6)
    assert ppo.kl_to_ref == pytest.approx(float(np.mean(kls)), rel=1e-5, abs=1e-6)
    assert ppo.kl_to_ref > 0 and report.by_name("sft").kl_to_ref == 0.0
    assert ppo.pretrain_ppl == pytest.approx(pretrain_perplexity(policy, tok, pretrain), rel=1e-6)
    # Without an RM the policy and the reference alone still share the block: the same KL.
    runs.clear()
    no_rm = evaluate_policies(policies, prompts, cfg, ref_policy=str(tiny_dir), **QUIET)
    assert len(runs) == 2 and no_rm.by_name("ppo").kl_to_ref == ppo.kl_to_ref  # (a probe pass per model)


def test_models_run_whole_where_the_shared_blocks_path_is_not_their_own(
    tiny_gemma2_dir, prompts, tmp_path, capsys, monkeypatch
):
    """A Gemma 2 policy and its reference share a frozen block bit for bit, but Gemma's forward
    scales the embeddings and soft-caps the logits around its blocks: the evaluation measures the
    KL with each model's full forward (the probe says why), as with no sharing at all."""
    import tether.eval.evaluate as ev

    ppo_dir = nudge_top(tiny_gemma2_dir, tmp_path / "ppo", 0.05)
    cfg = EvalConfig(samples_per_prompt=1, max_new_tokens=6, batch_size=4)
    policies = {"sft": str(tiny_gemma2_dir), "ppo": str(ppo_dir)}
    report = evaluate_policies(policies, prompts[:2], cfg, ref_policy=str(tiny_gemma2_dir), **QUIET)
    assert "run whole, not on their shared frozen blocks: its logits" in capsys.readouterr().out
    policy, tok = load_causal_lm(str(ppo_dir))
    assert ev._exact_trunk([policy, load_causal_lm(str(tiny_gemma2_dir))[0]]) is None
    from tether.models.trunk import SharedTrunk

    monkeypatch.setattr(SharedTrunk, "detect", classmethod(lambda cls, models: None))  # no sharing at all
    whole = evaluate_policies(policies, prompts[:2], cfg, ref_policy=str(tiny_gemma2_dir), **QUIET)
    assert report.by_name("ppo").kl_to_ref == whole.by_name("ppo").kl_to_ref != 0
