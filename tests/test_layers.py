"""The stages' imports point one way: a stage's trainer never reaches into a later stage, the
evaluation never into a trainer. Read from the source (every import, function-level ones
included), followed transitively, so an edge cannot come back through a detour."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tether

SRC = Path(tether.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``module -> the tether modules it imports`` (``from a import b`` counts ``a.b`` when that
    is a module), for every module under src/tether."""
    paths = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            edges.update(t for t in targets if t in paths)
        graph[name] = edges - {name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in graph[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


GRAPH = import_graph()

# (modules, the modules none of them may import, followed through other modules or direct only, why)
FORBIDDEN = [
    # The SFT stage's library precedes the reward model: `tether sft` (sft/cli.py) builds the RM
    # scorer for the paper's checkpoint selection and passes it in.
    (
        ["tether.sft.train", "tether.sft.data", "tether.models.lm_batch"],
        ("tether.reward",),
        "transitive",
        "SFT precedes the reward model",
    ),
    # The RM trainer is told its held-out labelers by its caller; agreement lives below both
    # (tether.data.agreement), so the trainer reaches the simulated panel by no path.
    (["tether.reward.train"], ("tether.labelers",), "transitive", "the caller passes the held-out labeler ids"),
    # The labeling app's store and the simulated panel share agreement from below, not each other.
    (["tether.labeling.store"], ("tether.labelers",), "transitive", "agreement lives in tether.data"),
    # The evaluation measures trained models with the math and data code the trainers use, never
    # with a trainer (eval/cli.py, an entry point, may run the pipeline).
    (
        ["tether.eval.evaluate", "tether.eval.report"],
        ("tether.sft.train", "tether.reward.train", "tether.ppo.train"),
        "transitive",
        "eval uses ops / models.lm_batch / ppo.rollout, not a training loop",
    ),
    # The math is pure tensor functions.
    (
        ["tether.ops", "tether.ppo.loss", "tether.ppo.kl", "tether.ppo.advantages", "tether.reward.loss"],
        ("tether.models", "tether.data", "tether.sft", "tether.reward.train", "tether.ppo.train", "tether.label"),
        "transitive",
        "the math modules import no models, data or stages",
    ),
]


def test_the_graph_is_read():
    """The walker sees real edges (else every assertion below would pass vacuously)."""
    assert "tether.ops" in GRAPH["tether.models.lm_batch"]
    assert "tether.ppo.rollout" in GRAPH["tether.ppo.train"]
    assert "tether.reward.score" in GRAPH["tether.sft.cli"]  # a function-level import
    assert "tether.sft.train" in reachable(GRAPH, "tether.pipeline")
    assert "tether.data.agreement" in reachable(GRAPH, "tether.reward.train")  # through reward.evaluate


@pytest.mark.parametrize(("sources", "forbidden", "how", "why"), FORBIDDEN, ids=[r[3] for r in FORBIDDEN])
def test_forbidden_imports_are_absent(sources, forbidden, how, why):
    for source in sources:
        assert source in GRAPH, f"{source} is not a module of tether any more: update this test"
        imported = reachable(GRAPH, source) if how == "transitive" else GRAPH[source]
        bad = sorted(m for m in imported if m.startswith(tuple(forbidden)))
        assert not bad, f"{source} imports {bad} ({how}): {why}"


def test_every_function_fits_on_about_one_screen():
    """A trainer reads as the paper's steps with its set-up in named steps: no function in
    src/tether is over 150 lines (plumbing grows a function; a named step keeps it short)."""
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n_lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if n_lines > 150:
                    long.append(f"{path.relative_to(SRC.parent)}:{node.lineno} {node.name} ({n_lines} lines)")
    assert not long, long
