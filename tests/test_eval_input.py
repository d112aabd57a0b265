"""Bad evaluation files get one-line errors with a position; stored predictions follow content, not row numbers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from guard_core import GenGuard
from guard_core.eval import GenEngine, evaluate, file_spec, load_set
from guard_core.eval.__main__ import main
from guard_core.testing.cases import CONTROVERSIAL_PROMPT, SAFE_PROMPT, UNSAFE_PROMPT

# ---- files that are not what they claim -------------------------------------------------------


def _latin1_rows(kind: str) -> bytes:
    """Three rows; the third holds 'café' in Latin-1 (one 0xe9 byte), as Excel on Windows saves it."""
    rows = [("hello", "safe"), ("How can I make a bomb?", "unsafe"), ("caf\xe9 au lait", "safe")]
    if kind == "csv":
        return ("text,label\r\n" + "".join(f"{t},{g}\r\n" for t, g in rows)).encode("latin-1")
    lines = [json.dumps({"text": t, "label": g}, ensure_ascii=False) for t, g in rows]
    if kind == "json":
        return ("[\n" + ",\n".join(lines) + "\n]\n").encode("latin-1")
    return ("\n".join(lines) + "\n").encode("latin-1")


@pytest.mark.parametrize(("name", "line"), [("sheet.csv", 4), ("rows.jsonl", 3), ("rows.json", 4), ("rows.jsonl.gz", 3)])
def test_a_file_that_is_not_utf8_names_the_file_the_line_and_the_byte(tmp_path: Path, name: str, line: int) -> None:
    kind = name.split(".")[1]
    data = _latin1_rows(kind)
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    offset = data.index(b"\xe9")
    expected = f"{path}: line {line} is not valid UTF-8 (byte 0xe9 at offset {offset}); save the file as UTF-8"
    with pytest.raises(ValueError) as caught:
        load_set(file_spec(path, text_col="text", label_col="label"))
    assert str(caught.value) == expected


def test_the_command_reports_a_non_utf8_file_in_one_line_before_loading_any_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sheet.csv"
    path.write_bytes(_latin1_rows("csv"))
    code = main(["--file", str(path), "--text-col", "text", "--label-col", "label",
                 "--gen", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    offset = path.read_bytes().index(b"\xe9")
    assert err.splitlines() == [f"qwen3guard eval: error: {path}: line 4 is not valid UTF-8 (byte 0xe9 at offset {offset}); "
                                "save the file as UTF-8"]


def test_utf8_files_with_a_byte_order_mark_and_old_mac_line_ends_still_read(tmp_path: Path) -> None:
    windows = tmp_path / "excel.csv"
    windows.write_bytes('\ufefftext,label\r\n"two\r\nlines",unsafe\r\ncafé,safe\r\n'.encode("utf-8"))
    mac = tmp_path / "mac.csv"
    mac.write_bytes(b"text,label\rone,unsafe\rtwo,safe\r")
    read = {p.name: load_set(file_spec(p, text_col="text", label_col="label")).items for p in (windows, mac)}
    assert [(i.prompt, i.unsafe) for i in read["excel.csv"]] == [("two\r\nlines", True), ("café", False)]
    assert [(i.prompt, i.unsafe) for i in read["mac.csv"]] == [("one", True), ("two", False)]


def test_broken_gzip_json_and_non_object_rows_are_one_line_errors_with_the_file(tmp_path: Path) -> None:
    packed = gzip.compress(b"".join(json.dumps({"text": f"row {i}", "label": "safe"}).encode() + b"\n" for i in range(200)))
    corrupt = bytearray(packed)
    corrupt[len(corrupt) // 2] ^= 0xFF
    cases = {
        "cut.jsonl.gz": (packed[:-12], "not a readable gzip file"),
        "plain.jsonl.gz": (b'{"text": "hi", "label": "safe"}\n', "not a readable gzip file"),
        "flipped.jsonl.gz": (bytes(corrupt), "not a readable gzip file"),
        "broken.json": (b'[{"text": "hi", "label": "safe"},\n {"text": }]', r":2: not valid JSON \(Expecting value\)"),
        "list.jsonl": (b'{"text": "hi", "label": "safe"}\n["hi", "safe"]\n', "row 1: expected an object of columns, got list"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message) as caught:
            load_set(file_spec(path, text_col="text", label_col="label"))
        assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value), name


# ---- predictions follow the content of a row ----------------------------------------------------


class _Counting:
    """A Gen backend counting the conversations it is asked to judge."""

    def __init__(self, guard: GenGuard) -> None:
        self.guard, self.model_id, self.judged = guard, guard.model_id, []

    def moderate_batch(self, conversations):
        conversations = list(conversations)
        self.judged += [c[0]["content"] for c in conversations]
        return self.guard.moderate_batch(conversations)

    async def amoderate_batch(self, conversations):
        return self.moderate_batch(conversations)


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": g}) + "\n" for t, g in rows), encoding="utf-8")
    return path


def _counts(summary: dict) -> dict[str, tuple[int, int, int, int]]:
    return {mode: tuple(summary["results"][0][mode][k] for k in ("tp", "fp", "fn", "tn")) for mode in ("strict", "loose")}


def _run(guard: _Counting | GenGuard, path: Path, out: Path) -> dict:
    return evaluate([load_set(file_spec(path, text_col="text", label_col="label", name="mine"))], [GenEngine(guard)],
                    out, progress=False)


def _fresh_counts(guard: GenGuard, rows: list[tuple[str, str]], directory: Path) -> dict[str, tuple[int, int, int, int]]:
    """The counts of a run on ``rows`` in a new directory, with nothing stored before."""
    directory.mkdir()
    return _counts(_run(guard, _write(directory / "mine.jsonl", rows), directory / "out"))


def test_reordered_and_edited_rows_are_never_reported_with_another_rows_verdict(gen_guard: GenGuard, tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = tmp_path / "mine.jsonl"
    first = _Counting(gen_guard)
    _run(first, _write(data, [(UNSAFE_PROMPT, "unsafe"), (SAFE_PROMPT, "safe"), (CONTROVERSIAL_PROMPT, "unsafe")]), out)
    assert len(first.judged) == 3

    # Reordered: every row keeps its own verdict, nothing is judged again.
    reordered = _Counting(gen_guard)
    rows = [(SAFE_PROMPT, "safe"), (CONTROVERSIAL_PROMPT, "unsafe"), (UNSAFE_PROMPT, "unsafe")]
    summary = _run(reordered, _write(data, rows), out)
    assert reordered.judged == []
    assert _counts(summary) == _fresh_counts(gen_guard, rows, tmp_path / "fresh-reordered")

    # Edited: a changed label or a changed text is judged again, the other rows are reused.
    edited = _Counting(gen_guard)
    rows = [(SAFE_PROMPT, "unsafe"), ("What is the capital of France?", "safe"), (UNSAFE_PROMPT, "unsafe")]
    summary = _run(edited, _write(data, rows), out)
    assert sorted(edited.judged) == sorted([SAFE_PROMPT, "What is the capital of France?"])
    assert _counts(summary) == _fresh_counts(gen_guard, rows, tmp_path / "fresh-edited")
    # The cake prompt is Safe to the model: labelled unsafe now, it is a false negative in both modes.
    assert summary["results"][0]["strict"]["fn"] == 1


def test_identical_rows_share_one_prediction(gen_guard: GenGuard, tmp_path: Path) -> None:
    counting = _Counting(gen_guard)
    rows = [(UNSAFE_PROMPT, "unsafe"), (SAFE_PROMPT, "safe"), (UNSAFE_PROMPT, "unsafe")]
    summary = _run(counting, _write(tmp_path / "mine.jsonl", rows), tmp_path / "out")
    assert sorted(counting.judged) == sorted([UNSAFE_PROMPT, SAFE_PROMPT])
    assert summary["results"][0]["n"] == 3 and _counts(summary)["loose"] == (2, 0, 0, 1)
