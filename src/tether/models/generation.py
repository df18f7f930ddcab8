"""Prompt formatting and batched sampling with a KV cache.

Sampling is a hand-written loop rather than ``model.generate`` so that the log-probability of every
sampled token is taken from exactly the distribution it was drawn from (logits / temperature, no
top-k / top-p): the PPO ratio and the KL estimate are only right if they match (log-probs of any
other distribution bias the KL estimate, and can make it negative).

Every sampler in tether goes through :func:`sample` (the rollout engine, :func:`_generate`): KV
buffers allocated once and written in place, the prompt prefix all rows share computed once,
the rest of the prefill grouped by prompt length, rows that ended packed out of the batch. A
:class:`Sampler` adds a low-precision inference copy of a policy, synced after each update.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import torch
from jinja2 import TemplateError
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from tether.config import RolloutDtype
from tether.data.formats import K_MAX, K_MIN, Conversation, Sample
from tether.data.preprocess import fit_prompt
from tether.models.loading import fast_bf16

ROLLOUT_DTYPES: tuple[str, ...] = get_args(RolloutDtype)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The prompt as the model sees it: its turns and the assistant header (chat template).

    A plain string is one user turn; a :class:`Conversation` gives its system prompt and earlier
    turns. A template that refuses a system turn (Gemma 2, Mistral v0.1) gets the system text at
    the head of the first user turn, and the log says so once per tokenizer.
    """
    messages = prompt.messages() if isinstance(prompt, Conversation) else [{"role": "user", "content": prompt}]
    if not tokenizer.chat_template:
        return "\n\n".join(m["content"] for m in messages) + "\n"
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        if messages[0]["role"] != "system":
            raise
    key = (tokenizer.name_or_path, tokenizer.chat_template)  # a tokenizer built in memory has no name
    if key not in _SYSTEM_JOINED:
        _SYSTEM_JOINED.add(key)
        logging.getLogger(__name__).warning(
            "%s: the chat template refuses a system turn; the system prompt joins the first user turn",
            tokenizer.name_or_path or type(tokenizer).__name__,
        )
    system, first, *rest = messages
    joined = {"role": "user", "content": system["content"] + "\n\n" + first["content"]}
    return tokenizer.apply_chat_template([joined, *rest], tokenize=False, add_generation_prompt=True)


_SYSTEM_JOINED: set[tuple[str, str]] = set()  # (name, template) that refused a system turn: logged once each


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-formatted prompts, tokenised and LEFT-padded: (input_ids [B,P], attention_mask [B,P]).

    A conversation longer than max_prompt_length first loses its oldest whole turns, never the
    system prompt or the last user turn (:func:`tether.data.preprocess.fit_prompt`); a prompt still
    too long (its last turn alone is: ``tether ppo`` drops those before training, and counts them)
    keeps its last tokens (the assistant header must stay).
    """

    def ids_of(prompt: str) -> list[int]:
        return tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False).input_ids

    if max_prompt_length:
        prompts = [fit_prompt(p, max_prompt_length, lambda q: len(ids_of(q)))[0] or p for p in prompts]
    rows = [ids_of(p) for p in prompts]
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
    # [B, P + R, H] the output of one block (``sample(capture=...)``) at every position of prompt ⊕
    # response, as sampling computed it (None unless asked for); 0 on padding.
    hidden: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def select(self, index: torch.Tensor) -> Generation:
        """The rows ``index`` (a 1-D index tensor) of every field, in that order."""
        picked: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            picked[f.name] = None if value is None else value[index]
        return Generation(**picked)


# --------------------------------------------------------------------------------------------
# The rollout engine: key/value buffers allocated once, a batch that shrinks as rows finish


class _BufferLayer(CacheLayerMixin):
    """One decoder layer's keys and values in buffers allocated once: ``[B, H, capacity, D]``.

    A forward of ``q`` tokens writes columns ``length … length + q`` in place and gives attention
    columns ``0 … length + q``: a view of the front rows while decoding, so no step allocates or
    concatenates. During the prefill the cache routes a forward to a subset of rows instead
    (``rows``), or (``shared``) broadcasts a batch-1 forward to every row.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, batch: int, capacity: int) -> None:
        super().__init__()
        self.batch, self.capacity = batch, capacity
        self.n_rows = batch  # rows in use: alive rows are packed to the front when the batch shrinks
        self.length = 0  # columns filled
        self.rows: torch.Tensor | None = None  # prefill: the rows this forward belongs to
        self.shared = False  # prefill: a batch-1 forward whose keys every row shares

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Keys and values each keep their own dtype: under autocast they can differ.
        self.keys = key_states.new_zeros(self.batch, key_states.shape[1], self.capacity, key_states.shape[-1])
        self.values = value_states.new_zeros(self.batch, value_states.shape[1], self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if self.rows is not None:  # prefill: the cache sets `length` per forward
            self.keys[self.rows, :, start:end] = key_states
            self.values[self.rows, :, start:end] = value_states
            if self.shared:
                return key_states, value_states
            return self.keys[self.rows, :, :end], self.values[self.rows, :, :end]
        n = self.n_rows
        self.keys[:n, :, start:end] = key_states
        self.values[:n, :, start:end] = value_states
        self.length = end
        return self.keys[:n, :, :end], self.values[:n, :, :end]

    def copy_rows(self, sources: torch.Tensor, targets: torch.Tensor, end: int) -> None:
        """Rows ``targets`` get the keys and values of rows ``sources`` in columns ``0 … end``."""
        if self.is_initialized:
            self.keys[targets, :, :end] = self.keys[sources, :, :end]
            self.values[targets, :, :end] = self.values[sources, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` (in that order), packed to the front of the same buffers."""
        if self.is_initialized:
            self.keys[: len(indices), :, : self.length] = self.keys[indices, :, : self.length]
            self.values[: len(indices), :, : self.length] = self.values[indices, :, : self.length]
        self.n_rows = len(indices)


class _BufferCache(Cache):
    """A KV cache of :class:`_BufferLayer` s: allocated once per ``sample`` call, never grown."""

    def __init__(self, n_layers: int, batch: int, capacity: int) -> None:
        super().__init__(layers=[_BufferLayer(batch, capacity) for _ in range(n_layers)])

    def route(self, rows: torch.Tensor | None, length: int, *, shared: bool = False) -> None:
        """Send the next forward to ``rows`` at column ``length`` (None: the decode batch)."""
        for layer in self.layers:
            layer.rows, layer.length, layer.shared = rows, length, shared

    def copy_rows(self, sources: torch.Tensor, targets: torch.Tensor, end: int) -> None:
        """Rows ``targets`` of every layer get rows ``sources``' keys and values in columns ``0 … end``."""
        for layer in self.layers:
            layer.copy_rows(sources, targets, end)


def buffers_fit(config: PretrainedConfig) -> bool:
    """Whether every layer is plain full attention (what :class:`_BufferLayer` implements).

    Sliding-window, chunked, linear-attention and KV-sharing models keep HF's DynamicCache.
    """
    try:
        layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except (AttributeError, TypeError, ValueError):
        return False
    return all(t == "full_attention" for t in layer_types)


def _prefill_buckets(lengths: list[int], max_waste: float = 0.125, max_tokens: int = 8192) -> list[list[int]]:
    """Rows grouped by prompt length for the prefill: each bucket runs left-padded to its own longest.

    Rows are sorted longest first; a bucket closes when padding would exceed ``max_waste`` of its
    tokens or it would hold more than ``max_tokens``. Returns lists of row indices.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets:
            rows = buckets[-1] + [i]
            width = lengths[rows[0]]
            waste = width * len(rows) - sum(lengths[r] for r in rows)
            if waste <= max_waste * width * len(rows) and width * len(rows) <= max_tokens:
                buckets[-1] = rows
                continue
        buckets.append([i])
    return buckets


def _shared_prefix(query_ids: torch.Tensor, lengths: torch.Tensor, min_tokens: int = 8) -> int:
    """How many leading real tokens every row of a left-padded ``[B, P]`` batch has in common.

    At most the shortest prompt less one (each row keeps a token of its own, whose logits start
    the sampling); 0 when fewer than ``min_tokens`` are shared or there is one row.
    """
    width, most = query_ids.shape[1], int(lengths.min()) - 1
    if query_ids.shape[0] < 2 or most < min_tokens:
        return 0
    firsts = query_ids.gather(1, (width - lengths)[:, None] + torch.arange(most, device=query_ids.device))
    same = (firsts == firsts[:1]).all(0)
    c = most if bool(same.all()) else int(same.long().argmin())
    return c if c >= min_tokens else 0


def _first_of_each_prompt(query_ids: torch.Tensor, lengths: torch.Tensor) -> list[int]:
    """For each row of a left-padded ``[B, P]`` batch, the first row with the same prompt."""
    seen: dict[tuple[int, ...], int] = {}
    width = query_ids.shape[1]
    return [
        seen.setdefault(tuple(ids[width - n :].tolist()), i)
        for i, (ids, n) in enumerate(zip(query_ids, lengths.tolist(), strict=True))
    ]


def _shrink_at(n_rows: int) -> int:
    """Compact the batch once at most this many of its ``n_rows`` rows are still alive.

    Packing the cache costs about one step's worth of memory traffic, so shrink by a quarter
    at least, and never for the last row.
    """
    return max(1, (3 * n_rows) // 4)


class _StopForward(Exception):
    """Raised by :class:`_BlockCapture`'s hook to end a forward once the captured block has run."""


class _NoCapture:
    """What the decode loop captures when nothing is asked for: every call a no-op."""

    feeds_last_token = False  # rows leave the batch at EOS; no forward after the last step

    def put(self, rows: torch.Tensor, columns: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Keep the last forward's output of the block at ``hidden[rows[:, None], columns]``."""

    def run(self, forward: Callable[..., Any], *, stop: bool, **inputs: Any) -> Any:
        """``forward(**inputs)``; ``stop``: only the block's output is needed (None returned)."""
        return forward(**inputs)

    def copy_rows(self, sources: torch.Tensor, targets: torch.Tensor, end: int) -> None:
        """Rows ``targets`` get what was kept for rows ``sources`` in columns ``0 … end``."""

    def hidden(self, width: int) -> torch.Tensor | None:
        """What was kept, ``[B, width, H]`` (None: nothing)."""
        return None

    def close(self) -> None:
        """Remove the hook."""


class _BlockCapture(_NoCapture):
    """Keeps one block's output at every position sampling feeds, in prompt ⊕ response layout.

    A forward hook on ``block`` stores its output ``[n, q, H]`` for the forward's rows into
    ``[B, width + max_new_tokens, H]``; the loop says where each forward goes (:meth:`put`). A
    row stays in the batch until its last token has been fed (``feeds_last_token``), and the last
    pass, which only needs the block, ends right after it (:meth:`run` with ``stop``).
    """

    feeds_last_token = True

    def __init__(self, block: torch.nn.Module, batch: int, capacity: int) -> None:
        self.batch, self.capacity = batch, capacity
        self.kept: torch.Tensor | None = None
        self.out: torch.Tensor | None = None
        self.stop = False
        self.handle = block.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        self.out = out.detach()
        if self.kept is None:
            self.kept = out.new_zeros(self.batch, self.capacity, out.shape[-1])
        if self.stop:
            raise _StopForward

    def put(self, rows: torch.Tensor, columns: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """The last forward's output ``[n or 1, q, H]`` to ``kept[rows[:, None], columns]`` (only where
        ``keep``, if given). Padding positions may get values: :func:`sample` zeroes them."""
        assert self.out is not None and self.kept is not None, "no forward ran through the captured block"
        out = self.out.to(self.kept.dtype)
        if keep is not None:
            out = torch.where(keep[..., None], out, self.kept[rows[:, None], columns])
        self.kept[rows[:, None], columns] = out
        self.out = None

    def run(self, forward: Callable[..., Any], *, stop: bool, **inputs: Any) -> Any:
        self.stop = stop
        try:
            return forward(**inputs)
        except _StopForward:
            return None
        finally:
            self.stop = False

    def copy_rows(self, sources: torch.Tensor, targets: torch.Tensor, end: int) -> None:
        if self.kept is not None:
            self.kept[targets, :end] = self.kept[sources, :end]

    def hidden(self, width: int) -> torch.Tensor | None:
        assert self.kept is not None
        return self.kept[:, :width]

    def close(self) -> None:
        self.handle.remove()


@torch.no_grad()
def _generate(
    model: PreTrainedModel,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    eos_token_id: int | None,
    pad_token_id: int,
    decode: Callable[..., Any] | None = None,
    capture: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The decode loop. ``query_ids``, ``query_mask``: ``[B, P]`` left-padded, on the model's device.

    Returns ``(tokens [B, T], logprobs [B, T], finished [B], hidden)`` with ``T <= max_new_tokens``
    (the loop stops when every row has ended), pad / 0 after a row's EOS. ``eos_token_id=None``
    never stops a row. ``decode`` runs the decode-step forwards (default: ``model``).

    ``capture`` (a block of ``model``) keeps that block's output at every real position of
    prompt ⊕ response: ``hidden [B, P + T, H]``, 0 on padding; None without ``capture``. It needs
    the KV buffers (:func:`buffers_fit`: plain full attention), else a ValueError. The
    prompt's come from the prefill, each sampled token's from the step that feeds it; a row stays
    in the batch until its last token has been fed, and one last pass, stopped after the block,
    feeds the tokens sampled at the final step. The same samples as without it (rows leave the
    batch a step later: log-probs may differ by float round-off, as with another batch size).

    Every step draws one ``[B, V]`` uniform for the Gumbel noise whatever the batch has shrunk
    to, so the random stream, and so the tokens for a seed, do not depend on when rows finish.
    ``generator`` may instead be one generator per row: each row then draws its own ``[V]`` per
    step while it is in the batch, so its tokens do not depend on the other rows at all.
    """
    batch, width = query_ids.shape
    capacity = width + max_new_tokens
    buffers = buffers_fit(model.config)
    cache: Cache = (
        _BufferCache(model.config.get_text_config(decoder=True).num_hidden_layers, batch, capacity)
        if buffers
        else DynamicCache(config=model.config)
    )
    if capture is not None and not buffers:
        raise ValueError(
            "sample(capture=...) needs the KV buffers (plain full attention in every layer); "
            f"{type(model).__name__} keeps HF's own cache"
        )
    grab = _BlockCapture(capture, batch, capacity) if capture is not None else _NoCapture()
    try:
        tokens, logprobs, finished = _decode_loop(
            model, query_ids, query_mask, cache, grab, max_new_tokens=max_new_tokens, temperature=temperature,
            generator=generator, eos_token_id=eos_token_id, pad_token_id=pad_token_id, decode=decode,
        )  # fmt: skip
    finally:
        grab.close()
    return tokens, logprobs, finished, grab.hidden(width + tokens.shape[1])


def _prefill(
    model: PreTrainedModel,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    cache: Cache,
    grab: _NoCapture,
    capacity: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts into ``cache``: returns the attention mask over the cache's columns ``[B,
    capacity]`` (the prompt's filled in) and each row's next-token logits ``[B, V]``."""
    device = query_ids.device
    buffers = isinstance(cache, _BufferCache)
    batch, width = query_ids.shape
    lengths = query_mask.sum(-1)
    # Cache layout: the prompt tokens every row shares (the chat template's header) once in
    # columns 0 … c, then each row's own tokens right-aligned up to `width`, then one column per
    # step. Causal attention makes the shared keys and values the same in every row.
    c = _shared_prefix(query_ids, lengths) if buffers else 0
    column = torch.arange(capacity, device=device)
    mask = ((column < c) | ((column >= width - (lengths - c)[:, None]) & (column < width))).long()

    # The shared prefix once, then rows grouped by length (no compute on padding).
    if c:
        start = int(width - lengths[0])
        cache.route(torch.arange(batch, device=device), 0, shared=True)
        model(
            input_ids=query_ids[:1, start : start + c],
            position_ids=torch.arange(c, device=device)[None],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        # The shared prefix: row i's columns width - lengths[i] … + c (the batch-1 output, broadcast).
        grab.put(torch.arange(batch, device=device), (width - lengths)[:, None] + torch.arange(c, device=device))
    logits = torch.empty(0, device=device)
    # Rows with the same prompt (a prompt's samples, best-of-n's candidates) share one prefill:
    # each repeat gets its first row's keys, values and logits (causal attention: the same numbers).
    first = _first_of_each_prompt(query_ids, lengths) if buffers else list(range(batch))
    unique = [i for i in range(batch) if first[i] == i]
    buckets = (
        [[unique[j] for j in b] for b in _prefill_buckets([int(lengths[i]) - c for i in unique])]
        if buffers
        else [list(range(batch))]
    )
    for bucket in buckets:
        rows = torch.tensor(bucket, device=device)
        w = int(lengths[rows].max()) - c
        if buffers:
            cache.route(rows, width - w)
            bucket_mask = mask[rows, :width]
        else:
            bucket_mask = query_mask
        out = model(
            input_ids=query_ids[rows, width - w :],
            attention_mask=bucket_mask,
            position_ids=position_ids_from_mask(bucket_mask)[:, -w:],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        if not len(logits):
            logits = out.logits.new_empty(batch, out.logits.shape[-1])
        logits[rows] = out.logits[:, -1]
        # (A shorter row's first columns here are its padding or its shared prefix.)
        cols = torch.arange(width - w, width, device=device)
        grab.put(rows, cols.expand(len(rows), -1), cols >= (width - lengths[rows] + c)[:, None])
    if buffers:
        repeats = torch.tensor([i for i in range(batch) if first[i] != i], dtype=torch.long, device=device)
        if len(repeats):
            sources = torch.tensor([first[i] for i in repeats.tolist()], dtype=torch.long, device=device)
            cache.copy_rows(sources, repeats, width)
            logits[repeats] = logits[sources]
            grab.copy_rows(sources, repeats, width)
        cache.route(None, width)
    return mask, logits


def _decode_loop(
    model: PreTrainedModel,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    cache: Cache,
    grab: _NoCapture,
    *,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    eos_token_id: int | None,
    pad_token_id: int,
    decode: Callable[..., Any] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_generate`'s prefill and decode steps (its docstring says what they do). ``cache``:
    the KV buffers or HF's own cache; ``grab``: what keeps the captured block's output."""
    device = query_ids.device
    batch, width = query_ids.shape
    lengths = query_mask.sum(-1)
    # 1. Prefill.
    mask, logits = _prefill(model, query_ids, query_mask, cache, grab, width + max_new_tokens)

    # 2. Decode. `alive` maps the rows still in the batch to their index in the output.
    tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, max_new_tokens, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    alive = torch.arange(batch, device=device)
    next_pos = lengths.clone()
    noise: torch.Tensor | None = None  # per-row generators: the [B, V] uniforms, drawn into one buffer
    steps = 0
    for t in range(max_new_tokens):
        # (Dividing by a temperature of 1 is the identity: skipped, like every [B, V] temporary
        # below that an in-place op can spare, `logits` included: it is read nowhere after this.
        # The same numbers, bit for bit.)
        scaled = logits.float() if temperature in (0, 1) else logits.float() / temperature
        # z - logsumexp(z), as tether.ops.token_logprobs computes it: F.log_softmax's float32 CPU
        # kernel is off by ~1e-4 near p = 1 on some CPUs (AVX2), logsumexp is not.
        logp = scaled.sub_(torch.logsumexp(scaled, dim=-1, keepdim=True))
        if temperature > 0:
            # Gumbel-max: an exact draw from softmax(logp), ~3x faster than torch.multinomial
            # over a 49k vocabulary on a CPU.
            if isinstance(generator, Sequence):
                # Each row's draw straight into its row of one buffer (no stack, no copy).
                if noise is None:
                    noise = logp.new_empty(batch, logp.shape[-1])
                u = noise[: len(alive)]
                for j, i in enumerate(alive.tolist()):
                    torch.rand(logp.shape[-1], generator=generator[i], device=device, out=u[j])
            else:
                u = torch.rand((batch, logp.shape[-1]), generator=generator, device=device)
                if len(alive) < batch:
                    u = u[alive]
            gumbel = u.clamp_(min=1e-20).log_().neg_().log_()  # log(-log(u)), in place
            tok = torch.sub(logp, gumbel, out=gumbel).argmax(-1)
        else:
            tok = logp.argmax(-1)
        tok_logp = logp.gather(-1, tok[:, None]).squeeze(-1)
        done = finished[alive]
        tok = torch.where(done, pad_token_id, tok)
        tokens[alive, t] = tok
        logprobs[alive, t] = torch.where(done, 0.0, tok_logp)
        if eos_token_id is not None:
            finished[alive] = done | (tok == eos_token_id)
        steps = t + 1
        last = t + 1 == max_new_tokens or bool(finished.all())
        if last and not grab.feeds_last_token:
            break  # no forward for a token nobody will sample
        if not last:
            # A row leaves the batch once it has finished; when capturing, once its last token
            # (EOS) has also been fed.
            still = ~done if grab.feeds_last_token else ~finished[alive]
            if int(still.sum()) <= _shrink_at(len(alive)):
                keep = still.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                n = len(keep)
                mask[:n] = mask[keep]
                alive, tok, next_pos, done = alive[keep], tok[keep], next_pos[keep], done[keep]
        n = len(alive)
        mask[:n, width + t] = (~done).long()
        # The final step's tokens (fed only when capturing) need only the captured block's output.
        out = grab.run(
            model if last else decode or model,
            stop=last,
            input_ids=tok[:, None],
            attention_mask=mask[:n, : width + t + 1],
            position_ids=next_pos[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        grab.put(alive, torch.full((n, 1), width + t, device=device))
        if last:
            break
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return tokens[:, :steps], logprobs[:, :steps], finished


def resolve_rollout_dtype(name: str | None, device: torch.device) -> torch.dtype | None:
    """``rollout_dtype`` → the dtype to sample in (None: the model as it is, under the caller's autocast)."""
    if name is None:
        return None
    if name not in ROLLOUT_DTYPES:
        raise ValueError(f"rollout_dtype must be one of {', '.join(ROLLOUT_DTYPES)} or None, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    return getattr(torch, name)


class Sampler:
    """What :func:`sample` draws from: a policy, or a low-precision inference copy of it.

    ``dtype`` None samples ``model`` itself under whatever autocast the caller has entered (the
    old behaviour). A dtype name samples with autocast off, in that precision: the model itself
    when its weights already have it, else a copy of it in that dtype (``"auto"``: bfloat16 where
    the hardware runs it natively, else float32). The copy must be refreshed with :meth:`sync`
    after every optimiser step; only trainable parameters are copied (frozen ones never change).

    ``compile`` runs the decode steps through ``torch.compile`` (off by default: on a 2-core AVX2
    CPU, compiling the default model's step took 409 s and the step was no faster, measured
    2026-11-30), falling back to eager decoding if compilation fails.

    PPO's "old" log-probs never come from here: they come from the training model's own forward,
    so the PPO ratio stays exact whatever the sampling precision.
    """

    def __init__(self, model: PreTrainedModel, dtype: str | None = None, *, compile: bool = False) -> None:
        self.model = model
        device = next(model.parameters()).device
        self.dtype = resolve_rollout_dtype(dtype, device)
        self.module = model
        self._pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        if self.dtype is not None and any(p.dtype != self.dtype for p in model.parameters()):
            self.module = copy.deepcopy(model).eval()
            # Parameters only: buffers such as rotary frequencies stay float32.
            for p in self.module.parameters():
                p.requires_grad_(False)
                p.data = p.data.to(self.dtype)
            mine = dict(self.module.named_parameters())
            self._pairs = [(mine[n], p) for n, p in model.named_parameters() if p.requires_grad]
        # Parameters stay graph inputs (no freezing), so sync() reaches the compiled code too.
        self._compiled = torch.compile(self.module, dynamic=True) if compile else None

    @property
    def is_copy(self) -> bool:
        return self.module is not self.model

    @property
    def compiled(self) -> bool:
        """Whether decode steps still go through ``torch.compile`` (forward hooks may not fire)."""
        return self._compiled is not None

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the model's trainable parameters into the inference copy (a no-op without one)."""
        for mine, theirs in self._pairs:
            mine.copy_(theirs)

    def decode(self, **inputs: Any) -> Any:
        """One decode step's forward: compiled when asked for and working, else eager.

        A compiler that is missing or fails never stops sampling: the step is rerun eagerly (the
        KV buffers' fill level restored first) and the rest of this sampler's life stays eager.
        """
        cache = inputs.get("past_key_values")
        if self._compiled is None or not isinstance(cache, _BufferCache):
            return self.module(**inputs)
        lengths = [layer.length for layer in cache.layers]
        try:
            return self._compiled(**inputs)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back the same way
            warnings.warn(
                f"torch.compile of the decode step failed ({type(err).__name__}: {err}); decoding eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            self._compiled = None
            for layer, length in zip(cache.layers, lengths, strict=True):
                layer.length = length
            return self.module(**inputs)

    def precision(self) -> contextlib.AbstractContextManager:
        """The context sampling runs in: autocast off when a dtype was chosen, else the caller's."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(next(self.module.parameters()).device.type, enabled=False)


def _device(model: PreTrainedModel | Sampler) -> torch.device:
    return next((model.module if isinstance(model, Sampler) else model).parameters()).device


@torch.no_grad()
def sample(
    model: PreTrainedModel | Sampler,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    max_prompt_length: int | None = None,
    ignore_eos: bool = False,
    capture: torch.nn.Module | None = None,
) -> Generation:
    """Sample one response per prompt. temperature 0 = greedy (logprobs then use temperature 1).

    ``model`` is a policy or a :class:`Sampler` (e.g. a bf16 inference copy of one).
    ``ignore_eos`` samples exactly ``max_new_tokens`` tokens per prompt (benchmarks); EOS is
    then an ordinary token and ``finished`` is all False. ``generator`` must live on the
    model's device; a list of one generator per prompt (:func:`row_generators`) makes each
    response independent of the rest of the batch (data-parallel ranks sample shares of one batch).
    ``capture``, a block of the sampled model, fills ``Generation.hidden`` with its output at every
    position (see :func:`_generate`; PPO keeps the shared trunk's output this way).
    """
    sampler = model if isinstance(model, Sampler) else Sampler(model)
    model = sampler.module
    was_training = model.training
    model.eval()  # dropout off while sampling: the sampled distribution must be the scored one
    device = next(model.parameters()).device
    generators = generator if isinstance(generator, Sequence) else [generator] if generator is not None else []
    if isinstance(generator, Sequence) and len(generator) != len(prompts):
        raise ValueError(f"sample: {len(generator)} generators for {len(prompts)} prompts (one per prompt)")
    for g in generators:
        if g.device.type != device.type:
            raise ValueError(
                f"sample: the generator is on {g.device}, the model on {device}; use one on the model's device"
            )
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    query_ids, query_mask = encode_prompts(tokenizer, prompts, max_prompt_length)
    query_ids, query_mask = query_ids.to(device), query_mask.to(device)
    with sampler.precision():
        response_ids, response_logprobs, finished, hidden = _generate(
            model,
            query_ids,
            query_mask,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            generator=generator,
            eos_token_id=None if ignore_eos else eos,
            pad_token_id=pad,
            decode=sampler.decode,
            capture=capture,
        )
    # A token is real if no EOS came strictly before it (the EOS itself is real).
    is_eos = response_ids == eos if not ignore_eos else torch.zeros_like(response_ids, dtype=torch.bool)
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
        hidden=None if hidden is None else hidden.mul_(torch.cat([query_mask, response_mask], 1)[..., None]),
    )


def row_generators(
    seed: int, rows: Sequence[int | tuple[int, ...]], device: torch.device | str
) -> list[torch.Generator]:
    """One generator per row, seeded by (``seed``, the row's key): what :func:`sample` takes to make
    a row's tokens depend on its key alone, not on which batch, rank, shard or worker samples it.
    A key is a row number, or a tuple such as (prompt index, sample index)."""
    keys = [[seed, *((r,) if isinstance(r, int) else r)] for r in rows]
    return [
        torch.Generator(device=device).manual_seed(int(np.random.SeedSequence(k).generate_state(1, np.uint64)[0] >> 1))
        for k in keys
    ]


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
    model: PreTrainedModel | Sampler,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
) -> list[str]:
    """Convenience: sample and decode in batches, seeded."""
    generator = torch.Generator(device=_device(model)).manual_seed(seed)
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
    model: PreTrainedModel | Sampler,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence,
    k: int,
    *,
    policy_name: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    first_index: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list:
    """K sampled responses per prompt, as ``Sample`` records ready for ranking (by people or the panel).

    prompts: ``Prompt`` records. Each prompt's K copies share a batch, so the KV cache of a batch
    holds several prompts × K responses at once. ``ended`` records which responses reached EOS,
    so the reward model later trains on a cut-off response as cut off (as PPO will score it), and
    ``response_ids`` the sampled tokens themselves (EOS left out), so it trains on the very ids PPO
    scores rather than on a re-tokenisation of the decoded text (which can differ: non-canonical
    BPE splits, whitespace dropped by the decoding).
    Response j of prompt i is drawn from its own stream, seeded by (seed, first_index + i, j):
    the same tokens whatever the batch size, and a shard of a prompt list (``prompts[a:b]`` with
    ``first_index=a``) gives exactly the samples the whole list gives for those prompts.
    """

    if not K_MIN <= k <= K_MAX:
        raise ValueError(f"k must be {K_MIN}..{K_MAX} (responses ranked per prompt), got {k}")
    flat = [p for p in prompts for _ in range(k)]
    device = _device(model)
    generators = row_generators(seed, [(first_index + i, j) for i in range(len(prompts)) for j in range(k)], device)
    texts: list[str] = []
    ended: list[bool] = []
    ids: list[list[int]] = []
    for start in range(0, len(flat), batch_size):
        gen = sample(
            model,
            tokenizer,
            [p.text for p in flat[start : start + batch_size]],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            generator=generators[start : start + batch_size],
        )
        texts.extend(decode_responses(tokenizer, gen))
        ended.extend(gen.finished.tolist())
        ids.extend(sampled_ids(gen))
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
            response_ids=ids[i * k : (i + 1) * k],
        )
        for i, p in enumerate(prompts)
    ]


def sampled_ids(gen: Generation) -> list[list[int]]:
    """Each response's sampled token ids without its EOS (``gen.finished`` says whether it came)."""
    lengths = (gen.lengths - gen.finished.long()).tolist()
    return [row[:n] for row, n in zip(gen.response_ids.tolist(), lengths, strict=True)]
