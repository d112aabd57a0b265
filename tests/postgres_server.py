"""A PostgreSQL server for tests: ``$QWEN3GUARD_TEST_POSTGRES_URL``, or a throwaway local one.

Without the variable, ``open_postgres`` runs ``initdb`` + ``pg_ctl`` (found on PATH or in
Debian's ``/usr/lib/postgresql/*/bin``) on a free 127.0.0.1 port in a temporary directory, with
trust authentication and no fsync (nothing in it outlives the run). PostgreSQL refuses to run
as root, so as root the server runs as the ``postgres`` user (via ``runuser``) that Debian's
package creates. ``PostgresUnavailable`` says why no server can be had, for a skip.

Each test gets its own database from ``create_database`` so tests never see each other's items.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import sqlalchemy as sa

URL_ENV = "QWEN3GUARD_TEST_POSTGRES_URL"
_USER = "qwen3guard"
_START_ATTEMPTS = 3


class PostgresUnavailable(Exception):
    """No PostgreSQL server can be used here; the message is the skip reason."""


def _bin_dir() -> Path:
    found = shutil.which("pg_ctl")
    if found and Path(found).with_name("initdb").exists():
        return Path(os.path.realpath(found)).parent
    candidates = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")]
    candidates = [c for c in candidates if (c / "initdb").exists()]
    if not candidates:
        raise PostgresUnavailable(f"no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin; "
                                  f"install Debian's postgresql package or set {URL_ENV}")
    return max(candidates, key=lambda c: [int(n) for n in re.findall(r"\d+", c.parent.name)] or [0])


def _run_as() -> tuple[list[str], pwd.struct_passwd | None]:
    """The command prefix that runs a server binary as a non-root user, and that user."""
    if os.geteuid() != 0:
        return [], None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("running as root and there is no 'postgres' user to run the server as") from None
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresUnavailable("running as root and runuser is missing, so the server cannot run as 'postgres'")
    return [runuser, "-u", user.pw_name, "--"], user


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _psycopg_url(url: str) -> sa.URL:
    parsed = sa.make_url(url)
    return parsed.set(drivername="postgresql+psycopg") if parsed.drivername in ("postgresql", "postgres") else parsed


class PostgresServer:
    """A reachable server: ``create_database()`` hands out empty databases, ``close()`` cleans up."""

    def __init__(self, admin_url: str, data_dir: Path | None = None, prefix: list[str] | None = None,
                 bin_dir: Path | None = None) -> None:
        self.admin_url = _psycopg_url(admin_url)
        self._data_dir, self._prefix, self._bin_dir = data_dir, prefix or [], bin_dir
        self._engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        self._created: list[str] = []

    def create_database(self) -> str:
        """A new empty database; its URL uses the plain ``postgresql://`` scheme users write."""
        name = f"qwen3guard_review_{uuid.uuid4().hex[:12]}"
        with self._engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        self._created.append(name)
        return self.admin_url.set(drivername="postgresql", database=name).render_as_string(hide_password=False)

    def close(self) -> None:
        """Drop the databases handed out (external server) or stop and delete the throwaway server."""
        if self._data_dir is None:
            with self._engine.connect() as conn:
                for name in self._created:
                    conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._engine.dispose()
        if self._data_dir is not None and self._bin_dir is not None:
            subprocess.run([*self._prefix, str(self._bin_dir / "pg_ctl"), "-D", str(self._data_dir / "data"),
                            "-m", "immediate", "-w", "stop"], capture_output=True, check=False)
            shutil.rmtree(self._data_dir, ignore_errors=True)


def _start_local() -> PostgresServer:
    bin_dir = _bin_dir()
    prefix, user = _run_as()
    root = Path(tempfile.mkdtemp(prefix="qwen3guard-pg-"))
    try:
        if user is not None:
            os.chown(root, user.pw_uid, user.pw_gid)
        init = subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", _USER, "-A", "trust",
                               "-E", "UTF8", "--no-locale", "--no-sync"], capture_output=True, text=True, check=False)
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {(init.stderr or init.stdout).strip()[-2000:]}")
        for _ in range(_START_ATTEMPTS):
            port = _free_port()
            options = (f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root} "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            start = subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "server.log"),
                                    "-o", options, "-w", "-t", "120", "start"], capture_output=True, text=True, check=False)
            if start.returncode == 0:
                return PostgresServer(f"postgresql+psycopg://{_USER}@127.0.0.1:{port}/postgres", root, prefix, bin_dir)
            log = (root / "server.log").read_text(errors="replace") if (root / "server.log").exists() else ""
            if "could not bind" not in log and "already in use" not in log:
                raise RuntimeError(f"pg_ctl start failed: {(start.stderr or start.stdout).strip()} {log.strip()[-2000:]}")
        raise RuntimeError(f"pg_ctl start found no free port in {_START_ATTEMPTS} attempts")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def open_postgres() -> PostgresServer:
    """The server named by ``$QWEN3GUARD_TEST_POSTGRES_URL`` or a fresh local one.

    Raises ``PostgresUnavailable`` (skip) when neither is possible, and ``RuntimeError``
    (fail) when PostgreSQL is installed but will not start: a broken server is a defect to see.
    """
    try:
        import psycopg  # noqa: F401 - the driver the review queue uses
    except ImportError:
        raise PostgresUnavailable("psycopg is not installed: pip install 'qwen3guard-middleware[postgres]'") from None
    url = os.environ.get(URL_ENV, "").strip()
    return PostgresServer(url) if url else _start_local()
