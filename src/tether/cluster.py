"""Where the pipeline's work runs: in this process (:class:`Local`, the default) or on a Ray
cluster (:class:`RayCluster`, ``tether run --ray-address ...``).

The pipeline has two kinds of work:

- **training stages** (SFT, RM, PPO, PPO-ptx): one function called on every rank of a
  torch.distributed group. Locally that is this process (or whatever group ``torchrun`` made);
  on Ray it is a Ray Train ``TorchTrainer`` over N workers, which makes the group (gloo on CPUs,
  NCCL on GPUs) and sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as torchrun does. The
  trainers do the rest: only rank 0 writes checkpoints, every rank resumes from them.
- **independent calls over prompt shards** (sampling K responses, labeling, evaluation): Ray
  tasks. Every random draw in them is seeded by the item (prompt index, response index), never by
  the shard or worker, so N shards give what one process gives.

Importing this module never imports Ray; only :class:`RayCluster` does, when it connects.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from tether.allocator import keep_freed_memory

T = TypeVar("T")


class StageFailed(RuntimeError):
    """A stage could not finish on the cluster (a worker or node died). One line, for the user;
    rerunning the same command resumes from the stage's last checkpoint."""


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``[0, n)`` as at most ``parts`` contiguous ``(start, end)`` ranges of near-equal size, none empty
    (one empty range when n = 0)."""
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class Executor(Protocol):
    workers: int

    def describe(self) -> str:
        """Where the work ran, for the manifest."""

    def shards(self, n: int) -> list[tuple[int, int]]:
        """How to cut a list of n items for :meth:`map`."""

    def map(
        self, calls: Sequence[Callable[[], T]], what: str = "", on_done: Callable[[int], None] | None = None
    ) -> list[T]:
        """Run independent calls (picklable: module-level functions and partials of them); results in
        order. ``what``: the stage, for error messages; ``on_done(i)`` is called here, in the
        driver, as call ``i`` finishes (for progress lines)."""

    def train(self, name: str, fn: Callable[..., T], *args: Any, log: Callable) -> T:
        """Run a training stage: ``fn(*args, log=...)`` on every rank; rank 0's return value."""


class Local:
    """Everything in this process, one shard per list: the pipeline as it always ran."""

    workers = 1

    def describe(self) -> str:
        return "local"

    def shards(self, n: int) -> list[tuple[int, int]]:
        return [(0, n)]

    def map(
        self, calls: Sequence[Callable[[], T]], what: str = "", on_done: Callable[[int], None] | None = None
    ) -> list[T]:
        results = []
        for i, call in enumerate(calls):
            results.append(call())
            if on_done is not None:
                on_done(i)
        return results

    def train(self, name: str, fn: Callable[..., T], *args: Any, log: Callable) -> T:
        return fn(*args, log=log)


# Where a Ray worker finds tether: the tree this driver imported it from, when that is a source
# checkout (an editable install or PYTHONPATH) rather than site-packages, which every node has.
def _source_root() -> str | None:
    import tether

    root = Path(tether.__file__).resolve().parents[1]
    return None if root.name in ("site-packages", "dist-packages") else str(root)


# A private cluster on one machine: no dashboard (and so no state API, which Ray Train's placement
# group cleaner polls: quiet its warnings), a small object store (only paths and records cross
# it), no preemption watcher or metrics actors (nothing preempts a laptop; no dashboard shows them).
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}


def local_init_kwargs(num_cpus: int) -> dict[str, Any]:
    """``ray.init`` arguments for a private cluster of ``num_cpus`` CPUs on this machine (plus
    ``env_vars`` for the runtime environment, which the caller passes on)."""
    import ray

    os.environ.update({k: os.environ.get(k, v) for k, v in LOCAL_ENV.items()})  # read by the driver too
    return dict(
        num_cpus=num_cpus,
        object_store_memory=256 * 2**20,
        include_dashboard=False,
        logging_level="WARNING",
        logging_config=ray.LoggingConfig(log_level="ERROR"),
        env_vars=dict(LOCAL_ENV),
    )


def _call(fn: Callable[[], T]) -> T:
    keep_freed_memory()  # a Ray worker process, as the `tether` command does for itself
    return fn()


def _train_loop(config: dict) -> dict:
    """Runs on every Ray Train worker, inside the process group Ray made."""
    from rich.console import Console

    from tether.distributed import init_from_env

    keep_freed_memory()
    log = Console().print if init_from_env().is_main else (lambda *_a, **_k: None)
    return config["fn"](*config["args"], log=log)


class RayCluster:
    """Training stages as Ray Train ``TorchTrainer`` runs over ``workers`` workers, sharded calls as
    Ray tasks (``workers`` shards per list). A context manager: connects on entry, and disconnects
    (stopping the cluster if it started one) on exit.

    ``address``: ``local`` starts a private cluster on this machine for this command (a laptop);
    ``auto`` joins the cluster started on this machine by ``ray start --head`` (or named by
    ``RAY_ADDRESS``); ``HOST:PORT`` joins that cluster's head. If Ray is already initialised in
    this process (a notebook, a test), that connection is used as it is.
    """

    def __init__(
        self,
        address: str,
        workers: int = 1,
        *,
        use_gpu: bool = False,
        cpus_per_worker: int = 1,
        max_failures: int = 0,
        storage: str | Path | None = None,
    ):
        if workers < 1:
            raise ValueError(f"--num-workers must be >= 1, got {workers}")
        if cpus_per_worker < 1:
            raise ValueError(f"--cpus-per-worker must be >= 1, got {cpus_per_worker}")
        if max_failures < 0:
            raise ValueError(f"--max-failures must be >= 0, got {max_failures}")
        self.address, self.workers, self.use_gpu = address, workers, use_gpu
        self.cpus_per_worker, self.max_failures = cpus_per_worker, max_failures
        self.storage = Path(storage).resolve() if storage else None
        self._owned = False

    def describe(self) -> str:
        return f"ray ({self.address}): {self.workers} workers" + (" with GPUs" if self.use_gpu else "")

    def __enter__(self) -> RayCluster:
        try:
            import ray
        except ModuleNotFoundError:
            raise ValueError(
                "--ray-address needs Ray, which is not installed: pip install 'tether[ray]' "
                "(or, from a checkout, pip install -e '.[ray]')"
            ) from None
        if ray.is_initialized():
            return self
        env = {}
        if (root := _source_root()) is not None:
            env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
        if self.address == "local":
            need = self.workers * self.cpus_per_worker
            kwargs = local_init_kwargs(max(need, os.cpu_count() or 1))
            env |= kwargs.pop("env_vars")
        else:
            kwargs = {"address": self.address}
        try:
            ray.init(runtime_env={"env_vars": env}, **kwargs)
        except ConnectionError as e:
            raise StageFailed(f"cannot reach the Ray cluster at {self.address!r}: {_first_line(e)}") from None
        self._owned = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owned:
            import ray

            ray.shutdown()
            self._owned = False

    def shards(self, n: int) -> list[tuple[int, int]]:
        return split(n, self.workers)

    def map(
        self, calls: Sequence[Callable[[], T]], what: str = "", on_done: Callable[[int], None] | None = None
    ) -> list[T]:
        import ray

        # No retries: a task whose worker died fails the stage like a training worker does, and
        # the rerun redoes the stage (its results do not depend on where it ran).
        remote: Any = ray.remote(_call).options(
            num_cpus=self.cpus_per_worker, num_gpus=1 if self.use_gpu else 0, max_retries=0
        )
        refs = [remote.remote(call) for call in calls]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        try:
            pending = list(refs)
            while pending:  # in the order the tasks finish; a failed one raises as soon as it fails
                ready, pending = ray.wait(pending, num_returns=1)
                i = index[ready[0]]
                results[i] = ray.get(ready[0])  # each result fetched once
                if on_done is not None:
                    on_done(i)
            return results
        except ray.exceptions.RayTaskError as e:
            _cancel(refs)
            if isinstance(e.cause, Exception):  # the task's own error (bad input, a bug): as it is
                raise e.cause from None
            raise
        except ray.exceptions.RayError as e:
            _cancel(refs)
            raise StageFailed(
                f"{what or 'a stage'}: a Ray task died ({type(e).__name__}: {_first_line(e)}); rerun the same command"
            ) from None

    def train(self, name: str, fn: Callable[..., T], *args: Any, log: Callable) -> T:
        # Ray Train v2 (the default since Ray 2.50): rank 0's return value comes back in the result.
        os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
        from ray.train import RunConfig, ScalingConfig, TrainingFailedError
        from ray.train.torch import TorchTrainer
        from ray.train.v2.api.config import FailureConfig  # v2's own: controller_failure_limit

        # Workers keep the driver's working directory (Ray would move them to its trial dir), so
        # relative paths mean the same on every rank as here.
        os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
        resources = {"CPU": self.cpus_per_worker} | ({"GPU": 1} if self.use_gpu else {})
        trainer = TorchTrainer(
            cast(Any, _train_loop),  # Ray Train v2 passes its return value on; v1 types say None
            train_loop_config={"fn": fn, "args": args},
            scaling_config=ScalingConfig(
                num_workers=self.workers, use_gpu=self.use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=name.replace("/", "-"),
                storage_path=str(self.storage) if self.storage else None,
                # Ray's default retries a worker group that cannot start forever (a worker that
                # fails to import, a node that cannot host it): the stage then hangs instead of
                # failing with its one line. Two retries cover a transient start failure.
                failure_config=FailureConfig(max_failures=self.max_failures, controller_failure_limit=START_RETRIES),
            ),
        )
        log(f"[dim]{name}: Ray Train, {self.workers} workers[/]")
        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            raise _stage_error(name, e) from None
        return cast(Any, result).return_value  # (v2 only: its Result)


RERUN = "rerun the same command to resume from the last checkpoint"
START_RETRIES = 2  # restarts of a worker group that failed to start, before the stage fails


def _stage_error(name: str, e: BaseException) -> BaseException:
    """One line for a failed Ray Train run: the worker that died, else the first worker's own error
    (bad input and non-finite training keep their type, so their exit codes stay 2 and 1)."""
    failures = sorted((getattr(e, "worker_failures", None) or {}).items())
    # A dead worker first: the others then fail in their collectives ("connection closed by peer").
    for rank, err in failures:
        died = getattr(err, "health_check_failure", None)
        if died is not None:  # the worker process is gone (killed, OOM, node lost)
            where = ", ".join(re.findall(r"\b((?:pid|ip): \S+)", str(died))[:2])
            return StageFailed(
                f"{name}: Ray Train worker rank {rank} died ({type(died).__name__}"
                + (f"; {where}" if where else "")
                + f"); {RERUN}"
            )
    for rank, err in failures:
        cause = getattr(err, "cause", None) or err
        if isinstance(cause, ValueError | FileNotFoundError | FloatingPointError):
            return cause  # the trainer's own message
        return StageFailed(f"{name} failed on Ray Train worker rank {rank}: {_first_line(cause)}; {RERUN}")
    return StageFailed(f"{name} failed on the Ray cluster: {_first_line(e)}; {RERUN}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _cancel(refs: Sequence[Any]) -> None:
    import ray

    for ref in refs:
        ray.cancel(ref, force=True)
