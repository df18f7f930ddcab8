"""Shared by the PPO tests: a toy reward and the inputs of one ppo_step on the tiny models."""

from __future__ import annotations

import json

import torch

from tether.config import PPOConfig, resolve
from tether.models.generation import sample
from tether.models.heads import load_scalar_model
from tether.models.lm_batch import encode_pretrain
from tether.models.loading import load_causal_lm
from tether.ppo.roles import PPORoles, plain_roles
from tether.ppo.rollout import Targets


def length_reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """Toy reward: shorter responses are better (−characters / 10)."""
    return torch.tensor([-len(r) / 10 for r in responses])


def scoring_roles(policy, value_model, tok, reward=length_reward, *, temperature=1.0, missing_eos_penalty=-1.0, **cfg):
    """The tiny preset's roles of these models, the policy its own reference, each run whole."""
    overrides = {"temperature": temperature, "missing_eos_penalty": missing_eos_penalty, **cfg}
    return plain_roles(resolve(PPOConfig, "ppo", "tiny", overrides=overrides), policy, value_model, tok, reward=reward)


def update_fixture(ppo_data, eos_policy, **cfg) -> tuple[PPORoles, object, Targets, list]:
    """(roles of the tiny policy and value model, a scored rollout, random advantages and returns
    for it, 3 encoded pretraining texts): the inputs of one ppo_step."""
    policy, tok = load_causal_lm(str(eos_policy), trainable=True)
    value_model, _ = load_scalar_model(str(eos_policy), trainable=True)
    roles = scoring_roles(policy, value_model, tok, **cfg)
    prompts = ["hi", "a much longer prompt that forces left padding of the others", "mid", "x y"]
    gen = sample(policy, tok, prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(3))
    rollout = roles.score(gen, prompts)
    mask = rollout.response_mask
    noise = [torch.randn(mask.shape) * mask for _ in range(2)]
    zeros = torch.zeros(mask.shape)
    targets = Targets(kl=zeros, non_score_rewards=zeros, rewards=zeros, advantages=noise[0], returns=noise[1])
    texts = [json.loads(x)["text"] for x in ppo_data["pretrain"].read_text().splitlines()[:3]]
    return roles, rollout, targets, [encode_pretrain(tok, t, 32) for t in texts]
