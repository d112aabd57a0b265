"""``qwen3guard review ...``: the reviewer's side of the review queue, from a terminal.

``list`` and ``stats`` print tables, ``show`` and ``resolve`` print the item as JSON, ``export``
writes JSON Lines or CSV (``--output`` is replaced only once the export succeeded, and never the
database itself). The database comes from ``--db`` or ``QWEN3GUARD_REVIEW_DB`` (else the
default SQLite file); the CLI never creates a SQLite database, so a mistyped path is an error
rather than an empty queue
(``ReviewQueue(..., create=False)``). Exit status 0 on success, 2 on any error (one line on stderr),
130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import stat
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence, TextIO

from .cli import Parser, check_utf8, interrupted, stdout_closed
from .config import REVIEW_DB_ENV, Settings
from .review import STATUSES, ReviewItem, ReviewQueue
from .review.queue import check_limit
from .review.store import database_url, sqlite_file

PROG = "qwen3guard review"
EXIT_OK, EXIT_ERROR = 0, 2


def _limit(text: str) -> int:
    """``--limit``: the queue's own check, as a usage error (a huge number would overflow the database)."""
    try:
        return check_limit(int(text) if text.strip().lstrip("+-").isdigit() else text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _utf8(text: str) -> str:
    """An argument stored or looked up as text: bytes that are not UTF-8 are a usage error naming the argument."""
    try:
        return check_utf8(text, "the text")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _since(text: str) -> datetime:
    """``YYYY-MM-DD`` or an ISO 8601 time; without a UTC offset it is read as UTC."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD) or ISO 8601 time") from None
    try:
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    except OverflowError:  # 0001-01-01T00:00+14:00 is before the first datetime in UTC
        raise argparse.ArgumentTypeError(f"{text!r} is out of range once converted to UTC") from None


def _parser() -> Parser:
    db = Parser(add_help=False)
    db.add_argument("--db", default=argparse.SUPPRESS, metavar="URL",
                    help=f"SQLite file or postgresql:// URL (default: ${REVIEW_DB_ENV}, else the default SQLite file)")
    since = {"type": _since, "metavar": "DATE", "help": "only items created at or after DATE (YYYY-MM-DD or ISO time, UTC)"}
    status = {"choices": STATUSES, "help": "only items with this status"}

    parser = Parser(prog=PROG, parents=[db], description="Inspect and decide the items that Action.REVIEW queued.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub = {"parents": [db], "program": PROG}  # usage errors say "qwen3guard review: error: ..."
    ls = commands.add_parser("list", help="list items, oldest first", **sub)
    ls.add_argument("--status", **status)
    ls.add_argument("--since", **since)
    ls.add_argument("--limit", type=_limit, default=100, help="at most this many items (default 100)")
    show = commands.add_parser("show", help="print one item as JSON", **sub)
    show.add_argument("id", type=_utf8)
    resolve = commands.add_parser("resolve", help="approve or reject a pending item", **sub)
    resolve.add_argument("id", type=_utf8)
    resolve.add_argument("decision", choices=("approve", "reject"))
    resolve.add_argument("--note", type=_utf8, help="why (kept with the decision)")
    resolve.add_argument("--reviewer", type=_utf8, help="who decided (default: your login name)")
    export = commands.add_parser("export", help="write items as JSON Lines or CSV", **sub)
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="default jsonl")
    export.add_argument("--output", metavar="FILE", help="write to FILE (default: stdout)")
    export.add_argument("--status", **status)
    export.add_argument("--since", **since)
    stats = commands.add_parser("stats", help="item counts per day, level and category", **sub)
    stats.add_argument("--since", **since)
    return parser


def _location(args: argparse.Namespace) -> str | None:
    """The queue's database from ``--db``, else the environment (``None``: the default SQLite file)."""
    return getattr(args, "db", None) or Settings.from_env().review_db


def _open_queue(args: argparse.Namespace) -> ReviewQueue:
    location = _location(args)
    try:
        return ReviewQueue(location, create=False)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}; pass --db URL or set {REVIEW_DB_ENV}") from None


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _item_rows(items: Sequence[ReviewItem]) -> list[list[Any]]:
    return [[i.id, i.created_at.strftime("%Y-%m-%d %H:%M:%S"), i.status, i.source, i.role, i.risk.value,
             ", ".join(c.value for c in i.categories) or None] for i in items]


def _run(args: argparse.Namespace, out: TextIO) -> None:
    with _open_queue(args) as queue:
        if args.command == "list":
            items = queue.list(status=args.status, since=args.since, limit=args.limit)
            print(_table(("ID", "CREATED (UTC)", "STATUS", "SOURCE", "ROLE", "RISK", "CATEGORIES"), _item_rows(items))
                  if items else "no review items", file=out)
        elif args.command == "show":
            print(json.dumps(queue.get(args.id).to_dict(), ensure_ascii=False, indent=2), file=out)
        elif args.command == "resolve":
            item = queue.resolve(args.id, args.decision, note=args.note, reviewer=args.reviewer or _login_name())
            print(json.dumps(item.to_dict(), ensure_ascii=False, indent=2), file=out)
        elif args.command == "export":
            if args.output is None:
                queue.export(out, args.format, status=args.status, since=args.since)
            else:
                _check_not_database(args.output, _location(args))
                count = _export_to_file(queue, args)
                print(f"exported {count} items to {args.output}", file=out)
        else:
            rows = queue.stats(since=args.since)
            print(_table(("DAY", "RISK", "CATEGORY", "ITEMS", *(s.upper() for s in STATUSES)),
                         [[r["day"], r["risk"], r["category"], r["items"], *(r[s] for s in STATUSES)] for r in rows])
                  if rows else "no review items", file=out)


def _check_not_database(output: str, location: str | None) -> None:
    """Refuse to export over the queue's own SQLite file (or its journal files): that would destroy the queue."""
    database = sqlite_file(database_url(location))
    if database is None:
        return
    target = Path(output).expanduser()
    same = target.resolve() in {Path(f"{database}{suffix}").resolve() for suffix in ("", "-wal", "-shm", "-journal")}
    if same or (target.exists() and database.exists() and os.path.samefile(target, database)):
        raise ValueError(f"--output {output} is the review database itself; write the export to another file")


def _export_to_file(queue: ReviewQueue, args: argparse.Namespace) -> int:
    """Export into a temporary file beside ``--output``, renamed over it only once the export succeeded.

    A failed export (database unreachable, disk full) so leaves an existing file as it was. The
    new file gets the old file's permissions, or the usual ones of a new file; a symbolic link keeps
    pointing at the new file. Where no temporary file can take its place (``_temporary_beside``)
    the target is written directly.
    """
    target = Path(args.output).expanduser().resolve()
    temporary = _temporary_beside(target, args.output)
    if temporary is None:
        with open(target, "w", encoding="utf-8", newline="") as fp:
            return queue.export(fp, args.format, status=args.status, since=args.since)
    fd, name = temporary
    try:
        with open(fd, "w", encoding="utf-8", newline="") as fp:
            count = queue.export(fp, args.format, status=args.status, since=args.since)
        os.chmod(name, stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~_umask())
        os.replace(name, target)
    except BaseException:
        os.unlink(name)
        raise
    return count


def _temporary_beside(target: Path, given: str) -> tuple[int, str] | None:
    """A temporary file beside ``target`` to rename over it; None where the target must be written in
    place: not a regular file (``/dev/stdout``, a pipe), one with other hard links (a rename would
    part them), or a writable file in a folder that takes no new file."""
    if target.exists() and (not target.is_file() or target.stat().st_nlink > 1):
        return None
    try:
        return tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        if target.is_file() and os.access(target, os.W_OK):
            return None
        raise OSError(f"cannot write {given}: {exc.strerror}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _login_name() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qwen3guard review``; returns the exit status (0 success, 2 error, 130 Ctrl-C, 141 reader gone)."""
    from .review import ReviewStoreError

    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        _run(args, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (``| head``): quiet, like the verdict command
        return stdout_closed()
    except KeyboardInterrupt:  # e.g. waiting on a locked or slow database
        return interrupted(PROG)
    except SystemExit as exc:  # --help, or a usage error (already printed on one line by Parser)
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except (ValueError, LookupError, ImportError, OSError, ReviewStoreError) as exc:
        message = exc.args[0] if isinstance(exc, LookupError) and exc.args else exc
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
