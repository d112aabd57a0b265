"""``ReviewQueue``: where ``Action.REVIEW`` content goes to wait for a human decision.

Adapters call ``submit`` (or ``asubmit``) when the policy says REVIEW and let the content
through; reviewers use ``list`` / ``resolve`` (or ``qwen3guard review``); applications follow
decisions with ``on_resolve`` hooks or the ``resolved()`` async iterator.
"""

from __future__ import annotations

import asyncio
import builtins
import csv
import dataclasses
import json
import logging
import os
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal, TextIO

from ..config import Settings, check_count, check_timeout
from ..messages import moderation_role, normalize_messages
from ..types import RiskLevel, Verdict
from .hooks import ResolveHook, arun_hooks, run_hooks
from .model import (
    DECISION_STATUS,
    STATUSES,
    Decision,
    ReviewItem,
    Status,
    canonical_conversation,
    conversation_hash,
    require_aware,
)

if TYPE_CHECKING:
    from .store import SqlStore

logger = logging.getLogger("guard_core.review")

ExportFormat = Literal["jsonl", "csv"]
_EXPORT_FORMATS = ("jsonl", "csv")
_CSV_FIELDS = tuple(f.name for f in dataclasses.fields(ReviewItem))
_RESOLVED_PAGE = 500
#: The largest ``list(limit=...)``: databases take a signed 64-bit LIMIT (SQLite raises OverflowError past it).
MAX_LIMIT = 2**63 - 1


def _open_store(url: str | os.PathLike[str] | None, create: bool) -> SqlStore:
    try:
        from .store import SqlStore, database_url
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "sqlalchemy":
            raise
        raise ImportError("the review queue needs SQLAlchemy: pip install 'qwen3guard-middleware[review]'") from None
    return SqlStore(database_url(url), create=create)


def _check_status(status: str | None) -> Status | None:
    if status is not None and status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)} (or None for all), got {status!r}")
    return status  # type: ignore[return-value]


def check_limit(limit: object) -> int:
    """The one check of a page size (``ReviewQueue.list``, ``qwen3guard review list --limit``): 1 to ``MAX_LIMIT``."""
    return check_count(limit, "limit", maximum=MAX_LIMIT)


def _check_since(since: datetime | None) -> datetime | None:
    return None if since is None else require_aware(since, "since")


class ReviewQueue:
    """A queue of moderated conversations awaiting a human decision, in SQLite or PostgreSQL.

    ``url`` is a SQLite file path, a ``sqlite:///`` URL or a ``postgresql://`` URL (psycopg 3);
    ``None`` opens the per-user default file (``guard_core.review.store.default_database_path``). The schema is created on first use. Several
    processes may share one database. Only the conversation's hash is kept unless
    ``store_content=True``; nothing about the content is ever logged. ``create=False`` opens
    an existing queue only (a missing SQLite file raises ``FileNotFoundError``, a database
    without the queue's tables ``ReviewStoreError``), for tools that must not create one by accident.

    Thread-safe; ``close()`` (or ``with``) releases the connections.
    """

    def __init__(self, url: str | os.PathLike[str] | None = None, *, store_content: bool = False,
                 create: bool = True) -> None:
        self._store = _open_store(url, create)
        self.store_content = bool(store_content)
        self._hooks: list[ResolveHook] = []
        self._hooks_lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, store_content: bool | None = None) -> ReviewQueue | None:
        """The queue named by ``QWEN3GUARD_REVIEW_DB`` (a path or URL), or ``None`` when it is unset.

        The environment is read through ``guard_core.config.Settings``, like every other setting;
        ``store_content`` defaults to ``QWEN3GUARD_REVIEW_STORE_CONTENT``.
        """
        settings = Settings.from_env(environ)
        if settings.review_db is None:
            return None
        keep = settings.review_store_content if store_content is None else store_content
        return cls(settings.review_db, store_content=keep)

    @property
    def database(self) -> str:
        """The database this queue writes to, password hidden (for logs and error messages)."""
        return self._store.label

    def submit(self, verdict: Verdict, *, source: str, conversation: Sequence[Mapping[str, Any]],
               request_id: str | None = None) -> str:
        """Record ``conversation`` and its verdict as a pending item; returns the new item id.

        ``source`` names the adapter (``"langchain.callback"``, ``"openai.proxy"``) and
        ``request_id`` the caller's request or run id. A conversation that is not valid
        moderation input, or that ends with the wrong turn for the verdict's role (a response
        verdict needs the assistant's answer last), raises ``ValueError``.
        """
        if not isinstance(verdict, Verdict):
            raise TypeError(f"verdict must be a guard_core.Verdict, got {type(verdict).__name__}")
        if not isinstance(source, str) or not source.strip():
            raise ValueError("source must name the adapter that saw the content, e.g. 'openai.proxy'")
        if request_id is not None and not isinstance(request_id, str):
            raise TypeError(f"request_id must be a string or None, got {type(request_id).__name__}")
        messages = normalize_messages(conversation)
        if moderation_role(messages) != verdict.role:
            raise ValueError(f"the verdict judges the {verdict.role} but the conversation's last message is the "
                             f"{messages[-1].role}'s; pass the conversation that was moderated")
        item = ReviewItem(
            id=uuid.uuid4().hex,
            created_at=datetime.now(timezone.utc),
            source=source,
            role=verdict.role,
            risk=verdict.risk,
            categories=tuple(verdict.categories),
            probabilities=dict(verdict.probabilities),
            model=verdict.model,
            request_id=request_id,
            conversation_hash=conversation_hash(messages),
            content=canonical_conversation(messages) if self.store_content else None,
            status="pending",
        )
        self._store.insert(item)
        logger.info("review item %s queued (source=%s, %s %s)", item.id, source, item.role, item.risk.value)
        return item.id

    async def asubmit(self, verdict: Verdict, *, source: str, conversation: Sequence[Mapping[str, Any]],
                      request_id: str | None = None) -> str:
        """``submit`` in a worker thread, so the event loop never waits on the database."""
        return await asyncio.to_thread(self.submit, verdict, source=source, conversation=conversation, request_id=request_id)

    def get(self, item_id: str) -> ReviewItem:
        """The item with this id; ``ReviewNotFound`` (a ``LookupError``) when there is none."""
        if not isinstance(item_id, str):
            raise TypeError(f"item_id must be a string, got {type(item_id).__name__}")
        return self._store.get(item_id)

    def resolve(self, item_id: str, decision: Decision, *, note: str | None = None, reviewer: str | None = None) -> ReviewItem:
        """Approve or reject a pending item, then run the resolution hooks; returns the resolved item.

        A decision is final: resolving an item twice raises ``ReviewAlreadyResolved`` (also
        when another process resolved it first). A hook that fails raises ``ReviewHookError``
        after the decision is saved and every other hook has run.
        """
        item = self._save_decision(item_id, decision, note, reviewer)
        run_hooks(self._hook_snapshot(), item)
        return item

    async def aresolve(self, item_id: str, decision: Decision, *, note: str | None = None,
                       reviewer: str | None = None) -> ReviewItem:
        """``resolve`` without blocking the loop: async hooks are awaited here, sync ones run in a thread."""
        item = await asyncio.to_thread(self._save_decision, item_id, decision, note, reviewer)
        await arun_hooks(self._hook_snapshot(), item)
        return item

    def _save_decision(self, item_id: str, decision: Decision, note: str | None, reviewer: str | None) -> ReviewItem:
        if not isinstance(item_id, str):
            raise TypeError(f"item_id must be a string, got {type(item_id).__name__}")
        if decision not in DECISION_STATUS:
            raise ValueError(f"decision must be 'approve' or 'reject', got {decision!r}")
        for name, value in (("note", note), ("reviewer", reviewer)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {type(value).__name__}")
        status = DECISION_STATUS[decision]
        changes = {"decision": decision, "resolved_at": datetime.now(timezone.utc), "note": note, "reviewer": reviewer}
        item = self._store.resolve(item_id, status, changes)
        logger.info("review item %s %s", item.id, item.status)
        return item

    def on_resolve(self, callback: ResolveHook) -> ResolveHook:
        """Call ``callback(item)`` after every ``resolve`` / ``aresolve`` of this queue object.

        ``callback`` may be sync or async (see ``guard_core.review.hooks`` for where each
        runs). Returns ``callback``, so it works as a decorator. Decisions made by other
        processes reach this process through ``resolved()``, not through hooks.
        """
        if not callable(callback):
            raise TypeError(f"on_resolve needs a callable, got {type(callback).__name__}")
        with self._hooks_lock:
            self._hooks.append(callback)
        return callback

    def _hook_snapshot(self) -> tuple[ResolveHook, ...]:
        with self._hooks_lock:
            return tuple(self._hooks)

    def resolved(self, since: datetime | None = None, poll_s: float = 1.0) -> AsyncIterator[ReviewItem]:
        """Items as they are resolved, by any process sharing the database, in resolution order.

        Starts with the items resolved at or after ``since`` (default: only resolutions from now
        on), then polls the database every ``poll_s`` seconds while nothing new arrived. Runs
        until the consumer stops iterating. The arguments are checked here, not at the first
        ``async for`` step, so a bad one fails where it is written.
        """
        return self._resolved(_check_since(since), check_timeout(poll_s, "poll_s"))

    async def _resolved(self, since: datetime | None, poll_s: float) -> AsyncIterator[ReviewItem]:
        cursor = await asyncio.to_thread(self._store.resolution_cursor, since)
        while True:
            page = await asyncio.to_thread(self._store.resolved_after, cursor, _RESOLVED_PAGE)
            for seq, item in page:
                cursor = seq
                yield item
            if len(page) < _RESOLVED_PAGE:
                await asyncio.sleep(poll_s)

    def export(self, fp: TextIO, format: ExportFormat = "jsonl", status: Status | None = None,
               since: datetime | None = None) -> int:
        """Write matching items, oldest first, to the text file ``fp``; returns how many.

        ``jsonl`` writes one ``ReviewItem.to_dict()`` per line; ``csv`` writes a header and one
        row per item (lists and mappings as JSON, ``None`` as an empty cell).
        """
        if format not in _EXPORT_FORMATS:
            raise ValueError(f"format must be 'jsonl' or 'csv', got {format!r}")
        status, since = _check_status(status), _check_since(since)
        writer = csv.DictWriter(fp, fieldnames=_CSV_FIELDS) if format == "csv" else None
        if writer is not None:
            writer.writeheader()
        count = 0
        for item in self._store.iterate(status, since):
            record = item.to_dict()
            if writer is None:
                fp.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                writer.writerow({k: _csv_cell(v) for k, v in record.items()})
            count += 1
        return count

    def stats(self, since: datetime | None = None) -> builtins.list[dict[str, Any]]:
        """Item counts per UTC day, risk level and category (an item counts once per category).

        Each row: ``day`` (``YYYY-MM-DD``), ``risk``, ``category`` (``None`` for items without
        one), ``items`` and the ``pending`` / ``approved`` / ``rejected`` split; sorted by day,
        then severity, then category.
        """
        counts: Counter[tuple[str, str, str | None, str]] = Counter()
        for created_at, risk, categories, status in self._store.counted_rows(_check_since(since)):
            day = created_at.date().isoformat()
            for category in categories or [None]:
                counts[(day, risk, category, status)] += 1
        rows: dict[tuple[str, str, str | None], dict[str, Any]] = {}
        for (day, risk, category, status), n in counts.items():
            row = rows.setdefault((day, risk, category), {"day": day, "risk": risk, "category": category, "items": 0,
                                                         **{s: 0 for s in STATUSES}})
            row["items"] += n
            row[status] += n
        return sorted(rows.values(), key=lambda r: (r["day"], RiskLevel(r["risk"]).severity, r["category"] or ""))

    def list(self, status: Status | None = None, since: datetime | None = None, limit: int = 100) -> builtins.list[ReviewItem]:
        """Up to ``limit`` items, oldest first, optionally only one ``status`` or those created at or after ``since``."""
        return self._store.select(_check_status(status), _check_since(since), check_limit(limit))

    def close(self) -> None:
        """Release the pooled database connections (call it when the application shuts down)."""
        self._store.close()

    def __enter__(self) -> ReviewQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ReviewQueue({self.database!r}, store_content={self.store_content})"


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (builtins.list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return value
