"""Every quantity compared or subtracted in RL is in the same units and read on the same tokens.

The class of bug (found in tether's review, 2026-11): the value model initialised from the RM but
read without the RM's normalisation (its first targets in other units: a shift on the advantages
of the last tokens); the RM trained on cut-off responses with EOS appended while PPO scores them
without (a train/score mismatch); a CPU random generator driving sampling on another device;
sampling-time log-probs from a different log-softmax than the recomputed ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from tether.data.formats import Comparison, Demonstration, Prompt
from tether.labelers.panel import Panel
from tether.models.generation import Generation, encode_prompts, sample, sample_k
from tether.models.heads import (
    load_scalar_model,
    reward_scores,
    save_scalar_model,
    set_reward_normalization,
    token_values,
)
from tether.models.loading import load_causal_lm
from tether.ppo.rollout import episode_scores, joined, response_values
from tether.reward.data import encode_comparisons
from tether.reward.normalize import normalize_reward_model

SRC = Path(__file__).resolve().parents[1] / "src" / "tether"


def _rm_with_normalization(tiny_dir, tmp_path) -> Path:
    torch.manual_seed(0)
    rm, tok = load_scalar_model(str(tiny_dir))
    set_reward_normalization(rm, gain=2.5, bias=-0.75)  # far from the identity on purpose
    return save_scalar_model(rm, tok, tmp_path / "rm")


def test_value_model_starts_in_the_units_of_the_scores(tiny_dir, tmp_path):
    """At initialisation, V at the last token of a finished response is that response's score."""
    rm_dir = _rm_with_normalization(tiny_dir, tmp_path)
    rm, tok = load_scalar_model(str(rm_dir))
    value_model, _ = load_scalar_model(str(rm_dir), trainable=True)  # how PPO builds it
    texts = ["one two three four five<|im_end|>", "six<|im_end|>", "seven eight<|im_end|>"]
    tok.padding_side = "right"
    enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    scores = reward_scores(rm, enc.input_ids, enc.attention_mask)
    values = token_values(value_model, enc.input_ids, enc.attention_mask)
    last = enc.attention_mask.sum(1) - 1
    assert torch.allclose(values[torch.arange(len(texts)), last], scores, atol=1e-5)
    # and the normalisation is not the identity, so the test can tell the two apart
    raw = reward_scores(rm, enc.input_ids, enc.attention_mask, normalized=False)
    assert (scores - raw).abs().min() > 0.1


def test_value_of_the_last_response_state_is_read_through_the_normalisation(tiny_dir, tmp_path):
    """PPO's per-token values (response_values) use the same map as the RM's score."""
    rm_dir = _rm_with_normalization(tiny_dir, tmp_path)
    value_model, tok = load_scalar_model(str(rm_dir))
    policy, _ = load_causal_lm(str(tiny_dir))
    gen = sample(policy, tok, ["hi", "a longer prompt"], max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    values = response_values(value_model, gen.query_ids, gen.query_mask, gen.response_ids, gen.response_mask)
    # V(s_0) is read at the last prompt token: the RM's (normalised) score of the prompt alone.
    prompt_score = reward_scores(value_model, gen.query_ids, gen.query_mask)
    assert torch.allclose(values[:, 0], prompt_score, atol=1e-5)


def test_normalisation_gives_demonstrations_mean_0_std_1(tiny_dir):
    torch.manual_seed(0)
    rm, tok = load_scalar_model(str(tiny_dir))
    demos = [Demonstration(prompt=f"Question {i}?", response=f"Answer number {i} " * (i % 4 + 1)) for i in range(12)]
    norm = normalize_reward_model(rm, tok, demos)
    again = normalize_reward_model(rm, tok, demos)  # from raw scores: idempotent
    assert (norm.gain, norm.bias) == (again.gain, again.bias)
    from tether.reward.score import score_texts

    scores = score_texts(rm, tok, [d.prompt for d in demos], [d.response for d in demos]).double()
    assert abs(float(scores.mean())) < 1e-5 and abs(float(scores.std()) - 1.0) < 1e-4
    raw_only = normalize_reward_model(rm, tok, demos, scale=False)
    assert raw_only.gain == 1.0 and abs(raw_only.bias + raw_only.raw_mean) < 1e-9 and not raw_only.scaled
    one = normalize_reward_model(rm, tok, demos[:1])  # no spread to scale by: the bias alone
    assert one.gain == 1.0 and not one.scaled and abs(one.bias + one.raw_mean) < 1e-9


def test_the_rm_trains_on_the_token_sequence_ppo_scores(tiny_dir):
    """A sampled response, ended or cut, becomes the same ids in an RM comparison as in PPO."""
    policy, tok = load_causal_lm(str(tiny_dir))
    responses = ["alpha beta gamma", "delta epsilon"]
    prompt = "Name two things."
    q_ids, q_mask = encode_prompts(tok, [prompt, prompt])
    rows = [tok(r, add_special_tokens=False).input_ids for r in responses]
    ended = [True, False]  # the second ran out of tokens before EOS
    rows = [r + [tok.eos_token_id] if e else r for r, e in zip(rows, ended, strict=True)]
    width = max(map(len, rows))
    r_ids = torch.full((2, width), tok.pad_token_id)
    r_mask = torch.zeros((2, width), dtype=torch.long)
    for i, r in enumerate(rows):
        r_ids[i, : len(r)], r_mask[i, : len(r)] = torch.tensor(r), 1
    gen = Generation(q_ids, q_mask, r_ids, r_mask, torch.zeros(2, width), torch.tensor(ended))
    ids, mask = joined(gen.query_ids, gen.query_mask, gen.response_ids, gen.response_mask)
    scored = [ids[i][mask[i].bool()].tolist() for i in range(2)]  # what episode_scores reads

    comparison = Comparison(prompt=prompt, responses=responses, ranking=[1, 2], labeler_id="a", ended=ended)
    examples, _ = encode_comparisons(tok, [comparison], max_length=512)
    assert examples[0].sequences == scored
    # Without the flag a cut response would be trained on as finished (EOS appended).
    legacy, _ = encode_comparisons(tok, [Comparison(prompt, responses, [1, 2], "a")], max_length=512)
    assert legacy[0].sequences[1] == scored[1] + [tok.eos_token_id]

    rm, _ = load_scalar_model(str(tiny_dir))
    ppo_scores = episode_scores(gen, [prompt] * 2, responses, rm, None)
    from tether.reward.score import score_sequences

    assert torch.allclose(score_sequences(rm, examples[0].sequences, tok.pad_token_id), ppo_scores, atol=1e-5)


def test_ended_flags_flow_from_sampling_through_labels_to_the_rm(tiny_dir):
    """sample_k records which responses reached EOS; the panel's comparisons carry it on."""
    model, tok = load_causal_lm(str(tiny_dir))

    def boost_eos(_module, _inputs, logits):  # about half the responses end within 4 tokens
        logits[..., tok.eos_token_id] += 9.0
        return logits

    model.lm_head.register_forward_hook(boost_eos)
    prompts = [Prompt(id=f"p{i}", text=f"Say something about {w}.", user_id="u") for i, w in enumerate("abcdef")]
    samples = sample_k(model, tok, prompts, 4, policy_name="sft", max_new_tokens=4, seed=0)
    flags = [e for s in samples for e in s.ended]
    assert True in flags and False in flags
    comparisons = Panel().label(samples, seed=0)
    assert comparisons and all(c.ended == s.ended for c in comparisons for s in samples if s.prompt == c.prompt)


def test_every_random_generator_lives_on_the_device_it_drives():
    """A ``torch.Generator()`` without a device is a CPU generator: sampling on CUDA with it
    fails. Each one in src/ names its device, or says on its line that it only drives the CPU."""
    offenders = []
    for path in SRC.rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "Generator"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)
                and "CPU:" not in lines[node.lineno - 1] + lines[node.lineno - 2]
            ):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not offenders, f"CPU generators that may drive device tensors: {offenders}"
