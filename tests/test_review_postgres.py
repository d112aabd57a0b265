"""The review queue contract of ``test_review`` against a real PostgreSQL server.

The server is ``$QWEN3GUARD_TEST_POSTGRES_URL`` or a throwaway one started from the installed
PostgreSQL binaries (``tests/postgres_server.py``); without either, every test here skips with
the reason. Each test gets a fresh database.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import test_review
from guard_core.review import ReviewQueue, ReviewStoreError
from guard_core.review.store import database_url
from postgres_server import PostgresServer, PostgresUnavailable, open_postgres


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the module."""
    try:
        server = open_postgres()
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL server: {exc}")
    yield server
    server.close()


class TestPostgres(test_review.QueueContract):
    """The contract on PostgreSQL, reached through the plain ``postgresql://`` URL users write."""

    @pytest.fixture
    def db_url(self, postgres: PostgresServer) -> str:
        return postgres.create_database()


def test_times_are_stored_as_timestamptz_instants(postgres: PostgresServer) -> None:
    url = postgres.create_database()
    with ReviewQueue(url.replace("postgresql://", "postgresql+psycopg://", 1)) as queue:
        item = queue.get(queue.submit(test_review.controversial(), source="test", conversation=test_review.ask("x")))
    engine = sa.create_engine(database_url(url), connect_args={"options": "-c timezone=Asia/Tokyo"})
    try:
        with engine.connect() as conn:
            kind = conn.exec_driver_sql("SELECT data_type FROM information_schema.columns "
                                        "WHERE table_name = 'qwen3guard_review_items' AND column_name = 'created_at'").scalar()
            stored = conn.exec_driver_sql("SELECT created_at FROM qwen3guard_review_items").scalar()
    finally:
        engine.dispose()
    assert kind == "timestamp with time zone" and stored == item.created_at


def test_an_unreachable_server_is_one_clear_error_without_the_password(postgres: PostgresServer) -> None:
    url = postgres.admin_url.set(drivername="postgresql", port=1, database="nowhere", password="hunter2")
    with pytest.raises(ReviewStoreError) as caught:
        ReviewQueue(url.render_as_string(hide_password=False))
    message = str(caught.value)
    assert message.startswith(f"review database {url.set(drivername='postgresql+psycopg').render_as_string()}: ")
    assert "hunter2" not in message and "\n" not in message
