"""The data contracts that cross tether's stage boundaries, and the shapes users bring.

Every file tether writes is one of these record kinds, stored one JSON object per line (JSONL);
Parquet files, ``datasets`` directories (``save_to_disk``) and ``datasets`` names found in the
local cache (``NAME`` or ``NAME:SPLIT``, read offline) are read too. Field by field:

``prompt``         {"id": str?, "text": prompt, "user_id": str?, "category": str?}
``demonstration``  {"prompt": prompt, "response": str, "prompt_id": str?, "labeler_id": str?}
``sample``         {"prompt": prompt, "responses": [str] (K = 2..9), "prompt_id": str?,
                    "policies": [str]? (one per response), "ended": [bool]? (one per response),
                    "response_ids": [[int]]? (one per response), "user_id": str?, "category": str?}
``comparison``     {"prompt": prompt, "responses": [str] (K = 2..9), "ranking": [int] (one rank per
                    response, 1 = best, equal ranks = a tie), "labeler_id": str?,
                    "prompt_id": str?, "likert": [int 1..7]?, "flags": [{flag: bool}]?,
                    "policies": [str]?, "ended": [bool]?, "response_ids": [[int]]?}
``pretrain``       {"text": str}

A *prompt* is a string or a conversation: a list of {"role": "system" | "user" | "assistant",
"content": str} turns ending with a user turn. A conversation of one user turn is read as its text.

The shapes the ecosystem's datasets come in are read as they are (:func:`tether_shape`):
``messages`` (a conversation whose last assistant turn is the response), ``prompt`` /
``completion``, ``prompt`` / ``chosen`` / ``rejected`` (a comparison of K = 2), ``chosen`` /
``rejected`` whole conversations whose shared leading turns are the prompt (HH-RLHF, as turn
lists or as "\\n\\nHuman: … \\n\\nAssistant: …" text), and ``prompt`` alone; a prompt without
``id`` gets a stable hash of its content. Any file with a prompt can be read as prompts.

Bad input raises :class:`DataError` naming the file, the line (1-based; the row for Parquet) and
the field. ``ended[i]`` is false for a sampled response that ran out of tokens before the model
ended it (EOS); absent means every response ended, as a written one does. The reward model trains
on a response as the policy wrote it: EOS after an ended one, none after a cut one. Extra fields
are allowed and ignored (keep provenance in them, e.g. ``meta``). A file
is validated whole before anything trains on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, overload

K_MIN, K_MAX = 2, 9
LIKERT_MIN, LIKERT_MAX = 1, 7

# InstructGPT Table 3 / Appendix B: the metadata labelers give each output.
FLAGS: tuple[str, ...] = (
    "fails_instruction",
    "inappropriate",
    "hallucination",
    "satisfies_constraint",
    "sexual_content",
    "violent_content",
    "harmful_advice",
    "denigrates_protected_class",
    "expresses_opinion",
)

Kind = Literal["prompt", "demonstration", "sample", "comparison", "pretrain"]
KINDS: tuple[str, ...] = ("prompt", "demonstration", "sample", "comparison", "pretrain")


class DataError(ValueError):
    """A record that breaks its contract: says which file, line and field."""

    def __init__(self, path: str | Path, line: int | None, field_name: str | None, message: str):
        self.path, self.line, self.field, self.message = str(path), line, field_name, message
        where = self.path + (f":{line}" if line is not None else "")
        what = f" field '{field_name}'" if field_name else ""
        super().__init__(f"{where}:{what} {message}")


ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation."""

    role: str  # one of ROLES
    content: str


class Conversation(str):
    """A prompt of several turns (a system prompt, earlier turns, the last user turn).

    It is a ``str`` whose value is the turns as plain text ("system: …\n\nuser: …"): what PII
    filtering, deduplication, the simulated labelers and logs read, so every stage that carries
    prompts carries it unchanged. :attr:`turns` is what the chat template renders
    (:func:`tether.models.generation.chat_prompt`) and what files store (a list of {role,
    content}). String operations return plain text without the turns, so code that rewrites a
    prompt must rebuild the Conversation.
    """

    turns: tuple[Turn, ...]

    def __new__(cls, turns: Iterable[Turn]) -> Conversation:
        turns = tuple(turns)
        self = super().__new__(cls, "\n\n".join(f"{t.role}: {t.content}" for t in turns))
        self.turns = turns
        return self

    def __reduce__(self) -> tuple[Any, ...]:  # copy, deepcopy (dataclasses.asdict) and pickle keep the turns
        return (Conversation, (self.turns,))

    def messages(self) -> list[dict[str, str]]:
        """The turns as chat-template messages: [{"role", "content"}]."""
        return [{"role": t.role, "content": t.content} for t in self.turns]


def prompt_json(prompt: str) -> str | list[dict[str, str]]:
    """A prompt as files store it: its text, or its turns when it is a Conversation."""
    return prompt.messages() if isinstance(prompt, Conversation) else str(prompt)


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str  # a plain string or a Conversation
    user_id: str | None = None  # None: the split by user falls back to a split by prompt
    category: str | None = None


@dataclass(frozen=True)
class Demonstration:
    prompt: str
    response: str
    prompt_id: str | None = None
    labeler_id: str | None = None


@dataclass(frozen=True)
class Sample:
    """K responses to one prompt, waiting to be ranked (output of ``tether sample``)."""

    prompt: str
    responses: list[str]
    prompt_id: str | None = None
    policies: list[str] | None = None
    user_id: str | None = None
    category: str | None = None
    ended: list[bool] | None = None  # per response: it ended with EOS (None: all did)
    # per response: the token ids the policy sampled (EOS left out; ``ended`` says whether it came),
    # so the RM trains on what PPO scores; None: text only, tokenised from the text
    response_ids: list[list[int]] | None = None


@dataclass(frozen=True)
class Comparison:
    """One labeler's ranking of K responses to one prompt (InstructGPT §3.5)."""

    prompt: str
    responses: list[str]
    ranking: list[int]  # ranking[i] = rank of responses[i]; 1 = best; equal = tie
    labeler_id: str | None = None  # None: figures that need labelers (agreement, held-out) skip it
    prompt_id: str | None = None
    likert: list[int] | None = None
    flags: list[dict[str, bool]] | None = None
    policies: list[str] | None = None
    ended: list[bool] | None = None  # per response: it ended with EOS (None: all did)
    response_ids: list[list[int]] | None = None  # per response: sampled token ids, as in Sample

    @property
    def k(self) -> int:
        return len(self.responses)

    def pairs(self) -> list[tuple[int, int]]:
        """(winner, loser) index pairs implied by the ranking; ties give no pair."""
        return [(i, j) for i in range(self.k) for j in range(self.k) if self.ranking[i] < self.ranking[j]]


@dataclass(frozen=True)
class PretrainText:
    text: str


Record = Prompt | Demonstration | Sample | Comparison | PretrainText

RECORD_TYPES: dict[str, type] = {
    "prompt": Prompt,
    "demonstration": Demonstration,
    "sample": Sample,
    "comparison": Comparison,
    "pretrain": PretrainText,
}


# --------------------------------------------------------------------------------------------
# Validation: one function per kind, each raising DataError with the field that is wrong.


Where = tuple[str | Path, int | None]  # (file, line) of the record being read


def _check_text(value: str, name: str, where: Where) -> str:
    # A JSON escape such as "\ud800" decodes to a lone surrogate: a Python str that no UTF-8 file,
    # tokenizer or database can hold. Refuse it here rather than in a later stage.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            *where, name, f"holds an unpaired surrogate (\\u{ord(value[e.start]):04x}); not valid Unicode"
        ) from None
    return value


@overload
def _require_str(obj: dict, name: str, where: Where, *, optional: Literal[False] = ..., empty: bool = ...) -> str: ...
@overload
def _require_str(obj: dict, name: str, where: Where, *, optional: bool, empty: bool = ...) -> str | None: ...
def _require_str(obj: dict, name: str, where: Where, *, optional: bool = False, empty: bool = False) -> str | None:
    if name not in obj or obj[name] is None:
        if optional:
            return None
        raise DataError(*where, name, "is missing")
    value = obj[name]
    if not isinstance(value, str):
        raise DataError(*where, name, f"must be a string, got {_json_type(value)}")
    if not empty and not value.strip():
        raise DataError(*where, name, "is empty")
    return _check_text(value, name, where)


def _as_id(value: Any, name: str, where: Where) -> str:
    """Ids are non-empty strings; integers are accepted and converted (booleans are not ids)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(*where, name, f"must be a string (or an integer), got {_json_type(value)}")
    if not value.strip():
        raise DataError(*where, name, "is empty")
    return _check_text(value, name, where)


@overload
def _require_id(obj: dict, name: str, where: Where, *, optional: Literal[False] = ...) -> str: ...
@overload
def _require_id(obj: dict, name: str, where: Where, *, optional: bool) -> str | None: ...
def _require_id(obj: dict, name: str, where: Where, *, optional: bool = False) -> str | None:
    if obj.get(name) is None:
        if optional:
            return None
        raise DataError(*where, name, "is missing")
    return _as_id(obj[name], name, where)


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, as the file's author wrote it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _require_responses(obj: dict, where: Where) -> list[str]:
    responses = obj.get("responses")
    if responses is None:
        raise DataError(*where, "responses", "is missing")
    if not isinstance(responses, list):
        raise DataError(*where, "responses", "must be a list of strings")
    if not K_MIN <= len(responses) <= K_MAX:
        raise DataError(*where, "responses", f"has K={len(responses)}; K must be {K_MIN}..{K_MAX}")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise DataError(*where, f"responses[{i}]", f"must be a string, got {_json_type(r)}")
        if not r.strip():
            raise DataError(*where, f"responses[{i}]", "is empty")
        _check_text(r, f"responses[{i}]", where)
    return list(responses)


def _optional_per_response(obj: dict, name: str, k: int, where: Where) -> list | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != k:
        raise DataError(*where, name, f"must be a list with one entry per response ({k})")
    return list(value)


def _optional_ended(obj: dict, k: int, where: Where) -> list[bool] | None:
    ended = _optional_per_response(obj, "ended", k, where)
    if ended is not None:
        for i, e in enumerate(ended):
            if not isinstance(e, bool):
                raise DataError(*where, f"ended[{i}]", "must be true or false")
    return ended


def _optional_response_ids(obj: dict, k: int, where: Where) -> list[list[int]] | None:
    """Per-response sampled token ids: a list of non-negative integers for each response."""
    ids = _optional_per_response(obj, "response_ids", k, where)
    if ids is not None:
        for i, row in enumerate(ids):
            tokens = row if isinstance(row, list) else [None]
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
                raise DataError(*where, f"response_ids[{i}]", "must be a list of token ids (integers >= 0)")
    return ids


def _optional_policies(obj: dict, k: int, where: Where) -> list[str] | None:
    """Per-response policy names: ids (strings or integers), one per response."""
    policies = _optional_per_response(obj, "policies", k, where)
    if policies is None:
        return None
    return [_as_id(p, f"policies[{i}]", where) for i, p in enumerate(policies)]


def parse_record(obj: Any, kind: str, path: str | Path = "<memory>", line: int | None = None) -> Record:
    """Validate one decoded JSON object as ``kind`` and return its record."""
    where = (path, line)
    if not isinstance(obj, dict):
        raise DataError(*where, None, f"expected a JSON object, got {_json_type(obj)}")
    if kind == "prompt":
        return Prompt(
            id=_require_id(obj, "id", where),
            text=_require_str(obj, "text", where),
            user_id=_require_id(obj, "user_id", where, optional=True),
            category=_require_str(obj, "category", where, optional=True),
        )
    if kind == "demonstration":
        return Demonstration(
            prompt=_require_str(obj, "prompt", where),
            response=_require_str(obj, "response", where),
            prompt_id=_require_id(obj, "prompt_id", where, optional=True),
            labeler_id=_require_id(obj, "labeler_id", where, optional=True),
        )
    if kind == "pretrain":
        return PretrainText(text=_require_str(obj, "text", where))
    if kind == "sample":
        responses = _require_responses(obj, where)
        return Sample(
            prompt=_require_str(obj, "prompt", where),
            responses=responses,
            prompt_id=_require_id(obj, "prompt_id", where, optional=True),
            policies=_optional_policies(obj, len(responses), where),
            user_id=_require_id(obj, "user_id", where, optional=True),
            category=_require_str(obj, "category", where, optional=True),
            ended=_optional_ended(obj, len(responses), where),
            response_ids=_optional_response_ids(obj, len(responses), where),
        )
    if kind == "comparison":
        prompt = _require_str(obj, "prompt", where)
        responses = _require_responses(obj, where)
        k = len(responses)
        ranking = obj.get("ranking")
        if ranking is None:
            raise DataError(*where, "ranking", "is missing")
        if not isinstance(ranking, list) or len(ranking) != k:
            raise DataError(*where, "ranking", f"must list one rank per response ({k} responses)")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranking):
            raise DataError(*where, "ranking", "ranks must be integers >= 1 (1 = best)")
        if len(set(ranking)) == 1:
            raise DataError(*where, "ranking", "all responses tie: the comparison holds no pair")
        likert = _optional_per_response(obj, "likert", k, where)
        if likert is not None:
            for i, s in enumerate(likert):
                if not isinstance(s, int) or isinstance(s, bool) or not LIKERT_MIN <= s <= LIKERT_MAX:
                    raise DataError(*where, f"likert[{i}]", f"must be an integer {LIKERT_MIN}..{LIKERT_MAX}")
        flags = _optional_per_response(obj, "flags", k, where)
        if flags is not None:
            for i, f in enumerate(flags):
                if not isinstance(f, dict):
                    raise DataError(*where, f"flags[{i}]", "must be an object {flag: bool}")
                for name, v in f.items():
                    if name not in FLAGS:
                        raise DataError(*where, f"flags[{i}].{name}", f"unknown flag; known: {', '.join(FLAGS)}")
                    if not isinstance(v, bool):
                        raise DataError(*where, f"flags[{i}].{name}", "must be true or false")
        return Comparison(
            prompt=prompt,
            responses=responses,
            ranking=list(ranking),
            labeler_id=_require_id(obj, "labeler_id", where, optional=True),
            prompt_id=_require_id(obj, "prompt_id", where, optional=True),
            likert=likert,
            flags=flags,
            policies=_optional_policies(obj, k, where),
            ended=_optional_ended(obj, k, where),
            response_ids=_optional_response_ids(obj, k, where),
        )
    raise ValueError(f"unknown record kind {kind!r}; known: {', '.join(KINDS)}")


# --------------------------------------------------------------------------------------------
# The shapes users bring, read as they are: each row is put in tether's own fields first.

# ShareGPT-style turns ({"from": "human", "value": …}) name their roles this way.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
# HH-RLHF stores a conversation as text: "\n\nHuman: …\n\nAssistant: …".
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _parse_turns(value: Any, name: str, where: Where) -> list[Turn]:
    """A conversation (a list of {role, content} objects) as turns, every fault naming its turn."""
    if not isinstance(value, list) or not value:
        raise DataError(*where, name, f"must be a non-empty list of {{role, content}} turns, got {_json_type(value)}")
    turns = []
    for i, t in enumerate(value):
        here = f"{name}[{i}]"
        if not isinstance(t, dict):
            raise DataError(*where, here, f"must be an object {{role, content}}, got {_json_type(t)}")
        role, content = t.get("role", t.get("from")), t.get("content", t.get("value"))
        role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise DataError(*where, f"{here}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if role == "system" and i > 0:
            raise DataError(*where, f"{here}.role", "a system turn may only come first")
        if not isinstance(content, str):
            raise DataError(*where, f"{here}.content", f"must be a string, got {_json_type(content)}")
        if not content.strip():
            raise DataError(*where, f"{here}.content", "is empty")
        turns.append(Turn(role, _check_text(content, f"{here}.content", where)))
    return turns


def _hh_turns(text: str) -> list[Turn] | None:
    """HH-RLHF text ("\\n\\nHuman: …\\n\\nAssistant: …") as turns; None for text of another shape."""
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n"))
    if len(parts) < 3 or parts[0].strip():
        return None
    roles, contents = parts[1::2], parts[2::2]
    return [Turn("user" if r == "Human" else "assistant", c.strip()) for r, c in zip(roles, contents, strict=True)]


def _prompt_of(turns: Sequence[Turn], name: str, where: Where) -> str:
    """The prompt the turns make: the text of a lone user turn, else a Conversation."""
    if not turns:
        raise DataError(*where, name, "holds no turns before the response: no prompt")
    if turns[-1].role != "user":
        raise DataError(*where, name, f"the prompt must end with a user turn, not {turns[-1].role}")
    if len(turns) == 1:
        return turns[0].content
    return Conversation(turns)


def _response_of(value: Any, name: str, where: Where) -> Any:
    """A response given as text, or as a conversation of one assistant turn (TRL's conversational shape)."""
    if not isinstance(value, list):
        return value  # parse_record checks it is a non-empty string
    turns = _parse_turns(value, name, where)
    if len(turns) != 1 or turns[0].role != "assistant":
        raise DataError(*where, name, "must be one assistant turn (the response), got " + _roles(turns))
    return turns[0].content


def _roles(turns: Sequence[Turn]) -> str:
    return "turns " + ", ".join(t.role for t in turns)


def _preference(obj: dict, where: Where) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) from ``prompt``/``chosen``/``rejected`` or, without a prompt, from
    two whole conversations whose shared leading turns are the prompt (HH-RLHF)."""
    for name in ("chosen", "rejected"):
        if obj.get(name) is None:
            raise DataError(*where, name, "is missing (a preference pair has both chosen and rejected)")
    if obj.get("prompt") is not None:
        prompt = obj["prompt"]
        if isinstance(prompt, list):
            prompt = _prompt_of(_parse_turns(prompt, "prompt", where), "prompt", where)
        chosen, rejected = (_response_of(obj[n], n, where) for n in ("chosen", "rejected"))
        return prompt, chosen, rejected
    whole = []
    for name in ("chosen", "rejected"):
        value = obj[name]
        turns = _hh_turns(value) if isinstance(value, str) else _parse_turns(value, name, where)
        if turns is None:
            raise DataError(
                *where,
                name,
                "is plain text without a prompt field: give 'prompt', or whole conversations "
                "(lists of {role, content}, or HH-RLHF text with '\\n\\nHuman:' / '\\n\\nAssistant:' turns)",
            )
        whole.append(turns)
    chosen_turns, rejected_turns = whole
    shared = 0
    while shared < min(len(chosen_turns), len(rejected_turns)) and chosen_turns[shared] == rejected_turns[shared]:
        shared += 1
    # The prompt is the shared turns up to the last user turn; each answer is the one assistant turn after it.
    while shared and chosen_turns[shared - 1].role != "user":
        shared -= 1
    answers = []
    for name, turns in (("chosen", chosen_turns), ("rejected", rejected_turns)):
        rest = turns[shared:]
        if len(rest) != 1 or rest[0].role != "assistant":
            raise DataError(
                *where,
                name,
                "chosen and rejected must share every turn but a last assistant one; after the shared "
                f"turns this has {_roles(rest) if rest else 'no turns'}",
            )
        answers.append(rest[0].content)
    return _prompt_of(chosen_turns[:shared], "chosen", where), answers[0], answers[1]


def content_id(prompt: str) -> str:
    """A stable id for a prompt without one: a hash of its content (its turns for a Conversation)."""
    body = json.dumps(prompt_json(prompt), ensure_ascii=False, sort_keys=True)
    return "p-" + hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]


def tether_shape(obj: dict, kind: str, where: Where = ("<memory>", None)) -> dict:
    """A row of any shape :func:`guess_kind` knows, in tether's own fields for ``kind``.

    Fields already in tether's shape pass through; extra fields stay (and are ignored). Reading a
    file of demonstrations, samples or comparisons as prompts takes each row's prompt.
    """
    out = dict(obj)
    if kind == "pretrain":
        return out
    if obj.get("messages") is not None:
        turns = _parse_turns(obj["messages"], "messages", where)
        if turns[-1].role == "assistant":
            out["prompt"], out["response"] = _prompt_of(turns[:-1], "messages", where), turns[-1].content
        elif kind == "demonstration":
            raise DataError(*where, "messages", "must end with an assistant turn (the response), not " + turns[-1].role)
        else:
            out["prompt"] = _prompt_of(turns, "messages", where)
    elif kind in ("comparison", "prompt") and "ranking" not in obj and ("chosen" in obj or "rejected" in obj):
        out["prompt"], chosen, rejected = _preference(obj, where)
        out["responses"], out["ranking"] = [chosen, rejected], [1, 2]
    else:
        for name in ("prompt", "text") if kind == "prompt" else ("prompt",):
            if isinstance(obj.get(name), list):
                out[name] = _prompt_of(_parse_turns(obj[name], name, where), name, where)
        if obj.get("completion") is not None and obj.get("response") is None:
            out["response"] = _response_of(obj["completion"], "completion", where)
    if kind == "prompt":
        if out.get("text") is None:
            out["text"] = out.get("prompt")
        if out.get("id") is None:
            out["id"] = out.get("prompt_id")
        if out.get("id") is None and isinstance(out["text"], str) and out["text"].strip():
            out["id"] = content_id(out["text"])
    return out


def guess_kind(obj: dict) -> str:
    """The record kind a JSON object most likely is, from its fields (tether's or another shape's)."""
    if "ranking" in obj or ("chosen" in obj and "rejected" in obj):
        return "comparison"
    if "responses" in obj:
        return "sample"
    if "response" in obj or "completion" in obj:
        return "demonstration"
    if "messages" in obj:
        messages = obj["messages"]
        last = messages[-1] if isinstance(messages, list) and messages else None
        role = last.get("role", last.get("from")) if isinstance(last, dict) else None
        return (
            "demonstration"
            if role in ("assistant", *(a for a, r in _ROLE_ALIASES.items() if r == "assistant"))
            else "prompt"
        )
    if "user_id" in obj or "id" in obj or "prompt" in obj:
        return "prompt"
    if "text" in obj:
        return "pretrain"
    raise ValueError(
        "cannot tell the record kind from fields "
        + ", ".join(sorted(obj))
        + "; known shapes: messages; prompt + completion; prompt + chosen + rejected; chosen + rejected; "
        "prompt; text; and tether's own (docs/data-formats.md)"
    )


# --------------------------------------------------------------------------------------------
# Reading and writing


# Byte signatures of files that are not UTF-8 JSONL, to say what the file is instead.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xfe", "is UTF-16 (little-endian) text"),
    (b"\xfe\xff", "is UTF-16 (big-endian) text"),
    (b"\x1f\x8b", "is gzip-compressed"),
    (b"PK\x03\x04", "is a zip archive"),
    (b"PAR1", "is a Parquet file without the .parquet suffix"),
)
_UTF8_BOM = b"\xef\xbb\xbf"


class _LongInt:
    """Stands in for an integer literal too long for ``int()``, so the field can be named."""

    def __init__(self, digits: str):
        self.digits = len(digits.lstrip("-"))


def _long_int_field(text: str) -> tuple[str | None, int]:
    """The dotted path (``ranking[2]``, ``meta.x``) and length of the first over-long integer."""
    limit = sys.get_int_max_str_digits()
    obj = json.loads(text, parse_int=lambda s: _LongInt(s) if len(s) > limit else int(s))
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:  # iterative: the object may be nested deeply
        value, where = stack.pop()
        if isinstance(value, _LongInt):
            return where or None, value.digits
        if isinstance(value, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k)) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(value))))
    return None, limit


def _decode_line(text: str, path: str | Path, line: int) -> Any:
    """``json.loads`` of one line, every failure a DataError naming the file, line and field."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            path, line, None, f"is not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
        ) from None
    except RecursionError:
        raise DataError(path, line, None, "nests arrays or objects too deeply to be read") from None
    except ValueError:  # an integer literal longer than Python converts (sys.get_int_max_str_digits)
        try:
            field_name, digits = _long_int_field(text)
        except RecursionError:
            raise DataError(path, line, None, "nests arrays or objects too deeply to be read") from None
        limit = sys.get_int_max_str_digits()
        raise DataError(
            path, line, field_name, f"is a {digits}-digit integer; at most {limit} digits are read"
        ) from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, decoded object) per non-blank line; a line that cannot be decoded gives a DataError
    in place of its object, so that a reader may go on to the next line."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below; binary so a bad byte is found per line
    except OSError as e:
        raise DataError(path, None, None, f"cannot be read ({e.strerror})") from None
    with fh:
        for i, raw in enumerate(fh, start=1):
            if i == 1:
                for magic, what in _SIGNATURES:
                    if raw.startswith(magic):
                        raise DataError(path, None, None, f"{what}; tether reads JSONL as UTF-8 text")
                raw = raw.removeprefix(_UTF8_BOM)  # what some Windows editors write: harmless
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield (
                    i,
                    DataError(
                        path,
                        i,
                        None,
                        f"is not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the "
                        "line); tether reads JSONL as UTF-8: convert the file, e.g. `iconv -f latin1 -t utf-8`",
                    ),
                )
                continue
            if "\x00" in text:
                error = DataError(path, i, None, "holds NUL bytes: is it UTF-16 or binary? tether reads JSONL as UTF-8")
                if i == 1:  # the whole file is of another encoding: one error, not one per line
                    raise error
                yield i, error
                continue
            if text.strip():
                try:
                    yield i, _decode_line(text.rstrip("\r\n"), path, i)
                except DataError as e:
                    yield i, e


def _dataset_rows(source: str, ds: Any, split: str | None) -> Iterator[tuple[int, Any]]:
    """Rows of a ``datasets`` Dataset, or of one split of a DatasetDict."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise DataError(source, None, None, f"holds splits {list(ds)}; name one as {source}:SPLIT")
        ds = ds[split]
    elif split is not None:
        raise DataError(source, None, None, f"holds one dataset, not splits: leave out ':{split}'")
    for i, row in enumerate(ds):
        yield i + 1, row


def _cached_dataset(name: str, split: str | None) -> Any:
    """A ``datasets`` name from the local cache, offline: never a download. Offline mode is set in
    ``datasets`` for this call only, so that a model download asked for elsewhere in the same
    command (``--model.allow-download``) is not turned off by it."""
    try:  # datasets (seconds to import) loads only for the inputs that need it
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError(name, None, None, "reading a datasets name needs `datasets`") from e
    config = datasets.config
    was = config.HF_HUB_OFFLINE, config.HF_DATASETS_OFFLINE
    config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True
    cache_dir = os.environ.get("HF_DATASETS_CACHE")  # read now, not at datasets' import
    try:
        return datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds for "not cached"; each becomes one DataError
        raise DataError(
            name,
            None,
            None,
            "is neither a file nor a dataset in the local datasets cache "
            f"({cache_dir or config.HF_DATASETS_CACHE}); tether reads datasets offline, never "
            f"downloading: load it once with `datasets.load_dataset` where there is a network ({type(e).__name__})",
        ) from None
    finally:
        config.HF_HUB_OFFLINE, config.HF_DATASETS_OFFLINE = was


def _raw_rows(source: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded object or DataError) from JSONL, Parquet, a datasets directory (DIR
    or DIR:SPLIT) or a datasets name in the local cache (NAME or NAME:SPLIT)."""
    path = Path(source)
    if not path.exists():
        name, _, split = str(source).rpartition(":") if ":" in str(source) else (str(source), "", "")
        if Path(name).is_dir():
            path = Path(name)
        elif re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) and not Path(name).suffix:
            yield from _dataset_rows(str(source), _cached_dataset(name, split or None), None)
            return
        else:
            raise DataError(source, None, None, "does not exist")
    else:
        split = ""
    if path.is_dir():
        try:  # datasets (seconds to import) and pyarrow load only for the inputs that need them
            import datasets
        except ImportError as e:  # pragma: no cover - datasets is a dependency
            raise DataError(path, None, None, "reading a datasets directory needs `datasets`") from e
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(path, None, None, "is a directory but not a `datasets` one (save_to_disk)") from None
        yield from _dataset_rows(str(source), ds, split or None)
        return
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise DataError(path, None, None, f"is not a readable Parquet file ({e})") from None
        for i, row in enumerate(rows):
            yield i + 1, {k: v for k, v in row.items() if v is not None}
        return
    yield from _jsonl_rows(path)


@dataclass(frozen=True)
class Row:
    """One row of a file as read: its record, or what is wrong with it, and where it came from."""

    line: int
    record: Record | None
    error: DataError | None
    raw: Any  # the decoded object as the file holds it (None where it could not be decoded)


def read_rows(source: str | Path, kind: str | None = None) -> Iterator[Row]:
    """Every row of a file, a bad one with its error in place of a record (the reader goes on).

    ``kind`` is guessed from the first row whose kind can be told when not given. A fault of the
    whole file (missing, not UTF-8 but UTF-16, not Parquet) raises DataError.
    """
    generated: dict[str, int] = {}  # content-hash ids given so far, to number repeated prompts
    for line, obj in _raw_rows(source):
        if isinstance(obj, DataError):
            yield Row(line, None, obj, None)
            continue
        try:
            if not isinstance(obj, dict):
                raise DataError(source, line, None, f"expected a JSON object, got {_json_type(obj)}")
            if kind is None:
                try:
                    kind = guess_kind(obj)
                except ValueError as e:
                    raise DataError(source, line, None, str(e)) from None
            where = (source, line)
            record = parse_record(tether_shape(obj, kind, where), kind, *where)
            if isinstance(record, Prompt) and obj.get("id") is None and obj.get("prompt_id") is None:
                # A repeated prompt without an id gets its hash numbered: an id names one prompt.
                seen = generated[record.id] = generated.get(record.id, 0) + 1
                record = record if seen == 1 else replace(record, id=f"{record.id}-{seen}")
            yield Row(line, record, None, obj)
        except DataError as e:
            yield Row(line, None, e, obj)


def read_records(source: str | Path, kind: str | None = None) -> list:
    """Read and validate a whole file (or datasets name); raises DataError at the first bad record.

    ``kind`` is guessed from the first record when not given.
    """
    records = []
    for row in read_rows(source, kind):
        if row.error is not None:
            raise row.error
        records.append(row.record)
    if not records:
        raise DataError(source, None, None, "holds no records")
    return records


def to_json(record: Record) -> dict:
    """A record as a JSON-ready dict, dropping optional fields that are None; a Conversation
    prompt is written as its turns."""
    out = {k: v for k, v in asdict(record).items() if v is not None}
    for name in ("prompt", "text"):
        if isinstance(out.get(name), Conversation):
            out[name] = out[name].messages()
    return out


def write_records(path: str | Path, records: Iterable) -> Path:
    """Write records as JSONL atomically (temp file + rename): a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            obj = r if isinstance(r, dict) else to_json(r)
            fh.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)
    return path


def kind_of(record: Record) -> str:
    return next(k for k, t in RECORD_TYPES.items() if isinstance(record, t))


@dataclass
class ValidationReport:
    path: str
    kind: str | None  # None when no row could be read
    count: int  # good records
    stats: dict = field(default_factory=dict)
    errors: list[DataError] = field(default_factory=list)  # the first max_errors bad rows
    bad_rows: int = 0  # every bad row, also those past max_errors


def validate_file(path: str | Path, kind: str | None = None, max_errors: int = 50) -> ValidationReport:
    """Check every row of a file and summarise it (``tether data validate``): each bad row is
    counted and the first ``max_errors`` kept, so that one run lists what to fix."""
    records: list = []
    report = ValidationReport(str(path), kind, 0)
    try:
        for row in read_rows(path, kind):
            if row.error is not None:
                report.bad_rows += 1
                if len(report.errors) < max_errors:
                    report.errors.append(row.error)
            else:
                records.append(row.record)
    except DataError as e:  # the whole file: nothing more to read in it
        report.bad_rows += 1
        report.errors.append(e)
    if not records and not report.errors:
        report.errors.append(DataError(path, None, None, "holds no records"))
        report.bad_rows = 1
    if not records:
        return report
    report.kind, report.count = kind_of(records[0]), len(records)
    if report.kind == "comparison":
        ks = [r.k for r in records]
        labelers = {r.labeler_id for r in records if r.labeler_id is not None}
        report.stats = {
            "K": f"{min(ks)}..{max(ks)}",
            "pairs": sum(len(r.pairs()) for r in records),
            "labelers": len(labelers) if labelers else "none (no labeler_id)",
        }
    elif report.kind == "prompt":
        users = {r.user_id for r in records if r.user_id is not None}
        report.stats = {"users": len(users) if users else "none (no user_id)"}
    return report
