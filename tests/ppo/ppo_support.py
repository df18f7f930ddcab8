"""Shared by the PPO tests: a toy reward and the inputs of one ppo_step on the tiny models."""

from __future__ import annotations

import json

import torch

from tether.models.generation import decode_responses, sample
from tether.models.heads import load_scalar_model
from tether.models.lm_batch import encode_pretrain
from tether.models.loading import load_causal_lm
from tether.ppo.rollout import score_episodes


def length_reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """Toy reward: shorter responses are better (−characters / 10)."""
    return torch.tensor([-len(r) / 10 for r in responses])


def update_fixture(ppo_data, eos_policy):
    """(policy, value model, tokenizer, a scored rollout with random advantages and returns, 3
    encoded pretraining texts): the inputs of one ppo_step."""
    policy, tok = load_causal_lm(str(eos_policy), trainable=True)
    value_model, _ = load_scalar_model(str(eos_policy), trainable=True)
    prompts = ["hi", "a much longer prompt that forces left padding of the others", "mid", "x y"]
    gen = sample(policy, tok, prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(3))
    rollout = score_episodes(
        gen,
        prompts,
        decode_responses(tok, gen),
        policy=policy,
        ref_policy=policy,
        value_model=value_model,
        reward=length_reward,
        temperature=1.0,
        missing_eos_penalty=-1.0,
    )
    rollout.advantages = torch.randn(rollout.response_mask.shape) * rollout.response_mask
    rollout.returns = torch.randn(rollout.response_mask.shape) * rollout.response_mask
    texts = [json.loads(x)["text"] for x in ppo_data["pretrain"].read_text().splitlines()[:3]]
    return policy, value_model, tok, rollout, [encode_pretrain(tok, t, 32) for t in texts]
