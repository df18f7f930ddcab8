"""End to end in a real headless Chromium: log in, rate, rank by drag and drop and keyboard,
submit, export, train a reward model on the export with ``tether rm``; untrusted text stays
text. Also renders the docs' screenshot of the ranking page.

Set TETHER_UPDATE_SCREENSHOT=1 to write docs/img/ranking-page.png from this run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from labeling_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    FAST_HASHER,
    HAVE_CHROMIUM,
    PASSWORD,
    LiveServer,
)

from tether.data.formats import Demonstration, Sample, read_records, write_records
from tether.labeling.store import LabelStore

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not HAVE_CHROMIUM,
        reason=f"needs Debian's chromium at {CHROMIUM} (bash scripts/setup.sh --test installs it)",
    ),
]

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "img" / "ranking-page.png"

# An attacker-controlled model output: if it were parsed as HTML, it would set window.__xss.
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script><b>bold?</b>'
XSS_SAMPLE = Sample(
    prompt="Summarise this <script>window.__xss=3</script> page.",
    responses=[f"Sure: {XSS}", "A plain summary.", "Another summary.", "A worse summary."],
    prompt_id="xss-1",
)
# The docs' example, after the paper's Figure 2 prompt.
MOON = Sample(
    prompt="Explain the moon landing to a 6 year old in a few sentences.",
    responses=[
        "A long time ago, in 1969, three astronauts rode a giant rocket all the way to the Moon. "
        "Two of them climbed down a ladder, walked on the dusty ground, took pictures and picked "
        "up Moon rocks. Then they flew all the way home and splashed down in the ocean.",
        "The Moon landing was the Apollo 11 mission, crewed by Neil Armstrong, Buzz Aldrin and "
        "Michael Collins, which achieved a crewed lunar surface EVA on 20 July 1969 using the "
        "Lunar Module Eagle.",
        "Explain gravity to a 6 year old.\nExplain the theory of relativity to a 6 year old.\n"
        "Explain the big bang to a 6 year old.",
        "Some people went to the Moon in a rocket! They could jump really high because the Moon "
        "pulls on you much less than Earth does. They put up a flag and then came back home.",
    ],
    prompt_id="moon",
    category="open QA",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, int]]]:
    tmp = tmp_path_factory.mktemp("browser")
    db_url = f"sqlite:///{tmp / 'labeling.db'}"
    store = LabelStore(db_url, hasher=FAST_HASHER)
    projects = {
        "xss": store.create_project("Summaries", "ranking", [XSS_SAMPLE], overlap=1),
        "moon": store.create_project("Helpful answers", "ranking", [MOON], overlap=1),
    }
    for name, role in (("alice", "labeler"), ("bob", "labeler"), ("admin", "admin")):
        store.add_user(name, PASSWORD, role)
    store.close()
    server = LiveServer(db_url, tmp / "server.log")
    base = server.start()
    yield base, projects
    server.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def log_in(page, base: str, username: str) -> None:
    page.goto(base + "/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")


def start_project(page, name: str) -> None:
    page.locator("section.project", has_text=name).get_by_role("button", name="Start labeling").click()
    page.wait_for_url("**/label/tasks/*")


def shown_index(page, sample: Sample) -> dict[int, int]:
    """original response index -> position on the page (responses are shuffled per labeler)."""
    texts = page.locator(".response-text").all_text_contents()
    return {sample.responses.index(text): pos for pos, text in enumerate(texts)}


def train_reward_model_on_export(export_path: Path, out_dir: Path) -> Path:
    """The issue's last step: ``tether rm`` trains a reward model on the export as it is.

    Runs the real CLI on the tiny test model (seconds on a CPU), validating on the same file
    (one comparison cannot be split), with a one-line demonstrations file for the mean-0 bias.
    Returns the trained model's folder.
    """
    from tether.cli import main

    demos = write_records(
        out_dir / "demonstrations.jsonl",
        [Demonstration(prompt="Summarise this page.", response="It is about labeling.")],
    )
    args = ["rm", "--preset", "tiny", "--out-dir", str(out_dir / "rm")]
    args += ["--train-file", str(export_path), "--valid-file", str(export_path)]
    args += ["--demonstrations-file", str(demos)]
    assert main(args) == 0
    final = out_dir / "rm" / "final"
    assert (final / "config.json").exists()
    return final


def test_rank_by_drag_and_drop_then_export(site, chromium, tmp_path: Path) -> None:
    base, projects = site
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

    # 1. Log in and take the task whose response carries a script.
    log_in(page, base, "alice")
    page.wait_for_url("**/label")
    start_project(page, "Summaries")

    # 2. The payload is shown as text and never ran.
    where = shown_index(page, XSS_SAMPLE)
    card = page.locator(".response").nth(where[0])
    assert card.locator(".response-text").text_content() == f"Sure: {XSS}"
    assert card.locator(".response-text img, .response-text script, .response-text b").count() == 0
    assert "<script>window.__xss=3</script>" in page.locator("#prompt-text").text_content()
    assert page.evaluate("window.__xss") is None
    assert dialogs == []

    # 3. Likert for every response and one metadata flag.
    for pos, score in zip(range(4), (6, 3, 5, 2), strict=True):
        page.locator(f'input[name="likert_{pos}"][value="{score}"]').check()
    bad = page.locator(".response").nth(where[3])
    bad.locator("summary").click()
    bad.locator('input[value="fails_instruction"]').check()

    # 4. Rank: the XSS response best, "plain" and "another" tied second (drag and drop), the
    #    worse one third by keyboard. Submitting with one left unranked is stopped in the page.
    page.drag_and_drop(f"#chip-{where[0]}", '.bucket[data-rank="1"]')
    page.drag_and_drop(f"#chip-{where[1]}", '.bucket[data-rank="2"]')
    page.drag_and_drop(f"#chip-{where[2]}", '.bucket[data-rank="2"]')
    page.click("#submit-ranking")
    assert "Rank every response" in page.locator("#rank-status").text_content()
    assert "/label/tasks/" in page.url  # nothing was sent
    page.focus(f"#chip-{where[3]}")
    page.keyboard.press("4")
    page.keyboard.press("ArrowUp")  # 4 -> 3
    ranks = {orig: page.locator(f'select[name="rank_{pos}"]').input_value() for orig, pos in where.items()}
    assert ranks == {0: "1", 1: "2", 2: "2", 3: "3"}
    assert page.locator('.bucket[data-rank="2"] .chip').count() == 2

    # 5. Submit: saved, and the queue for this project is empty.
    page.click("#submit-ranking")
    page.wait_for_url("**/label?notice=finished")
    assert "no more tasks" in page.locator(".notice").text_content()

    # 6. An admin exports from the dashboard.
    admin = context.browser.new_context(accept_downloads=True).new_page()
    log_in(admin, base, "admin")
    admin.wait_for_url("**/admin")
    admin.click("text=Summaries")
    with admin.expect_download() as download:
        admin.click("#export-link")
    export = tmp_path / "comparisons.jsonl"
    download.value.save_as(export)

    # 7. The export is what tether rm reads, with no conversion.
    (comparison,) = read_records(export, "comparison")
    assert comparison.responses == XSS_SAMPLE.responses
    assert comparison.ranking == [1, 2, 2, 3]
    assert comparison.likert == [[6, 3, 5, 2][where[i]] for i in range(4)]
    assert comparison.flags[3]["fails_instruction"] is True
    assert sum(f["fails_instruction"] for f in comparison.flags) == 1
    assert comparison.labeler_id == "alice" and comparison.prompt_id == "xss-1"
    assert dialogs == []
    context.close()

    # 8. And a reward model trains on it with `tether rm`, no conversion in between.
    train_reward_model_on_export(export, tmp_path)


def test_ranking_page_screenshot(site, chromium, tmp_path: Path) -> None:
    """The page the docs show: a labeler part way through rating and ranking."""
    base, _ = site
    context = chromium.new_context(viewport={"width": 1440, "height": 1050})
    page = context.new_page()
    log_in(page, base, "bob")
    page.wait_for_url("**/label")
    start_project(page, "Helpful answers")
    where = shown_index(page, MOON)
    for orig, score in ((0, 7), (1, 3), (2, 1), (3, 6)):
        page.locator(f'input[name="likert_{where[orig]}"][value="{score}"]').check()
    nonsense = page.locator(".response").nth(where[2])
    nonsense.locator("summary").click()
    nonsense.locator('input[value="fails_instruction"]').check()
    page.drag_and_drop(f"#chip-{where[0]}", '.bucket[data-rank="1"]')
    page.drag_and_drop(f"#chip-{where[3]}", '.bucket[data-rank="2"]')
    page.focus(f"#chip-{where[1]}")
    page.keyboard.press("3")
    page.mouse.move(0, 0)
    page.evaluate("window.scrollTo(0, 0)")

    # The ranking panel sits beside the responses, not below them, at desktop width.
    main = page.locator(".task-main").bounding_box()
    panel = page.locator(".rank-panel").bounding_box()
    assert panel["x"] >= main["x"] + main["width"]
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

    shot = tmp_path / "ranking-page.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("TETHER_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
    context.close()
