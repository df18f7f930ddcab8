"""Stage 1: supervised fine-tuning on demonstrations (InstructGPT §3.5, "Supervised fine-tuning").

Read top to bottom: load → encode → (resume) → epochs × optimiser steps × micro-batches → validate →
checkpoint → select. The loss is next-token cross-entropy on response tokens only, normalised by
the number of target tokens in the whole optimiser batch, so 8 micro-batches of 1 and 4 of 2 give
the same gradient, and so do N data-parallel ranks sharing the batch (:mod:`tether.distributed`).

The paper keeps training after validation loss stops falling and picks the epoch afterwards; a
7B run cannot keep 16 full checkpoints for that. Each epoch is scored as it ends and only the best
so far and the last stay on disk (``keep_epoch_checkpoints`` keeps them all).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
from tether.config import SFTConfig
from tether.data.formats import Demonstration
from tether.distributed import (
    Dist,
    ParallelModel,
    broadcast_object,
    init_from_env,
    main_only,
    micro_batches,
    save_trainer_state,
    seed_rank,
    sum_floats,
)
from tether.metrics import MetricsLogger, progress_bar, read_metrics
from tether.models.generation import generate_texts
from tether.models.lm_batch import (
    SFTExample,
    collate,
    encode_demonstrations,
    encode_pretrain,
    evaluate_loss,
    forward_logits,
    target_tokens,
)
from tether.models.loading import autocast, load_causal_lm, save_model
from tether.models.trunk import TrunkCache
from tether.ops import lm_loss
from tether.optim import build_optimizer, build_scheduler, optimizer_step
from tether.sft.data import load_demonstrations, load_pretrain

# A checkpoint scorer: (HF model directory, validation prompts) → score, higher is better (the
# paper: the mean RM score of its samples; tether.reward.score.rm_scorer, built by the caller).
Scorer = Callable[[Path, Sequence[str]], float]
Log = Callable[[str], None]


def split_valid(demos: list[Demonstration], fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic held-out slice of the demonstrations (by a seeded permutation)."""
    order = list(range(len(demos)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, int(round(fraction * len(demos))))
    valid_idx = set(order[:n_valid])
    return [d for i, d in enumerate(demos) if i not in valid_idx], [demos[i] for i in sorted(valid_idx)]


def mix_pretraining(
    examples: list[SFTExample], pretrain: list[SFTExample], fraction: float, seed: int
) -> list[SFTExample]:
    """Add pretraining examples so they make up ``fraction`` of the training set (paper PPO-init: 10 %)."""
    if fraction <= 0:
        return examples
    if not pretrain:
        raise ValueError("pretrain_fraction > 0 but the pretraining corpus is empty")
    n = int(round(fraction / (1.0 - fraction) * len(examples)))
    rng = random.Random(seed)
    return examples + [pretrain[rng.randrange(len(pretrain))] for _ in range(n)]


@dataclass
class SFTResult:
    final_dir: Path  # the selected checkpoint (HF model directory)
    selected_epoch: int
    valid_loss_before: float
    valid_loss_after: float  # of the selected checkpoint
    epochs: list[dict] = field(default_factory=list)
    samples_before: list[tuple[str, str]] = field(default_factory=list)
    samples_after: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class SFTData:
    """The encoded demonstrations (and mixed-in pretraining text) a run trains and validates on."""

    train: list[SFTExample]
    valid: list[SFTExample]
    valid_prompts: list[str]  # for RM-score selection and the samples before / after


@dataclass
class Progress:
    """Where training stands: what a resumable state stores besides weights, optimiser and RNG."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    epochs: list[dict] = field(default_factory=list)  # {"epoch", "valid_loss", "dir"[, "score"]} per epoch
    valid_loss_before: float = math.nan


def train_sft(
    cfg: SFTConfig,
    scorer: Scorer | None = None,
    *,
    show_samples: int = 0,
    log: Log = print,
    stop_after_steps: int | None = None,
) -> SFTResult:
    """Run (or resume) SFT as configured; returns where the selected checkpoint is.

    Data parallel when launched by torchrun or inside a process group (Ray Train): the batch is
    split over the ranks, rank 0 writes, every rank returns the same result.

    ``scorer`` scores each epoch's checkpoint on up to ``select_prompts`` validation prompts when
    ``select_by = 'rm_score'`` (``tether sft`` builds it from ``reward_model``).

    ``stop_after_steps`` raises :class:`~tether.checkpoint.StopAfter` once this process has
    taken that many optimiser steps (tests use it to simulate a crash).
    """
    cfg.validate()
    if cfg.select_by == "rm_score" and scorer is None:
        raise ValueError(
            "sft: select_by = 'rm_score' needs a scorer: train_sft(cfg, scorer=rm_scorer(cfg.reward_model, "
            "cfg.max_new_tokens, cfg.seed)) from tether.reward.score (tether sft builds it)"
        )
    d = init_from_env(cfg.model.device)
    log = main_only(log, d)
    out = start_run_dir(cfg, d.is_main)

    # 1. Data and model (every file validated whole before the model loads, let alone trains).
    demos, valid_demos, pretrain_texts = load_sft_files(cfg)
    model, tokenizer = load_causal_lm(cfg.model, trainable=True)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    precision = autocast(cfg.model, device)
    data = encode_sft_data(cfg, tokenizer, demos, valid_demos, pretrain_texts, log)
    shown = data.valid_prompts[:show_samples]

    # 2. Resume from the last state, if any (rank 0 finds it and removes a killed save's leftovers).
    state_dir = broadcast_object(find_state(out / "state") if d.is_main else None)
    samples_before = _samples_before(out, model, tokenizer, shown, cfg, fresh=state_dir is None, d=d)
    seed_rank(cfg.seed, d)  # every rank built the same model; from here each has its own stream
    par = ParallelModel(model, cfg.model.parallel, d)  # (after the samples: FSDP2 shards the model)
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch * cfg.epochs)
    progress = _resume(out, state_dir, par, optimizer, scheduler, d, log, steps_per_epoch)
    logger = MetricsLogger(out / "metrics.jsonl", cfg, enabled=d.is_main)
    if state_dir is None:
        progress.valid_loss_before = evaluate_loss(par, data.valid, pad, precision=precision)
        logger.log({"step": 0, "epoch": 0, "valid_loss": progress.valid_loss_before})
    log(
        f"sft: {len(data.train)} training examples ({steps_per_epoch} steps/epoch x {cfg.epochs} epochs), "
        f"{len(data.valid)} validation; valid loss before: {progress.valid_loss_before:.4f}"
        + (f"; {d.world_size} data-parallel ranks ({par.strategy})" if d.enabled else "")
    )
    # The frozen trunk's output for a training example is the same in every epoch: keep it (in
    # memory only, so a resumed run rebuilds it).
    trunk_cache, how = TrunkCache.plan(
        model,
        n_tokens=sum(len(ex.input_ids) for ex in data.train),
        epochs_left=cfg.epochs - progress.epoch,
        limit_mib=cfg.trunk_cache_mib,
        parallel=par.strategy,
    )
    log(f"sft: trunk cache {how}")

    # 3. Epochs × optimiser steps × micro-batches.
    model.train()
    epoch0, steps_this_process = progress.epoch, 0
    with progress_bar("sft", enabled=d.is_main) as bar:
        task = bar.add_task("sft", total=steps_per_epoch * cfg.epochs, completed=progress.global_step, stats="")
        for epoch in range(epoch0, cfg.epochs):
            order = epoch_order(len(data.train), cfg.seed, epoch)
            for step in range(progress.step_in_epoch if epoch == epoch0 else 0, steps_per_epoch):
                t0 = time.perf_counter()
                batch = [data.train[i] for i in order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
                loss = accumulate_lm_gradients(par, batch, cfg.micro_batch_size, pad, precision, trunk_cache)
                try:
                    if not math.isfinite(loss):
                        raise NonFiniteError(f"non-finite loss ({loss})")
                    grad_norm = optimizer_step(model, optimizer, scheduler, cfg.optim.max_grad_norm)
                except NonFiniteError as e:
                    raise NonFiniteError(
                        f"sft: step {progress.global_step + 1}: {e}; {last_good_state(out / 'state')}"
                    ) from None
                progress.global_step += 1
                steps_this_process += 1
                tok_s = sum(len(ex.input_ids) for ex in batch) / (time.perf_counter() - t0)  # the job's rate
                logger.log(
                    {
                        "step": progress.global_step,
                        "epoch": epoch + (step + 1) / steps_per_epoch,
                        "loss": loss,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm,
                        "tokens_per_s": tok_s,
                    }
                )
                bar.update(task, advance=1, stats=f"loss {loss:.3f} · {tok_s:,.0f} tok/s")
                if progress.global_step % cfg.save_every_steps == 0 and step + 1 < steps_per_epoch:
                    progress.epoch, progress.step_in_epoch = epoch, step + 1
                    _save(out, par, optimizer, scheduler, progress)
                if stop_after_steps is not None and steps_this_process >= stop_after_steps:
                    raise StopAfter(f"sft: stopped after {stop_after_steps} steps (stop_after_steps)")

            # 4. End of epoch: validation loss, a Hugging Face checkpoint (the best so far and this
            #    one kept), the resumable state.
            valid_loss = evaluate_loss(par, data.valid, pad, precision=precision)
            done = save_epoch(out, par, tokenizer, cfg, epoch + 1, valid_loss, progress.epochs, scorer, data, d)
            progress.epochs.append(done)
            logger.log({"step": progress.global_step, "epoch": epoch + 1, "valid_loss": valid_loss})
            held = (
                f"; trunk cache: {len(trunk_cache)} sequences, {trunk_cache.nbytes / 2**20:,.1f} MiB"
                if trunk_cache
                else ""
            )
            log(f"sft: epoch {epoch + 1}/{cfg.epochs} valid loss {valid_loss:.4f}{held}")
            progress.epoch, progress.step_in_epoch = epoch + 1, 0
            _save(out, par, optimizer, scheduler, progress)
    logger.close()
    if not d.is_main:  # rank 0 selects, samples and returns; the others return what it did
        return cast(SFTResult, broadcast_object(None))

    # 5. Select the checkpoint (paper: by RM score on validation prompts, not by validation loss).
    selected = select_checkpoint(out, progress.epochs, cfg)
    final = _link_final(out, selected["dir"])
    if not cfg.keep_epoch_checkpoints:
        _prune_epochs(out, progress.epochs, keep={selected["dir"]})
    final_model, _ = load_causal_lm(str(final))
    result = SFTResult(
        final_dir=final,
        selected_epoch=selected["epoch"],
        valid_loss_before=progress.valid_loss_before,
        valid_loss_after=selected["valid_loss"],
        epochs=progress.epochs,
        samples_before=[(prompt, text) for prompt, text in samples_before],
        samples_after=_samples(final_model, tokenizer, shown, cfg),
    )
    return broadcast_object(result)


def load_sft_files(cfg: SFTConfig) -> tuple[list[Demonstration], list[Demonstration], list]:
    """(training demonstrations, validation demonstrations, pretraining texts), every file read
    and validated whole."""
    demos = load_demonstrations(cfg.train_file)
    if cfg.valid_file:
        valid_demos = load_demonstrations(cfg.valid_file)
    else:
        demos, valid_demos = split_valid(demos, cfg.valid_fraction, cfg.seed)
    pretrain_texts = load_pretrain(cfg.pretrain_file) if cfg.pretrain_fraction > 0 else []
    return demos, valid_demos, pretrain_texts


def encode_sft_data(
    cfg: SFTConfig,
    tokenizer: PreTrainedTokenizerBase,
    demos: list[Demonstration],
    valid_demos: list[Demonstration],
    pretrain_texts: list,
    log: Log,
) -> SFTData:
    """Tokenise (saying what was skipped or cut) and mix in the pretraining share."""
    train_ex, report = encode_demonstrations(tokenizer, demos, cfg.max_length)
    valid_ex, _ = encode_demonstrations(tokenizer, valid_demos, cfg.max_length)
    if report.skipped_prompt_too_long:
        log(
            f"sft: skipped {len(report.skipped_prompt_too_long)} demonstrations whose prompt alone exceeds "
            f"max_length={cfg.max_length} (indices {report.skipped_prompt_too_long[:10]})"
        )
    if report.truncated:
        log(f"sft: truncated the response of {report.truncated} demonstrations to max_length={cfg.max_length}")
    if not train_ex or not valid_ex:
        raise ValueError("sft: no training or validation examples left after encoding")
    if cfg.pretrain_fraction > 0:
        corpus = [encode_pretrain(tokenizer, t.text, cfg.max_length) for t in pretrain_texts]
        train_ex = mix_pretraining(train_ex, corpus, cfg.pretrain_fraction, cfg.seed)
    return SFTData(train_ex, valid_ex, [demo.prompt for demo in valid_demos])


def accumulate_lm_gradients(
    par: ParallelModel,
    batch: list[SFTExample],
    micro_batch_size: int,
    pad_token_id: int,
    precision: contextlib.AbstractContextManager,
    trunk_cache: TrunkCache | None,
) -> float:
    """Backward the loss of one optimiser step's ``batch``, ``micro_batch_size`` examples at a time;
    returns the step's loss (the whole job's, summed over the ranks)."""
    device = next(par.module.parameters()).device
    # The whole batch's target tokens (every rank knows the batch): the loss is their mean
    # whichever rank holds which example.
    n_target = target_tokens(batch)
    micro = micro_batches(batch, micro_batch_size, par.dist, equal=par.sharded)
    loss_total = 0.0
    for i, (chunk, real) in enumerate(micro):
        m = collate(chunk, pad_token_id)
        with par.sync(i == len(micro) - 1):  # accumulate; the step's last all-reduces
            logits = par.run(forward_logits, m, precision, trunk_cache)
            loss = lm_loss(logits, m["labels"].to(device), "sum") / max(n_target, 1)
            # DDP averages over the ranks: × world_size makes it the sum (0: filler).
            (loss * (par.world_size if real else 0.0)).backward()
        loss_total += float(loss.detach()) if real else 0.0
    (loss_total,) = sum_floats([loss_total])
    return loss_total


def save_epoch(
    out: Path,
    par: ParallelModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: SFTConfig,
    epoch: int,
    valid_loss: float,
    before: list[dict],
    scorer: Scorer | None,
    data: SFTData,
    d: Dist,
) -> dict[str, Any]:
    """Write epoch ``epoch``'s Hugging Face checkpoint (LoRA: the adapters) and score it; returns
    its entry for the selection.

    The epochs ``before`` it keep their directories only while they are the best so far: the last
    one, if not the best, can never become it, so it goes before this one is written (at most two
    checkpoints on disk at any time).
    """
    if not cfg.keep_epoch_checkpoints and before and d.is_main:
        _prune_epochs(out, before, keep={best_epoch(before, cfg.select_by)["dir"]})
    epoch_dir = out / f"epoch-{epoch}"
    weights = par.full_state_dict()  # (FSDP2: gathered, a collective; else None)
    if d.is_main:
        save_model(
            par.module, tokenizer, epoch_dir, state_dict=weights, adapters=True, merge_lora=cfg.model.lora.save_merged
        )
    done: dict[str, Any] = {"epoch": epoch, "valid_loss": valid_loss, "dir": epoch_dir.name}
    if cfg.select_by == "rm_score":
        assert scorer is not None  # train_sft checked it before training
        # Scoring samples and loads models: the training's random streams must not notice.
        with torch.random.fork_rng():
            score = float(scorer(epoch_dir, data.valid_prompts[: cfg.select_prompts])) if d.is_main else None
        done["score"] = broadcast_object(score)
    return done


def best_epoch(epochs: list[dict], select_by: str) -> dict:
    """The best of the epochs so far: the last, the lowest valid loss or the highest RM score."""
    if select_by == "last":
        return epochs[-1]
    if select_by == "valid_loss":
        return min(epochs, key=lambda e: e["valid_loss"])
    return max(epochs, key=lambda e: e["score"])


def select_checkpoint(out: Path, epochs: list[dict], cfg: SFTConfig) -> dict:
    """Choose among the epoch checkpoints (paper: by RM score) and write ``selection.json``."""
    chosen = best_epoch(epochs, cfg.select_by)
    (out / "selection.json").write_text(
        json.dumps({"select_by": cfg.select_by, "selected": chosen, "epochs": epochs}, indent=1)
    )
    return chosen


def _prune_epochs(out: Path, epochs: list[dict], keep: set[str]) -> None:
    for done in epochs:
        if done["dir"] not in keep:
            shutil.rmtree(out / done["dir"], ignore_errors=True)


def _link_final(out: Path, selected_dir: str) -> Path:
    """``out/final``: a relative link to the selected epoch's directory (the run can move)."""
    final = out / "final"
    if final.is_symlink() or final.exists():
        final.unlink() if final.is_symlink() else shutil.rmtree(final)
    final.symlink_to(selected_dir)
    return final


def _resume(
    out: Path,
    state_dir: Path | None,
    par: ParallelModel,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    d: Dist,
    log: Log,
    steps_per_epoch: int,
) -> Progress:
    """Load the state (weights, optimiser, scheduler, RNG) and return its counters; a fresh run
    starts its metrics log anew."""
    metrics_path = out / "metrics.jsonl"
    if state_dir is None:
        if d.is_main:
            metrics_path.unlink(missing_ok=True)  # lines of an attempt that never saved a state
        return Progress()
    models, stateful = par.checkpoint_parts("policy", optimizer, gather=False)
    counters = load_state(state_dir, models, stateful | {"scheduler": scheduler}, rank=d.rank)
    if d.is_main:
        truncate_metrics(metrics_path, counters["global_step"])
    # The counters keep the loss before training (a torn or emptied metrics log must not block
    # the resume); states written before they did have it only in the log's first line.
    logged = [m["valid_loss"] for m in read_metrics(metrics_path)[:1] if m.get("step") == 0]
    progress = Progress(
        epoch=counters["epoch"],
        step_in_epoch=counters["step_in_epoch"],
        global_step=counters["global_step"],
        epochs=counters["epochs"],
        valid_loss_before=counters.get("valid_loss_before", logged[0] if logged else math.nan),
    )
    log(
        f"sft: resuming at epoch {progress.epoch + 1}, step {progress.step_in_epoch}/{steps_per_epoch} from {state_dir}"
    )
    return progress


def _save(
    out: Path, par: ParallelModel, optimizer: torch.optim.Optimizer, scheduler: LRScheduler, progress: Progress
) -> None:
    counters = {
        "epoch": progress.epoch,
        "step_in_epoch": progress.step_in_epoch,
        "global_step": progress.global_step,
        "epochs": progress.epochs,
        "valid_loss_before": progress.valid_loss_before,
    }
    save_trainer_state(out / "state", par, "policy", optimizer, scheduler, counters)


def _samples_before(
    out: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    cfg: SFTConfig,
    *,
    fresh: bool,
    d: Dist,
) -> list:
    """The untrained model's answers (rank 0): generated by a fresh run, read back by a resumed one."""
    path = out / "samples_before.json"
    if not d.is_main:
        return []
    if fresh:
        samples = _samples(model, tokenizer, prompts, cfg)
        path.write_text(json.dumps(samples, indent=1))
        return samples
    return json.loads(path.read_text()) if path.exists() else []


def _samples(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], cfg: SFTConfig
) -> list[tuple[str, str]]:
    if not prompts:
        return []
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    return list(zip(prompts, texts, strict=True))
