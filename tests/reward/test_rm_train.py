"""Stage 2 on a tiny random Llama: the K-wise trainer's invariances, learning, resume."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tether.checkpoint import StopAfter
from tether.config import RMConfig, resolve
from tether.data.formats import Comparison, DataError, Demonstration, parse_record
from tether.labelers.panel import Panel
from tether.models.heads import load_scalar_model, reward_scores
from tether.reward.data import collate, encode_comparisons, expand_to_pairs, pad_right
from tether.reward.score import encode_texts, rm_scorer, score_sequences, score_texts
from tether.reward.train import (
    accumulate_gradients,
    heldout_labeler_ids,
    ranking_loss,
    train_reward_model,
)

# A toy task with a hidden score: a response is four words, its quality is how many are GOOD.
GOOD = ["sunny", "kind", "bright", "calm", "warm", "happy", "clear", "gentle"]
BAD = ["gloomy", "rude", "dark", "noisy", "cold", "sad", "murky", "harsh"]
TOPICS = ["the sea", "a dog", "the city", "a garden", "the moon", "a train"]
QUIET = dict(log=lambda _: None)


def toy_comparisons(n: int, seed: int = 0, k: tuple[int, int] = (2, 6), labelers=("ann", "bob", "cy")):
    """Rankings by the hidden score (ties where it is equal); K varies per prompt."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        responses, hidden = [], []
        for _ in range(rng.randint(*k)):
            words = [rng.choice(GOOD if rng.random() < 0.5 else BAD) for _ in range(4)]
            responses.append(" ".join(words))
            hidden.append(sum(w in GOOD for w in words))
        if len(set(hidden)) == 1:
            hidden[0] += 1  # a ranking must hold at least one pair
            responses[0] = responses[0] + " " + GOOD[0]
        levels = sorted(set(hidden), reverse=True)
        rows.append(
            {
                "prompt": f"Describe {rng.choice(TOPICS)}.",
                "responses": responses,
                "ranking": [levels.index(h) + 1 for h in hidden],
                "labeler_id": labelers[i % len(labelers)],
                "prompt_id": f"q{i}",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records(rows: list[dict]) -> list[Comparison]:
    return [parse_record(r, "comparison") for r in rows]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "comparisons.jsonl", toy_comparisons(160))
    demos = [{"prompt": "Describe the sea.", "response": r} for r in ("sunny kind calm warm", "dark cold sad rude")]
    write_jsonl(tmp_path / "demos.jsonl", demos)
    return tmp_path


def tiny_cfg(data_dir: Path, out: str = "run", **overrides) -> RMConfig:
    base = {
        "train_file": str(data_dir / "comparisons.jsonl"),
        "demonstrations_file": str(data_dir / "demos.jsonl"),
        "out_dir": str(data_dir / out),
        "valid_fraction": 0.2,
    }
    base.update(overrides)
    return resolve(RMConfig, "rm", "tiny", overrides=base)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """A frozen tiny RM (untrained head) for scoring."""
    return load_scalar_model(str(tiny_dir))


@pytest.fixture(scope="module")
def trainable(tiny_dir):
    """A trainable tiny RM for gradient checks (every test zeroes the gradients first)."""
    return load_scalar_model(str(tiny_dir), trainable=True)


def final_weights(cfg: RMConfig) -> dict[str, torch.Tensor]:
    return load_file(str(Path(cfg.out_dir) / "final" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def step_gradients(model, examples, micro: int, pad: int, loss: str = "kwise"):
    """The gradient of one optimiser step of ``examples`` (what the trainer accumulates)."""
    model.zero_grad()
    stats = accumulate_gradients(model, examples, micro, pad, loss)
    return stats, [p.grad.clone() for p in model.parameters()]


def assert_same_gradients(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for ga, gb in zip(a, b, strict=True):
        torch.testing.assert_close(ga, gb, atol=1e-7, rtol=1e-4)


# ---- the data and the loss at the trainer level -----------------------------------------------


def test_each_response_is_one_sequence_ending_in_eos(tiny):
    _, tok = tiny
    comps = records(toy_comparisons(3, k=(4, 4)))
    examples, report = encode_comparisons(tok, comps, max_length=128)
    batch = collate(examples, tok.pad_token_id)
    assert batch.n_prompts == 3 and batch.n_sequences == 12  # K forwards per prompt, not 2·C(K,2)
    assert batch.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert batch.ranks.tolist() == [r for c in comps for r in c.ranking]
    last = batch.attention_mask.sum(1) - 1  # right padding: the last real token
    assert torch.all(batch.input_ids[torch.arange(12), last] == tok.eos_token_id)
    assert tok.pad_token_id != tok.eos_token_id
    assert report.kept == 3 and report.truncated_responses == 0 and report.skipped == 0


def test_k2_kwise_step_equals_pairwise_step(trainable):
    """The same K = 2 batch through both losses: the same loss and the same gradient."""
    model, tok = trainable
    examples, _ = encode_comparisons(tok, records(toy_comparisons(6, k=(2, 2))), 128)
    kwise, grads_kwise = step_gradients(model, examples, 3, tok.pad_token_id, "kwise")
    pairs = expand_to_pairs(examples)
    pairwise, grads_pairwise = step_gradients(model, pairs, 3, tok.pad_token_id, "pairwise")
    assert len(pairs) == len(examples)
    assert kwise["loss"] == pytest.approx(pairwise["loss"], abs=1e-6)
    assert kwise["accuracy"] == pairwise["accuracy"] and kwise["pairs"] == pairwise["pairs"] == 6
    assert_same_gradients(grads_kwise, grads_pairwise)


def test_rankings_of_the_same_responses_share_forwards(trainable):
    """Three labelers rank one prompt's K = 4 responses: 4 forwards, not 12, and the step's
    gradient is the mean over the 4 rankings as if each had been forwarded on its own."""
    model, tok = trainable
    pad = tok.pad_token_id
    responses = ["sunny kind", "dark cold", "calm warm bright", "sad"]
    shared = [
        Comparison("Describe the sea.", responses, ranking, who)
        for ranking, who in (([1, 3, 2, 4], "ann"), ([2, 3, 1, 4], "bob"), ([1, 2, 2, 3], "cy"))
    ]
    alone = Comparison("Describe a dog.", ["kind calm", "rude dark"], [1, 2], "ann")
    examples, _ = encode_comparisons(tok, [shared[0], alone, shared[1], shared[2]], 128)
    batch = collate(examples, pad)
    assert batch.n_prompts == 4 and batch.n_sequences == 4 + 2  # distinct sequences only
    assert batch.sequence_index.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1, 2, 3]

    for micro in (1, 2, 8):  # micro-batches count response sets: the group is never split
        stats, grads = step_gradients(model, examples, micro, pad)
        model.zero_grad()
        by_hand = torch.stack([ranking_loss(model, collate([ex], pad), "kwise")[0] for ex in examples]).mean()
        by_hand.backward()
        assert stats["loss"] == pytest.approx(float(by_hand.detach()), abs=1e-6)
        assert stats["pairs"] == 6 + 1 + 6 + 5
        assert_same_gradients(grads, [p.grad.clone() for p in model.parameters()])


def test_loss_of_a_batch_matches_eq1_by_hand(tiny):
    """Ties make no pair; each prompt weighs 1/P whatever its K (a K=2 and a K=6 prompt)."""
    model, tok = tiny
    small = Comparison("Describe a dog.", ["kind calm", "rude dark"], [2, 1], "ann")
    big = Comparison("Describe the sea.", ["a", "b b", "c c c", "d", "e e", "f"], [1, 2, 2, 3, 4, 4], "bob")
    examples, _ = encode_comparisons(tok, [small, big], 128)
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        loss, stats = ranking_loss(model, batch, "kwise")
        s = reward_scores(model, batch.input_ids, batch.attention_mask)
    small_loss = -F.logsigmoid(s[1] - s[0])
    pairs = [(w, lo) for w in range(6) for lo in range(6) if big.ranking[w] < big.ranking[lo]]
    assert len(pairs) == 15 - 2  # C(6,2) minus the two tied pairs
    big_loss = torch.stack([-F.logsigmoid(s[2 + w] - s[2 + lo]) for w, lo in pairs]).mean()
    torch.testing.assert_close(loss, (small_loss + big_loss) / 2)
    assert int(stats["n_pairs"]) == 1 + 13
    assert len(expand_to_pairs(examples)) == 14  # ties make no pair in the pairwise baseline either


def test_order_of_responses_changes_nothing(trainable):
    model, tok = trainable
    rows = toy_comparisons(6)
    rng = random.Random(1)
    shuffled = []
    for r in rows:
        perm = list(range(len(r["responses"])))
        rng.shuffle(perm)
        shuffled.append(
            {
                **r,
                "responses": [r["responses"][i] for i in perm],
                "ranking": [r["ranking"][i] for i in perm],
            }
        )
    a, _ = encode_comparisons(tok, records(rows), 128)
    b, _ = encode_comparisons(tok, records(shuffled), 128)
    stats_a, grads_a = step_gradients(model, a, 3, tok.pad_token_id)
    stats_b, grads_b = step_gradients(model, b, 3, tok.pad_token_id)
    assert stats_a["loss"] == pytest.approx(stats_b["loss"], abs=1e-6)
    assert_same_gradients(grads_a, grads_b)


def test_micro_batch_size_does_not_change_the_step(trainable):
    """One optimiser step of 6 prompts: 6 micro-batches of 1 == 2 of 3 == 1 of 6."""
    model, tok = trainable
    examples, _ = encode_comparisons(tok, records(toy_comparisons(6)), 128)
    ref_stats, ref = step_gradients(model, examples, 6, tok.pad_token_id)
    for micro in (1, 3):
        stats, grads = step_gradients(model, examples, micro, tok.pad_token_id)
        assert stats["loss"] == pytest.approx(ref_stats["loss"], abs=1e-6)
        assert_same_gradients(grads, ref)


# ---- scores: padding, batch size, EOS, the plain HF recipe ------------------------------------


def test_padding_side_and_batch_size_do_not_change_scores(tiny):
    model, tok = tiny
    prompts = ["Describe a dog.", "Describe the moon, please, in some detail.", "Hi."]
    responses = ["kind", "gentle bright calm warm clear and happy in every way", "ok ok"]
    seqs, _ = encode_texts(tok, prompts, responses)
    alone = torch.cat([score_sequences(model, [s], tok.pad_token_id) for s in seqs])
    batched = score_sequences(model, seqs, tok.pad_token_id, batch_size=3)
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=0)
    # Left padding, read through the same reward_scores: the last real token is found either way.
    width = max(map(len, seqs))
    ids = torch.full((3, width), tok.pad_token_id)
    mask = torch.zeros((3, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :], mask[i, width - len(s) :] = torch.tensor(s), 1
    with torch.no_grad():
        left = reward_scores(model, ids, mask)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    # An unfinished sample (no EOS) is scored as written, at its own last token.
    unfinished = score_texts(model, tok, prompts, responses, ended=[False] * 3)
    assert not torch.allclose(unfinished, alone)


def test_overlength_is_cut_keeping_the_prompt_or_skipped_and_counted(tiny):
    _, tok = tiny
    long = " ".join(["sunny"] * 200)
    comps = [
        Comparison("Describe a dog.", [long, "kind"], [1, 2], "ann"),
        Comparison("Describe a cat.", ["warm", "cold"], [1, 2], "ann"),
        Comparison(" ".join(["word"] * 300), ["warm", "cold"], [1, 2], "bob"),
    ]
    examples, report = encode_comparisons(tok, comps, max_length=64)
    assert report.kept == 2 and report.truncated_responses == 1
    assert report.skipped_prompt_too_long == [2]
    cut = examples[0].sequences[0]
    assert len(cut) == 64 and cut[-1] != tok.eos_token_id  # the EOS went with the cut
    assert examples[0].sequences[1][-1] == tok.eos_token_id
    _, skip = encode_comparisons(tok, comps, max_length=64, overlength="skip")
    assert skip.kept == 1 and skip.skipped_overlength == [0] and skip.skipped == 2
    assert any("cut 1 responses" in line for line in report.describe(64))


@pytest.mark.parametrize(
    "bad, message",
    [
        (Comparison("p", ["only one"], [1], "a"), "K=1"),
        (Comparison("p", ["x", "y", "z"], [1, 2], "a"), "2 ranks for 3 responses"),
        (Comparison("p", ["x", "  "], [1, 2], "a"), "empty"),
        (Comparison("p", ["x", "y"], [1, 1], "a"), "tie"),
    ],
)
def test_bad_comparisons_in_memory_raise(tiny, bad, message):
    with pytest.raises(ValueError, match=message):
        encode_comparisons(tiny[1], [bad], 128)


def test_bad_file_names_the_line(data_dir):
    rows = toy_comparisons(10)
    rows[6]["ranking"] = rows[6]["ranking"][:-1]
    write_jsonl(data_dir / "comparisons.jsonl", rows)
    with pytest.raises(DataError, match=r"comparisons.jsonl:7: field 'ranking'"):
        train_reward_model(tiny_cfg(data_dir), **QUIET)


# ---- the whole stage -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One RM trained on the toy task with a held-out labeler (shared by the tests below)."""
    d = tmp_path_factory.mktemp("rm")
    rows = toy_comparisons(200, labelers=("ann", "bob", "cy", "dee"))
    # Some prompts ranked twice, by another labeler who sometimes disagrees: labeler agreement.
    for i, r in enumerate(rows[:60]):
        ranking = list(reversed(r["ranking"])) if i % 4 == 0 else r["ranking"]
        rows.append({**r, "ranking": ranking, "labeler_id": "eve"})
    write_jsonl(d / "comparisons.jsonl", rows)
    write_jsonl(
        d / "demos.jsonl",
        [{"prompt": f"Describe {t}.", "response": "calm warm kind sunny"} for t in TOPICS],
    )
    cfg = tiny_cfg(d, epochs=1, heldout_labelers=["dee"], eval_every_steps=10)
    return cfg, train_reward_model(cfg, **QUIET)


def test_learns_a_hidden_score_task(trained):
    cfg, result = trained
    after = result.eval_after
    assert after.overall.accuracy > 0.8
    assert result.eval_before["overall"]["accuracy"] < 0.7
    assert after.heldout_labelers.pairs > 0 and after.heldout_labelers.accuracy > 0.8  # never trained on
    assert set(after.by_labeler) == {"ann", "bob", "cy", "dee", "eve"}
    assert after.margin > 0
    assert result.data.heldout_labeler_comparisons_excluded > 0
    assert 0.6 < after.labeler_agreement["rate"] < 0.9  # eve reverses 1 ranking in 4
    assert sum(after.histogram["counts"]) == after.scores["n"]
    metrics = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    lrs = [m["lr"] for m in metrics if "lr" in m]
    assert lrs[0] > lrs[-1] == pytest.approx(0.1 * cfg.optim.lr)  # cosine to 10 %
    assert any("valid_accuracy" in m and "loss" in m for m in metrics)  # eval_every_steps
    assert json.loads((Path(cfg.out_dir) / "eval.json").read_text())["heldout_labelers"] == ["dee"]


def test_normalised_so_demonstrations_score_mean_zero_and_loads_as_plain_hf(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg, result = trained
    final = result.final_dir
    demos = [Demonstration(f"Describe {t}.", "calm warm kind sunny") for t in TOPICS]
    model, tok = load_scalar_model(str(final))
    scores = score_texts(model, tok, [d.prompt for d in demos], [d.response for d in demos])
    assert abs(float(scores.mean())) < 1e-4
    assert result.normalization.bias != 0.0
    # The recipe in tether.models.heads (and the README), with nothing from tether:
    hf = AutoModelForSequenceClassification.from_pretrained(final)
    hf_tok = AutoTokenizer.from_pretrained(final)
    texts = [
        hf_tok.apply_chat_template([{"role": "user", "content": d.prompt}], tokenize=False, add_generation_prompt=True)
        + d.response
        + hf_tok.eos_token
        for d in demos
    ]
    with torch.no_grad():
        for text, expected in zip(texts, scores, strict=True):
            logits = hf(**hf_tok(text, return_tensors="pt")).logits
            score = float(logits[0, 0]) * hf.config.tether_reward_gain + hf.config.tether_reward_bias
            assert score == pytest.approx(float(expected), abs=1e-4)


def test_rm_scorer_for_sft_selection_is_seeded(trained, tiny_dir):
    _, result = trained
    scorer = rm_scorer(result.final_dir, max_new_tokens=6, seed=3)
    prompts = ["Describe a dog.", "Describe the moon."]
    a, b = scorer(tiny_dir, prompts), scorer(tiny_dir, prompts)
    assert isinstance(a, float) and a == b


def test_sft_selects_its_epoch_by_rm_score(trained, tmp_path, demos_file):
    """The paper's SFT checkpoint selection: `tether sft` builds tether.reward.score.rm_scorer."""
    from tether.cli import main

    _, rm = trained
    argv = ["sft", "--preset", "tiny", "--train-file", str(demos_file), "--out-dir", str(tmp_path / "sft")]
    argv += ["--valid-fraction", "0.2", "--select-by", "rm_score", "--reward-model", str(rm.final_dir)]
    assert main([*argv, "--show-samples", "0"]) == 0
    selection = json.loads((tmp_path / "sft" / "selection.json").read_text())
    scores = [e["score"] for e in selection["epochs"]]
    assert len(scores) == 2 and selection["selected"]["epoch"] == 1 + scores.index(max(scores))


def test_resume_equals_uninterrupted(data_dir):
    """Stop mid-epoch, rerun: the same final RM. Dropout on, so the RNG state must be restored."""
    common = {"epochs": 2, "batch_size": 4, "micro_batch_size": 2, "save_every_steps": 3}
    common["model.residual_dropout"] = 0.1
    write_jsonl(data_dir / "comparisons.jsonl", toy_comparisons(20))  # 4 steps/epoch
    full = tiny_cfg(data_dir, "full", **common)
    train_reward_model(full, **QUIET)
    broken = tiny_cfg(data_dir, "broken", **common)
    with pytest.raises(StopAfter, match="after 4 steps"):  # "crash" after step 4
        train_reward_model(broken, stop_after_steps=4, **QUIET)
    logs: list[str] = []
    train_reward_model(broken, log=logs.append)  # resumes from the state saved at step 3
    assert any("resuming" in line for line in logs)
    assert_same_weights(final_weights(full), final_weights(broken))
    steps = [json.loads(x)["step"] for x in (Path(broken.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == len(set(steps)) + 1  # no duplicated step lines (only the final eval repeats)


def test_cli_trains_and_prints_the_accuracy_table(data_dir, capsys):
    from tether.cli import main

    write_jsonl(data_dir / "comparisons.jsonl", toy_comparisons(24))
    args = [
        "rm",
        "--preset",
        "tiny",
        "--train-file",
        str(data_dir / "comparisons.jsonl"),
        "--demonstrations-file",
        str(data_dir / "demos.jsonl"),
        "--out-dir",
        str(data_dir / "cli"),
        "--heldout-labelers",
        "cy",
        "--valid-fraction",
        "0.25",
        "--heldout-panel-labelers",
        "true",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "held-out labelers" in out and "RM after" in out and "rm done" in out
    assert (data_dir / "cli" / "final" / "config.json").exists()
    panel_ids = [lab.id for lab in Panel().heldout_labelers]  # the CLI passes the panel's to the trainer
    assert json.loads((data_dir / "cli" / "eval.json").read_text())["heldout_labelers"] == ["cy", *panel_ids]
    assert main(["rm", "--preset", "tiny", "--loss", "listwise", "--out-dir", str(data_dir / "x")]) == 2


def test_panel_heldout_labelers_join_the_configured_ones(data_dir):
    cfg = tiny_cfg(data_dir, heldout_labelers=["ann"], heldout_panel_labelers=True)
    panel_ids = [lab.id for lab in Panel().heldout_labelers]
    assert panel_ids and heldout_labeler_ids(cfg, panel_ids) == ["ann", *panel_ids]
    # The trainer does not know the panel: with the flag on, the caller must say who is in it.
    with pytest.raises(ValueError, match="heldout_panel_labelers is set but the panel's held-out labeler ids"):
        train_reward_model(cfg, **QUIET)
    assert not Path(cfg.out_dir).exists()  # before anything ran
    assert heldout_labeler_ids(dataclasses.replace(cfg, heldout_panel_labelers=False), panel_ids) == ["ann"]


def test_pad_right_shapes():
    ids, mask = pad_right([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_the_trainer_runs_its_forwards_under_model_autocast(data_dir):
    """model.autocast is honoured (the RM demo preset sets it): bf16 forwards change the loss by
    round-off, which full-precision ones would reproduce exactly."""
    losses = {}
    for autocast in ("none", "bfloat16"):
        cfg = tiny_cfg(data_dir, f"ac-{autocast}", **{"model.autocast": autocast})
        with pytest.raises(StopAfter):
            train_reward_model(cfg, stop_after_steps=1, **QUIET)
        metrics = [json.loads(x) for x in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
        losses[autocast] = next(m["loss"] for m in metrics if "loss" in m)
    assert losses["none"] != losses["bfloat16"]
    assert losses["none"] == pytest.approx(losses["bfloat16"], rel=0.05)


def test_a_non_finite_gradient_never_reaches_a_checkpoint(data_dir, poison_gradients):
    import tether.reward.train as rm_train
    from tether.checkpoint import NonFiniteError

    write_jsonl(data_dir / "comparisons.jsonl", toy_comparisons(24))  # 5 steps/epoch
    cfg = tiny_cfg(data_dir, batch_size=4, micro_batch_size=2, save_every_steps=2)
    poison_gradients(rm_train, step=4)  # step 4 is also a save step
    state = Path(cfg.out_dir) / "state"
    with pytest.raises(NonFiniteError, match=rf"^rm: step 4: non-finite gradient norm .* state is in {state}$"):
        train_reward_model(cfg, **QUIET)
    assert json.loads((state / "counters.json").read_text())["global_step"] == 2
    weights = load_file(str(state / "reward_model.trainable.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_non_finite_first_step_says_there_is_no_good_state(data_dir, poison_gradients):
    import tether.reward.train as rm_train
    from tether.checkpoint import NonFiniteError

    cfg = tiny_cfg(data_dir, batch_size=4, micro_batch_size=2)
    poison_gradients(rm_train, step=1)
    with pytest.raises(NonFiniteError, match=r"^rm: step 1: .* no good state yet"):
        train_reward_model(cfg, **QUIET)
    assert not (Path(cfg.out_dir) / "state").exists()


def test_trunk_cache_trains_the_same_rm(data_dir, monkeypatch):
    """K-wise RM, 2 epochs, bottom block frozen: epoch 2 runs no trunk forward, same weights
    (float32 round-off: a sequence's trunk output computed in one batch's padding, reused in another)."""
    from tether.models.trunk import SharedTrunk

    write_jsonl(data_dir / "comparisons.jsonl", toy_comparisons(40))
    common = {"epochs": 2, "batch_size": 4, "micro_batch_size": 2, "model.trainable_layers": 1}
    logs: list[str] = []
    train_reward_model(tiny_cfg(data_dir, "off", trunk_cache_mib=0, **common), log=logs.append)
    assert "rm: trunk cache off (trunk_cache_mib = 0)" in logs
    forwards: list[int] = []
    trunk_hidden = SharedTrunk.hidden
    monkeypatch.setattr(
        SharedTrunk, "hidden", lambda self, ids, mask: forwards.append(len(ids)) or trunk_hidden(self, ids, mask)
    )
    logs = []
    on = tiny_cfg(data_dir, "on", **common)
    train_reward_model(on, log=logs.append)
    assert any(line.startswith("rm: trunk cache on: the output of the embeddings and 1 of 2 blocks") for line in logs)
    held = next(line for line in logs if line.startswith("rm: trunk cache held"))
    # The set-up probe's 2 sequences, then every distinct training sequence exactly once, in epoch 1.
    assert forwards[0] == 2 and sum(forwards[1:]) == int(held.split()[4])
    a, b = final_weights(on), final_weights(tiny_cfg(data_dir, "off"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4), name
