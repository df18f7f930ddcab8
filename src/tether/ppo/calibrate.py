"""Calibrate PPO-ptx's γ (``ptx_coef``) from the paper's loss normalisation to tether's.

InstructGPT's objective (eq. 2) is per episode and per pretraining sequence:

    E_(x,y)~π [r(x, y) − β·Σ_t KL_t]  +  γ · E_x~D_pretrain [Σ_t log π(x_t | x_<t)]

so, read literally, its PPO loss sums the surrogate over an episode's response tokens (mean over
episodes) and its pretraining loss sums the log-probs over a sequence (mean over sequences).
tether's losses are token means over the whole minibatch (:func:`tether.ppo.train.ppo_step`),
which changes what a given γ means. The calibrated γ is the one that puts tether's two gradients
in the ratio the paper's γ = 27.8 puts them under the paper's normalisation, on the same
minibatch:

    γ · ‖∇L_ptx^token‖ / ‖∇L_PPO^token‖  =  27.8 · ‖∇L_ptx^sequence‖ / ‖∇L_PPO^episode‖.

A token mean over a minibatch is its token sum over the token count and a per-sequence sum
averaged over sequences is the same token sum over the sequence count, so on one minibatch each
normalisation's gradient is the other's times a count (``‖∇L^sequence‖ = ‖∇L^token‖ · tokens /
sequences``) and the norms cancel: γ = 27.8 · (pretraining tokens per example) / (response tokens
per episode). The lengths are what must be measured (the responses' depend on the policy); the
gradient norms, measured too, say how large the pretraining gradient is against PPO's at that γ.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tether.config import PPOConfig
from tether.models.generation import row_generators
from tether.models.lm_batch import SFTExample, target_tokens
from tether.ppo.roles import PPORoles, build_roles
from tether.ppo.rollout import RewardFn, Rollout, Targets
from tether.ppo.train import (
    _ptx_slices,
    compute_targets,
    load_pretrain_texts,
    load_prompts,
    ppo_step,
    take_cyclic,
)

__all__ = ["PAPER_PTX_COEF", "PtxCalibration", "PtxGradients", "calibrate_ptx_coef", "measure_gradients"]

PAPER_PTX_COEF = 27.8  # InstructGPT §3.5 / appendix C.4


@dataclass(frozen=True)
class PtxGradients:
    """One minibatch's PPO and pretraining gradients (policy parameters only), in tether's
    normalisation (token means) and, by the token counts, in the paper's (per-episode and
    per-sequence sums, averaged)."""

    ppo_grad_norm: float  # ‖∇L_PPO‖, L_PPO the clipped surrogate's mean over the response tokens
    ptx_grad_norm: float  # ‖∇L_ptx‖ (γ = 1), L_ptx the LM loss's mean over the pretraining tokens
    episodes: int
    response_tokens: int  # of the minibatch's episodes
    ptx_examples: int
    ptx_tokens: int  # predicted tokens of the pretraining examples (each example's first is not)

    @property
    def ppo_grad_norm_paper(self) -> float:
        """‖∇L_PPO‖ with the surrogate summed over each episode's response, averaged over episodes."""
        return self.ppo_grad_norm * self.response_tokens / self.episodes

    @property
    def ptx_grad_norm_paper(self) -> float:
        """‖∇L_ptx‖ with the LM loss summed over each example, averaged over examples."""
        return self.ptx_grad_norm * self.ptx_tokens / self.ptx_examples

    def ratio(self, ptx_coef: float) -> float:
        """tether's ptx_grad_ratio at γ = ``ptx_coef``: ‖γ ∇L_ptx‖ / ‖∇L_PPO‖, token means."""
        return ptx_coef * self.ptx_grad_norm / self.ppo_grad_norm

    def paper_ratio(self, paper_coef: float = PAPER_PTX_COEF) -> float:
        """The same ratio under the paper's normalisation at its γ."""
        return paper_coef * self.ptx_grad_norm_paper / self.ppo_grad_norm_paper

    def calibrated_coef(self, paper_coef: float = PAPER_PTX_COEF) -> float:
        """The γ at which :meth:`ratio` equals :meth:`paper_ratio` (the norms cancel: see the
        module docstring)."""
        return paper_coef * (self.ptx_tokens / self.ptx_examples) / (self.response_tokens / self.episodes)


@dataclass(frozen=True)
class PtxCalibration:
    """Every measured minibatch, and the calibrated γ with its spread over them."""

    paper_coef: float
    minibatches: list[PtxGradients]

    @property
    def coefs(self) -> list[float]:
        return [m.calibrated_coef(self.paper_coef) for m in self.minibatches]

    @property
    def coef(self) -> float:
        """The calibrated γ: the median over the minibatches."""
        return statistics.median(self.coefs)

    def summary(self) -> str:
        """A few lines for people: the calibrated γ, its spread, and what it means for the gradients."""
        ms = self.minibatches

        def spread(values: list[float]) -> str:
            return f"median {statistics.median(values):.3g} (min {min(values):.3g}, max {max(values):.3g})"

        gamma = self.coef
        return "\n".join(
            [
                f"minibatches measured: {len(ms)} "
                f"({ms[0].episodes} episodes, {ms[0].ptx_examples} pretraining examples each)",
                "response tokens per episode: " + spread([m.response_tokens / m.episodes for m in ms]),
                "pretraining tokens per example: " + spread([m.ptx_tokens / m.ptx_examples for m in ms]),
                "‖∇L_PPO‖ (token mean): " + spread([m.ppo_grad_norm for m in ms]),
                "‖∇L_ptx‖ (token mean): " + spread([m.ptx_grad_norm for m in ms]),
                f"paper's ‖γ∇L_ptx‖/‖∇L_PPO‖ at γ = {self.paper_coef:g} (per-sequence sums): "
                + spread([m.paper_ratio(self.paper_coef) for m in ms]),
                f"tether's ptx_grad_ratio at γ = {self.paper_coef:g} (token means): "
                + spread([m.ratio(self.paper_coef) for m in ms]),
                f"tether's ptx_grad_ratio at γ = {gamma:.3g}: " + spread([m.ratio(gamma) for m in ms]),
                "calibrated γ per minibatch: " + spread(self.coefs),
                f"calibrated γ: {gamma:.3g}",
            ]
        )


def measure_gradients(roles: PPORoles, minibatch: Rollout, targets: Targets, ptx: Sequence[SFTExample]) -> PtxGradients:
    """One optimiser step's gradients (:func:`~tether.ppo.train.ppo_step` at γ = 1, the trainer's
    own code) measured, then discarded: both models' gradients are None afterwards."""
    if not ptx:
        raise ValueError("measure_gradients: no pretraining examples")
    stats = ppo_step(
        dataclasses.replace(roles, cfg=dataclasses.replace(roles.cfg, ptx_coef=1.0)), minibatch, targets, ptx
    )
    roles.policy.zero_grad(set_to_none=True)
    roles.value_model.zero_grad(set_to_none=True)
    return PtxGradients(
        ppo_grad_norm=stats["ppo_grad_norm"],
        ptx_grad_norm=stats["ptx_grad_norm"],
        episodes=minibatch.batch_size,
        response_tokens=minibatch.n_tokens,
        ptx_examples=len(ptx),
        ptx_tokens=target_tokens(ptx),
    )


def calibrate_ptx_coef(
    cfg: PPOConfig,
    n_batches: int,
    reward_fn: RewardFn | None = None,
    *,
    paper_coef: float = PAPER_PTX_COEF,
    log: Callable[[str], None] = print,
) -> PtxCalibration:
    """Measure both gradients on ``n_batches`` rollout batches of ``cfg`` and calibrate γ.

    Loads the roles as :func:`~tether.ppo.train.train_ppo` does (policy, reference, value model
    from the RM, the reward model or ``reward_fn``), then per batch: rollout, rewards and
    whitened advantages (steps 1-3 of an iteration), and for each minibatch one
    :func:`~tether.ppo.train.ppo_step` at γ = 1 with the minibatch's pretraining examples, whose
    gradients are measured and then discarded: nothing is trained, every batch is sampled from
    the initial policy. ``cfg.ptx_coef`` is not used (``ptx_examples_per_episode`` and
    ``ptx_max_length`` are). One process (no data parallelism).
    """
    if n_batches < 1:
        raise ValueError(f"calibrate_ptx_coef: n_batches must be >= 1, got {n_batches}")
    if cfg.ptx_per_minibatch < 1:
        raise ValueError(
            f"calibrate_ptx_coef: {cfg.ptx_examples_per_episode} pretraining examples per episode "
            f"give no pretraining example per minibatch of {cfg.mini_batch_size}: raise ppo.ptx_examples_per_episode"
        )
    cfg = dataclasses.replace(cfg, ptx_coef=1.0)
    cfg.validate()
    prompts = load_prompts(cfg.prompts_file)
    pretrain = load_pretrain_texts(cfg.pretrain_file)
    roles = build_roles(cfg, reward_fn)
    for line in roles.describe():
        log(line)
    device = roles.device
    n_prompts = cfg.batch_size // cfg.samples_per_prompt
    prompt_pos, ptx_pos = (0, 0), (0, 0)
    # As the trainer's minibatch order. CPU: it drives randperm there.
    minibatch_rng = torch.Generator().manual_seed(cfg.seed + 1)
    measured: list[PtxGradients] = []
    for b in range(n_batches):
        idx, prompt_pos = take_cyclic(len(prompts), n_prompts, prompt_pos, cfg.seed)
        batch_prompts = [prompts[i] for i in idx for _ in range(cfg.samples_per_prompt)]
        generators = row_generators(cfg.seed, [b * cfg.batch_size + j for j in range(cfg.batch_size)], device)
        rollout, _ = roles.rollout(batch_prompts, generators)
        targets = compute_targets(rollout, cfg, cfg.kl_coef)
        ptx_slices, ptx_pos = _ptx_slices(pretrain, roles.tokenizer, ptx_pos, cfg)
        order = torch.randperm(cfg.batch_size, generator=minibatch_rng)
        for m, s in enumerate(range(0, cfg.batch_size, cfg.mini_batch_size)):
            rows = order[s : s + cfg.mini_batch_size].tolist()
            minibatch = rollout.select(rows)
            measured.append(
                measure_gradients(
                    roles, minibatch, targets.select(rows, minibatch.response_ids.shape[1]), ptx_slices[m]
                )
            )
        last = measured[-1]
        log(
            f"calibrate_ptx: batch {b + 1}/{n_batches}: γ {last.calibrated_coef(paper_coef):.3g} "
            f"(last minibatch: {last.response_tokens / last.episodes:.1f} response tokens per episode, "
            f"{last.ptx_tokens / last.ptx_examples:.1f} per pretraining example)"
        )
    return PtxCalibration(paper_coef, measured)
