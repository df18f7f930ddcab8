"""Prompt preprocessing (InstructGPT §3.2): PII, length, dedup, per-user cap, split by user."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from tether.cli import main
from tether.data.formats import Prompt, read_records, write_records
from tether.data.preprocess import (
    SPLITS,
    STEPS,
    PreprocessConfig,
    cap_per_user,
    dedup_by_prefix,
    filter_length,
    filter_pii,
    find_pii,
    normalize_prefix,
    preprocess_prompts,
    redact_pii,
    split_by_user,
)

WORDS = "write a story poem about the cat dog sea moon list ideas for summarize this text".split()


def random_prompts(rng: random.Random, n_users: int, per_user: tuple[int, int] = (1, 6)):
    """Distinct prompts (random words, so no shared long prefix) from ``n_users`` users."""
    prompts = []
    for u in range(n_users):
        for _ in range(rng.randint(*per_user)):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
            prompts.append(Prompt(id=f"p{len(prompts)}", text=text, user_id=f"u{u}"))
    return prompts


# --------------------------------------------------------------------------------------------
# Split by user


@pytest.mark.parametrize("seed", range(20))
def test_split_by_user_is_disjoint_and_complete(seed):
    rng = random.Random(seed)
    prompts = random_prompts(rng, n_users=rng.randint(3, 120))
    splits = split_by_user(prompts, (0.8, 0.1, 0.1), seed=seed)

    assert set(splits) == set(SPLITS)
    users = {name: {p.user_id for p in splits[name]} for name in SPLITS}
    assert not users["train"] & users["valid"]
    assert not users["train"] & users["test"]
    assert not users["valid"] & users["test"]
    # Union equals the input, as a multiset, each split in input order.
    assert Counter(p.id for s in splits.values() for p in s) == Counter(p.id for p in prompts)
    order = {p.id: i for i, p in enumerate(prompts)}
    for s in splits.values():
        assert [order[p.id] for p in s] == sorted(order[p.id] for p in s)
    # Every split non-empty, even with as few as 3 users.
    assert all(splits[name] for name in SPLITS)


@pytest.mark.parametrize("n_users", [3, 4, 5])
def test_split_fills_every_split_with_few_users(n_users):
    # With three users the hash alone usually leaves a 10 % split empty; the fix-up fills it.
    prompts = [Prompt(f"p{u}", "hi", f"user{u}") for u in range(n_users)]
    for seed in range(50):
        splits = split_by_user(prompts, seed=seed)
        assert all(len(splits[name]) >= 1 for name in SPLITS), seed


def test_split_fractions_are_roughly_by_user():
    prompts = random_prompts(random.Random(0), n_users=2000, per_user=(1, 1))
    splits = split_by_user(prompts, (0.8, 0.1, 0.1), seed=0)
    sizes = {name: len({p.user_id for p in splits[name]}) for name in SPLITS}
    assert 1500 < sizes["train"] < 1700
    assert 140 < sizes["valid"] < 260 and 140 < sizes["test"] < 260


def test_split_is_stable_when_prompts_or_users_are_added():
    rng = random.Random(1)
    prompts = random_prompts(rng, n_users=200)
    before = split_by_user(prompts, seed=7)
    where = {p.user_id: name for name in SPLITS for p in before[name]}

    more = [Prompt(f"new{i}", f"new prompt {i}", f"newuser{i % 30}") for i in range(90)]
    more += [Prompt(f"extra{i}", f"extra {i}", f"u{i}") for i in range(0, 200, 7)]
    after = split_by_user(rng.sample(prompts + more, len(prompts + more)), seed=7)
    where_after = {p.user_id: name for name in SPLITS for p in after[name]}
    assert all(where_after[u] == split for u, split in where.items())


def test_split_depends_on_seed_and_is_deterministic():
    prompts = random_prompts(random.Random(2), n_users=100)
    a, b, c = (split_by_user(prompts, seed=s) for s in (0, 0, 1))
    assert a == b
    assert a != c


def test_split_too_few_users_raises():
    prompts = [Prompt("a", "hello", "u1"), Prompt("b", "there", "u2"), Prompt("c", "x", "u2")]
    with pytest.raises(ValueError, match="at least 3 distinct users.*got 2"):
        split_by_user(prompts)
    # A zero fraction means that split may stay empty, so two users are enough.
    splits = split_by_user(prompts, (0.9, 0.1, 0.0))
    assert splits["train"] and splits["valid"] and not splits["test"]


@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.2), (0.5, 0.5), (1.2, -0.1, -0.1)])
def test_bad_fractions_raise(fractions):
    with pytest.raises(ValueError, match="fractions"):
        PreprocessConfig(fractions=fractions)


# --------------------------------------------------------------------------------------------
# Dedup, cap, length

LONG = "Write a detailed story about a lighthouse keeper who finds a message in a bottle"


def test_dedup_drops_long_prefix_duplicates_ignoring_case_and_spaces():
    prompts = [
        Prompt("a", LONG + " on a stormy night.", "u1"),
        Prompt("b", "  " + LONG.upper().replace(" ", "   ") + "\n from the future.", "u2"),
        Prompt("c", LONG.replace(" ", "\t") + "!", "u1"),
    ]
    kept, dropped = dedup_by_prefix(prompts, prefix_chars=64)
    assert [p.id for p in kept] == ["a"]  # the first occurrence wins
    assert [d.prompt.id for d in dropped] == ["b", "c"]
    assert all(d.step == "dedup" and "a" in d.reason for d in dropped)


def test_dedup_keeps_prompts_with_short_shared_prefix():
    prompts = [
        Prompt("a", "Write a poem about the sea.", "u1"),
        Prompt("b", "Write a poem about the moon.", "u1"),
        Prompt("c", "Write a story about a lighthouse keeper and his dog.", "u2"),
        Prompt("d", "Write a poem", "u3"),
    ]
    kept, dropped = dedup_by_prefix(prompts, prefix_chars=64)
    assert kept == prompts and dropped == []


def test_dedup_of_short_prompts_is_exact_after_normalising():
    prompts = [Prompt("a", "Hello  World", "u1"), Prompt("b", "hello world", "u2")]
    kept, _ = dedup_by_prefix(prompts)
    assert [p.id for p in kept] == ["a"]
    assert normalize_prefix("  A\u00a0B\n\tC ", 3) == "a b"


def test_dedup_scales_linearly():
    # 20k prompts with long identical prefixes: an O(n^2) scan would take minutes.
    prompts = [Prompt(f"p{i}", LONG + f" number {i % 5000}", f"u{i}") for i in range(20_000)]
    kept, dropped = dedup_by_prefix(prompts, prefix_chars=len(LONG) + 20)
    assert len(kept) == 5000 and len(dropped) == 15_000


def test_cap_per_user_is_deterministic_and_respects_the_cap():
    rng = random.Random(3)
    prompts = [Prompt(f"p{i}", f"text {i}", f"u{rng.randint(0, 4)}") for i in range(300)]
    kept, dropped = cap_per_user(prompts, max_per_user=20, seed=0)
    counts = Counter(p.user_id for p in kept)
    assert all(n == 20 for n in counts.values()) and len(counts) == 5
    assert len(kept) + len(dropped) == 300
    assert {d.step for d in dropped} == {"user_cap"}
    assert kept == cap_per_user(prompts, 20, seed=0)[0]
    assert kept != cap_per_user(prompts, 20, seed=1)[0]
    # Kept prompts stay in input order; users under the cap lose nothing.
    assert kept == [p for p in prompts if p in set(kept)]
    small = [Prompt("x", "a", "solo"), Prompt("y", "b", "solo")]
    assert cap_per_user(small, 20) == (small, [])


def test_filter_length_by_chars_words_and_tokens():
    prompts = [
        Prompt("short", "one two three", "u"),
        Prompt("wordy", " ".join(["w"] * 50), "u"),
        Prompt("chars", "x" * 500, "u"),
    ]
    kept, dropped = filter_length(prompts, max_words=10)
    assert [p.id for p in kept] == ["short", "chars"] and dropped[0].step == "length"
    kept, _ = filter_length(prompts, max_chars=99)  # "wordy" has 99 characters
    assert [p.id for p in kept] == ["short", "wordy"]
    kept, dropped = filter_length(prompts, max_tokens=3, count_tokens=lambda s: len(s) // 4)
    assert [p.id for p in kept] == ["short"] and "tokens" in dropped[0].reason
    with pytest.raises(ValueError, match="count_tokens"):
        filter_length(prompts, max_tokens=3)


# --------------------------------------------------------------------------------------------
# Personal information

PII_EXAMPLES = {
    "email": ["Email me at john.doe+work@example.co.uk please", "mail X_Y@mail-server.org."],
    "phone": [
        "Call +44 20 7946 0958 tomorrow",
        "My cell is +91-9876543210.",
        "(+33) 1 23 45 67 89 in Paris",
        "Reach me at (555) 123-4567",
        "or at 555.987.6543 after six",
        "Toll free 1-800-555-0199",
        "my number is 2125557890 ok",
        "+1 (415) 555-2671",
    ],
    "credit_card": [
        "card 4111 1111 1111 1111 exp 12/25",
        "card 4111-1111-1111-1111",
        "amex 3782 822463 10005",
        "number 5500005555555559 thanks",
    ],
    "ipv4": ["server at 192.168.10.1.", "ssh into 10.0.0.254 now"],
    "ssn": ["SSN 123-45-6789", "my social security number is 123456789"],
    "url_userinfo": [
        "clone https://alice:hunter2@github.com/org/repo.git now",
        "see ftp://bob@files.example.org",
    ],
}
PLACEHOLDER = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "credit_card": "[CREDIT_CARD]",
    "ipv4": "[IP_ADDRESS]",
    "ssn": "[SSN]",
    "url_userinfo": "[URL]",
}

ORDINARY = [
    "I bought 3 items for $19.99 in 2021.",
    "The meeting is at 10:30 on 2023-05-14.",
    "Population grew from 1,234,567 to 2,345,678 between 1990 and 2000.",
    "Pi is approximately 3.14159265358979323846.",
    "Python 3.11.4 was released; see section 1.2.3.4.",
    "The score was 3-2 after 90 minutes, with +5 points.",
    "Order #123456 shipped on 12/05/2022 for €1,299.00.",
    "Ages 18-25, 26-35 and 36-45; years 1999, 2000, 2001 and 2002.",
    "Multiply 12345 by 67890 and divide by 100 200 30.",
    "ISBN 978-0-306-40615-7, ZIP 90210-1234.",
    "Follow @john on twitter and visit https://example.com/a?b=1.",
    "Resolution 1920x1080 at 16:9, 60 fps, 4K.",
    "Temperatures from -5 to +35 degrees in the 2020-2021 season.",
    "It costs $1,000,000 and takes 24/7 support.",
    "Flight UA 1234 departs 07:45 from gate B12.",
    "Write a poem about the year 1066 and the 100 Years' War.",
    "Call me in 5 minutes, I'm in room 404.",
    "Between 9:00am and 5:30pm, 7 days a week, 365 days a year.",
    "The recipe needs 250 g flour, 2.5 cups milk and 3 eggs.",
]


@pytest.mark.parametrize("kind", sorted(PII_EXAMPLES))
def test_pii_detected_and_redacted_in_each_category(kind):
    for text in PII_EXAMPLES[kind]:
        found = find_pii(text)
        assert [m.kind for m in found] == [kind], text
        redacted = redact_pii(text)
        assert PLACEHOLDER[kind] in redacted
        assert text[found[0].start : found[0].end] not in redacted
        assert not find_pii(redacted), redacted  # nothing left behind


def test_pii_redaction_keeps_the_rest_of_the_text():
    text = "Hi, I'm Ann (ann@example.com, +1 415-555-2671). Card 4111 1111 1111 1111."
    assert redact_pii(text) == "Hi, I'm Ann ([EMAIL], [PHONE]). Card [CREDIT_CARD]."


def test_url_userinfo_wins_over_email_and_luhn_is_checked():
    assert [m.kind for m in find_pii("https://bob:pw@example.com/x")] == ["url_userinfo"]
    assert find_pii("card 4111 1111 1111 1112") == []  # fails the Luhn check
    assert find_pii("0000 0000 0000 0000") == []


@pytest.mark.parametrize("text", ORDINARY)
def test_no_false_positives_on_ordinary_numbers(text):
    assert find_pii(text) == []


@pytest.mark.timeout(5)
def test_find_pii_stays_linear_on_long_adversarial_text():
    # Each of these took seconds with a backtracking-prone pattern; a linear scan takes ms.
    for text in ["x@" + "ab." * 50_000 + "1", "ab." * 50_000 + "@", "1-" * 50_000, "+1 " * 50_000]:
        find_pii(text)


def test_filter_pii_drop_and_redact():
    prompts = [Prompt("clean", s, "u") for s in ORDINARY[:3]]
    prompts.append(Prompt("pii", "write to me at a@b.com", "u"))
    kept, dropped = filter_pii(prompts, "drop")
    assert [p.id for p in kept] == ["clean"] * 3
    assert [(d.prompt.id, d.step, d.reason) for d in dropped] == [("pii", "pii", "contains email")]
    assert "a@b.com" not in json.dumps(dropped[0].to_json())  # the PII is not written out

    kept, dropped = filter_pii(prompts, "redact")
    assert dropped == [] and kept[:3] == prompts[:3]
    assert kept[3] == Prompt("pii", "write to me at [EMAIL]", "u")
    with pytest.raises(ValueError, match="drop.*redact"):
        filter_pii(prompts, "mask")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# The whole pipeline


def messy_prompts(seed: int = 0) -> list[Prompt]:
    rng = random.Random(seed)
    prompts = random_prompts(rng, n_users=60)
    n = len(prompts)
    # One heavy user over the cap, PII, over-long prompts and near-duplicates.
    prompts += [Prompt(f"heavy{i}", f"heavy user question {i}", "heavy") for i in range(30)]
    prompts += [Prompt(f"pii{i}", f"my email is user{i}@example.com", f"u{i}") for i in range(5)]
    prompts += [Prompt(f"long{i}", "word " * 300, f"u{i}") for i in range(4)]
    prompts += [Prompt(f"dup{i}", LONG.upper() + f"   variant {i}", f"u{i + 10}") for i in range(6)]
    assert len(prompts) == n + 45
    return rng.sample(prompts, len(prompts))


def test_preprocess_counts_every_removal():
    prompts = messy_prompts()
    config = PreprocessConfig(max_words=100, max_per_user=10, prefix_chars=40, seed=3)
    result = preprocess_prompts(prompts, config)
    r = result.report

    assert list(r.removed) == list(STEPS)
    assert r.removed["pii"] == 5 and r.pii_kinds == {"email": 5}
    assert r.removed["length"] == 4
    assert r.removed["dedup"] == 5
    assert r.removed["user_cap"] == 20
    assert r.input == len(prompts) == r.total_removed + r.kept
    assert r.kept == sum(r.split_prompts.values())

    # Every input id is in exactly one split or dropped once, under the step that counted it.
    out_ids = [p.id for name in SPLITS for p in result.splits[name]]
    dropped_ids = [d.prompt.id for d in result.dropped]
    assert Counter(out_ids + dropped_ids) == Counter(p.id for p in prompts)
    assert Counter(d.step for d in result.dropped) == Counter({k: v for k, v in r.removed.items() if v})
    users = [{p.user_id for p in result.splits[name]} for name in SPLITS]
    assert sum(map(len, users)) == len(set.union(*users))


def test_preprocess_redact_mode_keeps_prompts():
    result = preprocess_prompts(messy_prompts(), PreprocessConfig(pii="redact", max_per_user=200))
    r = result.report
    assert r.removed["pii"] == 0 and r.pii_redacted == 5
    texts = [p.text for s in result.splits.values() for p in s]
    # The five prompts differed only in the email, so after redaction dedup keeps one.
    assert sum("[EMAIL]" in t for t in texts) == 1
    assert "my email is [EMAIL]" in texts
    # 5 LONG variants, 4 redacted emails, 3 of the identical long prompts (kept at max_words 1000).
    assert r.removed["dedup"] == 5 + 4 + 3


def test_preprocess_rejects_duplicate_ids():
    prompts = [Prompt("a", "x", "u1"), Prompt("a", "y", "u2"), Prompt("b", "z", "u3")]
    with pytest.raises(ValueError, match="unique.*'a'"):
        preprocess_prompts(prompts)


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_preprocess_writes_splits_and_report(tmp_path, capsys):
    src = write_records(tmp_path / "prompts.jsonl", messy_prompts())
    out = tmp_path / "out"
    rc = main(
        [
            "data",
            "preprocess",
            str(src),
            "--out",
            str(out),
            "--max-per-user",
            "10",
            "--max-words",
            "100",
            "--seed",
            "3",
            "--fractions",
            "0.7",
            "0.15",
            "0.15",
        ]
    )
    assert rc == 0

    splits = {name: read_records(out / f"{name}.jsonl", "prompt") for name in SPLITS}
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["max_per_user"] == 10
    assert report["config"]["fractions"] == [0.7, 0.15, 0.15]
    assert report["config"]["prefix_chars"] == 64  # unset flags take the dataclass default
    assert {name: len(s) for name, s in splits.items()} == report["split_prompts"]
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert len(dropped) == sum(report["removed"].values()) == report["input"] - report["kept"]

    printed = capsys.readouterr().out
    assert f"read {report['input']} prompts" in printed and "user_cap" in printed


def test_cli_preprocess_names_file_and_line_of_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"id": "1", "text": "hi", "user_id": "u1"}\n'
        '{"id": "2", "text": "there", "user_id": "u2"}\n'
        '{"id": "3", "user_id": "u3"}\n'
    )
    rc = main(["data", "preprocess", str(bad), "--out", str(tmp_path / "out")])
    assert rc != 0
    err = capsys.readouterr().err
    assert f"{bad}:3" in err and "text" in err
    assert not (tmp_path / "out").exists()


def test_cli_preprocess_bad_config_is_a_readable_error(tmp_path, capsys):
    src = write_records(tmp_path / "p.jsonl", messy_prompts())
    rc = main(["data", "preprocess", str(src), "--out", str(tmp_path / "o"), "--fractions", "0.5", "0.2", "0.2"])
    assert rc != 0 and "sum to 1" in capsys.readouterr().err
