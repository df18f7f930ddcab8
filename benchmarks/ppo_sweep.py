"""How much a PPO setting buys over SFT, by the held-out labelers (not a test: prints figures).

    python benchmarks/ppo_sweep.py --run runs/demo --name demo_setting
    python benchmarks/ppo_sweep.py --run runs/demo --name beta002 --set kl_coef=0.02
    python benchmarks/ppo_sweep.py --run runs/demo --name lam1 --set lam=1.0 --set ppo_epochs=4
    python benchmarks/ppo_sweep.py --run runs/demo --best-of 4      # the RM's own reranking, no PPO
    python benchmarks/ppo_sweep.py --run runs/demo --name run_policy --policy runs/demo/round-1/ppo_ptx/policy

Trains PPO-ptx from a finished run's SFT policy against its round-1 reward model with the run's
PPO config plus ``--set`` overrides, then samples ``--samples`` responses per **validation** prompt
(not the test prompts the report uses, so that sweeping does not tune on them) at temperature 1
from SFT and from the trained policy. Each response gets the two held-out labelers' *noise-free*
utility, and the expected win rate of the policy over SFT is `tether eval`'s: each held-out
labeler's exact probability of preferring a policy response to each SFT response of the same prompt
under its own noise model (ties half), averaged, with a bootstrap interval over prompts. Far less
noisy than counting sampled verdicts. This is how README's "What limits the demo" table was measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import yaml

from tether.config import EvalConfig, PPOConfig, resolve
from tether.data.formats import read_records
from tether.eval.evaluate import evaluate_policies
from tether.labelers.panel import Panel, read_response
from tether.pipeline import Manifest, RMOutputs, SFTOutputs


def utilities(responses: list[str], prompts: list[str], n: int) -> tuple[np.ndarray, float]:
    """(the held-out labelers' mean noise-free utility per response, mean words per response)."""
    panel = Panel()
    features = [read_response(p, r) for p, r in zip([p for p in prompts for _ in range(n)], responses, strict=True)]
    u = np.array([np.mean([lab.utility(f) for lab in panel.heldout_labelers]) for f in features])
    return u, float(np.mean([f.n_words for f in features]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="a finished `tether run` directory")
    parser.add_argument("--name", default="sweep", help="subdirectory of --out for this setting")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="PPO config override")
    parser.add_argument("--best-of", type=int, default=1, help="> 1: no PPO; SFT best-of-N by the RM")
    parser.add_argument(
        "--policy",
        help="no PPO: measure this trained policy directory instead (e.g. the run's own round-1/ppo_ptx/policy)",
    )
    parser.add_argument("--samples", type=int, default=4, help="responses per validation prompt")
    parser.add_argument("--out", default="runs/sweep")
    args = parser.parse_args()

    run = Path(args.run)
    manifest = Manifest(run / "manifest.json")
    sft = str(manifest.outputs("sft", SFTOutputs).policy)
    rm_dir = str(manifest.outputs("round-1/rm", RMOutputs).reward_model)
    run_ppo = yaml.safe_load((run / "round-1" / "ppo_ptx" / "config.yaml").read_text())
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = resolve(PPOConfig, "ppo", None, overrides={**_flatten(run_ppo), **overrides})
    cfg = dataclasses.replace(
        cfg,
        out_dir=str(Path(args.out) / args.name),
        policy=dataclasses.replace(cfg.policy, name_or_path=sft),
    )
    prompts = read_records(run / "data" / "prompts_valid.jsonl", "prompt")

    seconds = 0.0
    if args.best_of > 1:
        policy = sft
    elif args.policy:
        policy = args.policy
    else:
        from tether.ppo.train import train_ppo

        t0 = time.perf_counter()
        policy = str(train_ppo(cfg, log=lambda _: None).policy_dir)
        seconds = time.perf_counter() - t0
    # `tether eval` itself: the same sampling, RM scoring, best-of-N picking and expected win rate
    # (the held-out labelers' exact preference probabilities, all sample pairs of a prompt).
    report = evaluate_policies(
        {"sft": sft, "policy": policy},
        prompts,
        EvalConfig(samples_per_prompt=args.samples, max_new_tokens=cfg.max_new_tokens, seed=123),
        reward_model=rm_dir,
        best_of={"policy": args.best_of},
        autocast_dtype=cfg.policy.autocast,
        log=lambda _: None,
    )
    texts = [p.text for p in prompts]
    u0, w0 = utilities(report.by_name("sft").responses, texts, args.samples)
    u1, w1 = utilities(report.by_name("policy").responses, texts, args.samples)
    s0, s1 = report.by_name("sft").rm_score, report.by_name("policy").rm_score
    trained = report.by_name("policy")
    low, high = trained.expected_win_ci
    result = {
        "name": args.name if args.best_of == 1 else f"sft_bo{args.best_of}",
        "overrides": overrides,
        "ppo_seconds": round(seconds),
        "expected_win_vs_sft": round(trained.expected_win_rate, 4),
        "ci95": [round(low, 4), round(high, 4)],
        "utility": [round(float(u0.mean()), 3), round(float(u1.mean()), 3)],
        "rm_score": [round(s0, 3), round(s1, 3)],
        "words": [round(w0, 1), round(w1, 1)],
        "prompts": len(prompts),
        "samples_per_prompt": args.samples,
    }
    print(json.dumps(result))


def _flatten(d: dict, prefix: str = "") -> dict:
    """A nested config dict as dotted overrides (what `resolve` takes)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


if __name__ == "__main__":
    main()
