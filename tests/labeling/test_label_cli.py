"""`tether label ...` from the shell: users, projects, export, progress; cheap imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from labeling_support import PASSWORD

from tether.cli import main
from tether.data.formats import read_records, write_records
from tether.labeling.store import LabelInput, LabelStore


def test_cli_module_imports_no_web_stack() -> None:
    code = (
        "import sys, tether.labeling.cli\n"
        "heavy = ('fastapi', 'starlette', 'sqlalchemy', 'uvicorn', 'jinja2', 'argon2')\n"
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_label_help_lists_the_app_commands(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["label", "--help"])
    text = capsys.readouterr().out
    for name in ("serve", "add-user", "create-project", "export", "progress"):
        assert name in text


def test_add_user_create_project_export(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("TETHER_PASSWORD", PASSWORD)
    assert main(["label", "add-user", "--db", db_url, "alice"]) == 0
    assert main(["label", "add-user", "--db", db_url, "root", "--role", "admin"]) == 0
    assert main(["label", "add-user", "--db", db_url, "alice"]) == 2  # taken
    samples = tmp_path / "samples.jsonl"
    rows = [{"prompt": f"p{i}", "responses": ["a", "b", "c"], "prompt_id": str(i)} for i in range(3)]
    write_records(samples, rows)
    assert main(["label", "create-project", "--db", db_url, "--samples", str(samples)]) == 0
    prompts = write_records(tmp_path / "prompts.jsonl", [{"id": "1", "text": "hi", "user_id": "u"}])
    args = ["label", "create-project", "--db", db_url, "--prompts", str(prompts), "--name", "w"]
    assert main(args + ["--overlap", "2"]) == 0

    store = LabelStore(db_url)
    alice = store.authenticate("alice", PASSWORD)
    assert alice is not None and alice.role == "labeler"
    pid = store.find_project("samples")
    task = store.next_task(alice.id, pid)
    store.submit_ranking(alice.id, task, LabelInput(ranking=[1, 2, 3], likert=[7, 4, 1]))
    store.close()

    out = tmp_path / "out" / "comparisons.jsonl"
    assert main(["label", "export", "--db", db_url, "--project", "samples", "--out", str(out)]) == 0
    (c,) = read_records(out, "comparison")
    assert c.labeler_id == "alice" and c.likert is not None
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["exported"] == 1 and summary["format"] == "comparison"
    assert main(["label", "progress", "--db", db_url]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 comparison records" in printed
    assert "samples" in printed and "1/3" in printed


def test_cli_errors_are_exit_code_2_not_tracebacks(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("TETHER_PASSWORD", raising=False)
    monkeypatch.setattr(sys, "stdin", open(__file__))  # noqa: SIM115 - not a terminal
    assert main(["label", "add-user", "--db", db_url, "bob"]) == 2
    assert "TETHER_PASSWORD" in capsys.readouterr().err
    sys.stdin.close()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "responses": ["one"]}) + "\n")
    assert main(["label", "create-project", "--db", db_url, "--samples", str(bad)]) == 2
    assert "bad.jsonl:1: field 'responses'" in capsys.readouterr().err
    out = tmp_path / "x.jsonl"
    assert main(["label", "export", "--db", db_url, "--project", "nope", "--out", str(out)]) == 2
    assert "no project" in capsys.readouterr().err
