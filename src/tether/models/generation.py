"""Prompt formatting and batched sampling with a KV cache.

Sampling is a hand-written loop rather than ``model.generate`` so that the log-probability of every
sampled token is taken from exactly the distribution it was drawn from (logits / temperature, no
top-k / top-p): the PPO ratio and the KL estimate are only right if they match (SPEC, "KL negative
because sampling and log-prob distributions differ").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The prompt as the model sees it: one user turn and the assistant header (chat template)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + "\n"


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-formatted prompts, tokenised and LEFT-padded: (input_ids [B,P], attention_mask [B,P]).

    A prompt longer than max_prompt_length keeps its last tokens (the assistant header must stay).
    """
    rows = [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False).input_ids for p in prompts]
    if max_prompt_length:
        rows = [r[-max_prompt_length:] for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them. [B,T]."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Generation:
    """K-V cached samples for a batch of prompts. Prompts left-padded, responses right-padded."""

    query_ids: torch.Tensor  # [B, P] left-padded chat-formatted prompt tokens
    query_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    response_ids: torch.Tensor  # [B, R] sampled tokens, pad after EOS
    response_mask: torch.Tensor  # [B, R] 1 on real response tokens (EOS included)
    logprobs: torch.Tensor  # [B, R] log p(token) under logits / temperature at sampling time; 0 on pad
    finished: torch.Tensor  # [B] bool: the response ended with EOS within max_new_tokens

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def select(self, index: torch.Tensor) -> Generation:
        """The rows ``index`` (a 1-D index tensor) of every field, in that order."""
        return Generation(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    max_prompt_length: int | None = None,
) -> Generation:
    """Sample one response per prompt. temperature 0 = greedy (logprobs then use temperature 1)."""
    was_training = model.training
    model.eval()  # dropout off while sampling: the sampled distribution must be the scored one
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    query_ids, query_mask = encode_prompts(tokenizer, prompts, max_prompt_length)
    query_ids, query_mask = query_ids.to(device), query_mask.to(device)
    batch = query_ids.shape[0]

    mask = query_mask
    positions = position_ids_from_mask(mask)
    out = model(input_ids=query_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    past, logits = out.past_key_values, out.logits[:, -1]
    next_pos = positions[:, -1] + 1

    tokens, logps = [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        scaled = logits.float() / (temperature if temperature > 0 else 1.0)
        # z - logsumexp(z), as tether.ops.token_logprobs computes it: F.log_softmax's float32 CPU
        # kernel is off by ~1e-4 near p = 1 on some CPUs (AVX2), logsumexp is not.
        logp = scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)
        if temperature > 0:
            # Gumbel-max: an exact draw from softmax(logp), ~3x faster than torch.multinomial
            # over a 49k vocabulary on a CPU.
            u = torch.rand(logp.shape, generator=generator, device=logp.device).clamp_(min=1e-20)
            tok = (logp - torch.log(-torch.log(u))).argmax(-1)
        else:
            tok = logp.argmax(-1)
        tok_logp = logp.gather(-1, tok[:, None]).squeeze(-1)
        tok = torch.where(finished, torch.full_like(tok, pad), tok)
        tokens.append(tok)
        logps.append(torch.where(finished, torch.zeros_like(tok_logp), tok_logp))
        alive = ~finished
        finished = finished | (tok == eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break  # no forward for a token that will never be sampled
        mask = torch.cat([mask, alive.long()[:, None]], dim=1)
        out = model(
            input_ids=tok[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            past_key_values=past,
            use_cache=True,
        )
        past, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1

    response_ids = torch.stack(tokens, dim=1)
    response_logprobs = torch.stack(logps, dim=1)
    # A token is real if no EOS came strictly before it (the EOS itself is real).
    is_eos = response_ids == eos
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    response_mask = (eos_before == 0).long()
    response_ids = torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, pad))
    if was_training:
        model.train()
    return Generation(
        query_ids=query_ids,
        query_mask=query_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=response_logprobs * response_mask,
        finished=finished,
    )


def decode_responses(tokenizer: PreTrainedTokenizerBase, gen: Generation) -> list[str]:
    """Response texts without EOS / padding."""
    texts = []
    for ids, m in zip(gen.response_ids, gen.response_mask, strict=True):
        real = ids[m.bool()].tolist()
        if real and real[-1] == tokenizer.eos_token_id:
            real = real[:-1]
        texts.append(tokenizer.decode(real, skip_special_tokens=True).strip())
    return texts


def generate_texts(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
) -> list[str]:
    """Convenience: sample and decode in batches, seeded."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        gen = sample(
            model,
            tokenizer,
            prompts[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            generator=generator,
        )
        out.extend(decode_responses(tokenizer, gen))
    return out


def sample_k(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence,
    k: int,
    *,
    policy_name: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    progress=None,
) -> list:
    """K sampled responses per prompt, as ``Sample`` records ready for ranking (by people or the panel).

    prompts: ``Prompt`` records. Each prompt's K copies share a batch, so the KV cache of a batch
    holds several prompts × K responses at once. ``ended`` records which responses reached EOS,
    so the reward model later trains on a cut-off response as cut off (as PPO will score it).
    """
    from tether.data.formats import K_MAX, K_MIN, Sample

    if not K_MIN <= k <= K_MAX:
        raise ValueError(f"k must be {K_MIN}..{K_MAX} (responses ranked per prompt), got {k}")
    flat = [p for p in prompts for _ in range(k)]
    texts: list[str] = []
    ended: list[bool] = []
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for start in range(0, len(flat), batch_size):
        gen = sample(
            model,
            tokenizer,
            [p.text for p in flat[start : start + batch_size]],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            generator=generator,
        )
        texts.extend(decode_responses(tokenizer, gen))
        ended.extend(gen.finished.tolist())
        if progress is not None:
            progress(len(texts), len(flat))
    # An empty response cannot be ranked or stored (the sample contract); mark it visibly instead.
    texts = [t if t.strip() else "(empty response)" for t in texts]
    return [
        Sample(
            prompt=p.text,
            responses=texts[i * k : (i + 1) * k],
            prompt_id=p.id,
            policies=[policy_name] * k,
            user_id=p.user_id,
            category=p.category,
            ended=ended[i * k : (i + 1) * k],
        )
        for i, p in enumerate(prompts)
    ]
