"""PPO throughput and its phase split for a given config (not a test: prints figures).

    python benchmarks/bench_ppo.py --preset tiny --iterations 4
    python benchmarks/bench_ppo.py --preset demo --iterations 2 --batch-size 16
    python benchmarks/bench_ppo.py --preset tiny --compare-no-cache
    python benchmarks/bench_ppo.py --preset demo --iterations 0 --compare-no-cache
    python benchmarks/bench_ppo.py --preset demo --iterations 3 --engine both
    python benchmarks/bench_ppo.py --preset demo --iterations 3 --reward-model RM --sampling-trunk both

Runs the real trainer (``train_ppo``) for a few iterations in a temporary directory, with a toy
length reward unless ``--reward-model`` is given, and prints episodes/s, generated tokens/s and
how each iteration's time splits between generation (KV-cached sampling), scoring (policy,
reference, value and reward forwards) and the update (PPO epochs × minibatches, PPO-ptx
included). The first iteration is reported apart: it pays for allocator and kernel warm-up.

``--engine off`` samples the rollouts with the loop tether used before the rollout engine
(``bench_generation.old_sample``); ``--engine both`` runs the trainer with and without the engine,
one after the other, and prints the ratio of episodes/s. ``--sampling-trunk off`` makes scoring
recompute the shared trunk instead of taking the output sampling kept (``both``: each in turn).
``--baseline`` adds a first run with the old loop, no shared trunk, no cached casts of frozen
weights under autocast and glibc's default allocator behaviour (tether before issue 12), the
base of every ratio; the other runs keep freed memory in the process as the ``tether`` command
does (:mod:`tether.allocator`).

``--compare-no-cache`` also times :func:`tether.models.generation.sample` against the naive loop
that re-runs the whole sequence through the model for every new token.

These machines are shared: compare settings within one invocation, not across days.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import resource
import tempfile
import time
from unittest import mock

import torch
import torch.nn.functional as F
from bench_generation import NoEOS, old_sample  # this script's folder is on sys.path

from tether.allocator import keep_freed_memory
from tether.config import PPOConfig, add_config_args, config_from_args
from tether.models import loading
from tether.models.generation import Sampler, encode_prompts, position_ids_from_mask, resolve_rollout_dtype, sample
from tether.models.loading import autocast_dtype, load_causal_lm, resolve_device
from tether.ppo import roles as ppo_roles
from tether.ppo.roles import sampling_dtype
from tether.ppo.train import load_prompts, train_ppo


def toy_reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """Negative distance of the word count to 20: a cheap stand-in for a reward model."""
    return torch.tensor([-abs(len(r.split()) - 20) / 20 for r in responses])


@torch.no_grad()
def sample_no_cache(model, tokenizer, prompts, *, max_new_tokens, temperature, generator):
    """The naive sampler: the whole prefix goes through the model again for every token."""
    ids, mask = encode_prompts(tokenizer, prompts)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        positions = position_ids_from_mask(mask)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1
        ).logits[:, -1]
        probs = F.softmax(logits.float() / temperature, dim=-1)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        tok = torch.where(finished, tokenizer.pad_token_id, tok)
        ids = torch.cat([ids, tok[:, None]], dim=1)
        mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
        finished |= tok == tokenizer.eos_token_id
        if bool(finished.all()):
            break
    return ids


def compare_no_cache(cfg: PPOConfig, n_prompts: int) -> None:
    model, tok = load_causal_lm(cfg.policy)
    prompts = load_prompts(cfg.prompts_file)[:n_prompts]
    device = next(model.parameters()).device
    times = {}
    for name, fn in (("KV cache (sample)", sample), ("no cache (naive)", sample_no_cache)):
        rng = torch.Generator(device=device).manual_seed(0)
        fn(model, tok, prompts[:2], max_new_tokens=4, temperature=cfg.temperature, generator=rng)
        t0 = time.perf_counter()
        fn(model, NoEOS(tok), prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, generator=rng)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[name] = time.perf_counter() - t0
    tokens = len(prompts) * cfg.max_new_tokens
    print(f"\ngeneration of {len(prompts)} prompts × {cfg.max_new_tokens} tokens:")
    for name, seconds in times.items():
        print(f"  {name:<20} {seconds:7.2f} s   {tokens / seconds:9,.0f} tokens/s")
    print(f"  KV cache speed-up    {times['no cache (naive)'] / times['KV cache (sample)']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, PPOConfig)
    parser.add_argument(
        "--iterations",
        type=int,
        default=3,
        help="iterations to run (the first is reported apart as warm-up); 0 runs only --compare-no-cache",
    )
    parser.add_argument(
        "--compare-no-cache", action="store_true", help="also time KV-cached sampling against the naive no-cache loop"
    )
    parser.add_argument(
        "--engine",
        choices=["on", "off", "both"],
        default="on",
        help="sample rollouts with the rollout engine (on), the loop it replaced (off), or both in turn",
    )
    parser.add_argument(
        "--sampling-trunk",
        choices=["on", "off", "both"],
        default="on",
        help="scoring takes the shared trunk's output kept while sampling (on), recomputes it (off), or both in turn",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also run, first, the trainer before issue 12 (old sampling loop, no shared trunk, frozen weights "
        "re-cast by autocast at every call) as the ratios' base",
    )
    args = parser.parse_args()
    cfg = config_from_args(PPOConfig, "ppo", args)
    if args.iterations > 0:
        engines = ("on", "off") if args.engine == "both" else (args.engine,)
        keeps = ("on", "off") if args.sampling_trunk == "both" else (args.sampling_trunk,)
        # (The old loop keeps nothing: it runs once, with the trunk recomputed.)
        variants = [(e, k) for e in engines for k in (keeps if e == "on" else ("off",))]
        if args.baseline:
            # First: glibc's own allocator behaviour can be had only before anything changed it.
            variants.insert(0, ("off", "unshared"))
        rates = {}
        for engine, keep in variants:
            # As the `tether` command runs; the baseline as tether did before issue 12.
            keep_memory = keep != "unshared"
            memory = "kept in the process" if keep_memory else "given back to the OS (glibc's default)"
            if not keep_freed_memory(keep_memory):
                memory = "as the C library does it (not glibc, or TETHER_KEEP_FREED_MEMORY=0)"
            print(f"\n== rollout engine {engine}, trunk kept from sampling {keep}")
            print(f"freed memory     {memory}")
            run_cfg = dataclasses.replace(cfg, share_trunk=False) if keep == "unshared" else cfg
            rates[engine, keep] = run_trainer(
                run_cfg,
                args.iterations,
                engine=engine == "on",
                sampling_trunk=keep == "on",
                cast_cache=keep != "unshared",
            )
        base = variants[0] if args.baseline else variants[-1]
        for variant in (v for v in variants if v != base):
            print(
                f"engine {variant[0]} / trunk kept {variant[1]} against engine {base[0]} / trunk kept {base[1]}: "
                f"{rates[variant] / rates[base]:.2f}x the episodes/s"
            )
    if args.compare_no_cache:
        compare_no_cache(cfg, n_prompts=cfg.generation_batch_size)


def _old_loop(model, *args, generator=None, capture=None, **kwargs):
    """The trainer's ``sample`` with the engine off: the old loop on the policy itself. The old
    loop draws from one generator, not one per episode: the first stands for all (a speed
    comparison, not a sampling one); it keeps no trunk output (``capture`` is None here)."""
    assert capture is None
    if isinstance(generator, list):
        generator = generator[0]
    return old_sample(model.module if isinstance(model, Sampler) else model, *args, generator=generator, **kwargs)


def run_trainer(
    cfg: PPOConfig, iterations: int, *, engine: bool = True, sampling_trunk: bool = True, cast_cache: bool = True
) -> float:
    """Run and report the trainer; returns the episodes/s of the timed iterations. ``cast_cache``
    False loads every model with plain ``nn.Linear`` layers (autocast re-casts frozen weights at
    every call, as before :mod:`tether.models.precision`)."""
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp, contextlib.ExitStack() as stack:
        if not cast_cache:
            stack.enter_context(mock.patch.object(loading, "cache_frozen_casts", lambda model: model))
        if not engine:
            stack.enter_context(mock.patch.object(ppo_roles, "sample", _old_loop))
        if not engine or not sampling_trunk:
            stack.enter_context(mock.patch.object(ppo_roles, "_sampling_capture", lambda *a: None))
        cfg = dataclasses.replace(
            cfg,
            out_dir=tmp,
            total_episodes=iterations * cfg.batch_size,
            sample_every=0,
            save_every=iterations,  # one checkpoint, after the timed iterations
        )
        notes: list[str] = []
        result = train_ppo(cfg, None if cfg.reward_model else toy_reward, log=notes.append)
    trunk = [n for n in notes if " share " in n or "shared blocks" in n]  # what the shared-trunk detection found
    records = result.metrics
    timed = records[1:] or records

    def mean(key: str, rows: list[dict] = timed) -> float:
        return sum(r[key] for r in rows) / len(rows)

    total = mean("time_total")
    reward = cfg.reward_model or "toy length reward"
    device = resolve_device(cfg.policy.device)
    print(f"policy           {cfg.policy.name_or_path}; reward: {reward}")
    print(
        f"device           {device}{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}; "
        f"autocast {autocast_dtype(cfg.policy, device) or 'none'}; rollouts sampled in "
        f"{resolve_rollout_dtype(sampling_dtype(cfg, device), device) or 'the policy under that autocast'}; "
        f"shared trunk {'on' if cfg.share_trunk else 'off'}; rollout engine {'on' if engine else 'off'}"
    )
    for note in trunk:
        print(f"trunk            {note.removeprefix('ppo: ')}")
    print(
        f"settings         batch={cfg.batch_size} minibatch={cfg.mini_batch_size} "
        f"micro={cfg.micro_batch_size} generation_batch={cfg.generation_batch_size} "
        f"epochs={cfg.ppo_epochs} max_new_tokens={cfg.max_new_tokens} "
        f"ptx/minibatch={cfg.ptx_per_minibatch} threads={torch.get_num_threads()}"
    )
    print(
        f"iterations       {len(records)} (first, warm-up: {records[0]['time_total']:.2f} s; "
        f"then {total:.2f} s per iteration)"
    )
    print(f"episodes/s       {mean('episodes_per_s'):.2f}")
    print(
        f"tokens/s         {mean('tokens_per_s'):,.0f} generated tokens per second of iteration; "
        f"{mean('generation_tokens_per_s'):,.0f} during generation"
    )
    print(f"response length  {mean('response_length'):.1f} tokens (EOS rate {mean('eos_rate'):.2f})")
    for phase in ("generation", "scoring", "update"):
        seconds = mean(f"time_{phase}")
        print(f"  {phase:<14} {seconds:7.2f} s  {100 * seconds / total:5.1f} %")
    print(f"peak RSS         {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    if device.type == "cuda":
        print(f"peak GPU memory  {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB allocated")
    return mean("episodes_per_s")


if __name__ == "__main__":
    main()
