"""One user's way through tether with data of their own (issue: "Your own data"): a ``messages``
SFT file with a system prompt, a ``prompt``/``chosen``/``rejected`` file, a prompt file without
ids; sft -> sample -> label in the labeling app (rankings submitted, then its export) -> rm ->
ppo -> eval --human, on a tiny model. No stage takes an input from the built-in task."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest
import yaml
from argon2 import PasswordHasher

from tether.cli import main
from tether.data.formats import Conversation, read_records

pytest.importorskip("fastapi")

from tether.labeling.app import create_app  # noqa: E402
from tether.labeling.store import LabelStore  # noqa: E402

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in at most five words."}
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


async def _label_and_export(store: LabelStore, project: int, k: int) -> tuple[str, str]:
    """alice ranks every task of ``project`` (the first response shown best); admin exports it.
    Returns (the first task page's HTML, the export's JSONL)."""
    app = create_app(store)
    transport = httpx.ASGITransport(app=app)
    pages = []

    async def login(http: httpx.AsyncClient, user: str) -> str:
        page = await http.get("/login")
        token = CSRF.search(page.text).group(1)  # type: ignore[union-attr]
        r = await http.post("/login", data={"username": user, "password": "pw-pw-pw-pw", "csrf_token": token})
        assert r.status_code == 303, r.text
        return CSRF.search((await http.get(r.headers["location"])).text).group(1)  # type: ignore[union-attr]

    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        token = await login(http, "alice")
        while True:
            r = await http.post(f"/label/projects/{project}/next", data={"csrf_token": token})
            m = re.match(r"/label/tasks/(\d+)", r.headers["location"])
            if not m:
                break
            pages.append((await http.get(r.headers["location"])).text)
            form = {"csrf_token": token, "action": "submit"}
            for i in range(k):
                form |= {f"rank_{i}": str(i + 1), f"likert_{i}": str(6 - i)}
            assert (await http.post(f"/label/tasks/{m.group(1)}", data=form)).status_code == 303
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        await login(http, "admin")
        export = await http.get(f"/admin/projects/{project}/export")
        assert export.status_code == 200
    return pages[0], export.text


def test_a_user_with_their_own_files_goes_from_sft_to_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    # 1. The user's files, in the shapes they already have.
    sft_file = jsonl(
        tmp_path / "sft.jsonl",
        [
            {
                "messages": [
                    SYSTEM,
                    {"role": "user", "content": f"Name a {c} fruit."},
                    {"role": "assistant", "content": f"A {c} one."},
                ]
            }
            for c in COLOURS
        ],
    )
    prefs = jsonl(
        tmp_path / "prefs.jsonl",
        [{"prompt": f"Describe {c}.", "chosen": f"{c.title()} is a colour.", "rejected": "No."} for c in COLOURS],
    )
    prompts = jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": [SYSTEM, {"role": "user", "content": f"Name a {c} thing."}]} for c in COLOURS[:4]],
    )
    root, tiny = tmp_path / "runs", ["--preset", "tiny"]

    # 2. SFT on the conversations (the system prompt goes through the chat template).
    assert main(["sft", *tiny, "--train-file", str(sft_file), "--epochs", "1", "--out-dir", str(root / "sft")]) == 0
    sft = str(root / "sft" / "final")

    # 3. Sample K = 2 responses to the prompts without ids.
    samples = tmp_path / "samples.jsonl"
    argv = ["sample", "--policy", f"sft={sft}", "--prompts-file", str(prompts), "--k", "2"]
    assert main([*argv, "--max-new-tokens", "6", "--out-file", str(samples)]) == 0
    assert all(isinstance(s.prompt, Conversation) for s in read_records(samples, "sample"))

    # 4. Label them in the app: the labeler sees the system prompt; the export keeps the turns.
    store = LabelStore(
        f"sqlite:///{tmp_path / 'labels.db'}", hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    )
    store.add_user("admin", "pw-pw-pw-pw", "admin")
    store.add_user("alice", "pw-pw-pw-pw")
    project = store.create_project_from_file("colours", "ranking", samples)
    page, export = asyncio.run(_label_and_export(store, project, k=2))
    store.close()
    assert SYSTEM["content"] in page and 'class="turn turn-system"' in page
    labeled = jsonl(tmp_path / "labeled.jsonl", [json.loads(line) for line in export.splitlines()])
    ranked = read_records(labeled, "comparison")
    assert len(ranked) == 4 and all(c.prompt.messages()[0] == SYSTEM for c in ranked)
    # The user's pairs and the app's rankings, concatenated as they are: one comparisons file.
    comparisons = tmp_path / "comparisons.jsonl"
    comparisons.write_text(prefs.read_text() + labeled.read_text())

    # 5. RM: normalised on the SFT run's own demonstrations (no --demonstrations-file, no built-in task).
    argv = ["rm", *tiny, "--model.name-or-path", sft, "--train-file", str(comparisons), "--out-dir", str(root / "rm")]
    assert main(argv) == 0
    assert f"normalising on the SFT model's demonstrations {sft_file}" in capsys.readouterr().out.replace("\n", "")

    # 6. PPO on the user's prompts: no pretraining text of theirs, so plain PPO, said in the log.
    argv = ["ppo", *tiny, "--policy.name-or-path", sft, "--reward-model", str(root / "rm" / "final")]
    argv += ["--prompts-file", str(prompts), "--total-episodes", "8", "--out-dir", str(root / "ppo")]
    assert main(argv) == 0
    assert "ptx_coef" in capsys.readouterr().out

    # 7. Evaluate with the people's rankings; the simulated panel's figures are left out.
    argv = ["eval", *tiny, "--policy", f"sft={sft}", "--policy", f"ppo={root / 'ppo' / 'policy'}"]
    argv += ["--reward-model", str(root / "rm" / "final"), "--prompts-file", str(prompts), "--human", str(labeled)]
    assert main([*argv, "--sft-best-of", "0", "--out-dir", str(root / "eval")]) == 0
    out = capsys.readouterr().out
    assert "human win" in out and "RM score" in out and "expected win" not in out
    assert "rubric is written for the built-in task" in (root / "eval" / "report.html").read_text()

    # 8. Every stage's config.yaml names the source of each input: none is the built-in task.
    for stage in ("sft", "rm", "ppo", "eval"):
        inputs = yaml.safe_load((root / stage / "config.yaml").read_text())["inputs"]
        assert "built-in task" not in inputs.values(), (stage, inputs)
