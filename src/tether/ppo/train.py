"""Stage 3: PPO and PPO-ptx against the reward model (InstructGPT §3.5, eq. 2).

Read top to bottom. Set-up: the data, the four roles (:func:`~tether.ppo.roles.build_roles`:
policy and frozen reference from the SFT checkpoint, the frozen reward model, a value model
initialised from the RM, and how they run), the optimisers, resume. Then per iteration:

1. rollout: one response per prompt, sampled with the KV cache at temperature T;
2. score: each episode scored by the policy, the reference, the value model and the reward
   model (dropout off everywhere): a frozen :class:`~tether.ppo.rollout.Rollout`;
3. rewards: −β·KL(π || π_SFT) per token, the RM score added at the last response token;
4. advantages: GAE(γ, λ), whitened over the batch (3 and 4: a :class:`~tether.ppo.rollout.Targets`);
5. update: epochs × minibatches; each optimiser step accumulates the clipped policy and value
   losses of its micro-batches and then
6. (PPO-ptx) the pretraining LM loss scaled by γ;
7. log, adapt β, sample the fixed prompts, checkpoint.

The policy stays in eval mode throughout, training included: dropout in RL would make the
log-probs of the update differ from those of the rollout for no reason (the ratio would not
start at 1, and the KL estimate would be biased); gradients flow the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedTokenizerBase

from tether.checkpoint import (
    StopAfter,
    epoch_order,
    find_state,
    last_good_state,
    load_state,
    non_finite_weights,
    rng_state,
    save_state,
    start_run_dir,
    truncate_metrics,
)
from tether.config import PPOConfig
from tether.data.formats import read_records
from tether.data.task import default_splits
from tether.distributed import (
    Dist,
    all_gather_object,
    all_reduce_sum,
    broadcast_object,
    gather_rng_states,
    init_from_env,
    main_only,
    micro_batches,
    seed_rank,
    shard_range,
    sum_dict,
)
from tether.metrics import MetricsLogger, progress_bar, read_metrics
from tether.models.generation import decode_responses, row_generators
from tether.models.heads import reward_bias, reward_gain, save_scalar_model, set_reward_normalization
from tether.models.lm_batch import (
    SFTExample,
    collate,
    count_target_tokens,
    encode_pretrain,
    forward_logits,
    target_tokens,
)
from tether.models.loading import remove_partial_dirs, save_model
from tether.ops import lm_loss, masked_mean
from tether.optim import build_optimizer, build_scheduler, clip_grad
from tether.ppo.advantages import gae, leave_one_out, whiten_advantages
from tether.ppo.kl import AdaptiveKLController, FixedKLController, compute_rewards
from tether.ppo.loss import policy_loss, value_loss
from tether.ppo.roles import PPORoles, build_roles
from tether.ppo.rollout import RewardFn, Rollout, RolloutTime, Targets, device_time, episode_scores
from tether.sft.data import load_pretrain

__all__ = ["EMA", "PPOResult", "compute_targets", "ppo_step", "take_cyclic", "train_ppo"]


@dataclass
class PPOResult:
    policy_dir: Path  # the trained policy (EMA weights when ema_decay is set), a HF directory
    value_dir: Path  # the trained value model, a HF sequence-classification directory
    iterations: int
    metrics: list[dict[str, Any]]  # one record per iteration, as in metrics.jsonl


class EMA:
    """Exponential moving average of a model's trainable weights (paper: decay 0.992).

    ``shadow ← d·shadow + (1 − d)·w`` after every optimiser step, starting from the initial
    weights. Only trainable parameters are tracked (the LoRA adapters under LoRA).
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """``model`` with the EMA weights in place of its own, restored on exit."""
        params = dict(model.named_parameters())
        live = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, s in self.shadow.items():
                params[n].copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, w in live.items():
                    params[n].copy_(w)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": {n: s.cpu() for n, s in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, s in state["shadow"].items():
            self.shadow[n].copy_(s)


def take_cyclic(n_items: int, count: int, position: tuple[int, int], seed: int) -> tuple[list[int], tuple[int, int]]:
    """The next ``count`` indices of an endless stream of seeded per-epoch permutations.

    ``position = (epoch, index within that epoch's permutation)`` is all the state there is, so
    it goes into the checkpoint and a resumed run sees the same prompts in the same order.
    """
    if n_items <= 0:
        raise ValueError("take_cyclic: nothing to take from (empty dataset)")
    epoch, index = position
    out: list[int] = []
    while len(out) < count:
        order = epoch_order(n_items, seed, epoch)
        take = order[index : index + count - len(out)].tolist()
        out += take
        index += len(take)
        if index == n_items:
            epoch, index = epoch + 1, 0
    return out, (epoch, index)


def load_prompts(path: str | None) -> list[str]:
    """Prompt texts from a Prompt file, or the train split of the default task's prompts."""

    if path is None:
        records = default_splits()["train"]
    else:
        records = read_records(path, "prompt")
    if not records:
        raise ValueError(f"ppo: no prompts in {path or 'the default task'}")
    return [p.text for p in records]


def load_pretrain_texts(path: str | None) -> list[str]:
    texts = [t.text for t in load_pretrain(path)]
    if not texts:
        raise ValueError(f"ppo: ptx is on but the pretraining corpus {path or ''} is empty")
    return texts


# The stats every ppo_step returns (summed over the ranks key by key, so every rank has them all).
PPO_STEP_STATS = ("policy_loss", "value_loss", "policy_clipfrac", "approx_kl", "value_clipfrac", "value_error")


def compute_targets(
    rollout: Rollout,
    cfg: PPOConfig,
    kl_coef: float,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Targets:
    """Steps 3 and 4 of an iteration: the per-token rewards (−β·KL, the score at the last real
    token, less the other responses' mean score with a leave-one-out baseline), then GAE(γ, λ)
    advantages and returns, the advantages whitened over the batch (``all_reduce`` sums the
    whitening statistics over the ranks of a data-parallel run)."""
    scores = rollout.scores
    if cfg.score_baseline == "leave_one_out":
        scores = leave_one_out(scores, cfg.samples_per_prompt)
    rewards, non_score_rewards, kl = compute_rewards(
        scores, rollout.logprobs, rollout.ref_logprobs, rollout.response_mask, kl_coef, cfg.kl_estimator
    )
    advantages, returns = gae(rewards, rollout.values, rollout.response_mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten_advantages(advantages, rollout.response_mask, all_reduce=all_reduce)
    return Targets(kl=kl, non_score_rewards=non_score_rewards, rewards=rewards, advantages=advantages, returns=returns)


def ppo_step(
    roles: PPORoles,
    episodes: Rollout,
    targets: Targets,
    ptx: Sequence[SFTExample],
    *,
    n_tokens: int | None = None,
    filler: bool = False,
) -> dict[str, float]:
    """Gradients of one optimiser step (the caller clips and steps); returns its stats.

    The PPO losses are token means over the whole minibatch (``episodes`` and their ``targets``):
    each micro-batch's loss is weighted by its share of the minibatch's response tokens, so the
    gradient does not depend on micro_batch_size. Then, in consecutive passes into the same
    gradients (PPO-ptx, InstructGPT §3.5), ``ptx_coef`` × the LM loss of the pretraining examples
    ``ptx``, a token mean likewise (:func:`_ptx_step`).

    Data parallel (the roles' models wrapped for it): ``episodes`` holds this rank's episodes of
    the minibatch and ``n_tokens`` the response tokens of the whole minibatch (every rank's); a
    rank with none passes one episode as a ``filler`` (weight 0: it only joins the all-reduce).
    The pretraining examples ``ptx`` are the minibatch's (every rank's): each rank takes its
    share. The returned stats are the whole minibatch's on every rank.
    """
    cfg = roles.cfg
    policy, value_model = roles.policy_par, roles.value_par
    assert policy is not None and value_model is not None
    world_size = policy.dist.world_size
    totals: dict[str, float] = dict.fromkeys(PPO_STEP_STATS, 0.0)
    n_tokens = episodes.n_tokens if n_tokens is None else n_tokens
    n_episodes = episodes.batch_size
    for start in range(0, n_episodes, cfg.micro_batch_size):
        rows = range(start, min(start + cfg.micro_batch_size, n_episodes))
        micro = episodes.select(rows)
        target = targets.select(rows, micro.response_ids.shape[1])
        weight = 0.0 if filler else micro.n_tokens / n_tokens
        # The step's last PPO micro-batch all-reduces both models' gradients. With ptx the
        # policy's is all-reduced again after the ptx passes: the mean over the ranks of (the
        # reduced PPO gradient, equal everywhere, + each rank's ptx part × world_size) is the sum.
        last = start + cfg.micro_batch_size >= n_episodes
        with policy.sync(last), value_model.sync(last):
            logprobs, values = roles.forward(micro)
            pg_loss, pg_stats = policy_loss(
                logprobs, micro.logprobs, target.advantages, micro.response_mask, cfg.cliprange
            )
            vf_loss, vf_stats = value_loss(
                values, micro.values, target.returns, micro.response_mask, cfg.cliprange_value
            )
            # Separate networks and optimisers: one backward fills both sets of gradients
            # (× world_size: DDP averages over the ranks, the token mean wants their sum).
            ((pg_loss + vf_loss) * (weight * world_size)).backward()
        for name, value in (
            ("policy_loss", pg_loss.detach()),
            ("value_loss", vf_loss.detach()),
            ("policy_clipfrac", pg_stats["clipfrac"]),
            ("approx_kl", pg_stats["approx_kl"]),
            ("value_clipfrac", vf_stats["vf_clipfrac"]),
            ("value_error", vf_stats["value_error"]),
        ):
            totals[name] += float(value) * weight
    if not ptx:
        return sum_dict(totals)
    return _ptx_step(roles, ptx, totals)


def _ptx_step(roles: PPORoles, ptx: Sequence[SFTExample], totals: dict[str, float]) -> dict[str, float]:
    """Step 6 (PPO-ptx): ``ptx_coef`` × the pretraining LM loss (a token mean over the
    minibatch's examples ``ptx``) into the gradients the PPO passes left; ``totals`` with the
    ptx stats added, summed over the ranks."""
    cfg, policy = roles.cfg, roles.policy_par
    assert policy is not None
    d = policy.dist
    device = roles.device
    pad_token_id = roles.tokenizer.pad_token_id
    # The PPO gradient so far (all-reduced: the whole minibatch's), to measure the
    # pretraining gradient's size against it (ptx_grad_ratio = ‖γ ∇L_ptx‖ / ‖∇L_PPO‖:
    # what calibrating ptx_coef looks at).
    params = list(policy.module.parameters())
    ppo_grads = [p.grad.detach().clone() if p.grad is not None else None for p in params]
    n_targets = target_tokens(ptx)
    micro_ptx = micro_batches(ptx, cfg.micro_batch_size, d)
    totals["ptx_loss"] = 0.0
    for i, (chunk, real) in enumerate(micro_ptx):
        b = collate(chunk, pad_token_id)
        with policy.sync(i == len(micro_ptx) - 1):
            loss = lm_loss(policy.run(forward_logits, b, roles.precision), b["labels"].to(device))
            weight = count_target_tokens(b["labels"]) / max(n_targets, 1) if real else 0.0
            (cfg.ptx_coef * weight * d.world_size * loss).backward()
        totals["ptx_loss"] += float(loss.detach()) * weight
    ppo_sq = ptx_sq = 0.0
    for p, g in zip(params, ppo_grads, strict=True):
        if p.grad is not None:
            before = g if g is not None else torch.zeros_like(p.grad)
            ppo_sq += float(before.float().pow(2).sum())
            ptx_sq += float((p.grad - before).float().pow(2).sum())
    totals = sum_dict(totals)
    totals["ppo_grad_norm"], totals["ptx_grad_norm"] = math.sqrt(ppo_sq), math.sqrt(ptx_sq)
    if ppo_sq > 0:  # (a minibatch whose PPO gradient is exactly 0 has no ratio)
        totals["ptx_grad_ratio"] = math.sqrt(ptx_sq / ppo_sq)
    return totals


def _ptx_slices(
    pretrain: Sequence[str], tokenizer: PreTrainedTokenizerBase, position: tuple[int, int], cfg: PPOConfig
) -> tuple[list[list[SFTExample]], tuple[int, int]]:
    """The pretraining examples of one iteration, one slice of ``ptx_per_minibatch`` per minibatch.

    Further PPO epochs reuse them as they reuse the episodes. Returns the slices (empty without
    ptx) and the corpus position after them.
    """
    n_minibatches = cfg.batch_size // cfg.mini_batch_size
    if not pretrain:
        return [[] for _ in range(n_minibatches)], position
    k = cfg.ptx_per_minibatch
    idx, position = take_cyclic(len(pretrain), k * n_minibatches, position, cfg.seed + 1)
    examples = [encode_pretrain(tokenizer, pretrain[i], cfg.ptx_max_length) for i in idx]
    return [examples[m * k : (m + 1) * k] for m in range(n_minibatches)], position


def train_ppo(
    cfg: PPOConfig,
    reward_fn: RewardFn | None = None,
    *,
    log: Callable[[str], None] = print,
    stop_after_iterations: int | None = None,
) -> PPOResult:
    """Run (or resume) PPO / PPO-ptx as configured; returns where the trained models are.

    ``reward_fn(prompts, responses) -> [B]`` replaces the reward model (toy rewards, tests); the
    value model then starts from the policy with a fresh head unless ``value_model`` is set.
    ``stop_after_iterations`` raises :class:`~tether.checkpoint.StopAfter` once this process has
    run that many iterations (tests use it to simulate a crash).

    Data parallel when launched by torchrun or inside a process group (Ray Train): every rank
    holds the four roles, samples and scores its share of each batch's prompts, whitens the
    advantages with the batch's statistics and trains on its episodes of every minibatch; the
    gradients, the KL the controller sees and the metrics are the whole batch's. Episode ``e`` of
    the run is sampled from its own seed (cfg.seed, e), so which rank samples it changes nothing.
    """
    # Set-up: the process group, the run directory, the data (validated before any model
    # loads), the roles, the optimisation state, resume.
    d, log = _process_group(cfg, log)
    out = start_run_dir(cfg, d.is_main)
    prompts = load_prompts(cfg.prompts_file)
    # Plain PPO (γ = 0) computes no pretraining loss at all: it would add nothing to the gradient.
    pretrain = load_pretrain_texts(cfg.pretrain_file) if cfg.ptx_coef > 0 and cfg.ptx_per_minibatch > 0 else []
    roles = build_roles(cfg, reward_fn, d)
    for line in roles.describe():
        log(line)
    seed_rank(cfg.seed, d)  # every rank built the same models; from here each has its own stream
    run = _Run(cfg, roles, _Optimisation.build(cfg, roles), d, out, prompts[: cfg.n_sample_prompts])
    pos = run.resume(log)
    kl_ctl = run.opt.kl_ctl
    log(_plan(cfg, len(prompts), kl_ctl, d, roles))
    logger = MetricsLogger(run.metrics_path, cfg, enabled=d.is_main)
    # This rank's share of every batch: a block of its prompts (a prompt's responses together).
    n_prompts = cfg.batch_size // cfg.samples_per_prompt
    mine = shard_range(n_prompts, d)
    my_episodes = range(mine.start * cfg.samples_per_prompt, mine.stop * cfg.samples_per_prompt)
    device = roles.device

    iterations_this_process = 0
    with progress_bar("ppo", enabled=d.is_main) as bar:
        task = bar.add_task("ppo", total=cfg.iterations, completed=pos.iteration, stats="")
        for iteration in range(pos.iteration, cfg.iterations):
            t_start = device_time(device)
            kl_coef, lrs = kl_ctl.value, run.opt.lrs()

            # 1-2. Rollout: sample a response per prompt (KV cache, temperature T), and score each
            #      episode with the policy, the reference, the value and the reward model. Each rank
            #      does its share of the episodes, each episode from its own seed.
            n_per = cfg.samples_per_prompt  # each prompt's responses are consecutive episodes
            batch_idx, pos.prompts = take_cyclic(len(prompts), n_prompts, pos.prompts, cfg.seed)
            batch_prompts = [prompts[i] for i in batch_idx for _ in range(n_per)]
            generators = row_generators(cfg.seed, [pos.episodes + j for j in my_episodes], device)
            rollout, rollout_time = roles.rollout([batch_prompts[j] for j in my_episodes], generators)
            _check_scores(rollout, d, iteration, out)

            # 3. Rewards: −β·KL(π || π_SFT) per token, the score (less the other responses' mean
            #    with a leave-one-out baseline) added at the last real token.
            # 4. Advantages: GAE(γ, λ) over the response tokens, whitened over the batch (every
            #    rank's tokens: the statistics are all-reduced).
            targets = compute_targets(rollout, cfg, kl_coef, all_reduce=all_reduce_sum if d.enabled else None)
            if iteration == 0:  # before the policy moves: the critic's constant offset removed
                rollout, targets = _remove_critic_offset(roles, rollout, targets, kl_coef, d, log)
            # The whole batch (every rank's episodes, without the trunk's hidden states) for the
            # minibatches' token counts and the metrics: the same on every rank.
            whole = _gather(rollout, targets, roles.tokenizer.pad_token_id) if d.enabled else (rollout, targets)

            # 5. Update: epochs × minibatches, one optimiser step each: the PPO losses, then
            # 6. (PPO-ptx) the pretraining loss, into the same gradients. The minibatches are the
            #    whole batch's; each rank trains on its episodes of them.
            t0 = device_time(device)
            ptx_slices, pos.ptx = _ptx_slices(pretrain, roles.tokenizer, pos.ptx, cfg)
            steps: list[dict[str, float]] = []
            for _epoch in range(cfg.ppo_epochs):
                order = torch.randperm(cfg.batch_size, generator=run.opt.minibatch_rng)
                for m, s in enumerate(range(0, cfg.batch_size, cfg.mini_batch_size)):
                    picked = order[s : s + cfg.mini_batch_size]
                    local = [int(i) - my_episodes.start for i in picked if int(i) in my_episodes]
                    episodes = rollout.select(local or [0])  # (none here: a filler)
                    n_tokens = int(whole[0].response_mask[picked].sum())
                    stats = ppo_step(
                        roles, episodes, targets.select(local or [0], episodes.response_ids.shape[1]), ptx_slices[m],
                        n_tokens=n_tokens, filler=not local,
                    )  # fmt: skip
                    steps.append(run.apply_step(stats, iteration))
            run.opt.policy_sched.step()
            run.opt.value_sched.step()
            t_update = device_time(device) - t0

            # 7. Log, adapt β, sample the fixed prompts, checkpoint.
            pos.episodes += cfg.batch_size
            pos.iteration = iteration + 1
            times = (rollout_time, t_update, device_time(device) - t_start)
            record = _iteration_record(*whole, steps, cfg, pos.iteration, pos.episodes, kl_coef, lrs, times)
            kl_ctl.update(record["kl"], cfg.batch_size)
            logger.log(record)
            bar.update(task, advance=1, stats=_progress(record))
            run.after_iteration(pos.iteration, pos)
            iterations_this_process += 1
            if iterations_this_process == stop_after_iterations:
                logger.close()
                raise StopAfter(f"ppo: stopped after {stop_after_iterations} iterations (stop_after_iterations)")
    logger.close()
    return run.export(log)


def _process_group(cfg: PPOConfig, log: Callable[[str], None]) -> tuple[Dist, Callable[[str], None]]:
    """The validated config's data-parallel group (one process when not launched as one), and
    ``log`` for rank 0 only."""
    cfg.validate()
    d = init_from_env(cfg.policy.device)
    if d.enabled and cfg.policy.parallel == "fsdp":
        raise ValueError(
            "ppo.policy.parallel = 'fsdp' is not supported: sampling runs a different number of "
            "forwards on each rank, which sharded weights cannot; use 'ddp' (with policy.lora or "
            "policy.trainable_layers to fit a device)"
        )
    n_prompts = cfg.batch_size // cfg.samples_per_prompt
    if n_prompts < d.world_size:
        raise ValueError(
            f"ppo: {n_prompts} prompts per batch (batch_size / samples_per_prompt) cannot be shared by "
            f"{d.world_size} ranks: raise batch_size to at least {d.world_size * cfg.samples_per_prompt}"
        )
    return d, main_only(log, d)


def _plan(
    cfg: PPOConfig, n_prompts: int, kl_ctl: AdaptiveKLController | FixedKLController, d: Dist, roles: PPORoles
) -> str:
    """The run's shape in one log line."""
    parallel = roles.policy_par.strategy if roles.policy_par is not None else "none"
    return (
        f"ppo: {n_prompts} prompts, {cfg.iterations} iterations of {cfg.batch_size} episodes "
        f"({cfg.samples_per_prompt} per prompt, score baseline {cfg.score_baseline}; "
        f"minibatch {cfg.mini_batch_size}, {cfg.ppo_epochs} epoch(s)); "
        f"ptx: {cfg.ptx_per_minibatch} examples per minibatch × γ={cfg.ptx_coef}; "
        f"KL penalty {cfg.kl_estimator}, β={kl_ctl.value:g} ({type(kl_ctl).__name__})"
        + (f"; {d.world_size} data-parallel ranks ({parallel})" if d.enabled else "")
    )


def _remove_critic_offset(
    roles: PPORoles, rollout: Rollout, targets: Targets, kl_coef: float, d: Dist, log: Callable[[str], None]
) -> tuple[Rollout, Targets]:
    """The first rollout with the value model's constant offset removed, and its targets.

    The critic starts from the RM, which was trained to score at EOS; PPO reads it at the
    response's positions before EOS, where its level differs from the returns by the same sign in
    every episode (a demo run: value mean -2.62 against return mean -1.52). The value model's
    output bias is shifted by ``c`` so that the token mean of ``V + c`` equals that of the
    returns computed from ``V + c`` (GAE's returns are affine in a constant shift of the values,
    so two evaluations give ``c`` exactly); means over every rank's tokens. Logged.
    """
    cfg, mask = roles.cfg, rollout.response_mask.bool()
    all_reduce = all_reduce_sum if d.enabled else None

    def shifted(c: float) -> Rollout:
        return dataclasses.replace(rollout, values=torch.where(mask, rollout.values + c, 0.0))

    def mean(x: torch.Tensor) -> float:
        sums = torch.stack([torch.where(mask, x, 0.0).sum(), mask.sum().to(x.dtype)]).double()
        total, count = (all_reduce(sums) if all_reduce is not None else sums).tolist()
        return total / max(count, 1.0)

    gap0 = mean(targets.returns - rollout.values)
    gap1 = mean(compute_targets(shifted(1.0), cfg, kl_coef, all_reduce).returns - shifted(1.0).values)
    c = gap0 / (gap0 - gap1) if gap0 != gap1 else gap0
    set_reward_normalization(
        roles.value_model, gain=reward_gain(roles.value_model), bias=reward_bias(roles.value_model) + c
    )
    rollout = shifted(c)
    targets = compute_targets(rollout, cfg, kl_coef, all_reduce)
    log(
        f"ppo: the critic's offset at iteration 1: |value mean - return mean| {abs(gap0):.3f}; its output bias "
        f"shifted by {c:+.3f} before the first update: now {abs(mean(targets.returns - rollout.values)):.2e}"
    )
    return rollout, targets


def _check_scores(rollout: Rollout, d: Dist, iteration: int, out: Path) -> None:
    """Stop before anything is trained on a non-finite score (on any rank)."""
    if not bool(all_reduce_sum(torch.isfinite(rollout.scores).all().long()) == d.world_size):
        raise FloatingPointError(
            f"ppo: the reward gave non-finite scores at iteration {iteration + 1}; {last_good_state(out / 'state')}"
        )


def _gather(rollout: Rollout, targets: Targets, pad_token_id: int) -> tuple[Rollout, Targets]:
    """Every rank's episodes in rank order (so in batch order), on this rank's device, without
    the trunk's hidden states (only this rank's update reads those)."""
    device = rollout.response_ids.device
    mine = (_moved(dataclasses.replace(rollout, trunk_hidden=None), "cpu"), _moved(targets, "cpu"))
    parts = all_gather_object(mine)
    whole = Rollout.cat([p[0] for p in parts], pad_token_id), Targets.cat([p[1] for p in parts])
    return _moved(whole[0], device), _moved(whole[1], device)


def _moved(record: Any, device: torch.device | str) -> Any:
    """A copy of a frozen record of tensors (and Nones) with every tensor on ``device``."""
    moved = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    return dataclasses.replace(record, **{k: None if v is None else v.to(device) for k, v in moved.items()})


@dataclass
class _Optimisation:
    """Both optimisers and schedules, the KL controller, the EMA and the minibatch order: what an
    optimiser step moves and a checkpoint keeps besides the weights."""

    policy_opt: torch.optim.Optimizer
    value_opt: torch.optim.Optimizer
    policy_sched: Any
    value_sched: Any
    kl_ctl: AdaptiveKLController | FixedKLController
    ema: EMA | None
    minibatch_rng: torch.Generator  # the minibatch order: the whole batch's, the same on every rank

    @classmethod
    def build(cls, cfg: PPOConfig, roles: PPORoles) -> _Optimisation:
        policy_opt = build_optimizer(roles.policy.parameters(), cfg.optim)
        value_opt = build_optimizer(roles.value_model.parameters(), cfg.value_optim)
        # The schedules advance once per iteration: the paper's warmup is "10 iterations".
        policy_sched = build_scheduler(policy_opt, cfg.optim, cfg.iterations)
        value_sched = build_scheduler(value_opt, cfg.value_optim, cfg.iterations)
        kl_ctl: AdaptiveKLController | FixedKLController = (
            AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
            if cfg.adaptive_kl
            else FixedKLController(cfg.kl_coef)
        )
        ema = EMA(roles.policy, cfg.ema_decay) if cfg.ema_decay else None
        minibatch_rng = torch.Generator().manual_seed(cfg.seed + 1)  # CPU: it drives randperm there
        return cls(policy_opt, value_opt, policy_sched, value_sched, kl_ctl, ema, minibatch_rng)

    def stateful(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "policy_optimizer": self.policy_opt,
            "value_optimizer": self.value_opt,
            "policy_scheduler": self.policy_sched,
            "value_scheduler": self.value_sched,
            "kl_controller": self.kl_ctl,
        }
        if self.ema is not None:
            out["ema"] = self.ema
        return out

    def lrs(self) -> tuple[float, float]:
        """The policy's and the value model's learning rates now."""
        return float(self.policy_sched.get_last_lr()[0]), float(self.value_sched.get_last_lr()[0])


@dataclass
class _Position:
    """Where the run is: what a checkpoint's counters hold."""

    iteration: int = 0  # iterations done
    episodes: int = 0
    prompts: tuple[int, int] = (0, 0)  # (epoch, index) in the prompts' permutations
    ptx: tuple[int, int] = (0, 0)  # likewise in the pretraining corpus


@dataclass
class _Run:
    """One PPO run's set-up: the roles, the optimisation state and the run directory, with what
    the loop does to them besides the algorithm (apply a step, checkpoint, sample, resume)."""

    cfg: PPOConfig
    roles: PPORoles
    opt: _Optimisation
    d: Dist
    out: Path
    sample_prompts: list[str]

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.roles.policy, "value_model": self.roles.value_model}

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def samples_path(self) -> Path:
        return self.out / "samples.jsonl"

    def apply_step(self, stats: dict[str, float], iteration: int) -> dict[str, float]:
        """Clip the gradients ``ppo_step`` left, step both optimisers (and the EMA); checked finite."""
        cfg, roles, opt = self.cfg, self.roles, self.opt
        stats["grad_norm"] = clip_grad(roles.policy.parameters(), cfg.optim.max_grad_norm)
        stats["value_grad_norm"] = clip_grad(roles.value_model.parameters(), cfg.value_optim.max_grad_norm)
        bad = [k for k, v in stats.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(
                f"ppo: non-finite {', '.join(bad)} at iteration {iteration + 1}; "
                f"nothing was applied; {last_good_state(self.out / 'state')}"
            )
        opt.policy_opt.step()
        assert roles.sampler is not None
        roles.sampler.sync()
        opt.value_opt.step()
        bad = non_finite_weights(self.models)
        if bad:
            raise FloatingPointError(
                f"ppo: the update at iteration {iteration + 1} made {len(bad)} weight tensors "
                f"non-finite (e.g. {bad[0]}); {last_good_state(self.out / 'state')}"
            )
        opt.policy_opt.zero_grad(set_to_none=True)
        opt.value_opt.zero_grad(set_to_none=True)
        if opt.ema is not None:
            opt.ema.update(roles.policy)
        return stats

    def write_samples(self, step: int) -> None:
        """Fixed prompts, a fixed seed: successive entries differ only by the policy."""
        roles = self.roles
        rng = torch.Generator(device=roles.device).manual_seed(self.cfg.seed)
        gen = roles.sample(self.sample_prompts, rng, keep_trunk=False)
        texts = decode_responses(roles.tokenizer, gen)
        with roles.precision:
            scores = episode_scores(gen, self.sample_prompts, texts, roles.reward, self.cfg.missing_eos_penalty)
        with open(self.samples_path, "a", encoding="utf-8") as fh:
            for p, t, s, f in zip(self.sample_prompts, texts, scores.tolist(), gen.finished.tolist(), strict=True):
                record = {"step": step, "prompt": p, "response": t, "score": s, "finished": f}
                fh.write(json.dumps(record) + "\n")

    def checkpoint(self, pos: _Position) -> None:
        counters = {
            "iteration": pos.iteration,
            "episodes": pos.episodes,
            "prompt_position": pos.prompts,
            "ptx_position": pos.ptx,
            "kl_coef": self.opt.kl_ctl.value,
            "value_bias": reward_bias(self.roles.value_model),  # shifted at iteration 1 (not a weight)
            "world_size": self.d.world_size,
        }
        rngs = gather_rng_states(rng_state())  # every rank's stream (a collective: all ranks call it)
        if self.d.is_main:
            generators = {"minibatch": self.opt.minibatch_rng}
            save_state(self.out / "state", self.models, self.opt.stateful(), counters, generators, rng_states=rngs)

    def resume(self, log: Callable[[str], None]) -> _Position:
        """The position of the last state, loaded (rank 0 finds it and removes a killed save's
        leftovers, every rank loads that one); a fresh start writes the step-0 samples."""
        cfg, d = self.cfg, self.d
        state_dir = broadcast_object(find_state(self.out / "state") if d.is_main else None)
        if d.is_main:  # a kill while a policy was being saved (iter-N/, policy/) left its temporary folder
            remove_partial_dirs(self.out)
        if state_dir is None:
            if d.is_main:
                for path in (self.metrics_path, self.samples_path):
                    path.unlink(missing_ok=True)
                if self.sample_prompts and cfg.sample_every:
                    self.write_samples(0)
            return _Position()
        generators = {"minibatch": self.opt.minibatch_rng}
        counters = load_state(state_dir, self.models, self.opt.stateful(), generators, rank=d.rank)
        assert self.roles.sampler is not None
        self.roles.sampler.sync()
        if "value_bias" in counters:
            value_model = self.roles.value_model
            set_reward_normalization(value_model, gain=reward_gain(value_model), bias=counters["value_bias"])
        (p_epoch, p_index), (x_epoch, x_index) = counters["prompt_position"], counters["ptx_position"]
        pos = _Position(counters["iteration"], counters["episodes"], (p_epoch, p_index), (x_epoch, x_index))
        if d.is_main:
            truncate_metrics(self.metrics_path, pos.iteration)
            truncate_metrics(self.samples_path, pos.iteration)
        if pos.iteration < cfg.iterations:
            log(f"ppo: resuming at iteration {pos.iteration + 1}/{cfg.iterations} from {state_dir}")
        else:
            log(f"ppo: all {cfg.iterations} iterations are done ({state_dir}); exporting the models")
        return pos

    def after_iteration(self, done: int, pos: _Position) -> None:
        """Step 7's files: the fixed prompts' samples, the policy kept every N, the checkpoint."""
        cfg, d = self.cfg, self.d
        last = done == cfg.iterations
        if d.is_main and self.sample_prompts and cfg.sample_every and (done % cfg.sample_every == 0 or last):
            self.write_samples(done)
        if d.is_main and cfg.keep_policy_every and done % cfg.keep_policy_every == 0:
            with self.ema_weights():
                save_model(self.roles.policy, self.roles.tokenizer, self.out / f"iter-{done}")
        if done % cfg.save_every == 0 or last:
            self.checkpoint(pos)

    def ema_weights(self) -> contextlib.AbstractContextManager:
        """The policy with its EMA weights in place (when enabled) for the duration."""
        ema = self.opt.ema
        return ema.applied(self.roles.policy) if ema is not None else contextlib.nullcontext()

    def export(self, log: Callable[[str], None]) -> PPOResult:
        """The policy (EMA weights when enabled) and the value model, as HF directories."""
        if not self.d.is_main:  # rank 0 exports and returns; the others return what it did
            return cast(PPOResult, broadcast_object(None))
        roles = self.roles
        with self.ema_weights():
            policy_dir = save_model(roles.policy, roles.tokenizer, self.out / "policy")
        value_dir = save_scalar_model(roles.value_model, roles.tokenizer, self.out / "value")
        log(f"ppo: done; policy: {policy_dir}, value model: {value_dir}")
        return broadcast_object(PPOResult(policy_dir, value_dir, self.cfg.iterations, read_metrics(self.metrics_path)))


def _iteration_record(
    rollout: Rollout,
    targets: Targets,
    steps: list[dict[str, float]],
    cfg: PPOConfig,
    step: int,
    episodes: int,
    kl_coef: float,
    lrs: tuple[float, float],
    times: tuple[RolloutTime, float, float],
) -> dict[str, Any]:
    """One iteration's line of metrics.jsonl: rollout statistics (per episode), update statistics
    (means over the optimiser steps), the counters, and where the time went.

    ``lrs`` are the policy's and the value model's learning rates; ``times`` the rollout's,
    the update's and the whole iteration's, in seconds.
    """
    rollout_time, update_time, total_time = times
    mask = rollout.response_mask.bool()
    gap = torch.where(mask, (rollout.sample_logprobs - rollout.logprobs).abs(), 0.0)
    record: dict[str, Any] = {
        # The score includes the missing-EOS penalty: it is what the policy is optimised for.
        "score": float(rollout.scores.mean()),
        "score_std": float(rollout.scores.std()) if rollout.batch_size > 1 else 0.0,
        # Sums over the response: the sequence-level quantities of InstructGPT eq. (2).
        "non_score_reward": float(targets.non_score_rewards.sum(1).mean()),
        "reward_total": float(targets.rewards.sum(1).mean()),
        "kl": float(targets.kl.sum(1).mean()),
        "entropy": float(masked_mean(rollout.entropy, mask)),
        "response_length": float(rollout.response_mask.sum(1).float().mean()),
        "eos_rate": float(rollout.finished.float().mean()),
        "value_mean": float(masked_mean(rollout.values, mask)),
        "return_mean": float(masked_mean(targets.returns, mask)),
        # Sampling-time vs recomputed log-probs: ~1e-6 unless the two distributions differ.
        "logprob_gap": float(gap.max()),
    }
    for key in dict.fromkeys(k for s in steps for k in s):
        values = [s[key] for s in steps if key in s]
        record[key] = sum(values) / len(values)
    for key in ("ptx_loss", "ptx_grad_ratio", "ppo_grad_norm", "ptx_grad_norm"):
        record.setdefault(key, None)
    n_generated = rollout.n_tokens
    record |= {
        "step": step,
        "episodes": episodes,
        "kl_coef": kl_coef,
        "kl_estimator": cfg.kl_estimator,
        "lr": lrs[0],
        "value_lr": lrs[1],
        "time_generation": rollout_time.generation,
        "time_scoring": rollout_time.scoring,
        "time_update": update_time,
        "time_total": total_time,
        "tokens_per_s": n_generated / total_time,
        "generation_tokens_per_s": n_generated / max(rollout_time.generation, 1e-9),
        "episodes_per_s": cfg.batch_size / total_time,
    }
    return record


def _progress(record: dict[str, Any]) -> str:
    """The progress bar's summary of an iteration."""
    return (
        f"score {record['score']:.3f} · kl {record['kl']:.3f} · "
        f"len {record['response_length']:.1f} · {record['tokens_per_s']:,.0f} tok/s"
    )
