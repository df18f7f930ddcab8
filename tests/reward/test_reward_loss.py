"""tether.reward.loss: the K-wise ranking loss (InstructGPT eq. 1) and Bradley-Terry pairs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tether.reward.loss import kwise_ranking_loss, pairwise_loss


def _naive_kwise(scores: torch.Tensor, prompt_index: torch.Tensor, ranks: torch.Tensor) -> float:
    """Eq. (1) straight from the paper's text, loop by loop (ties make no pair)."""
    per_prompt = []
    for p in sorted(set(prompt_index.tolist())):
        idx = [i for i in range(len(scores)) if prompt_index[i] == p]
        losses = [
            -math.log(1 / (1 + math.exp(-(scores[w].item() - scores[lo].item()))))
            for w in idx
            for lo in idx
            if ranks[w] < ranks[lo]
        ]
        if losses:
            per_prompt.append(sum(losses) / len(losses))
    return sum(per_prompt) / len(per_prompt)


def _random_batch(g: torch.Generator, n_prompts: int, with_ties: bool):
    scores, prompt_index, ranks = [], [], []
    for p in range(n_prompts):
        k = int(torch.randint(2, 10, (1,), generator=g))
        r = torch.randint(1, k + 1 if with_ties else 2, (k,), generator=g)
        if not with_ties:
            r = torch.randperm(k, generator=g) + 1
        scores.append(torch.randn(k, generator=g, dtype=torch.float64))
        prompt_index += [10 * p + 3] * k  # ids need not be contiguous
        ranks.append(r)
    return torch.cat(scores), torch.tensor(prompt_index), torch.cat(ranks)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("with_ties", [False, True])
def test_vectorised_equals_naive_loop(seed, with_ties):
    g = torch.Generator().manual_seed(seed)
    scores, prompt_index, ranks = _random_batch(g, n_prompts=6, with_ties=with_ties)
    # Shuffle responses across the batch: prompts need not be contiguous either.
    perm = torch.randperm(len(scores), generator=g)
    scores, prompt_index, ranks = scores[perm], prompt_index[perm], ranks[perm]
    loss, stats = kwise_ranking_loss(scores, prompt_index, ranks)
    assert loss.item() == pytest.approx(_naive_kwise(scores, prompt_index, ranks), rel=1e-10)
    n_pairs = sum(
        1
        for i in range(len(scores))
        for j in range(len(scores))
        if prompt_index[i] == prompt_index[j] and ranks[i] < ranks[j]
    )
    assert int(stats["n_pairs"]) == n_pairs


def test_k2_equals_pairwise_bradley_terry():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(8, generator=g), torch.randn(8, generator=g)
    scores = torch.stack([chosen, rejected], 1).flatten()
    prompt_index = torch.arange(8).repeat_interleave(2)
    ranks = torch.tensor([1, 2]).repeat(8)
    kw, kw_stats = kwise_ranking_loss(scores, prompt_index, ranks)
    pw, pw_stats = pairwise_loss(chosen, rejected)
    torch.testing.assert_close(kw, pw)
    torch.testing.assert_close(pw, -F.logsigmoid(chosen - rejected).mean())
    for key in ("accuracy", "margin", "n_pairs"):
        torch.testing.assert_close(kw_stats[key], pw_stats[key], check_dtype=False)


def test_invariant_to_order_of_responses_within_prompts():
    g = torch.Generator().manual_seed(1)
    scores, prompt_index, ranks = _random_batch(g, n_prompts=4, with_ties=True)
    loss, _ = kwise_ranking_loss(scores, prompt_index, ranks)
    for _ in range(3):
        perm = torch.randperm(len(scores), generator=g)
        permuted, _ = kwise_ranking_loss(scores[perm], prompt_index[perm], ranks[perm])
        torch.testing.assert_close(permuted, loss)


def test_tied_pairs_make_no_pair_and_get_no_gradient():
    # Prompt 0: ranks 1, 2, 2 -> pairs (0,1), (0,2); the tie (1,2) is dropped.
    scores = torch.tensor([0.3, -0.2, 1.5], requires_grad=True)
    prompt_index = torch.zeros(3, dtype=torch.long)
    ranks = torch.tensor([1, 2, 2])
    loss, stats = kwise_ranking_loss(scores, prompt_index, ranks)
    expected = -(F.logsigmoid(scores[0] - scores[1]) + F.logsigmoid(scores[0] - scores[2])) / 2
    torch.testing.assert_close(loss, expected)
    assert int(stats["n_pairs"]) == 2
    # Same gradient as the explicit two-pair expression: no term couples the tied responses.
    (grad,) = torch.autograd.grad(loss, scores)
    (expected_grad,) = torch.autograd.grad(expected, scores)
    torch.testing.assert_close(grad, expected_grad)
    assert grad[1] > 0 and grad[2] > 0  # both losers are still pushed down


def test_tie_only_pairs_do_not_affect_loss():
    # Responses 2 and 3 tie for last: both lose to 0 and 1 whatever their scores, so swapping
    # their scores changes nothing (the tie pair itself is never scored).
    base_scores = torch.tensor([1.0, 0.0, 5.0, -5.0])
    prompt_index = torch.zeros(4, dtype=torch.long)
    ranks = torch.tensor([1, 2, 3, 3])
    a, _ = kwise_ranking_loss(base_scores, prompt_index, ranks)
    swapped = torch.tensor([1.0, 0.0, -5.0, 5.0])  # swap the tied pair's scores
    b, _ = kwise_ranking_loss(swapped, prompt_index, ranks)
    torch.testing.assert_close(a, b)


def test_all_tied_prompt_is_excluded_and_counted():
    scores = torch.tensor([0.1, 0.9, 2.0, -1.0, 3.0], requires_grad=True)
    prompt_index = torch.tensor([0, 0, 1, 1, 1])
    ranks = torch.tensor([1, 2, 1, 1, 1])  # prompt 1 is all ties
    loss, stats = kwise_ranking_loss(scores, prompt_index, ranks)
    torch.testing.assert_close(loss, -F.logsigmoid(scores[0] - scores[1]))
    assert int(stats["n_prompts"]) == 1
    assert int(stats["n_prompts_without_pairs"]) == 1
    loss.backward()
    assert torch.equal(scores.grad[2:], torch.zeros(3))


def test_no_pairs_at_all_gives_zero_loss_and_zero_gradient():
    scores = torch.tensor([0.5, 0.7], requires_grad=True)
    loss, stats = kwise_ranking_loss(scores, torch.tensor([0, 0]), torch.tensor([1, 1]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(scores.grad, torch.zeros(2))
    assert int(stats["n_pairs"]) == 0 and int(stats["n_prompts_without_pairs"]) == 1


def test_each_prompt_weighs_the_same_whatever_its_k():
    g = torch.Generator().manual_seed(2)
    s_small = torch.randn(2, generator=g, dtype=torch.float64)
    s_big = torch.randn(9, generator=g, dtype=torch.float64)
    r_small, r_big = torch.tensor([2, 1]), torch.randperm(9, generator=g) + 1
    small, _ = kwise_ranking_loss(s_small, torch.zeros(2, dtype=torch.long), r_small)
    big, _ = kwise_ranking_loss(s_big, torch.zeros(9, dtype=torch.long), r_big)
    scores = torch.cat([s_small, s_big]).requires_grad_()
    both, stats = kwise_ranking_loss(scores, torch.tensor([0] * 2 + [1] * 9), torch.cat([r_small, r_big]))
    torch.testing.assert_close(both, (small + big) / 2)
    assert int(stats["n_pairs"]) == 1 + 36
    # Per-prompt gradient mass: each prompt's gradient is half its solo gradient.
    both.backward()
    solo_small = torch.autograd.grad(
        kwise_ranking_loss(scores[:2], torch.zeros(2, dtype=torch.long), r_small)[0], scores
    )[0][:2]
    torch.testing.assert_close(scores.grad[:2], solo_small / 2)


def test_gradient_reaches_every_untied_response_in_the_right_direction():
    g = torch.Generator().manual_seed(3)
    scores, prompt_index, ranks = _random_batch(g, n_prompts=5, with_ties=False)
    scores.requires_grad_()
    loss, _ = kwise_ranking_loss(scores, prompt_index, ranks)
    loss.backward()
    assert torch.all(scores.grad != 0)
    # The best response of each prompt is pushed up (loss decreases as its score rises), the
    # worst down.
    for p in prompt_index.unique():
        idx = (prompt_index == p).nonzero().flatten()
        assert scores.grad[idx[ranks[idx].argmin()]] < 0
        assert scores.grad[idx[ranks[idx].argmax()]] > 0


def test_stats_accuracy_and_margin():
    scores = torch.tensor([2.0, 1.0, 3.0, 0.0, 0.5])
    prompt_index = torch.tensor([0, 0, 0, 1, 1])
    ranks = torch.tensor([1, 2, 3, 1, 2])
    # pairs: (2 vs 1)=+1, (2 vs 3)=-1, (1 vs 3)=-2, (0 vs 0.5)=-0.5 -> 1 of 4 right.
    _, stats = kwise_ranking_loss(scores, prompt_index, ranks)
    assert stats["accuracy"].item() == pytest.approx(0.25)
    assert stats["margin"].item() == pytest.approx((1 - 1 - 2 - 0.5) / 4)
    assert int(stats["n_prompts"]) == 2
    assert not any(v.requires_grad for v in stats.values())


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        kwise_ranking_loss(torch.zeros(3), torch.zeros(2, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError):
        pairwise_loss(torch.zeros(3), torch.zeros(2))


def test_an_exact_score_tie_counts_half_in_training_accuracy_as_in_evaluation():
    scores = torch.tensor([1.0, 1.0, 0.0])  # the first pair (rank 1 vs 2) tied in score
    _, stats = kwise_ranking_loss(scores, torch.zeros(3, dtype=torch.long), torch.tensor([1, 2, 3]))
    assert float(stats["accuracy"]) == pytest.approx((0.5 + 1 + 1) / 3)
    _, stats = pairwise_loss(torch.tensor([2.0, 1.0]), torch.tensor([2.0, 0.0]))
    assert float(stats["accuracy"]) == pytest.approx(0.75)


# --------------------------------------------------------------------------------------------
# The RM's data: it trains on the token ids the policy sampled, the ids PPO scores.


def _eos_often(model, tok) -> None:
    """About half the tiny model's responses end within 4 tokens (the rest are cut off)."""

    def boost_eos(_module, _inputs, logits):
        logits[..., tok.eos_token_id] += 9.0
        return logits

    model.lm_head.register_forward_hook(boost_eos)


def test_the_rm_reads_a_comparisons_sampled_ids_not_the_retokenised_text(tiny_dir):
    """Ids that decode to the text but are not its canonical tokenisation are trained on as sampled."""
    from tether.data.formats import Comparison
    from tether.models.loading import load_tokenizer
    from tether.reward.data import encode_comparisons, prompt_ids

    tok = load_tokenizer(tiny_dir)
    text = "hello world"
    split = tok("hel", add_special_tokens=False).input_ids + tok("lo world", add_special_tokens=False).input_ids
    assert tok.decode(split) == text and split != tok(text, add_special_tokens=False).input_ids
    other = tok("bye", add_special_tokens=False).input_ids
    c = Comparison("Greet.", [text, "bye"], [1, 2], "a", ended=[True, False], response_ids=[split, other])
    (example,), _ = encode_comparisons(tok, [c], max_length=64)
    head = prompt_ids(tok, "Greet.")
    assert example.sequences == [head + split + [tok.eos_token_id], head + other]
    # A text-only comparison (a user's file, the labeling app) is tokenised from its text, as before.
    (plain,), _ = encode_comparisons(tok, [Comparison("Greet.", [text, "bye"], [1, 2], "a")], max_length=64)
    assert plain.sequences[0] == head + tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    with pytest.raises(ValueError, match=r"comparison 0: response_ids\[1\] holds token id .* outside"):
        encode_comparisons(tok, [Comparison("Greet.", [text, "bye"], [1, 2], "a", response_ids=[split, [10**9]])], 64)


def test_sampled_ids_go_from_sampling_through_labels_and_jsonl_to_the_rm_as_ppo_scores_them(tiny_dir, tmp_path):
    """sample_k keeps each response's ids; the panel's comparisons carry them; JSONL keeps them;
    the RM's sequences are token for token what PPO scores (prompt ⊕ sampled ids ⊕ EOS when it came)."""
    from tether.data.formats import DataError, Prompt, read_records, write_records
    from tether.labelers.panel import Panel
    from tether.models.generation import row_generators, sample, sample_k
    from tether.models.loading import load_causal_lm
    from tether.reward.data import encode_comparisons

    model, tok = load_causal_lm(str(tiny_dir))
    _eos_often(model, tok)
    prompts = [Prompt(id=f"p{i}", text=f"Say something about {w}.", user_id="u") for i, w in enumerate("abcdef")]
    samples = sample_k(model, tok, prompts, 4, policy_name="sft", max_new_tokens=4, seed=0)
    # What PPO samples and scores for the same rows and seeds: prompt ⊕ response, EOS included when reached.
    flat = [p.text for p in prompts for _ in range(4)]
    gen = sample(
        model,
        tok,
        flat,
        max_new_tokens=4,
        generator=row_generators(0, [(i, j) for i in range(6) for j in range(4)], "cpu"),
    )
    scored = [
        torch.cat(
            [gen.query_ids[r][gen.query_mask[r].bool()], gen.response_ids[r][gen.response_mask[r].bool()]]
        ).tolist()
        for r in range(len(flat))
    ]
    assert {False, True} == set(gen.finished.tolist())  # ended and cut-off responses both

    write_records(tmp_path / "samples.jsonl", samples)
    assert read_records(tmp_path / "samples.jsonl", "sample") == samples
    comparisons = Panel().label(samples, seed=0)
    write_records(tmp_path / "comparisons.jsonl", comparisons)
    assert read_records(tmp_path / "comparisons.jsonl", "comparison") == comparisons
    examples, _ = encode_comparisons(tok, comparisons, max_length=256)
    assert len(examples) == len(comparisons) >= 4
    for c, ex in zip(comparisons, examples, strict=True):
        i = int(c.prompt_id[1:])
        assert ex.sequences == scored[4 * i : 4 * i + 4]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "responses": ["a", "b"], "response_ids": [[1, 2], [3, -1]]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: field .response_ids\[1\]. must be a list of token ids"):
        read_records(bad, "sample")
