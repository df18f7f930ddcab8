"""Scalar heads: the reward model and the value model (InstructGPT §3.5).

Both are standard Hugging Face ``*ForSequenceClassification`` models with ``num_labels=1``: the
causal LM with its unembedding replaced by a projection to one scalar (the ``score`` layer). The
reward model reads that scalar at the **last real token** of prompt ⊕ response; the value model
(initialised from the reward model) reads it at every token.

The RM's normalisation is an affine map of the head's raw output, ``score = gain · raw + bias``,
stored in the checkpoint's ``config.json`` as ``tether_reward_gain`` and ``tether_reward_bias``: the
bias makes the demonstrations score mean 0 (InstructGPT §3.5), the gain gives their scores std 1,
so β, the missing-EOS penalty and the value clip mean the same thing whatever the run. Loading a
tether RM with plain transformers::

    model = AutoModelForSequenceClassification.from_pretrained(path)
    raw = model(**tokenizer(text, return_tensors="pt")).logits[:, 0]
    score = raw * model.config.tether_reward_gain + model.config.tether_reward_bias

The value model starts as a copy of the RM and is read through the same map at every token, so its
first predictions are in the units of the scores it must predict (tested: at initialisation the
value at the last token of a finished response is that response's normalised score).

(transformers finds the last non-pad token itself, which is right under any padding when the pad
token differs from the turn end; where they are one token (Mistral: docs/your-own-model.md) read
the scalar at the last position the attention mask keeps, as tether does.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from tether.config import ModelConfig
from tether.models.generation import position_ids_from_mask
from tether.models.loading import (
    load_tokenizer,
    prepare,
    record_token_roles,
    resolve_device,
    resolve_model_dir,
    save_model,
    weights_dtype,
)
from tether.ops import last_token_index

REWARD_BIAS_KEY = "tether_reward_bias"
REWARD_GAIN_KEY = "tether_reward_gain"


def load_scalar_model(
    cfg: ModelConfig | str, *, trainable: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer): a sequence-classification model with one output, from any HF directory.

    From a causal-LM checkpoint (e.g. the SFT model) the LM head is dropped and a fresh ``score``
    head is created; from a tether RM directory the trained head (and its bias) come along.
    """
    if isinstance(cfg, str):
        cfg = ModelConfig(name_or_path=cfg)
    path = resolve_model_dir(cfg.name_or_path, allow_download=cfg.allow_download)
    tokenizer = load_tokenizer(path, cfg)
    device = resolve_device(cfg.device)
    dtype = weights_dtype(cfg, device)
    if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        # An SFT checkpoint saved as LoRA adapters: the same blocks under a scalar head, merged.
        from peft import PeftConfig, PeftModel

        adapter = PeftConfig.from_pretrained(path)
        adapter.task_type = None  # (a causal LM's adapters, read into the blocks they were trained on)
        base = adapter.base_model_name_or_path
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=dtype)
        model = PeftModel.from_pretrained(model, path, config=adapter).merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    record_token_roles(model, tokenizer)
    # A fresh head (or an RM from before the gain existed) starts with the identity map.
    for key, identity in ((REWARD_BIAS_KEY, 0.0), (REWARD_GAIN_KEY, 1.0)):
        if not hasattr(model.config, key):
            setattr(model.config, key, identity)
    model.to(device)
    return prepare(model, cfg, trainable=trainable, task_type="SEQ_CLS"), tokenizer


def unwrap(model: PreTrainedModel) -> PreTrainedModel:
    """The transformers model under an optional peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def scalar_per_token(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The score head applied at every position: [B,T] (float32). Padding-robust positions."""
    inner = unwrap(model)
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    ).last_hidden_state
    return inner.score(hidden).squeeze(-1).float()


def reward_bias(model: PreTrainedModel) -> float:
    return float(getattr(unwrap(model).config, REWARD_BIAS_KEY, 0.0))


def reward_gain(model: PreTrainedModel) -> float:
    return float(getattr(unwrap(model).config, REWARD_GAIN_KEY, 1.0))


def set_reward_normalization(model: PreTrainedModel, *, gain: float, bias: float) -> None:
    """Store ``score = gain · raw + bias`` in the model's config (saved with it)."""
    config = unwrap(model).config
    setattr(config, REWARD_GAIN_KEY, float(gain))
    setattr(config, REWARD_BIAS_KEY, float(bias))


def apply_normalization(model: PreTrainedModel, raw: torch.Tensor) -> torch.Tensor:
    """The model's affine normalisation applied to raw head outputs (any shape)."""
    return raw * reward_gain(model) + reward_bias(model)


def reward_scores(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, normalized: bool = True
) -> torch.Tensor:
    """r(x, y): the scalar at the last real token of each row (left or right padded). [B]."""
    return score_at_last_token(model, scalar_per_token(model, input_ids, attention_mask), attention_mask, normalized)


def score_at_last_token(
    model: PreTrainedModel, per_token: torch.Tensor, attention_mask: torch.Tensor, normalized: bool = True
) -> torch.Tensor:
    """The raw head output ``per_token`` [B,T] read at each row's last real token: [B]."""
    scores = per_token.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)
    return apply_normalization(model, scores) if normalized else scores


def token_values(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """V(s_t) for every position (the value model), through the same normalisation as the RM. [B,T].

    Without it a value model initialised from a normalised RM would start offset from its
    targets by the bias, and the offset would land on the advantages of the last tokens.
    """
    return apply_normalization(model, scalar_per_token(model, input_ids, attention_mask))


def save_scalar_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: str | Path,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save as a plain HF sequence-classification directory (LoRA merged), bias in config.json."""
    return save_model(model, tokenizer, Path(out), state_dict=state_dict)
