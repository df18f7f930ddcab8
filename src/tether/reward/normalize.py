"""The RM's normalisation: a bias so that labeler demonstrations score mean 0 (InstructGPT §3.5).

"At the end of training, we normalize the reward model using a bias so that the labeler
demonstrations achieve a mean score of 0 before doing RL." The bias is stored in the
checkpoint's config (``tether_reward_bias``, see :mod:`tether.models.heads`), so it travels with
the model and every scorer that uses :func:`tether.models.heads.reward_scores` applies it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tether.data.formats import Demonstration
from tether.models.heads import set_reward_bias
from tether.reward.score import encode_texts, score_sequences


@dataclass
class Normalization:
    bias: float  # added to every raw score
    raw_mean: float  # mean raw score of the demonstrations (= -bias)
    raw_std: float
    n: int  # demonstrations scored
    truncated: int  # of which cut to max_length


def normalize_reward_model(
    model,
    tokenizer: PreTrainedTokenizerBase,
    demonstrations: Sequence[Demonstration],
    *,
    max_length: int | None = None,
    batch_size: int = 32,
) -> Normalization:
    """Set the model's bias to minus the mean raw score of ``demonstrations``; returns the numbers.

    Raw scores (bias excluded) are used, so normalising twice gives the same bias.
    """
    if not demonstrations:
        raise ValueError("rm: no demonstrations to normalise the reward model with")
    sequences, n_cut = encode_texts(
        tokenizer,
        [d.prompt for d in demonstrations],
        [d.response for d in demonstrations],
        max_length,
    )
    raw = score_sequences(
        model, sequences, tokenizer.pad_token_id, batch_size, normalized=False
    ).double()
    bias = -float(raw.mean())
    set_reward_bias(model, bias)
    std = float(raw.std()) if raw.numel() > 1 else 0.0
    return Normalization(bias=bias, raw_mean=-bias, raw_std=std, n=len(sequences), truncated=n_cut)
