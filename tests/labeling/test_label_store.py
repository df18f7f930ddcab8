"""The labeling store: queue rules, exactly-once labels, export contracts, agreement."""

from __future__ import annotations

import itertools
import random
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from labeling_support import FAST_HASHER, PASSWORD, Clock, make_prompts, make_samples
from sqlalchemy import select

from tether.data.agreement import agreement_of
from tether.data.formats import FLAGS, Sample, read_records, write_records
from tether.labeling.store import (
    AlreadyDone,
    Conflict,
    InvalidInput,
    LabelInput,
    LabelStore,
    NotAssigned,
    NotFound,
    Task,
    dense_ranking,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, db_url: str, clock: Clock) -> Iterator[LabelStore]:
    """Every store test runs on SQLite and, where it is installed, on PostgreSQL."""
    url = db_url if request.param == "sqlite" else request.getfixturevalue("pg_url")
    s = LabelStore(url, hasher=FAST_HASHER, now=clock)
    yield s
    s.close()


def labelers(store: LabelStore, n: int) -> list[int]:
    return [store.add_user(f"lab{i}", PASSWORD).id for i in range(n)]


def rank_all(k: int) -> LabelInput:
    return LabelInput(ranking=list(range(1, k + 1)), likert=[4] * k, flags=[[] for _ in range(k)])


def label_count(store: LabelStore, project_id: int) -> Counter:
    """(task prompt, labeler) -> number of exported comparisons."""
    return Counter((c.prompt, c.labeler_id) for c in store.export(project_id).records)


# ---------------------------------------------------------------------------------------------
# The queue


def test_queue_never_repeats_a_task_and_never_overfills(store: LabelStore) -> None:
    pid = store.create_project("p", "ranking", make_samples(3), overlap=2)
    a, b, c = labelers(store, 3)
    for labeler in (a, b):
        seen = []
        while (task := store.next_task(labeler, pid)) is not None:
            assert task not in seen, "a labeler was handed the same task twice"
            seen.append(task)
            store.submit_ranking(labeler, task, rank_all(4))
        assert len(seen) == 3
    # Every task now holds overlap=2 labels: the third labeler gets nothing.
    assert store.next_task(c, pid) is None
    progress = store.progress(pid)[0]
    assert (progress.done, progress.slots, progress.complete_tasks) == (6, 6, 3)


def test_open_assignment_is_resumed_not_duplicated(store: LabelStore) -> None:
    pid = store.create_project("p", "ranking", make_samples(3), overlap=1)
    (a,) = labelers(store, 1)
    first = store.next_task(a, pid)
    assert store.next_task(a, pid) == first
    assert store.progress(pid)[0].in_progress == 1


def test_started_tasks_are_completed_first(store: LabelStore) -> None:
    """With overlap, the queue fills a task others have started before opening a new one."""
    pid = store.create_project("p", "ranking", make_samples(5), overlap=3)
    a, b = labelers(store, 2)
    t = store.next_task(a, pid)
    assert store.next_task(b, pid) == t


def test_responses_are_shown_in_a_random_order_per_labeler(store: LabelStore) -> None:
    sample = Sample(prompt="p", responses=[f"r{i}" for i in range(9)])
    pid = store.create_project("p", "ranking", [sample], overlap=20)
    orders = set()
    for labeler in labelers(store, 8):
        view = store.task_view(labeler, store.next_task(labeler, pid))
        assert sorted(view.responses) == sorted(sample.responses)
        orders.add(tuple(view.responses))
    # 8 shuffles of 9 items: all equal has probability (1/9!)^7.
    assert len(orders) > 1


def test_ranking_is_stored_in_the_original_response_order(store: LabelStore) -> None:
    sample = Sample(prompt="p", responses=["zero", "one", "two", "three"], policies=list("abcd"))
    pid = store.create_project("p", "ranking", [sample], overlap=1)
    (a,) = labelers(store, 1)
    task = store.next_task(a, pid)
    shown = store.task_view(a, task).responses
    # The labeler ranks by the text they see: "two" best, then "zero", then a tie.
    wanted = {"two": 1, "zero": 2, "one": 3, "three": 3}
    flags = [["hallucination"] if text == "one" else [] for text in shown]
    likert = [7 if text == "two" else 3 for text in shown]
    store.submit_ranking(a, task, LabelInput(ranking=[wanted[t] for t in shown], likert=likert, flags=flags))
    (c,) = store.export(pid).records
    assert c.responses == ["zero", "one", "two", "three"]
    assert c.ranking == [2, 3, 1, 3]
    assert c.likert == [3, 3, 7, 3]
    assert c.flags[1]["hallucination"] is True
    assert sum(f["hallucination"] for f in c.flags) == 1
    assert set(c.flags[0]) == set(FLAGS)
    assert c.policies == list("abcd")
    assert c.pairs() == [(0, 1), (0, 3), (2, 0), (2, 1), (2, 3)]


def test_duplicate_submission_is_refused_and_stored_once(store: LabelStore) -> None:
    pid = store.create_project("p", "ranking", make_samples(2), overlap=1)
    (a,) = labelers(store, 1)
    task = store.next_task(a, pid)
    store.submit_ranking(a, task, rank_all(4))
    with pytest.raises(AlreadyDone):
        store.submit_ranking(a, task, rank_all(4))
    with pytest.raises(AlreadyDone):
        store.submit_none_acceptable(a, task)
    with pytest.raises(AlreadyDone):
        store.skip(a, task)
    assert sum(label_count(store, pid).values()) == 1


def test_wrong_task_is_refused(store: LabelStore) -> None:
    pid = store.create_project("p", "ranking", make_samples(2), overlap=1)
    a, b = labelers(store, 2)
    task = store.next_task(a, pid)
    with pytest.raises(NotAssigned):
        store.submit_ranking(b, task, rank_all(4))
    with pytest.raises(NotAssigned):
        store.task_view(b, task)
    with pytest.raises(NotFound):
        store.submit_ranking(a, 999, rank_all(4))


def test_skip_frees_the_slot_and_is_never_offered_again(store: LabelStore) -> None:
    pid = store.create_project("p", "ranking", make_samples(1), overlap=1)
    a, b = labelers(store, 2)
    task = store.next_task(a, pid)
    store.skip(a, task)
    assert store.next_task(a, pid) is None
    assert store.next_task(b, pid) == task
    assert store.progress(pid)[0].skipped == 1


def test_lapsed_lease_goes_back_to_the_queue(store: LabelStore, clock: Clock) -> None:
    pid = store.create_project("p", "ranking", make_samples(1), overlap=1)
    a, b = labelers(store, 2)
    task = store.next_task(a, pid)
    assert store.next_task(b, pid) is None  # a holds the only slot
    clock.advance(seconds=store.lease.total_seconds() + 1)
    assert store.next_task(b, pid) == task
    store.submit_ranking(b, task, rank_all(4))
    # a comes back late: the task is full, and a is told why rather than silently dropped.
    with pytest.raises(Conflict, match="expired"):
        store.submit_ranking(a, task, rank_all(4))
    assert sum(label_count(store, pid).values()) == 1


def test_late_submission_is_kept_when_a_slot_is_free(store: LabelStore, clock: Clock) -> None:
    pid = store.create_project("p", "ranking", make_samples(1), overlap=2)
    a, b = labelers(store, 2)
    task = store.next_task(a, pid)
    clock.advance(hours=3)
    assert store.next_task(b, pid) == task  # reclaims a's lapsed slot on the way
    store.submit_ranking(a, task, rank_all(4))
    store.submit_ranking(b, task, rank_all(4))
    assert store.progress(pid)[0].done == 2


def test_none_acceptable_and_all_tie_are_recorded_but_not_exported(store: LabelStore) -> None:
    pid = store.create_project("p", "ranking", make_samples(3), overlap=1)
    (a,) = labelers(store, 1)
    (t1,) = [store.next_task(a, pid)]
    store.submit_none_acceptable(a, t1, LabelInput(likert=[1, 2, 1, 1]))
    t2 = store.next_task(a, pid)
    store.submit_ranking(a, t2, LabelInput(ranking=[2, 2, 2, 2], likert=[4] * 4))
    t3 = store.next_task(a, pid)
    store.submit_ranking(a, t3, rank_all(4))
    result = store.export(pid)
    assert len(result.records) == 1
    assert result.summary["excluded_all_tie"] == 1
    assert result.summary["none_acceptable"] == 1
    assert store.progress(pid)[0].done == 3  # both still fill their slot


def test_export_is_read_back_by_the_data_contract(store: LabelStore, tmp_path: Path) -> None:
    pid = store.create_project("p", "ranking", make_samples(4, k=5), overlap=2)
    rng = random.Random(0)
    for labeler in labelers(store, 2):
        while (task := store.next_task(labeler, pid)) is not None:
            ranks = [rng.randint(1, 3) for _ in range(4)] + [5]
            flags = [[rng.choice(FLAGS)] for _ in range(5)]
            store.submit_ranking(labeler, task, LabelInput(ranking=ranks, likert=[5] * 5, flags=flags))
    result = store.export(pid)
    path = write_records(tmp_path / "comparisons.jsonl", result.records)
    back = read_records(path, "comparison")
    assert back == result.records
    assert len(back) == 8
    assert all(sorted(set(c.ranking)) == list(range(1, len(set(c.ranking)) + 1)) for c in back)


def test_demonstration_project_exports_demonstrations(store: LabelStore, tmp_path: Path) -> None:
    pid = store.create_project("d", "demonstration", make_prompts(2), overlap=1)
    (a,) = labelers(store, 1)
    task = store.next_task(a, pid)
    with pytest.raises(InvalidInput) as e:
        store.submit_demonstration(a, task, "   ")
    assert e.value.field == "response"
    with pytest.raises(InvalidInput):
        store.submit_ranking(a, task, rank_all(4))
    store.submit_demonstration(a, task, "Here is how it works: ...")
    path = write_records(tmp_path / "demos.jsonl", store.export(pid).records)
    (demo,) = read_records(path, "demonstration")
    assert demo.response == "Here is how it works: ..."
    assert demo.prompt_id == "q0" and demo.labeler_id == "lab0"


@pytest.mark.parametrize(
    ("label", "field"),
    [
        (LabelInput(ranking=[1, 2, 3]), "ranking"),
        (LabelInput(ranking=[1, 2, 3, 4, 5]), "ranking"),
        (LabelInput(ranking=[1, 2, 3, 9]), "ranking[3]"),
        (LabelInput(ranking=[0, 1, 2, 3]), "ranking[0]"),
        (LabelInput(ranking=[1, 2, 3, 4], likert=[1, 2, 3]), "likert"),
        (LabelInput(ranking=[1, 2, 3, 4], likert=[1, 2, 3, 8]), "likert[3]"),
        (LabelInput(ranking=[1, 2, 3, 4], flags=[[], ["nope"], [], []]), "flags[1]"),
        (LabelInput(), "ranking"),
    ],
)
def test_malformed_rankings_name_the_field(store: LabelStore, label: LabelInput, field: str):
    pid = store.create_project("p", "ranking", make_samples(1), overlap=1)
    (a,) = labelers(store, 1)
    task = store.next_task(a, pid)
    with pytest.raises(InvalidInput) as e:
        store.submit_ranking(a, task, label)
    assert e.value.field == field
    store.submit_ranking(a, task, rank_all(4))  # the assignment is still open after a bad try


def test_nul_characters_are_refused_on_every_backend(store: LabelStore) -> None:
    """PostgreSQL text cannot hold NUL: refused with a message, never a database error."""
    bad = Sample(prompt="p", responses=["fine", "nul \x00 here"])
    with pytest.raises(InvalidInput) as e:
        store.create_project("p", "ranking", [bad])
    assert e.value.field == "responses"
    pid = store.create_project("d", "demonstration", make_prompts(1))
    (a,) = labelers(store, 1)
    task = store.next_task(a, pid)
    with pytest.raises(InvalidInput):
        store.submit_demonstration(a, task, "nul \x00")


def test_lowering_overlap_keeps_labels_raising_it_reopens_tasks(store: LabelStore) -> None:
    pid = store.create_project("p", "ranking", make_samples(1), overlap=2)
    a, b, c = labelers(store, 3)
    for labeler in (a, b):
        store.submit_ranking(labeler, store.next_task(labeler, pid), rank_all(4))
    store.update_project(pid, overlap=1)
    assert store.progress(pid)[0].done == 2
    assert store.next_task(c, pid) is None
    store.update_project(pid, overlap=3)
    assert store.next_task(c, pid) is not None
    store.update_project(pid, active=False)
    with pytest.raises(Conflict, match="paused"):
        store.next_task(c, pid)
    assert store.available(c) == {}


# ---------------------------------------------------------------------------------------------
# Users and sessions


def test_users_passwords_and_sessions(store: LabelStore, clock: Clock) -> None:
    user = store.add_user("alice", PASSWORD)
    with pytest.raises(Conflict):
        store.add_user("alice", PASSWORD)
    with pytest.raises(InvalidInput) as e:
        store.add_user("bob", "short")
    assert e.value.field == "password"
    with pytest.raises(InvalidInput):
        store.add_user("bob smith", PASSWORD)
    with store.engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT password_hash FROM users").scalar_one()
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert store.authenticate("alice", "wrong-password") is None
    assert store.authenticate("nobody", PASSWORD) is None
    assert store.authenticate("alice", PASSWORD) == user
    token, session = store.create_session(user.id)
    assert store.get_session(token) == session
    clock.advance(seconds=store.session_ttl.total_seconds())
    assert store.get_session(token) is None  # expired


def test_deactivating_a_labeler_ends_sessions_and_frees_their_tasks(store: LabelStore) -> None:
    pid = store.create_project("p", "ranking", make_samples(1), overlap=1)
    a, b = labelers(store, 2)
    token, _ = store.create_session(a)
    task = store.next_task(a, pid)
    store.set_active(a, False)
    assert store.get_session(token) is None
    assert store.authenticate("lab0", PASSWORD) is None
    assert store.next_task(b, pid) == task


def test_new_password_ends_old_sessions(store: LabelStore) -> None:
    (a,) = labelers(store, 1)
    token, _ = store.create_session(a)
    store.set_password(a, "another-password")
    assert store.get_session(token) is None
    assert store.authenticate("lab0", "another-password") is not None


# ---------------------------------------------------------------------------------------------
# Agreement and ranks (pure functions)


def test_dense_ranking() -> None:
    assert dense_ranking([1, 3, 3, 4]) == [1, 2, 2, 3]
    assert dense_ranking([4, 4, 1]) == [2, 2, 1]


def naive_agreement(rankings: dict) -> tuple[int, int]:
    """Count agreeing / compared (labeler pair, response pair) by listing every preference."""
    agree = total = 0
    for by in rankings.values():
        for a, b in itertools.combinations(sorted(by), 2):
            prefs = []
            for r in (by[a], by[b]):
                prefs.append({(i, j) for i in range(len(r)) for j in range(len(r)) if r[i] < r[j]})
            strict = [
                (i, j)
                for i, j in itertools.combinations(range(len(by[a])), 2)
                if by[a][i] != by[a][j] and by[b][i] != by[b][j]
            ]
            for i, j in strict:
                total += 1
                agree += ((i, j) in prefs[0]) == ((i, j) in prefs[1])
    return agree, total


def test_pairwise_agreement_by_hand_and_against_a_naive_count() -> None:
    pairwise_agreement = agreement_of  # the panel's, shared by the store
    # (0,1) and (0,2) agree, (1,2) does not.
    assert pairwise_agreement({1: {"a": [1, 2, 3], "b": [1, 3, 2]}}).rate == pytest.approx(2 / 3)
    # a ties 0 and 1: that pair is no preference, the other two agree.
    tie = pairwise_agreement({1: {"a": [1, 1, 2], "b": [1, 2, 3]}})
    assert (tie.rate, tie.pairs) == (1.0, 2)
    assert pairwise_agreement({1: {"a": [1, 2]}}).rate is None  # one labeler: nothing to compare
    rng = random.Random(1)
    rankings = {
        t: {f"l{j}": [rng.randint(1, 4) for _ in range(4)] for j in range(rng.randint(1, 4))} for t in range(30)
    }
    got = pairwise_agreement(rankings)
    agree, total = naive_agreement(rankings)
    assert got.pairs == total
    assert got.rate == pytest.approx(agree / total)
    assert sum(v["pairs"] for v in got.by_labeler.values()) == 2 * total


def test_agreement_is_measured_on_stored_labels(store: LabelStore) -> None:
    sample = Sample(prompt="p", responses=["r0", "r1", "r2"])
    pid = store.create_project("p", "ranking", [sample], overlap=2)
    wanted = [{"r0": 1, "r1": 2, "r2": 3}, {"r0": 1, "r1": 3, "r2": 2}]
    for labeler, ranks in zip(labelers(store, 2), wanted, strict=True):
        task = store.next_task(labeler, pid)
        shown = store.task_view(labeler, task).responses
        store.submit_ranking(labeler, task, LabelInput(ranking=[ranks[t] for t in shown]))
    summary = store.export(pid).summary
    assert summary["agreement"]["rate"] == pytest.approx(2 / 3)
    assert summary["agreement"]["pairs"] == 3


# ---------------------------------------------------------------------------------------------
# Concurrency and durability


def test_racing_threads_store_every_label_exactly_once(store: LabelStore) -> None:
    pid = store.create_project("p", "ranking", make_samples(12), overlap=3)
    ids = labelers(store, 12)
    acked: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(labeler: int) -> None:
        try:
            for _ in range(20):  # bounded: at most 12 tasks exist
                task = store.next_task(labeler, pid)
                if task is None:
                    return
                store.submit_ranking(labeler, task, rank_all(4))
                with lock:
                    acked.append((task, labeler))
        except BaseException as e:  # surfaced below: a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(acked) == len(set(acked)) == 36  # 12 tasks × overlap 3
    stored = label_count(store, pid)
    assert len(stored) == 36 and set(stored.values()) == {1}
    per_task = Counter(prompt for prompt, _ in stored)
    assert set(per_task.values()) == {3}


def test_a_task_another_claim_holds_is_waited_for_not_reported_as_none(store: LabelStore) -> None:
    """The only open task is locked by a concurrent claim's transaction: the labeler gets it once
    that claim commits, not None ("nothing left") while a slot is free. (PostgreSQL's SKIP LOCKED
    passed over it: found as a racing-threads run that stored 35 of its 36 labels.)"""
    pid = store.create_project("p", "ranking", make_samples(1), overlap=2)
    a, b = labelers(store, 2)
    got: list[int | None] = []
    with store._write() as s:  # another claim's transaction, holding the task's row lock
        (task,) = s.scalars(select(Task.id).where(Task.project_id == pid).with_for_update()).all()
        claim = threading.Thread(target=lambda: got.append(store.next_task(b, pid)))
        claim.start()
        claim.join(timeout=0.5)
        assert claim.is_alive()  # waiting for the lock, not answered "empty"
    claim.join(timeout=30)
    assert got == [task]
    assert store.next_task(a, pid) == task  # the second slot is still there for the next labeler


def test_racing_duplicate_submissions_store_one(store: LabelStore) -> None:
    pid = store.create_project("p", "ranking", make_samples(1), overlap=1)
    (a,) = labelers(store, 1)
    task = store.next_task(a, pid)
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def submit() -> None:
        barrier.wait()
        try:
            store.submit_ranking(a, task, rank_all(4))
            outcomes.append("stored")
        except AlreadyDone:
            outcomes.append("duplicate")

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(outcomes) == ["duplicate"] * 5 + ["stored"]
    assert sum(label_count(store, pid).values()) == 1


def test_committed_labels_survive_reopening(db_url: str, clock: Clock) -> None:
    store = LabelStore(db_url, hasher=FAST_HASHER, now=clock)
    pid = store.create_project("p", "ranking", make_samples(2), overlap=1)
    (a,) = labelers(store, 1)
    store.submit_ranking(a, store.next_task(a, pid), rank_all(4))
    store.close()
    again = LabelStore(db_url, hasher=FAST_HASHER, now=clock)
    assert len(again.export(pid).records) == 1
    assert again.authenticate("lab0", PASSWORD) is not None
    again.close()


def test_in_memory_sqlite_is_refused() -> None:
    with pytest.raises(ValueError, match="lost on restart"):
        LabelStore("sqlite://")
