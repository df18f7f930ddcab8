"""A reward model of the user's own: another tokenizer and chat template than the policy's.

tether's own RM is trained from the SFT model, so it reads the policy's sampled token ids as they
are. An off-the-shelf ``AutoModelForSequenceClassification`` (one output) was trained on its own
tokens: the policy's ids would be other words to it. :class:`ForeignReward` scores what the policy
wrote as that model would have seen it in its own training: each response is decoded from the
sampled ids (up to the policy's turn end), the prompt rendered through the RM's chat template, the
response re-encoded with the RM's tokenizer and the RM's own turn end appended when the policy
ended its turn (a response cut at ``max_new_tokens`` gets none), and the score read at the RM's
last real token (:func:`tether.reward.score.score_texts`).

Such a model carries no ``tether_reward_gain`` / ``tether_reward_bias``: its raw scores are in
whatever units its training left. :func:`foreign_reward` then sets them as tether's RM stage does
(:func:`tether.reward.normalize.normalize_reward_model`): the demonstrations score mean 0 and std 1,
so β, the missing-EOS penalty and the value clip act in the same units as with tether's RM.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.models.generation import Generation, decode_responses
from tether.models.heads import REWARD_BIAS_KEY, REWARD_GAIN_KEY, reward_bias, reward_gain, unwrap
from tether.reward.normalize import normalize_reward_model
from tether.reward.score import score_texts
from tether.sft.data import load_demonstrations

# Set in the RM's config (in memory) once tether has normalised it: a second scorer of the same
# loaded model (eval, one per policy) does not score the demonstrations again.
NORMALIZED_AT_LOAD_KEY = "tether_reward_normalized_at_load"


@dataclass
class ForeignReward:
    """Scores the policy's episodes with a reward model of another tokenizer (see the module)."""

    model: PreTrainedModel  # a sequence-classification model, num_labels = 1, normalised
    tokenizer: PreTrainedTokenizerBase  # the RM's own, token roles decided as for any model
    policy_tokenizer: PreTrainedTokenizerBase  # what decodes the sampled ids
    batch_size: int = 32

    @property
    def max_length(self) -> int | None:
        """The longest sequence the RM takes (its position embeddings), or None."""
        return getattr(unwrap(self.model).config, "max_position_embeddings", None)

    def __call__(self, prompts: list[str], responses: list[str], ended: Sequence[bool] | None = None) -> Tensor:
        """r(x, y) for (prompt, response) texts: ``[N]`` float32 on the CPU, normalised. ``ended[i]``
        False leaves the RM's turn end off response i (None: every response ended its turn)."""
        return score_texts(
            self.model, self.tokenizer, prompts, responses, self.batch_size, max_length=self.max_length, ended=ended
        )

    def score(self, gen: Generation, prompts: Sequence[str]) -> Tensor:
        """The score of each sampled episode ``[B]`` (CPU): the responses decoded with the policy's
        tokenizer, its turn end left out, and the RM's appended where the policy ended its turn."""
        return self(list(prompts), decode_responses(self.policy_tokenizer, gen), gen.finished.tolist())


def tokenizer_differences(policy_tok: PreTrainedTokenizerBase, other_tok: PreTrainedTokenizerBase) -> list[str]:
    """What differs between two tokenizers' vocabularies and special tokens ([]: one tokenizer)."""
    problems = []
    if policy_tok.get_vocab() != other_tok.get_vocab():
        problems.append(f"vocabularies differ ({len(policy_tok)} vs {len(other_tok)} tokens)")
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        a, b = getattr(policy_tok, name), getattr(other_tok, name)
        if a != b:
            problems.append(f"{name} {a} vs {b}")
    return problems


def reward_for(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    policy_tokenizer: PreTrainedTokenizerBase,
    source: str | Path | None,
    notes: list[str],
    demonstrations_file: str | None = None,
) -> PreTrainedModel | ForeignReward:
    """What scores the policy's episodes: the reward model itself when it shares the policy's
    tokenizer (it reads the sampled ids), else its :func:`foreign_reward` scorer, normalised on
    the demonstrations of ``demonstrations_file`` where needed (None: the default task's, as
    ``tether rm`` without a file; read only then)."""
    if not tokenizer_differences(policy_tokenizer, tokenizer):
        return model
    if not hasattr(unwrap(model), "score"):
        raise ValueError(
            f"reward model {source}: {type(unwrap(model)).__name__} has no `score` head; tether reads a "
            "decoder's sequence-classification head (LlamaForSequenceClassification and the like) at the last token"
        )
    return foreign_reward(model, tokenizer, policy_tokenizer, source, demonstrations_file, notes)


def carries_normalization(model: PreTrainedModel, source: str | Path | None) -> bool:
    """Whether the RM's checkpoint (``source``, its directory) holds tether's gain and bias, or
    tether already normalised this loaded model."""
    if getattr(unwrap(model).config, NORMALIZED_AT_LOAD_KEY, False):
        return True
    config = Path(source) / "config.json" if source is not None else None
    if config is None or not config.is_file():
        return False
    saved = json.loads(config.read_text())
    return REWARD_GAIN_KEY in saved and REWARD_BIAS_KEY in saved


def foreign_reward(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    policy_tokenizer: PreTrainedTokenizerBase,
    source: str | Path | None,
    demonstrations_file: str | None,
    notes: list[str],
) -> ForeignReward:
    """The scorer of a reward model whose tokenizer is not the policy's; when its checkpoint carries
    no tether normalisation, ``score = gain · raw + bias`` is computed now from the demonstrations
    of ``demonstrations_file`` (None: the default task's), mean 0 and std 1 as tether's RM stage
    sets them. Appends what was decided to ``notes``."""
    reward = ForeignReward(model, tokenizer, policy_tokenizer)
    what = f"reward model {source}" if source is not None else "the reward model"
    notes.append(
        f"reward: the {what} has its own tokenizer ({len(tokenizer)} tokens, turn end {tokenizer.eos_token!r}; "
        f"the policy's: {len(policy_tokenizer)}, {policy_tokenizer.eos_token!r}): each response is decoded "
        "and re-encoded through the RM's own chat template, its turn end appended where the policy ended"
    )
    if carries_normalization(model, source):
        gain, bias = reward_gain(model), reward_bias(model)
        notes.append(f"reward: the RM's normalisation as loaded: score = {gain:.4g} · raw {bias:+.4g}")
        return reward
    demos = load_demonstrations(demonstrations_file)
    norm = normalize_reward_model(model, tokenizer, demos, max_length=reward.max_length, batch_size=reward.batch_size)
    setattr(unwrap(model).config, NORMALIZED_AT_LOAD_KEY, True)
    notes.append(
        f"reward: the RM carries no tether normalisation: score = {norm.gain:.4g} · raw {norm.bias:+.4g} so that "
        f"the {norm.n} demonstrations of {demonstrations_file or 'the default task'} score mean 0, std 1 "
        f"(raw mean {norm.raw_mean:.4g}, std {norm.raw_std:.4g}; {norm.truncated} cut to {reward.max_length} tokens)"
    )
    return reward
