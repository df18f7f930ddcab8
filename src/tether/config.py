"""Typed configuration: the single source of truth for every stage.

Each stage has a dataclass; a field's docstring (the string literal under it) is its ``--help``
text. A config is resolved in this order, later wins: the dataclass defaults → a preset
(``tiny``, ``demo``, ``paper``) → a YAML file → ``--dotted.flag value`` overrides on the command
line. The resolved config is saved as ``config.yaml`` in every run directory.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import sys
import textwrap
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

# --------------------------------------------------------------------------------------------
# String choices. Each is a Literal owned here (the modules that act on them derive their tables
# from typing.get_args, so a name is listed once); check_fields refuses any other value, naming
# the field and the choices, and --help shows them.

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Autocast = Literal["auto", "bfloat16", "float16"]
Schedule = Literal["cosine", "constant"]
SelectBy = Literal["last", "valid_loss", "rm_score"]
Overlength = Literal["truncate", "skip"]
RMLoss = Literal["kwise", "pairwise"]
KLEstimator = Literal["k1", "k2", "k3", "abs"]
ScoreBaseline = Literal["none", "leave_one_out"]
RolloutDtype = Literal["float32", "bfloat16", "auto"]
Parallel = Literal["ddp", "fsdp"]  # tether.distributed.ParallelModel's strategies
ReportTo = Literal["jsonl", "tensorboard", "wandb"]  # tether.metrics.MetricsLogger's writers

SPLITS: tuple[str, str, str] = ("train", "valid", "test")  # prompts are split by user into these


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != len(SPLITS):
        raise ValueError(f"fractions needs 3 numbers (train, valid, test), got {len(fractions)}")
    if not all(math.isfinite(f) and f >= 0 for f in fractions) or fractions[0] <= 0:
        raise ValueError(f"fractions must be >= 0 with train > 0, got {tuple(fractions)}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        total = sum(fractions)
        raise ValueError(f"fractions must sum to 1, got {tuple(fractions)} (sum {total:g})")
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


# --------------------------------------------------------------------------------------------
# Shared pieces


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters (peft) instead of all weights."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA alpha (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA path."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Module names that get adapters."""
    save_merged: bool = False
    """Also save a merged full model (in merged/ beside the adapters, which are peft's format) in
    each SFT checkpoint."""


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "default"
    """A Hugging Face model directory, a hub id (org/name) already in the local Hugging Face cache,
    'default' (the embedded SmolLM2-135M-Instruct), 'tiny' (a random tiny Llama for tests) or
    'tiny-llama3' / 'tiny-mistral' / 'tiny-gemma' / 'tiny-gpt2' (the same with that family's tokenizer)."""
    allow_download: bool = False
    """Download a hub id missing from the local Hugging Face cache. Off: the error names the command
    that fetches it (tether never downloads unasked)."""
    eos_token: str | None = None
    """The token that ends an assistant turn: SFT appends it, the RM's score is read at it, PPO's
    reward lands on it, sampling stops on it. None: the one the chat template puts after an
    assistant message (<|eot_id|>, <end_of_turn>, ...), else the tokenizer's eos_token."""
    pad_token: str | None = None
    """The padding token. None: the tokenizer's own unless it is the turn end, else a token the
    vocabulary reserves (<|finetune_right_pad_id|>, <|reserved_special_token_0|>), else the
    end-of-document token or the turn end (safe: tether builds every mask from lengths)."""
    dtype: Dtype = "auto"
    """Weights dtype: float32, bfloat16, float16 or 'auto' (bfloat16 on a CUDA GPU that has it
    natively, float32 elsewhere: CPUs, older GPUs)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them (training
    only): the same gradients, far less activation memory, about a third more compute."""
    residual_dropout: float = 0.0
    """Dropout on every attention/MLP sublayer output before the residual add (paper SFT: 0.2)."""
    autocast: Autocast | None = None
    """Mixed precision for forward passes: 'bfloat16' (2-3x faster on CPUs with AVX512-BF16 and on
    GPUs, ~5x slower on AVX2-only CPUs), 'auto' (bfloat16 where it runs natively, else none) or None."""
    trainable_layers: int | None = None
    """Train only the top N transformer blocks (+ final norm and head); None trains all. A CPU-budget option."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ... Under torchrun each rank
    takes GPU LOCAL_RANK."""
    parallel: Parallel = "ddp"
    """Data parallel over the ranks of a torchrun / Ray job (ignored in one process): 'ddp' (every
    rank holds the whole model) or 'fsdp' (FSDP2 fully_shard per transformer block: each rank holds
    1/N of the weights, gradients and optimiser state, for models that do not fit one device)."""
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (paper: 0.9, 0.95)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: Schedule = "cosine"
    """'cosine' (decay to final_lr_fraction of peak) or 'constant'."""
    warmup_steps: int = 0
    """Linear warmup steps from warmup_start_fraction of peak (paper SFT/RM: 0)."""
    warmup_start_fraction: float = 0.1
    """Warmup starts at this fraction of the peak LR."""
    final_lr_fraction: float = 0.1
    """Cosine decays to this fraction of the peak LR (paper: 10 %)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 disables)."""


# --------------------------------------------------------------------------------------------
# Stage 1: SFT


@dataclass(frozen=True)
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=9.65e-6))
    train_file: str | None = None
    """Demonstrations file (JSONL/Parquet/datasets dir). None = the default task."""
    valid_file: str | None = None
    """Validation demonstrations. None = a held-out slice of the training data (valid_fraction)."""
    valid_fraction: float = 0.1
    """Fraction of demonstrations held out for validation when valid_file is not given."""
    pretrain_file: str | None = None
    """Pretraining text to mix in (PPO-init model: 10 %). None = the default corpus when pretrain_fraction > 0."""
    pretrain_fraction: float = 0.0
    """Fraction of training examples that are pretraining text (paper's PPO init: 0.1)."""
    epochs: int = 16
    """Training epochs (paper: 16)."""
    batch_size: int = 32
    """Examples per optimiser step (micro_batch_size x grad_accum)."""
    micro_batch_size: int = 8
    """Examples per forward pass; batch_size must be a multiple of it."""
    max_length: int = 512
    """Sequences are truncated to this many tokens (prompt kept, response cut)."""
    trunk_cache_mib: float = 2048
    """With model.trainable_layers, keep the frozen embeddings' and bottom blocks' output for every
    training example (CPU memory: tokens x hidden size x 4 bytes in float32) and from the second
    epoch on run only the trained top blocks on it: the same numbers, less compute. On when the
    whole set fits in this many MiB; 0 turns it off. Off by itself under LoRA, parallel = 'fsdp',
    dropout in the frozen blocks (model.residual_dropout > 0) or a single epoch; the log says which."""
    seed: int = 0
    """Seed for data order, dropout and initialisation."""
    out_dir: str = "runs/sft"
    """Run directory: checkpoints, metrics.jsonl, config.yaml."""
    save_every_steps: int = 50
    """Write a resumable checkpoint every N optimiser steps (and at every epoch end)."""
    keep_epoch_checkpoints: bool = False
    """Keep every epoch's Hugging Face directory. Off: each epoch is scored as it ends and only the
    best so far and the last are on disk (the selected one after training)."""
    select_by: SelectBy = "valid_loss"
    """Pick the final checkpoint by 'last', 'valid_loss' or 'rm_score' (paper: RM score; needs reward_model)."""
    reward_model: str | None = None
    """Reward model directory used when select_by = 'rm_score'."""
    select_prompts: int = 32
    """Validation prompts sampled per checkpoint when selecting by RM score."""
    max_new_tokens: int = 64
    """Generation length for samples and RM-score selection."""
    report_to: tuple[ReportTo, ...] = ("jsonl",)
    """Where metrics go, e.g. jsonl,tensorboard: jsonl (metrics.jsonl in out_dir, always written),
    tensorboard (out_dir/tensorboard) and wandb (pip install 'tether[wandb]'; offline, under
    out_dir/wandb, when no API key is configured). A missing package is an error before anything loads."""
    tensorboard: bool = False
    """Also log to TensorBoard: the same as adding tensorboard to report_to (the older spelling)."""

    @property
    def grad_accum(self) -> int:
        return self.batch_size // self.micro_batch_size

    def validate(self) -> None:
        check_fields(self)
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"sft.batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        if not 0.0 <= self.pretrain_fraction < 1.0:
            raise ValueError(f"sft.pretrain_fraction must be in [0, 1), got {self.pretrain_fraction}")
        if self.select_by == "rm_score" and not self.reward_model:
            raise ValueError("sft.select_by = 'rm_score' needs sft.reward_model (a reward model directory)")
        _check_positive(self, "epochs", "batch_size", "micro_batch_size", "max_length")


# --------------------------------------------------------------------------------------------
# Stage 2: reward model


@dataclass(frozen=True)
class RMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to start from: the SFT checkpoint (its LM head is replaced by a scalar head)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=9e-6))
    train_file: str | None = None
    """Comparisons file (JSONL/Parquet/datasets dir): K = 2..9 ranked responses per prompt."""
    valid_file: str | None = None
    """Held-out comparisons. None = a held-out slice of the training prompts (valid_fraction)."""
    valid_fraction: float = 0.1
    """Fraction of prompts (all their comparisons) held out when valid_file is not given."""
    demonstrations_file: str | None = None
    """Demonstrations that score mean 0 after training (paper). None = the default task's."""
    normalize_scale: bool = True
    """Also scale the RM so the demonstrations' scores have std 1 (the paper sets only the mean):
    β, the missing-EOS penalty and the value clip then act in the same units in every run."""
    heldout_labelers: tuple[str, ...] = ()
    """Labeler ids never trained on, only evaluated (paper: held-out labelers)."""
    heldout_panel_labelers: bool = False
    """Also hold out the simulated panel's held-out labelers (tether.labelers.panel)."""
    epochs: int = 1
    """Passes over the comparisons (paper: 1; more overfits)."""
    batch_size: int = 64
    """Prompts (rankings) per optimiser step, each with all its K responses (paper: 64)."""
    micro_batch_size: int = 8
    """Prompts per forward pass; batch_size must be a multiple of it."""
    max_length: int = 512
    """Tokens per prompt + response; longer responses are cut (or skipped, see overlength)."""
    overlength: Overlength = "truncate"
    """Over-length responses: 'truncate' (keep the prompt, cut the response) or 'skip' the
    comparison; counted and logged either way."""
    trunk_cache_mib: float = 2048
    """With model.trainable_layers, keep the frozen embeddings' and bottom blocks' output for every
    training sequence (CPU memory: tokens x hidden size x 4 bytes in float32) and from the second
    epoch on run only the trained top blocks on it: the same numbers, less compute. On when the
    whole set fits in this many MiB; 0 turns it off. Off by itself under LoRA, parallel = 'fsdp',
    dropout in the frozen blocks (model.residual_dropout > 0) or a single epoch; the log says which."""
    loss: RMLoss = "kwise"
    """'kwise' (paper eq. 1: a prompt's C(K,2) pairs form one batch element) or 'pairwise'
    (every pair an independent example of 2 forwards; batch_size then counts pairs)."""
    seed: int = 0
    """Seed for the split, data order, the new head and dropout."""
    out_dir: str = "runs/rm"
    """Run directory: final/ (the RM), eval.json, metrics.jsonl, config.yaml."""
    save_every_steps: int = 50
    """Write a resumable checkpoint every N optimiser steps (and at every epoch end)."""
    eval_every_steps: int = 0
    """Held-out accuracy every N steps (0 = only before and after training)."""
    eval_batch_size: int = 32
    """Sequences per forward pass when scoring (evaluation, normalisation)."""
    report_to: tuple[ReportTo, ...] = ("jsonl",)
    """Where metrics go, e.g. jsonl,tensorboard: jsonl (metrics.jsonl in out_dir, always written),
    tensorboard (out_dir/tensorboard) and wandb (pip install 'tether[wandb]'; offline, under
    out_dir/wandb, when no API key is configured). A missing package is an error before anything loads."""
    tensorboard: bool = False
    """Also log to TensorBoard: the same as adding tensorboard to report_to (the older spelling)."""

    @property
    def grad_accum(self) -> int:
        return self.batch_size // self.micro_batch_size

    def validate(self) -> None:
        check_fields(self)
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"rm.batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        if not self.valid_file and not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"rm.valid_fraction must be in (0, 1) without a valid_file, got {self.valid_fraction}")
        _check_positive(self, "epochs", "batch_size", "micro_batch_size", "max_length", "eval_batch_size")


# --------------------------------------------------------------------------------------------
# Stage 3: PPO / PPO-ptx


@dataclass(frozen=True)
class PPOConfig:
    policy: ModelConfig = field(default_factory=ModelConfig)
    """The PPO-init (SFT) checkpoint: the policy starts from it and the frozen reference is it."""
    reward_model: str | None = None
    """Reward model: a tether RM directory, or any sequence-classification model with one output
    (its own tokenizer and chat template: responses are decoded and re-encoded for it). Required
    unless a reward function is passed to train_ppo in Python."""
    value_model: str | None = None
    """Value model initialisation. None = the reward model (paper); without an RM, or with one of
    another tokenizer, the policy checkpoint with a fresh scalar head."""
    demonstrations_file: str | None = None
    """Demonstrations a reward model without tether's normalisation is normalised on at the start
    (they score mean 0, std 1). None = the default task's."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, schedule="constant", warmup_steps=10))
    """Policy optimiser. In PPO the LR schedule advances once per iteration (batch), so
    warmup_steps counts iterations (paper: constant LR, 10 iterations of warmup from 1/10)."""
    value_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=9e-6, schedule="constant", warmup_steps=10))
    """Value-model optimiser (paper: LR 9e-6), scheduled per iteration like optim."""
    kl_coef: float = 0.02
    """β of the per-token KL penalty −β·(log π − log π_SFT) (paper: 0.02); the initial β when
    adaptive_kl."""
    adaptive_kl: bool = False
    """Adapt β towards kl_target (Ziegler et al. 2019) instead of keeping it fixed."""
    kl_target: float = 6.0
    """Target KL per episode (nats, summed over the response) for adaptive_kl."""
    kl_horizon: int = 10000
    """Adaptive-KL horizon in episodes: how fast β moves."""
    kl_estimator: KLEstimator = "k1"
    """Per-token KL estimator in the penalty: k1 (log-ratio, the paper's), k2, k3 or abs."""
    ptx_coef: float = 27.8
    """γ, the weight of the pretraining LM loss (PPO-ptx). 0 = plain PPO. tether's PPO and LM losses
    are token means over the minibatch; the paper's 27.8 weighs eq. (2)'s per-episode and
    per-sequence sums, which in tether's units is 27.8 × (pretraining tokens per example) /
    (response tokens per episode) on the same minibatch (tether.ppo.calibrate;
    benchmarks/calibrate_ptx.py measures it for a config). Measured for the paper preset on
    SmolLM2-135M-Instruct with the default corpus: 42 (median of 8 minibatches, range 28-58: 43
    response and 64 pretraining tokens per sequence), the paper preset's value. metrics.jsonl logs
    ptx_grad_ratio = ‖γ∇L_ptx‖ / ‖∇L_PPO‖ per step (and both norms): there it was 22 at γ = 27.8
    and 34 at γ = 42 (8-episode minibatches with 64 pretraining texts), so the paper's γ means the
    pretraining gradient to dominate the update; the ratio also grows as larger minibatches
    average out the PPO gradient's noise."""
    ptx_examples_per_episode: float = 1.0
    """Pretraining examples per RL episode (paper: 8; smaller by default to suit a CPU), drawn once
    per batch: further PPO epochs reuse them as they reuse the episodes. The pretraining pass is
    skipped entirely when this or ptx_coef is 0 (plain PPO)."""
    ptx_max_length: int = 256
    """Pretraining examples are cut to this many tokens (EOS appended first)."""
    pretrain_file: str | None = None
    """Pretraining text for PPO-ptx (PretrainText records). None = the default task's corpus."""
    prompts_file: str | None = None
    """RL prompts (Prompt records). None = the train split of the default task's prompts."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are taken from the same logits / temperature (paper: 1)."""
    max_new_tokens: int = 64
    """Longest response; one that reaches it without EOS is scored by the RM as cut off."""
    max_prompt_length: int = 256
    """Prompts keep their last this many tokens (the assistant header must stay)."""
    missing_eos_penalty: float | None = None
    """Added to the score of a response that never produced EOS (None: nothing, as in the paper).
    Off by default: the RM already trains on cut-off answers as cut off and the labelers mark
    them down, so a fixed penalty would count truncation a second time."""
    gamma: float = 1.0
    """GAE discount (paper: 1, no discount within a response)."""
    lam: float = 0.95
    """GAE λ."""
    cliprange: float = 0.2
    """PPO ratio clip ε (paper: 0.2)."""
    cliprange_value: float = 0.2
    """Value clip: the new value stays within this of its rollout-time value."""
    whiten_advantages: bool = True
    """Whiten advantages over the response tokens of each batch."""
    batch_size: int = 64
    """Episodes per iteration (paper: 512): batch_size / samples_per_prompt prompts."""
    samples_per_prompt: int = 1
    """Responses sampled for each prompt of a batch (paper: 1; batch_size must be a multiple)."""
    score_baseline: ScoreBaseline = "none"
    """'leave_one_out' (needs samples_per_prompt >= 2): each score minus the mean score of the
    same prompt's other responses, before the KL penalty. The RM is trained to rank responses to
    one prompt, not to compare prompts; this keeps only what it was trained for (a baseline that
    does not depend on the episode's own action: the policy gradient stays unbiased). 'none':
    the paper's raw score."""
    mini_batch_size: int = 16
    """Episodes per optimiser step (paper: 64)."""
    micro_batch_size: int = 8
    """Episodes per forward/backward pass; mini_batch_size must be a multiple of it."""
    generation_batch_size: int = 32
    """Prompts sampled and scored at once during the rollout (no gradients, so it can be larger
    than micro_batch_size)."""
    rollout_dtype: RolloutDtype | None = None
    """Precision rollouts are sampled in: None samples the policy itself under policy.autocast;
    'float32' or 'bfloat16' sample (autocast off) from the policy or a copy of it in that dtype,
    synced after every optimiser step; 'auto' is bfloat16 on an Ampere or later GPU or a CPU with native bf16
    (AVX512-BF16 / AMX), else float32, and when the policy itself already runs under a bfloat16
    autocast there, it samples the policy under it (no copy: frozen weights' casts are cached, so
    it is as fast, and sampling can keep the shared trunk's output for scoring). PPO's old
    log-probs always come from the policy itself."""
    rollout_compile: bool = False
    """torch.compile the rollouts' decode step (falls back to eager if compilation fails). Off by
    default: on a 2-core AVX2 CPU compiling took minutes and the step was no faster."""
    ppo_epochs: int = 1
    """Passes over each batch (paper: 1)."""
    share_trunk: bool = True
    """Compute the bottom blocks that the policy, reference, value model and RM hold bit for bit
    (frozen, e.g. under trainable_layers) once per batch, and keep their output for the update:
    the same numbers, less compute and one copy in memory. Found from the weights; false runs
    every model whole."""
    total_episodes: int = 1024
    """Episodes in the whole run; iterations = total_episodes // batch_size (paper: 256k)."""
    ema_decay: float | None = None
    """Exponential moving average of the policy weights, updated after every optimiser step
    (paper: 0.992). The exported policy/ is the EMA weights when enabled. None disables."""
    sample_every: int = 10
    """Write generations for n_sample_prompts fixed prompts to samples.jsonl every N iterations
    (and at the first and last); 0 disables."""
    n_sample_prompts: int = 4
    """Fixed prompts (the first of the prompt list) used for samples.jsonl."""
    save_every: int = 10
    """Write the resumable state every N iterations (and at the end)."""
    keep_policy_every: int = 0
    """Also keep the policy (EMA weights when enabled) as a Hugging Face directory iter-N/ every N
    iterations (0: never), written atomically before that iteration's state: a resumed run has each
    once, the same weights as an uninterrupted run's."""
    seed: int = 0
    """Seed for sampling, data order, minibatch order and a fresh value head."""
    out_dir: str = "runs/ppo"
    """Run directory: policy/, value/, state/, metrics.jsonl, samples.jsonl, config.yaml."""
    report_to: tuple[ReportTo, ...] = ("jsonl",)
    """Where metrics go, e.g. jsonl,tensorboard: jsonl (metrics.jsonl in out_dir, always written),
    tensorboard (out_dir/tensorboard) and wandb (pip install 'tether[wandb]'; offline, under
    out_dir/wandb, when no API key is configured). A missing package is an error before anything loads."""
    tensorboard: bool = False
    """Also log to TensorBoard: the same as adding tensorboard to report_to (the older spelling)."""

    @property
    def iterations(self) -> int:
        return self.total_episodes // self.batch_size

    @property
    def ptx_per_minibatch(self) -> int:
        """Pretraining examples accumulated into each optimiser step."""
        return round(self.ptx_examples_per_episode * self.mini_batch_size)

    def validate(self) -> None:
        check_fields(self)
        if self.batch_size % self.mini_batch_size or self.mini_batch_size % self.micro_batch_size:
            raise ValueError(
                f"ppo: batch_size ({self.batch_size}) must be a multiple of mini_batch_size "
                f"({self.mini_batch_size}), and that a multiple of micro_batch_size "
                f"({self.micro_batch_size})"
            )
        if self.total_episodes < self.batch_size:
            raise ValueError(
                f"ppo.total_episodes ({self.total_episodes}) must be at least one batch ({self.batch_size})"
            )
        if self.samples_per_prompt < 1 or self.batch_size % self.samples_per_prompt:
            raise ValueError(
                f"ppo.batch_size ({self.batch_size}) must be a multiple of samples_per_prompt "
                f"({self.samples_per_prompt}, >= 1)"
            )
        if self.score_baseline == "leave_one_out" and self.samples_per_prompt < 2:
            raise ValueError("ppo.score_baseline = leave_one_out needs samples_per_prompt >= 2")
        if self.temperature <= 0:
            raise ValueError(
                f"ppo.temperature must be > 0 (RL samples; greedy has no log-probs), got {self.temperature}"
            )
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"ppo.gamma and ppo.lam must be in [0, 1]: {self.gamma}, {self.lam}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ppo.ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if self.kl_coef < 0 or self.ptx_coef < 0 or self.ptx_examples_per_episode < 0:
            raise ValueError("ppo.kl_coef, ptx_coef and ptx_examples_per_episode must be >= 0")
        if self.sample_every < 0 or self.keep_policy_every < 0:
            raise ValueError("ppo.sample_every and keep_policy_every must be >= 0")
        _check_positive(
            self,
            "batch_size",
            "mini_batch_size",
            "micro_batch_size",
            "generation_batch_size",
            "ppo_epochs",
            "max_new_tokens",
            "max_prompt_length",
            "ptx_max_length",
            "save_every",
            "kl_target",
            "kl_horizon",
            "cliprange",
            "cliprange_value",
        )


def _check_positive(cfg: Any, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) <= 0:
            raise ValueError(f"{type(cfg).__name__}.{n} must be > 0, got {getattr(cfg, n)}")


# Allowed ranges by field name, wherever the field appears (optim.lr, ppo.optim.lr, ...):
# (low, low included, high, high included); None = unbounded.
_POSITIVE = (0.0, False, None, False)
_NON_NEGATIVE = (0.0, True, None, False)
_FRACTION = (0.0, True, 1.0, True)
_BELOW_ONE = (0.0, True, 1.0, False)
FIELD_RANGES: dict[str, tuple[float, bool, float | None, bool]] = {
    "lr": _POSITIVE,
    "eps": _POSITIVE,
    "betas": _BELOW_ONE,
    "weight_decay": _NON_NEGATIVE,
    "warmup_steps": _NON_NEGATIVE,
    "warmup_start_fraction": _FRACTION,
    "final_lr_fraction": _FRACTION,
    "max_grad_norm": _NON_NEGATIVE,
    "residual_dropout": _BELOW_ONE,
    "dropout": _BELOW_ONE,
    "r": _POSITIVE,
    "alpha": _POSITIVE,
    "trainable_layers": _POSITIVE,
    "valid_fraction": _BELOW_ONE,
    "save_every_steps": _POSITIVE,
    "eval_every_steps": _NON_NEGATIVE,
    "trunk_cache_mib": _NON_NEGATIVE,
    "select_prompts": _POSITIVE,
    "max_new_tokens": _POSITIVE,
    "total_episodes": _POSITIVE,
    "n_sample_prompts": _NON_NEGATIVE,
    "task_users": _POSITIVE,
    "task_prompts_per_user": _POSITIVE,
    "max_prompts_per_user": _POSITIVE,
    "sample_batch_size": _POSITIVE,
    "heldout_labeler_prompts": _NON_NEGATIVE,
}


def check_fields(cfg: Any, prefix: str = "") -> None:
    """Every string choice in ``cfg`` (nested configs included) is one of its Literal's values, and
    every number is finite and within FIELD_RANGES.

    Run before anything loads, so ``--optim.lr inf`` or ``--ppo.kl-estimator k4`` is a config
    error, not a NaN or a KeyError an hour later.
    """
    cls: type = type(cfg)
    hints = _hints(cls)
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_fields(value, name + ".")
            continue
        choices = literal_choices(hints[f.name])
        if choices and value not in choices and not (value is None and _optional(hints[f.name])):
            allowed = ", ".join(choices) + (" or None" if _optional(hints[f.name]) else "")
            raise ValueError(f"config field '{name}' must be one of {allowed}; got {_short(value)}")
        items = value if isinstance(value, list | tuple) else [value]
        element = typing.get_args(hints[f.name])[:1] if isinstance(value, list | tuple) else ()
        if element and (options := literal_choices(element[0])) and (wrong := [v for v in items if v not in options]):
            raise ValueError(f"config field '{name}' takes {', '.join(options)}; got {_short(wrong[0])}")
        for v in items:
            if isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if not math.isfinite(v):
                raise ValueError(f"config field '{name}' must be a finite number, got {v}")
            if f.name in FIELD_RANGES:
                lo, lo_in, hi, hi_in = FIELD_RANGES[f.name]
                if (v < lo or (v == lo and not lo_in)) or (hi is not None and (v > hi or (v == hi and not hi_in))):
                    low = f"{'[' if lo_in else '('}{lo:g}"
                    high = f"{hi:g}{']' if hi_in else ')'}" if hi is not None else "inf)"
                    raise ValueError(f"config field '{name}' must be in {low}, {high}, got {v}")
    if hasattr(cfg, "report_to"):  # the packages of the metrics writers asked for, before anything loads
        from tether.metrics import check_reporters, report_targets

        check_reporters(report_targets(cfg), prefix + "report_to")


# --------------------------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True)
class EvalConfig:
    baseline: str = "sft"
    """The policy every other is compared with (win rates against it)."""
    prompts_file: str | None = None
    """Held-out prompt records. None: the run's test split (``tether eval --run``, ``tether run``),
    else the default task's (prompts of users never seen in training)."""
    limit: int = 0
    """Evaluate only the first N prompts (0 = all)."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt and policy; response j is judged against the baseline's
    response j, and intervals are bootstrapped over prompts (never counting a prompt twice)."""
    temperature: float = 1.0
    """Sampling temperature (1.0 also gives an unbiased KL estimate)."""
    max_new_tokens: int | None = None
    """Longest response. None: the run's ppo.max_new_tokens (64 outside a run)."""
    batch_size: int = 64
    """Sequences sampled per forward pass."""
    sft_best_of: int = 0
    """Also evaluate ``sft_boN``: N samples of the baseline policy, the reward model keeps its
    favourite. No training, KL at most log N − (N − 1)/N: how much the RM itself can buy, to set
    PPO against (0 = off; needs a reward model)."""
    base: bool = True
    """Also evaluate the base model (the model SFT started from) when evaluating a run."""
    pretrain_file: str | None = None
    """Held-out pretraining text for the alignment-tax perplexity. None: the run's held-out split,
    else the default task's."""
    pretrain_texts: int = 0
    """Use only the first N held-out pretraining paragraphs (0 = all)."""
    demonstrations_file: str | None = None
    """Demonstrations that normalise a reward model of another tokenizer which carries no tether
    normalisation (scores mean 0 on them), as `tether ppo --demonstrations-file` does. None: the
    default task's demonstrations."""
    n_bootstrap: int = 2000
    """Bootstrap resamples (over prompts) for every 95 % interval."""
    seed: int = 0
    """Seed for sampling (every policy gets the same stream) and the labelers' noise."""

    @property
    def response_length(self) -> int:
        """The longest response sampled: ``max_new_tokens``, else 64 (a run fills it with its PPO length)."""
        return self.max_new_tokens or 64

    def validate(self) -> None:
        check_fields(self)
        _check_positive(self, "samples_per_prompt", "batch_size", "n_bootstrap")
        if self.limit < 0 or self.pretrain_texts < 0:
            raise ValueError("eval.limit and eval.pretrain_texts must be >= 0 (0 = all)")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ValueError(f"eval.max_new_tokens must be > 0 or None, got {self.max_new_tokens}")
        if self.sft_best_of < 0 or self.sft_best_of == 1:
            raise ValueError(f"eval.sft_best_of must be 0 (off) or >= 2, got {self.sft_best_of}")
        if self.temperature < 0:
            raise ValueError(f"eval.temperature must be >= 0 (0 = greedy), got {self.temperature}")


# --------------------------------------------------------------------------------------------
# The whole pipeline (tether run)


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = "runs/run"
    """Run directory: config, manifest, data, every checkpoint, eval and report."""
    seed: int = 0
    """Seed for every stage (each stage derives its own from it)."""
    rounds: int = 1
    """Iterations of stages 2 and 3: each round ranks samples of the current best policy and
    retrains the RM on all comparisons so far."""
    prompts_file: str | None = None
    """Prompt records (id, text, user_id). None = the default task."""
    demonstrations_file: str | None = None
    """Demonstrations for SFT. None = the default task's."""
    pretrain_file: str | None = None
    """Pretraining text for the SFT mix and PPO-ptx. None = the default corpus."""
    pretrain_heldout_file: str | None = None
    """Held-out pretraining text for the alignment tax. None = the default held-out corpus."""
    comparisons_file: str | None = None
    """Rankings from people (e.g. exported from the labeling app), added to round 1's comparisons."""
    task_users: int = 60
    """Default task: simulated users (prompts are split by user)."""
    task_prompts_per_user: int = 8
    """Default task: prompts per user."""
    max_prompts_per_user: int = 200
    """Preprocessing: cap per user (paper: 200)."""
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Fractions of users (not prompts) in train, valid and test. A larger test share buys the
    evaluation prompts from users never seen in training without growing SFT."""
    k: int = 4
    """Responses sampled per prompt for ranking (paper: 4..9)."""
    rm_prompts_per_round: int = 200
    """Prompts sampled (from the train split) and ranked each round."""
    labelers_per_sample: int = 1
    """Training labelers ranking each sample. Rankings of the same K responses share the RM's
    forwards, so more labelers per sample cost labeling time, not RM compute."""
    sample_batch_size: int = 64
    """Sequences per forward pass when sampling K responses per prompt."""
    heldout_labeler_prompts: int = 40
    """Samples also ranked by the held-out labelers (RM evaluation only) and by 2 training labelers (agreement)."""
    curve_every: int = 0
    """Keep the last round's PPO-ptx policy every N iterations and evaluate each checkpoint too:
    the report plots the win rate against PPO episodes, a compute curve, and eval/curve.json holds
    its figures (SFT at 0 episodes, the final policy last) (0 = off)."""
    run_ppo_baseline: bool = True
    """Also train plain PPO (ptx_coef = 0) in the last round, to measure what PPO-ptx buys."""
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(pretrain_fraction=0.1, select_by="valid_loss"))
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        check_fields(self)
        _check_positive(self, "rounds", "k", "rm_prompts_per_round", "labelers_per_sample")
        try:
            check_fractions(self.split_fractions)
        except ValueError as e:
            raise ValueError(f"run.split_fractions: {e}") from None
        if self.curve_every < 0:
            raise ValueError(f"run.curve_every must be >= 0 (0 = off), got {self.curve_every}")
        if self.curve_every and self.curve_every >= self.ppo.iterations:
            raise ValueError(
                f"run.curve_every ({self.curve_every}) must be below the PPO iterations ({self.ppo.iterations} = "
                f"ppo.total_episodes {self.ppo.total_episodes} // ppo.batch_size {self.ppo.batch_size}): "
                "no checkpoint would be kept before the final policy, and there would be no curve"
            )
        if not 2 <= self.k <= 9:
            raise ValueError(f"run.k must be 2..9, got {self.k}")
        if self.sft.select_by == "rm_score":
            raise ValueError(
                "run.sft.select_by = 'rm_score' is not available in the pipeline: SFT precedes the first RM"
            )
        # Every stage before the first one starts: a bad --ppo.* value must not cost an SFT run.
        for stage in (self.sft, self.rm, self.ppo, self.eval):
            stage.validate()


# Each command's config class, by the stage name its presets are kept under.
STAGE_CONFIGS: dict[str, type] = {
    "sft": SFTConfig,
    "rm": RMConfig,
    "ppo": PPOConfig,
    "eval": EvalConfig,
    "run": RunConfig,
}
PRESET_HELP = {
    "tiny": "a random tiny Llama, for tests",
    "demo": "the embedded SmolLM2-135M-Instruct on a CPU budget",
    "paper": "the paper's hyperparameters",
    "full": "the demo with 3x its PPO-ptx episodes, the policy kept and evaluated every 240 episodes: the "
    "win rate against PPO episodes; estimated at 1.8 h on a quiet 2-core CPU",
}


# --------------------------------------------------------------------------------------------
# Presets: YAML files shipped in the package (tether/presets/<stage>/<name>.yaml), each a partial
# config read exactly as a --config file is. `tether config show STAGE --preset P` prints one
# resolved, to copy and edit.

PRESET_DIR = Path(__file__).parent / "presets"


def _preset_files() -> dict[str, dict[str, Path]]:
    """Each stage's presets by name (the ones PRESET_HELP describes first, in its order)."""
    order = list(PRESET_HELP)
    out = {}
    for stage in STAGE_CONFIGS:
        files = sorted((PRESET_DIR / stage).glob("*.yaml"), key=lambda f: (order + [f.stem]).index(f.stem))
        out[stage] = {f.stem: f for f in files}
    return out


PRESETS: dict[str, dict[str, Path]] = _preset_files()


# --------------------------------------------------------------------------------------------
# Dataclass <-> dict / YAML / argparse
#
# Why not tyro (measured with tyro 1.0.16, 2026-11-30): it would replace field_docs, add_config_args,
# _metavar and config_from_args (~65 lines), not the presets, the YAML layer or the typed coercion
# they share (its YAML format is its own, tagged); it would change the flags users type (booleans
# become --x/--no-x, so `--model.lora.enabled true` is refused; `--optim.betas 0.8,0.9` becomes
# `0.8 0.9`; None must be spelled `None`), and building the five commands' parsers took 1.42 s
# against 0.31 s with this code (0.24 s to import the configs alone; medians of 5 runs).


@cache
def _module_classes(module: str) -> dict[str, list[ast.stmt]]:
    """The bodies of a module's top-level classes, by name: its source is parsed once (parsing it
    once per class, as inspect.getsource(cls) does, was half of ``tether --help``'s time)."""
    try:
        tree = ast.parse(inspect.getsource(sys.modules[module]))
    except (OSError, TypeError, KeyError):
        return {}
    return {node.name: node.body for node in tree.body if isinstance(node, ast.ClassDef)}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal right after a field) of a dataclass, by name."""
    body = _module_classes(cls.__module__).get(cls.__name__)
    if body is None:  # a class defined inside a function
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
        except (OSError, TypeError):
            return {}
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def literal_choices(tp: Any) -> tuple[str, ...]:
    """The values of a ``Literal[...]`` (or ``Literal[...] | None``) annotation; () for any other."""
    if _optional(tp):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, with a readable error."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, members[0], name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"config field '{name}': expected true/false, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if tp is not str and isinstance(value, bool):
                raise ValueError  # YAML's `yes` is not a number
            converted = tp(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"config field '{name}': expected {tp.__name__}, got {_short(value)}") from None
        if tp is float and not math.isfinite(converted):
            raise ValueError(f"config field '{name}': must be a finite number, got {_short(value)}")
        return converted
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list | tuple):
            raise ValueError(f"config field '{name}': expected a list, got {value!r}")
        args = typing.get_args(tp)
        items = [_coerce(v, args[0] if args else str, name) for v in value]
        if origin is tuple:
            if len(args) == 2 and args[1] is not Ellipsis and len(items) != 2:
                raise ValueError(f"config field '{name}': expected 2 values, got {len(items)}")
            return tuple(items)
        return items
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# Fields that are gone: (class, name) -> why, and what to do (delete the line).
REMOVED_FIELDS: dict[tuple[str, str], str] = {
    ("PPOConfig", "fuse_first_forward"): (
        "it applied only with batch_size == mini_batch_size == micro_batch_size in one process and "
        "saved part of the scoring time there; old log-probs and values now always come from scoring. "
        "Delete the line."
    ),
}


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build a dataclass from a nested dict; unknown keys are an error naming the key."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key = RENAMED_FIELDS.get((cls.__name__, key), key)
        full = prefix + key
        if full == "inputs" and "inputs" not in names:  # what save_config records for the reader
            continue
        if key not in names:
            if (cls.__name__, key) in REMOVED_FIELDS:
                raise ValueError(f"config field '{full}' was removed: {REMOVED_FIELDS[cls.__name__, key]}")
            raise ValueError(f"unknown config field '{full}' (known: {', '.join(sorted(names))})")
        tp = hints[key]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ValueError(f"config field '{full}' must be a mapping")
            kwargs[key] = from_dict(tp, value, full + ".")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    def convert(v: Any) -> Any:
        if isinstance(v, tuple):
            return list(v)
        return v

    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else convert(v)
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve(
    cls: type,
    stage: str,
    preset: str | None = None,
    yaml_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    validate: bool = True,
) -> Any:
    """defaults → preset → YAML → overrides; returns a config of type ``cls``, validated unless
    ``validate=False`` (``--help`` shows a preset's values even where the preset alone does not run)."""
    data = to_dict(cls())
    if preset:
        presets = PRESETS.get(stage, {})
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r} for {stage}; known: {', '.join(presets)}")
        data = _merge(data, read_config_file(presets[preset]))
    if yaml_path:
        data = _merge(data, read_config_file(yaml_path))
    for k, v in (overrides or {}).items():
        set_dotted(data, k, v)
    cfg = from_dict(cls, data)
    if validate and hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


BUILTIN_TASK = "built-in task"


def input_sources(cfg: Any) -> dict[str, str]:
    """Where each data input of a stage's config comes from: its path, the built-in task, or off
    (and why). save_config writes it as ``inputs`` so that a reader of config.yaml sees which, if
    any, came from the built-in task (tether.data.sources decides them); loading ignores it."""

    def source(path: str | None, used: bool = True, off: str = "") -> str:
        return path if path else (BUILTIN_TASK if used else f"off ({off})")

    if isinstance(cfg, SFTConfig):
        return {
            "train_file": source(cfg.train_file),
            "valid_file": cfg.valid_file or f"{cfg.valid_fraction:g} of train_file, held out",
            "pretrain_file": source(cfg.pretrain_file, cfg.pretrain_fraction > 0, "pretrain_fraction 0"),
        }
    if isinstance(cfg, RMConfig):
        return {
            "train_file": source(cfg.train_file, False, "none given"),
            "valid_file": cfg.valid_file or f"{cfg.valid_fraction:g} of train_file's prompts, held out",
            "demonstrations_file": source(cfg.demonstrations_file),
        }
    if isinstance(cfg, PPOConfig):
        ptx = cfg.ptx_coef > 0 and cfg.ptx_examples_per_episode > 0
        return {
            "prompts_file": source(cfg.prompts_file),
            "pretrain_file": source(cfg.pretrain_file, ptx, "ptx_coef 0"),
        }
    if isinstance(cfg, EvalConfig):
        own_prompts = bool(cfg.prompts_file)
        return {
            "prompts_file": source(cfg.prompts_file),
            "pretrain_file": source(cfg.pretrain_file, not own_prompts, "own prompts without held-out text"),
        }
    if isinstance(cfg, RunConfig):
        return {
            "prompts_file": source(cfg.prompts_file),
            "demonstrations_file": source(cfg.demonstrations_file),
            "pretrain_file": source(
                cfg.pretrain_file, cfg.sft.pretrain_fraction > 0 or cfg.ppo.ptx_coef > 0, "no pretraining mix, γ = 0"
            ),
            "pretrain_heldout_file": source(cfg.pretrain_heldout_file),
            "comparisons_file": cfg.comparisons_file or "none (the simulated labelers rank every sample)",
        }
    return {}


def read_config_file(yaml_path: str | Path) -> dict[str, Any]:
    """A config file's mapping (a preset's or --config's), with errors naming the file and line;
    the fields are checked when the merged mapping becomes a config."""
    path = Path(yaml_path)
    if not path.exists():
        raise FileNotFoundError(f"config file {yaml_path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{yaml_path}:{mark.line + 1}" if mark else yaml_path
        raise ValueError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{yaml_path}: not UTF-8 text") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{yaml_path}: the config must be a YAML mapping")
    return loaded


def save_config(cfg: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    inputs = input_sources(cfg)
    tmp.write_text(yaml.safe_dump(to_dict(cfg) | ({"inputs": inputs} if inputs else {}), sort_keys=False))
    tmp.replace(path)
    return path


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--dotted.name`` flag per (nested) field, help from the field docstring, and the
    ``--preset`` / ``--config`` flags.

    Defaults are suppressed so only flags the user typed override the preset and YAML. The help's
    defaults are the config ``cls()`` resolves to (a nested config's from its parent's
    default_factory), and ``--help`` after ``--preset P`` / ``--config F`` shows P's / F's values.
    A boolean takes ``--flag``, ``--no-flag`` or ``--flag true|false``.
    """
    stage = next((stage for stage, c in STAGE_CONFIGS.items() if c is cls), "")
    described = "; ".join(f"{name} ({PRESET_HELP.get(name, '')})" for name in PRESETS.get(stage, {}))
    parser.formatter_class = _ConfigHelpFormatter
    flags: list[tuple[argparse.Action, str, str]] = []
    common: dict[str, Any] = {"action": _PresetOrConfig, "cls": cls, "stage": stage, "flags": flags}
    parser.add_argument("--preset", help=f"start from a preset: {described}", **common)
    parser.add_argument("--config", help="YAML file with config fields (nested mappings)", **common)
    _add_fields(parser, cls, "", flags)
    _show_defaults(flags, to_dict(cls()))


# Fields renamed so that one thing has one name across commands (eval's prompts are a file like
# run's prompts_file): (class, old name) -> new name. A YAML file or a saved config.yaml with the
# old name still loads, and the old flag (--prompts, --eval.prompts) is still accepted, not shown.
RENAMED_FIELDS: dict[tuple[str, str], str] = {
    ("EvalConfig", "prompts"): "prompts_file",
    ("EvalConfig", "pretrain"): "pretrain_file",
}
# Fields whose flag is accepted but not shown, because another flag says the same thing.
HIDDEN_FLAGS = {"tensorboard"}  # --report-to jsonl,tensorboard


def _add_fields(parser: argparse.ArgumentParser, cls: type, prefix: str, flags: list) -> None:
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = prefix + f.name
        if _is_dataclass_type(tp):
            _add_fields(parser, tp, name + ".", flags)
            continue
        flag = "--" + name.replace("_", "-")
        dest = "cfg__" + name
        if f.name in HIDDEN_FLAGS:
            kind: Any = _BoolFlag if tp is bool else "store"
            parser.add_argument(flag, dest=dest, action=kind, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            continue
        if tp is bool:
            names = [flag, "--no-" + name.replace("_", "-")]
            action = parser.add_argument(*names, dest=dest, action=_BoolFlag, default=argparse.SUPPRESS)
        else:
            action = parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar=_metavar(tp))
        for (owner, old), new in RENAMED_FIELDS.items():
            if owner == cls.__name__ and new == f.name:
                alias = "--" + (prefix + old).replace("_", "-")
                parser.add_argument(alias, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        flags.append((action, name, docs.get(f.name, "")))


def _show_defaults(flags: list[tuple[argparse.Action, str, str]], values: dict[str, Any]) -> None:
    """Write each flag's help as its docstring plus ``(default: V)``, V from ``values`` (a
    ``to_dict`` config) in the form the flag takes it back."""
    for action, name, doc in flags:
        value: Any = values
        for part in name.split("."):
            value = value[part]
        action.help = f"{doc} (default: {_shown(value)})".replace("%", "%%")


def _shown(value: Any) -> str:
    """A config value as it is typed on the command line: true/false, A,B, None, "" (empty list)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) if value else '""'
    return str(value)


def add_renamed_flag(parser: argparse.ArgumentParser, flag: str, *old: str, **kwargs: Any) -> argparse.Action:
    """``flag``, shown in the help, with its former spellings ``old`` still accepted but not shown
    (one spelling for one thing across commands: --out-dir, --out-file, --prompts-file)."""
    required = kwargs.pop("required", False)
    kwargs.setdefault("metavar", flag.rsplit("-", 1)[-1].upper())  # DIR, FILE
    container: Any = parser.add_mutually_exclusive_group(required=True) if required else parser
    action = container.add_argument(flag, **kwargs)
    hidden = {k: v for k, v in kwargs.items() if k not in ("help", "dest", "metavar")}
    for spelling in old:
        container.add_argument(spelling, dest=action.dest, help=argparse.SUPPRESS, **hidden)
    return action


class _BoolFlag(argparse.Action):
    """``--flag`` (true), ``--no-flag`` (false) or ``--flag true|false`` (the value is coerced
    with the config's other values, so yes/no/1/0 work too)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", metavar="BOOL", **kwargs)

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        if option is not None and option.startswith("--no-"):
            if values is not None:
                parser.error(f"{option} takes no value (it sets false)")
            values = False
        setattr(namespace, self.dest, True if values is None else values)


class _ConfigHelpFormatter(argparse.HelpFormatter):
    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, _BoolFlag) and len(action.option_strings) == 2:
            return f"{action.option_strings[0]} [true|false], {action.option_strings[1]}"
        return super()._format_action_invocation(action)


class _PresetOrConfig(argparse.Action):
    """``--preset`` / ``--config``: stores the value and makes the help's defaults the values
    they resolve to, so that ``--preset P --help`` shows P's (``tether`` moves ``--help`` last).
    A preset or file that does not resolve leaves the help as it was: the command itself reports it."""

    def __init__(self, option_strings: list[str], dest: str, *, cls: type, stage: str, flags: list, **kw: Any):
        super().__init__(option_strings, dest, **kw)
        self.cls, self.stage, self.flags = cls, stage, flags

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        setattr(namespace, self.dest, values)
        try:
            preset, yaml_path = getattr(namespace, "preset", None), getattr(namespace, "config", None)
            cfg = resolve(self.cls, self.stage, preset, yaml_path, validate=False)
        except (ValueError, FileNotFoundError):
            return
        _show_defaults(self.flags, to_dict(cfg))


def _metavar(tp: Any) -> str:
    if choices := literal_choices(tp):
        return "{" + ",".join(choices) + "}"
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        element = literal_choices(typing.get_args(tp)[0]) if typing.get_args(tp) else ()
        return ",".join(element[:2]) + ",..." if element else "A,B"
    if origin in (typing.Union, types.UnionType):
        return _metavar([a for a in typing.get_args(tp) if a is not type(None)][0])
    return getattr(tp, "__name__", "X").upper()


def config_from_args(cls: type, stage: str, args: argparse.Namespace) -> Any:
    overrides = {k[len("cfg__") :]: v for k, v in vars(args).items() if k.startswith("cfg__")}
    return resolve(cls, stage, getattr(args, "preset", None), getattr(args, "config", None), overrides)
