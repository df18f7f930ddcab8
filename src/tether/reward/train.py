"""Stage 2: the reward model (InstructGPT §3.5, "Reward modeling").

Read top to bottom: load → split → encode → (resume) → epochs × optimiser steps × micro-batches →
normalise → evaluate → save. The RM is the SFT model with a scalar head; each optimiser step takes
``batch_size`` prompts, runs each of their K responses through the model once, and forms all
C(K,2) pairs of a prompt inside the K-wise loss (eq. 1), every prompt weighing the same. The loss
of a micro-batch is scaled by its share of the step's prompts, so micro-batches of 1, 2 or 8
prompts give the same gradient, and so do N data-parallel ranks sharing the step's prompts.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from torch.optim.lr_scheduler import LRScheduler
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.checkpoint import (
    NonFiniteError,
    StopAfter,
    epoch_order,
    find_state,
    last_good_state,
    load_state,
    start_run_dir,
    truncate_metrics,
)
from tether.config import RMConfig, RMLoss
from tether.data.formats import Comparison
from tether.distributed import (
    Dist,
    ParallelModel,
    as_parallel,
    barrier,
    broadcast_object,
    init_from_env,
    main_only,
    micro_batches,
    save_trainer_state,
    seed_rank,
    sum_floats,
)
from tether.metrics import MetricsLogger, progress_bar
from tether.models.heads import load_scalar_model, reward_scores, save_scalar_model, score_at_last_token
from tether.models.loading import autocast
from tether.models.trunk import TrunkCache
from tether.optim import build_optimizer, build_scheduler, optimizer_step
from tether.reward.data import (
    RankedExample,
    RankingBatch,
    collate,
    encode_comparisons,
    expand_to_pairs,
    group_rankings,
    load_comparisons,
    split_by_prompt,
)
from tether.reward.evaluate import RMEval, evaluate_rm
from tether.reward.loss import kwise_ranking_loss, pairwise_loss
from tether.reward.normalize import Normalization, normalize_reward_model
from tether.sft.data import load_demonstrations


def ranking_loss(
    model: PreTrainedModel, batch: RankingBatch, loss: RMLoss, trunk: TrunkCache | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward every sequence of the batch once and apply the K-wise (or pairwise) loss.

    ``loss='pairwise'`` expects every example to be one (winner, loser) pair, as made by
    :func:`tether.reward.data.expand_to_pairs`: sequences alternate chosen, rejected.
    With ``trunk`` the frozen bottom blocks' output comes from (or goes into) its store.
    Returns ``(loss averaged over the batch's prompts, stats)``.
    """
    if trunk is not None:
        per_token = trunk.scalars(model, batch.input_ids, batch.attention_mask)
        rows = score_at_last_token(model, per_token, batch.attention_mask, normalized=False)  # [U]
    else:
        rows = reward_scores(model, batch.input_ids, batch.attention_mask, normalized=False)  # [U]
    scores = rows[batch.sequence_index]  # [N]: a sequence ranked by several labelers forwards once
    if loss == "kwise":
        return kwise_ranking_loss(scores, batch.prompt_index, batch.ranks)
    chosen, rejected = scores[0::2], scores[1::2]
    out, stats = pairwise_loss(chosen, rejected)
    stats["n_prompts"] = stats["n_pairs"]
    return out, stats


def accumulate_gradients(
    model: PreTrainedModel | ParallelModel,
    batch: Sequence[RankedExample],
    micro_batch_size: int,
    pad_token_id: int,
    loss: RMLoss,
    precision: contextlib.AbstractContextManager | None = None,
    trunk: TrunkCache | None = None,
) -> dict[str, float]:
    """Backward the loss of one optimiser step's ``batch``, ``micro_batch_size`` prompts at a time.

    ``batch`` holds rankings; rankings of the same responses (several labelers, one prompt) go
    into one micro-batch and share its forwards, so ``micro_batch_size`` counts distinct
    prompts' response sets (the forward cost), not rankings. Each micro-batch's loss (a mean
    over its rankings) is scaled by its share of the step's rankings, so the accumulated
    gradient is that of the mean over all of them whatever the micro-batch size. Returns the
    step's loss, pairwise accuracy and mean margin (over pairs).

    Given a :class:`ParallelModel`, the response sets are shared out over the ranks and the
    returned figures are the whole step's. ``trunk``: see :func:`ranking_loss`.
    """
    par = as_parallel(model)
    device = next(par.module.parameters()).device
    loss_sum = correct = margin = pairs = 0.0
    groups = group_rankings(batch)
    micro = micro_batches(groups, micro_batch_size, par.dist, equal=par.sharded)
    for i, (chunk, real) in enumerate(micro):
        inputs = collate([ex for g in chunk for ex in g], pad_token_id).to(device)
        with par.sync(i == len(micro) - 1), precision or contextlib.nullcontext():
            value, stats = par.run(ranking_loss, inputs, loss, trunk)
            value = value * stats["n_prompts"] / len(batch)
            # DDP averages over the ranks: × world_size makes it the sum (0: a filler).
            (value * (par.world_size if real else 0.0)).backward()
        if real:
            n = int(stats["n_pairs"])
            loss_sum += float(value.detach())
            correct += float(stats["accuracy"]) * n
            margin += float(stats["margin"]) * n
            pairs += n
    loss_sum, correct, margin, pairs = sum_floats([loss_sum, correct, margin, pairs])
    return {
        "loss": loss_sum,
        "accuracy": correct / max(pairs, 1),
        "margin": margin / max(pairs, 1),
        "pairs": int(pairs),
    }


def heldout_labeler_ids(cfg: RMConfig, panel_heldout_labelers: Sequence[str] | None = None) -> list[str]:
    """Labelers never trained on: the configured ones and, with ``cfg.heldout_panel_labelers``,
    the simulated panel's held-out ones, which the caller passes (it knows the panel)."""
    names = list(cfg.heldout_labelers)
    if cfg.heldout_panel_labelers:
        if panel_heldout_labelers is None:
            raise ValueError(
                "rm.heldout_panel_labelers is set but the panel's held-out labeler ids were not given: "
                "train_reward_model(cfg, panel_heldout_labelers=[lab.id for lab in Panel().heldout_labelers]) "
                "(tether rm and tether run pass them)"
            )
        names += [name for name in panel_heldout_labelers if name not in names]
    return names


@dataclass
class RMData:
    """What went into training, counted (nothing is dropped silently)."""

    train_comparisons: int
    valid_comparisons: int
    heldout_labeler_comparisons_excluded: int  # training-side comparisons by held-out labelers
    train_examples: int  # batch elements: rankings (kwise) or pairs (pairwise)
    train_pairs: int
    truncated_responses: int
    skipped: int
    skipped_valid: int


@dataclass
class RMResult:
    final_dir: Path  # the normalised RM, a Hugging Face sequence-classification directory
    normalization: Normalization
    eval_before: dict  # RMEval.to_json() of the initial model (head untrained)
    eval_after: RMEval
    data: RMData
    heldout_labelers: list[str] = field(default_factory=list)


@dataclass
class RMSplit:
    """The encoded comparisons a run trains and validates on, and what went into them."""

    train: list[RankedExample]  # rankings (kwise) or pairs (pairwise)
    valid: list[RankedExample]
    valid_comparisons: list[Comparison]
    data: RMData


def train_reward_model(
    cfg: RMConfig,
    *,
    comparisons: Sequence[Comparison] | None = None,
    panel_heldout_labelers: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    stop_after_steps: int | None = None,
) -> RMResult:
    """Train (or resume) a reward model as configured; returns the normalised checkpoint's path.

    ``comparisons`` replaces ``cfg.train_file`` (the pipeline passes records it already holds).
    Data parallel when launched by torchrun or inside a process group (Ray Train): each step's
    prompts are split over the ranks, evaluation too; rank 0 writes.
    ``panel_heldout_labelers``: the simulated panel's held-out labeler ids, which
    ``cfg.heldout_panel_labelers`` adds to the held-out ones (see :func:`heldout_labeler_ids`).
    ``stop_after_steps`` raises :class:`~tether.checkpoint.StopAfter` once this process has
    taken that many optimiser steps (tests use it to simulate a crash).
    """
    cfg.validate()
    d = init_from_env(cfg.model.device)
    log = main_only(log, d)
    heldout = heldout_labeler_ids(cfg, panel_heldout_labelers)
    out = start_run_dir(cfg, d.is_main)  # seeded: the new scalar head's initialisation, the same on every rank

    # 1. Data and model: every file validated before the model loads; split by prompt, keep
    #    held-out labelers out of training, encode.
    records = list(comparisons) if comparisons is not None else load_comparisons(cfg.train_file)
    if cfg.valid_file:
        train_c, valid_c = records, load_comparisons(cfg.valid_file)
    else:
        train_c, valid_c = split_by_prompt(records, cfg.valid_fraction, cfg.seed)
    demos = load_demonstrations(cfg.demonstrations_file)  # for the normalisation after training
    model, tokenizer = load_scalar_model(cfg.model, trainable=True)
    precision = autocast(cfg.model, next(model.parameters()).device)  # the training forwards only
    pad = tokenizer.pad_token_id
    split = encode_rm_data(cfg, tokenizer, train_c, valid_c, heldout, log)
    # A step takes batch_size prompts with every ranking of their responses (one per labeler).
    train_groups = group_rankings(split.train)
    steps_per_epoch = math.ceil(len(train_groups) / cfg.batch_size)
    seed_rank(cfg.seed, d)  # every rank built the same model; from here each has its own stream
    par = ParallelModel(model, cfg.model.parallel, d)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch * cfg.epochs)
    evaluate = partial(
        evaluate_rm,
        par,
        split.valid,
        pad,
        heldout_labelers=heldout,
        comparisons=split.valid_comparisons,
        batch_size=cfg.eval_batch_size,
    )

    # 2. Resume from the last state, if any; else evaluate the untrained head once.
    epoch0, step0, resumed = _resume(out, par, optimizer, scheduler, d, log, steps_per_epoch)
    logger = MetricsLogger(out / "metrics.jsonl", cfg, enabled=d.is_main)
    eval_before = _eval_before(out, evaluate, logger, fresh=not resumed, d=d)
    log(
        f"rm: {split.data.train_comparisons} training comparisons ({split.data.train_pairs} pairs) as "
        f"{len(split.train)} {'rankings' if cfg.loss == 'kwise' else 'pairs'} of {len(train_groups)} response "
        f"sets, {steps_per_epoch} steps/epoch x {cfg.epochs}; {len(split.valid)} held-out comparisons"
        + (f"; {d.world_size} data-parallel ranks ({par.strategy})" if d.enabled else "")
    )
    # The frozen trunk's output for a training sequence is the same in every epoch: keep it (in
    # memory only, so a resumed run rebuilds it).
    trunk_cache, how = TrunkCache.plan(
        model,
        n_tokens=sum(len(s) for s in {tuple(s) for ex in split.train for s in ex.sequences}),
        epochs_left=cfg.epochs - epoch0,
        limit_mib=cfg.trunk_cache_mib,
        parallel=par.strategy,
    )
    log(f"rm: trunk cache {how}")

    # 3. Epochs × optimiser steps (batch_size prompts) × micro-batches (micro_batch_size prompts).
    model.train()
    global_step = epoch0 * steps_per_epoch + step0
    steps_this_process = 0
    with progress_bar("rm", enabled=d.is_main) as bar:
        task = bar.add_task("rm", total=steps_per_epoch * cfg.epochs, completed=global_step, stats="")
        for epoch in range(epoch0, cfg.epochs):
            order = epoch_order(len(train_groups), cfg.seed, epoch)
            for step in range(step0 if epoch == epoch0 else 0, steps_per_epoch):
                t0 = time.perf_counter()
                picked = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                batch = [ex for i in picked for ex in train_groups[i]]
                stats = accumulate_gradients(par, batch, cfg.micro_batch_size, pad, cfg.loss, precision, trunk_cache)
                try:
                    if not math.isfinite(stats["loss"]):
                        raise NonFiniteError(f"non-finite loss ({stats['loss']})")
                    grad_norm = optimizer_step(model, optimizer, scheduler, cfg.optim.max_grad_norm)
                except NonFiniteError as e:
                    raise NonFiniteError(f"rm: step {global_step + 1}: {e}; {last_good_state(out / 'state')}") from None
                global_step += 1
                steps_this_process += 1
                record: dict[str, Any] = {
                    "step": global_step,
                    "epoch": epoch + (step + 1) / steps_per_epoch,
                    **stats,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "comparisons_per_s": len(batch) / (time.perf_counter() - t0),
                }
                if cfg.eval_every_steps and global_step % cfg.eval_every_steps == 0:
                    record.update(_eval_metrics(evaluate().to_json()))
                logger.log(record)
                bar.update(task, advance=1, stats=f"loss {stats['loss']:.3f} · acc {stats['accuracy']:.2f}")
                if global_step % cfg.save_every_steps == 0 and step + 1 < steps_per_epoch:
                    _save(out, par, optimizer, scheduler, epoch, step + 1, global_step)
                if stop_after_steps is not None and steps_this_process >= stop_after_steps:
                    raise StopAfter(f"rm: stopped after {stop_after_steps} steps (stop_after_steps)")
            _save(out, par, optimizer, scheduler, epoch + 1, 0, global_step)
    if trunk_cache:
        log(f"rm: trunk cache held {len(trunk_cache)} sequences, {trunk_cache.nbytes / 2**20:,.1f} MiB")

    # 4. Normalise (demonstrations score mean 0, paper §3.5), evaluate, save the final RM.
    norm = normalize_reward_model(
        par, tokenizer, demos, max_length=cfg.max_length, batch_size=cfg.eval_batch_size, scale=cfg.normalize_scale
    )
    log(_describe_normalization(norm, cfg.normalize_scale))
    eval_after = evaluate()
    logger.log(
        {"step": global_step, "epoch": cfg.epochs, **_eval_metrics(eval_after.to_json())}
        | {"bias": norm.bias, "gain": norm.gain}
    )
    logger.close()
    final = out / "final"
    weights = par.full_state_dict()  # (FSDP2: gathered, a collective; else None)
    if d.is_main:
        save_scalar_model(model, tokenizer, final, state_dict=weights)
        summary = {
            "eval_before": eval_before,
            "eval_after": eval_after.to_json(),
            "normalization": norm.__dict__,
            "data": split.data.__dict__,
            "heldout_labelers": heldout,
        }
        (out / "eval.json").write_text(json.dumps(summary, indent=1))
    log(f"rm: held-out {eval_after.summary()}")
    barrier()  # every rank returns once the final RM is on disk
    return RMResult(final, norm, eval_before, eval_after, split.data, heldout)


def encode_rm_data(
    cfg: RMConfig,
    tokenizer: PreTrainedTokenizerBase,
    train_c: list[Comparison],
    valid_c: list[Comparison],
    heldout: list[str],
    log: Callable[[str], None],
) -> RMSplit:
    """Leave held-out labelers' training-side comparisons out, tokenise (saying what was cut or
    skipped), and expand rankings into pairs for ``loss = 'pairwise'``."""
    n_excluded = sum(c.labeler_id in heldout for c in train_c)
    train_c = [c for c in train_c if c.labeler_id not in heldout]
    train_ex, report = encode_comparisons(tokenizer, train_c, cfg.max_length, cfg.overlength)
    valid_ex, valid_report = encode_comparisons(tokenizer, valid_c, cfg.max_length, cfg.overlength)
    for line in report.describe(cfg.max_length):
        log(f"rm: train: {line}")
    for line in valid_report.describe(cfg.max_length):
        log(f"rm: valid: {line}")
    if n_excluded:
        log(f"rm: left {n_excluded} training-side comparisons by held-out labelers {heldout} out")
    if not train_ex or not valid_ex:
        raise ValueError("rm: no training or validation comparisons left after the split and encoding")
    n_pairs = sum(len(c.pairs()) for c in train_c)
    if cfg.loss == "pairwise":
        if any(ex.k > 2 for ex in train_ex):
            log(
                "rm: loss='pairwise' expands K > 2 rankings into independent pairs (2 forwards "
                "each); the paper found this overfits (use loss='kwise')"
            )
        train_ex = expand_to_pairs(train_ex)
    data = RMData(
        train_comparisons=len(train_c),
        valid_comparisons=len(valid_c),
        heldout_labeler_comparisons_excluded=n_excluded,
        train_examples=len(train_ex),
        train_pairs=n_pairs,
        truncated_responses=report.truncated_responses,
        skipped=report.skipped,
        skipped_valid=valid_report.skipped,
    )
    return RMSplit(train_ex, valid_ex, list(valid_c), data)


def _resume(
    out: Path,
    par: ParallelModel,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    d: Dist,
    log: Callable[[str], None],
    steps_per_epoch: int,
) -> tuple[int, int, bool]:
    """Load the last state, if any (weights, optimiser, scheduler, RNG); returns (epoch, step in
    epoch) to start at and whether a state was loaded. A fresh run starts its metrics log anew."""
    metrics_path = out / "metrics.jsonl"
    # Rank 0 finds the state (and removes a killed save's leftovers); every rank loads that one.
    state_dir = broadcast_object(find_state(out / "state") if d.is_main else None)
    if state_dir is None:
        if d.is_main:
            metrics_path.unlink(missing_ok=True)  # lines of an attempt that never saved a state
        return 0, 0, False
    models, stateful = par.checkpoint_parts("reward_model", optimizer, gather=False)
    counters = load_state(state_dir, models, stateful | {"scheduler": scheduler}, rank=d.rank)
    if d.is_main:
        truncate_metrics(metrics_path, counters["global_step"])
    epoch0, step0 = counters["epoch"], counters["step_in_epoch"]
    log(f"rm: resuming at epoch {epoch0 + 1}, step {step0}/{steps_per_epoch} from {state_dir}")
    return epoch0, step0, True


def _eval_before(
    out: Path, evaluate: Callable[[], RMEval], logger: MetricsLogger, *, fresh: bool, d: Dist
) -> dict[str, Any]:
    """The untrained head's evaluation: run by a fresh run, read back by a resumed one."""
    if fresh:
        eval_before = evaluate().to_json()
        if d.is_main:
            (out / "eval_before.json").write_text(json.dumps(eval_before, indent=1))
        logger.log({"step": 0, "epoch": 0, **_eval_metrics(eval_before)})
        return eval_before
    saved: dict[str, Any] | None = json.loads((out / "eval_before.json").read_text()) if d.is_main else None
    return cast(dict[str, Any], broadcast_object(saved))


def _describe_normalization(norm: Normalization, scale: bool) -> str:
    cut = f", {norm.truncated} cut to max_length" if norm.truncated else ""
    return (
        f"rm: score = {norm.gain:.4f} · raw {norm.bias:+.4f}: the {norm.n} demonstrations score mean 0"
        + (" and std 1" if norm.scaled else "")
        + (" (no spread among them to scale by: gain 1)" if scale and not norm.scaled else "")
        + f" (raw mean {norm.raw_mean:.3f}, std {norm.raw_std:.3f}{cut})"
    )


def _eval_metrics(ev: dict) -> dict[str, float | None]:
    """The flat numbers of an evaluation for metrics.jsonl."""
    return {
        "valid_accuracy": ev["overall"]["accuracy"],
        "valid_accuracy_train_labelers": ev["train_labelers"]["accuracy"],
        "valid_accuracy_heldout_labelers": ev["heldout_labelers"]["accuracy"],
        "valid_margin": ev["margin"],
        "valid_score_mean": ev["scores"].get("mean"),
        "valid_score_std": ev["scores"].get("std"),
    }


def _save(
    out: Path,
    par: ParallelModel,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    epoch: int,
    step_in_epoch: int,
    global_step: int,
) -> None:
    counters = {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step}
    save_trainer_state(out / "state", par, "reward_model", optimizer, scheduler, counters)
