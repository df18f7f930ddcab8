"""Data parallel on torch.distributed: the process group, sharding, collectives, the wrappers.

tether's trainers run unchanged in one process and as N ranks of one job. Where the group comes
from does not matter: ``torchrun --nproc-per-node N -m tether sft ...`` sets the environment that
:func:`init_from_env` reads, Ray Train's ``TorchTrainer`` initialises the group before it calls
the training function (:func:`init_from_env` then only reads it), and a single process has no
group at all (every helper here is then the identity, at no cost).

What each rank does (the trainers follow it; see docs/scaling.md):

- every rank holds the whole model (DDP) or a shard of it (FSDP2, ``parallel: fsdp``) and the
  same optimiser state; the global batch is split over the ranks (:func:`shard_range`), each
  rank's micro-batches accumulate under ``no_sync`` and the last one all-reduces;
- losses keep their single-process normalisation: token means and per-prompt weights are divided
  by the GLOBAL count, which every rank knows (the batch's composition is global), and multiplied
  by the world size because DDP and FSDP2 average gradients over ranks; so N ranks give the update
  of one process with the same global batch, to float summation order;
- only rank 0 writes checkpoints, metrics, logs and progress bars; every rank resumes from the
  same state, with its own RNG stream (:func:`seed_rank`, :func:`gather_rng_states`).

Models run through :class:`ParallelModel`: DDP (or FSDP2) wraps a small module whose ``forward``
calls any function of the model (:class:`ModelCall`). DDP's reducer only sees backward passes of
forwards that went through the wrapper, and tether's forwards are not all ``model(...)`` (the RM
reads a head at the last token; PPO's shared trunk runs a model's top blocks on kept hidden
states): through :class:`ModelCall` each of them is one DDP forward.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tether.checkpoint import rng_state, save_state
from tether.config import Parallel, literal_choices

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the job. One process: rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # rank on this node: which GPU it drives

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics, logs and progress bars."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one rank: collectives are real."""
        return self.world_size > 1


def world() -> Dist:
    """The current process group as a :class:`Dist` (one process when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> Dist:
    """Join the job this process belongs to and return its :class:`Dist`.

    - a group already initialised (Ray Train, a caller's own ``init_process_group``) is used as it is;
    - ``WORLD_SIZE`` > 1 in the environment (torchrun, or the variables set by hand with
      ``MASTER_ADDR``/``MASTER_PORT``/``RANK``) initialises one: NCCL when ``device`` resolves to
      CUDA, gloo on CPUs; each CUDA rank takes GPU ``LOCAL_RANK``;
    - otherwise this is one process and nothing is initialised.
    """
    if dist.is_available() and dist.is_initialized():
        return world()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with torchrun "
            "(torchrun --nproc-per-node N -m tether ...) or set them for every rank"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = not device.startswith("cpu") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return world()


def comm_device() -> torch.device:
    """Where tensors must live for the group's collectives: the current GPU under NCCL, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Collectives (identities in one process)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``x`` over the ranks (a new tensor on ``x``'s device and dtype)."""
    if not world().enabled:
        return x
    buf = x.detach().to(comm_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(x.device)


def sum_floats(values: Sequence[float]) -> list[float]:
    """Each of ``values`` summed over the ranks, in one float64 all-reduce."""
    if not world().enabled:
        return [float(v) for v in values]
    return all_reduce_sum(torch.tensor([float(v) for v in values], dtype=torch.float64)).tolist()


def sum_dict(values: dict[str, float]) -> dict[str, float]:
    """A dict of floats summed over the ranks key by key (every rank must hold the same keys, in
    the same order)."""
    keys = list(values)
    return dict(zip(keys, sum_floats([values[k] for k in keys]), strict=True))


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (picklable objects; tensors should be on the CPU)."""
    d = world()
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not world().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_only(log: Callable[[str], None], d: Dist | None = None) -> Callable[[str], None]:
    """``log`` on rank 0, a no-op elsewhere: one job, one log."""
    return log if (d or world()).is_main else _silent


def _silent(_: str) -> None:
    pass


def barrier() -> None:
    if world().enabled:
        dist.barrier()


# --------------------------------------------------------------------------------------------
# Sharding


def shard_range(n: int, d: Dist | None = None) -> range:
    """This rank's contiguous block of ``n`` items: sizes differ by at most one, rank order.

    Contiguous blocks keep neighbours together (a prompt's K responses, one prompt's rankings)
    and the concatenation of the ranks' blocks is the original order.
    """
    d = d or world()
    return range(n * d.rank // d.world_size, n * (d.rank + 1) // d.world_size)


def shard(items: Sequence[T], d: Dist | None = None) -> list[T]:
    """This rank's block of ``items`` (see :func:`shard_range`)."""
    return [items[i] for i in shard_range(len(items), d)]


def micro_batches(
    items: Sequence[T], size: int, d: Dist | None = None, *, equal: bool = False
) -> list[tuple[list[T], bool]]:
    """This rank's share of a step's ``items`` in micro-batches of ``size``: ``[(chunk, real)]``.

    Every rank gets at least one micro-batch, because every rank must take part in the step's
    gradient all-reduce: a rank whose share is empty gets ``(items[:1], False)``, a filler whose
    loss the caller multiplies by 0. ``equal`` pads every rank to the same number of
    micro-batches with such fillers (FSDP2 gathers the weights in every forward: all ranks must
    run as many).
    """
    d = d or world()
    if not items:
        raise ValueError("micro_batches: a step with no items")
    mine = shard(items, d)
    out = [(list(mine[i : i + size]), True) for i in range(0, len(mine), size)]
    most = -(-len(items) // d.world_size)  # the largest share, ceil(n / world_size)
    want = -(-most // size) if equal else 1
    while len(out) < want:
        out.append(([items[0]], False))
    return out


# --------------------------------------------------------------------------------------------
# Random streams


def rank_seed(seed: int, rank: int) -> int:
    """A seed for ``rank``'s own random stream, a well-mixed function of (seed, rank)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


def seed_rank(seed: int, d: Dist | None = None) -> None:
    """Give every rank but 0 its own Python, NumPy and torch stream (dropout differs between
    ranks). Called once every rank has built the same models from ``seed``; rank 0 carries on with
    the stream it has, so one process runs exactly as it does without this call."""
    d = d or world()
    if d.rank == 0:
        return
    s = rank_seed(seed, d.rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def gather_rng_states(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's RNG ``state`` (from :func:`tether.checkpoint.rng_state`), in rank order."""
    return all_gather_object(state)


# --------------------------------------------------------------------------------------------
# Models


class ModelCall(nn.Module):
    """``forward(fn, *args)`` is ``fn(model, *args)``: any computation on ``model`` as one forward.

    DDP and FSDP2 act at their wrapper's ``forward`` (DDP readies its gradient hooks there, FSDP2
    gathers the root's weights): wrapping this module lets them see the RM's head read at the
    last token, a shared trunk's top blocks, or a plain ``model(...)`` alike.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)


class ParallelModel:
    """A trainable model placed for data parallel training (or not, in one process).

    ``run(fn, *args)`` computes ``fn(model, *args)`` through the wrapper. Gradient accumulation:
    forward AND backward of every micro-batch but a step's last under ``with model.sync(False)``
    (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``); the last one's backward then
    all-reduces everything accumulated. ``module`` is the model itself (saving, sampling and any
    forward without a gradient under DDP; FSDP2 shards it, see :attr:`sharded`).
    """

    def __init__(self, model: nn.Module, strategy: Parallel | str = "ddp", d: Dist | None = None) -> None:
        if strategy not in literal_choices(Parallel):
            raise ValueError(f"parallel must be one of {', '.join(literal_choices(Parallel))}, got {strategy!r}")
        self.module = model
        self.dist = d or world()
        self.strategy = strategy if self.dist.enabled else "none"
        call = ModelCall(model)
        if self.strategy == "ddp":
            device = next(model.parameters()).device
            self.engine: nn.Module = nn.parallel.DistributedDataParallel(
                call,
                device_ids=[device] if device.type == "cuda" else None,
                # Buffers (rotary frequencies) are constants; syncing them in every forward would
                # also be a collective that ranks with unequal micro-batch counts cannot match.
                forward_sync_buffers=False,
            )
        elif self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            if hasattr(model, "peft_config"):
                raise ValueError("parallel = 'fsdp' with LoRA is not supported: use 'ddp' (LoRA's weights are small)")
            for block in decoder_blocks(model):
                fully_shard(block)
            self.engine = cast(nn.Module, fully_shard(call))
        else:
            self.engine = call

    @property
    def sharded(self) -> bool:
        """FSDP2: every forward is a collective, so all ranks must run the same ones."""
        return self.strategy == "fsdp"

    @property
    def world_size(self) -> int:
        """What a loss is multiplied by so the ranks' averaged gradients are their sum."""
        return self.dist.world_size

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.engine(fn, *args, **kwargs)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """FSDP2: the whole model's state dict, gathered to CPU (a collective: every rank calls it;
        what rank 0 saves). None when the model is whole on every rank (save ``module`` itself)."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # Tied weights (an LM head sharing the embeddings) come gathered as separate tensors;
        # keep one name, as saving the whole model would.
        canonical = dict(self.module.named_parameters())
        tied = {n for n, _ in self.module.named_parameters(remove_duplicate=False)} - set(canonical)
        return {k: cast(torch.Tensor, v) for k, v in state.items() if k not in tied}

    def checkpoint_parts(
        self, name: str, optimizer: torch.optim.Optimizer, *, gather: bool = True
    ) -> tuple[dict[str, nn.Module], dict[str, Any]]:
        """What :func:`tether.checkpoint.save_state` / ``load_state`` take for this model and its
        optimiser: ``({name: model}, {"optimizer": optimizer})``, or under FSDP2 one entry holding
        both as full tensors, gathered now unless ``gather=False`` (loading): a collective."""
        if not self.sharded:
            return {name: self.module}, {"optimizer": optimizer}
        return {}, {f"{name}+optimizer": _FullState(self.module, optimizer, gather)}

    @contextlib.contextmanager
    def sync(self, enabled: bool) -> Iterator[None]:
        """Around a micro-batch's forward and backward: ``False`` keeps its gradients on this rank."""
        if enabled or self.strategy == "none":
            yield
        elif self.strategy == "ddp":
            with self.engine.no_sync():  # type: ignore[operator]
                yield
        else:
            self.engine.set_requires_gradient_sync(False)  # type: ignore[operator]
            try:
                yield
            finally:
                self.engine.set_requires_gradient_sync(True)  # type: ignore[operator]


class _FullState:
    """A sharded model's trainable weights and optimiser state as full CPU tensors: the
    ``state_dict()`` / ``load_state_dict()`` pair a checkpoint keeps for it (torch's distributed
    state-dict API gathers and re-shards, so the state resumes on any number of ranks)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, gather: bool) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        self.model, self.optimizer = model, optimizer
        self.snapshot: dict[str, Any] | None = None
        if gather:
            weights, optim = get_state_dict(
                model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            self.snapshot = {"model": {k: v for k, v in weights.items() if k in trainable}, "optimizer": optim}

    def state_dict(self) -> dict[str, Any]:
        assert self.snapshot is not None, "built with gather=False (for loading)"
        return self.snapshot

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True, strict=False),
        )


def save_trainer_state(
    directory: Path,
    par: ParallelModel,
    role: str,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    counters: dict[str, Any],
) -> None:
    """A one-model trainer's resumable state (SFT, RM): the model as ``role``, its optimiser and
    scheduler, ``counters`` + the world size, and every rank's RNG streams. Every rank calls it
    (gathering the streams, and FSDP2's weights, are collectives); rank 0 writes."""
    rngs = gather_rng_states(rng_state())
    models, stateful = par.checkpoint_parts(role, optimizer)
    if par.dist.is_main:
        counters = counters | {"world_size": par.dist.world_size}
        save_state(directory, models, stateful | {"scheduler": scheduler}, counters, rng_states=rngs)


def as_parallel(model: nn.Module | ParallelModel) -> ParallelModel:
    """``model`` if it is a :class:`ParallelModel`, else one process's (no wrapper, no group)."""
    return model if isinstance(model, ParallelModel) else ParallelModel(model, d=Dist())


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face model (``layers`` or GPT-2's ``h``), under peft too."""
    get_base = getattr(model, "get_base_model", None)  # peft
    inner: Any = get_base() if get_base is not None else model
    stack = getattr(inner, inner.base_model_prefix)
    blocks = getattr(stack, "layers", None) or getattr(stack, "h", None)
    if blocks is None:
        raise ValueError(f"parallel=fsdp: no transformer blocks found in {type(inner).__name__}")
    return list(blocks)
