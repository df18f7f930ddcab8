"""PPO's roles object: the speed and precision decisions it takes, and what they guarantee."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ppo_support import length_reward  # this folder is on sys.path

from tether.config import PPOConfig, resolve
from tether.models.generation import row_generators
from tether.ppo.roles import Float32Head, build_roles

PROMPTS = ["hi", "a much longer prompt that forces left padding of the others", "mid", "x y"] * 2


pytestmark = pytest.mark.usefixtures("one_thread")


def roles_cfg(policy: Path, **overrides) -> PPOConfig:
    base = {"policy.name_or_path": str(policy), "generation_batch_size": 8, "max_new_tokens": 12}
    return resolve(PPOConfig, "ppo", "tiny", overrides={**base, **overrides})


def test_the_ppo_ratio_is_one_at_unchanged_weights_under_bf16_autocast(tiny_dir):
    """Old log-probs from scoring (one chunk of 8, padded to its longest) and new ones from the
    update's micro-batches of 2 (other rows, other padding), at the same weights under bf16
    autocast: log-ratio 0 to the blocks' round-off. With a bf16 LM head the two logits of a token
    round differently: max |log-ratio| 7.2e-3 here, 2.3e-4 with the float32 head (AVX2 CPU)."""
    roles = build_roles(roles_cfg(tiny_dir, **{"policy.autocast": "bfloat16"}), length_reward)
    said = "LM head computes its logits in float32 under the torch.bfloat16 autocast"
    assert any(said in line for line in roles.describe())
    with torch.no_grad():  # logits of a trained model's size (the random tiny model's are small)
        roles.policy.get_output_embeddings().weight.mul_(8.0)
    rollout, _ = roles.rollout(PROMPTS, row_generators(0, range(len(PROMPTS)), "cpu"))
    assert len(set(rollout.query_mask.sum(1).tolist())) > 1  # ragged prompts: the micro-batches trim
    log_ratio = []
    with torch.no_grad():
        for rows in ([0, 1], [2, 3], [4, 5], [6, 7], [7, 2], [5]):
            micro = rollout.select(rows)
            logprobs, _ = roles.forward(micro)
            log_ratio.append((logprobs - micro.logprobs)[micro.response_mask.bool()])
    worst = float(torch.cat(log_ratio).abs().max())
    assert worst < 1e-3, worst


def test_float32_runs_keep_the_plain_lm_head(eos_policy):
    """Without autocast nothing changes: the head stays the model's own layer."""
    roles = build_roles(roles_cfg(eos_policy), length_reward)
    assert not isinstance(roles.policy.get_output_embeddings(), Float32Head)
    assert not any("LM head" in n for n in roles.describe())


def test_the_shared_trunk_is_off_where_its_path_differs_from_the_models_own_forward(tiny_dir, tiny_gemma2_dir):
    """The probe at set-up: Gemma 2's own forward scales the embeddings and soft-caps the logits,
    which the trunk's path skips, so sharing goes off with the reason; a Llama's stays on."""
    frozen = {"policy.trainable_layers": 1}
    llama = build_roles(roles_cfg(tiny_dir, **frozen), length_reward)
    assert llama.trunk is not None and any("share 1 of 2 blocks" in line for line in llama.describe())
    gemma = build_roles(roles_cfg(tiny_gemma2_dir, **frozen), length_reward)
    assert gemma.trunk is None and gemma.capture is None
    lines = gemma.describe()
    assert any("share 1 of 2 blocks" in line for line in lines), lines  # found from the weights ...
    assert any(line.startswith("ppo: the shared trunk is off: the policy's log-probs") for line in lines), lines
    rollout, _ = gemma.rollout(PROMPTS[:2], row_generators(0, range(2), "cpu"))  # ... and PPO runs whole
    assert rollout.trunk_hidden is None and torch.isfinite(rollout.values).all()
