"""A reward model of the user's own: an off-the-shelf ``LlamaForSequenceClassification`` whose
tokenizer (Llama-3-shaped: header template, turn end ``<|eot_id|>``, no pad) is not the policy's
(ChatML), saved without tether's normalisation fields. PPO and eval score with it through its own
tokenizer and template; its gain and bias come from the demonstrations; the critic comes from the
policy's SFT checkpoint."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from tether import cli
from tether.config import ModelConfig, PPOConfig
from tether.models.generation import decode_responses
from tether.models.heads import REWARD_GAIN_KEY, load_scalar_model, reward_bias, reward_gain
from tether.models.loading import TINY_CONFIG, load_causal_lm, load_tokenizer
from tether.models.tiny_families import family_tokenizer
from tether.ppo.roles import build_roles
from tether.ppo.rollout import episode_scores
from tether.reward.foreign import ForeignReward, reward_for
from tether.reward.score import score_texts
from tether.sft.data import load_demonstrations


@pytest.fixture(scope="module")
def foreign_rm(tmp_path_factory) -> Path:
    """A tiny random Llama-3-tokenizer sequence classifier (num_labels=1), as transformers saves it."""
    tokenizer = family_tokenizer("llama3")
    ids = {f"{role}_token_id": tokenizer.convert_tokens_to_ids(t) for role, t in (("bos", "<|begin_of_text|>"),)}
    config = AutoConfig.for_model(vocab_size=len(tokenizer), num_labels=1, **ids, **TINY_CONFIG)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    out = tmp_path_factory.mktemp("foreign_rm") / "rm"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _cfg(policy: Path, rm: Path, ppo_data: dict[str, Path], out: Path) -> PPOConfig:
    return PPOConfig(
        policy=ModelConfig(name_or_path=str(policy), device="cpu"),
        reward_model=str(rm),
        prompts_file=str(ppo_data["prompts"]),
        max_new_tokens=8,
        batch_size=4,
        mini_batch_size=4,
        micro_batch_size=4,
        total_episodes=4,
        out_dir=str(out),
    )


def test_ppo_scores_through_the_rms_own_tokenizer(foreign_rm, eos_policy, ppo_data, tmp_path):
    assert REWARD_GAIN_KEY not in json.loads((foreign_rm / "config.json").read_text())
    roles = build_roles(_cfg(eos_policy, foreign_rm, ppo_data, tmp_path))  # today: "tokenizer differs"
    reward = roles.reward
    assert isinstance(reward, ForeignReward)
    rm, rm_tok = reward.model, reward.tokenizer

    # (b) gain and bias computed from the demonstrations: they score mean 0, std 1.
    demos = load_demonstrations(None)
    demo_scores = score_texts(rm, rm_tok, [d.prompt for d in demos], [d.response for d in demos]).double()
    assert abs(float(demo_scores.mean())) < 1e-4 and float(demo_scores.std()) == pytest.approx(1.0, abs=1e-4)
    assert reward_gain(rm) != 1.0

    # (a) an episode's score: the RM's own forward on its own encoding of (prompt, decoded response).
    prompts = [json.loads(line)["text"] for line in ppo_data["prompts"].read_text().splitlines()][:8]
    gen = roles.sample(prompts, torch.Generator().manual_seed(0))
    episodes = roles.score(gen, prompts)  # the rollout's step 1b
    texts = decode_responses(roles.tokenizer, gen)  # the policy's ids, up to its turn end
    # (the samples tether ppo logs are scored the same way)
    assert torch.equal(episode_scores(gen, prompts, texts, reward, None), episodes.scores)
    own = AutoTokenizer.from_pretrained(foreign_rm)  # the RM's tokenizer as its files give it
    eot = own.convert_tokens_to_ids("<|eot_id|>")
    assert rm_tok.eos_token_id == eot  # the turn end its template puts after an assistant message
    assert {True, False} <= set(episodes.finished.tolist())  # both kinds of episode are checked
    for prompt, text, finished, score in zip(prompts, texts, episodes.finished, episodes.scores, strict=True):
        head = own.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = own(head, add_special_tokens=False).input_ids + own(text, add_special_tokens=False).input_ids
        ids += [eot] if finished else []
        with torch.no_grad():
            raw = rm(input_ids=torch.tensor([ids])).logits[0, 0]
        assert float(score) == pytest.approx(float(raw) * reward_gain(rm) + reward_bias(rm), abs=1e-4)

    # (c) the critic is the policy's SFT checkpoint under a scalar head, not the RM.
    policy, _ = load_causal_lm(str(eos_policy))
    value_layers = dict(roles.value_model.model.named_parameters())
    for name, param in policy.model.named_parameters():
        assert torch.equal(value_layers[name], param), name
    assert any("cannot be the critic" in line for line in roles.describe())


def test_ppo_and_eval_run_with_the_foreign_rm(foreign_rm, eos_policy, ppo_data, demos_file, tmp_path, capsys):
    ppo = tmp_path / "ppo"
    code = cli.main(
        ["ppo", "--preset", "tiny", "--policy.name-or-path", str(eos_policy), "--reward-model", str(foreign_rm),
         "--prompts-file", str(ppo_data["prompts"]), "--pretrain-file", str(ppo_data["pretrain"]),
         "--demonstrations-file", str(demos_file), "--total-episodes", "8", "--out-dir", str(ppo)]
    )  # fmt: skip
    out = capsys.readouterr().out
    log = " ".join(out.split())  # (the log wraps its lines, long paths included: compared without spaces)
    assert code == 0
    assert "".join(f"the 24 demonstrations of {demos_file} score mean 0, std 1".split()) in "".join(out.split())
    assert "runs whole, in no shared trunk" in log and "cannot be the critic" in log
    # The samples PPO logged: the RM's scores of their texts, normalised on the demonstrations given.
    samples = [json.loads(line) for line in (ppo / "samples.jsonl").read_text().splitlines()]
    reward = reward_for(
        *load_scalar_model(str(foreign_rm)), load_tokenizer(eos_policy), foreign_rm, [], str(demos_file)
    )
    assert isinstance(reward, ForeignReward)
    again = reward([s["prompt"] for s in samples], [s["response"] for s in samples], [s["finished"] for s in samples])
    assert [s["score"] for s in samples] == pytest.approx(again.tolist(), abs=1e-4)

    out = tmp_path / "eval"
    code = cli.main(
        ["eval", "--preset", "tiny", "--policy", f"sft={eos_policy}", "--policy", f"ppo={ppo / 'policy'}",
         "--reward-model", str(foreign_rm), "--prompts-file", str(ppo_data["prompts"]), "--limit", "4",
         "--sft-best-of", "0", "--pretrain-file", str(ppo_data["pretrain"]), "--pretrain-texts", "4",
         "--demonstrations-file", str(demos_file), "--out-dir", str(out)]
    )  # fmt: skip
    assert code == 0
    out_text = capsys.readouterr().out
    assert "eval: reward: the RM carries no tether normalisation" in " ".join(out_text.split())
    # normalised on the user's demonstrations, as PPO was (the same gain and bias), not on the built-in task's
    assert "".join(f"the 24 demonstrations of {demos_file}".split()) in "".join(out_text.split())
    norm = re.compile(r"score = (\S+) · raw (\S+) so that")
    assert norm.findall(" ".join(out_text.split()))[0] == norm.findall(log)[0]
    policies = json.loads((out / "eval.json").read_text())["policies"]
    rm_scores = {p["name"]: p["rm_score"] for p in policies}
    assert set(rm_scores) == {"sft", "ppo"} and all(math.isfinite(s) for s in rm_scores.values()), rm_scores
