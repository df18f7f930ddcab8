"""The data contracts that cross tether's stage boundaries.

Every file tether reads or writes is one of these record kinds, stored one JSON object per line
(JSONL); Parquet files and ``datasets`` directories (``save_to_disk``) with the same columns are
read too. Field by field:

``prompt``         {"id": str, "text": str, "user_id": str, "category": str?}
``demonstration``  {"prompt": str, "response": str, "prompt_id": str?, "labeler_id": str?}
``sample``         {"prompt": str, "responses": [str] (K = 2..9), "prompt_id": str?,
                    "policies": [str]? (one per response), "ended": [bool]? (one per response),
                    "user_id": str?, "category": str?}
``comparison``     {"prompt": str, "responses": [str] (K = 2..9), "ranking": [int] (one rank per
                    response, 1 = best, equal ranks = a tie), "labeler_id": str,
                    "prompt_id": str?, "likert": [int 1..7]?, "flags": [{flag: bool}]?,
                    "policies": [str]?, "ended": [bool]?}
``pretrain``       {"text": str}

Bad input raises :class:`DataError` naming the file, the line (1-based; the row for Parquet) and
the field. ``ended[i]`` is false for a sampled response that ran out of tokens before the model
ended it (EOS); absent means every response ended, as a written one does. The reward model trains
on a response as the policy wrote it: EOS after an ended one, none after a cut one. Extra fields
are allowed and ignored (keep provenance in them, e.g. ``meta``). A file
is validated whole before anything trains on it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
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


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    user_id: str
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


@dataclass(frozen=True)
class Comparison:
    """One labeler's ranking of K responses to one prompt (InstructGPT §3.5)."""

    prompt: str
    responses: list[str]
    ranking: list[int]  # ranking[i] = rank of responses[i]; 1 = best; equal = tie
    labeler_id: str
    prompt_id: str | None = None
    likert: list[int] | None = None
    flags: list[dict[str, bool]] | None = None
    policies: list[str] | None = None
    ended: list[bool] | None = None  # per response: it ended with EOS (None: all did)

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
            user_id=_require_id(obj, "user_id", where),
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
            labeler_id=_require_id(obj, "labeler_id", where),
            prompt_id=_require_id(obj, "prompt_id", where, optional=True),
            likert=likert,
            flags=flags,
            policies=_optional_policies(obj, k, where),
            ended=_optional_ended(obj, k, where),
        )
    raise ValueError(f"unknown record kind {kind!r}; known: {', '.join(KINDS)}")


def guess_kind(obj: dict) -> str:
    """The record kind a JSON object most likely is, from its fields."""
    if "ranking" in obj:
        return "comparison"
    if "responses" in obj:
        return "sample"
    if "response" in obj:
        return "demonstration"
    if "user_id" in obj or "id" in obj:
        return "prompt"
    if "text" in obj:
        return "pretrain"
    raise ValueError("cannot tell the record kind from fields " + ", ".join(sorted(obj)))


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
                raise DataError(
                    path,
                    i,
                    None,
                    f"is not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the "
                    "line); tether reads JSONL as UTF-8: convert the file, e.g. `iconv -f latin1 -t utf-8`",
                ) from None
            if "\x00" in text:
                raise DataError(path, i, None, "holds NUL bytes: is it UTF-16 or binary? tether reads JSONL as UTF-8")
            if text.strip():
                yield i, _decode_line(text.rstrip("\r\n"), path, i)


def _raw_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded object) from JSONL, Parquet or a datasets directory."""
    if path.is_dir():
        try:  # datasets (seconds to import) and pyarrow load only for the inputs that need them
            import datasets
        except ImportError as e:  # pragma: no cover - datasets is a dependency
            raise DataError(path, None, None, "reading a datasets directory needs `datasets`") from e
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(path, None, None, "is a directory but not a `datasets` one (save_to_disk)") from None
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(path, None, None, f"holds splits {list(ds)}; pass one split's folder")
        for i, row in enumerate(ds):
            yield i + 1, row
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


def read_records(path: str | Path, kind: str | None = None) -> list:
    """Read and validate a whole file; raises DataError at the first bad record.

    ``kind`` is guessed from the first record when not given.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "does not exist")
    records = []
    for line, obj in _raw_rows(path):
        if kind is None:
            if not isinstance(obj, dict):
                raise DataError(path, line, None, f"expected a JSON object, got {_json_type(obj)}")
            try:
                kind = guess_kind(obj)
            except ValueError as e:
                raise DataError(path, line, None, str(e)) from None
        records.append(parse_record(obj, kind, path, line))
    if not records:
        raise DataError(path, None, None, "holds no records")
    return records


def to_json(record: Record) -> dict:
    """A record as a JSON-ready dict, dropping optional fields that are None."""
    return {k: v for k, v in asdict(record).items() if v is not None}


def write_records(path: str | Path, records: Iterable) -> Path:
    """Write records as JSONL atomically (temp file + rename): a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            obj = r if isinstance(r, dict) else to_json(r)
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


@dataclass
class ValidationReport:
    path: str
    kind: str
    count: int
    stats: dict = field(default_factory=dict)


def validate_file(path: str | Path, kind: str | None = None) -> ValidationReport:
    """Validate a file whole and summarise it (used by ``tether data validate``)."""
    records = read_records(path, kind)
    kind = next(k for k, t in RECORD_TYPES.items() if isinstance(records[0], t))
    stats: dict = {}
    if kind == "comparison":
        ks = [r.k for r in records]
        stats = {
            "K": f"{min(ks)}..{max(ks)}",
            "pairs": sum(len(r.pairs()) for r in records),
            "labelers": len({r.labeler_id for r in records}),
        }
    elif kind == "prompt":
        stats = {"users": len({r.user_id for r in records})}
    return ValidationReport(str(path), kind, len(records), stats)
