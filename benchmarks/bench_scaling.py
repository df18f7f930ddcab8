"""Data-parallel scaling: 1 rank vs 2 ranks (torchrun, gloo, 1 thread each) vs 1 process with 2 threads.

Not a test: prints figures. Each configuration runs the real trainers (`tether sft`, `tether rm`,
`tether ppo`) under `torchrun` for a few optimiser steps and reads their own throughput from
metrics.jsonl (the first step of each run is a warm-up and not counted): SFT tokens/s, RM pairs/s
(pairs of the K-wise rankings), PPO episodes/s. Every configuration does the same global work per
step, so the ratios are the scaling.

    .venv/bin/python benchmarks/bench_scaling.py                      # a small random Llama (~18M)
    .venv/bin/python benchmarks/bench_scaling.py --model default      # SmolLM2-135M: slow on a CPU
    .venv/bin/python benchmarks/bench_scaling.py --device cuda --configs 1x1,2x1   # NCCL, one GPU

On a GPU (`--device cuda`) the ranks use NCCL; two ranks on one GPU share it (a smoke check of the
NCCL path, not a scaling figure). Compare ratios within one invocation: shared machines drift.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# (ranks, threads per rank)
CONFIGS = {"1x1": (1, 1), "2x1": (2, 1), "1x2": (1, 2)}
SMALL = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}


def small_model(root: Path) -> Path:
    """A randomly initialised Llama of about 18M parameters with the embedded tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tether.models.loading import embedded_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(embedded_tokenizer_dir())
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
        **SMALL,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "small")
    tok.save_pretrained(root / "small")
    return root / "small"


def prepare(root: Path, model: str, steps: int) -> dict[str, str]:
    """Demonstrations, comparisons, prompts, a policy and a reward model for the three stages."""
    from tether.data.task import build_default_task
    from tether.models.heads import load_scalar_model, save_scalar_model
    from tether.models.loading import resolve_model_dir

    policy = str(small_model(root)) if model == "small" else str(resolve_model_dir(model))
    rm, tok = load_scalar_model(policy)
    save_scalar_model(rm, tok, root / "rm")
    task = build_default_task()
    demos = list(task.demonstrations)

    # SFT: (steps + 1) batches of 16 and 2 validation examples; RM: (steps + 1) batches of 8
    # prompts with K = 4 (demonstration first, then three other prompts' responses).
    def write_demos(path: Path, part: list) -> None:
        path.write_text("".join(json.dumps({"prompt": d.prompt, "response": d.response}) + "\n" for d in part))

    write_demos(root / "demos.jsonl", demos[: 16 * (steps + 1)])
    write_demos(root / "valid_demos.jsonl", demos[-2:])
    rows = []
    for i, d in enumerate(demos[: 8 * (steps + 1) + 2]):
        others = [demos[(i + j * 37) % len(demos)].response for j in (1, 2, 3)]
        responses = [d.response, *others]
        rows.append({"prompt": d.prompt, "responses": responses, "ranking": [1, 2, 3, 4], "labeler_id": "a"})
    (root / "comparisons.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-2]))
    (root / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[-2:]))
    return {"policy": policy, "rm": str(root / "rm"), "root": str(root)}


def stage_args(stage: str, paths: dict[str, str], steps: int, device: str, out: Path) -> list[str]:
    root = paths["root"]
    if stage == "sft":
        return [
            "sft", "--preset", "tiny", "--model.name-or-path", paths["policy"], "--model.device", device,
            "--train-file", f"{root}/demos.jsonl", "--valid-file", f"{root}/valid_demos.jsonl", "--epochs", "1",
            "--batch-size", "16", "--micro-batch-size", "4", "--max-length", "128", "--select-by", "last",
            "--save-every-steps", "1000", "--show-samples", "0", "--out-dir", str(out),
        ]  # fmt: skip
    if stage == "rm":
        return [
            "rm", "--preset", "tiny", "--model.name-or-path", paths["policy"], "--model.device", device,
            "--train-file", f"{root}/comparisons.jsonl", "--valid-file", f"{root}/valid.jsonl",
            "--demonstrations-file", f"{root}/demos.jsonl", "--batch-size", "8", "--micro-batch-size", "2",
            "--max-length", "160", "--save-every-steps", "1000", "--out-dir", str(out),
        ]  # fmt: skip
    return [
        "ppo", "--preset", "tiny", "--policy.name-or-path", paths["policy"], "--policy.device", device,
        "--reward-model", paths["rm"], "--batch-size", "16", "--generation-batch-size", "16",
        "--mini-batch-size", "8", "--micro-batch-size", "4", "--max-new-tokens", "32",
        "--total-episodes", str(16 * (steps + 1)), "--sample-every", "0", "--save-every", "1000",
        "--out-dir", str(out),
    ]  # fmt: skip


def throughput(stage: str, metrics: list[dict]) -> float:
    """The stage's rate over the timed steps (every step but the first)."""
    steps = [m for m in metrics if "grad_norm" in m or "episodes_per_s" in m][1:]
    if stage == "sft":
        return statistics.median(m["tokens_per_s"] for m in steps)
    if stage == "rm":  # pairs per step / seconds per step
        return statistics.median(m["pairs"] * m["comparisons_per_s"] / 8 for m in steps)
    return statistics.median(m["episodes_per_s"] for m in steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="'small' (random ~18M Llama), 'default' or a directory")
    parser.add_argument("--stages", default="sft,rm,ppo")
    parser.add_argument("--configs", default="1x1,2x1,1x2", help="RANKSxTHREADS, from " + ", ".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=4, help="timed optimiser steps (PPO: iterations)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    units = {"sft": "tokens/s", "rm": "pairs/s", "ppo": "episodes/s"}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        paths = prepare(Path(tmp), args.model, args.steps)
        results: dict[tuple[str, str], float] = {}
        for stage in args.stages.split(","):
            for name in args.configs.split(","):
                ranks, threads = CONFIGS[name]
                out = Path(tmp) / f"{stage}-{name}"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
                cmd += ["-m", "tether", *stage_args(stage, paths, args.steps, args.device, out)]
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{stage} {name} failed:\n{done.stderr[-3000:]}")
                metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                results[stage, name] = throughput(stage, metrics)
                print(f"{stage:4} {ranks} rank(s) x {threads} thread(s): {results[stage, name]:10.2f} {units[stage]}")
        print()
        base = args.configs.split(",")[0]
        print(f"{'stage':6}" + "".join(f"{c:>14}" for c in args.configs.split(",")) + f"   (ratio to {base})")
        for stage in args.stages.split(","):
            ratios = [results[stage, c] / results[stage, base] for c in args.configs.split(",")]
            print(f"{stage:6}" + "".join(f"{r:>13.2f}x" for r in ratios) + f"   {units[stage]}")


if __name__ == "__main__":
    main()
