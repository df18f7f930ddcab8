"""The rollout engine against an independent oracle: same seed, same tokens, same log-probs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tether.models.generation import encode_prompts, position_ids_from_mask, sample

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
    row, finished or not), so the same seed must give the same tokens. Returns
    ``(response_ids [B, T], logprobs [B, T])`` with pad / 0 after EOS.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask = encode_prompts(tokenizer, prompts)
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    tokens, logps = [], []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
        logp = F.log_softmax(logits.float() / (temperature or 1.0), dim=-1)
        if temperature > 0:
            u = torch.rand(logp.shape, generator=generator).clamp_(min=1e-20)
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
