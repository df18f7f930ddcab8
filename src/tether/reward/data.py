"""Stage 2 data: comparisons tokenised as K sequences each, batched one prompt per batch element.

A comparison (one labeler's ranking of K responses to one prompt) becomes K token sequences
``chat_prompt(prompt) ⊕ response ⊕ EOS``, tokenised exactly as the policy sees them (prompt and
response tokenised separately, as in SFT and in sampling). A sampled response carries the token
ids the policy drew (``response_ids``): those are used, not a re-tokenisation of the decoded text,
which can differ from them (non-canonical BPE splits, whitespace dropped by the decoding), so the
RM trains on exactly the ids PPO scores; a text-only comparison (users' files, the labeling app) is
tokenised from its text. A response the policy never ended
(``ended[i]`` false: it ran out of tokens) gets no EOS, so the RM trains on the very sequence PPO
scores, and learns what an unfinished answer is worth instead of reading it as finished. A
:class:`RankingBatch` concatenates the sequences of several prompts and remembers which prompt
and rank each one has, so the K-wise loss (InstructGPT eq. 1) can form every pair of a prompt
from K forwards.

Nothing is dropped silently: a comparison that cannot be used raises (bad K, a ranking that does
not match its responses, an empty response, all responses tied), and an over-length one is cut
or skipped and counted in :class:`EncodeReport`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import get_args

import torch
from transformers import PreTrainedTokenizerBase

from tether.config import Overlength
from tether.data.formats import K_MAX, K_MIN, Comparison, read_records
from tether.models.generation import chat_prompt


@dataclass
class RankedExample:
    """One comparison, tokenised: K sequences and their ranks."""

    sequences: list[list[int]]  # K token-id lists: chat prompt + response (+ EOS unless cut)
    ranks: list[int]  # [K] 1 = best, equal = tie
    labeler_id: str | None  # None: the comparison names no labeler (per-labeler figures skip it)
    truncated: int = 0  # how many of the K responses were cut to max_length

    @property
    def k(self) -> int:
        return len(self.sequences)


@dataclass
class EncodeReport:
    """What encoding did to the comparisons, so that nothing is dropped silently."""

    kept: int = 0
    truncated_responses: int = 0  # responses cut to max_length (their EOS is cut too)
    skipped_prompt_too_long: list[int] = field(default_factory=list)  # comparison indices
    skipped_overlength: list[int] = field(default_factory=list)  # overlength='skip' only

    @property
    def skipped(self) -> int:
        return len(self.skipped_prompt_too_long) + len(self.skipped_overlength)

    def describe(self, max_length: int) -> list[str]:
        """Log lines for whatever was cut or skipped (empty when nothing was)."""
        lines = []
        if self.skipped_prompt_too_long:
            lines.append(
                f"skipped {len(self.skipped_prompt_too_long)} comparisons whose prompt alone "
                f"exceeds max_length={max_length} (indices {self.skipped_prompt_too_long[:10]})"
            )
        if self.skipped_overlength:
            lines.append(
                f"skipped {len(self.skipped_overlength)} comparisons with a response over "
                f"max_length={max_length} (overlength='skip'; "
                f"indices {self.skipped_overlength[:10]})"
            )
        if self.truncated_responses:
            lines.append(
                f"cut {self.truncated_responses} responses to max_length={max_length} "
                "(prompt kept; the score is read at the last kept token)"
            )
        return lines


def check_comparison(c: Comparison) -> None:
    """The contract of a Comparison built in memory (files are checked by read_records)."""
    if not K_MIN <= c.k <= K_MAX:
        raise ValueError(f"comparison for prompt {c.prompt[:40]!r}: K={c.k}; K must be {K_MIN}..{K_MAX}")
    if len(c.ranking) != c.k:
        raise ValueError(f"comparison for prompt {c.prompt[:40]!r}: {len(c.ranking)} ranks for {c.k} responses")
    if any(not r.strip() for r in c.responses):
        raise ValueError(f"comparison for prompt {c.prompt[:40]!r}: a response is empty")
    if not c.pairs():
        raise ValueError(f"comparison for prompt {c.prompt[:40]!r}: all responses tie (no pair)")


def encode_response(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    response: str | list[int],
    max_length: int,
    *,
    ended: bool = True,
) -> tuple[list[int], bool]:
    """``prompt_ids ⊕ response ⊕ EOS``, cut to ``max_length`` keeping the prompt.

    ``response`` is a text (tokenised here) or the token ids the policy sampled (used as they
    are). ``ended=False`` leaves EOS off: a sampled response that ran out of tokens never produced
    one, and the RM must see it as the policy wrote it. Returns ``(ids, truncated)``; a cut
    response loses its EOS, so the score is read at the last response token that fits.
    """
    if isinstance(response, str):
        response_ids = tokenizer(response, add_special_tokens=False).input_ids
    else:
        response_ids = list(response)
    if ended:
        response_ids = response_ids + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    return prompt_ids + response_ids[:room], len(response_ids) > room


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The chat-formatted prompt's token ids (no special tokens added beyond the template)."""
    return tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False).input_ids


def comparison_responses(tokenizer: PreTrainedTokenizerBase, c: Comparison, index: int) -> list[str | list[int]]:
    """What the RM reads of a comparison's responses: the sampled ids when it carries them (checked
    against ``tokenizer``'s vocabulary: ids of another tokenizer would be other words), else the texts."""
    if c.response_ids is None:
        return [*c.responses]
    if len(c.response_ids) != c.k:
        raise ValueError(f"comparison {index}: {len(c.response_ids)} response_ids lists for {c.k} responses")
    vocab = len(tokenizer)
    for j, ids in enumerate(c.response_ids):
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"comparison {index}: response_ids[{j}] holds token id {bad[0]}, outside the tokenizer's "
                f"vocabulary of {vocab}: sampled with another tokenizer? Drop response_ids to tokenise the text"
            )
    return [list(ids) for ids in c.response_ids]


def encode_comparisons(
    tokenizer: PreTrainedTokenizerBase,
    comparisons: Sequence[Comparison],
    max_length: int,
    overlength: Overlength = "truncate",
) -> tuple[list[RankedExample], EncodeReport]:
    """Tokenise every comparison; over-length ones are cut or skipped (``overlength``), counted.

    A comparison whose prompt alone leaves no room for a response token is always skipped (and
    counted): cutting the prompt would score a different question.
    """
    if overlength not in get_args(Overlength):
        raise ValueError(f"overlength must be one of {', '.join(get_args(Overlength))}; got {overlength!r}")
    report = EncodeReport()
    out = []
    for i, c in enumerate(comparisons):
        check_comparison(c)
        p_ids = prompt_ids(tokenizer, c.prompt)
        if len(p_ids) >= max_length:
            report.skipped_prompt_too_long.append(i)
            continue
        ended = c.ended if c.ended is not None else [True] * c.k
        encoded = [
            encode_response(tokenizer, p_ids, r, max_length, ended=e)
            for r, e in zip(comparison_responses(tokenizer, c, i), ended, strict=True)
        ]
        n_cut = sum(cut for _, cut in encoded)
        if n_cut and overlength == "skip":
            report.skipped_overlength.append(i)
            continue
        report.kept += 1
        report.truncated_responses += n_cut
        out.append(RankedExample([ids for ids, _ in encoded], list(c.ranking), c.labeler_id, n_cut))
    return out, report


def expand_to_pairs(examples: Sequence[RankedExample]) -> list[RankedExample]:
    """Every (winner, loser) pair of every ranking as its own K = 2 example, ranks ``[1, 2]``.

    The pairwise baseline: C(K,2) independent examples per ranking, 2 forwards each. Ties give
    no pair.
    """
    out = []
    for ex in examples:
        for w in range(ex.k):
            for lo in range(ex.k):
                if ex.ranks[w] < ex.ranks[lo]:
                    out.append(RankedExample([ex.sequences[w], ex.sequences[lo]], [1, 2], ex.labeler_id))
    return out


def group_rankings(examples: Sequence[RankedExample]) -> list[list[RankedExample]]:
    """Rankings of the very same K sequences (several labelers, one task) grouped, first-seen order.

    A group costs one forward per distinct sequence however many labelers ranked it, so the
    trainer batches and micro-batches whole groups.
    """
    groups: dict[tuple[tuple[int, ...], ...], list[RankedExample]] = {}
    for ex in examples:
        groups.setdefault(tuple(tuple(s) for s in ex.sequences), []).append(ex)
    return list(groups.values())


@dataclass
class RankingBatch:
    """P rankings over U distinct sequences: N = Σ K_p (ranking, response) entries.

    The record that crosses from data to the RM trainer. Each distinct sequence is one row of
    ``input_ids`` (forwarded once); ``sequence_index`` maps each of the N entries to its row, so
    rankings of the same responses by several labelers share the forwards. The K-wise loss reads
    ``prompt_index`` and ``ranks`` to form every pair of a ranking inside the batch.
    """

    input_ids: torch.Tensor  # [U, T] long, right-padded with the pad token (never EOS)
    attention_mask: torch.Tensor  # [U, T] long, 1 on real tokens
    sequence_index: torch.Tensor  # [N] long, 0..U-1: the row of input_ids of each entry
    prompt_index: torch.Tensor  # [N] long, 0..P-1: which ranking each entry belongs to
    ranks: torch.Tensor  # [N] long, rank within its ranking (1 = best, equal = tie)
    labeler_ids: list[str | None]  # [P] who made each ranking (None: not named)

    @property
    def n_prompts(self) -> int:
        return len(self.labeler_ids)

    @property
    def n_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> RankingBatch:
        return RankingBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.sequence_index.to(device),
            self.prompt_index.to(device),
            self.ranks.to(device),
            self.labeler_ids,
        )


def pad_right(sequences: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: (input_ids [N,T], attention_mask [N,T])."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def unique_sequences(examples: Sequence[RankedExample]) -> tuple[list[list[int]], list[int]]:
    """(distinct sequences in first-seen order, the index of each example's each sequence)."""
    rows: dict[tuple[int, ...], int] = {}
    index = [rows.setdefault(tuple(s), len(rows)) for ex in examples for s in ex.sequences]
    return [list(s) for s in rows], index


def collate(examples: Sequence[RankedExample], pad_token_id: int) -> RankingBatch:
    """One RankingBatch from P ranked examples (K may differ); identical sequences forward once."""
    sequences, index = unique_sequences(examples)
    ids, mask = pad_right(sequences, pad_token_id)
    prompt_index = torch.tensor([p for p, ex in enumerate(examples) for _ in range(ex.k)], dtype=torch.long)
    ranks = torch.tensor([r for ex in examples for r in ex.ranks], dtype=torch.long)
    sequence_index = torch.tensor(index, dtype=torch.long)
    return RankingBatch(ids, mask, sequence_index, prompt_index, ranks, [ex.labeler_id for ex in examples])


# --------------------------------------------------------------------------------------------
# Loading and splitting


def load_comparisons(path: str | None) -> list[Comparison]:
    """Comparisons from a file, validated whole (DataError names file, line and field)."""
    if path is None:
        raise ValueError(
            "rm: train_file is required: a comparisons file (JSONL/Parquet), e.g. exported by the "
            "labeling app or written by the simulated panel"
        )
    return read_records(path, "comparison")


def prompt_key(c: Comparison) -> str:
    """What makes two comparisons "the same prompt" (several labelers may rank one prompt)."""
    return c.prompt_id or c.prompt


def split_by_prompt(
    comparisons: Sequence[Comparison], fraction: float, seed: int
) -> tuple[list[Comparison], list[Comparison]]:
    """(train, valid): a seeded ``fraction`` of the prompts, with all their comparisons, held out.

    By prompt, not by comparison: when several labelers ranked the same prompt, a per-comparison
    split would put the same responses on both sides and flatter held-out accuracy.
    """
    keys = sorted({prompt_key(c) for c in comparisons})
    random.Random(seed).shuffle(keys)
    n_valid = max(1, int(round(fraction * len(keys))))
    if n_valid >= len(keys):
        raise ValueError(f"rm: {len(keys)} prompts are too few to hold out {fraction:.0%} for validation")
    valid_keys = set(keys[:n_valid])
    train = [c for c in comparisons if prompt_key(c) not in valid_keys]
    valid = [c for c in comparisons if prompt_key(c) in valid_keys]
    return train, valid
