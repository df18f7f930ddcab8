"""Language-model batches: examples tokenised for a response-only (or every-token) loss, their
collation and their loss. SFT trains on them, PPO-ptx's pretraining term and the evaluation's
perplexity measure with them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.data.formats import Demonstration
from tether.distributed import ParallelModel, as_parallel, micro_batches, sum_floats
from tether.models.generation import chat_prompt
from tether.models.tokens import document_end_id
from tether.models.trunk import TrunkCache
from tether.ops import IGNORE_INDEX, lm_loss


@dataclass
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens (and nothing else for pretraining text)
    truncated: bool = False


@dataclass
class EncodeReport:
    """Counts of what encoding did, so nothing is dropped silently."""

    kept: int = 0
    truncated: int = 0
    skipped_prompt_too_long: list[int] = field(default_factory=list)


def encode_demonstration(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> SFTExample | None:
    """Chat-formatted prompt (masked) + response + EOS (trained). None if the prompt alone is too long.

    InstructGPT stage 1: loss on the response tokens only, EOS appended so the model learns to
    stop. An over-length example keeps its whole prompt and loses the end of its response (and
    so its EOS).
    """
    prompt_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    if len(prompt_ids) >= max_length:
        return None
    room = max_length - len(prompt_ids)
    truncated = len(response_ids) > room
    response_ids = response_ids[:room]
    return SFTExample(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
        truncated=truncated,
    )


def encode_pretrain(
    tokenizer: PreTrainedTokenizerBase, text: str, max_length: int, *, score_document_end: bool = True
) -> SFTExample:
    """Plain text, every token trained (the pretraining / PPO-ptx objective), ended with the
    tokenizer's end-of-document token where it has one other than the turn end (SmolLM2's
    ``<|endoftext|>``, Llama-3's ``<|end_of_text|>``), else with nothing.

    Never with the turn end (``eos_token``): the pretraining loss would train "end the turn here"
    at the end of every paragraph. ``score_document_end=False`` (the held-out perplexity) keeps
    that token's label out of the loss: a measure of the text, not of where documents end.
    """
    text_ids = tokenizer(text, add_special_tokens=False).input_ids
    end = document_end_id(tokenizer)
    ids = (text_ids + ([] if end is None else [end]))[:max_length]
    labels = list(ids)
    if end is not None and not score_document_end and len(text_ids) < max_length:
        labels[len(text_ids)] = IGNORE_INDEX
    return SFTExample(input_ids=ids, labels=labels, truncated=len(text_ids) + (end is not None) > max_length)


def encode_demonstrations(
    tokenizer: PreTrainedTokenizerBase, demos: Sequence[Demonstration], max_length: int
) -> tuple[list[SFTExample], EncodeReport]:
    report = EncodeReport()
    out = []
    for i, d in enumerate(demos):
        ex = encode_demonstration(tokenizer, d.prompt, d.response, max_length)
        if ex is None:
            report.skipped_prompt_too_long.append(i)
            continue
        report.kept += 1
        report.truncated += ex.truncated
        out.append(ex)
    return out, report


def collate(examples: Sequence[SFTExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels [B,T]."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count_target_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss under the next-token shift (labels[:, 1:] != IGNORE_INDEX)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def forward_logits(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    precision: contextlib.AbstractContextManager,
    trunk: TrunkCache | None = None,
) -> torch.Tensor:
    """Logits [B,T,V] for a collated batch, on the model's device, under the configured precision.

    With ``trunk`` the frozen bottom blocks' output comes from (or goes into) its store and only
    the trained top runs on it (:class:`~tether.models.trunk.TrunkCache`).
    """
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    with precision:
        if trunk is not None:
            return trunk.logits(cast(PreTrainedModel, model), ids, mask)
        return model(input_ids=ids, attention_mask=mask).logits


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module | ParallelModel,
    examples: Sequence[SFTExample],
    pad_token_id: int,
    batch_size: int = 8,
    precision: contextlib.AbstractContextManager | None = None,
) -> float:
    """Mean NLL per target token over ``examples`` (eval mode, no dropout); exp of it is the perplexity.

    Given a :class:`ParallelModel`, every rank scores its shard and the sums are all-reduced.
    """
    par = as_parallel(model)
    was_training = par.module.training
    par.module.eval()
    device = next(par.module.parameters()).device
    total, count = 0.0, 0.0
    for chunk, real in micro_batches(examples, batch_size, par.dist, equal=par.sharded):
        batch = collate(chunk, pad_token_id)
        logits = par.run(forward_logits, batch, precision or contextlib.nullcontext())
        if real:
            total += float(lm_loss(logits, batch["labels"].to(device), "sum"))
            count += count_target_tokens(batch["labels"])
    total, count = sum_floats([total, count])
    if was_training:
        par.module.train()
    return total / max(count, 1)


def target_tokens(examples: Sequence[SFTExample]) -> int:
    """What :func:`count_target_tokens` gives for ``examples`` collated, without collating them."""
    return sum(label != IGNORE_INDEX for ex in examples for label in ex.labels[1:])
