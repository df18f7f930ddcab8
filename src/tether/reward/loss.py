"""Reward-model losses: the K-wise ranking loss of InstructGPT and plain Bradley-Terry pairs.

Stats are detached 0-dim tensors (no host sync inside the training step); ``float(v)`` them
to log.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kwise_ranking_loss(scores: Tensor, prompt_index: Tensor, ranks: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """InstructGPT eq. (1): the K-wise ranking loss, each prompt one batch element.

    For a prompt with K ranked responses, every pair ``(w, l)`` with ``rank_w < rank_l``
    (w ranked better; rank 1 = best) contributes ``-log σ(s_w - s_l)``. The paper averages
    over ``C(K, 2)`` pairs; labelers may tie, and a tied pair carries no preference, so we
    divide by the prompt's number of *untied* pairs instead (identical to ``1/C(K, 2)`` when
    there are no ties, and it keeps a prompt with many ties from weighing less). The per-prompt
    losses are then averaged over prompts, so every prompt weighs the same whatever its K
    (the paper's fix for overfitting when pairs are shuffled as independent examples).

    Each response appears once in ``scores`` (K forwards per prompt, not 2·C(K, 2)); pairs are
    formed here from an ``[N, N]`` pair table, without a Python loop, so K may vary per prompt.

    Args:
        scores: ``[N]`` RM score of each response, all prompts of the batch concatenated.
        prompt_index: ``[N]`` long; which prompt each response belongs to (any ids; they need
            not be contiguous or sorted).
        ranks: ``[N]`` rank of each response within its prompt; 1 = best, equal = tie.

    Returns:
        ``(loss, stats)``: ``loss`` a scalar; ``stats`` with ``accuracy`` (fraction of pairs
        with ``s_w > s_l``; an exact tie in score counts half, as in evaluation), ``margin`` (mean
        ``s_w - s_l``), ``n_pairs``, ``n_prompts`` (prompts that produced pairs) and
        ``n_prompts_without_pairs`` (all responses tied or K = 1; excluded from the mean).
        When no prompt produces a pair the loss is 0 with a zero gradient, not NaN.
    """
    if not (scores.dim() == prompt_index.dim() == ranks.dim() == 1) or not (
        scores.shape == prompt_index.shape == ranks.shape
    ):
        raise ValueError(
            "kwise_ranking_loss: scores, prompt_index and ranks must all be [N]; got "
            f"{tuple(scores.shape)}, {tuple(prompt_index.shape)}, {tuple(ranks.shape)}"
        )
    # Dense prompt ids 0..P-1 so per-prompt sums are one index_add.
    prompt_ids, prompt = torch.unique(prompt_index, return_inverse=True)
    n_all_prompts = prompt_ids.numel()

    # pair[i, j]: i and j answer the same prompt and i is ranked strictly better than j.
    pair = (prompt[:, None] == prompt[None, :]) & (ranks[:, None] < ranks[None, :])
    margin = scores[:, None] - scores[None, :]  # [N, N], s_i - s_j
    # torch.where (not *0): a masked-out pair contributes exactly 0 loss and 0 gradient.
    pair_loss = torch.where(pair, -F.logsigmoid(margin), torch.zeros_like(margin))

    # Sum each winner's row, then each prompt's rows: [N, N] -> [N] -> [P].
    loss_per_prompt = scores.new_zeros(n_all_prompts).index_add(0, prompt, pair_loss.sum(1))
    pairs_per_prompt = torch.zeros(n_all_prompts, dtype=torch.long, device=scores.device)
    pairs_per_prompt = pairs_per_prompt.index_add(0, prompt, pair.sum(1))
    has_pairs = pairs_per_prompt > 0
    n_prompts = has_pairs.sum()

    per_prompt = loss_per_prompt / pairs_per_prompt.clamp_min(1).to(scores.dtype)
    # Prompts without pairs contribute 0 to the sum and are left out of the count.
    loss = per_prompt.sum() / n_prompts.clamp_min(1).to(scores.dtype)

    with torch.no_grad():
        n_pairs = pair.sum()
        denom = n_pairs.clamp_min(1).to(scores.dtype)
        stats = {
            "accuracy": (((margin > 0) & pair).sum() + 0.5 * ((margin == 0) & pair).sum()).to(scores.dtype) / denom,
            "margin": torch.where(pair, margin, torch.zeros_like(margin)).sum() / denom,
            "n_pairs": n_pairs,
            "n_prompts": n_prompts,
            "n_prompts_without_pairs": n_all_prompts - n_prompts,
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def pairwise_loss(chosen: Tensor, rejected: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry pair loss ``mean(-log σ(chosen - rejected))`` (Christiano et al. 2017).

    The K = 2 case of :func:`kwise_ranking_loss`; kept for pair-only data and as its reference.

    Args:
        chosen: ``[B]`` score of the preferred response.
        rejected: ``[B]`` score of the other response of the same pair.

    Returns:
        ``(loss, stats)``: scalar loss; ``accuracy`` (fraction with chosen > rejected, a tie half),
        ``margin`` (mean chosen - rejected), ``n_pairs``.
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(
            f"pairwise_loss: chosen and rejected must both be [B]; got "
            f"{tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        stats = {
            "accuracy": ((margin > 0).to(margin.dtype) + 0.5 * (margin == 0).to(margin.dtype)).mean(),
            "margin": margin.mean(),
            "n_pairs": torch.tensor(margin.numel(), device=margin.device),
        }
    return loss, {k: v.detach() for k, v in stats.items()}
