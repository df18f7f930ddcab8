"""Stage 3: PPO and PPO-ptx against the reward model (InstructGPT §3.5, eq. 2).

Read top to bottom. Load the four roles (policy and frozen reference from the SFT checkpoint,
the frozen reward model, a value model initialised from the RM) → resume → per iteration:

1. rollout: one response per prompt, sampled with the KV cache at temperature T, then scored
   by the policy, the reference, the value model and the reward model (dropout off everywhere);
2. rewards: −β·KL(π || π_SFT) per token, the RM score added at the last response token;
3. advantages: GAE(γ, λ), whitened over the batch;
4. update: epochs × minibatches; each optimiser step accumulates the clipped policy and value
   losses of its micro-batches and then (PPO-ptx) the pretraining LM loss scaled by γ;
5. log, sample the fixed prompts, checkpoint.

The policy stays in eval mode throughout, training included: dropout in RL would make the
log-probs of the update differ from those of the rollout for no reason (the ratio would not
start at 1, and the KL estimate would be biased); gradients flow the same.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.checkpoint import (
    StopAfter,
    epoch_order,
    find_state,
    last_good_state,
    load_state,
    non_finite_weights,
    rng_state,
    save_state,
    truncate_metrics,
)
from tether.config import PPOConfig, save_config
from tether.data.formats import read_records
from tether.data.task import default_splits
from tether.distributed import (
    ParallelModel,
    all_gather_object,
    all_reduce_sum,
    as_parallel,
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
from tether.models.generation import Sampler, decode_responses, row_generators
from tether.models.heads import load_scalar_model, save_scalar_model
from tether.models.lm_batch import (
    SFTExample,
    collate,
    count_target_tokens,
    encode_pretrain,
    forward_logits,
    target_tokens,
)
from tether.models.loading import (
    autocast,
    autocast_dtype,
    fast_bf16,
    load_causal_lm,
    remove_partial_dirs,
    save_model,
)
from tether.models.trunk import SharedTrunk, backbone
from tether.ops import lm_loss, masked_mean
from tether.optim import build_optimizer, build_scheduler, clip_grad
from tether.ppo.advantages import gae, leave_one_out, whiten_advantages
from tether.ppo.kl import AdaptiveKLController, FixedKLController, compute_rewards
from tether.ppo.loss import policy_loss, value_loss
from tether.ppo.rollout import (
    RewardFn,
    Rollout,
    RolloutTime,
    collect_rollout,
    device_time,
    episode_scores,
    response_logprobs,
    response_values,
    sample_responses,
    sampling_trunk,
)
from tether.sft.data import load_pretrain

__all__ = ["EMA", "PPOResult", "add_advantages", "check_same_tokenizer", "take_cyclic", "train_ppo"]


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


def check_same_tokenizer(policy_tok: PreTrainedTokenizerBase, other_tok: PreTrainedTokenizerBase, what: str) -> None:
    """Raise unless ``other_tok`` has the policy's vocabulary and special tokens.

    PPO feeds the sampled token ids straight to the reward and value models; a different
    tokenizer would read them as other words, and score text the policy never wrote.
    """
    problems = []
    if policy_tok.get_vocab() != other_tok.get_vocab():
        problems.append(f"vocabularies differ ({len(policy_tok)} vs {len(other_tok)} tokens)")
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        a, b = getattr(policy_tok, name), getattr(other_tok, name)
        if a != b:
            problems.append(f"{name} {a} vs {b}")
    if problems:
        raise ValueError(
            f"the {what}'s tokenizer differs from the policy's: {'; '.join(problems)}. PPO scores "
            "the policy's token ids directly, so both must share one tokenizer (train the reward "
            "model from the same SFT model)."
        )


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


def _load_models(
    cfg: PPOConfig, reward_fn: RewardFn | None, log: Callable[[str], None]
) -> tuple[
    PreTrainedModel, PreTrainedModel | None, PreTrainedModel, PreTrainedModel | RewardFn, PreTrainedTokenizerBase
]:
    """(policy, ref_policy or None, value_model, reward, tokenizer), on cfg.policy.device."""
    policy, tokenizer = load_causal_lm(cfg.policy, trainable=True)
    if cfg.policy.residual_dropout > 0:
        log(
            f"ppo: policy.residual_dropout={cfg.policy.residual_dropout} has no effect: every "
            "model runs in eval mode (dropout off) in RL"
        )
    # The reference is a frozen copy of the initial policy; under LoRA it is the same network
    # with its adapters disabled (no second copy).
    ref_policy = None
    if not cfg.policy.lora.enabled:
        ref_policy = copy.deepcopy(policy).requires_grad_(False)
    if reward_fn is not None:
        reward: PreTrainedModel | RewardFn = reward_fn
    elif cfg.reward_model:
        reward, rm_tokenizer = load_scalar_model(cfg.reward_model)
        check_same_tokenizer(tokenizer, rm_tokenizer, "reward model")
    else:
        raise ValueError("ppo needs reward_model (a reward model directory) or a reward function")
    value_init = cfg.value_model or cfg.reward_model or cfg.policy.name_or_path
    if not (cfg.value_model or cfg.reward_model):
        log(
            "ppo: no reward model to initialise the value model from; using the policy "
            "checkpoint with a fresh scalar head"
        )
    # The value model is trained like the policy (dtype, device, LoRA, trainable layers).
    value_cfg = dataclasses.replace(cfg.policy, name_or_path=value_init)
    value_model, value_tokenizer = load_scalar_model(value_cfg, trainable=True)
    check_same_tokenizer(tokenizer, value_tokenizer, "value model")
    device = next(policy.parameters()).device
    for model in (policy, ref_policy, value_model, reward):
        if isinstance(model, torch.nn.Module):
            model.to(device).eval()
    return policy, ref_policy, value_model, reward, tokenizer


# The stats every ppo_step returns (summed over the ranks key by key, so every rank has them all).
PPO_STEP_STATS = ("policy_loss", "value_loss", "policy_clipfrac", "approx_kl", "value_clipfrac", "value_error")


def ppo_step(
    policy: PreTrainedModel | ParallelModel,
    value_model: PreTrainedModel | ParallelModel,
    minibatch: Rollout,
    ptx: Sequence[SFTExample],
    cfg: PPOConfig,
    pad_token_id: int,
    precision: contextlib.AbstractContextManager | None = None,
    trunk: SharedTrunk | None = None,
    *,
    n_tokens: int | None = None,
    filler: bool = False,
    complete: Callable[[Rollout, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """Gradients of one optimiser step (the caller clips and steps); returns its stats.

    The PPO losses are token means over the whole minibatch: each micro-batch's loss is weighted
    by its share of the minibatch's response tokens, so the gradient does not depend on
    micro_batch_size. Then, in consecutive passes into the same gradients (PPO-ptx, InstructGPT
    §3.5), ``ptx_coef`` × the LM loss of the pretraining examples, a token mean likewise. With a
    ``trunk`` (and the rollout's ``trunk_hidden``) the policy and value forwards run only their own
    blocks on the kept output of the shared frozen ones: the same computation.

    Data parallel (:class:`ParallelModel` models): ``minibatch`` holds this rank's episodes of the
    minibatch and ``n_tokens`` the response tokens of the whole minibatch (every rank's); a rank
    with none passes one episode as a ``filler`` (weight 0: it only joins the all-reduce). The
    pretraining examples ``ptx`` are the minibatch's (every rank's): each rank takes its share.
    The returned stats are the whole minibatch's on every rank.

    ``complete(micro, logprobs, values, entropy)``: the minibatch is the rollout's whole batch in one
    micro-batch whose old log-probs and values were not scored (``PPOConfig.fuse_first_forward``);
    this first forward runs at the rollout's weights, so its detached outputs are those, and
    ``complete`` fills them into ``micro`` with the rewards and advantages before the losses.
    """
    policy, value_model = as_parallel(policy), as_parallel(value_model)
    d = policy.dist
    device = next(policy.module.parameters()).device
    precision = precision or contextlib.nullcontext()
    totals: dict[str, float] = dict.fromkeys(PPO_STEP_STATS, 0.0)

    def add(name: str, value: torch.Tensor | float, weight: float) -> None:
        totals[name] = totals.get(name, 0.0) + float(value) * weight

    n_tokens = minibatch.n_tokens if n_tokens is None else n_tokens
    n_episodes = minibatch.batch_size
    for start in range(0, n_episodes, cfg.micro_batch_size):
        micro = minibatch.select(range(start, min(start + cfg.micro_batch_size, n_episodes)))
        weight = 0.0 if filler else micro.n_tokens / n_tokens
        inputs = (micro.query_ids, micro.query_mask, micro.response_ids, micro.response_mask)
        shared: dict[str, Any] = {"trunk": trunk, "hidden": micro.trunk_hidden}
        # The step's last PPO micro-batch all-reduces both models' gradients. With ptx the
        # policy's is all-reduced again after the ptx passes: the mean over the ranks of (the
        # reduced PPO gradient, equal everywhere, + each rank's ptx part × world_size) is the sum.
        last = start + cfg.micro_batch_size >= n_episodes
        with policy.sync(last), value_model.sync(last):
            with precision:
                logprobs, entropy = policy.run(
                    response_logprobs, *inputs, cfg.temperature, with_entropy=complete is not None, **shared
                )
                values = value_model.run(response_values, *inputs, **shared)
            if complete is not None:
                assert entropy is not None and micro.batch_size == n_episodes
                complete(micro, logprobs.detach(), values.detach(), entropy)
            pg_loss, pg_stats = policy_loss(
                logprobs, micro.logprobs, micro.advantages, micro.response_mask, cfg.cliprange
            )
            vf_loss, vf_stats = value_loss(
                values, micro.values, micro.returns, micro.response_mask, cfg.cliprange_value
            )
            # Separate networks and optimisers: one backward fills both sets of gradients
            # (× world_size: DDP averages over the ranks, the token mean wants their sum).
            ((pg_loss + vf_loss) * (weight * d.world_size)).backward()
        add("policy_loss", pg_loss.detach(), weight)
        add("value_loss", vf_loss.detach(), weight)
        add("policy_clipfrac", pg_stats["clipfrac"], weight)
        add("approx_kl", pg_stats["approx_kl"], weight)
        add("value_clipfrac", vf_stats["vf_clipfrac"], weight)
        add("value_error", vf_stats["value_error"], weight)

    if ptx:
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
                loss = lm_loss(policy.run(forward_logits, b, precision), b["labels"].to(device))
                weight = count_target_tokens(b["labels"]) / max(n_targets, 1) if real else 0.0
                (cfg.ptx_coef * weight * d.world_size * loss).backward()
            add("ptx_loss", loss.detach(), weight)
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
    return sum_dict(totals)


def add_advantages(
    rollout: Rollout,
    cfg: PPOConfig,
    kl_coef: float,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Steps 2 and 3 of an iteration, in place: the per-token rewards (−β·KL, the score at the
    last real token, less the other responses' mean score with a leave-one-out baseline), then
    GAE(γ, λ) advantages and returns, the advantages whitened over the batch (``all_reduce``
    sums the whitening statistics over the ranks of a data-parallel run)."""
    scores = rollout.scores
    if cfg.score_baseline == "leave_one_out":
        scores = leave_one_out(scores, cfg.samples_per_prompt)
    rollout.rewards, rollout.non_score_rewards, rollout.kl = compute_rewards(
        scores, rollout.logprobs, rollout.ref_logprobs, rollout.response_mask, kl_coef, cfg.kl_estimator
    )
    rollout.advantages, rollout.returns = gae(
        rollout.rewards, rollout.values, rollout.response_mask, cfg.gamma, cfg.lam
    )
    if cfg.whiten_advantages:
        rollout.advantages = whiten_advantages(rollout.advantages, rollout.response_mask, all_reduce=all_reduce)


def _complete_batch(
    completed: list[Rollout],
    cfg: PPOConfig,
    kl_coef: float,
    batch: Rollout,
    logprobs: torch.Tensor,
    values: torch.Tensor,
    entropy: torch.Tensor,
) -> None:
    """``ppo_step``'s ``complete`` for a fused first forward: the batch's old log-probs, values and
    entropy from it, then steps 2-3 (:func:`add_advantages`); the batch goes into ``completed``."""
    batch.logprobs, batch.values, batch.entropy = logprobs, values, entropy
    add_advantages(batch, cfg, kl_coef)
    completed.append(batch)


def sampling_dtype(cfg: PPOConfig, device: torch.device) -> str | None:
    """What the rollouts' :class:`Sampler` gets for ``cfg.rollout_dtype``.

    'auto' becomes None (the policy itself, under its autocast) when the policy already runs
    under a bfloat16 autocast on hardware with native bf16: its frozen weights' casts are cached
    (:mod:`tether.models.precision`), so a bf16 copy would be no faster, would cost memory and
    a sync after every step, and would keep sampling from handing the shared trunk's output to
    scoring. Otherwise ``cfg.rollout_dtype`` as it is.
    """
    if cfg.rollout_dtype == "auto" and autocast_dtype(cfg.policy, device) == "bfloat16" and fast_bf16(device):
        return None
    return cfg.rollout_dtype


def _share_trunk(cfg: PPOConfig, models: Sequence[Any], log: Callable[[str], None]) -> SharedTrunk | None:
    """The frozen bottom blocks the roles share bit for bit (``cfg.share_trunk``), or None."""
    if not cfg.share_trunk:
        return None
    roles = [m for m in models if isinstance(m, torch.nn.Module)]
    trunk = SharedTrunk.detect(roles)
    # (Only a shared trunk implies a `.layers` list: GPT-2 keeps its blocks in `.h`.)
    log(
        f"ppo: the {len(roles)} models share {trunk.depth} of {len(backbone(roles[0]).layers)} blocks "
        "bit for bit (frozen): computed once per batch"
        if trunk
        else "ppo: the models share no frozen block; each runs whole"
    )
    return trunk


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
    cfg.validate()
    d = init_from_env(cfg.policy.device)
    log = main_only(log, d)
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
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if d.is_main:
        save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    # 0. The data (validated before any model loads), the roles, the optimisers, the KL
    #    controller and the EMA.
    prompts = load_prompts(cfg.prompts_file)
    # Plain PPO (γ = 0) computes no pretraining loss at all: it would add nothing to the gradient.
    pretrain = load_pretrain_texts(cfg.pretrain_file) if cfg.ptx_coef > 0 and cfg.ptx_per_minibatch > 0 else []
    policy, ref_policy, value_model, reward, tokenizer = _load_models(cfg, reward_fn, log)
    device = next(policy.parameters()).device
    trunk = _share_trunk(cfg, (policy, ref_policy, value_model, reward), log)
    seed_rank(cfg.seed, d)  # every rank built the same models; from here each has its own stream
    # Every forward with a gradient goes through these (DDP sees it); sampling and scoring use
    # the models themselves. The shared trunk is frozen: DDP has nothing of it to reduce.
    policy_par = ParallelModel(policy, cfg.policy.parallel, d)
    value_par = ParallelModel(value_model, cfg.policy.parallel, d)
    # Rollouts sample from `sampler`: the policy itself, or an inference copy of it in
    # cfg.rollout_dtype, synced after every optimiser step (old log-probs still come from the policy).
    sampler = Sampler(policy, sampling_dtype(cfg, device), compile=cfg.rollout_compile)
    # Sampling, scoring and the update all run under the same precision, so the rollout's
    # log-probs and the update's describe the same distribution.
    precision = autocast(cfg.policy, device)
    if trunk is not None:
        with precision:  # asked of torch, as collect_rollout asks it
            under_autocast = torch.is_autocast_enabled(device.type)
        kept = sampling_trunk(sampler, trunk, under_autocast) is not None
        why = "off"
        if sampler.is_copy:
            why = "a low-precision copy"
        elif sampler.compiled:
            why = "compiled decode"
        elif under_autocast and sampler.dtype is not None:
            why = f"sampled in {sampler.dtype}, scored under autocast"
        log(
            "ppo: sampling keeps the shared blocks' output for scoring (no second pass through them)"
            if kept
            else f"ppo: the shared blocks run again in scoring (sampling keeps no output of theirs: {why})"
        )
    # One minibatch of one micro-batch: the update's first forward is the rollout's scoring forward
    # of the policy and the value model (same weights, same episodes), so it is done only there.
    fuse_first = (
        cfg.fuse_first_forward and cfg.batch_size == cfg.mini_batch_size == cfg.micro_batch_size and not d.enabled
    )
    if fuse_first:
        log("ppo: old log-probs and values from the update's first forward (one minibatch of one micro-batch)")
    pad = tokenizer.pad_token_id
    sample_prompts = prompts[: cfg.n_sample_prompts]
    policy_opt = build_optimizer(policy.parameters(), cfg.optim)
    value_opt = build_optimizer(value_model.parameters(), cfg.value_optim)
    # The schedules advance once per iteration: the paper's warmup is "10 iterations".
    policy_sched = build_scheduler(policy_opt, cfg.optim, cfg.iterations)
    value_sched = build_scheduler(value_opt, cfg.value_optim, cfg.iterations)
    if cfg.adaptive_kl:
        kl_ctl: Any = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    else:
        kl_ctl = FixedKLController(cfg.kl_coef)
    ema = EMA(policy, cfg.ema_decay) if cfg.ema_decay else None
    # The minibatch order is the whole batch's, the same on every rank. CPU: drives randperm there.
    minibatch_rng = torch.Generator().manual_seed(cfg.seed + 1)
    models = {"policy": policy, "value_model": value_model}
    stateful: dict[str, Any] = {
        "policy_optimizer": policy_opt,
        "value_optimizer": value_opt,
        "policy_scheduler": policy_sched,
        "value_scheduler": value_sched,
        "kl_controller": kl_ctl,
    }
    if ema is not None:
        stateful["ema"] = ema
    generators = {"minibatch": minibatch_rng}
    metrics_path, samples_path = out / "metrics.jsonl", out / "samples.jsonl"

    def write_samples(step: int) -> None:
        # Fixed prompts, a fixed seed: successive entries differ only by the policy.
        rng = torch.Generator(device=device).manual_seed(cfg.seed)
        with precision:
            gen = sample_responses(sampler, tokenizer, sample_prompts, cfg, rng)
            texts = decode_responses(tokenizer, gen)
            scores = episode_scores(gen, sample_prompts, texts, reward, cfg.missing_eos_penalty)
        with open(samples_path, "a", encoding="utf-8") as fh:
            for p, t, s, f in zip(sample_prompts, texts, scores.tolist(), gen.finished.tolist(), strict=True):
                record = {"step": step, "prompt": p, "response": t, "score": s, "finished": f}
                fh.write(json.dumps(record) + "\n")

    def checkpoint(iteration: int, episodes: int, prompt_pos: tuple[int, int], ptx_pos: tuple[int, int]) -> None:
        counters = {
            "iteration": iteration,
            "episodes": episodes,
            "prompt_position": prompt_pos,
            "ptx_position": ptx_pos,
            "kl_coef": kl_ctl.value,
            "world_size": d.world_size,
        }
        rngs = gather_rng_states(rng_state())  # every rank's stream (a collective: all ranks call it)
        if d.is_main:
            save_state(out / "state", models, stateful, counters, generators, rng_states=rngs)

    def apply_step(stats: dict[str, float], iteration: int) -> dict[str, float]:
        """Clip the gradients ``ppo_step`` left, step both optimisers (and the EMA); checked finite."""
        stats["grad_norm"] = clip_grad(policy.parameters(), cfg.optim.max_grad_norm)
        stats["value_grad_norm"] = clip_grad(value_model.parameters(), cfg.value_optim.max_grad_norm)
        bad = [k for k, v in stats.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(
                f"ppo: non-finite {', '.join(bad)} at iteration {iteration + 1}; "
                f"nothing was applied; {last_good_state(out / 'state')}"
            )
        policy_opt.step()
        sampler.sync()
        value_opt.step()
        bad = non_finite_weights(models)
        if bad:
            raise FloatingPointError(
                f"ppo: the update at iteration {iteration + 1} made {len(bad)} weight tensors "
                f"non-finite (e.g. {bad[0]}); {last_good_state(out / 'state')}"
            )
        policy_opt.zero_grad(set_to_none=True)
        value_opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(policy)
        return stats

    # Resume from the last state, if any: rank 0 finds it (and removes a killed save's
    # leftovers), every rank loads that one.
    start, episodes, prompt_pos, ptx_pos = 0, 0, (0, 0), (0, 0)
    state_dir = broadcast_object(find_state(out / "state") if d.is_main else None)
    if d.is_main:  # a kill while a policy was being saved (iter-N/, policy/) left its temporary folder
        remove_partial_dirs(out)
    if state_dir is not None:
        counters = load_state(state_dir, models, stateful, generators, rank=d.rank)
        sampler.sync()
        start, episodes = counters["iteration"], counters["episodes"]
        (p_epoch, p_index), (x_epoch, x_index) = counters["prompt_position"], counters["ptx_position"]
        prompt_pos, ptx_pos = (p_epoch, p_index), (x_epoch, x_index)
        if d.is_main:
            truncate_metrics(metrics_path, start)
            truncate_metrics(samples_path, start)
        if start < cfg.iterations:
            log(f"ppo: resuming at iteration {start + 1}/{cfg.iterations} from {state_dir}")
        else:
            log(f"ppo: all {cfg.iterations} iterations are done ({state_dir}); exporting the models")
    elif d.is_main:
        for path in (metrics_path, samples_path):
            path.unlink(missing_ok=True)
        if sample_prompts and cfg.sample_every:
            write_samples(0)
    log(
        f"ppo: {len(prompts)} prompts, {cfg.iterations} iterations of {cfg.batch_size} episodes "
        f"({cfg.samples_per_prompt} per prompt, score baseline {cfg.score_baseline}; "
        f"minibatch {cfg.mini_batch_size}, {cfg.ppo_epochs} epoch(s)); "
        f"ptx: {cfg.ptx_per_minibatch} examples per minibatch × γ={cfg.ptx_coef}; "
        f"KL penalty {cfg.kl_estimator}, β={kl_ctl.value:g} ({type(kl_ctl).__name__})"
        + (f"; {d.world_size} data-parallel ranks ({policy_par.strategy})" if d.enabled else "")
    )
    logger = MetricsLogger(metrics_path, cfg, enabled=d.is_main)
    # This rank's share of every batch: a block of its prompts (a prompt's responses together).
    mine = shard_range(n_prompts, d)
    my_episodes = range(mine.start * cfg.samples_per_prompt, mine.stop * cfg.samples_per_prompt)

    iterations_this_process = 0
    with progress_bar("ppo", enabled=d.is_main) as bar:
        task = bar.add_task("ppo", total=cfg.iterations, completed=start, stats="")
        for iteration in range(start, cfg.iterations):
            t_start = device_time(device)
            kl_coef = kl_ctl.value
            lr, value_lr = float(policy_sched.get_last_lr()[0]), float(value_sched.get_last_lr()[0])

            # 1. Rollout: sample a response per prompt (KV cache, temperature T), then score
            #    each episode with the policy, the reference, the value and the reward model.
            #    Each rank does its share of the episodes, each episode from its own seed.
            n_per = cfg.samples_per_prompt  # each prompt's responses are consecutive episodes
            batch_idx, prompt_pos = take_cyclic(len(prompts), n_prompts, prompt_pos, cfg.seed)
            batch_prompts = [prompts[i] for i in batch_idx for _ in range(n_per)]
            rollout, rollout_time = collect_rollout(
                [batch_prompts[j] for j in my_episodes],
                sampler=sampler,
                tokenizer=tokenizer,
                policy=policy,
                ref_policy=ref_policy,
                value_model=value_model,
                reward=reward,
                cfg=cfg,
                generator=row_generators(cfg.seed, [episodes + j for j in my_episodes], device),
                precision=precision,
                trunk=trunk,
                policy_and_value=not fuse_first,
            )
            if not bool(all_reduce_sum(torch.isfinite(rollout.scores).all().long()) == d.world_size):
                raise FloatingPointError(
                    f"ppo: the reward gave non-finite scores at iteration {iteration + 1}; "
                    f"{last_good_state(out / 'state')}"
                )

            # 2. Rewards: −β·KL(π || π_SFT) per token, the score (less the other responses' mean
            #    with a leave-one-out baseline) added at the last real token.
            # 3. Advantages: GAE(γ, λ) over the response tokens, whitened over the batch (every
            #    rank's tokens: the statistics are all-reduced).
            #    (Fused: at the first update forward, which gives the old log-probs and values.)
            completed: list[Rollout] = []
            complete = functools.partial(_complete_batch, completed, cfg, kl_coef)
            if not fuse_first:
                add_advantages(rollout, cfg, kl_coef, all_reduce=all_reduce_sum if d.enabled else None)
            # The whole batch (every rank's episodes, without the trunk's hidden states) for the
            # minibatches' token counts and the metrics: the same on every rank.
            whole = _gather_rollout(rollout, pad) if d.enabled else rollout

            # 4. Update: epochs × minibatches, one optimiser step each (PPO, then ptx, gradients).
            #    The minibatches are the whole batch's; each rank trains on its episodes of them.
            t0 = device_time(device)
            ptx_slices, ptx_pos = _ptx_slices(pretrain, tokenizer, ptx_pos, cfg)
            steps: list[dict[str, float]] = []
            for epoch in range(cfg.ppo_epochs):
                order = torch.randperm(cfg.batch_size, generator=minibatch_rng)
                for m, s in enumerate(range(0, cfg.batch_size, cfg.mini_batch_size)):
                    picked = order[s : s + cfg.mini_batch_size]
                    local = [int(i) - my_episodes.start for i in picked if int(i) in my_episodes]
                    fused = fuse_first and epoch == 0
                    # (Fused: the batch in its own order; one minibatch, so the same token mean.)
                    minibatch = rollout if fused else rollout.select(local or [0])  # (none here: a filler)
                    n_tokens = int(whole.response_mask[picked].sum())
                    stats = ppo_step(
                        policy_par, value_par, minibatch, ptx_slices[m], cfg, pad, precision, trunk,
                        n_tokens=n_tokens, filler=not local, complete=complete if fused else None,
                    )  # fmt: skip
                    if fused:  # the batch with its old log-probs, values, rewards and advantages
                        rollout = whole = completed.pop()
                    steps.append(apply_step(stats, iteration))
            policy_sched.step()
            value_sched.step()
            t_update = device_time(device) - t0

            # 5. Log, adapt β, sample the fixed prompts, checkpoint.
            episodes += cfg.batch_size
            times = (rollout_time, t_update, device_time(device) - t_start)
            record = _iteration_record(whole, steps, cfg, iteration + 1, episodes, kl_coef, (lr, value_lr), times)
            kl_ctl.update(record["kl"], cfg.batch_size)
            logger.log(record)
            bar.update(task, advance=1, stats=_progress(record))
            done = iteration + 1
            last = done == cfg.iterations
            if d.is_main and sample_prompts and cfg.sample_every and (done % cfg.sample_every == 0 or last):
                write_samples(done)
            if d.is_main and cfg.keep_policy_every and done % cfg.keep_policy_every == 0:
                with ema.applied(policy) if ema is not None else contextlib.nullcontext():
                    save_model(policy, tokenizer, out / f"iter-{done}")
            if done % cfg.save_every == 0 or last:
                checkpoint(done, episodes, prompt_pos, ptx_pos)
            iterations_this_process += 1
            if iterations_this_process == stop_after_iterations:
                logger.close()
                raise StopAfter(f"ppo: stopped after {stop_after_iterations} iterations (stop_after_iterations)")
    logger.close()

    # 6. Export: the policy (EMA weights when enabled) and the value model, as HF directories.
    if not d.is_main:  # rank 0 exports and returns; the others return what it did
        return cast(PPOResult, broadcast_object(None))
    with ema.applied(policy) if ema is not None else contextlib.nullcontext():
        policy_dir = save_model(policy, tokenizer, out / "policy")
    value_dir = save_scalar_model(value_model, tokenizer, out / "value")
    log(f"ppo: done; policy: {policy_dir}, value model: {value_dir}")
    return broadcast_object(PPOResult(policy_dir, value_dir, cfg.iterations, read_metrics(metrics_path)))


def _gather_rollout(rollout: Rollout, pad_token_id: int) -> Rollout:
    """Every rank's episodes in rank order (so in batch order), on this rank's device, without
    the trunk's hidden states (only this rank's update reads those)."""
    device = rollout.response_ids.device
    mine = dataclasses.replace(rollout, trunk_hidden=None)
    on_cpu: dict[str, Any] = {f.name: _to(getattr(mine, f.name), "cpu") for f in dataclasses.fields(Rollout)}
    whole = Rollout.cat(all_gather_object(Rollout(**on_cpu)), pad_token_id)
    on_device: dict[str, Any] = {f.name: _to(getattr(whole, f.name), device) for f in dataclasses.fields(Rollout)}
    return Rollout(**on_device)


def _to(x: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    return None if x is None else x.to(device)


def _iteration_record(
    rollout: Rollout,
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
        "non_score_reward": float(rollout.non_score_rewards.sum(1).mean()),
        "reward_total": float(rollout.rewards.sum(1).mean()),
        "kl": float(rollout.kl.sum(1).mean()),
        "entropy": float(masked_mean(rollout.entropy, mask)),
        "response_length": float(rollout.response_mask.sum(1).float().mean()),
        "eos_rate": float(rollout.finished.float().mean()),
        "value_mean": float(masked_mean(rollout.values, mask)),
        "return_mean": float(masked_mean(rollout.returns, mask)),
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
