"""A randomly initialised causal LM from a model directory's config and tokenizer, no weights needed.

    python benchmarks/random_model.py .gpu-model /tmp/smollm2-random
    python benchmarks/random_model.py .gpu-model /tmp/small --set num_hidden_layers=2 hidden_size=64

benchmarks/gpu_check.sh benchmarks this on the device machine in place of the embedded default,
whose weights do not travel there (scripts/fetch_gpu_wheels.sh says why): the same shapes, so the
same time per token, but its samples are noise (a random model almost never emits EOS, so every
response runs to the token limit). ``--set KEY=VALUE`` overrides config fields (values parsed as
JSON), e.g. to shrink the model for a dry run on a CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a directory with config.json and the tokenizer's files")
    parser.add_argument("out", type=Path, help="the model directory to write (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", type=parse_override, default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if not (args.source / "config.json").is_file():
        parser.error(f"{args.source} has no config.json")
    config = AutoConfig.from_pretrained(args.source)
    for key, value in args.set:
        if not hasattr(config, key):
            parser.error(f"--set: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    for f in args.source.iterdir():  # the tokenizer and chat template; config and weights come from the model
        if f.is_file() and f.name != "config.json" and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(f, args.out / f.name)
    hf_logging.disable_progress_bar()
    model.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {type(model).__name__}, {n / 1e6:.1f}M parameters, random init (seed {args.seed})")


if __name__ == "__main__":
    main()
