"""Bad evaluation files get one-line errors with a position; stored predictions follow content, not row numbers."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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
        "list.jsonl": (b'{"text": "hi", "label": "safe"}\n["hi", "safe"]\n', ":2: expected an object of columns, got list"),
        "list.json": (b'[{"text": "hi", "label": "safe"}, ["hi", "safe"]]', " record 2: expected an object of columns, got list"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message) as caught:
            load_set(file_spec(path, text_col="text", label_col="label"))
        assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value), name


@pytest.mark.parametrize("missing", [None, "", "  "], ids=["null", "empty", "blank"])
def test_a_row_without_a_label_is_an_error_not_a_safe_row(tmp_path: Path, missing: str | None) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"text": "one", "label": "unsafe"}) + "\n" + json.dumps({"text": "two", "label": missing}) + "\n",
                    encoding="utf-8")
    with pytest.raises(ValueError, match=r"mine.jsonl:2: column 'label' is empty; a row without a label cannot be scored") as caught:
        load_set(file_spec(path, text_col="text", label_col="label"))
    assert "\n" not in str(caught.value)


def test_row_errors_name_the_line_an_editor_shows(tmp_path: Path) -> None:
    jsonl = tmp_path / "blank.jsonl"
    jsonl.write_text('\n\n{"text": "one", "label": "safe"}\n\n{"text": null, "label": "safe"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"blank.jsonl:5: column 'text' is empty or not text"):
        load_set(file_spec(jsonl, text_col="text", label_col="label"))
    multiline = tmp_path / "multi.csv"  # the bad row is on line 5, after a quoted two-line text and a blank line
    multiline.write_text('text,label\n"two\nlines",safe\n\nthree,maybe\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"multi.csv:5: column 'label' has value 'maybe'"):
        load_set(file_spec(multiline, text_col="text", label_col="label", negative=["safe"]))


@pytest.mark.parametrize(("row", "cells"), [("hello, world,safe", 3), ("hello", 1)], ids=["extra", "missing"])
def test_a_csv_row_whose_cells_do_not_match_the_header_is_an_error(tmp_path: Path, row: str, cells: int) -> None:
    path = tmp_path / "shifted.csv"
    path.write_text(f"text,label\nfine,safe\n{row}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"shifted.csv:3: {cells} cells under a header of 2 columns; quote a value"):
        load_set(file_spec(path, text_col="text", label_col="label"))


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


# ---- command-line mistakes are one line, found before any model loads -----------------------


def _eval_argv(tmp_path: Path, *extra: str, gen: str | None = None) -> list[str]:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": SAFE_PROMPT, "label": "safe"}) + "\n", encoding="utf-8")
    return ["--file", str(data), "--text-col", "text", "--label-col", "label", "--no-progress",
            "--gen", gen or str(tmp_path / "no-such-model"), *extra]


def test_label_values_the_defaults_do_not_name_are_an_error_until_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "toxic.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": g}) + "\n" for t, g in [("a", "toxic"), ("b", "benign")]),
                    encoding="utf-8")
    argv = ["--file", str(data), "--text-col", "text", "--label-col", "label", "--no-progress", "--gen", str(tmp_path / "no-model")]
    _one_line(capsys, main(argv), "column 'label' has value 'toxic', which is neither positive (unsafe) nor negative (safe)")
    assert [i.unsafe for i in load_set(file_spec(data, text_col="text", label_col="label", positive=["toxic"])).items] == [True, False]


def _one_line(capsys: pytest.CaptureFixture[str], code: int, fragment: str) -> None:
    from cli_checks import assert_one_line_error

    assert_one_line_error(code, capsys.readouterr().err, fragment)


def test_an_out_that_is_a_file_is_refused_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("results?", encoding="utf-8")
    _one_line(capsys, main(_eval_argv(tmp_path, "--out", str(afile))),
              f"qwen3guard eval: error: --out {afile} is a file, not a directory")
    _one_line(capsys, main(_eval_argv(tmp_path, "--out", str(afile / "sub"))), f"{afile} is a file, not a directory")
    assert afile.read_text(encoding="utf-8") == "results?"


def test_a_meta_or_unknown_device_is_refused_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path / "out")
    _one_line(capsys, main(_eval_argv(tmp_path, "--device", "meta", "--out", out)), "--device 'meta' cannot run a model")
    _one_line(capsys, main(_eval_argv(tmp_path, "--device", "tpu", "--out", out)), "--device 'tpu' is not one of")
    monkeypatch.setenv("QWEN3GUARD_DEVICE", "gpu")
    _one_line(capsys, main(_eval_argv(tmp_path, "--out", out)), "QWEN3GUARD_DEVICE='gpu' is not one of")
    assert not (tmp_path / "out").exists()


def test_a_bad_threshold_is_a_usage_error_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(_eval_argv(tmp_path, "--threshold", "7", "--out", str(tmp_path / "out")))
    _one_line(capsys, exc.value.code, "qwen3guard eval: error: --threshold: unsafe_threshold must be in (0, 1], got 7.0 "
                                      "(see qwen3guard eval --help)")


def test_paths_of_the_wrong_kind_say_what_they_are(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("not a model", encoding="utf-8")
    argv = ["--text-col", "text", "--label-col", "label", "--gen", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")]
    _one_line(capsys, main(["--file", str(folder), *argv]), f"dataset file {folder} is a directory, not a data file")
    _one_line(capsys, main(["--file", str(tmp_path / "none.csv"), *argv]), "does not exist")
    _one_line(capsys, main(_eval_argv(tmp_path, gen=str(afile))), f"--gen {afile} is a file, not a model directory")
    _one_line(capsys, main([*_eval_argv(tmp_path), "--stream", str(afile)]), f"--stream {afile} is a file, not a model directory")
    _one_line(capsys, main(["report", str(afile)]), f"{afile} is a file, not the --out directory")


def test_usage_errors_are_one_line_with_a_help_hint(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, prog in ((["--bogus"], "qwen3guard eval"), (["report", "some-dir", "--bogus"], "qwen3guard eval report")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert capsys.readouterr().err == f"{prog}: error: unrecognized arguments: --bogus (see {prog} --help)\n"


def test_model_load_failures_are_one_line_without_transformers_output(gen_dir: Path, tmp_path: Path) -> None:
    from cli_checks import assert_one_line_error, gen_without_a_weight

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [sys.executable, "-m", "guard_core", "eval"]
    broken = gen_without_a_weight(gen_dir, tmp_path)
    failed = subprocess.run([*command, *_eval_argv(tmp_path, "--out", str(tmp_path / "o1"), gen=str(broken))],
                            capture_output=True, text=True, env=env, timeout=300, cwd=root, check=False)
    assert_one_line_error(failed.returncode, failed.stderr, "qwen3guard eval: error: --gen: ")
    assert "LOAD REPORT" not in failed.stderr and "does not hold the weights" in failed.stderr
    done = subprocess.run([*command, *_eval_argv(tmp_path, "--out", str(tmp_path / "o2"), gen=str(gen_dir))],
                          capture_output=True, text=True, env=env, timeout=300, cwd=root, check=False)
    assert done.returncode == 0, done.stderr
    assert "Loading weights" not in done.stderr and "Traceback" not in done.stderr


def _eval_process(args: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "guard_core", "eval", *args], env={**os.environ, "PYTHONPATH": str(root)},
                          timeout=300, cwd=root, check=False, **options)


def test_a_reader_that_closes_the_pipe_ends_every_eval_command_quietly(gen_dir: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    for args in (_eval_argv(tmp_path, "--out", out, gen=str(gen_dir)), ["report", out, "--no-progress"], ["--list-sets"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # like `qwen3guard eval ... | head -1` once head has exited
        try:
            done = _eval_process(args, stdout=write_end, stderr=subprocess.PIPE, text=True)
        finally:
            os.close(write_end)
        assert done.returncode == 141, (args, done.stderr)  # 128 + SIGPIPE, as `qwen3guard --lines | head` ends
        assert "Traceback" not in done.stderr and "error" not in done.stderr, done.stderr


def test_an_unreachable_guard_server_is_one_line_that_keeps_the_cause(tmp_path: Path) -> None:
    from cli_checks import assert_one_line_error
    from gen_server import unused_url

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "safe"}) + "\n" for t in "abc"), encoding="utf-8")
    argv = ["--file", str(data), "--text-col", "text", "--label-col", "label", "--no-progress", "--gen", unused_url(),
            "--out", str(tmp_path / "o")]
    failed = _eval_process(argv, capture_output=True, text=True)
    line = assert_one_line_error(failed.returncode, failed.stderr, "qwen3guard eval: error: gen: the guard could not judge")
    assert "cannot connect" in line and "is the server running?" in line
