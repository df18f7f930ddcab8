"""Sampled tokens/s: tether's rollout engine vs the loop it replaced vs Hugging Face ``generate``.

    python benchmarks/bench_generation.py                        # batch 16 and 64, 64 new tokens
    python benchmarks/bench_generation.py --batch-sizes 16 --threads 1 --repeats 3
    python benchmarks/bench_generation.py --batch-sizes 16 64 256 --repeats 3   # on a GPU: + roofline
    python benchmarks/bench_generation.py --compile --only "engine bf16 copy" "engine bf16 compiled"

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
- ``engine bf16 autocast``: the engine on the model itself under ``torch.autocast(bfloat16)``,
  its frozen weights' casts kept between steps (:mod:`tether.models.precision`): how PPO samples
  a bf16-autocast policy (``rollout_dtype: auto``) and how evaluation samples; ``..., casts
  re-made``: the same on a copy with plain ``nn.Linear`` layers (every frozen weight re-cast at
  every step, as before that cache existed), on which the old loop's variants run too;
- ``HF generate``: ``model.generate(do_sample=True, top_k=0, top_p=1, min_new_tokens=N)``.

These machines are shared: compare the ratios within one run, and read the load averages
printed before and after.

On a GPU (or on any device with ``--peak-gbps``) each row also says how close the call came to
the memory-bandwidth roofline of decoding. A batch's forwards must read, at the least, every weight
once per sampled token position (``--new-tokens`` forwards: the prefill and the decode steps; the
tied input embedding is the LM head and counted once, an untied one is only indexed and not
counted) at the dtype it is stored in (4 bytes a parameter in fp32, under autocast too, which also
writes and reads a bf16 copy of each weight every step, uncounted; 2 in the bf16 copy), and each
decode step the K and V of every real position of its row so far (their dtype read off a probe
forward in the variant's own precision). Bytes over wall time give GB/s, over the peak its share:
``w`` counts the weights alone (the issue's figure), ``w+KV`` adds the cache. Both are lower bounds
on the traffic, so the shares are upper bounds on what the call wasted. ``--peak-gbps`` defaults
to the datasheet bandwidth of an H200 (4800) or H100 SXM (3350) by the device's name; a
device-to-device copy is timed too, as the bandwidth actually reachable.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from tether.models.generation import Generation, Sampler, encode_prompts, position_ids_from_mask, sample
from tether.models.loading import load_causal_lm
from tether.models.precision import uncache_frozen_casts
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


@dataclass
class Variant:
    """One way of sampling, and what its forwards read."""

    run: Callable[[list[str], torch.Generator], int]  # (prompts, generator) -> tokens sampled
    module: torch.nn.Module  # the network whose weights the forwards read
    precision: Callable[[], contextlib.AbstractContextManager]  # the context they run under


def variants(model, tokenizer, new_tokens: int, *, compile: bool = False) -> dict[str, Variant]:
    """name → the variant: the old loop, the engine (fp32 and its bf16 copy), HF generate; with
    ``compile`` also the bf16 copy with ``torch.compile``d decode steps."""
    bf16 = Sampler(model, "bfloat16")
    # The old loop ran on plain nn.Linear layers: autocast re-cast every frozen weight at every step.
    before = uncache_frozen_casts(copy.deepcopy(model))
    no_eos = NoEOS(tokenizer)
    device_type = next(model.parameters()).device.type
    plain = contextlib.nullcontext

    def bf16_autocast():
        return torch.autocast(device_type, dtype=torch.bfloat16)

    def old(prompts, generator, autocast=False):
        with bf16_autocast() if autocast else plain():
            gen = old_sample(before, no_eos, prompts, max_new_tokens=new_tokens, temperature=1.0, generator=generator)
        return int(gen.response_mask.sum())

    def engine(prompts, generator, sampler=model, autocast=False):
        with bf16_autocast() if autocast else plain():
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

    found = {
        "old loop fp32": Variant(old, before, plain),
        "old loop bf16 autocast": Variant(lambda p, g: old(p, g, autocast=True), before, bf16_autocast),
        "engine fp32": Variant(engine, model, plain),
        "engine bf16 autocast": Variant(lambda p, g: engine(p, g, autocast=True), model, bf16_autocast),
        "engine bf16 autocast, casts re-made": Variant(
            lambda p, g: engine(p, g, sampler=before, autocast=True), before, bf16_autocast
        ),
        "engine bf16 copy": Variant(lambda p, g: engine(p, g, sampler=bf16), bf16.module, plain),
        "HF generate": Variant(hf, model, plain),
    }
    if compile:
        compiled = Sampler(model, "bfloat16", compile=True)
        found["engine bf16 compiled"] = Variant(lambda p, g: engine(p, g, sampler=compiled), compiled.module, plain)
    return found


# ---- the memory-bandwidth roofline of decoding ----------------------------------------------

# Datasheet HBM bandwidths, GB/s. nvidia-smi names an H200 "NVIDIA H200" (or "... NVL", the same
# 4.8 TB/s) and an H100 SXM "NVIDIA H100 80GB HBM3"; a PCIe or NVL H100 differs and needs the flag.
PEAK_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0}


def peak_gbps_for(device_name: str) -> float | None:
    """The datasheet memory bandwidth (GB/s) of a device known by its name, else None."""
    name = device_name.upper()
    if "H200" in name:
        return PEAK_GBPS["H200"]
    if "H100" in name and ("SXM" in name or "HBM3" in name):
        return PEAK_GBPS["H100 SXM"]
    return None


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one forward of a causal LM reads: every parameter once at its stored
    dtype (tied ones once), except an input embedding that is not the LM head (only B rows of it
    are read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or embed.weight is not head.weight:
        total -= embed.weight.numel() * embed.weight.element_size()
    return total


@torch.no_grad()
def kv_bytes_per_token(model: torch.nn.Module, precision: Callable[[], contextlib.AbstractContextManager]) -> int:
    """Bytes of K and V one position holds in the cache over all layers, read off a one-token
    forward under ``precision`` (under autocast the keys and values need not be bf16)."""
    device = next(model.parameters()).device
    with precision():
        cache = model(input_ids=torch.ones((1, 1), dtype=torch.long, device=device), use_cache=True).past_key_values
    return sum(
        layer.keys[0, :, 0].numel() * layer.keys.element_size()
        + layer.values[0, :, 0].numel() * layer.values.element_size()
        for layer in cache.layers
    )


def decode_bytes(
    weight_bytes: int, kv_bytes_per_token: int, prompt_lengths: Sequence[int], new_tokens: int
) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) that sampling ``new_tokens`` tokens for each prompt must read
    at the least: ``new_tokens`` forwards (the prefill, then a decode step for each token but the
    last) each read every weight once; decode step s = 1..new_tokens-1 of a row with a prompt of L
    tokens reads the K and V of its L + s positions, its own included."""
    steps = new_tokens - 1
    positions = sum(steps * length + steps * (steps + 1) // 2 for length in prompt_lengths)
    return weight_bytes * new_tokens, kv_bytes_per_token * positions


def roofline_share(bytes_read: int, seconds: float, peak_gbps: float) -> tuple[float, float]:
    """(achieved GB/s, its share of the peak) for ``bytes_read`` bytes in ``seconds``."""
    gbps = bytes_read / seconds / 1e9
    return gbps, gbps / peak_gbps


def copy_gbps(device: torch.device, nbytes: int = 2**31, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth, bytes read plus written per second (GB/s), timed with
    CUDA events after warm-up on random data: the bandwidth a kernel can actually reach."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3 / repeats
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / seconds / 1e9


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
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add 'engine bf16 compiled' (torch.compile of the decode step; compiled in the warm-up)",
    )
    parser.add_argument(
        "--peak-gbps",
        type=float,
        default=None,
        help="the device's peak memory bandwidth in GB/s, for the roofline columns (default on a GPU: "
        "4800 for an H200, 3350 for an H100 SXM, else required; on a CPU the columns need it)",
    )
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be at least 2 (one decode step), got {args.new_tokens}")
    if args.peak_gbps is not None and not args.peak_gbps > 0:
        parser.error(f"--peak-gbps must be a positive number of GB/s, got {args.peak_gbps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_causal_lm(args.model)
    device = next(model.parameters()).device
    peak = args.peak_gbps
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = peak or peak_gbps_for(name)
        if peak is None:
            parser.error(f"--peak-gbps is required on {name!r}: no datasheet bandwidth is known for it")
    fns = variants(model, tokenizer, args.new_tokens, compile=args.compile)
    if args.only:
        unknown = set(args.only) - set(fns)
        if unknown:
            parser.error(f"--only: no variant named {', '.join(sorted(unknown))} (there are: {', '.join(fns)})")
        fns = {k: v for k, v in fns.items() if k in args.only}
    prompts = load_prompts(None)
    width = max(24, *(len(name) for name in fns))
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model {args.model} ({n_params / 1e6:.1f}M parameters, {model.dtype}) on {device}; "
        f"{torch.get_num_threads()} threads; CPU capability {torch.backends.cpu.get_cpu_capability()}; "
        f"torch {torch.__version__}; load average before: {loadavg()}"
    )
    if device.type == "cuda":
        copy = copy_gbps(device)
        print(
            f"GPU {torch.cuda.get_device_name(device)}: peak {peak:,.0f} GB/s; a device-to-device copy "
            f"here: {copy:,.0f} GB/s ({copy / peak:.0%} of the peak); TF32 matmuls "
            f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
        )
    kv_per_token = {name: kv_bytes_per_token(v.module, v.precision) for name, v in fns.items()}
    if peak:
        for name, v in fns.items():
            print(
                f"  {name:<{width}} weights read per forward {weight_bytes(v.module) / 1e6:7.1f} MB, "
                f"K+V per position {kv_per_token[name] / 1e3:5.1f} kB"
            )
    for name, v in fns.items():  # warm-up: allocator, kernels, the bf16 copy's first use, compilation
        t0 = time.perf_counter()
        v.run(prompts[:2], torch.Generator(device=device).manual_seed(0))
        print(f"  warm-up {name:<{width}} {time.perf_counter() - t0:7.2f} s")
    for batch in args.batch_sizes:
        chunk = [prompts[i % len(prompts)] for i in range(batch)]
        lengths = encode_prompts(tokenizer, chunk)[1].sum(1).tolist()
        wall: dict[str, list[float]] = {name: [] for name in fns}
        cpu: dict[str, list[float]] = {name: [] for name in fns}
        counts: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, v in fns.items():
                generator = torch.Generator(device=device).manual_seed(0)
                t0, c0 = time.perf_counter(), time.process_time()
                counts[name] = v.run(chunk, generator)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        print(
            f"\nbatch {batch}, {args.new_tokens} new tokens, prompts of {min(lengths)}-{max(lengths)} tokens "
            f"(load average now: {loadavg()})"
        )
        header = ["variant", "wall s", "tokens/s", "ratio"]
        if device.type == "cpu":  # on a GPU the host's CPU time is mostly waiting
            header += ["CPU s", "tok/CPU-s", "ratio"]
        if peak:
            header += ["w GB/s", "w %peak", "w+KV GB/s", "w+KV %"]
        print(f"  {header[0]:<{width}}" + "".join(f" {h:>10}" for h in header[1:]))
        # Ratios against the old fp32 loop, or the first variant when --only leaves it out.
        reference = "old loop fp32" if "old loop fp32" in fns else next(iter(fns))
        t_ref, c_ref = statistics.median(wall[reference]), statistics.median(cpu[reference])
        base = (counts[reference] / t_ref, counts[reference] / c_ref)
        for name, v in fns.items():
            t, c = statistics.median(wall[name]), statistics.median(cpu[name])
            rate, cpu_rate = counts[name] / t, counts[name] / c
            cells = [f"{t:.3f}", f"{rate:,.1f}", f"{rate / base[0]:.2f}x"]
            if device.type == "cpu":
                cells += [f"{c:.2f}", f"{cpu_rate:,.1f}", f"{cpu_rate / base[1]:.2f}x"]
            if peak:
                w, kv = decode_bytes(weight_bytes(v.module), kv_per_token[name], lengths, args.new_tokens)
                w_gbps, w_share = roofline_share(w, t, peak)
                all_gbps, all_share = roofline_share(w + kv, t, peak)
                cells += [f"{w_gbps:,.1f}", f"{w_share:.1%}", f"{all_gbps:,.1f}", f"{all_share:.1%}"]
            print(f"  {name:<{width}}" + "".join(f" {cell:>10}" for cell in cells))
        print(f"  (ratios: against {reference})")
        if peak:  # one forward yields a token per row, so the weights alone allow batch × peak / bytes
            sizes = sorted({weight_bytes(v.module) for v in fns.values()})
            bounds = [f"{batch * peak * 1e9 / size:,.0f} tokens/s ({size / 1e6:.1f} MB a forward)" for size in sizes]
            print(f"  weights-only roofline at this batch: {', '.join(bounds)}")
    print(f"\nload average after: {loadavg()}")


if __name__ == "__main__":
    main()
