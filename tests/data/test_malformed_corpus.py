"""The malformed-files corpus (tests/data/malformed/, one file per class of bad input) through
``tether data validate`` and through every command that reads that kind of file: each one exits 2
with one line, ``error: FILE:LINE: field 'X' ...`` (or ``FILE: ...`` where no line applies), and
never a traceback (the commands run in-process, so any uncaught exception fails the test).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tether.cli import main

CORPUS = Path(__file__).parent / "malformed"

# File → (the kind it is read as, or None for "any kind": the file fails before its records are
# read; what the error says after the file name).
EXPECTED: dict[str, tuple[str | None, str]] = {
    "latin1.jsonl": (None, ":2: is not UTF-8 text (byte 0xe9 at byte 16 of the line)"),
    "utf16_bom.jsonl": (None, ": is UTF-16 (little-endian) text; tether reads JSONL as UTF-8"),
    "utf16_no_bom.jsonl": (None, ":1: holds NUL bytes"),
    "stray_0xff.jsonl": (None, ":3: is not UTF-8 text (byte 0xff at byte 14 of the line)"),
    "gzip.jsonl": (None, ": is gzip-compressed"),
    "deep_nesting.jsonl": (None, ":2: nests arrays or objects too deeply to be read"),
    "huge_int.jsonl": (None, ":2: field 'meta.n' is a 5000-digit integer; at most 4300 digits are read"),
    "invalid_json.jsonl": (None, ":2: is not valid JSON (Unterminated string starting at column 12)"),
    "not_an_object.jsonl": (None, ":1: expected a JSON object, got an array"),
    "no_records.jsonl": (None, ": holds no records"),
    "broken.parquet": (None, ": is not a readable Parquet file"),
    "prompt_id_boolean.jsonl": ("prompt", ":2: field 'id' must be a string (or an integer), got a boolean"),
    "prompt_id_empty.jsonl": ("prompt", ":2: field 'id' is empty"),
    "prompt_id_float.jsonl": ("prompt", ":2: field 'id' must be a string (or an integer), got a number"),
    "prompt_user_id_object.jsonl": ("prompt", ":2: field 'user_id' must be a string (or an integer), got an object"),
    "prompt_text_missing.jsonl": ("prompt", ":2: field 'text' is missing"),
    "prompt_lone_surrogate.jsonl": ("prompt", ":2: field 'text' holds an unpaired surrogate (\\ud800)"),
    "demonstration_labeler_id_object.jsonl": ("demonstration", ":2: field 'labeler_id' must be a string (or an "),
    "demonstration_labeler_id_empty.jsonl": ("demonstration", ":2: field 'labeler_id' is empty"),
    "demonstration_response_number.jsonl": ("demonstration", ":2: field 'response' must be a string, got a number"),
    "demonstration_response_missing.jsonl": ("demonstration", ":2: field 'response' is missing"),
    "sample_policies_objects.jsonl": ("sample", ":2: field 'policies[0]' must be a string (or an integer), got an obj"),
    "sample_one_response.jsonl": ("sample", ":2: field 'responses' has K=1; K must be 2..9"),
    "comparison_labeler_id_object.jsonl": ("comparison", ":2: field 'labeler_id' must be a string (or an integer)"),
    "comparison_labeler_id_empty.jsonl": ("comparison", ":2: field 'labeler_id' is empty"),
    "comparison_ranking_booleans.jsonl": ("comparison", ":2: field 'ranking' ranks must be integers >= 1"),
    "comparison_ranking_huge_int.jsonl": ("comparison", ":2: field 'ranking[1]' is a 5000-digit integer"),
    "comparison_ranking_all_tied.jsonl": ("comparison", ":2: field 'ranking' all responses tie"),
    "comparison_likert_out_of_range.jsonl": ("comparison", ":2: field 'likert[1]' must be an integer 1..7"),
    "comparison_unknown_flag.jsonl": ("comparison", ":2: field 'flags[1].rude' unknown flag"),
    "comparison_policies_objects.jsonl": ("comparison", ":2: field 'policies[1]' must be a string (or an integer)"),
    "comparison_ten_responses.jsonl": ("comparison", ":2: field 'responses' has K=10; K must be 2..9"),
    "pretrain_text_number.jsonl": ("pretrain", ":2: field 'text' must be a string, got a number"),
    "pretrain_text_empty.jsonl": ("pretrain", ":2: field 'text' is empty"),
}

GOOD = {
    "prompt": {"id": "p1", "text": "Write a haiku.", "user_id": "u1"},
    "demonstration": {"prompt": "Write a haiku.", "response": "Leaves fall."},
}


def commands(kind: str | None, bad: Path, tmp: Path) -> list[list[str]]:
    """Every command that reads ``bad`` as ``kind`` (any kind: the main file of each)."""
    out = ["--out-dir", str(tmp / "run")]
    by_kind = {
        "demonstration": [["sft", "--preset", "tiny", "--train-file", str(bad), *out]],
        "comparison": [["rm", "--preset", "tiny", "--train-file", str(bad), *out]],
        "prompt": [["ppo", "--preset", "tiny", "--prompts-file", str(bad), *out]],
        "sample": [["label", "simulate", "--samples", str(bad), "--out", str(tmp / "c.jsonl")]],
    }
    if kind == "pretrain":
        # Good main files, so the pretraining text is the one that is wrong.
        demos, prompts = tmp / "demos.jsonl", tmp / "prompts.jsonl"
        demos.write_text(json.dumps(GOOD["demonstration"]) + "\n")
        prompts.write_text(json.dumps(GOOD["prompt"]) + "\n")
        return [
            ["sft", "--preset", "tiny", "--train-file", str(demos), "--pretrain-fraction", "0.1"]
            + ["--pretrain-file", str(bad), *out],
            ["ppo", "--preset", "tiny", "--prompts-file", str(prompts), "--pretrain-file", str(bad), *out],
        ]
    if kind is None:
        return [cmd for name in ("demonstration", "comparison", "prompt") for cmd in by_kind[name]]
    return by_kind[kind]


def test_the_corpus_has_one_file_per_listed_class() -> None:
    assert sorted(p.name for p in CORPUS.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_malformed_file_is_one_clear_error_everywhere(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kind, message = EXPECTED[name]
    bad = CORPUS / name
    validate = ["data", "validate", str(bad)] + (["--kind", kind] if kind else [])
    for argv in [validate, *commands(kind, bad, tmp_path)]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"error: {bad}{message}"), (argv, err)
        assert err.count("\n") == 1, (argv, err)
        assert not (tmp_path / "run" / "state").exists()  # nothing trained


def test_the_installed_command_exits_2_without_a_traceback() -> None:
    bad = CORPUS / "deep_nesting.jsonl"
    r = subprocess.run(
        [sys.executable, "-m", "tether.cli", "data", "validate", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2
    assert r.stderr == f"error: {bad}:2: nests arrays or objects too deeply to be read\n"


def test_the_pipeline_checks_every_input_file_before_training(tmp_path: Path, capsys) -> None:
    """``tether run --comparisons-file`` is used in round 1, after SFT and sampling: a bad file
    must stop the run in its data stage, not hours later."""
    bad = CORPUS / "comparison_ranking_huge_int.jsonl"
    argv = ["run", "--preset", "tiny", "--comparisons-file", str(bad), "--out-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    assert (
        capsys.readouterr().err
        == f"error: {bad}:2: field 'ranking[1]' is a 5000-digit integer; at most 4300 digits are read\n"
    )
    assert not (tmp_path / "run" / "sft").exists()
