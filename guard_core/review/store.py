"""The review queue's database: SQLAlchemy Core tables and the SQL behind every queue method.

Imported only when a ``ReviewQueue`` is opened, so ``guard_core`` works without SQLAlchemy.
SQLite files run in WAL mode with a busy timeout and take the write lock at ``BEGIN
IMMEDIATE``, so several processes (proxy workers) share one file without "database is locked"
errors; PostgreSQL serves a fleet. Writes that must not interleave (creating the schema,
numbering resolutions) take the write lock on SQLite and an advisory lock on PostgreSQL.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect, Engine, Row, URL

from ..types import Category, RiskLevel
from .model import ReviewAlreadyResolved, ReviewItem, ReviewNotFound, ReviewStoreError, Status

logger = logging.getLogger("guard_core.review")

#: Bumped whenever the tables change; a database written by another version is refused, not guessed at.
SCHEMA_VERSION = 1
#: How long a writer waits for another process's SQLite write lock before failing.
SQLITE_BUSY_TIMEOUT_S = 30.0

_WRITE_OPTION = "qwen3guard_review_write"
_SCHEMA_LOCK = zlib.crc32(b"qwen3guard-review/schema")
_RESOLVE_LOCK = zlib.crc32(b"qwen3guard-review/resolve")
_POSTGRES_DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg", "postgresql+psycopg": "postgresql+psycopg"}
_SQLITE_DRIVERS = ("sqlite", "sqlite+pysqlite")


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite has no time zones, so UTC is stored naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert to UTC before storing, so stored times compare correctly as text on SQLite."""
        if value is None:
            return None
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Read back as an aware UTC datetime whatever the session time zone."""
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


metadata = sa.MetaData()

items = sa.Table(
    "qwen3guard_review_items",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("created_at", UTCDateTime(), nullable=False, index=True),
    sa.Column("source", sa.String(), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("risk", sa.String(16), nullable=False),
    sa.Column("categories", sa.JSON(), nullable=False),
    sa.Column("probabilities", sa.JSON(), nullable=False),
    sa.Column("model", sa.String(), nullable=False),
    sa.Column("request_id", sa.String()),
    sa.Column("conversation_hash", sa.String(64), nullable=False, index=True),
    sa.Column("content", sa.Text()),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("resolved_at", UTCDateTime()),
    # Order of resolutions across processes: the cursor of ``ReviewQueue.resolved``.
    sa.Column("resolution_seq", sa.BigInteger(), unique=True),
    sa.Column("decision", sa.String(16)),
    sa.Column("note", sa.Text()),
    sa.Column("reviewer", sa.String()),
)

schema_info = sa.Table("qwen3guard_review_schema", metadata, sa.Column("version", sa.Integer(), nullable=False))


def default_database_path() -> Path:
    """``$XDG_DATA_HOME/qwen3guard-middleware/review.db`` (``~/.local/share/...``; ``%LOCALAPPDATA%`` on Windows).

    A per-user data directory rather than the working directory, so every process of one
    deployment (proxy workers, the CLI) finds the same queue wherever it was started.
    """
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        base = Path(os.environ["LOCALAPPDATA"])
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "qwen3guard-middleware" / "review.db"


def database_url(value: str | os.PathLike[str] | None) -> URL:
    """The SQLAlchemy URL for a queue location: a SQLite file path, ``sqlite:///...`` or ``postgresql://...``.

    ``None`` means ``default_database_path()``. ``postgresql://`` and ``postgres://`` use the
    psycopg 3 driver. Other databases and in-memory SQLite (private to one connection, so not
    a shared queue) raise ``ValueError``.
    """
    if value is None or isinstance(value, os.PathLike):
        return _sqlite_path(Path(value or default_database_path()))
    if not isinstance(value, str):
        raise TypeError(f"review database must be a URL or a file path, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise ValueError("review database is empty; pass a file path or a sqlite:/// or postgresql:// URL")
    if "://" not in text:
        return _sqlite_path(Path(text))
    try:
        url = sa.make_url(text)
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise ValueError(f"review database URL is malformed: {exc}") from None
    if url.drivername in _POSTGRES_DRIVERS:
        return url.set(drivername=_POSTGRES_DRIVERS[url.drivername])
    if url.drivername in _SQLITE_DRIVERS:
        if not url.database or url.database == ":memory:" or url.query.get("mode") == "memory":
            raise ValueError(_IN_MEMORY)
        return url
    raise ValueError(f"review database {url.drivername!r} is not supported; use a SQLite file or postgresql://")


_IN_MEMORY = "an in-memory SQLite review queue is private to one connection; use a file path"


def _sqlite_path(path: Path) -> URL:
    """The URL of a SQLite file; SQLite reads the name ``:memory:`` as an in-memory database, refused."""
    if str(path) == ":memory:":
        raise ValueError(_IN_MEMORY)
    return URL.create("sqlite", database=str(path.expanduser()))


def sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL, ``None`` for PostgreSQL."""
    return Path(url.database) if url.get_backend_name() == "sqlite" and url.database else None


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy emits BEGIN itself (_sqlite_begin): the driver would skip it before reads and start writers DEFERRED.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("review database stays in %s journal mode (WAL unsupported here); concurrent writers wait longer", mode)
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    # A writer that started DEFERRED could not upgrade to the write lock while another process
    # writes (SQLITE_BUSY without waiting); IMMEDIATE waits its turn under busy_timeout instead.
    mode = "IMMEDIATE" if conn.get_execution_options().get(_WRITE_OPTION) else "DEFERRED"
    conn.exec_driver_sql(f"BEGIN {mode}")


def _create_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        path = sqlite_file(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url)
        sa.event.listen(engine, "connect", _sqlite_connect)
        sa.event.listen(engine, "begin", _sqlite_begin)
        return engine
    try:
        return sa.create_engine(url, pool_pre_ping=True)
    except ModuleNotFoundError as exc:
        raise ImportError(f"a PostgreSQL review queue needs psycopg ({exc.name} is missing): "
                          "pip install 'qwen3guard-middleware[postgres]'") from None


def _take_turns(conn: Connection, key: int) -> None:
    """Serialise this transaction with others of the same kind (SQLite's BEGIN IMMEDIATE already does)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))


def _item(row: Row[Any]) -> ReviewItem:
    m = row._mapping
    return ReviewItem(
        id=m["id"],
        created_at=m["created_at"],
        source=m["source"],
        role=m["role"],
        risk=RiskLevel(m["risk"]),
        categories=tuple(Category(c) for c in m["categories"]),
        probabilities={RiskLevel(k): float(v) for k, v in m["probabilities"].items()},
        model=m["model"],
        request_id=m["request_id"],
        conversation_hash=m["conversation_hash"],
        content=m["content"],
        status=m["status"],
        resolved_at=m["resolved_at"],
        decision=m["decision"],
        note=m["note"],
        reviewer=m["reviewer"],
    )


def _filtered(query: sa.Select[Any], status: Status | None, since: datetime | None) -> sa.Select[Any]:
    if status is not None:
        query = query.where(items.c.status == status)
    if since is not None:
        query = query.where(items.c.created_at >= since)
    return query


class SqlStore:
    """One queue database: opens the engine, creates or checks the schema, runs the queries.

    Thread-safe (each call checks a connection out of SQLAlchemy's pool) and safe across
    processes; database failures surface as ``ReviewStoreError`` naming the database (password hidden).
    """

    def __init__(self, url: URL, *, create: bool = True) -> None:
        self.label = url.render_as_string(hide_password=True)
        path = sqlite_file(url)
        if not create and path is not None and not path.is_file():
            raise FileNotFoundError(f"no review database at {path}")
        self._engine = _create_engine(url)
        self._writer = self._engine.execution_options(**{_WRITE_OPTION: True})
        try:
            with self._errors():
                self._ensure_schema(create)
        except BaseException:
            self._engine.dispose()
            raise

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sa.exc.DBAPIError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
            raise ReviewStoreError(f"review database {self.label}: {reason}") from exc

    def _ensure_schema(self, create: bool) -> None:
        with (self._writer if create else self._engine).begin() as conn:
            if create:
                _take_turns(conn, _SCHEMA_LOCK)
                metadata.create_all(conn)
            elif not sa.inspect(conn).has_table(schema_info.name):
                raise ReviewStoreError(f"review database {self.label} holds no review queue (its tables are missing)")
            version = conn.scalar(sa.select(schema_info.c.version))
            if version is None and create:
                conn.execute(sa.insert(schema_info).values(version=SCHEMA_VERSION))
            elif version != SCHEMA_VERSION:
                raise ReviewStoreError(f"review database {self.label} has schema version {version}; this "
                                       f"qwen3guard-middleware reads version {SCHEMA_VERSION} (install the matching version)")

    def insert(self, item: ReviewItem) -> None:
        """Store a new item."""
        row = item.to_dict() | {"created_at": item.created_at, "resolved_at": item.resolved_at}
        with self._errors(), self._writer.begin() as conn:
            conn.execute(sa.insert(items).values(**row))

    def get(self, item_id: str) -> ReviewItem:
        """The item with this id, or ``ReviewNotFound``."""
        with self._errors(), self._engine.connect() as conn:
            row = conn.execute(sa.select(items).where(items.c.id == item_id)).first()
        if row is None:
            raise ReviewNotFound(f"no review item {item_id!r} in {self.label}")
        return _item(row)

    def select(self, status: Status | None, since: datetime | None, limit: int) -> list[ReviewItem]:
        """Up to ``limit`` items, oldest first (the order a reviewer works through a queue)."""
        query = _filtered(sa.select(items), status, since).order_by(items.c.created_at, items.c.id).limit(limit)
        with self._errors(), self._engine.connect() as conn:
            return [_item(row) for row in conn.execute(query)]

    def iterate(self, status: Status | None, since: datetime | None) -> Iterator[ReviewItem]:
        """Every matching item, oldest first, streamed rather than loaded at once (exports)."""
        query = _filtered(sa.select(items), status, since).order_by(items.c.created_at, items.c.id)
        with self._errors(), self._engine.connect() as conn:
            for row in conn.execution_options(yield_per=500).execute(query):
                yield _item(row)

    def counted_rows(self, since: datetime | None) -> Iterator[tuple[datetime, str, list[str], str]]:
        """``(created_at, risk, categories, status)`` of every item since ``since``, for statistics."""
        query = _filtered(sa.select(items.c.created_at, items.c.risk, items.c.categories, items.c.status), None, since)
        with self._errors(), self._engine.connect() as conn:
            for created_at, risk, categories, status in conn.execution_options(yield_per=2000).execute(query):
                yield created_at, risk, categories, status

    def resolve(self, item_id: str, status: Status, changes: dict[str, Any]) -> ReviewItem:
        """Set a pending item's decision (``changes``: decision, resolved_at, note, reviewer) and number it."""
        with self._errors(), self._writer.begin() as conn:
            _take_turns(conn, _RESOLVE_LOCK)
            seq = conn.scalar(sa.select(sa.func.coalesce(sa.func.max(items.c.resolution_seq), 0))) + 1
            updated = conn.execute(
                sa.update(items)
                .where(items.c.id == item_id, items.c.status == "pending")
                .values(status=status, resolution_seq=seq, **changes)
            )
            row = conn.execute(sa.select(items).where(items.c.id == item_id)).first()
        if row is None:
            raise ReviewNotFound(f"no review item {item_id!r} in {self.label}")
        item = _item(row)
        if updated.rowcount != 1:
            raise ReviewAlreadyResolved(f"review item {item_id} was already {item.status} "
                                        f"at {item.resolved_at.isoformat() if item.resolved_at else '?'}; decisions are final")
        return item

    def resolution_cursor(self, before: datetime | None) -> int:
        """The number of the last resolution made before ``before`` (of the latest one when ``None``)."""
        query = sa.select(sa.func.coalesce(sa.func.max(items.c.resolution_seq), 0))
        if before is not None:
            query = query.where(items.c.resolved_at < before)
        with self._errors(), self._engine.connect() as conn:
            return int(conn.scalar(query))

    def resolved_after(self, cursor: int, limit: int) -> list[tuple[int, ReviewItem]]:
        """Up to ``limit`` items resolved after resolution number ``cursor``, in resolution order."""
        query = sa.select(items).where(items.c.resolution_seq > cursor).order_by(items.c.resolution_seq).limit(limit)
        with self._errors(), self._engine.connect() as conn:
            return [(row._mapping["resolution_seq"], _item(row)) for row in conn.execute(query)]

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()
