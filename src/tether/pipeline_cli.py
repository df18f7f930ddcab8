"""``tether run``: the whole pipeline in one command (resumable: rerun it after a crash)."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from tether.cluster import RayCluster
from tether.config import RunConfig, add_config_args, config_from_args


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="the whole InstructGPT loop: data → SFT → sample → rank → RM → PPO-ptx (+PPO) → eval → report",
        description="Runs every stage, records provenance in manifest.json and resumes where it stopped. "
        "Stage settings are nested flags, e.g. --sft.epochs 2 --ppo.kl-coef 0.05 --rm.optim.lr 1e-5.",
    )
    add_config_args(p, RunConfig)
    ray = p.add_argument_group(
        "Ray cluster",
        "Run the stages on a Ray cluster (pip install 'tether[ray]'): SFT, RM, PPO and PPO-ptx each as a Ray "
        "Train TorchTrainer over --num-workers workers (data parallel), sampling, labeling and evaluation as Ray "
        "tasks over prompt shards, with the same results as one process. Not part of the run's config: a run "
        "resumes on a cluster or without one.",
    )
    ray.add_argument(
        "--ray-address",
        metavar="local|auto|HOST:PORT",
        help="'local' starts a private Ray cluster on this machine for this command (a laptop); 'auto' joins the "
        "one started here by `ray start --head`; HOST:PORT joins that cluster's head (port 6379 unless "
        "`ray start --head --port` said otherwise). Without it everything runs in this process and Ray is never "
        "imported.",
    )
    ray.add_argument("--num-workers", type=int, help="Ray Train workers per training stage, and shards per list (1)")
    ray.add_argument("--use-gpu", action="store_true", help="one GPU per worker and per task (NCCL)")
    ray.add_argument("--cpus-per-worker", type=int, help="CPUs (torch threads) per worker and per task (1)")
    ray.add_argument(
        "--max-failures",
        type=int,
        help="restarts of a training stage's worker group after a worker dies, each resuming from the last "
        "checkpoint (0: the stage fails and the rerun resumes)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the pipeline (torch, transformers) and rich, which `tether --help` must not load.
    from rich.console import Console

    from tether.data.sources import run_sources
    from tether.pipeline import run_pipeline

    cfg = config_from_args(RunConfig, "run", args)
    console = Console()
    cfg = run_sources(cfg, console.print)  # own data: nothing more from the built-in task
    cluster = _cluster(args, cfg)
    with cluster or contextlib.nullcontext():
        result = run_pipeline(cfg, log=console.print, executor=cluster)
    ev = result.evaluation
    console.print(
        f"[bold green]run done[/]; win rates vs {cfg.eval.baseline} (held-out labelers, expected / sampled): "
        + ", ".join(f"{k} {ev.expected_win_rates[k]:.3f} / {v:.3f}" for k, v in ev.win_rates.items())
    )
    console.print(f"report: [bold]{result.report}[/]")
    return 0


def _cluster(args: argparse.Namespace, cfg: RunConfig) -> RayCluster | None:
    """The Ray cluster the flags name, or None (this process)."""
    ray_flags = {"--num-workers": args.num_workers, "--cpus-per-worker": args.cpus_per_worker}
    ray_flags |= {"--max-failures": args.max_failures, "--use-gpu": args.use_gpu or None}
    if not args.ray_address:
        given = [k for k, v in ray_flags.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} need --ray-address (without it the run is one process)")
        return None
    return RayCluster(
        args.ray_address,
        args.num_workers or 1,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker or 1,
        max_failures=args.max_failures or 0,
        storage=Path(cfg.out_dir) / "ray",
    )
