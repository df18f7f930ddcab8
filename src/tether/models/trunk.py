"""One frozen trunk for several models: trlX's "hydra" heads, generalised to PPO's four roles.

With partial fine-tuning (``trainable_layers``) the policy, the frozen reference, the value model
(initialised from the RM) and the reward model often hold the very same embeddings and bottom
blocks, frozen: the RM and the value model come from the SFT checkpoint, whose bottom blocks are
the base model's. Each would recompute them on the same token ids. :class:`SharedTrunk` runs those
blocks once per batch and each model's own top blocks (and head) on the result; the output is the
same computation, op for op, as each model's full forward.

What is shared is read from the weights themselves, never assumed: a block is shared when every
model holds it bit for bit and none trains it (:func:`shared_depth`). When nothing is shared the
caller uses the plain forwards.

PPO's sampler runs the trunk too: when it is the policy itself (not a low-precision copy),
sampling keeps the trunk's output at every position it feeds (a hook on :meth:`SharedTrunk.last_block`)
and scoring starts from it, so the trunk runs once per token per rollout.

Implementation: a Hugging Face decoder backbone (``model.model`` for Llama-like models) runs its
``layers`` on ``inputs_embeds``; running the bottom ``k`` blocks is the backbone with its layer
list cut to ``[:k]`` and its final norm off, and the top part is the backbone with the list cut to
``[k:]`` fed the trunk's hidden states as ``inputs_embeds``. The attention mask and the rotary
embeddings are built from the same ``attention_mask`` and ``position_ids`` in both, so each block
sees exactly what it sees in the full forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from tether.models.generation import position_ids_from_mask
from tether.models.heads import scalar_per_token, unwrap


def backbone(model: PreTrainedModel) -> PreTrainedModel:
    """The decoder stack (``LlamaModel`` & co.) of a causal-LM or sequence-classification model."""
    inner = unwrap(model)
    return getattr(inner, inner.base_model_prefix)


def _frozen_and_equal(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if pa.keys() != pb.keys() or any(p.requires_grad for p in (*pa.values(), *pb.values())):
        return False
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    if ba.keys() != bb.keys():
        return False
    return all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
        for d1, d2 in ((pa, pb), (ba, bb))
        for x, y in ((d1[k], d2[k]) for k in d1)
    )


def shared_depth(models: Sequence[PreTrainedModel]) -> int:
    """How many bottom blocks (with the embeddings) every model holds bit for bit, all frozen.

    0 when the embeddings differ or train, when the backbones are of different kinds or build
    their attention differently, or when the very first block differs (e.g. LoRA adapters in
    every block).
    """
    stacks = [backbone(m) for m in models]
    first = stacks[0]
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if any(type(s) is not type(first) or not all(hasattr(s, n) for n in needed) for s in stacks):
        return 0
    if any(s.config._attn_implementation != first.config._attn_implementation for s in stacks):
        return 0
    if not all(_frozen_and_equal(first.embed_tokens, s.embed_tokens) for s in stacks[1:]):
        return 0
    if not all(_frozen_and_equal(first.rotary_emb, s.rotary_emb) or _same_rotary(first, s) for s in stacks[1:]):
        return 0
    depth = 0
    for i in range(min(len(s.layers) for s in stacks)):
        block = first.layers[i]
        if any(p.requires_grad for p in block.parameters()):
            break
        if not all(_frozen_and_equal(block, s.layers[i]) for s in stacks[1:]):
            break
        depth += 1
    return depth


def _same_rotary(a: PreTrainedModel, b: PreTrainedModel) -> bool:
    fa, fb = getattr(a.rotary_emb, "inv_freq", None), getattr(b.rotary_emb, "inv_freq", None)
    return fa is not None and fb is not None and torch.equal(fa, fb)


@contextlib.contextmanager
def _cut(stack: PreTrainedModel, layers: Sequence[nn.Module], *, final_norm: bool) -> Iterator[None]:
    """The backbone with only ``layers`` (and without its final norm unless ``final_norm``)."""
    saved_layers, saved_norm = stack.layers, stack.norm
    stack.layers = nn.ModuleList(layers)
    if not final_norm:
        stack.norm = nn.Identity()
    try:
        yield
    finally:
        stack.layers, stack.norm = saved_layers, saved_norm


class SharedTrunk:
    """The bottom ``depth`` blocks shared by ``models``, computed once; each model's top on top.

    After construction the models also share the trunk's modules (one copy in memory instead of
    one per model): they were equal and frozen, so nothing changes.
    """

    def __init__(self, models: Sequence[PreTrainedModel], depth: int) -> None:
        if depth <= 0:
            raise ValueError("SharedTrunk needs depth >= 1 (use shared_depth to find it)")
        self.depth = depth
        self.owner = backbone(models[0])
        for model in models[1:]:
            stack = backbone(model)
            stack.embed_tokens = self.owner.embed_tokens
            for i in range(depth):
                stack.layers[i] = self.owner.layers[i]

    @classmethod
    def detect(cls, models: Sequence[PreTrainedModel]) -> SharedTrunk | None:
        """A trunk over ``models`` when they share at least one frozen block, else None."""
        depth = shared_depth(models)
        return cls(models, depth) if depth > 0 else None

    def last_block(self, model: nn.Module) -> nn.Module | None:
        """The trunk's last block when ``model`` runs the trunk's very modules (its embeddings and
        bottom ``depth`` blocks are the trunk's objects, not copies), else None: a forward hook there
        sees what :meth:`hidden` computes, e.g. while sampling from the policy."""
        try:
            stack = backbone(model)
        except AttributeError:
            return None
        layers = getattr(stack, "layers", None)
        if getattr(stack, "embed_tokens", None) is not self.owner.embed_tokens or layers is None:
            return None
        if len(layers) < self.depth or any(layers[i] is not self.owner.layers[i] for i in range(self.depth)):
            return None
        return layers[self.depth - 1]

    @torch.no_grad()
    def hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The hidden states after the shared blocks: ``[B, T, H]`` (no gradient: they are frozen)."""
        with _cut(self.owner, self.owner.layers[: self.depth], final_norm=False):
            return self.owner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            ).last_hidden_state

    def top(self, model: PreTrainedModel, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """``model``'s own blocks and final norm on the trunk's ``hidden``: ``[B, T, H]``, the
        backbone output its head reads (differentiable through the model's own blocks)."""
        stack = backbone(model)
        with _cut(stack, stack.layers[self.depth :], final_norm=True):
            return stack(
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            ).last_hidden_state

    def logits(self, model: PreTrainedModel, hidden: Tensor, attention_mask: Tensor, keep: int) -> Tensor:
        """The causal LM's logits at the last ``keep`` positions: ``[B, keep, V]``."""
        out = self.top(model, hidden, attention_mask)
        return unwrap(model).lm_head(out[:, -keep:])

    def scalars(self, model: PreTrainedModel, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """A scalar-head model's raw output at every position: ``[B, T]`` float32."""
        return unwrap(model).score(self.top(model, hidden, attention_mask)).squeeze(-1).float()

    @torch.no_grad()
    def differs_from(self, model: PreTrainedModel) -> str | None:
        """Why running ``model``'s top on the trunk's output is not ``model``'s own forward, or None.

        The trunk's output goes back in as ``inputs_embeds`` and the head reads the top's output,
        skipping whatever the model's own forward does around its blocks (Gemma's embedding scale
        and logit soft-capping, Granite's multipliers). A probe batch answers it: two sequences
        (one left-padded), longer than twice any sliding window, compared at their real positions
        in eval mode (logits for a causal LM, the raw scalar for a scalar head).
        """
        inner = unwrap(model)
        width = 2 * max(8, int(getattr(inner.config, "sliding_window", None) or 0) + 4)
        device = next(model.parameters()).device
        probe = torch.Generator().manual_seed(0)  # CPU: draws the probe's token ids there
        ids = torch.randint(int(inner.config.vocab_size), (2, width), generator=probe).to(device)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        was_training = model.training
        model.eval()
        try:
            hidden = self.hidden(ids, mask)
            if hasattr(inner, "score"):
                what, own, shared = "scores", scalar_per_token(model, ids, mask), self.scalars(model, hidden, mask)
            else:
                own = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
                what, shared = "logits", self.logits(model, hidden, mask, width)
        finally:
            model.train(was_training)
        real = mask.bool()
        own, shared = own[real].float(), shared[real].float()
        gap = float((own - shared).abs().max())
        if gap <= 1e-4 * (1.0 + float(own.abs().max())):
            return None
        return f"its {what} through the frozen blocks' output differ from the model's own forward by {gap:.2g}"


def frozen_depth(model: PreTrainedModel) -> int:
    """How many bottom blocks of ``model`` (with its embeddings) no parameter trains: 0 when the
    embeddings train or the backbone is not a ``embed_tokens`` / ``layers`` / ``norm`` stack."""
    stack = backbone(model)
    if not all(hasattr(stack, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return 0
    if any(p.requires_grad for p in stack.embed_tokens.parameters()):
        return 0
    depth = 0
    for block in stack.layers:
        if any(p.requires_grad for p in block.parameters()):
            break
        depth += 1
    return depth


def _dropout_in(modules: Sequence[nn.Module], config: object) -> str | None:
    """Why the frozen ``modules`` would not give the same output twice in train mode, or None."""
    for module in modules:
        for name, sub in module.named_modules():
            if sub._forward_hooks or sub._forward_pre_hooks:  # tether's residual dropout is a hook
                return (
                    f"a forward hook on the frozen {type(sub).__name__} (residual dropout, model.residual_dropout > 0)"
                )
            if isinstance(sub, nn.Dropout) and sub.p > 0:
                return f"dropout p={sub.p} in the frozen {name or type(module).__name__}"
    p = float(getattr(config, "attention_dropout", 0.0) or 0.0)
    return f"attention dropout {p} in the frozen blocks (config.attention_dropout)" if p > 0 else None


class TrunkCache:
    """The frozen bottom blocks' output for every training sequence, kept across epochs (on the CPU).

    With ``trainable_layers`` the embeddings and bottom blocks are frozen and (without dropout in
    them) give the same hidden states for a sequence in every epoch. The first time a sequence is
    seen its batch runs the trunk (:class:`SharedTrunk`, one model) and each row's real tokens'
    hidden states ``[n, H]`` are kept, keyed by the row's token ids; later batches made only of
    known sequences skip the trunk and run the trained top blocks, final norm and head on the kept
    states (padding positions get zeros: under right or left padding no real position attends to
    them, and no loss reads them). The same numbers as the full forward up to float32 round-off (a
    sequence's trunk output computed in one batch's padding against another's).

    Stale states are detected, not assumed away: a trunk parameter changed in place (its version
    counter moved, as under ``torch.no_grad()`` updates or ``load_state_dict``) or replaced empties
    the store; one made trainable raises. (A write through ``.data`` bypasses version counters.)
    """

    def __init__(self, model: PreTrainedModel, depth: int) -> None:
        self.trunk = SharedTrunk([model], depth)
        stack = self.trunk.owner
        self._tensors = [
            *stack.embed_tokens.parameters(),
            *stack.embed_tokens.buffers(),
            *stack.rotary_emb.buffers(),
            *(t for block in stack.layers[:depth] for t in (*block.parameters(), *block.buffers())),
        ]
        self._fingerprint = self._current()
        self.store: dict[tuple[int, ...], Tensor] = {}  # token ids → [n, H] CPU
        self.nbytes = 0

    @classmethod
    def plan(
        cls, model: PreTrainedModel, *, n_tokens: int, epochs_left: int, limit_mib: float, parallel: str
    ) -> tuple[TrunkCache | None, str]:
        """A cache for training ``model`` when it is exact and fits, else None; and a log line
        saying which and why (how many blocks, how many MiB at most: ``n_tokens`` × hidden × bytes).

        ``n_tokens``: the real tokens of the sequences to keep; ``epochs_left``: the passes that
        will read them (one: nothing to reuse); ``parallel``: the :class:`ParallelModel` strategy.
        """
        if limit_mib <= 0:
            return None, "off (trunk_cache_mib = 0)"
        if hasattr(model, "peft_config"):
            return None, "off: LoRA adapters train inside every block (no frozen trunk)"
        if parallel == "fsdp":
            return None, "off: parallel = 'fsdp' shards the frozen blocks too (use 'ddp' to cache them)"
        if epochs_left < 2:
            return None, "off: one epoch left, nothing to reuse"
        depth = frozen_depth(model)
        if depth == 0:
            return None, "off: no frozen bottom block (set model.trainable_layers)"
        stack = backbone(model)
        why = _dropout_in([stack.embed_tokens, *stack.layers[:depth]], unwrap(model).config)
        if why is not None:
            return None, f"off: {why} makes their output differ between epochs"
        hidden_size = int(stack.embed_tokens.weight.shape[1])
        itemsize = stack.embed_tokens.weight.element_size()
        mib = n_tokens * hidden_size * itemsize / 2**20
        n_blocks = len(stack.layers)
        if mib > limit_mib:
            return None, f"off: the frozen blocks' output would take {mib:,.0f} MiB > trunk_cache_mib = {limit_mib:g}"
        cache = cls(model, depth)
        if (why := cache.trunk.differs_from(model)) is not None:
            return None, f"off: {why} (a probe at set-up)"
        return cache, (
            f"on: the output of the embeddings and {depth} of {n_blocks} blocks (frozen) is kept for the "
            f"later epochs: {n_tokens:,} tokens x {hidden_size} x {itemsize} bytes = {mib:,.1f} MiB on the CPU"
        )

    def _current(self) -> list[tuple[int, int, bool]]:
        return [(t.data_ptr(), t._version, t.requires_grad) for t in self._tensors]

    def _check_fresh(self) -> None:
        now = self._current()
        if now == self._fingerprint:
            return
        if any(grad for _, _, grad in now):
            raise RuntimeError(
                "TrunkCache: a parameter of the frozen trunk now requires grad; the cache (and the "
                "trunk's no-grad forward) would be wrong. Build it after freezing, and keep it frozen."
            )
        self.store.clear()  # a frozen weight changed: every kept state is stale
        self.nbytes = 0
        self._fingerprint = now

    def hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The trunk's output ``[B, T, H]`` for a batch: from the store when every row is in it,
        else computed (and each new row's real tokens kept)."""
        self._check_fresh()
        real = attention_mask.bool()
        ids_cpu, real_cpu = input_ids.cpu(), real.cpu()
        keys = [tuple(row[m].tolist()) for row, m in zip(ids_cpu, real_cpu, strict=True)]
        if any(k not in self.store for k in keys):
            out = self.trunk.hidden(input_ids, attention_mask)
            for i, k in enumerate(keys):
                if k not in self.store:
                    kept = out[i][real[i]].cpu()  # (boolean indexing copies: no view of the batch)
                    self.store[k] = kept
                    self.nbytes += kept.nbytes
            return out
        first = self.store[keys[0]]
        out = torch.zeros((*input_ids.shape, first.shape[-1]), dtype=first.dtype, device=input_ids.device)
        for i, k in enumerate(keys):
            out[i][real[i]] = self.store[k].to(input_ids.device)
        return out

    def logits(self, model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The causal LM's logits ``[B, T, V]``, the trunk's part from the store where it can."""
        hidden = self.hidden(input_ids, attention_mask)
        return self.trunk.logits(model, hidden, attention_mask, int(input_ids.shape[1]))

    def scalars(self, model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """A scalar-head model's raw output at every position ``[B, T]`` (float32), likewise."""
        return self.trunk.scalars(model, self.hidden(input_ids, attention_mask), attention_mask)

    def __len__(self) -> int:
        return len(self.store)
