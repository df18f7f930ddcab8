"""Tiny random models whose tokenizers are shaped like the families people bring.

``tiny-llama3``, ``tiny-mistral``, ``tiny-gemma`` and ``tiny-gpt2`` are model names tether accepts
like ``tiny``: a byte-level BPE learnt from the built-in task's text with the family's special
tokens, ``bos`` / ``eos`` / ``pad`` / ``unk`` as the family's own ``tokenizer_config.json`` sets them, its
chat template (Gemma's, Mistral v0.1's, Llama-3's; GPT-2 has none) and ``tiny``'s 2-block Llama.
Built offline in a few seconds, cached next to ``tiny``. They exist to
run every stage on each family's token roles (tests, docs), not to say anything about the models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from tether.models.loading import TINY_CONFIG, _atomic_dir, cache_dir


@dataclass(frozen=True)
class Family:
    special_tokens: tuple[str, ...]  # in id order, from id 0
    eos: str
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    chat_template: str | None = None


# The templates are the families' own (whitespace aside): Meta-Llama-3-8B-Instruct, Mistral-7B-
# Instruct-v0.1 and gemma-2-2b-it. Llama-3's eos_token is its early configs' `<|end_of_text|>`:
# the template, not eos_token, says a turn ends with `<|eot_id|>`.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

FAMILIES: dict[str, Family] = {
    "llama3": Family(
        special_tokens=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|reserved_special_token_2|>",
            "<|eot_id|>",
        ),
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        chat_template=LLAMA3_TEMPLATE,
    ),
    "mistral": Family(
        special_tokens=("<unk>", "<s>", "</s>"),
        bos="<s>",
        eos="</s>",
        unk="<unk>",
        chat_template=MISTRAL_TEMPLATE,
    ),
    "gemma": Family(
        special_tokens=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        chat_template=GEMMA_TEMPLATE,
    ),
    "gpt2": Family(
        special_tokens=("<|endoftext|>",),
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        unk="<|endoftext|>",
    ),
}


def family_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE of 4,096 tokens learnt from the built-in task's text, with family ``name``'s
    special tokens (ids 0, 1, ...), bos / eos / pad / unk and chat template.

    Learnt from the text the docs and tests feed it, so a prompt costs about as many tokens as
    with ``tiny``'s 49k-token tokenizer, and the LM head is 12 times smaller.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tether.data.task import build_default_task  # builds the task: only when a family is made

    family = FAMILIES[name]
    task = build_default_task()
    corpus = [
        *(p.text for p in task.prompts),
        *(d.response for d in task.demonstrations),
        *(t.text for t in task.pretrain_train),
    ]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=list(family.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token=family.unk,
        chat_template=family.chat_template,
    )


def tiny_family_dir(name: str, seed: int = 0) -> Path:
    """``tiny-NAME``: a randomly initialised tiny Llama with family ``name``'s tokenizer (cached)."""
    if name not in FAMILIES:
        raise ValueError(f"no tiny model family {name!r}: choose from {', '.join(FAMILIES)}")
    final = cache_dir() / f"tiny-{name}-seed{seed}"
    if (final / "config.json").exists():
        return final

    def build(tmp: Path) -> None:
        tokenizer = family_tokenizer(name)
        ids = {role: tokenizer.convert_tokens_to_ids(token) for role, token in _roles(FAMILIES[name]).items()}
        config = AutoConfig.for_model(vocab_size=len(tokenizer), **ids, **TINY_CONFIG)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(final, build)


def _roles(family: Family) -> dict[str, str]:
    named = {"bos_token_id": family.bos, "eos_token_id": family.eos, "pad_token_id": family.pad}
    return {role: token for role, token in named.items() if token is not None}
