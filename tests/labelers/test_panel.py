"""The simulated labeler panel: preferences, ties, held-out labelers, agreement, win rates."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tether.data.agreement import pairwise_agreement
from tether.data.constraints import split_sentences
from tether.data.formats import FLAGS, Comparison, Sample, parse_record, to_json
from tether.data.task import build_default_task, load_topics, quoted_source
from tether.labelers.panel import (
    JUDGED_FLAGS,
    Panel,
    PanelConfig,
    _tied_ranks,
    read_response,
)
from tether.labelers.synthetic import break_constraint, sentences_of, synthetic_responses


@pytest.fixture(scope="module")
def task():
    return build_default_task()


@pytest.fixture(scope="module")
def samples(task):
    return synthetic_responses(task, k=4, seed=0)


@pytest.fixture(scope="module")
def panel():
    return Panel()


def _broken_pairs(task, seed=0):
    """(prompt, demonstration, the demonstration with one constraint broken) triples."""
    topics = load_topics()
    rng = random.Random(seed)
    out = []
    for prompt, demo in zip(task.prompts, task.demonstrations, strict=True):
        constraints = task.constraints[prompt.id]
        topic = topics[task.topics[prompt.id]]
        source = quoted_source(prompt.text)
        pool = split_sentences(source) if source else list(topic.sentences)
        units = sentences_of(demo.response, pool)
        for target in constraints:
            broken = break_constraint(units, constraints, target, list(topic.sentences), rng)
            if broken is not None:
                out.append((prompt.text, demo.response, broken))
    return out


def test_default_panel_has_eight_labelers_two_held_out(panel):
    assert len(panel.labelers) == 8
    assert len(panel.train_labelers) == 6 and len(panel.heldout_labelers) == 2
    train = {lab.id for lab in panel.train_labelers}
    heldout = {lab.id for lab in panel.heldout_labelers}
    assert not train & heldout and len(train | heldout) == 8
    # Labelers differ in taste, not only in noise.
    assert len({round(lab.w_constraints, 6) for lab in panel.labelers}) == 8
    assert {lab.w_length > 0 for lab in panel.labelers} == {True, False}


def test_held_out_labelers_are_never_used_by_default(panel, samples):
    heldout = {lab.id for lab in panel.heldout_labelers}
    for lps in (1, 6):
        comparisons = panel.label(samples[:60], labelers_per_sample=lps, seed=3)
        assert not heldout & {c.labeler_id for c in comparisons}
    with pytest.raises(ValueError):
        panel.label(samples[:5], labelers_per_sample=7)
    everyone = panel.label(samples[:60], labelers_per_sample=8, labelers=panel.labelers)
    assert {c.labeler_id for c in everyone} == {lab.id for lab in panel.labelers}


def test_labels_are_deterministic_and_valid_comparisons(panel, samples):
    a = panel.label(samples[:50], labelers_per_sample=2, seed=7)
    b = panel.label(samples[:50], labelers_per_sample=2, seed=7)
    c = panel.label(samples[:50], labelers_per_sample=2, seed=8)
    assert a == b
    assert a != c
    assert len(a) == 100
    for comp in a:
        again = parse_record(json.loads(json.dumps(to_json(comp))), "comparison")
        assert again == comp
        assert set(comp.flags[0]) == set(JUDGED_FLAGS) and set(JUDGED_FLAGS) <= set(FLAGS)
        assert comp.policies is not None and comp.prompt_id is not None


def test_labelers_share_the_work_evenly(panel, samples):
    comparisons = panel.label(samples[:120], labelers_per_sample=1, seed=0)
    counts = np.unique([c.labeler_id for c in comparisons], return_counts=True)[1]
    assert len(counts) == 6 and counts.max() - counts.min() <= 1


def test_identical_responses_tie(panel, task):
    prompt, demo = task.prompts[0].text, task.demonstrations[0].response
    other = "Volcanoes volcanoes volcanoes volcanoes volcanoes volcanoes volcanoes"
    sample = Sample(prompt=prompt, responses=[demo, other, demo])
    comparisons = panel.label([sample] * 10, labelers_per_sample=6)
    assert len(comparisons) == 60
    for c in comparisons:
        assert c.ranking[0] == c.ranking[2]
        assert c.likert[0] == c.likert[2]
    assert panel.prefer(panel.labelers[0], prompt, demo, demo, np.random.default_rng(0)) == 0.5
    # A judgement that ties every response holds no pair: it is left out, not written.
    assert panel.label([Sample(prompt=prompt, responses=[demo, demo])]) == []


def test_tie_threshold_chains_close_utilities():
    assert _tied_ranks([1.0, 0.98, 0.5, 0.96], 0.05) == [1, 1, 2, 1]
    assert _tied_ranks([0.1, 0.3, 0.2], 0.05) == [3, 1, 2]


def test_panel_prefers_demonstration_over_same_text_with_a_constraint_broken(panel, task):
    triples = _broken_pairs(task)
    assert len(triples) > 400
    wins = [
        panel.prefer(lab, prompt, demo, broken, np.random.default_rng([i, j]))
        for i, (prompt, demo, broken) in enumerate(triples)
        for j, lab in enumerate(panel.labelers)
    ]
    assert np.mean(wins) > 0.8


def test_flags_mean_what_they_say(panel, task, samples):
    for prompt, demo in zip(task.prompts, task.demonstrations, strict=True):
        j = panel.judge("sim-1", prompt.text, demo.response, np.random.default_rng(0))
        assert j.flags["satisfies_constraint"] and not j.flags["fails_instruction"]
        assert not j.flags["hallucination"]
    for prompt, _, broken in _broken_pairs(task)[:200]:
        f = panel.judge("sim-2", prompt, broken, np.random.default_rng(0)).flags
        assert not f["satisfies_constraint"]
    by_variant: dict[str, list[dict]] = {}
    for s in samples:
        for r, policy in zip(s.responses, s.policies, strict=True):
            j = panel.judge("sim-3", s.prompt, r, np.random.default_rng(0))
            by_variant.setdefault(policy.split(":")[1], []).append(j.flags)

    def rate(variant, flag):
        return np.mean([f[flag] for f in by_variant[variant]])

    assert rate("off_topic", "fails_instruction") > 0.8
    assert rate("repetitive", "fails_instruction") > 0.9
    assert rate("junk", "fails_instruction") > 0.8
    assert rate("hallucinated", "hallucination") > 0.8
    assert rate("unconstrained", "satisfies_constraint") < 0.3
    opinion = panel.judge("sim-1", "Tell me about tea.", "I think tea is great.", np.random.default_rng(0))
    assert opinion.flags["expresses_opinion"]


def test_likert_orders_good_above_bad(panel, samples):
    comparisons = panel.label(samples, labelers_per_sample=1, seed=0)
    likert: dict[str, list[int]] = {}
    for c in comparisons:
        for policy, score in zip(c.policies, c.likert, strict=True):
            likert.setdefault(policy.split(":")[1], []).append(score)
    mean = {k: np.mean(v) for k, v in likert.items()}
    assert mean["demonstration"] > 6 and mean["alternative"] > 6
    assert mean["demonstration"] > mean["broken"] > mean["repetitive"]
    assert mean["broken"] > mean["off_topic"]
    assert min(min(v) for v in likert.values()) >= 1 and max(max(v) for v in likert.values()) <= 7


def test_reading_is_robust_to_cheap_tricks(task):
    prompt = task.prompts[0].text
    demo = task.demonstrations[0].response
    good = read_response(prompt, demo)
    salad = read_response(prompt, " ".join(sorted(load_topics()["wind"].keywords)) + ".")
    assert salad.degenerate and salad.fluency < good.fluency
    empty = read_response(prompt, "")
    assert empty.empty and Panel().labelers[0].utility(empty) == 0.0
    cut = read_response(prompt, demo.rstrip(".!?") + " and")
    assert cut.truncated and cut.fluency < good.fluency
    typographic = read_response("Tell me about tea.", "Tea\u2019s taste \u2014 it\u2019s mild.")
    assert not typographic.degenerate


def test_agreement_on_a_hand_built_example():
    responses = ["x", "y", "z"]

    def comp(labeler, ranking, order=responses):
        return Comparison(prompt="P", responses=list(order), ranking=ranking, labeler_id=labeler)

    comparisons = [
        comp("L1", [1, 2, 3]),  # x > y > z
        comp("L2", [2, 1, 3]),  # y > x > z
        comp("L3", [1, 1, 2]),  # x = y > z
        comp("L4", [3, 1, 2], order=["z", "x", "y"]),  # x > y > z, responses shown reordered
        comp("L1", [3, 2, 1]),  # L1 again on the same prompt: never compared with themself
        Comparison(prompt="Q", responses=["x", "y"], ranking=[1, 2], labeler_id="L1"),  # alone
    ]
    # By hand, pairs of labelers on pairs of responses both ranked untied:
    #   L1-L2 xy no, xz yes, yz yes | L1-L3 xz yes, yz yes | L2-L3 xz yes, yz yes
    #   L1-L4 3 yes | L2-L4 xy no, xz yes, yz yes | L3-L4 xz yes, yz yes
    #   = 13 of 15; and the second L1 ranking (z > y > x) vs L2 1/3 (xy), L3 0/2, L4 0/3
    report = pairwise_agreement(comparisons)
    assert report.n_pairs == 15 + 8
    assert report.n_agree == 13 + 1
    assert report.rate == pytest.approx(14 / 23)
    assert report.n_prompts == 1
    assert report.per_labeler["L3"] == pytest.approx(6 / 8)
    assert report.per_labeler_pairs["L1"] == 8 + 8
    assert report.per_labeler["L1"] == pytest.approx((7 + 1) / 16)
    assert report.per_labeler_pair[("L1", "L4")] == pytest.approx(3 / 6)
    assert pairwise_agreement(comparisons[5:]).rate is None


def test_panel_agreement_is_near_the_papers(panel, samples):
    report = pairwise_agreement(panel.label(samples, labelers_per_sample=6, seed=0))
    assert 0.65 <= report.rate <= 0.80, report
    assert report.n_prompts == len(samples)
    # Two labelers per sample, as a real labeling run would have.
    pairs = pairwise_agreement(panel.label(samples, labelers_per_sample=2, seed=1))
    assert 0.65 <= pairs.rate <= 0.80, pairs


def test_win_rate_of_demonstrations_against_broken_ones(panel, task):
    triples = _broken_pairs(task)[:150]
    prompts = [t[0] for t in triples]
    demos, broken = [t[1] for t in triples], [t[2] for t in triples]
    win = panel.win_rate(prompts, demos, broken, seed=0)
    assert win.n == 150
    assert win.ci_low <= win.rate <= win.ci_high
    assert win.rate > 0.75 and win.ci_low > 0.65
    assert panel.win_rate(prompts, demos, broken, seed=0) == win
    lose = panel.win_rate(prompts, broken, demos, labelers=panel.train_labelers, seed=0)
    assert lose.rate < 0.25
    same = panel.win_rate(prompts, demos, demos)
    assert (same.rate, same.ci_low, same.ci_high) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError):
        Panel(PanelConfig(n_heldout=0)).win_rate(prompts, demos, broken)


def test_win_rate_with_several_samples_per_prompt_bootstraps_prompts(panel, task):
    """Three pairs per prompt: the rate is the mean of per-prompt means, n counts prompts, and
    the interval is narrower than with one pair per prompt (less sampling noise per prompt)."""
    triples = _broken_pairs(task)[:60]
    prompts = [t[0] for t in triples for _ in range(3)]
    demos = [t[1] for t in triples for _ in range(3)]
    broken = [t[2] for t in triples for _ in range(3)]
    clusters = [i for i in range(len(triples)) for _ in range(3)]
    win = panel.win_rate(prompts, demos, broken, seed=0, clusters=clusters)
    assert win.n == 60 and len(win.preferences) == 180
    by_hand = np.mean(np.reshape(win.preferences, (60, 3)).mean(1))
    assert win.rate == pytest.approx(by_hand)
    single = panel.win_rate(prompts[::3], demos[::3], broken[::3], seed=0)
    assert win.ci_high - win.ci_low < single.ci_high - single.ci_low
    with pytest.raises(ValueError, match="cluster"):
        panel.win_rate(prompts, demos, broken, clusters=clusters[:-1])


def test_expected_preference_is_the_mean_of_sampled_verdicts(panel, task):
    """expected_prefer integrates the labeler's noise exactly: it matches the mean of many noisy
    verdicts (ties counted half), is complementary in its arguments and 0.5 for identical texts."""
    prompt, good, bad = _broken_pairs(task)[0]
    lab = panel.heldout_labelers[0]
    exact = panel.expected_prefer(lab, prompt, good, bad)
    draws = [panel.prefer(lab, prompt, good, bad, np.random.default_rng([7, i])) for i in range(20000)]
    assert exact == pytest.approx(float(np.mean(draws)), abs=0.01)  # 4 standard errors
    assert 0.5 < exact < 1.0
    assert exact + panel.expected_prefer(lab, prompt, bad, good) == pytest.approx(1.0)
    assert panel.expected_prefer(lab, prompt, good, good) == 0.5


def test_expected_win_rate_estimates_the_sampled_win_rate_with_less_noise(panel, task):
    triples = _broken_pairs(task)[:60]
    prompts = [t[0] for t in triples]
    demos, broken = [t[1] for t in triples], [t[2] for t in triples]
    sampled = panel.win_rate(prompts, demos, broken, seed=0)
    expected = panel.expected_win_rate(prompts, demos, broken, seed=0)
    assert expected.ci_low <= expected.rate <= expected.ci_high
    assert abs(expected.rate - sampled.rate) < 0.05
    assert expected.ci_high - expected.ci_low < sampled.ci_high - sampled.ci_low
    mean_of_pairs = np.mean(
        [np.mean([panel.expected_prefer(lab, p, a, b) for lab in panel.heldout_labelers]) for p, a, b in triples]
    )
    assert expected.rate == pytest.approx(mean_of_pairs)
    same = panel.expected_win_rate(prompts, demos, demos)
    assert (same.rate, same.ci_low, same.ci_high) == (0.5, 0.5, 0.5)


def test_synthetic_responses_are_a_mix_of_distinct_responses(task, samples):
    assert len(samples) == len(task.prompts)
    kinds = set()
    for s in samples:
        assert len(s.responses) == 4 == len(set(s.responses))
        kinds |= {p.split(":")[1] for p in s.policies}
    assert kinds == {
        "demonstration", "alternative", "broken", "unconstrained", "off_topic",
        "hallucinated", "truncated", "repetitive", "junk",
    }  # fmt: skip
    assert synthetic_responses(task, k=4, seed=0) == samples
    assert synthetic_responses(task, k=4, seed=1) != samples


def test_cli_simulate_writes_comparisons_and_reports_agreement(tmp_path, samples, capsys):
    from tether.cli import main
    from tether.data.formats import read_records, write_records

    path = write_records(tmp_path / "samples.jsonl", samples[:40])
    out = tmp_path / "comparisons.jsonl"
    argv = ["label", "simulate", "--samples", str(path), "--out", str(out)]
    assert main([*argv, "--labelers-per-sample", "3", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert "agreement" in printed and "120 comparisons" in printed
    comparisons = read_records(out, "comparison")
    assert len(comparisons) == 120
    assert {c.labeler_id for c in comparisons} <= {f"sim-{i}" for i in range(1, 7)}
    assert main([*argv, "--labelers-per-sample", "8", "--include-heldout"]) == 0
    assert {c.labeler_id for c in read_records(out, "comparison")} == {f"sim-{i}" for i in range(1, 9)}
