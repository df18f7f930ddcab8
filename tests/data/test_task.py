"""The default task: determinism, demonstrations that obey, constraints that round-trip."""

from __future__ import annotations

import pytest

from tether.data.constraints import (
    CONSTRAINT_KINDS,
    EMBEDDED_MAX_WORDS,
    PHRASINGS,
    Constraint,
    check,
    count_sentences,
    count_words,
    parse_constraints,
)
from tether.data.formats import read_records
from tether.data.task import (
    CATEGORIES,
    MAX_DEMONSTRATION_WORDS,
    MAX_PROMPT_WORDS,
    build_default_task,
    compose_response,
    find_topic,
    load_topics,
    pretrain_corpus,
    quoted_source,
)


@pytest.fixture(scope="module")
def task():
    return build_default_task()


def test_same_seed_same_files_other_seed_other_prompts(tmp_path):
    a = build_default_task(seed=3, n_users=6, prompts_per_user=5).write(tmp_path / "a")
    b = build_default_task(seed=3, n_users=6, prompts_per_user=5).write(tmp_path / "b")
    assert set(a) == {"prompts", "demonstrations", "pretrain_train", "pretrain_heldout"}
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    other = build_default_task(seed=4, n_users=6, prompts_per_user=5)
    first = [p.text for p in read_records(a["prompts"], "prompt")]
    assert first != [p.text for p in other.prompts]


def test_written_files_are_valid_records(task, tmp_path):
    paths = task.write(tmp_path)
    assert len(read_records(paths["prompts"], "prompt")) == len(task.prompts)
    demos = read_records(paths["demonstrations"], "demonstration")
    assert [d.prompt_id for d in demos] == [p.id for p in task.prompts]
    assert len(read_records(paths["pretrain_heldout"], "pretrain")) == len(task.pretrain_heldout)


def test_shape_users_categories_and_lengths(task):
    assert len(task.prompts) == 60 * 8
    assert len({p.id for p in task.prompts}) == len(task.prompts)
    users = {p.user_id for p in task.prompts}
    assert len(users) == 60
    assert {p.category for p in task.prompts} == set(CATEGORIES)
    assert max(count_words(p.text) for p in task.prompts) < MAX_PROMPT_WORDS
    assert max(count_words(d.response) for d in task.demonstrations) < MAX_DEMONSTRATION_WORDS
    assert all(1 <= len(cs) <= 2 for cs in task.constraints.values())
    # Every kind of constraint occurs, so every kind gets learned and checked.
    assert {c.kind for cs in task.constraints.values() for c in cs} == set(CONSTRAINT_KINDS)


def test_every_demonstration_satisfies_every_parsed_constraint(task):
    for prompt, demo in zip(task.prompts, task.demonstrations, strict=True):
        assert demo.prompt == prompt.text and demo.prompt_id == prompt.id
        constraints = parse_constraints(prompt.text)
        assert constraints, prompt.text
        for c in constraints:
            assert check(c, demo.response), (prompt.text, demo.response, c)


def test_generated_constraints_round_trip_through_the_prompt_text(task):
    for prompt in task.prompts:
        assert parse_constraints(prompt.text) == task.constraints[prompt.id], prompt.text


def test_topics_are_found_from_the_prompt_text(task):
    for prompt in task.prompts:
        topic = find_topic(prompt.text)
        assert topic is not None and topic.name == task.topics[prompt.id], prompt.text


def _examples(kind: str) -> list[Constraint]:
    values = {
        "max_words": [5, 30],
        "num_sentences": [1, 3],
        "bullets": [2, 4],
        "include_word": ["lava", "Italy"],
        "exclude_word": ["tea", "wood-fired"],
        "lowercase": [None],
        "uppercase": [None],
        "starts_with": ["Fun fact:", "Here you go:"],
        "ends_with": ["Hope this helps!", "That is all."],
    }[kind]
    return [Constraint(kind, v) for v in values]


@pytest.mark.parametrize("kind", CONSTRAINT_KINDS)
def test_every_phrasing_round_trips(kind):
    for c in _examples(kind):
        for variant in range(len(PHRASINGS[kind])):
            text = "Write about volcanoes. " + c.render(variant)
            assert parse_constraints(text) == [c], text
            # Position in the prompt and neighbours do not matter.
            both = c.render(variant) + " Write about tea. " + Constraint("lowercase").render(1)
            expected = [c] if kind == "lowercase" else [c, Constraint("lowercase")]
            if kind == "uppercase":
                continue  # lowercase and uppercase never meet in a prompt
            assert parse_constraints(both) == expected, both


def test_embedded_word_limit_and_negations_parse():
    text = "Write about tea" + EMBEDDED_MAX_WORDS.format(n=30) + "."
    assert parse_constraints(text) == [Constraint("max_words", 30)]
    # "Do not use the word X" must not also read as "use the word X".
    assert parse_constraints('Do not use the word "lava". Use the word "ash".') == [
        Constraint("exclude_word", "lava"),
        Constraint("include_word", "ash"),
    ]
    assert parse_constraints("Tell me about cats.") == []
    # Close variants a person writing prompts in the labeling app might use.
    assert parse_constraints("Describe owls in two sentences, in under 20 words.") == [
        Constraint("num_sentences", 2),
        Constraint("max_words", 19),
    ]
    assert parse_constraints('Reply with 3 bullet points and avoid using the word "hoot".') == [
        Constraint("bullets", 3),
        Constraint("exclude_word", "hoot"),
    ]
    assert parse_constraints("Write IN ALL CAPS about dogs, no more than 12 words.") == [
        Constraint("uppercase"),
        Constraint("max_words", 12),
    ]


@pytest.mark.parametrize(
    ("constraint", "good", "bad"),
    [
        (Constraint("max_words", 5), "Cats sleep a lot.", "Cats sleep a lot every day."),
        (Constraint("max_words", 3), "Wood-fired pizza, yes.", "Wood fired pizza, yes."),
        (
            Constraint("num_sentences", 2),
            "Tea is hot. I like it!",
            "Tea is hot. I like it. Me too.",
        ),
        (Constraint("num_sentences", 1), "Owls hunt at night.", "Owls hunt. At night."),
        (
            Constraint("bullets", 2),
            "- Lava is hot.\n- Ash flies.",
            "- Lava is hot.\n- Ash.\n- Rock.",
        ),
        (Constraint("bullets", 2), "  - Lava is hot.\n\n  - Ash flies.", "Lava:\n- hot\n- bright"),
        (Constraint("include_word", "lava"), "Hot LAVA flows.", "Lavas flow."),
        (Constraint("exclude_word", "tea"), "Steeped leaves taste good.", "Tea tastes good."),
        (Constraint("exclude_word", "tea"), "Instead of it, drink water.", "I drink tea."),
        (Constraint("lowercase"), "cats purr. 2 of them!", "cats purr. Two of them!"),
        (Constraint("uppercase"), "CATS PURR, 24/7.", "CATS PURr."),
        (Constraint("starts_with", "Fun fact:"), "fun fact: bees dance.", "Bees dance. Fun fact:"),
        (Constraint("ends_with", "Hope this helps!"), "Bees dance. Hope this helps!", "Bees."),
    ],
)
def test_check_positive_and_negative(constraint, good, bad):
    assert check(constraint, good)
    assert not check(constraint, bad)


@pytest.mark.parametrize("kind", CONSTRAINT_KINDS)
def test_an_empty_response_satisfies_nothing(kind):
    for c in _examples(kind):
        assert not check(c, "   ")


def test_compose_truncates_at_a_sentence_boundary():
    sentences = ["One two three four.", "Five six seven.", "Eight nine ten eleven twelve."]
    text = compose_response(sentences, [Constraint("max_words", 8)])
    assert text == "One two three four. Five six seven."
    assert count_sentences(text) == 2
    bullets = compose_response(sentences, [Constraint("bullets", 2), Constraint("uppercase")])
    assert bullets == "- ONE TWO THREE FOUR.\n- FIVE SIX SEVEN."
    assert compose_response(sentences, [Constraint("include_word", "absent")]) is None


def test_topic_material_is_plain_single_sentences():
    topics = load_topics()
    assert len(topics) >= 30
    for topic in topics.values():
        assert len(topic.sentences) >= 6
        assert len(topic.keywords) >= 5
        for s in topic.sentences:
            assert s.isascii() and '"' not in s
            assert count_sentences(s) == 1 and count_words(s) <= 14, s


def test_near_duplicates_and_personal_details_are_there_for_preprocessing(task):
    from tether.data.preprocess import find_pii, normalize_prefix

    by_id = {p.id: p for p in task.prompts}
    assert 5 <= len(task.near_duplicates) <= 40
    for dup, original in task.near_duplicates.items():
        assert by_id[dup].user_id == by_id[original].user_id
        assert by_id[dup].text != by_id[original].text
        assert normalize_prefix(by_id[dup].text) == normalize_prefix(by_id[original].text)
    assert 5 <= len(task.pii_prompt_ids) <= 40
    pii = set(task.pii_prompt_ids)
    for p in task.prompts:
        assert bool(find_pii(p.text)) == (p.id in pii), p.text
    # Personal details do not hide the task: constraints and topic still parse.
    for pid in pii:
        assert parse_constraints(by_id[pid].text) == task.constraints[pid]


def test_closed_domain_prompts_quote_their_source(task):
    closed = [p for p in task.prompts if p.category in ("rewrite", "summarization", "closed_qa")]
    assert closed
    for p in closed:
        source = quoted_source(p.text)
        assert source is not None and count_words(source) >= 6
    assert quoted_source('Write about tea. Start your answer with "Fun fact:".') is None


def test_pretrain_split_is_disjoint_bounded_prose():
    train, heldout = pretrain_corpus()
    assert len(train) > 200 and len(heldout) > 20
    train_texts, heldout_texts = {t.text for t in train}, {t.text for t in heldout}
    assert not train_texts & heldout_texts
    assert len(train_texts) == len(train)
    for t in train + heldout:
        assert 20 <= count_words(t.text) <= 120
        assert t.text.isascii() and "::=" not in t.text and ">>>" not in t.text
    # The split depends on the text only: a smaller corpus keeps every paragraph's side.
    _, heldout_short = pretrain_corpus(max_words=120, min_words=40)
    assert {t.text for t in heldout_short} <= heldout_texts


def test_small_tasks_work():
    one = build_default_task(seed=1, n_users=1, prompts_per_user=1)
    assert len(one.prompts) == len(one.demonstrations) == 1
    with pytest.raises(ValueError):
        build_default_task(n_users=0)
