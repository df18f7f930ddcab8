"""The shared frozen trunk: found from the weights, and the same numbers as every model run whole."""

from __future__ import annotations

import copy

import pytest
import torch

from tether.config import ModelConfig, PPOConfig, resolve
from tether.models.generation import sample
from tether.models.heads import load_scalar_model, save_scalar_model, set_reward_normalization
from tether.models.loading import load_causal_lm
from tether.models.trunk import SharedTrunk, backbone, shared_depth
from tether.ppo.roles import PPORoles
from tether.ppo.rollout import Rollout, joined


def scorer(policy, ref, value, reward, tok, trunk=None, missing_eos_penalty=-1.0) -> PPORoles:
    """The roles scoring as PPO does (temperature 1), through ``trunk`` when given."""
    cfg = resolve(PPOConfig, "ppo", "tiny", overrides={"missing_eos_penalty": missing_eos_penalty})
    return PPORoles(cfg, policy, ref, value, reward, tok, trunk=trunk)


def roles(tiny_dir, trainable_layers: int | None = 1):
    """Policy, frozen reference, value model and RM as PPO builds them (top block trained)."""
    cfg = ModelConfig(name_or_path=str(tiny_dir), trainable_layers=trainable_layers)
    policy, tok = load_causal_lm(cfg, trainable=True)
    ref = copy.deepcopy(policy).requires_grad_(False)
    torch.manual_seed(0)
    reward, _ = load_scalar_model(str(tiny_dir))
    set_reward_normalization(reward, gain=1.3, bias=-0.2)
    value, _ = load_scalar_model(cfg, trainable=True)
    value.score.weight.data.copy_(reward.score.weight.data)
    set_reward_normalization(value, gain=1.3, bias=-0.2)
    return policy, ref, value, reward, tok


def test_shared_blocks_are_found_from_the_weights(tiny_dir):
    policy, ref, value, reward, _ = roles(tiny_dir)
    assert shared_depth([policy, ref, value, reward]) == 1  # 2 blocks, the top one trained
    # Every block trained: nothing is frozen, nothing is shared.
    assert shared_depth(list(roles(tiny_dir, trainable_layers=None)[:4])) == 0
    # A single weight that differs ends the shared prefix there.
    with torch.no_grad():
        backbone(reward).layers[0].mlp.up_proj.weight[3, 5] += 1e-3
    assert shared_depth([policy, ref, value, reward]) == 0
    with torch.no_grad():
        backbone(reward).embed_tokens.weight[7, 0] += 1e-3
    assert shared_depth([policy, ref]) == 1 and shared_depth([policy, reward]) == 0


def test_scoring_through_the_trunk_equals_every_model_run_whole(tiny_dir):
    policy, ref, value, reward, tok = roles(tiny_dir)
    prompts = ["hi", "a much longer prompt that forces left padding", "mid one"]
    gen = sample(policy, tok, prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = scorer(policy, ref, value, reward, tok).score(gen, prompts)
        trunk = SharedTrunk.detect([policy, ref, value, reward])
        assert trunk is not None and trunk.depth == 1
        shared = scorer(policy, ref, value, reward, tok, trunk).score(gen, prompts)
    for name in ("logprobs", "ref_logprobs", "values", "entropy", "scores"):
        torch.testing.assert_close(getattr(shared, name), getattr(whole, name), atol=1e-6, rtol=0), name
    assert whole.trunk_hidden is None and shared.trunk_hidden.shape[:2] == (3, gen.query_ids.shape[1] + 6)
    # One copy of the shared block in memory: the models now hold the same modules.
    assert backbone(value).layers[0] is backbone(policy).layers[0] is backbone(reward).layers[0]
    assert backbone(ref).embed_tokens is backbone(policy).embed_tokens


def test_rollout_select_and_cat_keep_the_trunk_output_aligned(tiny_dir):
    policy, ref, value, reward, tok = roles(tiny_dir)
    trunk = SharedTrunk.detect([policy, ref, value, reward])
    parts = []
    for seed, prompts in enumerate((["hi", "a much longer prompt here"], ["mid one", "x"])):
        gen = sample(policy, tok, prompts, max_new_tokens=5, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            parts.append(scorer(policy, ref, value, reward, tok, trunk, missing_eos_penalty=None).score(gen, prompts))
    batch = Rollout.cat(parts, tok.pad_token_id)
    for rows in ([0, 3], [2], [1, 2, 3]):
        mb = batch.select(rows)
        assert mb.trunk_hidden.shape[1] == mb.query_ids.shape[1] + mb.response_ids.shape[1]
        # Recomputed on the re-padded minibatch, the real positions' trunk output is unchanged.
        ids, mask = joined(mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask)
        again = trunk.hidden(ids, mask)
        real = mask.bool()
        torch.testing.assert_close(mb.trunk_hidden[real], again[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("per_row", [False, True])
def test_sampling_keeps_the_trunk_output_of_a_full_forward(eos_policy, ppo_data, per_row):
    """The trunk's output kept while sampling (shared chat-template prefix, length buckets, decode
    steps, rows leaving the batch at EOS, the last step's tokens) is the full forward's."""
    import json

    from tether.models.generation import row_generators

    policy, tok = load_causal_lm(ModelConfig(name_or_path=str(eos_policy), trainable_layers=1), trainable=True)
    ref = copy.deepcopy(policy).requires_grad_(False)
    trunk = SharedTrunk.detect([policy, ref])
    assert trunk is not None and trunk.depth == 1
    block = trunk.last_block(policy)
    assert block is backbone(policy).layers[0] and trunk.last_block(copy.deepcopy(policy)) is None
    texts = [json.loads(line)["text"] for line in ppo_data["prompts"].read_text().splitlines()][:9]
    texts += ["hi", "a much longer prompt, one that forces left padding on the others", "mid one"]
    for max_new in (3, 12):

        def draw(capture, max_new=max_new):
            gens = row_generators(0, range(len(texts)), "cpu") if per_row else torch.Generator().manual_seed(0)
            return sample(policy, tok, texts, max_new_tokens=max_new, generator=gens, capture=capture)

        plain, kept = draw(None), draw(block)
        assert plain.hidden is None
        for name in ("response_ids", "response_mask", "finished"):
            assert torch.equal(getattr(kept, name), getattr(plain, name)), name
        # (The batch shrinks a step later when capturing: the same numbers up to matmul round-off.)
        torch.testing.assert_close(kept.logprobs, plain.logprobs, atol=1e-5, rtol=0)
        lengths = kept.response_mask.sum(1)
        if max_new == 12:  # rows left the batch at different steps, and some ran to the limit
            assert kept.finished.any() and not kept.finished.all() and lengths.min() < lengths.max()
        ids, mask = joined(kept.query_ids, kept.query_mask, kept.response_ids, kept.response_mask)
        assert len(set(kept.query_mask.sum(1).tolist())) > 1  # prompts of several lengths
        full = trunk.hidden(ids, mask)
        real = mask.bool()
        torch.testing.assert_close(kept.hidden[real], full[real], atol=1e-5, rtol=0)
        assert not kept.hidden[~real].any()


@pytest.mark.parametrize("ptx_coef", [0.0, 1.0])
def test_ppo_with_the_shared_trunk_trains_the_same_weights(tmp_path, tiny_dir, ptx_coef):
    """The whole PPO update (rollout, 2 epochs × 2 minibatches, PPO-ptx) with and without sharing."""
    from safetensors.torch import load_file

    from tether.ppo.train import train_ppo

    torch.manual_seed(0)
    rm, tok = load_scalar_model(str(tiny_dir))
    set_reward_normalization(rm, gain=1.5, bias=0.3)
    rm_dir = save_scalar_model(rm, tok, tmp_path / "rm")
    logs, weights = [], []
    for share in (False, True):
        overrides = {
            "reward_model": str(rm_dir),
            "policy.trainable_layers": 1,
            "share_trunk": share,
            "ppo_epochs": 2,
            "ptx_coef": ptx_coef,
            "total_episodes": 8,
            "sample_every": 0,
            "out_dir": str(tmp_path / f"share-{share}"),
        }
        cfg = resolve(PPOConfig, "ppo", "tiny", overrides={"policy.name_or_path": str(tiny_dir), **overrides})
        result = train_ppo(cfg, log=logs.append)
        weights.append(load_file(str(result.policy_dir / "model.safetensors")))
        weights.append(load_file(str(result.value_dir / "model.safetensors")))
    assert any("share 1 of 2 blocks" in line for line in logs)
    for off, on in ((weights[0], weights[2]), (weights[1], weights[3])):
        assert off.keys() == on.keys()
        for name in off:
            # float32 round-off only: the same ops, on differently padded batches
            torch.testing.assert_close(on[name], off[name], atol=1e-5, rtol=1e-4), name


# ---- TrunkCache: one model's frozen trunk kept across epochs (SFT, RM) ------------------------


def _batch(tok, texts):
    from tether.reward.data import pad_right

    return pad_right([tok(t, add_special_tokens=False).input_ids for t in texts], tok.pad_token_id)


def test_trunk_cache_keeps_real_tokens_and_gives_the_full_forward(tiny_dir, monkeypatch):
    from tether.models.trunk import TrunkCache

    model, tok = load_causal_lm(ModelConfig(name_or_path=str(tiny_dir), trainable_layers=1), trainable=True)
    cache, how = TrunkCache.plan(model, n_tokens=100, epochs_left=2, limit_mib=1, parallel="none")
    assert cache is not None and how.startswith("on: the output of the embeddings and 1 of 2 blocks")
    ids, mask = _batch(tok, ["a short one", "a much longer sentence than the first one is"])
    whole = model(input_ids=ids, attention_mask=mask).logits
    first = cache.logits(model, ids, mask)
    # Only the real tokens are kept, one entry per sequence, on the CPU.
    assert sorted(t.shape[0] for t in cache.store.values()) == sorted(mask.sum(1).tolist())
    assert cache.nbytes == int(mask.sum()) * 64 * 4
    calls = []
    monkeypatch.setattr(SharedTrunk, "hidden", lambda *a: calls.append(1))  # must not run again
    # The same sequences in another batch (other order, other padding): from the store.
    ids2, mask2 = _batch(tok, ["a much longer sentence than the first one is", "a short one", "a short one"])
    again = cache.logits(model, ids2, mask2)
    assert not calls
    real = mask.bool()
    torch.testing.assert_close(first[real], whole[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(again[[1, 0]][real], whole[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(again[2][mask2[2].bool()], whole[0][real[0]], atol=1e-5, rtol=0)
    # Gradients reach the trained block through the kept states.
    again[mask2.bool()].sum().backward()
    assert backbone(model).layers[1].mlp.up_proj.weight.grad.abs().sum() > 0
    assert backbone(model).layers[0].mlp.up_proj.weight.grad is None


def test_trunk_cache_is_emptied_when_a_frozen_weight_changes(tiny_dir):
    from tether.models.trunk import TrunkCache

    model, tok = load_scalar_model(ModelConfig(name_or_path=str(tiny_dir), trainable_layers=1), trainable=True)
    cache, _ = TrunkCache.plan(model, n_tokens=100, epochs_left=2, limit_mib=1, parallel="none")
    ids, mask = _batch(tok, ["one two three", "four"])
    cache.scalars(model, ids, mask)
    with torch.no_grad():
        backbone(model).layers[0].mlp.up_proj.weight.mul_(1.5)
    changed = cache.scalars(model, ids, mask)
    with torch.no_grad():
        from tether.models.heads import scalar_per_token

        whole = scalar_per_token(model, ids, mask)
    torch.testing.assert_close(changed[mask.bool()], whole[mask.bool()], atol=1e-5, rtol=0)
    backbone(model).layers[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen trunk now requires grad"):
        cache.scalars(model, ids, mask)


def test_trunk_cache_is_off_where_it_would_not_be_exact(tiny_dir):
    from tether.config import LoraConfig
    from tether.models.trunk import TrunkCache

    def plan(epochs_left=2, limit_mib=1.0, parallel="none", **model_cfg):
        model, _ = load_causal_lm(ModelConfig(name_or_path=str(tiny_dir), **model_cfg), trainable=True)
        cache, how = TrunkCache.plan(
            model, n_tokens=1000, epochs_left=epochs_left, limit_mib=limit_mib, parallel=parallel
        )
        assert (cache is None) == how.startswith("off")
        return how

    assert plan(trainable_layers=1).startswith("on: ")
    assert "residual dropout" in plan(trainable_layers=1, residual_dropout=0.1)
    assert "LoRA" in plan(lora=LoraConfig(enabled=True))
    assert "no frozen bottom block" in plan()
    assert "fsdp" in plan(trainable_layers=1, parallel="fsdp")
    assert "one epoch left" in plan(trainable_layers=1, epochs_left=1)
    assert plan(trainable_layers=1, limit_mib=0) == "off (trunk_cache_mib = 0)"
    # 1000 tokens x 64 x 4 bytes = 0.24 MiB
    assert "0 MiB > trunk_cache_mib = 0.1" in plan(trainable_layers=1, limit_mib=0.1)


def test_trunk_cache_is_off_where_the_trunks_path_is_not_the_models_own_forward(tiny_dir, tiny_gemma2_dir):
    """A probe at set-up: Gemma 2's own forward scales its embeddings and soft-caps its logits,
    which running the top on the kept trunk output skips; SFT's cache (logits) and the RM's
    (scalars) go off with the reason, a Llama's stays on."""
    from tether.models.trunk import TrunkCache

    def plan(load, path):
        model, _ = load(ModelConfig(name_or_path=str(path), trainable_layers=1), trainable=True)
        return TrunkCache.plan(model, n_tokens=100, epochs_left=2, limit_mib=1, parallel="none")

    for load, what in ((load_causal_lm, "logits"), (load_scalar_model, "scores")):
        cache, how = plan(load, tiny_gemma2_dir)
        assert cache is None and how.startswith(f"off: its {what} through the frozen blocks' output differ"), how
        cache, how = plan(load, tiny_dir)
        assert cache is not None and how.startswith("on: "), how


def test_trunk_cache_is_off_for_granites_multipliers(tiny_dir, tmp_path):
    """Granite multiplies its embeddings in its own forward and divides its logits by
    ``logits_scaling``: fed back as ``inputs_embeds``, the kept trunk output would be scaled twice
    and the logits left unscaled. SFT's cache goes off."""
    from transformers import AutoTokenizer, GraniteConfig, GraniteForCausalLM

    from tether.models.loading import save_model
    from tether.models.trunk import TrunkCache

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    config = GraniteConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, embedding_multiplier=12.0, logits_scaling=4.0, residual_multiplier=0.22,
        attention_multiplier=0.25, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    path = save_model(GraniteForCausalLM(config), tok, tmp_path / "granite")
    model, _ = load_causal_lm(ModelConfig(name_or_path=str(path), trainable_layers=1), trainable=True)
    cache, how = TrunkCache.plan(model, n_tokens=100, epochs_left=2, limit_mib=1, parallel="none")
    assert cache is None and how.startswith("off: its logits through the frozen blocks' output differ"), how
