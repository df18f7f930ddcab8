"""Calibrating PPO-ptx's γ from the paper's normalisation (per-episode and per-sequence sums) to
tether's (token means), checked against gradients computed directly in the paper's form."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math

import pytest
import torch
from ppo_support import length_reward, update_fixture  # this folder is on sys.path

from tether.config import PPOConfig, resolve
from tether.models.lm_batch import collate, encode_pretrain, forward_logits
from tether.ops import lm_loss
from tether.ppo.calibrate import PAPER_PTX_COEF, calibrate_ptx_coef, measure_gradients
from tether.ppo.loss import policy_loss
from tether.ppo.rollout import response_logprobs
from tether.ppo.train import ppo_step


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def grad_norm(model: torch.nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))


def test_calibrated_coef_gives_tethers_step_the_papers_gradient_ratio(ppo_data, eos_policy):
    """At the returned γ, ppo_step's own ptx_grad_ratio (token means) equals ‖27.8 ∇L_ptx‖ /
    ‖∇L_PPO‖ with the losses written as the paper's eq. (2) reads: the surrogate summed over each
    episode's response tokens, the LM loss summed over each pretraining sequence, both averaged.
    Swapping the two normalisations, or applying γ twice, misses it by the length ratio."""
    roles, mb, targets, _ = update_fixture(ppo_data, eos_policy)
    policy, tok = roles.policy, roles.tokenizer
    # Pretraining texts of 16 to 31 tokens against responses of at most 8: the two length
    # factors differ from each other and from 1.
    texts = [json.loads(x)["text"] for x in ppo_data["pretrain"].read_text().splitlines()[:3]]
    ptx = [encode_pretrain(tok, t * (i + 1), 32) for i, t in enumerate(texts)]
    cfg = roles.cfg
    measured = measure_gradients(roles, mb, targets, ptx)
    assert all(p.grad is None for p in policy.parameters())  # measured, then discarded
    gamma = measured.calibrated_coef(PAPER_PTX_COEF)
    response_len = mb.n_tokens / mb.batch_size
    ptx_len = measured.ptx_tokens / len(ptx)
    assert ptx_len / response_len > 1.5  # (else the test could not tell the normalisations apart)

    # The paper's form, computed directly: per-episode sums of the clipped surrogate ...
    policy.zero_grad(set_to_none=True)
    per_episode = []
    for e in range(mb.batch_size):
        ep = mb.select([e])
        advantages = targets.select([e], ep.response_ids.shape[1]).advantages
        logprobs, _ = response_logprobs(policy, ep.query_ids, ep.query_mask, ep.response_ids, ep.response_mask, 1.0)
        loss, _ = policy_loss(logprobs, ep.logprobs, advantages, ep.response_mask, cfg.cliprange)
        per_episode.append(loss * ep.response_mask.sum())
    (torch.stack(per_episode).mean()).backward()
    ppo_paper = grad_norm(policy)
    # ... and per-sequence sums of the LM loss.
    policy.zero_grad(set_to_none=True)
    b = collate(ptx, tok.pad_token_id)
    (lm_loss(forward_logits(policy, b, contextlib.nullcontext()), b["labels"], reduction="sum") / len(ptx)).backward()
    ptx_paper = grad_norm(policy)
    policy.zero_grad(set_to_none=True)
    paper_ratio = PAPER_PTX_COEF * ptx_paper / ppo_paper

    assert measured.ppo_grad_norm_paper == pytest.approx(ppo_paper, rel=1e-4)
    assert measured.ptx_grad_norm_paper == pytest.approx(ptx_paper, rel=1e-4)
    assert measured.paper_ratio() == pytest.approx(paper_ratio, rel=1e-4)
    # tether's trainer step at the calibrated γ puts the gradients in the paper's ratio.
    stats = ppo_step(dataclasses.replace(roles, cfg=dataclasses.replace(cfg, ptx_coef=gamma)), mb, targets, ptx)
    assert stats["ptx_grad_ratio"] == pytest.approx(paper_ratio, rel=1e-4)
    assert stats["ptx_grad_norm"] == pytest.approx(gamma * measured.ptx_grad_norm, rel=1e-4)
    # γ = 27.8 unchanged would leave tether's ratio short by the length factor.
    assert gamma == pytest.approx(PAPER_PTX_COEF * ptx_len / response_len, rel=1e-9)


def test_calibrate_ptx_coef_measures_every_minibatch_of_every_batch(ppo_data, eos_policy):
    cfg = resolve(
        PPOConfig,
        "ppo",
        "tiny",
        overrides={
            "policy.name_or_path": str(eos_policy),
            "prompts_file": str(ppo_data["prompts"]),
            "pretrain_file": str(ppo_data["pretrain"]),
            "ptx_coef": 0.0,  # not used: the calibration measures at γ = 1
        },
    )
    notes: list[str] = []
    result = calibrate_ptx_coef(cfg, 2, length_reward, log=notes.append)
    per_batch = cfg.batch_size // cfg.mini_batch_size
    assert len(result.minibatches) == 2 * per_batch
    assert sum("calibrate_ptx: batch" in n for n in notes) == 2
    for m in result.minibatches:
        assert m.episodes == cfg.mini_batch_size and m.ptx_examples == cfg.ptx_per_minibatch
        assert m.ppo_grad_norm > 0 and m.ptx_grad_norm > 0
    assert min(result.coefs) <= result.coef <= max(result.coefs)
    assert "calibrated γ" in result.summary()


def test_calibrate_ptx_coef_refuses_a_minibatch_without_pretraining_examples(ppo_data, eos_policy):
    cfg = resolve(PPOConfig, "ppo", "tiny", overrides={"ptx_examples_per_episode": 0.0})
    with pytest.raises(ValueError, match="ptx_examples_per_episode"):
        calibrate_ptx_coef(cfg, 1, length_reward)
    with pytest.raises(ValueError, match="n_batches"):
        calibrate_ptx_coef(resolve(PPOConfig, "ppo", "tiny"), 0, length_reward)
