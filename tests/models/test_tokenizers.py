"""Token roles for every tokenizer family: the turn end SFT appends is where the RM reads its
score, where PPO's reward lands and where the sampler stops; pretraining text never ends with it.

The families are tiny random Llamas whose tokenizers are shaped like Llama-3 (no pad, turn end
``<|eot_id|>`` from its header template, eos_token ``<|end_of_text|>``), Mistral (``[INST]``
template, ``</s>``, no pad), Gemma (``<end_of_turn>`` is not its ``<eos>``, has ``<pad>``) and
GPT-2 (no template, no pad): :mod:`tether.models.tiny_families`, built offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tether import cli
from tether.models.generation import sample
from tether.models.heads import load_scalar_model, reward_scores, scalar_per_token
from tether.models.lm_batch import collate, encode_demonstration, encode_pretrain
from tether.models.loading import fix_tokenizer, load_causal_lm, load_tokenizer
from tether.models.tokens import ROLES_KEY, decide_token_roles
from tether.ops import IGNORE_INDEX
from tether.ppo.kl import compute_rewards
from tether.reward.data import encode_response, pad_right, prompt_ids

# family: (turn end, pad, document end) as tether must decide them.
ROLES = {
    "llama3": ("<|eot_id|>", "<|reserved_special_token_0|>", "<|end_of_text|>"),
    "mistral": ("</s>", "</s>", None),
    "gemma": ("<end_of_turn>", "<pad>", "<eos>"),
    "gpt2": ("<|endoftext|>", "<|endoftext|>", None),
}
FAMILIES = list(ROLES)
PROMPTS = ["Describe a red car in capitals.", "Describe a blue boat.", "Hi."]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.mark.parametrize("name", FAMILIES)
def test_roles_are_read_from_the_template_and_kept_in_checkpoints(name, tmp_path):
    turn_end, pad, document_end = ROLES[name]
    tok = load_tokenizer(f"tiny-{name}")
    assert (tok.eos_token, tok.pad_token) == (turn_end, pad)
    assert decide_token_roles(tok)[0].document_end == document_end
    # A saved tokenizer carries the decision: a checkpoint loads with the same ids.
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())[ROLES_KEY]["turn_end"] == turn_end
    again = fix_tokenizer(AutoTokenizer.from_pretrained(tmp_path))
    assert (again.eos_token_id, again.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)


def test_overrides_win_and_are_recorded(tmp_path):
    from tether.config import ModelConfig

    cfg = ModelConfig(name_or_path="tiny-llama3", eos_token="<|end_of_text|>", pad_token="<|reserved_special_token_1|>")
    tok = load_tokenizer("tiny-llama3", cfg)
    assert (tok.eos_token, tok.pad_token) == ("<|end_of_text|>", "<|reserved_special_token_1|>")
    roles = decide_token_roles(tok)[0]
    assert roles.document_end is None  # the document end never equals the turn end
    tok.save_pretrained(tmp_path)
    assert fix_tokenizer(AutoTokenizer.from_pretrained(tmp_path)).eos_token == "<|end_of_text|>"
    with pytest.raises(ValueError, match="model.pad_token '<nope>' is not a token"):
        load_tokenizer("tiny-llama3", ModelConfig(pad_token="<nope>"))


def test_a_reserved_pad_token_is_preferred_to_reserved_specials():
    """Llama-3.1 names `<|finetune_right_pad_id|>` for padding: it wins over the reserved ones."""
    from tether.models.tiny_families import tiny_family_dir

    tok = AutoTokenizer.from_pretrained(tiny_family_dir("llama3"))
    tok.add_special_tokens({"additional_special_tokens": ["<|finetune_right_pad_id|>"]})
    assert decide_token_roles(tok)[0].pad == "<|finetune_right_pad_id|>"


def _turn_end_likely(model: torch.nn.Module, token_id: int) -> torch.utils.hooks.RemovableHandle:
    """Make ``token_id`` the near-certain next token everywhere (a hook on the LM head)."""

    def hook(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., token_id] += 40.0
        return logits

    return model.lm_head.register_forward_hook(hook)


def test_sft_rm_ppo_and_sampler_agree_on_the_turn_end(family):
    """SFT's labels end with the template's turn end; the sampler stops on it (and not on the
    document end); PPO's score is the RM's read at it, and its reward lands there."""
    turn_end, _, document_end = ROLES[family]
    policy, tok = load_causal_lm(f"tiny-{family}")
    end_id = tok.convert_tokens_to_ids(turn_end)

    # SFT: the response's last label is the turn end.
    ex = encode_demonstration(tok, PROMPTS[0], "A RED CAR.", max_length=256)
    assert ex is not None and ex.labels[-1] == end_id

    # The sampler stops on the turn end, and on nothing else that ends documents.
    if document_end is not None:
        hook = _turn_end_likely(policy, tok.convert_tokens_to_ids(document_end))
        gen = sample(policy, tok, PROMPTS, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
        hook.remove()
        assert not gen.finished.any() and gen.response_mask.all()
    hook = _turn_end_likely(policy, end_id)
    gen = sample(policy, tok, PROMPTS, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert gen.finished.all()
    assert gen.response_mask.sum(1).tolist() == [1] * len(PROMPTS)
    assert (gen.response_ids[:, 0] == end_id).all()

    # The RM's score of the sampled episode is its scalar at the turn end, and equals the score
    # of the same text encoded as the RM trains on it (prompt ⊕ response ⊕ turn end).
    rm, rm_tok = load_scalar_model(f"tiny-{family}")
    ids = torch.cat([gen.query_ids, gen.response_ids], 1)
    mask = torch.cat([gen.query_mask, gen.response_mask], 1)
    scores = reward_scores(rm, ids, mask)
    at_end = scalar_per_token(rm, ids, mask)[:, gen.query_ids.shape[1]] * rm.config.tether_reward_gain
    torch.testing.assert_close(scores, at_end + rm.config.tether_reward_bias)
    trained_on = [encode_response(rm_tok, prompt_ids(rm_tok, p), "", 256)[0] for p in PROMPTS]
    assert all(s[-1] == end_id for s in trained_on)
    torch.testing.assert_close(reward_scores(rm, *pad_right(trained_on, rm_tok.pad_token_id)), scores)

    # PPO: the score lands on the response's last real token, the turn end.
    zeros = torch.zeros(gen.response_ids.shape)
    rewards, _, _ = compute_rewards(scores, zeros, zeros, gen.response_mask, kl_coef=0.1)
    landed = rewards.nonzero()
    assert landed[:, 1].tolist() == [0] * len(PROMPTS)
    assert (gen.response_ids[landed[:, 0], landed[:, 1]] == end_id).all()


@pytest.mark.parametrize("name", [*FAMILIES, "tiny"])
def test_pretraining_text_never_ends_with_the_turn_end(name):
    """A document ends with the tokenizer's document end (trained; left out of the perplexity)
    or with nothing; never with the turn end, or PPO-ptx trains "end the turn here"."""
    tok = load_tokenizer(name if name == "tiny" else f"tiny-{name}")
    text = "The red car is here. It is a plain sentence."
    plain = tok(text, add_special_tokens=False).input_ids
    train = encode_pretrain(tok, text, 256)
    measure = encode_pretrain(tok, text, 256, score_document_end=False)
    assert tok.eos_token_id not in train.labels
    document_end = "<|endoftext|>" if name == "tiny" else ROLES[name][2]
    if document_end is None:
        assert train.input_ids == train.labels == plain
    else:
        end = tok.convert_tokens_to_ids(document_end)
        assert train.input_ids == [*plain, end] and train.labels[-1] == end
        assert measure.labels == [*plain, IGNORE_INDEX]
    # Where the document end is also the pad (SmolLM2), the attention mask still keeps it.
    batch = collate([train, encode_pretrain(tok, "Hi.", 256)], tok.pad_token_id)
    assert batch["attention_mask"][0].sum() == len(train.input_ids)


# --------------------------------------------------------------------------------------------
# Every stage on every family, from the command line


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def family_run(family, tmp_path_factory) -> tuple[str, Path, dict[str, int]]:
    """sft -> rm -> ppo -> eval on a tiny model of the family, each exit code recorded."""
    root = tmp_path_factory.mktemp(f"run-{family}")
    colors, things = ["red", "blue", "green", "black"], ["car", "boat", "cup", "lamp"]
    pairs = [(c, t) for c in colors for t in things]
    demos = _write(
        root / "demos.jsonl",
        [{"prompt": f"Describe a {c} {t}.", "response": f"A {c.upper()} {t.upper()}."} for c, t in pairs],
    )
    comparisons = _write(
        root / "comparisons.jsonl",
        [
            {
                "prompt": f"Describe a {c} {t}.",
                "responses": [f"A {c.upper()} {t.upper()}.", f"a {t}", "no"],
                "ranking": [1, 2, 3],
                "labeler_id": f"l{i % 2}",
                "prompt_id": f"q{i}",
            }
            for i, (c, t) in enumerate(pairs)
        ],
    )
    prompts = _write(
        root / "prompts.jsonl",
        [{"id": f"p{i}", "text": f"Describe a {c} {t}.", "user_id": f"u{i % 2}"} for i, (c, t) in enumerate(pairs)],
    )
    pretrain = _write(root / "pretrain.jsonl", [{"text": f"The {c} {t} is here."} for c, t in pairs])
    sft, rm, ppo = root / "sft", root / "rm", root / "ppo"
    commands = {
        "sft": ["sft", "--preset", "tiny", "--model.name-or-path", f"tiny-{family}", "--train-file", demos,
                "--epochs", "1", "--select-prompts", "2", "--max-new-tokens", "4", "--out-dir", str(sft)],
        "rm": ["rm", "--preset", "tiny", "--model.name-or-path", str(sft / "final"), "--train-file", comparisons,
               "--demonstrations-file", demos, "--out-dir", str(rm)],
        "ppo": ["ppo", "--preset", "tiny", "--policy.name-or-path", str(sft / "final"),
                "--reward-model", str(rm / "final"), "--prompts-file", prompts, "--pretrain-file", pretrain,
                "--total-episodes", "8", "--out-dir", str(ppo)],
        "eval": ["eval", "--preset", "tiny", "--policy", f"sft={sft / 'final'}", "--policy", f"ppo={ppo / 'policy'}",
                 "--reward-model", str(rm / "final"), "--prompts-file", prompts, "--limit", "4",
                 "--sft-best-of", "0", "--pretrain-file", pretrain, "--pretrain-texts", "4",
                 "--out-dir", str(root / "eval")],
    }  # fmt: skip
    codes: dict[str, int] = {}
    for stage, argv in commands.items():
        codes[stage] = cli.main(argv)
        if codes[stage] != 0:
            break
    return family, root, codes


def test_every_stage_runs_on_the_family(family_run):
    family, root, codes = family_run
    assert codes == {"sft": 0, "rm": 0, "ppo": 0, "eval": 0}
    turn_end = ROLES[family][0]
    for model in ("sft/final", "rm/final", "ppo/policy", "ppo/value"):
        config = json.loads((root / model / "config.json").read_text())
        assert config[ROLES_KEY]["turn_end"] == turn_end, model
        assert load_tokenizer(root / model).eos_token == turn_end
    assert (root / "eval" / "eval.json").exists()
