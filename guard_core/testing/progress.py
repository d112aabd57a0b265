"""Progress lines for slow fixture builds, so a first test run never looks hung.

A build that finishes within ``quiet_s`` prints nothing (nor does a cache hit, which never builds);
a longer one announces itself on stderr, reports what it is doing about once a second and says
when it is done::

    building the Qwen3Guard-Gen test checkpoint (once, cached in ~/.cache/...) ...
      step 40, loss 0.412, 3.1 s
      done in 7.9 s
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import TextIO


class BuildProgress:
    """Reports one fixture build on stderr once it has taken longer than ``quiet_s`` seconds.

    Use as a context manager around the build and call ``update`` with what it is doing; a timer
    announces the build even when the slow part never calls ``update`` (a save, a conversion). A
    build started inside another one (the tokenizer a checkpoint needs) reports nothing of its
    own: its time is part of the outer build's report.
    """

    _current = threading.local()

    def __init__(self, what: str, directory: Path, *, quiet_s: float = 3.0, every_s: float = 1.0,
                 stream: TextIO | None = None) -> None:
        self.what, self.directory = what, directory
        self.quiet_s, self.every_s = quiet_s, every_s
        self._stream = stream
        self._lock = threading.Lock()
        self._started = time.perf_counter()
        self._last_line = float("-inf")
        self._announced = self._closed = False
        self._timer: threading.Timer | None = None
        self._outer: BuildProgress | None = None

    def __enter__(self) -> BuildProgress:
        self._started = time.perf_counter()
        self._outer = getattr(BuildProgress._current, "build", None)
        if self._outer is None:
            BuildProgress._current.build = self
            self._timer = threading.Timer(self.quiet_s, self._announce)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._outer is not None:
            return
        BuildProgress._current.build = None
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._closed = True
            if self._announced:
                self._write(f"  {'done' if kind is None else 'failed'} in {self.elapsed_s:.1f} s")

    @property
    def elapsed_s(self) -> float:
        """Seconds since the build started."""
        return time.perf_counter() - self._started

    def update(self, detail: str) -> None:
        """Report ``detail`` (e.g. ``"step 40, loss 0.412"``) if the build is slow and a second has passed."""
        if self._outer is not None:
            self._outer.update(detail)
            return
        elapsed = self.elapsed_s
        if elapsed < self.quiet_s or elapsed - self._last_line < self.every_s:
            return
        with self._lock:
            self._announce_locked()
            self._write(f"  {detail}, {elapsed:.1f} s")
            self._last_line = elapsed

    def _announce(self) -> None:
        with self._lock:
            if not self._closed:
                self._announce_locked()

    def _announce_locked(self) -> None:
        if not self._announced:
            self._announced = True
            self._write(f"building {self.what} (once, cached in {self.directory}) ...")

    def _write(self, line: str) -> None:
        stream = self._stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()
