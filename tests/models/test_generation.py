"""The rollout engine against an independent oracle: same seed, same tokens, same log-probs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tether.models.generation import encode_prompts, position_ids_from_mask, row_generators, sample

PROMPTS = ["hi", "a much longer prompt that forces left padding of the others", "mid length one", "x y"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; a shared machine loses a lot to oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@torch.no_grad()
def naive_sample(model, tokenizer, prompts, *, max_new_tokens, temperature, generator):
    """The oracle: no KV cache, the whole sequence through the model for every token.

    It draws the Gumbel noise as the sampler always has (one ``[B, V]`` uniform per step, every
    row, finished or not; with one generator per row, a ``[V]`` uniform from each row's own while
    the row has not finished), so the same seed must give the same tokens. Returns
    ``(response_ids [B, T], logprobs [B, T])`` with pad / 0 after EOS.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask = encode_prompts(tokenizer, prompts)
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    tokens, logps = [], []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
        scaled = logits.float() / (temperature or 1.0)
        logp = scaled - torch.logsumexp(scaled, -1, keepdim=True)
        if temperature > 0:
            if isinstance(generator, list):
                u = torch.ones(logp.shape)  # a finished row's noise is never used
                for i in (~finished).nonzero().flatten().tolist():
                    u[i] = torch.rand(logp.shape[-1], generator=generator[i])
            else:
                u = torch.rand(logp.shape, generator=generator)
            u = u.clamp_(min=1e-20)
            tok = (logp - torch.log(-torch.log(u))).argmax(-1)
        else:
            tok = logp.argmax(-1)
        tok_logp = logp.gather(-1, tok[:, None]).squeeze(-1)
        tokens.append(torch.where(finished, pad, tok))
        logps.append(torch.where(finished, 0.0, tok_logp))
        ids = torch.cat([ids, tokens[-1][:, None]], 1)
        mask = torch.cat([mask, (~finished).long()[:, None]], 1)
        finished = finished | (tokens[-1] == eos)
        if bool(finished.all()):
            break
    return torch.stack(tokens, 1), torch.stack(logps, 1)


def eos_boosted(tiny_dir, boost: float):
    """The tiny random Llama with ``boost`` added to the EOS logit, so rows end at different steps.

    The other 49k logits are near 0, so a boost of 10 / T makes EOS about 1 in 3 at temperature T.
    """
    from tether.models.loading import load_causal_lm

    model, tok = load_causal_lm(str(tiny_dir))

    def boost_eos(_module, _inputs, logits):
        return logits + boost * F.one_hot(torch.tensor(tok.eos_token_id), logits.shape[-1])

    model.lm_head.register_forward_hook(boost_eos)
    return model, tok


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_same_seed_same_tokens_as_the_uncached_oracle(tiny_dir, temperature):
    """Left padding, rows ending at different steps (the batch shrinks), greedy and sampled."""
    model, tok = eos_boosted(tiny_dir, 10.0 * temperature)
    gen = sample(
        model, tok, PROMPTS, max_new_tokens=24, temperature=temperature, generator=torch.Generator().manual_seed(5)
    )
    ids, logps = naive_sample(
        model, tok, PROMPTS, max_new_tokens=24, temperature=temperature, generator=torch.Generator().manual_seed(5)
    )
    if temperature > 0:
        assert len(set(gen.lengths.tolist())) > 1  # ragged: the shrinking batch was exercised
    assert torch.equal(gen.response_ids, ids)
    assert torch.allclose(gen.logprobs, logps, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_one_generator_per_row_gives_the_oracles_tokens(tiny_dir, temperature):
    """Each row's noise is its own stream's, drawn while the row is in the batch, bit for bit."""
    model, tok = eos_boosted(tiny_dir, 10.0 * temperature)
    rows = range(len(PROMPTS))
    gen = sample(
        model, tok, PROMPTS, max_new_tokens=24, temperature=temperature, generator=row_generators(7, rows, "cpu")
    )
    ids, logps = naive_sample(
        model, tok, PROMPTS, max_new_tokens=24, temperature=temperature, generator=row_generators(7, rows, "cpu")
    )
    assert len(set(gen.lengths.tolist())) > 1  # the batch shrank while rows kept drawing
    assert torch.equal(gen.response_ids, ids)
    assert torch.allclose(gen.logprobs, logps, atol=1e-5, rtol=0)


def test_one_generator_per_row_makes_a_row_independent_of_its_batch(tiny_dir):
    """Per-row streams (data-parallel rollouts): a row sampled in another batch, alone or in
    another order, gets the same tokens; its stream is its number, not its position."""
    model, tok = eos_boosted(tiny_dir, 10.0)
    whole = sample(model, tok, PROMPTS, max_new_tokens=16, generator=row_generators(3, range(len(PROMPTS)), "cpu"))
    assert len(set(whole.lengths.tolist())) > 1  # rows end at different steps
    last = len(PROMPTS) - 1
    for rows in ([last], [last, 0], list(range(1, len(PROMPTS)))):
        part = sample(
            model, tok, [PROMPTS[r] for r in rows], max_new_tokens=16, generator=row_generators(3, rows, "cpu")
        )
        for i, r in enumerate(rows):
            n = int(whole.lengths[r])
            assert part.response_ids[i, :n].tolist() == whole.response_ids[r, :n].tolist()
            assert int(part.lengths[i]) == n
    other_seed = sample(model, tok, PROMPTS, max_new_tokens=16, generator=row_generators(4, range(len(PROMPTS)), "cpu"))
    assert not torch.equal(other_seed.response_ids, whole.response_ids)
    with pytest.raises(ValueError, match="2 generators for 3 prompts"):
        sample(model, tok, PROMPTS[:3], max_new_tokens=4, generator=row_generators(0, [0, 1], "cpu"))


def test_repeated_prompts_share_one_prefill_and_keep_the_oracles_tokens(tiny_dir):
    """A prompt's samples and best-of-n's candidates repeat a prompt: the prefill runs it once and
    every repeat starts from its keys and values, with the oracle's tokens and log-probs row for
    row (each row its own stream), and the same captured block output as its first row."""
    model, tok = eos_boosted(tiny_dir, 10.0)
    prompts = [p for p in PROMPTS for _ in range(3)][::-1]  # each prompt 3 times, interleaved with the rest
    fed = []  # rows x tokens of every prefill forward (more than one token per row)
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: fed.append(kw["input_ids"].shape) if kw["input_ids"].shape[1] > 1 else None,
        with_kwargs=True,
    )
    block = model.model.layers[0]
    try:
        gen = sample(
            model, tok, prompts, max_new_tokens=16, generator=row_generators(9, range(12), "cpu"), capture=block
        )
    finally:
        hook.remove()
    ids, logps = naive_sample(
        model, tok, prompts, max_new_tokens=16, temperature=1.0, generator=row_generators(9, range(12), "cpu")
    )
    assert len(set(gen.lengths.tolist())) > 1
    assert torch.equal(gen.response_ids, ids)
    assert torch.allclose(gen.logprobs, logps, atol=1e-5, rtol=0)
    # Each distinct prompt went through the prefill once (after the template's shared header).
    assert sum(rows for rows, _ in fed) <= len(PROMPTS) + 1  # (+1: the header's batch-1 forward, if any)
    width = gen.query_ids.shape[1]
    for i, p in enumerate(prompts):
        first = prompts.index(p)
        assert torch.equal(gen.hidden[i, :width], gen.hidden[first, :width])


def test_the_fallback_cache_gives_the_same_tokens(tiny_dir, monkeypatch):
    """Models the buffers do not fit (sliding windows, ...) keep HF's DynamicCache: same tokens."""
    from transformers import LlamaConfig, MistralConfig

    from tether.models import generation

    assert generation.buffers_fit(LlamaConfig(num_hidden_layers=2))
    assert not generation.buffers_fit(MistralConfig(sliding_window=16, num_hidden_layers=2))
    model, tok = eos_boosted(tiny_dir, 10.0)
    fast = sample(model, tok, PROMPTS, max_new_tokens=16, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(generation, "buffers_fit", lambda config: False)
    slow = sample(model, tok, PROMPTS, max_new_tokens=16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(fast.response_ids, slow.response_ids) and torch.equal(fast.finished, slow.finished)
    assert torch.allclose(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)


def test_sample_k_over_shards_gives_the_samples_of_the_whole_list(tiny_dir):
    """Response j of prompt i is seeded by (seed, i, j): sample_k over shards of a prompt list
    (Ray tasks on several workers) gives exactly the samples of the whole list, whatever the
    batch size."""
    from tether.data.formats import Prompt
    from tether.models.generation import sample_k

    model, tok = eos_boosted(tiny_dir, 10.0)
    prompts = [Prompt(id=f"p{i}", text=t, user_id="u") for i, t in enumerate(PROMPTS + ["one more", "and another"])]
    kwargs = dict(policy_name="sft", max_new_tokens=8, seed=7)
    whole = sample_k(model, tok, prompts, 3, batch_size=18, **kwargs)
    shards = [sample_k(model, tok, prompts[a:b], 3, first_index=a, batch_size=4, **kwargs) for a, b in ((0, 4), (4, 6))]
    assert [s.responses for s in whole] == [s.responses for shard in shards for s in shard]
    assert [s.ended for s in whole] == [s.ended for shard in shards for s in shard]
    assert len({r for s in whole for r in s.responses}) > len(prompts)  # K draws per prompt, not one copied


def test_ignore_eos_samples_exactly_max_new_tokens(tiny_dir):
    model, tok = eos_boosted(tiny_dir, 10.0)  # EOS about 1 in 3: every row would end early
    gen = sample(model, tok, PROMPTS, max_new_tokens=12, generator=torch.Generator().manual_seed(0), ignore_eos=True)
    assert gen.response_ids.shape == (len(PROMPTS), 12) and bool(gen.response_mask.all())
    assert not gen.finished.any() and bool((gen.response_ids == tok.eos_token_id).any())


def test_prefill_buckets_cover_every_row_once_within_the_waste_bound():
    from tether.models.generation import _prefill_buckets

    lengths = [53, 46, 52, 86, 74, 54, 44, 41, 78, 43, 52, 49, 63, 50, 51, 51, 3]
    buckets = _prefill_buckets(lengths, max_waste=0.125)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for b in buckets:
        width = max(lengths[i] for i in b)
        assert width * len(b) - sum(lengths[i] for i in b) <= 0.125 * width * len(b)
    assert len(buckets) < len(lengths)  # similar lengths do share a forward


def test_sampler_float32_is_the_model_itself_and_ignores_the_callers_autocast(tiny_dir):
    from tether.models.generation import Sampler
    from tether.models.loading import load_causal_lm

    model, tok = load_causal_lm(str(tiny_dir))
    sampler = Sampler(model, "float32")
    assert not sampler.is_copy
    plain = sample(model, tok, PROMPTS, max_new_tokens=8, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32 = sample(sampler, tok, PROMPTS, max_new_tokens=8, generator=torch.Generator().manual_seed(4))
        autocast = sample(model, tok, PROMPTS, max_new_tokens=8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(plain.response_ids, fp32.response_ids) and torch.equal(plain.logprobs, fp32.logprobs)
    assert not torch.equal(plain.logprobs, autocast.logprobs)  # a bare model does follow the caller's autocast


def test_bf16_copy_samples_close_to_the_model_and_sync_copies_the_trainable_weights(tiny_dir):
    from tether.models.generation import Sampler
    from tether.models.loading import load_causal_lm

    model, tok = load_causal_lm(str(tiny_dir))
    model.requires_grad_(False)
    model.model.layers[-1].requires_grad_(True)  # as with trainable_layers: only the top block trains
    sampler = Sampler(model, "bfloat16")
    copy = dict(sampler.module.named_parameters())
    assert sampler.is_copy and all(p.dtype == torch.bfloat16 for p in copy.values())
    assert all(b.dtype == torch.float32 for b in sampler.module.buffers())  # rotary frequencies stay fp32
    gen = sample(sampler, tok, PROMPTS, max_new_tokens=10, generator=torch.Generator().manual_seed(1))
    ids = torch.cat([gen.query_ids, gen.response_ids], 1)
    mask = torch.cat([gen.query_mask, gen.response_mask], 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    p = gen.query_ids.shape[1]
    recomputed = torch.log_softmax(logits[:, p - 1 : -1], -1).gather(-1, gen.response_ids[..., None])[..., 0]
    gap = ((recomputed - gen.logprobs) * gen.response_mask).abs().max()
    assert 0 < gap < 0.1  # bf16 rounding, nothing more

    top = "model.layers.1.mlp.down_proj.weight"
    frozen = "model.layers.0.mlp.down_proj.weight"
    with torch.no_grad():  # an optimiser step on the trainable block
        for param in model.parameters():
            if param.requires_grad:
                param.add_(1.0)
    assert not torch.equal(copy[top], model.get_parameter(top).to(torch.bfloat16))
    sampler.sync()
    assert torch.equal(copy[top], model.get_parameter(top).to(torch.bfloat16))
    assert torch.equal(copy[frozen], model.get_parameter(frozen).to(torch.bfloat16))


def test_auto_dtype_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    from tether.models import generation

    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(generation, "fast_bf16", lambda device, native=native: native)
        assert generation.resolve_rollout_dtype("auto", torch.device("cpu")) is expected
    assert generation.resolve_rollout_dtype(None, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="rollout_dtype"):
        generation.resolve_rollout_dtype("float8", torch.device("cpu"))


def test_a_failing_compiler_falls_back_to_eager_decoding(tiny_dir, monkeypatch):
    """torch.compile is never required: a step that fails half-way is rerun eagerly, same tokens."""
    from tether.models.generation import Sampler

    model, tok = eos_boosted(tiny_dir, 10.0)
    eager = sample(model, tok, PROMPTS, max_new_tokens=12, generator=torch.Generator().manual_seed(3))

    def broken_compile(module, **_):
        def step(**inputs):
            inputs["past_key_values"].layers[0].length += 1  # a step that died half-way
            raise RuntimeError("no C++ compiler")

        return step

    monkeypatch.setattr(torch, "compile", broken_compile)
    sampler = Sampler(model, compile=True)
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        fallback = sample(sampler, tok, PROMPTS, max_new_tokens=12, generator=torch.Generator().manual_seed(3))
    assert torch.equal(eager.response_ids, fallback.response_ids)
    assert torch.equal(eager.logprobs, fallback.logprobs)
