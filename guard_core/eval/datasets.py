"""Reading public safety sets into one shape: a prompt, maybe a response, and gold labels.

Every public set spells its labels differently (``"unsafe"``, ``is_safe: false``, ``toxicity: 1``,
eight OpenAI flags, "every row is harmful"). Each known set therefore gets a ``DatasetSpec`` that
says which file to read, which columns hold the text and how a row's label becomes *unsafe or
not*; anything else is read through the same machinery with the columns named on the command
line. Items are identified by their content (see ``EvalItem.key``), so a stored prediction
stays tied to the text and labels it was made for whichever slice of the set a run evaluates,
and an edited or reordered file never reuses a prediction for another row.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from ..messages import normalize_messages

Row = Mapping[str, Any]


@dataclass(frozen=True)
class EvalItem:
    """One thing to moderate and what humans said about it.

    ``unsafe`` is the gold safety label (None when the set has none, e.g. refusal-only sets);
    ``span`` is the labelled unsafe part of the response as character offsets, used to measure
    where a Stream guard stops the response.
    """

    dataset: str
    index: int
    prompt: str
    response: str | None = None
    unsafe: bool | None = None
    refusal: bool | None = None
    categories: tuple[str, ...] = ()
    span: tuple[int, int] | None = None

    @property
    def key(self) -> str:
        """Identity of the item across runs: the set's name and a hash of everything judged or scored.

        The row number is not part of it, so reordering a file reuses its predictions, while
        editing a row's text or labels gives it a new key: a stored prediction is never
        reported against labels it was not made for.
        """
        content = json.dumps([self.prompt, self.response, self.unsafe, self.refusal, list(self.categories),
                              list(self.span) if self.span else None])
        return f"{self.dataset}#{hashlib.sha256(content.encode('ascii')).hexdigest()[:16]}"

    @property
    def level(self) -> str:
        """``response`` when a response is moderated, else ``prompt``."""
        return "prompt" if self.response is None else "response"

    def messages(self) -> list[dict[str, str]]:
        """The conversation a guard moderates for this item."""
        turns = [{"role": "user", "content": self.prompt}]
        if self.response is not None:
            turns.append({"role": "assistant", "content": self.response})
        return turns


@dataclass(frozen=True)
class LabelRule:
    """How a row becomes a yes/no label (unsafe, or refused).

    ``column`` values are compared case-insensitively as strings; a value in ``positive`` is yes,
    one in ``negative`` no, anything else is an error (a typo in a mapping must not silently
    count as safe). With ``negative`` empty every non-positive value is no; an empty or null
    value is an error either way (a missing label is not a "no"). ``flags`` reads
    several 0/1 columns, yes when any is 1 (missing columns are unknown, not 0). ``constant`` is
    for sets where every row has the same label.
    """

    column: str | None = None
    positive: frozenset[str] = frozenset()
    negative: frozenset[str] = frozenset()
    flags: tuple[str, ...] = ()
    constant: bool | None = None

    def __call__(self, row: Row, where: str) -> bool:
        if self.constant is not None:
            return self.constant
        if self.flags:
            return any(_text(row.get(f)) in ("1", "true") for f in self.flags)
        assert self.column is not None
        value = _text(_require(row, self.column, where))
        if not value:
            raise ValueError(f"{where}: column {self.column!r} is empty; a row without a label cannot be scored, "
                             "so label it or leave it out of the file")
        if value in self.positive:
            return True
        if not self.negative or value in self.negative:
            return False
        raise ValueError(
            f"{where}: column {self.column!r} has value {value!r}, which is neither positive "
            f"({', '.join(sorted(self.positive))}) nor negative ({', '.join(sorted(self.negative))})"
        )

    def describe(self) -> str:
        """Human-readable rule for ``--list-sets``."""
        if self.constant is not None:
            return "every row " + ("positive" if self.constant else "negative")
        if self.flags:
            return f"any of {', '.join(self.flags)} = 1"
        return f"{self.column} in {{{', '.join(sorted(self.positive))}}}"


def label(column: str, positive: Iterable[Any], negative: Iterable[Any] = ()) -> LabelRule:
    """A rule reading one column; see ``LabelRule``."""
    return LabelRule(column, frozenset(map(_text, positive)), frozenset(map(_text, negative)))


@dataclass(frozen=True)
class CategoryRule:
    """Where a row's gold categories are: one text column, a dict of flags, or 0/1 columns."""

    column: str | None = None
    flag_dict: str | None = None
    flag_columns: tuple[str, ...] = ()
    ignore: frozenset[str] = frozenset()

    def __call__(self, row: Row) -> tuple[str, ...]:
        found: list[str] = []
        if self.column is not None:
            value = str(row.get(self.column) or "").strip()
            found = [value] if value else []
        elif self.flag_dict is not None:
            flags = row.get(self.flag_dict) or {}
            found = [k for k, v in flags.items() if v is True or _text(v) in ("1", "true")]
        else:
            found = [c for c in self.flag_columns if _text(row.get(c)) in ("1", "true")]
        return tuple(c for c in found if c.lower() not in self.ignore)


@dataclass(frozen=True)
class DatasetSpec:
    """How to read one evaluation set from a file.

    ``path`` is relative to the data root for registry entries (absolute for ``--file``);
    ``rows`` turns one raw record into zero or more rows (sets that pack two items per record,
    or nest their labels); spans are character offsets into the response.
    """

    name: str
    path: str
    text: str
    label: LabelRule | None
    response: str | None = None
    refusal: LabelRule | None = None
    categories: CategoryRule | None = None
    span: tuple[str, str] | None = None
    rows: Callable[[Row], Iterable[Row]] | None = None
    note: str = ""

    @property
    def level(self) -> str:
        """``response`` when the set moderates responses, else ``prompt``."""
        return "prompt" if self.response is None else "response"


@dataclass
class EvalSet:
    """A loaded set: its items (possibly a slice) and the size of the full set."""

    spec: DatasetSpec
    items: list[EvalItem]
    total: int = 0
    source: Path = field(default_factory=Path)

    @property
    def name(self) -> str:
        """The set's name as printed in tables."""
        return self.spec.name


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip().lower() if value is not None else ""


def _require(row: Row, column: str, where: str) -> Any:
    if column not in row:
        raise ValueError(f"{where}: no column {column!r} (columns: {', '.join(map(str, row))})")
    return row[column]


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Raw records of a ``.jsonl``, ``.json``, ``.csv`` file, each optionally gzipped, with where they are.

    ``where`` names the file and the record's first line (``path:LINE``, the numbers an editor
    shows) or, in a ``.json`` file, its position (``path record N``), for error messages. Every
    way a file can be unreadable (not UTF-8, not gzip, broken JSON, a CSV row whose cells do
    not match the header) is a one-line ``ValueError`` naming the file and where in it.
    """
    name = path.name.lower()
    compressed = name.endswith(".gz")
    base = name[:-3] if compressed else name
    if path.is_dir():
        raise ValueError(f"dataset file {path} is a directory, not a data file")
    if not path.is_file():
        if path.exists():
            raise ValueError(f"dataset file {path} is not a regular file")
        raise FileNotFoundError(f"dataset file {path} does not exist")
    if not base.endswith((".jsonl", ".json", ".csv")):
        raise ValueError(f"{path}: unsupported file type; use .jsonl, .json or .csv (optionally .gz)")
    raw = gzip.open(path, "rb") if compressed else open(path, "rb")
    try:
        with raw:
            lines = _utf8_lines(raw, path)
            if base.endswith(".jsonl"):
                for number, line in lines:
                    if line.strip():
                        try:
                            yield f"{path}:{number}", json.loads(line)
                        except json.JSONDecodeError as exc:
                            raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            elif base.endswith(".json"):
                text = "".join(line for _, line in lines)
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
                yield from ((f"{path} record {n}", record) for n, record in enumerate(_json_records(data, path), 1))
            else:
                # newline="" splits old-Mac "\r" endings too, as csv expects, without translating any
                yield from _csv_records((part for _, line in lines for part in io.StringIO(line, newline="")), path)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: not a readable gzip file ({exc})") from None


def _utf8_lines(raw: Iterable[bytes], path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a binary file, each line checked to be UTF-8 (a leading BOM is dropped)."""
    offset = 0
    for number, data in enumerate(raw, 1):
        if number == 1 and data.startswith(b"\xef\xbb\xbf"):
            data, offset = data[3:], 3
        try:
            yield number, data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: line {number} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset "
                             f"{offset + exc.start}); save the file as UTF-8") from None
        offset += len(data)


def _csv_records(lines: Iterable[str], path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The rows of a CSV file under its header; a row with more or fewer cells is an error naming its line.

    ``csv.DictReader`` would file extra cells under the key None and fill missing ones with None,
    so a text with an unquoted comma would shift its columns without a word.
    """
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.reader(lines)
    header = next(reader, None)
    while header is not None:
        start = reader.line_num + 1
        cells = next(reader, None)
        if cells is None:
            return
        if not cells:  # a blank line
            continue
        if len(cells) != len(header):
            raise ValueError(f"{path}:{start}: {len(cells)} cells under a header of {len(header)} columns; "
                             "quote a value that holds a comma")
        yield f"{path}:{start}", dict(zip(header, cells))


_RECORD_KEYS = ("instances", "data", "records", "rows", "examples")


def _json_records(data: Any, path: Path) -> list[dict[str, Any]]:
    """The list of records in a JSON file: the top-level list, or the list of records inside an object."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in _RECORD_KEYS:
            if isinstance(data.get(key), list):
                return data[key]
        lists = [v for v in data.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(lists) == 1:
            return lists[0]
    raise ValueError(f"{path}: expected a JSON list of records, or an object with the list under "
                     f"{', '.join(repr(k) for k in _RECORD_KEYS)} or as its only list of objects")


def load_set(spec: DatasetSpec, root: Path | None = None, *, limit: int | None = None) -> EvalSet:
    """Read a set; ``limit`` keeps that many items spread evenly over the whole set.

    Even spacing (rather than the first rows) keeps a slice's label mix close to the full set's,
    since many files are sorted by label.
    """
    path = Path(spec.path) if root is None else Path(root) / spec.path
    items: list[EvalItem] = []
    index = 0
    for where, record in read_records(path):
        if not isinstance(record, Mapping):
            raise ValueError(f"{where}: expected an object of columns, got {type(record).__name__}")
        for row in (spec.rows(record) if spec.rows else (record,)):
            items.append(_item(spec, row, index, where))
            index += 1
    if not items:
        raise ValueError(f"{path}: no rows")
    total = len(items)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if limit < total:
            items = [items[i * total // limit] for i in range(limit)]
    return EvalSet(spec, items, total, path)


def _item(spec: DatasetSpec, row: Row, index: int, where: str) -> EvalItem:
    prompt = _require(row, spec.text, where)
    response = None if spec.response is None else _require(row, spec.response, where)
    for column, value in ((spec.text, prompt), (spec.response, response)):
        if column is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{where}: column {column!r} is empty or not text")
    span = None
    if spec.span is not None:
        span = _span(row, spec.span, response, where)
    item = EvalItem(
        dataset=spec.name,
        index=index,
        prompt=prompt,
        response=response,
        unsafe=None if spec.label is None else spec.label(row, where),
        refusal=None if spec.refusal is None else spec.refusal(row, where),
        categories=spec.categories(row) if spec.categories else (),
        span=span,
    )
    try:
        normalize_messages(item.messages())
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return item


def _span(row: Row, columns: tuple[str, str], response: str | None, where: str) -> tuple[int, int] | None:
    start_raw, end_raw = row.get(columns[0]), row.get(columns[1])
    if _text(start_raw) in ("", "none", "null") and _text(end_raw) in ("", "none", "null"):
        return None
    if response is None:
        raise ValueError(f"{where}: an unsafe span needs a response column")
    try:
        start, end = int(start_raw), int(end_raw)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: span columns {columns} must hold integers, got {start_raw!r}, {end_raw!r}") from None
    if not 0 <= start < end <= len(response):
        raise ValueError(f"{where}: span [{start}, {end}) is not inside the {len(response)}-character response")
    return start, end


def _toxicchat_rows(record: Row) -> Iterable[Row]:
    notes = record["annotations"]
    yield {"prompt": record["instance"], "toxicity": notes["toxicity"]["majority_human"],
           "category": "jailbreaking" if str(notes["jailbreaking"]["majority_human"]) == "1" else ""}


def _harmbench_rows(record: Row) -> Iterable[Row]:
    context = (record.get("ContextString") or "").strip()
    yield {**record, "prompt": f"{context}\n\n---\n\n{record['Behavior']}" if context else record["Behavior"]}


def _jailbreakbench_rows(record: Row) -> Iterable[Row]:
    yield {"prompt": record["harmful_goal"], "label": "unsafe", "category": record["category"]}
    yield {"prompt": record["benign_goal"], "label": "safe", "category": ""}


_DNA_MODELS = ("GPT4", "ChatGPT", "Claude", "ChatGLM2", "llama2-7b-chat", "vicuna-7b")


def _do_not_answer_rows(record: Row) -> Iterable[Row]:
    for model in _DNA_MODELS:
        yield {"prompt": record["question"], "response": record[f"{model}_response"],
               "harmful": record[f"{model}_harmful"], "category": record["types_of_harm"]}


_UNSAFE = label("prompt_label", ["unsafe"], ["safe"])
_RESPONSE = label("response_label", ["unsafe"], ["safe"])
_ALL_UNSAFE = LabelRule(constant=True)
_OPENAI_FLAGS = ("S", "H", "V", "HR", "SH", "S3", "H2", "V2")

REGISTRY: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("toxicchat", "toxicchat/toxic_chat_test_human.json", "prompt", label("toxicity", [1], [0]),
                categories=CategoryRule("category"), rows=_toxicchat_rows,
                note="2,853 human-annotated test rows (the WildGuard/GuardReasoner suite)"),
    DatasetSpec("toxicchat-full", "toxicchat/toxic_chat_test_full.jsonl", "user_input", label("toxicity", [1], [0]),
                note="all 5,083 test rows"),
    DatasetSpec("openai-moderation", "openai-moderation/samples-1680.jsonl.gz", "prompt", LabelRule(flags=_OPENAI_FLAGS),
                categories=CategoryRule(flag_columns=_OPENAI_FLAGS), note="unsafe = any flag is 1"),
    DatasetSpec("aegis-1.0-test", "aegis-1.0-test/aegis_safety_test.jsonl", "prompt", _UNSAFE),
    DatasetSpec("simple-safety-tests", "simple-safety-tests/simple_safety_tests.csv", "prompts_final", _ALL_UNSAFE,
                categories=CategoryRule("harm_area"), note="all unsafe"),
    DatasetSpec("harmbench", "harmbench/harmbench_behaviors_text_test.csv", "prompt", _ALL_UNSAFE,
                categories=CategoryRule("SemanticCategory"), rows=_harmbench_rows,
                note="test split (320); contextual behaviors as context + '---' + request; all unsafe"),
    DatasetSpec("advbench", "advbench/advbench_behaviors.csv", "Behavior", _ALL_UNSAFE, note="all unsafe"),
    DatasetSpec("strongreject", "strongreject/strongreject_dataset.csv", "forbidden_prompt", _ALL_UNSAFE,
                categories=CategoryRule("category"), note="all unsafe"),
    DatasetSpec("jailbreakbench", "jailbreakbench/jbb_behaviors.csv", "prompt", label("label", ["unsafe"], ["safe"]),
                categories=CategoryRule("category"), rows=_jailbreakbench_rows,
                note="100 harmful goals (unsafe) + 100 benign goals (safe)"),
    DatasetSpec("wildguardtest-prompts-partial", "wildguardtest-prompts-partial/wildguardtest_prompts_partial.jsonl",
                "prompt", _UNSAFE, categories=CategoryRule("subcategory", ignore=frozenset({"benign"})),
                note="partial third-party copy; not comparable to WildGuardTest numbers"),
    DatasetSpec("xstest", "xstest/xstest_prompts.csv", "prompt", label("label", ["unsafe"], ["safe"]),
                categories=CategoryRule("type")),
    DatasetSpec("ailuminate-demo", "ailuminate-demo/airr_official_1.0_demo_en_us_prompt_set_release.csv",
                "prompt_text", _ALL_UNSAFE, categories=CategoryRule("hazard"), note="en_us; all unsafe"),
    DatasetSpec("jailbreak-prompts-in-the-wild", "jailbreak-prompts-in-the-wild/inthewild_jailbreak_prompts.jsonl",
                "prompt", _ALL_UNSAFE, note="all jailbreak attempts"),
    DatasetSpec("beavertails-30k-test", "beavertails-30k-test/beavertails_30k_test.jsonl", "prompt",
                label("is_safe", [False], [True]), response="response", categories=CategoryRule(flag_dict="category")),
    DatasetSpec("pku-saferlhf-test", "pku-saferlhf-test/saferlhf_test_2000.jsonl", "prompt", _RESPONSE, response="response"),
    DatasetSpec("harmbench-response", "harmbench-response/harmbench_response.jsonl", "prompt", _RESPONSE, response="response"),
    DatasetSpec("xstest-response", "xstest-response/xstest_response_harmfulness.jsonl", "prompt", _RESPONSE,
                response="response"),
    DatasetSpec("xstest-response-refusal", "xstest-response/xstest_response_refusal.jsonl", "prompt", None,
                response="response", refusal=label("refusal_label", ["refusal"], ["compliance"]),
                note="refusal labels only"),
    DatasetSpec("do-not-answer", "do-not-answer/data_en.csv", "prompt", label("harmful", [1], [0]), response="response",
                categories=CategoryRule("category"), rows=_do_not_answer_rows, note="939 questions x 6 model responses"),
)}

#: The English sets of the technical report's Gen tables that exist in a ../shared/datasets-style folder.
REPORT_SETS: tuple[str, ...] = (
    "toxicchat", "openai-moderation", "aegis-1.0-test", "simple-safety-tests", "harmbench",
    "wildguardtest-prompts-partial", "harmbench-response", "pku-saferlhf-test", "beavertails-30k-test",
    "xstest-response", "xstest-response-refusal",
)


def select_specs(names: Sequence[str] | None, root: Path) -> list[DatasetSpec]:
    """Registry entries by name; ``None`` means the report's sets, ``["all"]`` every known set.

    Without explicit names, sets whose files are missing under ``root`` are skipped, so the
    command works on a partial copy; a named set that is missing is an error.
    """
    if names is None or list(names) == ["all"]:
        wanted = REPORT_SETS if names is None else tuple(REGISTRY)
        specs = [REGISTRY[n] for n in wanted if (root / REGISTRY[n].path).is_file()]
        if not specs:
            raise ValueError(f"no known dataset files under {root}; see --list-sets for the expected layout")
        return specs
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown dataset(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    missing = [f"{n} ({root / REGISTRY[n].path})" for n in names if not (root / REGISTRY[n].path).is_file()]
    if missing:
        raise ValueError(f"dataset file(s) not found: {'; '.join(missing)}")
    return [REGISTRY[n] for n in names]


def file_spec(
    path: str | Path,
    *,
    text_col: str,
    label_col: str | None,
    positive: Sequence[str] = ("unsafe",),
    negative: Sequence[str] = (),
    response_col: str | None = None,
    refusal_col: str | None = None,
    refusal_positive: Sequence[str] = ("refusal",),
    category_col: str | None = None,
    span_cols: tuple[str, str] | None = None,
    name: str | None = None,
) -> DatasetSpec:
    """A spec for any JSONL/JSON/CSV file, with the columns named by the user."""
    path = Path(path)
    if label_col is None and refusal_col is None:
        raise ValueError("give --label-col (safety labels) or --refusal-col (refusal labels), or both")
    stem = path.name.split(".")[0]
    return DatasetSpec(
        name=name or stem,
        path=str(path),
        text=text_col,
        label=None if label_col is None else label(label_col, positive, negative),
        response=response_col,
        refusal=None if refusal_col is None else label(refusal_col, refusal_positive),
        categories=None if category_col is None else CategoryRule(category_col),
        span=span_cols,
        note=f"user file {path}",
    )
