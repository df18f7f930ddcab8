"""AdamW and the paper's learning-rate schedules, shared by the SFT, RM and PPO trainers."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import get_args

import torch
from torch.optim.lr_scheduler import LRScheduler

from tether.checkpoint import NonFiniteError, require_finite_weights
from tether.config import OptimConfig, Schedule


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig, lr: float | None = None
) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    return torch.optim.AdamW(
        params,
        lr=lr if lr is not None else cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR at optimiser step ``step`` (0-based).

    Warmup: linear from warmup_start_fraction to 1 over warmup_steps (paper PPO: 10 iterations from
    1/10). Then 'constant', or 'cosine' decay to final_lr_fraction at the last step (paper SFT/RM: 10 %).
    """
    if step < cfg.warmup_steps:
        start = cfg.warmup_start_fraction
        return start + (1.0 - start) * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule != "cosine":
        raise ValueError(f"optim.schedule must be one of {', '.join(get_args(Schedule))}; got {cfg.schedule!r}")
    span = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.final_lr_fraction
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))


def clip_grad(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    params = [p for p in params if p.grad is not None]
    if max_norm and max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler, max_grad_norm: float
) -> float:
    """Clip the gradients, step the optimiser and the schedule, zero the gradients.

    Returns the gradient norm before clipping. A non-finite norm raises NonFiniteError before
    the step (clipping an infinite norm scales every gradient to 0 or NaN, so a finite loss can
    still poison the weights); weights made non-finite by the step raise it too.
    """
    grad_norm = clip_grad(model.parameters(), max_grad_norm)
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"non-finite gradient norm ({grad_norm}), so the update was not applied")
    optimizer.step()
    require_finite_weights({"trainable": model}, "the optimiser step made weights non-finite")
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
