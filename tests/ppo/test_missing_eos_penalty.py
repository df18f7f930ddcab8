"""Truncation counts once: by default PPO adds nothing to the RM's score of a cut-off answer.

The RM trains on cut-off answers as cut off (no EOS) and the labelers already mark them down; a
fixed missing-EOS penalty on top would count the same property of an answer twice (SPEC, "each
signal counts a property of an answer once"). The paper has no such term.
"""

from __future__ import annotations

import pytest
import torch

from tether.config import PPOConfig, resolve
from tether.models.generation import decode_responses, sample
from tether.models.loading import load_causal_lm
from tether.ppo.rollout import episode_scores


def constant_reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
    return torch.full((len(responses),), 0.25)


@pytest.mark.parametrize("preset", [None, "tiny", "demo", "paper"])
def test_default_config_adds_nothing_to_a_response_without_eos(tiny_dir, preset):
    cfg = resolve(PPOConfig, "ppo", preset, validate=False)
    policy, tok = load_causal_lm(str(tiny_dir))
    prompts = ["hi", "a longer prompt"]
    # ignore_eos: both responses run to max_new_tokens without EOS (cut off).
    gen = sample(policy, tok, prompts, max_new_tokens=4, generator=torch.Generator().manual_seed(0), ignore_eos=True)
    assert not gen.finished.any()
    scores = episode_scores(gen, prompts, decode_responses(tok, gen), constant_reward, cfg.missing_eos_penalty)
    assert torch.equal(scores, torch.full((2,), 0.25))
