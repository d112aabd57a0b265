"""``qwen3guard review ...`` (``guard_core.review_cli.main``), in-process and as a real subprocess."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from guard_core import Category, RiskLevel, Verdict
from guard_core.review import REVIEW_DB_ENV, ReviewQueue
from guard_core.review_cli import main

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "qwen3guard review: error: "


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A queue file with two pending items (no environment variable set)."""
    monkeypatch.delenv(REVIEW_DB_ENV, raising=False)
    path = tmp_path / "review.db"
    with ReviewQueue(path) as queue:
        for text, categories in (("Who should I vote for?", (Category.POLITICALLY_SENSITIVE,)), ("Is it fine to lie?", ())):
            queue.submit(Verdict(RiskLevel.CONTROVERSIAL, categories, model="test"), source="openai.proxy",
                         conversation=[{"role": "user", "content": text}], request_id="req")
    return path


def ids(path: Path) -> list[str]:
    with ReviewQueue(path) as queue:
        return [i.id for i in queue.list()]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(result: tuple[int, str, str], fragment: str) -> None:
    code, out, err = result
    assert code == 2 and out == "" and err.startswith(PREFIX) and err.count("\n") == 1 and fragment in err, err


def test_list_prints_a_table_and_filters(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = ids(db)
    code, out, err = run(capsys, "--db", str(db), "list")
    lines = out.splitlines()
    assert code == 0 and err == "" and lines[0].split()[:3] == ["ID", "CREATED", "(UTC)"] and len(lines) == 3
    assert lines[1].split()[0] == first and "pending" in lines[1] and "Politically Sensitive Topics" in lines[1]
    assert lines[2].split()[0] == second and lines[2].rstrip().endswith("-")

    assert run(capsys, "list", "--db", str(db), "--status", "approved") == (0, "no review items\n", "")
    assert run(capsys, "list", "--db", str(db), "--since", "2999-01-01") == (0, "no review items\n", "")
    assert len(run(capsys, "list", "--db", str(db), "--since", "2000-01-01T00:00:00Z", "--limit", "1")[1].splitlines()) == 2


def test_show_prints_the_item_as_json(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = ids(db)[0]
    code, out, _ = run(capsys, "--db", str(db), "show", first)
    with ReviewQueue(db) as queue:
        assert code == 0 and json.loads(out) == queue.get(first).to_dict()
    assert json.loads(out)["content"] is None


def test_resolve_records_the_decision_once(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = ids(db)[0]
    code, out, _ = run(capsys, "--db", str(db), "resolve", first, "approve", "--note", "balanced answer", "--reviewer", "bob")
    shown = json.loads(out)
    assert code == 0 and (shown["status"], shown["decision"], shown["note"], shown["reviewer"]) == ("approved", "approve", "balanced answer", "bob")
    with ReviewQueue(db) as queue:
        assert queue.get(first).status == "approved"
    assert_error(run(capsys, "--db", str(db), "resolve", first, "reject"), "already approved")


def test_export_jsonl_to_stdout_and_csv_to_a_file(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--db", str(db), "export")
    assert code == 0 and [json.loads(line)["id"] for line in out.splitlines()] == ids(db)
    target = tmp_path / "items.csv"
    code, out, _ = run(capsys, "--db", str(db), "export", "--format", "csv", "--output", str(target), "--status", "pending")
    assert code == 0 and out == f"exported 2 items to {target}\n"
    with target.open(encoding="utf-8", newline="") as fp:
        assert [row["id"] for row in csv.DictReader(fp)] == ids(db)
    (tmp_path / "latest.jsonl").symlink_to(target)  # the export replaces the file the link points at
    assert run(capsys, "--db", str(db), "export", "--output", str(tmp_path / "latest.jsonl"))[0] == 0
    assert (tmp_path / "latest.jsonl").is_symlink() and len(target.read_text(encoding="utf-8").splitlines()) == 2


def test_export_refuses_to_write_over_the_database(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = ids(db)
    (tmp_path / "link.db").symlink_to(db)
    for output in (db, tmp_path / "review.db-wal", tmp_path / "link.db"):
        assert_error(run(capsys, "--db", str(db), "export", "--output", str(output)), "is the review database itself")
    assert ids(db) == before and not (tmp_path / "review.db-wal").exists()


def test_a_failed_export_leaves_the_old_output_file_alone(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "items.jsonl"
    target.write_text("last week's export\n", encoding="utf-8")

    def disk_full(self: ReviewQueue, fp: object, *args: object, **kwargs: object) -> int:
        fp.write("half a line")  # type: ignore[attr-defined]
        raise OSError("No space left on device")

    monkeypatch.setattr(ReviewQueue, "export", disk_full)
    assert_error(run(capsys, "--db", str(db), "export", "--output", str(target)), "No space left on device")
    assert target.read_text(encoding="utf-8") == "last week's export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.jsonl", "review.db"]


def test_an_export_over_a_hard_linked_file_keeps_the_link(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target, link = tmp_path / "items.jsonl", tmp_path / "published.jsonl"
    target.write_text("old\n", encoding="utf-8")
    os.link(target, link)
    assert run(capsys, "--db", str(db), "export", "--output", str(target))[0] == 0
    assert link.read_text(encoding="utf-8") == target.read_text(encoding="utf-8") != "old\n"


def test_stats_prints_counts_per_day_level_and_category(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--db", str(db), "stats")
    header, *rows = out.splitlines()
    with ReviewQueue(db) as queue:
        expected = queue.stats()
    assert code == 0 and header.split() == ["DAY", "RISK", "CATEGORY", "ITEMS", "PENDING", "APPROVED", "REJECTED"]
    assert [r.split() for r in rows] == [[e["day"], e["risk"], *(e["category"] or "-").split(), "1", "1", "0", "0"] for e in expected]
    assert sorted(e["category"] or "-" for e in expected) == ["-", "Politically Sensitive Topics"]


def test_the_environment_variable_names_the_database(db: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REVIEW_DB_ENV, str(db))
    assert run(capsys, "show", ids(db)[1])[0] == 0


@pytest.mark.parametrize(("argv", "fragment"), [
    (["show", "0123"], "no review item '0123'"),
    (["resolve", "0123", "maybe"], "invalid choice: 'maybe'"),
    (["list", "--since", "yesterday"], "'yesterday' is not a date"),
    (["list", "--limit", "0"], "limit must be an int from 1 to 9223372036854775807, got 0"),
    (["list", "--limit", "99999999999999999999"], "limit must be an int from 1 to 9223372036854775807"),
    (["list", "--limit", "-5"], "limit must be an int from 1 to 9223372036854775807, got -5"),
    (["list", "--limit", "lots"], "limit must be an int from 1 to 9223372036854775807, got 'lots'"),
    (["list", "--since", "0001-01-01T00:00:00+14:00"], "is out of range once converted to UTC"),
    (["stats", "--since", "9999-12-31T23:59:59-14:00"], "is out of range once converted to UTC"),
    (["list", "--status", "open"], "invalid choice: 'open'"),
    (["resolve", "0123", "approve", "--note", "ok \udcff"], "argument --note: the text is not valid UTF-8 (byte 0xFF at character 3)"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: COMMAND"),
])
def test_errors_are_one_line_and_exit_2(db: Path, capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> None:
    assert_error(run(capsys, "--db", str(db), *argv), fragment)


def test_a_missing_database_is_an_error_not_a_new_empty_queue(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REVIEW_DB_ENV, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert_error(run(capsys, "list"), f"no review database at {tmp_path / 'data' / 'qwen3guard-middleware' / 'review.db'}")
    assert_error(run(capsys, "--db", str(tmp_path / "typo.db"), "list"), f"set {REVIEW_DB_ENV}")
    assert_error(run(capsys, "--db", "mysql://x@y/z", "list"), "not supported")
    assert not (tmp_path / "typo.db").exists() and not (tmp_path / "data").exists()


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "usage: qwen3guard review" in out and "resolve" in out


def test_runs_as_a_module_in_a_subprocess(db: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), REVIEW_DB_ENV: str(db)}
    command = [sys.executable, "-m", "guard_core.review_cli"]
    listed = subprocess.run([*command, "list"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert listed.returncode == 0 and [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ids(db)
    failed = subprocess.run([*command, "resolve", "nope", "approve"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert failed.returncode == 2 and failed.stderr.startswith(PREFIX) and failed.stderr.count("\n") == 1
    assert "Traceback" not in failed.stderr


@pytest.mark.parametrize("command", ["list", "export", "stats"])
def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(db: Path, command: str) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `qwen3guard review list | head -1` once head has exited
    env = {**os.environ, "PYTHONPATH": str(ROOT), REVIEW_DB_ENV: str(db)}
    try:
        done = subprocess.run([sys.executable, "-m", "guard_core.review_cli", command], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, timeout=300, check=False)
    finally:
        os.close(write_end)
    assert done.returncode == 141 and done.stderr == ""  # 128 + SIGPIPE, as `qwen3guard --lines | head` ends


def test_ctrl_c_is_one_line_and_exit_130(db: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:  # Ctrl-C while the database is slow to answer
        raise KeyboardInterrupt

    monkeypatch.setattr(ReviewQueue, "list", interrupted)
    assert run(capsys, "--db", str(db), "list") == (130, "", "\nqwen3guard review: interrupted\n")


def test_usage_errors_name_the_subcommand_to_ask_for_help(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--db", str(db), "list", "--limit", "99999999999999999999")
    assert code == 2 and out == "" and "Traceback" not in err
    assert err == (f"{PREFIX}argument --limit: limit must be an int from 1 to 9223372036854775807, "
                   "got 99999999999999999999 (see qwen3guard review list --help)\n")
    assert run(capsys, "--db", str(db), "stats", "--bogus")[2] == f"{PREFIX}unrecognized arguments: --bogus (see qwen3guard review --help)\n"


def test_the_queue_refuses_a_limit_the_database_cannot_take(db: Path) -> None:
    with ReviewQueue(db) as queue:
        for limit in (10**20, 2**63, 0, -1, True, 2.0):
            with pytest.raises(ValueError, match="limit must be an int from 1 to 9223372036854775807"):
                queue.list(limit=limit)  # type: ignore[arg-type]
        assert len(queue.list(limit=2**63 - 1)) == 2
