"""Token roles: which token ends an assistant turn, which one pads, which one ends a document.

Every family marks these its own way (docs/your-own-model.md has the table): ChatML ends a turn
with ``<|im_end|>``, Llama-3 with ``<|eot_id|>``, Gemma with ``<end_of_turn>`` (its ``eos_token``
is ``<eos>``), Mistral with ``</s>``; most have no pad token. The roles are decided once, from the
tokenizer and its chat template, the first time tether loads a model, and recorded in every
tokenizer tether saves (``tether_token_roles`` in ``tokenizer_config.json``), so the SFT
checkpoint, the reward model, the value model and the reference all agree on them:

- the **turn end** is what SFT appends to a response, where the RM's score is read, where PPO's
  reward lands and where the sampler stops. It becomes the tokenizer's ``eos_token``.
- the **pad** fills padding and nothing else. It may equal the turn end or the document end
  (Mistral, GPT-2): every mask in tether is built from lengths, never from ``ids == pad``.
- the **document end** ends a pretraining document (SFT's pretraining mix, PPO-ptx, the held-out
  perplexity). None where the tokenizer has no end-of-document token other than the turn end: a
  document never ends with the turn end, or the pretraining loss trains "end the turn here".
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from transformers import PreTrainedTokenizerBase

# The key the roles are recorded under in a saved tokenizer_config.json.
ROLES_KEY = "tether_token_roles"
# Reserved tokens a vocabulary sets aside for padding, in order of preference (Llama-3.1 names one).
PAD_NAMES = ("<|finetune_right_pad_id|>", "<pad>", "[PAD]", "<|pad|>", "<|padding|>")
RESERVED = re.compile(r"<\|reserved_special_token_(\d+)\|>")
# End-of-document tokens by name (GPT-2 / SmolLM2 / Qwen, Llama-3, Gemma, Llama-2 / Mistral), for
# a tokenizer whose eos_token is already the turn end.
DOCUMENT_END_NAMES = ("<|endoftext|>", "<|end_of_text|>", "<eos>", "</s>")
# An assistant message rendered by the chat template: the first special token after it ends turns.
PROBE = "TetherProbe"


@dataclass(frozen=True)
class TokenRoles:
    turn_end: str
    pad: str
    document_end: str | None

    def describe(self) -> str:
        end = repr(self.document_end) if self.document_end else "nothing"
        return f"turn end {self.turn_end!r}, pad {self.pad!r}, a pretraining document ends with {end}"


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    """The tokens that never come out of plain text: named special tokens and added special ones."""
    added = {str(t) for t in tokenizer.added_tokens_decoder.values() if getattr(t, "special", False)}
    return added | set(tokenizer.all_special_tokens)


def template_turn_end(tokenizer: PreTrainedTokenizerBase) -> tuple[str | None, str]:
    """(the special token the chat template puts right after an assistant message, or None; why)."""
    if not tokenizer.chat_template:
        return None, "no chat template"
    messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # a template may refuse the probe (its own raise_exception): fall back
        return None, f"the chat template could not render a user and an assistant turn ({e})"
    if not isinstance(text, str) or PROBE not in text:
        return None, "the chat template does not render the assistant's text"
    after = text[text.rindex(PROBE) + len(PROBE) :]
    specials = special_tokens(tokenizer)
    ids = tokenizer(after, add_special_tokens=False).input_ids
    for token in tokenizer.convert_ids_to_tokens(ids):
        if token in specials:
            return token, "read from the chat template"
    return None, "the chat template puts no special token after an assistant turn"


def decide_token_roles(
    tokenizer: PreTrainedTokenizerBase, *, eos_token: str | None = None, pad_token: str | None = None
) -> tuple[TokenRoles, list[str]]:
    """The roles for ``tokenizer`` and a line per role on how it was chosen.

    Roles recorded in the tokenizer (a checkpoint tether saved) are kept; ``eos_token`` and
    ``pad_token`` (``--model.eos-token``, ``--model.pad-token``) override either way. Raises
    ValueError for an override that is not one token of the vocabulary.
    """
    recorded = tokenizer.init_kwargs.get(ROLES_KEY)
    if isinstance(recorded, dict) and eos_token is None and pad_token is None:
        return TokenRoles(recorded["turn_end"], recorded["pad"], recorded.get("document_end")), ["recorded"]
    vocab = tokenizer.get_vocab()
    for flag, value in (("model.eos_token", eos_token), ("model.pad_token", pad_token)):
        if value is not None and value not in vocab:
            raise ValueError(
                f"{flag} {value!r} is not a token of {tokenizer.name_or_path}'s vocabulary "
                "(give a single token, e.g. one of its special tokens: "
                f"{', '.join(sorted(special_tokens(tokenizer))[:8])})"
            )
    if isinstance(recorded, dict):
        turn_end = eos_token or recorded["turn_end"]
        document_end = recorded.get("document_end")
        roles = TokenRoles(turn_end, pad_token or recorded["pad"], document_end if document_end != turn_end else None)
        return roles, ["recorded, overridden by --model.eos-token / --model.pad-token"]

    why: list[str] = []
    # 1. The turn end: the override, else the chat template's, else eos_token.
    from_template, how = template_turn_end(tokenizer)
    if eos_token is not None:
        turn_end, how = eos_token, "--model.eos-token"
    elif from_template is not None:
        turn_end = from_template
    elif tokenizer.eos_token is not None:
        turn_end, how = tokenizer.eos_token, f"eos_token ({how})"
    else:
        raise ValueError(
            f"{tokenizer.name_or_path}: the tokenizer has no eos_token and no chat template to read a "
            "turn end from: name the token that ends a response with --model.eos-token"
        )
    why.append(f"turn end {turn_end!r}: {how}")

    # 2. The document end: eos_token where it is not the turn end, else one of the usual names.
    specials = special_tokens(tokenizer)
    candidates = [tokenizer.eos_token, *DOCUMENT_END_NAMES]
    document_end = next((t for t in candidates if t and t != turn_end and t in specials), None)
    why.append(f"document end {document_end!r}" if document_end else "no document end: pretraining text ends unmarked")

    # 3. The pad: the override, the tokenizer's own (unless it is the turn end), a token the
    # vocabulary reserves, the document end, else the turn end itself. The last two are safe
    # because tether builds every mask from lengths; a distinct pad also keeps plain transformers'
    # "last non-pad token" right for anyone who loads the reward model without tether.
    reserved = sorted((int(m.group(1)), t) for t in specials if (m := RESERVED.fullmatch(t)))
    spare = [t for t in PAD_NAMES if t in specials] + [t for _, t in reserved]
    if pad_token is not None:
        pad, how = pad_token, "--model.pad-token"
    elif tokenizer.pad_token is not None and tokenizer.pad_token != turn_end:
        pad, how = tokenizer.pad_token, "the tokenizer's own"
    elif spare:
        pad, how = spare[0], "a token the vocabulary reserves"
    elif document_end is not None:
        pad, how = document_end, "the document end (no spare token; every mask is built from lengths)"
    else:
        pad, how = turn_end, "the turn end (no spare token; every mask is built from lengths)"
    why.append(f"pad {pad!r}: {how}")
    return TokenRoles(turn_end, pad, document_end), why


def apply_token_roles(tokenizer: PreTrainedTokenizerBase, roles: TokenRoles) -> PreTrainedTokenizerBase:
    """eos_token = the turn end, pad_token = the pad, right padding; the roles recorded for saving."""
    tokenizer.eos_token = roles.turn_end
    tokenizer.pad_token = roles.pad
    tokenizer.padding_side = "right"
    tokenizer.init_kwargs[ROLES_KEY] = asdict(roles)
    return tokenizer


def token_roles(tokenizer: PreTrainedTokenizerBase) -> TokenRoles:
    """The roles a loaded tokenizer carries (decided now if it was never through tether's loading)."""
    return decide_token_roles(tokenizer)[0]


def document_end_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id that ends a pretraining document, or None (no end-of-document token but the turn end)."""
    end = token_roles(tokenizer).document_end
    return None if end is None else int(tokenizer.convert_tokens_to_ids(end))
