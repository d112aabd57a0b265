"""The review queue behind ``Action.REVIEW``, on SQLite files (``test_review_postgres`` reruns the contract on PostgreSQL).

``QueueContract`` holds the behaviour every backend must have; it takes the database from a
``db_url`` fixture, which ``TestSQLite`` (here) and ``TestPostgres`` define.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from guard_core import Action, Category, GenGuard, Policy, RiskLevel, Verdict
from guard_core.review import (
    REVIEW_DB_ENV,
    ReviewAlreadyResolved,
    ReviewHookError,
    ReviewItem,
    ReviewNotFound,
    ReviewQueue,
    ReviewStoreError,
    canonical_conversation,
    conversation_hash,
)
from guard_core.review.store import database_url
from guard_core.testing.cases import CONTROVERSIAL_PROMPT

ROOT = Path(__file__).resolve().parents[1]
SECRET = "my secret ballot: the purple party"
REVIEW = Policy(actions={RiskLevel.CONTROVERSIAL: Action.REVIEW})
WRITERS, ITEMS_PER_WRITER = 8, 25

# One writer process: waits on stdin so all of them start writing together, opens the queue
# (so the schema is created concurrently too), prints the id of every item it submitted.
WRITER = r"""
import sys
from guard_core import Category, RiskLevel, Verdict
from guard_core.review import ReviewQueue

url, worker, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()
queue = ReviewQueue(url)
verdict = Verdict(RiskLevel.CONTROVERSIAL, (Category.POLITICALLY_SENSITIVE,), model="writer")
for i in range(count):
    conversation = [{"role": "user", "content": f"message {worker}-{i}"}]
    print(queue.submit(verdict, source=f"writer-{worker}", conversation=conversation, request_id=f"{worker}-{i}"), flush=True)
queue.close()
"""


def controversial(categories: tuple[Category, ...] = (Category.POLITICALLY_SENSITIVE,), role: str = "prompt") -> Verdict:
    """A hand-made Controversial verdict, for storage tests that need many items."""
    return Verdict(RiskLevel.CONTROVERSIAL, categories, probabilities={RiskLevel.CONTROVERSIAL: 0.75, RiskLevel.SAFE: 0.2,
                                                                     RiskLevel.UNSAFE: 0.05}, role=role, model="test")  # type: ignore[arg-type]


def ask(text: str) -> list[dict[str, str]]:
    """A one-turn conversation."""
    return [{"role": "user", "content": text}]


def raw_rows(url: str) -> list[dict[str, Any]]:
    """Every stored row as the database holds it, read without the queue."""
    engine = sa.create_engine(database_url(url))
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.exec_driver_sql("SELECT * FROM qwen3guard_review_items")]
    finally:
        engine.dispose()


class QueueContract:
    """What every review backend does; subclasses provide the ``db_url`` fixture."""

    @pytest.fixture
    def queue(self, db_url: str):
        with ReviewQueue(db_url) as queue:
            yield queue

    def test_review_verdict_is_queued_pending_with_the_verdict_and_no_content(self, queue: ReviewQueue, gen_guard: GenGuard) -> None:
        conversation = ask(CONTROVERSIAL_PROMPT)
        verdict = gen_guard.moderate(conversation)
        assert verdict.risk is RiskLevel.CONTROVERSIAL and REVIEW.action_for(verdict) is Action.REVIEW

        item_id = queue.submit(verdict, source="test.direct", conversation=conversation, request_id="req-1")

        item = queue.get(item_id)
        assert (item.id, item.status, item.source, item.role, item.request_id) == (item_id, "pending", "test.direct", "prompt", "req-1")
        assert (item.risk, item.categories, item.model) == (verdict.risk, verdict.categories, verdict.model)
        assert item.probabilities == pytest.approx(dict(verdict.probabilities))
        assert item.conversation_hash == conversation_hash(conversation) and item.content is None
        assert item.created_at.tzinfo is timezone.utc and item.resolved_at is None and item.decision is None
        assert queue.list(status="pending") == [item] and queue.list(status="approved") == []

    def test_resolve_changes_the_status_and_runs_sync_and_async_hooks(self, queue: ReviewQueue) -> None:
        item_id = queue.submit(controversial(), source="test", conversation=ask("hello"))
        seen: list[tuple[str, ReviewItem]] = []
        queue.on_resolve(lambda item: seen.append(("sync", item)))

        @queue.on_resolve
        async def notify(item: ReviewItem) -> None:
            await asyncio.sleep(0)
            seen.append(("async", item))

        resolved = queue.resolve(item_id, "reject", note="too partisan", reviewer="alice")

        assert (resolved.status, resolved.decision, resolved.note, resolved.reviewer) == ("rejected", "reject", "too partisan", "alice")
        assert resolved.resolved_at is not None and resolved.resolved_at >= resolved.created_at
        assert queue.get(item_id) == resolved
        assert seen == [("sync", resolved), ("async", resolved)]
        assert queue.list(status="pending") == [] and queue.list(status="rejected") == [resolved]

    async def test_aresolve_awaits_async_hooks_on_the_loop_and_runs_sync_hooks_off_it(self, queue: ReviewQueue) -> None:
        item_id = await queue.asubmit(controversial(), source="test", conversation=ask("hello"))
        loop, loop_thread = asyncio.get_running_loop(), threading.get_ident()
        where: dict[str, Any] = {}
        queue.on_resolve(lambda item: where.update(sync=threading.get_ident()))

        async def on_loop(item: ReviewItem) -> None:
            where["async"] = asyncio.get_running_loop()

        queue.on_resolve(on_loop)
        item = await queue.aresolve(item_id, "approve")

        assert item.status == "approved" and (await asyncio.to_thread(queue.get, item_id)).status == "approved"
        assert where["async"] is loop and where["sync"] != loop_thread

    async def test_sync_resolve_inside_a_running_loop_still_completes_async_hooks(self, queue: ReviewQueue) -> None:
        item_id = queue.submit(controversial(), source="test", conversation=ask("hello"))
        done: list[str] = []

        async def hook(item: ReviewItem) -> None:
            await asyncio.sleep(0)
            done.append(item.id)

        queue.on_resolve(hook)
        queue.resolve(item_id, "approve")
        assert done == [item_id]

    async def test_resolved_yields_items_resolved_by_another_queue_in_resolution_order(self, db_url: str, queue: ReviewQueue) -> None:
        ids = [queue.submit(controversial(), source="test", conversation=ask(f"q{i}")) for i in range(3)]
        since = datetime.now(timezone.utc) - timedelta(days=1)
        stream = queue.resolved(since=since, poll_s=0.01)
        first = asyncio.ensure_future(anext(stream))
        with ReviewQueue(db_url) as other:  # another connection pool, as another process would have
            for item_id, decision in zip(reversed(ids), ("approve", "reject", "approve")):
                await asyncio.to_thread(other.resolve, item_id, decision)
        got = [await first, await anext(stream), await anext(stream)]
        await stream.aclose()
        assert [i.id for i in got] == list(reversed(ids)) and [i.status for i in got] == ["approved", "rejected", "approved"]

    async def test_resolved_without_since_skips_earlier_resolutions(self, queue: ReviewQueue) -> None:
        earlier = queue.submit(controversial(), source="test", conversation=ask("old"))
        queue.resolve(earlier, "approve")
        stream = queue.resolved(poll_s=0.01)
        first = asyncio.ensure_future(anext(stream))
        later: list[str] = []
        while not first.done() and len(later) < 2000:  # resolve new items until the iterator has started and seen one
            later.append(await queue.asubmit(controversial(), source="test", conversation=ask(f"new {len(later)}")))
            await queue.aresolve(later[-1], "reject")
            await asyncio.sleep(0.01)
        assert first.done(), "the iterator never yielded a new resolution"
        item = first.result()
        await stream.aclose()
        assert item.id in later and item.id != earlier

    def test_resolved_checks_its_arguments_when_called_not_when_iterated(self, queue: ReviewQueue) -> None:
        with pytest.raises(TypeError, match="poll_s must be a number of seconds, got str '1'"):
            queue.resolved(poll_s="1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="poll_s must be > 0"):
            queue.resolved(poll_s=0)

    def test_a_decision_is_final_even_from_another_queue(self, db_url: str, queue: ReviewQueue) -> None:
        item_id = queue.submit(controversial(), source="test", conversation=ask("hello"))
        calls: list[ReviewItem] = []
        queue.on_resolve(calls.append)
        first = queue.resolve(item_id, "approve", note="fine")
        with ReviewQueue(db_url) as other, pytest.raises(ReviewAlreadyResolved, match="already approved"):
            other.resolve(item_id, "reject")
        with pytest.raises(ReviewAlreadyResolved):
            queue.resolve(item_id, "approve")
        assert queue.get(item_id) == first and calls == [first]

    def test_unknown_ids_raise_review_not_found(self, queue: ReviewQueue) -> None:
        with pytest.raises(ReviewNotFound, match="no review item 'missing'"):
            queue.get("missing")
        with pytest.raises(LookupError):
            queue.resolve("missing", "approve")

    def test_content_is_stored_only_when_opted_in(self, db_url: str) -> None:
        conversation = [{"role": "user", "content": SECRET}, {"role": "assistant", "content": "Noted."}]
        with ReviewQueue(db_url) as private:
            private_id = private.submit(controversial(role="response"), source="test", conversation=conversation)
            assert private.get(private_id).content is None
        row = next(r for r in raw_rows(db_url) if r["id"] == private_id)
        assert row["content"] is None and not any(SECRET in str(v) for v in row.values())

        with ReviewQueue(db_url, store_content=True) as keeping:
            kept = keeping.get(keeping.submit(controversial(role="response"), source="test", conversation=conversation))
        assert kept.content == canonical_conversation(conversation) and json.loads(kept.content) == conversation
        assert hashlib.sha256(kept.content.encode()).hexdigest() == kept.conversation_hash
        assert next(r for r in raw_rows(db_url) if r["id"] == kept.id)["content"] == kept.content

    def test_eight_processes_writing_at_once_lose_no_item(self, db_url: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, db_url, str(w), str(ITEMS_PER_WRITER)], cwd=ROOT, env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for w in range(WRITERS)]
        try:
            assert [p.stdout.readline().strip() for p in writers] == ["ready"] * WRITERS  # type: ignore[union-attr]
            for p in writers:  # every writer is up and importing nothing more: release them together
                p.stdin.write("go\n")  # type: ignore[union-attr]
                p.stdin.flush()  # type: ignore[union-attr]
            results = [p.communicate(timeout=900) for p in writers]
        finally:
            for p in writers:
                p.kill()
        assert [p.returncode for p in writers] == [0] * WRITERS, [err[-2000:] for _, err in results]
        written = [line for out, _ in results for line in out.split()]
        assert len(written) == len(set(written)) == WRITERS * ITEMS_PER_WRITER

        with ReviewQueue(db_url) as queue:
            stored = queue.list(limit=10 * WRITERS * ITEMS_PER_WRITER)
        assert sorted(i.id for i in stored) == sorted(written)
        assert Counter(i.source for i in stored) == {f"writer-{w}": ITEMS_PER_WRITER for w in range(WRITERS)}
        assert len({i.request_id for i in stored}) == WRITERS * ITEMS_PER_WRITER

    def test_list_filters_by_status_and_time_oldest_first(self, queue: ReviewQueue) -> None:
        ids = [queue.submit(controversial(), source="test", conversation=ask(f"q{i}")) for i in range(4)]
        queue.resolve(ids[1], "approve")
        queue.resolve(ids[2], "reject")
        assert [i.id for i in queue.list()] == ids
        assert [i.id for i in queue.list(limit=2)] == ids[:2]
        assert [i.id for i in queue.list(status="pending")] == [ids[0], ids[3]]
        assert [i.id for i in queue.list(status="approved")] == [ids[1]]
        third = queue.get(ids[2]).created_at
        assert [i.id for i in queue.list(since=third)] == ids[2:]
        assert [i.id for i in queue.list(since=third.astimezone(timezone(timedelta(hours=-5))))] == ids[2:]
        assert queue.list(since=datetime.now(timezone.utc) + timedelta(days=1)) == []

    def test_since_at_the_ends_of_the_datetime_range_is_a_bound_not_an_overflow(self, queue: ReviewQueue) -> None:
        ids = [queue.submit(controversial(), source="test", conversation=ask(f"q{i}")) for i in range(2)]
        latest = datetime.max.replace(tzinfo=timezone(timedelta(hours=-5)))  # past year 9999 once in UTC
        earliest = datetime.min.replace(tzinfo=timezone(timedelta(hours=14)))  # before year 1 once in UTC
        assert queue.list(since=latest) == [] and queue.stats(since=latest) == []
        assert [i.id for i in queue.list(since=earliest)] == ids

    def test_export_writes_jsonl_and_csv(self, queue: ReviewQueue) -> None:
        ids = [queue.submit(controversial(), source="test", conversation=ask(f"q{i}"), request_id=f"r{i}") for i in range(3)]
        queue.resolve(ids[0], "approve", note="ok, fine")
        items = [queue.get(i) for i in ids]

        jsonl = io.StringIO()
        assert queue.export(jsonl) == 3
        assert [json.loads(line) for line in jsonl.getvalue().splitlines()] == [i.to_dict() for i in items]

        table = io.StringIO()
        assert queue.export(table, format="csv", status="pending") == 2
        rows = list(csv.DictReader(io.StringIO(table.getvalue())))
        assert [r["id"] for r in rows] == ids[1:] and rows[0]["note"] == "" and rows[0]["status"] == "pending"
        assert json.loads(rows[0]["categories"]) == ["Politically Sensitive Topics"]
        assert json.loads(rows[0]["probabilities"]) == items[1].to_dict()["probabilities"]

    def test_stats_count_per_day_level_and_category(self, queue: ReviewQueue) -> None:
        two = (Category.POLITICALLY_SENSITIVE, Category.UNETHICAL_ACTS)
        first = queue.submit(controversial(two), source="test", conversation=ask("a"))
        ids = [first] + [queue.submit(verdict, source="test", conversation=ask(f"q{i}")) for i, verdict in
                         enumerate((controversial(), Verdict(RiskLevel.UNSAFE, (Category.VIOLENT,)), controversial(())))]
        queue.resolve(first, "approve")

        rows = queue.stats()

        assert {r["day"] for r in rows} == {queue.get(i).created_at.date().isoformat() for i in ids}
        totals: dict[tuple[str, str | None], Counter[str]] = {}
        for r in rows:
            totals.setdefault((r["risk"], r["category"]), Counter()).update({k: r[k] for k in ("items", "pending", "approved", "rejected")})
        assert totals == {
            ("Controversial", "Politically Sensitive Topics"): Counter(items=2, pending=1, approved=1, rejected=0),
            ("Controversial", "Unethical Acts"): Counter(items=1, pending=0, approved=1, rejected=0),
            ("Controversial", None): Counter(items=1, pending=1, approved=0, rejected=0),
            ("Unsafe", "Violent"): Counter(items=1, pending=1, approved=0, rejected=0),
        }
        order = [(r["day"], RiskLevel(r["risk"]).severity, r["category"] or "") for r in rows]
        assert order == sorted(order)
        assert queue.stats(since=datetime.now(timezone.utc) + timedelta(days=1)) == []

    def test_a_failing_hook_keeps_the_decision_and_the_other_hooks(self, queue: ReviewQueue) -> None:
        item_id = queue.submit(controversial(), source="test", conversation=ask("hello"))
        after: list[str] = []

        def broken(item: ReviewItem) -> None:
            raise ConnectionError("mail server down")

        queue.on_resolve(broken)
        queue.on_resolve(lambda item: after.append(item.id))
        with pytest.raises(ReviewHookError, match="mail server down") as caught:
            queue.resolve(item_id, "approve")
        assert caught.value.item.status == "approved" and queue.get(item_id).status == "approved" and after == [item_id]


class TestSQLite(QueueContract):
    """The contract on a SQLite file."""

    @pytest.fixture
    def db_url(self, tmp_path: Path) -> str:
        return str(tmp_path / "review.db")


def test_sqlite_file_is_in_wal_mode_and_holds_no_content(tmp_path: Path) -> None:
    path = tmp_path / "queue" / "review.db"
    with ReviewQueue(f"sqlite:///{path}") as queue:
        queue.submit(controversial(), source="test", conversation=ask(SECRET))
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        files = [p for p in path.parent.iterdir() if p.name.startswith("review.db")]
        assert path in files and not any(SECRET.encode() in p.read_bytes() for p in files)


def test_default_database_lives_in_the_user_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    with ReviewQueue() as queue:
        item_id = queue.submit(controversial(), source="test", conversation=ask("hello"))
    with ReviewQueue(tmp_path / "qwen3guard-middleware" / "review.db") as same:
        assert same.get(item_id).status == "pending"


def test_from_env_opens_the_named_database_or_returns_none(tmp_path: Path) -> None:
    assert ReviewQueue.from_env({}) is None and ReviewQueue.from_env({REVIEW_DB_ENV: "  "}) is None
    queue = ReviewQueue.from_env({REVIEW_DB_ENV: str(tmp_path / "env.db")}, store_content=True)
    assert queue is not None
    with queue:
        assert queue.store_content and queue.get(queue.submit(controversial(), source="t", conversation=ask("x"))).content
    assert (tmp_path / "env.db").is_file()


def test_urls_map_to_supported_drivers_and_refuse_the_rest(tmp_path: Path) -> None:
    assert database_url("postgresql://u:pw@db/review").drivername == "postgresql+psycopg"
    assert database_url("postgres://u@db/review").drivername == "postgresql+psycopg"
    assert database_url(str(tmp_path / "q.db")).database == str(tmp_path / "q.db")
    for bad, reason in (("sqlite://", "in-memory"), ("sqlite:///:memory:", "in-memory"), (":memory:", "in-memory"),
                        (Path(":memory:"), "in-memory"), ("mysql://u@db/x", "not supported"),
                        ("", "empty"), ("postgresql://u@db:notaport/x", "malformed")):
        with pytest.raises(ValueError, match=reason):
            ReviewQueue(bad)


def test_bad_arguments_get_clear_errors(tmp_path: Path) -> None:
    with ReviewQueue(tmp_path / "q.db") as queue:
        item_id = queue.submit(controversial(), source="test", conversation=ask("hello"))
        cases = [
            (lambda: queue.resolve(item_id, "maybe"), ValueError, "'approve' or 'reject'"),  # type: ignore[arg-type]
            (lambda: queue.list(status="open"), ValueError, "status must be one of"),  # type: ignore[arg-type]
            (lambda: queue.list(since=datetime(2025, 1, 1)), ValueError, "timezone-aware"),
            (lambda: queue.list(limit=0), ValueError, "limit must be an int from 1"),
            (lambda: queue.export(io.StringIO(), format="xml"), ValueError, "'jsonl' or 'csv'"),  # type: ignore[arg-type]
            (lambda: queue.submit(controversial(), source="", conversation=ask("x")), ValueError, "source"),
            (lambda: queue.submit(controversial(), source="t", conversation=[]), ValueError, "empty"),
            (lambda: queue.submit(controversial(role="response"), source="t", conversation=ask("x")), ValueError,
             "last message is the user's"),
            (lambda: queue.submit({"risk": "Controversial"}, source="t", conversation=ask("x")), TypeError, "Verdict"),  # type: ignore[arg-type]
            (lambda: queue.on_resolve("notify"), TypeError, "callable"),  # type: ignore[arg-type]
        ]
        for call, error, message in cases:
            with pytest.raises(error, match=message):
                call()
        assert [i.status for i in queue.list()] == ["pending"]


def test_a_database_from_another_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    ReviewQueue(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE qwen3guard_review_schema SET version = 99")
    with pytest.raises(ReviewStoreError, match="schema version 99"):
        ReviewQueue(path)


def test_create_false_opens_existing_queues_only(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no review database"):
        ReviewQueue(tmp_path / "typo.db", create=False)
    assert not (tmp_path / "typo.db").exists()
    sqlite3.connect(tmp_path / "other.db").close()
    with pytest.raises(ReviewStoreError, match="holds no review queue"):
        ReviewQueue(tmp_path / "other.db", create=False)


def test_the_queue_needs_sqlalchemy_only_when_opened(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['sqlalchemy'] = None\n"
            "import guard_core.review\n"
            f"guard_core.review.ReviewQueue({str(tmp_path / 'q.db')!r})\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("ImportError: the review queue needs SQLAlchemy: "
                                                      "pip install 'qwen3guard-middleware[review]'")
