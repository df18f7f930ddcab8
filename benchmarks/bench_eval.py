"""Where the evaluation's time goes: seconds per policy, tokens/s, and the share of each phase.

    python benchmarks/bench_eval.py --model tiny --prompts 8            # seconds
    python benchmarks/bench_eval.py --prompts 2                         # the default model, ~1-2 min
    python benchmarks/bench_eval.py --prompts 2 --compare HEAD~3 --repeats 2   # before/after, interleaved

Runs :func:`tether.eval.evaluate.evaluate_policies` as the demo does, scaled down: five
policies (base, sft, ppo, ppo_ptx and sft_bo4, the RM's best of ``--best-of`` samples of sft),
``--prompts`` held-out prompts of the default task × ``--samples-per-prompt``, responses of up
to ``--max-new-tokens``, a reward model, KL to the reference (sft), and the held-out pretraining
perplexity on as many paragraphs as the demo has per prompt (45 for 192). The models are made
from ``--model`` as the demo's partial fine-tuning leaves them: base is the model; sft its top
``--trained-layers`` blocks (and final norm) nudged by noise; ppo and ppo_ptx sft's same blocks
nudged again; the RM sft with its top ``--trained-layers`` − 2 blocks nudged and a seeded head.
Their bottom blocks are the base model's bit for bit, as in a demo run.

The phases are timed by wrapping the functions the evaluation calls (whichever of them the code
under test has): generation (``sample``), scoring (the RM's score and the KL forwards:
``episode_scores`` and ``response_logprob_sums`` before, ``_Readers.measure`` now), the
perplexity (``pretrain_perplexity``), model loading, and the simulated labelers (judging and
win rates). Tokens/s counts sampled response tokens (best-of
candidates included) over the evaluation's time. Wall and CPU time are both given: on a shared
machine this process's CPU time (``--threads 1``: the work done) is the steadier of the two.

``--compare REV`` runs the same evaluation on the code at git revision REV (``git archive`` of its
``src/`` into a temporary directory, on ``PYTHONPATH``) and on the working tree, alternating,
each in a fresh process: on a shared machine only the ratio within one run means anything; the
load averages are printed. Everything but model loading scales with the number of prompts, so
the demo's evaluation (192 prompts × 2) is about ``192 / --prompts`` times the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# phase -> the callees of tether.eval.evaluate timed as it (``Class.method`` for a method)
PHASES = {
    "generation": ["sample"],
    "scoring": ["episode_scores", "response_logprob_sums", "_Readers.measure"],
    "perplexity": ["pretrain_perplexity"],
    "loading": ["load_causal_lm", "load_scalar_model"],
}
POLICIES = ("base", "sft", "ppo", "ppo_ptx", "sft_bo4")


def _timed(fn: Callable[..., Any], phase: str, spent: dict[str, float], depth: list[int]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if depth[0]:  # nested inside another timed phase: counted there
            return fn(*args, **kwargs)
        depth[0] += 1
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[phase] += time.perf_counter() - start
            spent[f"{phase} cpu"] += time.process_time() - cpu
            depth[0] -= 1

    return wrapper


@contextlib.contextmanager
def phase_timers(spent: dict[str, float], tokens: list[int]) -> Iterator[None]:
    """Wrap the evaluation's callees (those that exist in the code under test) with timers."""
    import tether.eval.evaluate as ev
    from tether.labelers.panel import Panel

    depth = [0]
    undo: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, phase: str) -> None:
        if "." in name:
            cls, name = name.split(".")
            owner = getattr(owner, cls, None)
        if owner is not None and hasattr(owner, name):
            undo.append((owner, name, getattr(owner, name)))
            setattr(owner, name, _timed(getattr(owner, name), phase, spent, depth))

    for phase, names in PHASES.items():
        for name in names:
            patch(ev, name, phase)
    for name in ("judge", "win_rate", "expected_win_rate"):
        patch(Panel, name, "labelers")
    if hasattr(ev, "sample"):  # count the sampled response tokens
        timed_sample = ev.sample

        def counting(*args: Any, **kwargs: Any) -> Any:
            gen = timed_sample(*args, **kwargs)
            tokens[0] += int(gen.response_mask.sum())
            return gen

        ev.sample = counting
        undo.append((ev, "sample_counting", None))
    try:
        yield
    finally:
        for owner, name, value in reversed(undo):
            if value is not None:
                setattr(owner, name, value)


def build_models(model: str, trained_layers: int, out: Path) -> None:
    """base, sft, ppo, ppo_ptx and rm under ``out``: the demo's shapes of partial fine-tuning."""
    import torch

    from tether.models.heads import load_scalar_model, save_scalar_model
    from tether.models.loading import load_causal_lm, resolve_model_dir, save_model

    (out / "base").symlink_to(resolve_model_dir(model), target_is_directory=True)
    torch.manual_seed(0)

    def nudged(src: str, dst: str, top: int, scalar: bool = False) -> None:
        model, tok = load_scalar_model(src) if scalar else load_causal_lm(src)
        layers = model.model.layers
        top = min(top, len(layers) - 1)  # the bottom block always shared (tiny has 2)
        with torch.no_grad():
            for module in [*layers[len(layers) - top :], model.model.norm]:
                for p in module.parameters():
                    p.add_(torch.randn_like(p) * 0.05 * float(p.std()))
        (save_scalar_model if scalar else save_model)(model, tok, out / dst)

    nudged(str(out / "base"), "sft", trained_layers)
    nudged(str(out / "sft"), "ppo", trained_layers)
    nudged(str(out / "sft"), "ppo_ptx", trained_layers)
    nudged(str(out / "sft"), "rm", max(1, trained_layers - 2), scalar=True)


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    """One evaluation in this process: its wall time and phase times."""
    import torch

    from tether.config import EvalConfig
    from tether.data.task import build_default_task, default_splits
    from tether.eval.evaluate import evaluate_policies

    torch.set_num_threads(args.threads)
    links = Path(args.models)
    policies = {name: str(links / ("sft" if name == "sft_bo4" else name)) for name in POLICIES}
    prompts = default_splits(seed=0)["test"][: args.prompts]
    n_texts = args.pretrain_texts if args.pretrain_texts is not None else max(1, round(45 * args.prompts / 192))
    pretrain = build_default_task().pretrain_heldout[:n_texts]
    cfg = EvalConfig(
        samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    spent: dict[str, float] = defaultdict(float)
    tokens = [0]
    lines: list[str] = []
    with phase_timers(spent, tokens):
        start, cpu = time.perf_counter(), time.process_time()
        report = evaluate_policies(
            policies,
            prompts,
            cfg,
            reward_model=str(links / "rm"),
            ref_policy=policies["sft"],
            pretrain_heldout=pretrain,
            best_of={"sft_bo4": args.best_of},
            autocast_dtype=args.autocast,
            log=lines.append,
        )
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "wall": wall,
        "cpu": cpu,
        "phases": dict(spent),
        "tokens": tokens[0],
        "responses": {p.name: p.responses for p in report.policies},
        "kl": {p.name: p.kl_to_ref for p in report.policies},
        "progress_lines": sum("responses" in line for line in lines),
    }


def describe(label: str, result: dict[str, Any], n_policies: int) -> list[str]:
    lines = []
    for clock, total in (("wall", result["wall"]), ("cpu", result["cpu"])):
        phases = {
            k.removesuffix(" cpu"): v for k, v in result["phases"].items() if k.endswith(" cpu") == (clock == "cpu")
        }
        other = total - sum(phases.values())
        parts = [f"{name} {s:.1f} s ({s / total:.0%})" for name, s in phases.items()]
        lines += [
            f"{label}, {clock} time: {total:.1f} s = {total / n_policies:.1f} s per policy; {result['tokens']} "
            f"response tokens sampled, {result['tokens'] / total:.1f} tokens/s",
            "    " + ", ".join([*parts, f"other {other:.1f} s ({other / total:.0%})"]),
        ]
    return [*lines, f"    {result['progress_lines']} progress lines"]


def child(args: argparse.Namespace, src: str | None) -> dict[str, Any]:
    """Run this script once in a fresh process (on ``src`` when given) and read its JSON."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    argv = [sys.executable, __file__, "--json", "--models", args.models, *sys.argv[1:]]
    # --compare/--repeats belong to the parent
    cleaned, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--compare", "--repeats"):
            skip = True
            continue
        if a.startswith(("--compare=", "--repeats=")):
            continue
        cleaned.append(a)
    out = subprocess.run(cleaned, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bench_eval child failed ({src or 'working tree'}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace) -> None:
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="bench_eval_rev_") as tmp:
        archive = subprocess.run(["git", "-C", str(root), "archive", args.compare, "src"], capture_output=True)
        if archive.returncode != 0:
            raise SystemExit(f"--compare {args.compare}: git archive failed: {archive.stderr.decode()}")
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        walls: dict[str, list[float]] = {args.compare: [], "working tree": []}
        cpus: dict[str, list[float]] = {args.compare: [], "working tree": []}
        results: dict[str, dict[str, Any]] = {}
        print(f"load average before: {os.getloadavg()}")
        for r in range(args.repeats):
            for label, src in ((args.compare, str(Path(tmp) / "src")), ("working tree", None)):
                res = child(args, src)
                walls[label].append(res["wall"])
                cpus[label].append(res["cpu"])
                results[label] = res
                print("\n".join(describe(f"[{r + 1}] {label}", res, len(POLICIES))), flush=True)
        print(f"load average after: {os.getloadavg()}")
    for clock, times in (("wall", walls), ("cpu", cpus)):
        before, after = (statistics.median(times[k]) for k in (args.compare, "working tree"))
        print(
            f"median {clock} time: {args.compare} {before:.1f} s, working tree {after:.1f} s: "
            f"{after / before:.3f} of the time ({before / after:.2f}x)"
        )
    same = results[args.compare]["responses"] == results["working tree"]["responses"]
    print(f"responses token for token the same in both: {same}")
    for name in POLICIES:
        a, b = results[args.compare]["kl"][name], results["working tree"]["kl"][name]
        print(f"    kl_to_ref {name}: {a} vs {b}")


def with_models(args: argparse.Namespace, then: Callable[[argparse.Namespace], None]) -> None:
    """``then(args)`` with ``args.models`` a directory of the benchmark's models (built here when not given)."""
    if args.models:
        then(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_eval_models_") as tmp:
        build_models(args.model, args.trained_layers, Path(tmp))
        args.models = tmp
        then(args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="'default' (the embedded 135M model), 'tiny' or a directory")
    p.add_argument("--prompts", type=int, default=2, help="held-out prompts (the demo: 192)")
    p.add_argument("--samples-per-prompt", type=int, default=2, help="(the demo: 2)")
    p.add_argument("--max-new-tokens", type=int, default=80, help="(the demo: 80, its PPO length)")
    p.add_argument("--batch-size", type=int, default=64, help="eval.batch_size (the demo: 64)")
    p.add_argument("--best-of", type=int, default=4, help="sft_bo4's N (the demo: 4)")
    p.add_argument("--pretrain-texts", type=int, default=None, help="default: 45 per 192 prompts, at least 1")
    p.add_argument("--autocast", default=None, help="e.g. bfloat16 (the demo: 'auto' = bf16 where native)")
    p.add_argument("--trained-layers", type=int, default=8, help="top blocks fine-tuning changed (the demo: 8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", help="git revision to compare the working tree with (interleaved)")
    p.add_argument("--repeats", type=int, default=1, help="with --compare: runs of each")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--models", help=argparse.SUPPRESS)  # the models, already built (a --compare child)
    args = p.parse_args()
    if args.compare:
        with_models(args, compare)
        return
    if args.json:
        print(json.dumps(run_once(args)))
        return

    def report(args: argparse.Namespace) -> None:
        result = run_once(args)
        print(f"load average: {os.getloadavg()}")
        print("\n".join(describe(args.model, result, len(POLICIES))))

    with_models(args, report)


if __name__ == "__main__":
    main()
