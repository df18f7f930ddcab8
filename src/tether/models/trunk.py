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
from tether.models.heads import unwrap


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
