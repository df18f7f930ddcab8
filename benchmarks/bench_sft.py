"""SFT throughput and peak memory for a given config (not a test: prints figures).

    python benchmarks/bench_sft.py --preset demo --steps 4      # bf16 autocast, top 8 blocks trained
    python benchmarks/bench_sft.py --preset demo --model.autocast none --model.trainable-layers none

Runs a few optimiser steps of the real SFT step (forward, response-only loss, backward, AdamW) on
the default task's demonstrations and prints tokens/s (padded tokens through the model) and the
process's peak resident memory (and peak CUDA memory on a GPU). Compare settings within one
invocation of a machine: these machines are shared, so absolute figures drift.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from tether.config import SFTConfig, add_config_args, config_from_args
from tether.models.loading import autocast, load_causal_lm
from tether.ops import lm_loss
from tether.optim import build_optimizer
from tether.sft.data import collate, count_target_tokens, encode_demonstrations, forward_logits, load_demonstrations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, SFTConfig)
    parser.add_argument("--steps", type=int, default=4, help="timed optimiser steps (after 1 warm-up step)")
    args = parser.parse_args()
    cfg = config_from_args(SFTConfig, "sft", args)

    model, tok = load_causal_lm(cfg.model, trainable=True)
    device = next(model.parameters()).device
    precision = autocast(cfg.model, device)
    examples, _ = encode_demonstrations(tok, load_demonstrations(cfg.train_file), cfg.max_length)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def step(i: int) -> int:
        batch = examples[(i * cfg.batch_size) % len(examples) :][: cfg.batch_size]
        micro = [
            collate(batch[j : j + cfg.micro_batch_size], tok.pad_token_id)
            for j in range(0, len(batch), cfg.micro_batch_size)
        ]
        n_target = sum(count_target_tokens(m["labels"]) for m in micro)
        for m in micro:
            loss = lm_loss(forward_logits(model, m, precision), m["labels"].to(device), "sum") / n_target
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(int(m["input_ids"].numel()) for m in micro)

    step(0)  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tokens = sum(step(i) for i in range(1, args.steps + 1))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    print(
        f"model            {cfg.model.name_or_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"{n_trainable / 1e6:.1f}M trainable)"
    )
    print(
        f"settings         device={device} autocast={cfg.model.autocast} trainable_layers={cfg.model.trainable_layers} "
        f"lora={cfg.model.lora.enabled} batch={cfg.batch_size} micro={cfg.micro_batch_size} "
        f"max_length={cfg.max_length} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"steps            {args.steps} in {seconds:.1f} s ({seconds / args.steps:.2f} s/step)")
    print(f"tokens/s         {tokens / seconds:,.0f}")
    print(f"peak RSS         {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    if device.type == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
