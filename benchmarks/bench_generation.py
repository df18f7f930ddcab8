"""Sampled tokens/s: tether's rollout engine vs the loop it replaced vs Hugging Face ``generate``.

    python benchmarks/bench_generation.py                        # batch 16 and 64, 64 new tokens
    python benchmarks/bench_generation.py --batch-sizes 16 --threads 1 --repeats 3

Every variant samples exactly ``--new-tokens`` tokens for each of the default task's first
prompts (EOS ignored), at temperature 1 with no top-k / top-p, on the default embedded model
(SmolLM2-135M-Instruct), in one process, in interleaved order, after one small warm-up call
each. Tokens/s counts sampled tokens over the whole call (prompt prefill included), per second
of wall time and per second of this process's CPU time (with ``--threads 1`` the CPU time is
the work done, much less sensitive than wall time to other jobs on a shared machine). Variants:

- ``old loop fp32``: the sampling loop tether used before the engine (kept below): HF's
  DynamicCache growing by ``torch.cat``, the mask concatenated every step, the whole batch
  (padding and finished rows included) through every forward;
- ``old loop bf16 autocast``: the same under ``torch.autocast(bfloat16)``, as the demo preset
  ran it until ``policy.autocast: auto``;
- ``engine fp32`` / ``engine bf16 copy``: :func:`tether.models.generation.sample` on the model
  itself / on a bfloat16 inference copy (:class:`~tether.models.generation.Sampler`);
- ``HF generate``: ``model.generate(do_sample=True, top_k=0, top_p=1, min_new_tokens=N)``.

These machines are shared: compare the ratios within one run, and read the load averages
printed before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from tether.models.generation import Generation, Sampler, encode_prompts, position_ids_from_mask, sample
from tether.models.loading import load_causal_lm
from tether.ppo.train import load_prompts


class NoEOS:
    """The tokenizer with an EOS id that never occurs, so the old loop runs every step."""

    eos_token_id = -1

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


@torch.no_grad()
def old_sample(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    max_prompt_length: int | None = None,
) -> Generation:
    """tether's sampling loop before the rollout engine (generation.py at 47f71f1, verbatim)."""
    was_training = model.training
    model.eval()  # dropout off while sampling: the sampled distribution must be the scored one
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    query_ids, query_mask = encode_prompts(tokenizer, prompts, max_prompt_length)
    query_ids, query_mask = query_ids.to(device), query_mask.to(device)
    batch = query_ids.shape[0]

    mask = query_mask
    positions = position_ids_from_mask(mask)
    out = model(input_ids=query_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    past, logits = out.past_key_values, out.logits[:, -1]
    next_pos = positions[:, -1] + 1

    tokens, logps = [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        scaled = logits.float() / (temperature if temperature > 0 else 1.0)
        # z - logsumexp(z), as tether.ops.token_logprobs computes it: F.log_softmax's float32 CPU
        # kernel is off by ~1e-4 near p = 1 on some CPUs (AVX2), logsumexp is not.
        logp = scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)
        if temperature > 0:
            # Gumbel-max: an exact draw from softmax(logp), ~3x faster than torch.multinomial
            # over a 49k vocabulary on a CPU.
            u = torch.rand(logp.shape, generator=generator, device=logp.device).clamp_(min=1e-20)
            tok = (logp - torch.log(-torch.log(u))).argmax(-1)
        else:
            tok = logp.argmax(-1)
        tok_logp = logp.gather(-1, tok[:, None]).squeeze(-1)
        tok = torch.where(finished, torch.full_like(tok, pad), tok)
        tokens.append(tok)
        logps.append(torch.where(finished, torch.zeros_like(tok_logp), tok_logp))
        alive = ~finished
        finished = finished | (tok == eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break  # no forward for a token that will never be sampled
        mask = torch.cat([mask, alive.long()[:, None]], dim=1)
        out = model(
            input_ids=tok[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            past_key_values=past,
            use_cache=True,
        )
        past, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1

    response_ids = torch.stack(tokens, dim=1)
    response_logprobs = torch.stack(logps, dim=1)
    # A token is real if no EOS came strictly before it (the EOS itself is real).
    is_eos = response_ids == eos
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    response_mask = (eos_before == 0).long()
    response_ids = torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, pad))
    if was_training:
        model.train()
    return Generation(
        query_ids=query_ids,
        query_mask=query_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=response_logprobs * response_mask,
        finished=finished,
    )


def variants(model, tokenizer, new_tokens: int) -> dict[str, Callable[[list[str], torch.Generator], int]]:
    """name → fn(prompts, generator) that samples and returns the number of tokens sampled."""
    bf16 = Sampler(model, "bfloat16")
    no_eos = NoEOS(tokenizer)
    device_type = next(model.parameters()).device.type

    def old(prompts, generator, autocast=False):
        context = torch.autocast(device_type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            gen = old_sample(model, no_eos, prompts, max_new_tokens=new_tokens, temperature=1.0, generator=generator)
        return int(gen.response_mask.sum())

    def engine(prompts, generator, sampler=model):
        gen = sample(sampler, tokenizer, prompts, max_new_tokens=new_tokens, generator=generator, ignore_eos=True)
        return int(gen.response_mask.sum())

    def hf(prompts, generator):
        ids, mask = encode_prompts(tokenizer, prompts)
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    return {
        "old loop fp32": old,
        "old loop bf16 autocast": lambda p, g: old(p, g, autocast=True),
        "engine fp32": engine,
        "engine bf16 copy": lambda p, g: engine(p, g, sampler=bf16),
        "HF generate": hf,
    }


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per variant and batch size (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--only", nargs="+", default=None, help="variant names to run (default: all)")
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_causal_lm(args.model)
    device = next(model.parameters()).device
    fns = variants(model, tokenizer, args.new_tokens)
    if args.only:
        fns = {k: v for k, v in fns.items() if k in args.only}
    prompts = load_prompts(None)
    print(
        f"model {args.model} on {device}; {torch.get_num_threads()} threads; "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}; load average before: {loadavg()}"
    )
    for fn in fns.values():  # warm-up: allocator, kernels, the bf16 copy's first use
        fn(prompts[:2], torch.Generator(device=device).manual_seed(0))
    for batch in args.batch_sizes:
        chunk = [prompts[i % len(prompts)] for i in range(batch)]
        wall: dict[str, list[float]] = {name: [] for name in fns}
        cpu: dict[str, list[float]] = {name: [] for name in fns}
        counts: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                generator = torch.Generator(device=device).manual_seed(0)
                t0, c0 = time.perf_counter(), time.process_time()
                counts[name] = fn(chunk, generator)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        print(f"\nbatch {batch}, {args.new_tokens} new tokens (load average now: {loadavg()})")
        header = ("variant", "wall s", "tokens/s", "ratio", "CPU s", "tok/CPU-s", "ratio")
        print("  {:<24} {:>8} {:>9} {:>6}   {:>8} {:>9} {:>6}".format(*header))
        base: tuple[float, float] | None = None
        for name in fns:
            t, c = statistics.median(wall[name]), statistics.median(cpu[name])
            rate, cpu_rate = counts[name] / t, counts[name] / c
            if name == "old loop fp32":
                base = (rate, cpu_rate)
            r1, r2 = (f"{rate / base[0]:5.2f}x", f"{cpu_rate / base[1]:5.2f}x") if base else ("    -", "    -")
            print(f"  {name:<24} {t:8.2f} {rate:9,.1f} {r1:>6}   {c:8.2f} {cpu_rate:9,.1f} {r2:>6}")
        print("  (ratios: against the old fp32 loop)")
    print(f"\nload average after: {loadavg()}")


if __name__ == "__main__":
    main()
