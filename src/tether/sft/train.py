"""Stage 1: supervised fine-tuning on demonstrations (InstructGPT §3.5, "Supervised fine-tuning").

Read top to bottom: load → encode → (resume) → epochs × optimiser steps × micro-batches → validate →
checkpoint → select. The loss is next-token cross-entropy on response tokens only, normalised by
the number of target tokens in the whole optimiser batch, so 8 micro-batches of 1 and 4 of 2 give
the same gradient, and so do N data-parallel ranks sharing the batch (:mod:`tether.distributed`).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

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
    truncate_metrics,
)
from tether.config import SFTConfig, save_config
from tether.data.formats import Demonstration
from tether.distributed import (
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


def train_sft(
    cfg: SFTConfig,
    scorer: Scorer | None = None,
    *,
    show_samples: int = 0,
    log: Callable[[str], None] = print,
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
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if d.is_main:
        save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    # 1. Data and model (every file validated whole before the model loads, let alone trains).
    demos = load_demonstrations(cfg.train_file)
    if cfg.valid_file:
        valid_demos = load_demonstrations(cfg.valid_file)
    else:
        demos, valid_demos = split_valid(demos, cfg.valid_fraction, cfg.seed)
    pretrain_texts = load_pretrain(cfg.pretrain_file) if cfg.pretrain_fraction > 0 else []
    model, tokenizer = load_causal_lm(cfg.model, trainable=True)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    precision = autocast(cfg.model, device)
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
    valid_prompts = [demo.prompt for demo in valid_demos[:show_samples]]
    metrics_path = out / "metrics.jsonl"
    # Rank 0 finds the state (and removes a killed save's leftovers); every rank loads that one.
    state_dir = broadcast_object(find_state(out / "state") if d.is_main else None)
    samples_before: list = []
    if state_dir is None and d.is_main:  # (before FSDP2 shards the model)
        samples_before = _samples(model, tokenizer, valid_prompts, cfg)
        (out / "samples_before.json").write_text(json.dumps(samples_before, indent=1))
    seed_rank(cfg.seed, d)  # every rank built the same model; from here each has its own stream
    par = ParallelModel(model, cfg.model.parallel, d)

    steps_per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)

    # 2. Resume from the last state, if any.
    epoch0, step0, epochs_done = 0, 0, []
    if state_dir is not None:
        models, stateful = par.checkpoint_parts("policy", optimizer, gather=False)
        counters = load_state(state_dir, models, stateful | {"scheduler": scheduler}, rank=d.rank)
        epoch0, step0, epochs_done = counters["epoch"], counters["step_in_epoch"], counters["epochs"]
        if d.is_main:
            truncate_metrics(metrics_path, counters["global_step"])
        log(f"sft: resuming at epoch {epoch0 + 1}, step {step0}/{steps_per_epoch} from {state_dir}")
    elif d.is_main:
        metrics_path.unlink(missing_ok=True)  # lines of an attempt that never saved a state
    logger = MetricsLogger(metrics_path, out / "tensorboard" if cfg.tensorboard else None, enabled=d.is_main)

    if state_dir is None:
        valid_before = evaluate_loss(par, valid_ex, pad, precision=precision)
        logger.log({"step": 0, "epoch": 0, "valid_loss": valid_before})
    else:
        # The counters keep it (a torn or emptied metrics log must not block the resume); states
        # written before they did have it only in the log's first line.
        logged = [m["valid_loss"] for m in read_metrics(metrics_path)[:1] if m.get("step") == 0]
        valid_before = counters.get("valid_loss_before", logged[0] if logged else math.nan)
        if d.is_main and (out / "samples_before.json").exists():
            samples_before = json.loads((out / "samples_before.json").read_text())
    log(
        f"sft: {len(train_ex)} training examples ({steps_per_epoch} steps/epoch x {cfg.epochs} epochs), "
        f"{len(valid_ex)} validation; valid loss before: {valid_before:.4f}"
        + (f"; {d.world_size} data-parallel ranks ({par.strategy})" if d.enabled else "")
    )

    # The frozen trunk's output for a training example is the same in every epoch: keep it (in
    # memory only, so a resumed run rebuilds it).
    trunk_cache, how = TrunkCache.plan(
        model,
        n_tokens=sum(len(ex.input_ids) for ex in train_ex),
        epochs_left=cfg.epochs - epoch0,
        limit_mib=cfg.trunk_cache_mib,
        parallel=par.strategy,
    )
    log(f"sft: trunk cache {how}")

    # 3. Epochs × optimiser steps × micro-batches.
    model.train()
    global_step = epoch0 * steps_per_epoch + step0
    steps_this_process = 0
    with progress_bar("sft", enabled=d.is_main) as bar:
        task = bar.add_task("sft", total=total_steps, completed=global_step, stats="")
        for epoch in range(epoch0, cfg.epochs):
            order = epoch_order(len(train_ex), cfg.seed, epoch)
            for step in range(step0 if epoch == epoch0 else 0, steps_per_epoch):
                t0 = time.perf_counter()
                batch = [train_ex[i] for i in order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
                # The whole batch's target tokens (every rank knows the batch): the loss is their
                # mean whichever rank holds which example.
                n_target = target_tokens(batch)
                micro = micro_batches(batch, cfg.micro_batch_size, d, equal=par.sharded)
                loss_total = 0.0
                for i, (chunk, real) in enumerate(micro):
                    m = collate(chunk, pad)
                    with par.sync(i == len(micro) - 1):  # accumulate; the step's last all-reduces
                        logits = par.run(forward_logits, m, precision, trunk_cache)
                        loss = lm_loss(logits, m["labels"].to(device), "sum") / max(n_target, 1)
                        # DDP averages over the ranks: × world_size makes it the sum (0: filler).
                        (loss * (par.world_size if real else 0.0)).backward()
                    loss_total += float(loss.detach()) if real else 0.0
                (loss_total,) = sum_floats([loss_total])
                try:
                    if not math.isfinite(loss_total):
                        raise NonFiniteError(f"non-finite loss ({loss_total})")
                    grad_norm = optimizer_step(model, optimizer, scheduler, cfg.optim.max_grad_norm)
                except NonFiniteError as e:
                    raise NonFiniteError(
                        f"sft: step {global_step + 1}: {e}; {last_good_state(out / 'state')}"
                    ) from None
                global_step += 1
                steps_this_process += 1
                n_tokens = sum(len(ex.input_ids) for ex in batch)  # every rank's, so the job's rate
                tok_s = n_tokens / (time.perf_counter() - t0)
                logger.log(
                    {
                        "step": global_step,
                        "epoch": epoch + (step + 1) / steps_per_epoch,
                        "loss": loss_total,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm,
                        "tokens_per_s": tok_s,
                    }
                )
                bar.update(task, advance=1, stats=f"loss {loss_total:.3f} · {tok_s:,.0f} tok/s")
                last_in_epoch = step + 1 == steps_per_epoch
                if global_step % cfg.save_every_steps == 0 and not last_in_epoch:
                    _save(out, par, optimizer, scheduler, epoch, step + 1, global_step, epochs_done, valid_before)
                if stop_after_steps is not None and steps_this_process >= stop_after_steps:
                    raise StopAfter(f"sft: stopped after {stop_after_steps} steps (stop_after_steps)")

            # 4. End of epoch: validation loss, a Hugging Face checkpoint, the resumable state.
            valid_loss = evaluate_loss(par, valid_ex, pad, precision=precision)
            epoch_dir = out / f"epoch-{epoch + 1}"
            weights = par.full_state_dict()  # (FSDP2: gathered, a collective; else None)
            if d.is_main:
                save_model(model, tokenizer, epoch_dir, state_dict=weights)
            epochs_done.append({"epoch": epoch + 1, "valid_loss": valid_loss, "dir": epoch_dir.name})
            logger.log({"step": global_step, "epoch": epoch + 1, "valid_loss": valid_loss})
            held = (
                f"; trunk cache: {len(trunk_cache)} sequences, {trunk_cache.nbytes / 2**20:,.1f} MiB"
                if trunk_cache
                else ""
            )
            log(f"sft: epoch {epoch + 1}/{cfg.epochs} valid loss {valid_loss:.4f}{held}")
            _save(out, par, optimizer, scheduler, epoch + 1, 0, global_step, epochs_done, valid_before)
    logger.close()
    if not d.is_main:  # rank 0 selects, samples and returns; the others return what it did
        return cast(SFTResult, broadcast_object(None))

    # 5. Select the checkpoint (paper: by RM score on validation prompts, not by validation loss).
    selected = select_checkpoint(out, epochs_done, cfg, scorer, [demo.prompt for demo in valid_demos])
    final = out / "final"
    if final.is_symlink() or final.exists():
        final.unlink() if final.is_symlink() else shutil.rmtree(final)
    final.symlink_to(selected["dir"])
    if not cfg.keep_epoch_checkpoints:
        for done in epochs_done:
            if done["dir"] != selected["dir"]:
                shutil.rmtree(out / done["dir"], ignore_errors=True)
    final_model, _ = load_causal_lm(str(final))
    samples_after = _samples(final_model, tokenizer, valid_prompts, cfg)
    result = SFTResult(
        final_dir=final,
        selected_epoch=selected["epoch"],
        valid_loss_before=valid_before,
        valid_loss_after=selected["valid_loss"],
        epochs=epochs_done,
        samples_before=[(prompt, text) for prompt, text in samples_before],
        samples_after=samples_after,
    )
    return broadcast_object(result)


def _save(
    out: Path,
    par: ParallelModel,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    epoch: int,
    step_in_epoch: int,
    global_step: int,
    epochs: list,
    valid_loss_before: float,
) -> None:
    counters = {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step, "epochs": epochs}
    counters["valid_loss_before"] = valid_loss_before
    save_trainer_state(out / "state", par, "policy", optimizer, scheduler, counters)


def _samples(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], cfg: SFTConfig
) -> list[tuple[str, str]]:
    if not prompts:
        return []
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    return list(zip(prompts, texts, strict=True))


def select_checkpoint(
    out: Path, epochs: list[dict], cfg: SFTConfig, scorer: Scorer | None, valid_prompts: list[str]
) -> dict:
    """Choose among the epoch checkpoints: by valid loss, last, or a scorer (paper: RM score)."""
    if cfg.select_by == "last":
        chosen = epochs[-1]
    elif cfg.select_by == "valid_loss":
        chosen = min(epochs, key=lambda e: e["valid_loss"])
    else:
        assert scorer is not None  # train_sft checked it before training
        for e in epochs:
            e["score"] = float(scorer(out / e["dir"], valid_prompts[: cfg.select_prompts]))
        chosen = max(epochs, key=lambda e: e["score"])
    (out / "selection.json").write_text(
        json.dumps({"select_by": cfg.select_by, "selected": chosen, "epochs": epochs}, indent=1)
    )
    return chosen
