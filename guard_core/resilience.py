"""Retries, backoff and a circuit breaker for guards that call a model server.

A guard sits on the request path of an application, so a slow, throttled or dead moderation
server must cost a bounded amount of time and then produce a decision, never an open-ended wait
or an exception the adapter did not expect. The pieces here are small and backend-agnostic:

- ``TransientError`` / ``PermanentError`` tell the retry loop whether trying again can help
  (connection refused, 5xx, 429 and malformed bodies can; a rejected API key cannot).
- ``RetryPolicy`` builds the tenacity retry loop: bounded attempts, exponential backoff with full
  jitter (so many clients that failed together do not retry together), ``Retry-After`` honoured
  up to a cap, and an optional deadline for the whole call.
- ``CircuitBreaker`` stops sending requests to a server that keeps failing and lets a single
  probe through after a cool-down, so a dead replica costs nothing instead of a timeout per call.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from datetime import datetime, timezone
from typing import Callable, Literal

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from .config import check_count

logger = logging.getLogger("guard_core.resilience")

CircuitState = Literal["closed", "open", "half-open"]


class TransientError(Exception):
    """A failure that may go away on its own: retried by ``RetryPolicy``.

    ``retry_after`` is the server's own ``Retry-After`` hint in seconds. ``server_alive`` is True
    when the server answered (429 Too Many Requests): it is busy, not broken, so the circuit
    breaker does not count it as a failure.
    """

    def __init__(self, message: str, *, retry_after: float | None = None, server_alive: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.server_alive = server_alive


class PermanentError(Exception):
    """A failure that repeating the same request cannot fix (bad API key, unknown model, bad input)."""


class CircuitOpenError(Exception):
    """Every server's circuit is open; ``retry_in`` is the time until the next probe is allowed."""

    def __init__(self, message: str, *, retry_in: float) -> None:
        super().__init__(message)
        self.retry_in = retry_in


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date); None if absent or unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None  # "nan" / "inf" are no delay
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max((when - (now or datetime.now(timezone.utc))).total_seconds(), 0.0)


class wait_retry_after(wait_base):
    """Tenacity wait: the server's ``Retry-After`` (capped) when it sent one, else ``fallback``."""

    def __init__(self, fallback: wait_base, cap_s: float) -> None:
        self.fallback = fallback
        self.cap_s = cap_s

    def __call__(self, retry_state: RetryCallState) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome is not None else None
        hint = getattr(error, "retry_after", None)
        if hint is not None:
            return min(float(hint), self.cap_s)
        return self.fallback(retry_state)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before giving up on a moderation call.

    - ``max_attempts``: attempts in total (1 disables retries). With several servers, one attempt
      tries each available server once, so a dead replica never uses up the retry budget.
    - ``backoff_s`` / ``max_backoff_s``: the wait before retry ``n`` is uniform in
      ``[0, min(max_backoff_s, backoff_s * 2**n)]`` (exponential backoff, full jitter).
    - ``max_retry_after_s``: a server's ``Retry-After`` is honoured up to this many seconds.
    - ``deadline_s``: the whole call, attempts and waits included, ends within this many
      seconds: no new attempt starts once it would begin after it, and a request in flight is
      abandoned when it passes, ending the call as a timeout (None: bounded by ``max_attempts``
      and the backend's per-request timeout only).
    """

    max_attempts: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 30.0
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        check_count(self.max_attempts, "max_attempts")
        for name in ("backoff_s", "max_backoff_s", "max_retry_after_s"):
            if not _finite_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {getattr(self, name)!r}")
        if self.deadline_s is not None and (not _finite_number(self.deadline_s) or self.deadline_s <= 0):
            raise ValueError(f"deadline_s must be a finite number of seconds > 0 or None, got {self.deadline_s!r}")

    def _stop(self) -> stop_base:
        stop: stop_base = stop_after_attempt(self.max_attempts)
        if self.deadline_s is not None:
            stop = stop | stop_before_delay(self.deadline_s)
        return stop

    def _wait(self) -> wait_base:
        backoff = wait_random_exponential(multiplier=self.backoff_s, max=self.max_backoff_s)
        return wait_retry_after(backoff, self.max_retry_after_s)

    def async_retrying(self) -> AsyncRetrying:
        """A tenacity loop for coroutines (sleeps with asyncio, never blocking the event loop); re-raises
        the last error when it gives up. Blocking calls run it too, on ``RemoteGenGuard``'s loop thread."""
        return AsyncRetrying(stop=self._stop(), wait=self._wait(), retry=retry_if_exception_type(TransientError),
                             before_sleep=_log_retry, reraise=True)


def _finite_number(value: object) -> bool:
    """A real number that a sleep or a clock can use (NaN and infinity pass ``< 0`` checks, then crash ``sleep``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _log_retry(retry_state: RetryCallState) -> None:
    error = retry_state.outcome.exception() if retry_state.outcome is not None else None
    logger.warning("guard server call failed (attempt %d), retrying in %.2fs: %s",
                   retry_state.attempt_number, retry_state.upcoming_sleep, error)


class CircuitBreaker:
    """Per-server circuit breaker: closed -> open after ``failure_threshold`` failures in a row.

    While open, ``allow()`` refuses calls until ``reset_after_s`` have passed; then one probe call
    is let through (half-open). Its success closes the circuit, its failure opens it again for
    another ``reset_after_s``. A probe that never reports back (its caller died) is replaced
    after ``reset_after_s``. Thread-safe; ``clock`` is injectable for tests.
    """

    def __init__(self, failure_threshold: int = 5, reset_after_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold!r}")
        if reset_after_s < 0:
            raise ValueError(f"reset_after_s must be >= 0, got {reset_after_s!r}")
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_since: float | None = None

    @property
    def state(self) -> CircuitState:
        """``closed`` (calls flow), ``open`` (calls refused) or ``half-open`` (a probe may go or is out)."""
        with self._lock:
            if self._opened_at is None:
                return "closed"
            if self._probe_since is not None or self._clock() - self._opened_at >= self.reset_after_s:
                return "half-open"
            return "open"

    def retry_in(self) -> float:
        """Seconds until a call would be allowed again (0 when it would be now)."""
        with self._lock:
            now = self._clock()
            if self._opened_at is None:
                return 0.0
            since = self._probe_since if self._probe_since is not None else self._opened_at
            return max(since + self.reset_after_s - now, 0.0)

    def allow(self) -> bool:
        """Whether a call may go to the server now; in half-open state this claims the single probe."""
        with self._lock:
            if self._opened_at is None:
                return True
            now = self._clock()
            if self._probe_since is not None and now - self._probe_since < self.reset_after_s:
                return False
            if self._probe_since is None and now - self._opened_at < self.reset_after_s:
                return False
            self._probe_since = now
            return True

    def record_success(self) -> None:
        """The server answered: close the circuit and forget earlier failures."""
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._probe_since = None

    def record_failure(self) -> None:
        """The server failed: count it, and open (or re-open) the circuit at the threshold or after a failed probe."""
        with self._lock:
            self._failures += 1
            if self._probe_since is not None or self._failures >= self.failure_threshold:
                self._opened_at = self._clock()
                self._probe_since = None
