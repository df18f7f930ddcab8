"""Calibrate PPO-ptx's γ (ppo.ptx_coef) to the paper's 27.8 for a given PPO config (prints figures).

    python benchmarks/calibrate_ptx.py --preset tiny --batches 2
    OMP_NUM_THREADS=1 python benchmarks/calibrate_ptx.py --preset paper --batches 3 \\
        --batch-size 32 --mini-batch-size 8 --generation-batch-size 32

Samples ``--batches`` rollout batches from the config's policy (the reward model, or a toy length
reward without ``--reward_model``), and for every minibatch measures the PPO and pretraining
gradients of one trainer step (:func:`tether.ppo.calibrate.calibrate_ptx_coef`): their norms in
tether's normalisation (token means) and the paper's (per-episode / per-sequence sums), and the γ
that gives tether's step the paper's ratio at γ = 27.8. That γ is 27.8 × (pretraining tokens per
example) / (response tokens per episode), so it depends on the policy's response lengths and the
pretraining corpus, not on the reward; the gradient norms depend on the minibatch size (smaller
minibatches, noisier gradients), so compare them at one setting.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_ppo import toy_reward  # this script's folder is on sys.path

from tether.config import PPOConfig, add_config_args, config_from_args
from tether.ppo.calibrate import PAPER_PTX_COEF, calibrate_ptx_coef


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, PPOConfig)
    parser.add_argument("--batches", type=int, default=3, help="rollout batches to measure")
    parser.add_argument("--paper-coef", type=float, default=PAPER_PTX_COEF, help="γ under the paper's normalisation")
    args = parser.parse_args()
    cfg = config_from_args(PPOConfig, "ppo", args)
    t0 = time.perf_counter()
    result = calibrate_ptx_coef(
        cfg, args.batches, None if cfg.reward_model else toy_reward, paper_coef=args.paper_coef, log=print
    )
    reward = cfg.reward_model or "toy length reward"
    print(f"policy: {cfg.policy.name_or_path}; reward: {reward}; threads: {torch.get_num_threads()}")
    print(
        f"settings: {args.batches} batches of {cfg.batch_size} episodes, minibatch {cfg.mini_batch_size}, "
        f"{cfg.ptx_examples_per_episode:g} pretraining examples per episode (≤ {cfg.ptx_max_length} tokens), "
        f"max_new_tokens {cfg.max_new_tokens}, temperature {cfg.temperature:g}"
    )
    print(result.summary())
    print(f"wall time: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
