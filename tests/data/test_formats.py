"""Every validation error path names the file, the line and the field; good files round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tether.cli import main
from tether.data.formats import Comparison, DataError, read_records, validate_file, write_records

GOOD = {
    "prompt": {"id": "p1", "text": "Write a haiku.", "user_id": "u1", "category": "generation"},
    "demonstration": {"prompt": "Write a haiku.", "response": "Leaves fall."},
    "sample": {"prompt": "Hi", "responses": ["a", "b"], "policies": ["sft", "sft"]},
    "comparison": {
        "prompt": "Hi",
        "responses": ["a", "b", "c"],
        "ranking": [1, 2, 2],
        "labeler_id": "L1",
        "likert": [6, 3, 3],
        "flags": [{"fails_instruction": False}, {}, {"hallucination": True}],
    },
    "pretrain": {"text": "Some text."},
}


def write(tmp_path: Path, rows: list, name: str = "f.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


@pytest.mark.parametrize("kind", list(GOOD))
def test_good_records_roundtrip(tmp_path, kind):
    records = read_records(write(tmp_path, [GOOD[kind]] * 2), kind)
    assert len(records) == 2
    out = write_records(tmp_path / "out.jsonl", records)
    assert read_records(out, kind) == records


def bad(kind: str, **changes) -> dict:
    row = dict(GOOD[kind])
    for k, v in changes.items():
        if v is ...:
            row.pop(k)
        else:
            row[k] = v
    return row


CASES = [
    ("prompt", bad("prompt", id=[1]), "id", "must be a string"),
    ("prompt", bad("prompt", text=""), "text", "empty"),
    ("prompt", bad("prompt", user_id=True), "user_id", "must be a string"),
    ("demonstration", bad("demonstration", response=...), "response", "missing"),
    ("demonstration", bad("demonstration", prompt=3), "prompt", "must be a string"),
    ("sample", bad("sample", responses=["only one"]), "responses", "K=1"),
    ("sample", bad("sample", responses=["a", " "]), "responses[1]", "empty"),
    ("sample", bad("sample", policies=["x"]), "policies", "one entry per response"),
    ("comparison", bad("comparison", responses=["a"], ranking=[1], likert=..., flags=...), "responses", "K=1"),
    ("comparison", bad("comparison", responses=[f"r{i}" for i in range(10)]), "responses", "K=10"),
    ("comparison", bad("comparison", ranking=[1, 2]), "ranking", "one rank per response"),
    ("comparison", bad("comparison", ranking=[0, 1, 2]), "ranking", ">= 1"),
    ("comparison", bad("comparison", ranking=[1, 1, 1]), "ranking", "all responses tie"),
    ("comparison", bad("comparison", ranking=...), "ranking", "missing"),
    ("comparison", bad("comparison", labeler_id=""), "labeler_id", "empty"),
    ("comparison", bad("comparison", likert=[6, 3, 9]), "likert[2]", "1..7"),
    ("comparison", bad("comparison", flags=[{}, {"rude": True}, {}]), "flags[1].rude", "unknown flag"),
    (
        "comparison",
        bad("comparison", flags=[{}, {"hallucination": "yes"}, {}]),
        "flags[1].hallucination",
        "true or false",
    ),
    ("comparison", bad("comparison", responses=["a", "", "c"]), "responses[1]", "empty"),
    ("pretrain", {"text": None}, "text", "missing"),
]


@pytest.mark.parametrize("kind,row,field,message", CASES)
def test_bad_record_names_file_line_and_field(tmp_path, kind, row, field, message):
    path = write(tmp_path, [GOOD[kind], GOOD[kind], row])
    with pytest.raises(DataError) as info:
        read_records(path, kind)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), 3, field)
    assert message in err.message
    assert f"{path}:3:" in str(err)


def test_invalid_json_and_non_object(tmp_path):
    with pytest.raises(DataError, match=r":2: is not valid JSON"):
        read_records(write(tmp_path, [GOOD["pretrain"], "{not json"]), "pretrain")
    with pytest.raises(DataError, match=r":1: expected a JSON object"):
        read_records(write(tmp_path, ["[1, 2]"]), "pretrain")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        read_records(tmp_path / "empty.jsonl")


def test_kind_is_guessed_and_summarised(tmp_path):
    report = validate_file(write(tmp_path, [GOOD["comparison"]] * 3))
    assert report.kind == "comparison" and report.count == 3
    assert report.stats["pairs"] == 3 * 2  # ranks 1,2,2: two pairs (the tie gives none)


def test_ties_make_no_pairs():
    c = Comparison(prompt="p", responses=["a", "b", "c", "d"], ranking=[2, 1, 2, 3], labeler_id="L")
    assert sorted(c.pairs()) == [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]


def test_parquet_and_datasets_dir(tmp_path):
    import datasets

    rows = [GOOD["demonstration"], {"prompt": "Q", "response": "A", "labeler_id": "L2"}]
    ds = datasets.Dataset.from_list([{**r, "labeler_id": r.get("labeler_id")} for r in rows])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "d_dir"))
    for path in (tmp_path / "d.parquet", tmp_path / "d_dir"):
        records = read_records(path, "demonstration")
        assert [r.response for r in records] == ["Leaves fall.", "A"]
        assert records[1].labeler_id == "L2"
    broken = datasets.Dataset.from_list([{"prompt": "Q", "response": ""}])
    broken.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad.parquet:1: field 'response' is empty"):
        read_records(tmp_path / "bad.parquet", "demonstration")


def test_cli_validate_exit_codes(tmp_path, capsys):
    good = write(tmp_path, [GOOD["comparison"]], "good.jsonl")
    assert main(["data", "validate", str(good)]) == 0
    assert "1 comparison records" in capsys.readouterr().out
    broken = write(tmp_path, [GOOD["comparison"], bad("comparison", ranking=[1])], "broken.jsonl")
    assert main(["data", "validate", str(broken)]) == 2
    assert f"{broken}:2: field 'ranking'" in capsys.readouterr().err


def test_integer_ids_are_converted_and_booleans_are_not_ids(tmp_path):
    rows = [
        {"prompt": "Hi", "responses": ["a", "b"], "ranking": [1, 2], "labeler_id": 5, "prompt_id": 12},
        {"prompt": "Hi", "responses": ["a", "b"], "ranking": [2, 1], "labeler_id": "L", "policies": [1, "sft"]},
    ]
    first, second = read_records(write(tmp_path, rows), "comparison")
    assert (first.labeler_id, first.prompt_id, second.policies) == ("5", "12", ["1", "sft"])
    (prompt,) = read_records(write(tmp_path, [{"id": 7, "text": "t", "user_id": 3}]), "prompt")
    assert (prompt.id, prompt.user_id) == ("7", "3")
    for field_name, value in (("labeler_id", False), ("prompt_id", True)):
        row = {**rows[0], field_name: value}
        with pytest.raises(DataError, match=f":1: field '{field_name}' must be a string .*got a boolean"):
            read_records(write(tmp_path, [row]), "comparison")


def test_a_utf8_bom_and_windows_line_ends_are_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD["pretrain"]).encode() + b"\r\n" + b'{"text": "b"}\r\n')
    assert [r.text for r in read_records(path, "pretrain")] == ["Some text.", "b"]
