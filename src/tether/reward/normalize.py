"""The RM's normalisation: demonstrations score mean 0 (InstructGPT §3.5) and, by default, std 1.

"At the end of training, we normalize the reward model using a bias so that the labeler
demonstrations achieve a mean score of 0 before doing RL." tether also sets a gain so that their
scores have std 1: the raw spread of an RM depends on the run (data, learning rate, steps), and
β, the missing-EOS penalty and the value clip act on scores, so in raw units the same settings
would mean something different every run. Both are stored in the checkpoint's config
(``tether_reward_gain``, ``tether_reward_bias``, see :mod:`tether.models.heads`), so they travel
with the model and every scorer (and the value model initialised from it) applies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.data.formats import Demonstration
from tether.distributed import ParallelModel
from tether.models.heads import set_reward_normalization
from tether.reward.score import encode_texts, score_sequences


@dataclass
class Normalization:
    bias: float  # added to every scaled raw score
    raw_mean: float  # mean raw score of the demonstrations
    raw_std: float
    n: int  # demonstrations scored
    truncated: int  # of which cut to max_length
    gain: float = 1.0  # multiplies every raw score: 1 / raw_std when scaling, else 1
    scaled: bool = False  # the gain sets the demonstrations' std to 1


def normalize_reward_model(
    model: PreTrainedModel | ParallelModel,
    tokenizer: PreTrainedTokenizerBase,
    demonstrations: Sequence[Demonstration],
    *,
    max_length: int | None = None,
    batch_size: int = 32,
    scale: bool = True,
) -> Normalization:
    """Set ``score = gain · raw + bias`` so ``demonstrations`` score mean 0 (and std 1 if ``scale``).

    Raw scores (normalisation excluded) are used, so normalising twice gives the same numbers.
    """
    if not demonstrations:
        raise ValueError("rm: no demonstrations to normalise the reward model with")
    sequences, n_cut = encode_texts(
        tokenizer,
        [d.prompt for d in demonstrations],
        [d.response for d in demonstrations],
        max_length,
    )
    raw = score_sequences(model, sequences, tokenizer.pad_token_id, batch_size, normalized=False).double()
    module = model.module if isinstance(model, ParallelModel) else model  # (the same on every rank)
    mean = float(raw.mean())
    std = float(raw.std()) if raw.numel() > 1 else 0.0
    # One demonstration (or identical scores) has no spread to scale by: the bias alone, and the
    # caller says so (Normalization.scaled).
    scaled = scale and std > 0
    gain = 1.0 / std if scaled else 1.0
    set_reward_normalization(module, gain=gain, bias=-mean * gain)
    return Normalization(
        bias=-mean * gain, raw_mean=mean, raw_std=std, gain=gain, n=len(sequences), truncated=n_cut, scaled=scaled
    )
