"""The README and the docs cannot drift from the code.

Every ``tether`` command in a fenced shell block (```bash, ```sh, ```console) of README.md or
docs/**/*.md is either run here, at tiny sizes, in the order the pages give them (README first,
then the pages in the order of mkdocs.yml's navigation) in one shared directory, with the files it
writes checked, or, where it needs a GPU, a cluster, a server or the whole demo, listed in HEAVY:
those have their flags parsed by the real parser and their command's ``--help`` run. A command in
neither list fails the first test, which names its page and line; so does a listed command no page
shows any more. The configuration reference page is compared with what its generator writes today.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tether.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^\s*```+\s*(\w*)")
SHELL = {"bash", "sh", "console", "shell"}
PLACEHOLDER = "..."  # `torchrun ... -m tether sft ...`: words a reader fills in, left out of the parse


@dataclass(frozen=True)
class Command:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the command's first line
    text: str  # what bash runs: the page's line as written, or its segment when the line chains several
    key: str  # what RUN, HEAVY and STEPS list: words joined by spaces, `.venv/bin/tether` as `tether`
    argv: tuple[str, ...]  # the arguments after `tether` / `-m tether`; () for another program
    tether: bool


def pages() -> list[Path]:
    """README.md, then the pages of mkdocs.yml's navigation in its order, then any other page."""
    nav_order: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, str):
            nav_order.append(node)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)

    walk(yaml.safe_load((ROOT / "mkdocs.yml").read_text()).get("nav", []))
    found = sorted(DOCS.rglob("*.md"))
    ordered = [DOCS / name for name in nav_order if (DOCS / name) in found]
    return [ROOT / "README.md", *ordered, *(p for p in found if p not in ordered)]


# In a block that is not a shell block (```text, plain ```), a line that starts like a tether
# command still counts: a command shown as text must parse too.
TEXT_COMMAND = re.compile(r"(\.venv/bin/)?tether\s|torchrun\s")


def shell_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command) for each command of the page's shell blocks (continuation lines
    joined, a console block's ``$ `` prompts only) and each tether command line of its other blocks."""
    out: list[tuple[int, str]] = []
    lang: str | None = None
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        fence = FENCE.match(raw)
        if fence:
            lang = None if lang is not None else fence.group(1).lower()
            continue
        if lang is None:
            continue
        line = raw.strip()
        if not pending:
            if lang == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            elif lang not in SHELL and not TEXT_COMMAND.match(line):
                continue
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def split_segments(line: str) -> list[list[str]]:
    """The simple commands of a line: words split at &&, ||, ;, | and comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segments: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            segments.append([])
        else:
            segments[-1].append(token)
    return [s for s in segments if s]


def is_assignment(word: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", word) is not None


def as_command(page: Path, number: int, line: str, words: list[str], whole_line: bool) -> Command:
    """The segment ``words`` of ``line`` as a command (tether's, or another program's)."""
    env = 0
    while env < len(words) and is_assignment(words[env]):
        env += 1
    body = words[env:]
    tether = bool(body) and (body[0] == "tether" or body[0].endswith("/tether"))
    m = body.index("-m") if "-m" in body[:-1] else -1
    if tether:
        argv, key_words = body[1:], ["tether", *body[1:]]
    elif m >= 0 and body[m + 1] == "tether":
        tether, argv, key_words = True, body[m + 2 :], body
    else:
        argv, key_words = [], body
    return Command(
        page=str(page.relative_to(ROOT)),
        line=number,
        text=line if whole_line else shlex.join(words),
        key=" ".join(key_words),
        argv=tuple(a for a in argv if a != PLACEHOLDER),
        tether=tether,
    )


def page_commands() -> list[Command]:
    """Every command of every page, tether's and others', in reading order."""
    out = []
    for page in pages():
        for number, line in shell_lines(page):
            segments = split_segments(line)
            out += [as_command(page, number, line, words, len(segments) == 1) for words in segments]
    return out


def docs_commands() -> list[Command]:
    return [c for c in page_commands() if c.tether]


def exported_env() -> dict[str, str]:
    """``export NAME=VALUE`` lines of the pages' shell blocks (e.g. the labeling app's admin password)."""
    env = {}
    for page in pages():
        for _, line in shell_lines(page):
            for words in split_segments(line):
                if words[0] == "export":
                    env.update(w.split("=", 1) for w in words[1:] if is_assignment(w))  # type: ignore[misc]
    return env


# --------------------------------------------------------------------------------------------
# The lists. RUN: command -> the files (relative to the shared directory) the page says it
# writes; they are run in the pages' order, each distinct command once. HEAVY: command -> why it
# is not run here.

RUN: dict[str, tuple[str, ...]] = {
    # README and the quickstart
    "tether run --preset tiny": (
        "runs/tiny/report/report.html",
        "runs/tiny/eval/eval.json",
        "runs/tiny/manifest.json",
        "runs/tiny/sft/final/config.json",
        "runs/tiny/round-1/rm/final/config.json",
        "runs/tiny/round-1/ppo_ptx/policy/config.json",
    ),
    "tether data validate prompts.jsonl demos.jsonl": (),
    # the stage pages, one after another
    "tether sft --preset tiny --train-file runs/tiny/data/demonstrations_train.jsonl --epochs 1 --out-dir runs/sft": (
        "runs/sft/final/config.json",
        "runs/sft/metrics.jsonl",
        "runs/sft/config.yaml",
    ),
    "tether sample --policy runs/sft/final --prompts-file runs/tiny/data/prompts_train.jsonl --limit 8 --k 4 "
    "--max-new-tokens 16 --out-file runs/samples.jsonl": ("runs/samples.jsonl",),
    "tether label simulate --samples-file runs/samples.jsonl --out-file runs/comparisons.jsonl "
    "--labelers-per-sample 2": ("runs/comparisons.jsonl",),
    "tether rm --preset tiny --model.name-or-path runs/sft/final --train-file runs/comparisons.jsonl "
    "--heldout-panel-labelers true --out-dir runs/rm": ("runs/rm/final/config.json", "runs/rm/eval.json"),
    "tether ppo --preset tiny --policy.name-or-path runs/sft/final --reward-model runs/rm/final "
    "--prompts-file runs/tiny/data/prompts_train.jsonl --pretrain-file runs/tiny/data/pretrain_train.jsonl "
    "--out-dir runs/ppo": ("runs/ppo/policy/config.json", "runs/ppo/value/config.json", "runs/ppo/metrics.jsonl"),
    "tether eval --preset tiny --policy sft=runs/sft/final --policy ppo_ptx=runs/ppo/policy --baseline sft "
    "--reward-model runs/rm/final --ref-policy runs/sft/final --prompts-file runs/tiny/data/prompts_test.jsonl "
    "--pretrain-file runs/tiny/data/pretrain_heldout.jsonl --simulated-labelers --out-dir runs/eval": (
        "runs/eval/eval.json",
        "runs/eval/report.html",
    ),
    # the labeling app's quick start (everything but the server)
    "tether label add-user alice": ("labeling.db",),
    "tether label create-project --samples-file samples.jsonl --overlap 3": (),
    "tether label create-project --prompts-file prompts.jsonl --name writing": (),
    "tether label progress": (),
    "tether label export --project samples --out-file data/comparisons.jsonl": ("data/comparisons.jsonl",),
    # your own model: a Llama-3-shaped tiny model through every stage
    "tether data default-task --out-dir runs/task": ("runs/task/demonstrations.jsonl", "runs/task/prompts.jsonl"),
    "tether sft --preset tiny --model.name-or-path tiny-llama3 --train-file runs/task/demonstrations.jsonl "
    "--epochs 1 --out-dir runs/llama3/sft": ("runs/llama3/sft/final/config.json",),
    "tether sample --policy runs/llama3/sft/final --prompts-file runs/task/prompts.jsonl --limit 16 --k 4 "
    "--max-new-tokens 16 --out-file runs/llama3/samples.jsonl": ("runs/llama3/samples.jsonl",),
    "tether label simulate --samples-file runs/llama3/samples.jsonl --out-file runs/llama3/comparisons.jsonl": (
        "runs/llama3/comparisons.jsonl",
    ),
    "tether rm --preset tiny --model.name-or-path runs/llama3/sft/final --train-file runs/llama3/comparisons.jsonl "
    "--out-dir runs/llama3/rm": ("runs/llama3/rm/final/config.json",),
    "tether ppo --preset tiny --policy.name-or-path runs/llama3/sft/final --reward-model runs/llama3/rm/final "
    "--prompts-file runs/task/prompts.jsonl --pretrain-file runs/task/pretrain_train.jsonl "
    "--out-dir runs/llama3/ppo": ("runs/llama3/ppo/policy/config.json",),
    "tether eval --preset tiny --policy sft=runs/llama3/sft/final --policy ppo=runs/llama3/ppo/policy "
    "--reward-model runs/llama3/rm/final --prompts-file runs/task/prompts.jsonl "
    "--pretrain-file runs/task/pretrain_heldout.jsonl --out-dir runs/llama3/eval": ("runs/llama3/eval/eval.json",),
    # your own model: a reward model of another tokenizer (the Llama-3-shaped RM, a ChatML policy)
    "tether ppo --preset tiny --policy.name-or-path tiny --reward-model runs/llama3/rm/final --prompts-file "
    "runs/task/prompts.jsonl --demonstrations-file runs/task/demonstrations.jsonl --total-episodes 8 "
    "--out-dir runs/own-rm/ppo": ("runs/own-rm/ppo/policy/config.json", "runs/own-rm/ppo/value/config.json"),
    "tether eval --preset tiny --policy sft=tiny --policy ppo=runs/own-rm/ppo/policy --reward-model "
    "runs/llama3/rm/final --prompts-file runs/task/prompts.jsonl --limit 8 --out-dir runs/own-rm/eval": (
        "runs/own-rm/eval/eval.json",
    ),
    # your own data: the user's files in the ecosystem's shapes (seed_files' my/) through every stage
    "tether data validate my/sft.jsonl my/prefs.jsonl my/prompts.jsonl": (),
    "tether sft --preset tiny --train-file my/sft.jsonl --epochs 1 --out-dir runs/my/sft": ("runs/my/sft/config.yaml",),
    "tether sample --policy runs/my/sft/final --prompts-file my/prompts.jsonl --k 2 --max-new-tokens 16 "
    "--out-file runs/my/samples.jsonl": ("runs/my/samples.jsonl",),
    "tether label create-project --samples-file runs/my/samples.jsonl --name my-samples": (),
    "tether label export --project my-samples --out-file runs/my/ranked.jsonl": ("runs/my/ranked.jsonl",),
    "tether data convert my/prefs.jsonl runs/my/ranked.jsonl runs/my/comparisons.jsonl": ("runs/my/comparisons.jsonl",),
    "tether rm --preset tiny --model.name-or-path runs/my/sft/final --train-file runs/my/comparisons.jsonl "
    "--out-dir runs/my/rm": ("runs/my/rm/final/config.json", "runs/my/rm/config.yaml"),
    "tether ppo --preset tiny --policy.name-or-path runs/my/sft/final --reward-model runs/my/rm/final "
    "--prompts-file my/prompts.jsonl --total-episodes 8 --out-dir runs/my/ppo": ("runs/my/ppo/policy/config.json",),
    "tether eval --preset tiny --policy sft=runs/my/sft/final --policy ppo=runs/my/ppo/policy --reward-model "
    "runs/my/rm/final --prompts-file my/prompts.jsonl --human my/human.jsonl --max-new-tokens 16 "
    "--out-dir runs/my/eval": ("runs/my/eval/eval.json", "runs/my/eval/config.yaml"),
}

# Other programs' lines the walk-through needs between tether commands (run as written, in order).
STEPS: set[str] = set()

GPU = "sized for a GPU or a cluster"
DEMO = "trains the embedded 135M model (tens of minutes on a CPU)"
HEAVY: dict[str, str] = {
    "tether run --preset demo": DEMO,
    "tether run --preset full": DEMO,
    "tether sft --preset demo --out-dir runs/sft-demo": DEMO,
    "tether sft --model.name-or-path my/hf-dir --train-file demos.jsonl --model.lora.enabled true": "a model of yours",
    "tether ppo --preset paper --policy.name-or-path runs/sft/final --reward-model runs/rm/final --ptx-coef 42 "
    "--kl-coef 0.02": GPU,
    "tether eval --run runs/demo --samples-per-prompt 4": "needs the finished demo",
    "tether run --preset demo --sft.model.name-or-path my/hf-model --prompts-file prompts.jsonl "
    "--demonstrations-file demos.jsonl --pretrain-file pretrain.jsonl --pretrain-heldout-file heldout.jsonl "
    "--out-dir runs/mine": "a model of yours, the demo's budget",
    "tether sft --preset demo --model.name-or-path my/hf-model --train-file demos.jsonl --out-dir runs/my-sft": (
        "a model of yours"
    ),
    "tether label serve --admin-user admin": "a server that runs until stopped",
    "tether sft --model.name-or-path meta-llama/Meta-Llama-3-8B-Instruct --model.dtype bfloat16 --train-file "
    "demos.jsonl --out-dir runs/l3/sft": "a model of yours",
    "tether rm --model.name-or-path runs/l3/sft/final --model.dtype bfloat16 --train-file comparisons.jsonl "
    "--out-dir runs/l3/rm": "a model of yours",
    "tether ppo --policy.name-or-path runs/l3/sft/final --policy.dtype bfloat16 --reward-model runs/l3/rm/final "
    "--prompts-file prompts.jsonl --out-dir runs/l3/ppo": "a model of yours",
    "tether eval --policy sft=runs/l3/sft/final --policy ppo=runs/l3/ppo/policy --reward-model runs/l3/rm/final "
    "--prompts-file heldout_prompts.jsonl --out-dir runs/l3/eval": "a model of yours",
    "tether ppo --policy.name-or-path runs/l3/sft/final --policy.dtype bfloat16 --reward-model my/reward-model "
    "--demonstrations-file demos.jsonl --prompts-file prompts.jsonl --out-dir runs/l3/ppo-my-rm": "a model of yours",
    # scaling out
    "torchrun --nproc-per-node 8 -m tether sft --preset paper --train-file demos.jsonl --out-dir runs/sft": GPU,
    "torchrun --nproc-per-node 8 -m tether rm --model.name-or-path runs/sft/final --train-file comparisons.jsonl": GPU,
    "torchrun --nproc-per-node 8 -m tether ppo --policy.name-or-path runs/sft/final --reward-model runs/rm/final": GPU,
    "torchrun --nproc-per-node 8 -m tether sft --model.parallel fsdp --train-file demos.jsonl": GPU,
    "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HEAD_HOST:29500 -m tether ppo "
    "--policy.name-or-path runs/sft/final --reward-model runs/rm/final": GPU,
    "tether run --preset demo --ray-address local --num-workers 2": "a Ray cluster and the demo",
    "tether run --preset demo --ray-address auto --num-workers 8": "a Ray cluster and the demo",
    "tether run --preset demo --ray-address HEAD_HOST:6379 --num-workers 8 --use-gpu": "a Ray cluster and the demo",
}


def seed_files(folder: Path) -> None:
    """The files the pages name as the reader's own (prompts.jsonl, demos.jsonl, samples.jsonl,
    comparisons.jsonl): a few valid records each."""
    topics = ["autumn", "the sea", "bread", "a bicycle", "rain", "a library", "tea", "a city"]
    prompts = [
        {"id": f"p{i}", "text": f"Write two sentences about {t}.", "user_id": f"u{i % 3}"} for i, t in enumerate(topics)
    ]
    demos = [
        {"prompt": p["text"], "response": f"Here are two sentences about {t}. They are short."}
        for p, t in zip(prompts, topics, strict=True)
    ]
    responses = ["A short answer.", "Another answer, longer than the first.", "A third one.", "No."]
    samples = [{"prompt": p["text"], "responses": responses, "prompt_id": p["id"]} for p in prompts[:4]]
    comparisons = [s | {"ranking": [2, 1, 3, 4], "labeler_id": "alice"} for s in samples]
    for name, rows in (
        ("prompts.jsonl", prompts),
        ("demos.jsonl", demos),
        ("samples.jsonl", samples),
        ("comparisons.jsonl", comparisons),
    ):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    seed_own_data(folder / "my")


def seed_own_data(folder: Path) -> None:
    """docs/your-own-data.md's files, in the ecosystem's shapes: conversations with a system prompt
    (messages), preference pairs (prompt/chosen/rejected), prompts without ids, and people's
    rankings of the two policies' answers."""
    folder.mkdir()
    system = {"role": "system", "content": "You are a terse assistant. Answer in at most five words."}
    fruit = {"red": "strawberry", "green": "lime", "blue": "blueberry", "yellow": "banana", "purple": "plum"}
    sft = [
        [system, {"role": "user", "content": f"Name a {c} fruit."}, {"role": "assistant", "content": f"A {f}."}]
        for c, f in fruit.items()
    ]
    asks = [[system, {"role": "user", "content": f"Name a {c} thing."}] for c in fruit]
    rows = {
        "sft.jsonl": [{"messages": m} for m in sft],
        "prefs.jsonl": [
            {"prompt": f"Describe {c}.", "chosen": f"The colour of a {f}.", "rejected": "No."} for c, f in fruit.items()
        ],
        "prompts.jsonl": [{"prompt": a} for a in asks],
        "human.jsonl": [
            {"prompt": a, "responses": ["A red car.", "No."], "ranking": [1, 2], "policies": ["ppo", "sft"]}
            for a in asks
        ],
    }
    for name, records in rows.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))


# --------------------------------------------------------------------------------------------
# Fast checks


def test_every_docs_command_is_run_or_listed_heavy() -> None:
    commands = docs_commands()
    unknown = [f"{c.page}:{c.line}: {c.key}" for c in commands if c.key not in RUN and c.key not in HEAVY]
    assert not unknown, (
        "commands in the docs that no test runs: add each to RUN in tests/test_docs.py (with the files the page "
        "says it writes) or, if it needs a GPU, a cluster or the demo, to HEAVY:\n" + "\n".join(unknown)
    )
    shown = {c.key for c in page_commands()}
    stale = [key for key in [*RUN, *HEAVY, *STEPS] if key not in shown]
    assert not stale, "listed in tests/test_docs.py but on no page any more:\n" + "\n".join(stale)
    assert not set(RUN) & set(HEAVY)


def test_docs_commands_parse(capsys: pytest.CaptureFixture[str]) -> None:
    """Every command's flags, run or heavy, parse with the real parser (a renamed flag fails here)."""
    parser = build_parser()
    for c in docs_commands():
        try:
            parser.parse_args(list(c.argv))
        except SystemExit as e:
            pytest.fail(f"{c.page}:{c.line}: `{c.key}` does not parse (exit {e.code}): {capsys.readouterr().err}")


def subcommand(argv: tuple[str, ...]) -> list[str]:
    """The command words of argv: ``label serve`` of ``label serve --admin-user admin``."""
    words = []
    for a in argv:
        if a.startswith("-"):
            break
        words.append(a)
    return words[:2] if words and words[0] in ("label", "data", "config") else words[:1]


def test_heavy_commands_help() -> None:
    """The --help of every command HEAVY lists runs (in a fresh process, as a reader would)."""
    tether = ROOT / ".venv" / "bin" / "tether"
    program = [str(tether)] if tether.exists() else [sys.executable, "-m", "tether"]
    for words in sorted({tuple(subcommand(c.argv)) for c in docs_commands() if c.key in HEAVY}):
        done = subprocess.run([*program, *words, "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage: tether" in done.stdout, (words, done.stderr[-2000:])


HEX = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
ISSUE = re.compile(r"(?i)\bissues? \d+|(?<![\w&])#\d+\b")


def test_no_commit_hashes_or_issue_numbers() -> None:
    bad = []
    for page in pages():
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for m in [*HEX.finditer(line), *ISSUE.finditer(line)]:
                bad.append(f"{page.relative_to(ROOT)}:{number}: {m.group(0)!r}")
    assert not bad, "the README and the docs name no commit hashes or issue numbers:\n" + "\n".join(bad)


def test_readme_is_a_door() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    # The first command installs and runs the demo; the second is CI's, exactly.
    blocks = shell_lines(ROOT / "README.md")
    assert blocks[0][1] == "bash scripts/setup.sh && .venv/bin/tether run --preset demo"
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert blocks[1][1] == ci
    # Its links to files in the repository resolve (mkdocs checks the docs' own links).
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme):
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_docs_build_is_strict(tmp_path: Path) -> None:
    """The test command's `mkdocs build`, exactly, fails on a broken link, a missing anchor and a page
    left out of the navigation (in a copy of the site)."""
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    build = next(s for s in split_segments(ci) if s[0].endswith("mkdocs"))
    site = tmp_path / "site"
    site.mkdir()
    (site / "mkdocs.yml").write_text((ROOT / "mkdocs.yml").read_text())
    (site / "docs").mkdir()
    nav_pages = [p for p in pages()[1:] if p.parent == DOCS]
    for page in nav_pages[:1]:
        (site / "docs" / page.name).write_text("# A page\n\n[gone](nowhere.md) [no anchor](index.md#nowhere)\n")
    (site / "docs" / "orphan.md").write_text("# Not in the navigation\n")
    command = [str(ROOT / ".venv" / "bin" / "mkdocs"), *build[1:], "-d", str(tmp_path / "out")]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(command, cwd=site, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0, done.stderr[-2000:]
    for message in ("nowhere.md", "#nowhere", "orphan.md"):
        assert message in done.stderr, (message, done.stderr[-2000:])


def test_configuration_reference_is_current() -> None:
    from tether.config_reference import COMMAND, render

    page = DOCS / "configuration.md"
    assert page.exists() and page.read_text() == render(), f"docs/configuration.md is stale: run `{COMMAND}`"


def test_configuration_reference_has_every_flag_of_help() -> None:
    """The page lists every config flag of each command's parser, with the help's docstring."""
    page = (DOCS / "configuration.md").read_text()
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for stage in ("sft", "rm", "ppo", "eval", "run"):
        for action in commands[stage]._actions:
            name = action.dest.removeprefix("cfg__")
            if action.dest == name or action.help == argparse.SUPPRESS:  # not a config field, or a former spelling
                continue
            if stage == "run" and name.split(".")[0] in ("sft", "rm", "ppo", "eval"):
                continue
            assert f"`--{name.replace('_', '-')}`" in page, (stage, name)
            doc = (action.help or "").rsplit(" (default", 1)[0].replace("%%", "%")
            assert " ".join(doc.split()).replace("|", "\\|").replace("<", "&lt;") in page, (stage, name, doc)


# --------------------------------------------------------------------------------------------
# The walk-through: every RUN command, in the pages' order, in one directory


@pytest.mark.long
@pytest.mark.timeout(1800)
def test_docs_commands_run(tmp_path: Path) -> None:
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    seed_files(tmp_path)
    env = {**os.environ, **exported_env()}
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    done: set[str] = set()
    for c in page_commands():
        if c.key in done or c.key not in (RUN if c.tether else STEPS):
            continue
        done.add(c.key)
        start = time.monotonic()
        result = subprocess.run(
            ["bash", "-c", c.text], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        where = f"{c.page}:{c.line}: `{c.text}`"
        assert result.returncode == 0, f"{where} exited {result.returncode}:\n{result.stderr[-3000:]}"
        cpu = sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f) for f in ("ru_utime", "ru_stime"))
        print(f"{time.monotonic() - start:6.1f} s  (CPU so far {cpu:.0f} s)  {c.key}")  # pytest -s: where time goes
        missing = [p for p in RUN.get(c.key, ()) if not (tmp_path / p).exists()]
        assert not missing, f"{where} did not write {missing}"
    assert done == set(RUN) | STEPS
