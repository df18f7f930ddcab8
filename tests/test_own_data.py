"""Users' own data: the ecosystem's shapes read as they are, every bad line reported, and no
silent fall-back to the built-in task once a stage is given data of its own."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tether.cli import main
from tether.data.formats import Comparison, Conversation, DataError, Demonstration, Prompt, read_records, write_records
from tether.data.preprocess import preprocess_prompts

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
USER1 = {"role": "user", "content": "Name a colour."}
ASSISTANT1 = {"role": "assistant", "content": "Blue."}
USER2 = {"role": "user", "content": "Another one?"}


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------
# 1. The shapes users have


def test_messages_are_demonstrations_whose_last_assistant_turn_is_the_response(tmp_path):
    rows = [
        {"messages": [SYSTEM, USER1, ASSISTANT1, USER2, {"role": "assistant", "content": "Red."}], "source": "x"},
        {"messages": [USER1, ASSISTANT1]},
    ]
    first, second = read_records(jsonl(tmp_path / "sft.jsonl", rows), "demonstration")
    assert first.response == "Red." and isinstance(first.prompt, Conversation)
    assert [t.role for t in first.prompt.turns] == ["system", "user", "assistant", "user"]
    assert second == Demonstration(prompt="Name a colour.", response="Blue.")  # one user turn: plain text
    # The conversation survives writing and reading tether's own file.
    again = read_records(write_records(tmp_path / "own.jsonl", [first]), "demonstration")[0]
    assert again.prompt.turns == first.prompt.turns and again == first


def test_prompt_completion_with_strings_or_turns(tmp_path):
    rows = [
        {"prompt": "Say hi.", "completion": "Hi!"},
        {"prompt": [SYSTEM, USER1], "completion": [ASSISTANT1], "score": 0.5},
    ]
    a, b = read_records(jsonl(tmp_path / "pc.jsonl", rows))
    assert a == Demonstration(prompt="Say hi.", response="Hi!")
    assert b.response == "Blue." and b.prompt.messages() == [SYSTEM, USER1]


def test_prompt_chosen_rejected_is_a_comparison_of_two_without_labeler(tmp_path):
    rows = [{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No.", "score_chosen": 8.0}]
    (c,) = read_records(jsonl(tmp_path / "prefs.jsonl", rows))
    assert c == Comparison(prompt="Say hi.", responses=["Hi!", "No."], ranking=[1, 2])
    assert c.labeler_id is None and c.pairs() == [(0, 1)]
    conv = {"prompt": [USER1], "chosen": [ASSISTANT1], "rejected": [{"role": "assistant", "content": "Dunno."}]}
    (c2,) = read_records(jsonl(tmp_path / "prefs2.jsonl", [conv]), "comparison")
    assert c2.prompt == "Name a colour." and c2.responses == ["Blue.", "Dunno."]


def test_implicit_prompt_conversations_share_their_leading_turns(tmp_path):
    rows = [
        {
            "chosen": [SYSTEM, USER1, ASSISTANT1, USER2, {"role": "assistant", "content": "Red."}],
            "rejected": [SYSTEM, USER1, ASSISTANT1, USER2, {"role": "assistant", "content": "No."}],
        },
        # HH-RLHF stores the conversation as text.
        {
            "chosen": "\n\nHuman: Name a colour.\n\nAssistant: Blue.\n\nHuman: Another one?\n\nAssistant: Red.",
            "rejected": "\n\nHuman: Name a colour.\n\nAssistant: Blue.\n\nHuman: Another one?\n\nAssistant: No.",
        },
    ]
    a, b = read_records(jsonl(tmp_path / "hh.jsonl", rows), "comparison")
    assert a.responses == b.responses == ["Red.", "No."]
    assert a.prompt.messages() == [SYSTEM, USER1, ASSISTANT1, USER2]
    assert b.prompt.messages() == [USER1, ASSISTANT1, USER2]
    bad = {"chosen": [USER1, ASSISTANT1, USER2, ASSISTANT1], "rejected": [USER1, {"role": "assistant", "content": "x"}]}
    with pytest.raises(DataError, match=r"hh2.jsonl:1: field 'chosen' chosen and rejected must share"):
        read_records(jsonl(tmp_path / "hh2.jsonl", [bad]), "comparison")


def test_prompts_without_ids_or_users_and_from_any_file_with_a_prompt(tmp_path):
    prompts = read_records(jsonl(tmp_path / "p.jsonl", [{"prompt": "A?"}, {"prompt": "B?"}, {"prompt": "A?"}]))
    assert [type(p) for p in prompts] == [Prompt] * 3 and all(p.user_id is None for p in prompts)
    ids = [p.id for p in prompts]
    assert len(set(ids)) == 3 and ids[2] == ids[0] + "-2"  # a repeated prompt is numbered
    assert ids == [p.id for p in read_records(tmp_path / "p.jsonl")]  # stable: a hash of the content
    # A demonstrations file (messages) and a preference file are read as prompts too.
    demos = read_records(jsonl(tmp_path / "d.jsonl", [{"messages": [SYSTEM, USER1, ASSISTANT1]}]), "prompt")
    assert demos[0].text.messages() == [SYSTEM, USER1]
    prefs = read_records(jsonl(tmp_path / "c.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}]), "prompt")
    assert prefs[0].text == "Q"


def test_the_split_by_user_falls_back_to_a_split_by_prompt_and_says_so(tmp_path, capsys):
    jsonl(tmp_path / "p.jsonl", [{"prompt": f"Question number {i} about something?"} for i in range(20)])
    result = preprocess_prompts(read_records(tmp_path / "p.jsonl", "prompt"))
    assert result.report.without_user == 20 and result.report.split_by.startswith("prompt")
    assert sum(map(len, result.splits.values())) == 20 and all(result.splits.values())
    assert main(["data", "preprocess", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "out")]) == 0
    assert "split by prompt (no user_id" in capsys.readouterr().out


def test_parquet_and_datasets_directory_and_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"messages": [USER1, ASSISTANT1], "lang": "en"}, {"messages": [SYSTEM, USER2, ASSISTANT1], "lang": "fr"}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    from_parquet = read_records(tmp_path / "d.parquet", "demonstration")
    from_dir = read_records(f"{tmp_path / 'dd'}:test", "demonstration")
    assert from_parquet == from_dir and from_dir[1].prompt.messages() == [SYSTEM, USER2]
    with pytest.raises(DataError, match=r"holds splits \['train', 'test'\]"):
        read_records(tmp_path / "dd", "demonstration")


def test_a_datasets_name_is_read_from_the_local_cache_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    src = jsonl(tmp_path / "x.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    datasets.load_dataset("json", data_files=str(src), cache_dir=str(tmp_path / "build"))
    # Lay the built files out as the cache holds a hub dataset: NAMESPACE___NAME/CONFIG/VERSION/HASH.
    built = next((tmp_path / "build" / "json").glob("default-*/0.0.0/*/"))
    cached = tmp_path / "cache" / "someone___prefs" / "default" / "0.0.0" / "abc"
    shutil.copytree(built, cached)
    (cached / "json-train.arrow").rename(cached / "prefs-train.arrow")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    expected = [Comparison(prompt="Q", responses=["a", "b"], ranking=[1, 2])]
    assert read_records("someone/prefs", "comparison") == expected
    assert read_records("someone/prefs:train", "comparison") == expected
    with pytest.raises(DataError, match="neither a file nor a dataset in the local datasets cache"):
        read_records("someone/absent", "comparison")


def test_convert_writes_tether_records_with_their_source(tmp_path, capsys):
    src = jsonl(tmp_path / "prefs.jsonl", [{"prompt": [SYSTEM, USER1], "chosen": "a", "rejected": "b", "score": 3}])
    assert main(["data", "convert", str(src), str(tmp_path / "out.jsonl")]) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert row == {
        "prompt": [SYSTEM, USER1],
        "responses": ["a", "b"],
        "ranking": [1, 2],
        "source": f"{src}:1",
        "meta": {"score": 3},
    }
    assert read_records(tmp_path / "out.jsonl") == read_records(src)
    # Several inputs, one kind: the user's pairs, the labeling app's export (tether's shape), an empty export.
    ranked = jsonl(tmp_path / "ranked.jsonl", [{"prompt": "Q", "responses": ["x", "y"], "ranking": [2, 1]}])
    (tmp_path / "none.jsonl").write_text("")
    argv = ["data", "convert", str(src), str(tmp_path / "none.jsonl"), str(ranked), str(tmp_path / "all.jsonl")]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == [f"{src}:1", f"{ranked}:1"] and rows[1]["ranking"] == [2, 1]


# --------------------------------------------------------------------------------------------
# 4. tether data validate: every bad line of every file


def test_validate_reports_every_bad_line_of_every_file(tmp_path, capsys):
    good = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    one = jsonl(tmp_path / "one.jsonl", [good, {"prompt": "Q", "chosen": "a"}, good, {"prompt": "Q", "chosen": 3}])
    two = tmp_path / "two.jsonl"
    two.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({**good, "rejected": ""}) + "\n")
    assert main(["data", "validate", str(one), str(two), "--kind", "comparison"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"error: {one}:2: field 'rejected' is missing (a preference pair has both chosen and rejected)",
        f"error: {one}:4: field 'rejected' is missing (a preference pair has both chosen and rejected)",
        f"error: {two}:2: is not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"error: {two}:3: field 'responses[1]' is empty",
    ]
    assert main(["data", "validate", str(one), "--max-errors", "1"]) == 2
    out = capsys.readouterr()
    assert out.err.count("error:") == 1 and "2 bad, 2 good comparison records (1 more not listed" in out.out


# --------------------------------------------------------------------------------------------
# 3. No silent fall-back to the built-in task


@pytest.fixture
def own_files(tmp_path):
    return {
        "demos": jsonl(tmp_path / "demos.jsonl", [{"messages": [SYSTEM, USER1, ASSISTANT1]}] * 4),
        "prefs": jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}] * 4),
        "prompts": jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Q"}, {"prompt": "R"}]),
        "pretrain": jsonl(tmp_path / "pretrain.jsonl", [{"text": "Some text."}]),
    }


def test_rm_on_own_comparisons_needs_own_demonstrations(tmp_path, capsys):
    # tether's own comparison shape, so that the code before this rule trains (on the built-in demonstrations).
    rows = [{"prompt": f"Q{i}", "responses": ["a", "b"], "ranking": [1, 2], "labeler_id": "L1"} for i in range(10)]
    comparisons = jsonl(tmp_path / "comparisons.jsonl", rows)
    argv = ["rm", "--preset", "tiny", "--train-file", str(comparisons), "--out-dir", str(tmp_path / "rm")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--demonstrations-file is required with --train-file" in err and "built-in task" in err
    assert not (tmp_path / "rm" / "final").exists()


def test_rm_is_normalised_on_the_demonstrations_its_sft_model_trained_on(tmp_path, own_files):
    from tether.config import RMConfig, SFTConfig, save_config
    from tether.data.sources import rm_sources

    save_config(SFTConfig(train_file=str(own_files["demos"])), tmp_path / "sft" / "config.yaml")
    cfg = RMConfig(train_file=str(own_files["prefs"]))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=str(tmp_path / "sft" / "final")))
    logged: list[str] = []
    assert rm_sources(cfg, logged.append).demonstrations_file == str(own_files["demos"])
    assert "normalising on the SFT model's demonstrations" in logged[0]


def test_ppo_and_sft_turn_off_built_in_pretraining_text_and_say_why(own_files):
    from tether.config import PPOConfig, SFTConfig, input_sources
    from tether.data.sources import ppo_sources, sft_sources

    logged: list[str] = []
    ppo = ppo_sources(PPOConfig(prompts_file=str(own_files["prompts"])), logged.append)
    assert ppo.ptx_coef == 0 and "ptx_coef 27.8 -> 0" in logged[0] and "no --pretrain-file" in logged[0]
    assert input_sources(ppo) == {"prompts_file": str(own_files["prompts"]), "pretrain_file": "off (ptx_coef 0)"}
    sft = sft_sources(SFTConfig(train_file=str(own_files["demos"]), pretrain_fraction=0.1), logged.append)
    assert sft.pretrain_fraction == 0 and "no --pretrain-file" in logged[1]
    assert "built-in task" not in json.dumps(input_sources(sft))
    # Nothing given: the built-in task, and config.yaml says so.
    assert input_sources(PPOConfig())["prompts_file"] == "built-in task"
    with pytest.raises(ValueError, match="--prompts-file is required with --pretrain-file"):
        ppo_sources(PPOConfig(pretrain_file=str(own_files["pretrain"])), logged.append)
    with pytest.raises(ValueError, match="--train-file is required with --valid-file"):
        sft_sources(SFTConfig(valid_file=str(own_files["demos"])), logged.append)


def test_saved_config_records_inputs_and_loads_back(tmp_path, own_files):
    from tether.config import PPOConfig, resolve, save_config

    cfg = PPOConfig(prompts_file=str(own_files["prompts"]), pretrain_file=str(own_files["pretrain"]))
    path = save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load(path.read_text())["inputs"] == {
        "prompts_file": str(own_files["prompts"]),
        "pretrain_file": str(own_files["pretrain"]),
    }
    assert resolve(PPOConfig, "ppo", yaml_path=str(path)) == cfg


def test_tether_run_with_own_files_needs_the_rest_and_records_none_from_the_built_in_task(own_files):
    from tether.config import RunConfig, input_sources
    from tether.data.sources import run_sources

    logged: list[str] = []
    with pytest.raises(ValueError, match="--demonstrations-file is required with --prompts-file"):
        run_sources(RunConfig(prompts_file=str(own_files["prompts"])), logged.append)
    own = {"prompts_file": str(own_files["prompts"]), "demonstrations_file": str(own_files["demos"])}
    with pytest.raises(ValueError, match="--pretrain-heldout-file is required"):
        run_sources(RunConfig(**own), logged.append)
    cfg = run_sources(RunConfig(**own, pretrain_heldout_file=str(own_files["pretrain"])), logged.append)
    assert (cfg.sft.pretrain_fraction, cfg.ppo.ptx_coef, cfg.run_ppo_baseline) == (0, 0, False)
    assert "no --pretrain-file" in logged[0]
    assert "built-in task" not in json.dumps(input_sources(cfg))
    assert input_sources(RunConfig())["prompts_file"] == "built-in task"


# --------------------------------------------------------------------------------------------
# 2. Conversations as prompts


def test_a_conversation_goes_through_the_chat_template_and_a_refused_system_turn_joins_the_first_user_turn(
    tiny_dir, tmp_path, caplog
):
    from transformers import AutoTokenizer

    from tether.models.generation import chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    conv = read_records(jsonl(tmp_path / "p.jsonl", [{"prompt": [SYSTEM, USER1, ASSISTANT1, USER2]}]), "prompt")[0].text
    expected = tokenizer.apply_chat_template(conv.messages(), tokenize=False, add_generation_prompt=True)
    assert chat_prompt(tokenizer, conv) == expected
    assert SYSTEM["content"] in expected and "Blue." in expected and expected.count("<|im_start|>user") == 2
    # A plain string stays one user turn.
    assert chat_prompt(tokenizer, "Hi") == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    # Gemma 2's and Mistral v0.1's templates raise on a system turn.
    refusing = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    tokenizer.chat_template = refusing + "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    with caplog.at_level("WARNING"):
        once, twice = chat_prompt(tokenizer, conv), chat_prompt(tokenizer, conv)
    assert (
        once
        == twice
        == (f"[user] {SYSTEM['content']}\n\nName a colour.\n[assistant] Blue.\n[user] Another one?\n[assistant]")
    )
    said = f"{tokenizer.name_or_path}: the chat template refuses a system turn; the system prompt joins the first"
    said += " user turn"
    assert [r.message for r in caplog.records].count(said) == 1
    # The families' own templates: Gemma 2's and Mistral v0.1's refuse a system turn, Llama-3's takes it.
    from tether.models.tiny_families import family_tokenizer

    joined = {"gemma": "<start_of_turn>user\n" + SYSTEM["content"] + "\n\nName a colour.", "mistral": "[INST] "}
    joined["mistral"] += SYSTEM["content"] + "\n\nName a colour. [/INST]"
    for family, head in joined.items():
        assert head in chat_prompt(family_tokenizer(family), conv), family
    assert "system<|end_header_id|>\n\n" + SYSTEM["content"] in chat_prompt(family_tokenizer("llama3"), conv)


def test_a_long_conversation_loses_its_oldest_whole_turns_never_the_system_prompt_or_the_last_user_turn():
    from tether.data.formats import Turn
    from tether.data.preprocess import fit_prompt, fit_prompts

    def turn(role: str, content: str) -> Turn:
        return Turn(role, content)

    system, last = turn("system", "S" * 10), turn("user", "last?")
    old = [turn("user", "u" * 30), turn("assistant", "a" * 30), turn("user", "v" * 5), turn("assistant", "b" * 5)]
    conv = Conversation([system, *old, last])
    count = len  # characters of the plain-text rendering stand in for tokens
    assert fit_prompt(conv, 1000, count) == (conv, 0)
    fitted, cut = fit_prompt(conv, 80, count)
    assert cut == 2 and fitted.turns == (system, *old[2:], last)  # the first user turn and its answer
    fitted, cut = fit_prompt(conv, 40, count)
    assert cut == 4 and fitted.turns == (system, last)
    assert fit_prompt(conv, 20, count) == (None, 4)  # the system prompt and the last turn alone are too long
    assert fit_prompt("x" * 50, 20, count) == (None, 0)  # a plain prompt is one last turn
    no_system, cut = fit_prompt(Conversation([*old, last]), 12, count)
    assert (no_system, cut) == ("last?", 4)  # one user turn left: plain text
    kept, fit = fit_prompts([conv, "short", "y" * 100], 80, count)
    assert kept == [fit_prompt(conv, 80, count)[0], "short"]
    assert (fit.prompts, fit.cut_prompts, fit.cut_turns, fit.dropped) == (3, 1, 2, 1)


def test_ppo_fits_own_prompts_to_max_prompt_length_and_records_the_counts(tmp_path, tiny_dir):
    from tether.config import PPOConfig
    from tether.ppo.cli import _fit_prompts

    long_history = [USER1, {"role": "assistant", "content": "word " * 400}]
    rows = [{"prompt": [SYSTEM, *long_history, USER2]}, {"prompt": "word " * 300}, {"prompt": "Short?"}]
    cfg = PPOConfig(prompts_file=str(jsonl(tmp_path / "p.jsonl", rows)), out_dir=str(tmp_path / "ppo"))
    cfg = dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, name_or_path=str(tiny_dir)))
    logged: list[str] = []
    fitted = _fit_prompts(cfg, logged.append)
    prompts = read_records(fitted.prompts_file, "prompt")
    assert [p.text.messages() if isinstance(p.text, Conversation) else p.text for p in prompts] == [
        [SYSTEM, USER2],
        "Short?",
    ]
    record = json.loads((tmp_path / "ppo" / "prompt_fit.json").read_text())
    assert record == {
        "prompts_file": cfg.prompts_file,
        "max_tokens": 256,
        "prompts": 3,
        "cut_prompts": 1,
        "cut_turns": 2,
        "dropped": 1,
    }
    assert "1 of 3 lost their 2 oldest turns" in logged[0] and "1 were dropped" in logged[0]


def test_conversations_sharing_a_system_prompt_are_not_duplicates(tmp_path):
    from tether.data.preprocess import dedup_by_prefix

    long_system = {"role": "system", "content": "You are a helpful assistant who answers every question. " * 3}
    rows = [{"prompt": [long_system, {"role": "user", "content": q}]} for q in ("Name a colour.", "Name a fruit.")]
    rows.append({"prompt": [long_system, {"role": "user", "content": "name a  COLOUR."}]})  # a duplicate
    kept, dropped = dedup_by_prefix(read_records(jsonl(tmp_path / "p.jsonl", rows), "prompt"))
    assert [p.text.turns[1].content for p in kept] == ["Name a colour.", "Name a fruit."]
    assert len(dropped) == 1 and dropped[0].prompt.text.turns[1].content == "name a  COLOUR."


def test_every_stage_that_encodes_a_long_conversation_keeps_its_system_prompt_and_last_turn(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    from tether.models.generation import encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    history = [USER1, {"role": "assistant", "content": "word " * 300}]
    conv = read_records(jsonl(tmp_path / "p.jsonl", [{"prompt": [SYSTEM, *history, USER2]}]), "prompt")[0].text
    ids, mask = encode_prompts(tokenizer, [conv, "short"], max_prompt_length=64)
    seen = tokenizer.decode(ids[0][mask[0].bool()])
    assert SYSTEM["content"] in seen and USER2["content"] in seen and "word" not in seen
    # Before: the last 64 tokens, which cut the system prompt and kept the old answer's words.
    plain = tokenizer(tokenizer.apply_chat_template(conv.messages(), tokenize=False, add_generation_prompt=True))
    assert SYSTEM["content"] not in tokenizer.decode(plain.input_ids[-64:])
