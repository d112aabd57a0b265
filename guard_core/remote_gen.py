"""Qwen3Guard-Gen behind an OpenAI-compatible server (vLLM, SGLang), as a drop-in for ``GenGuard``.

One machine stops being enough long before one vLLM replica does, so the guard can send its
conversations to one or more servers instead of running the model in-process. The server applies
the checkpoint's chat template, which builds the moderation prompt, so the client sends the
ordinary chat messages (exactly what upstream's README does) at temperature 0 and parses the
answer with the same ``parse_answer`` as the local path; verdicts therefore match the local
backend. When the server returns logprobs, the label token's top alternatives give P(Safe /
Controversial / Unsafe), as the local one-pass scorer's logits do.

Plain httpx talks to ``/v1/chat/completions`` directly: the request is one small JSON body,
retries and failover must be under our control rather than a client library's, and the core
stays free of the ``openai`` package. Requests always run on asyncio, blocking calls on a private
event loop thread: httpx's ``timeout`` bounds each network read, so a server dripping its answer
byte by byte would hold a blocking request indefinitely, while a coroutine can be cut at any
moment (``asyncio.wait_for``).

Failure handling is in ``resilience``: every call is bounded (per-request timeout, attempts,
optional deadline for the whole call) and ends in a verdict. A guard that cannot be reached yields
``Verdict(error="guard unavailable: ...")`` with risk Unsafe (fail closed) or Safe when
constructed with ``fail_open=True``; with a ``Policy``, ``Policy.on_error`` decides either way.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Coroutine, Iterable, Mapping, Sequence, TypeVar, Union
from urllib.parse import urlsplit

import httpx

from .config import check_count, check_http_url, check_timeout
from .gen_parser import parse_answer
from .gen_template import ANSWER_PREFIX, render_pieces
from .messages import Message, MessageLike, moderation_role, normalize_batch, normalize_messages
from .resilience import (
    CircuitBreaker,
    CircuitOpenError,
    PermanentError,
    RetryPolicy,
    TransientError,
    parse_retry_after,
)
from .tokenization import join_pieces
from .types import RiskLevel, Verdict

logger = logging.getLogger("guard_core.remote_gen")

#: First tokens of the three labels as the Qwen3 tokenizer splits ``Safety: <label>``; the full
#: word is accepted too for servers whose tokenizer keeps it whole.
_LABEL_TOKENS = {
    " Safe": RiskLevel.SAFE,
    " Cont": RiskLevel.CONTROVERSIAL,
    " Controversial": RiskLevel.CONTROVERSIAL,
    " Unsafe": RiskLevel.UNSAFE,
}
_LEVELS = (RiskLevel.SAFE, RiskLevel.CONTROVERSIAL, RiskLevel.UNSAFE)

#: Qwen3 control-token markup (``<|im_end|>``, ``<think>`` ...). The server tokenizes the rendered
#: template in one go, so such text in a message would become a real control token and let a
#: user close the conversation and forge the answer; a word joiner after ``<`` keeps it plain text.
_CONTROL_MARKUP = re.compile(r"<(?=\|[A-Za-z0-9_]+\|>|/?(?:think|tool_call|tool_response)>)")
_WORD_JOINER = "\u2060"

#: What one exchange with a server yields: the answer text and its logprobs, or an error to book.
_Outcome = Union[tuple[str, Any], TransientError, PermanentError]
_RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
#: Statuses that say the conversation itself is refused (too long, malformed): another replica would refuse it too.
_REJECTED_STATUS = frozenset({400, 413, 422})
_UNAVAILABLE_PREFIX = "guard unavailable: "
_T = TypeVar("_T")


class MalformedAnswerError(TransientError):
    """The server answered 200 but with no readable completion (no choices, no content, not JSON).

    Retried like a glitch; if it persists the verdict is ``unparseable`` (Unsafe whatever
    ``fail_open`` says), because a server that answers with nothing has judged nothing, and a
    fail-open setup must not turn that into Safe.
    """


class RejectedError(PermanentError):
    """The server refused this conversation itself (too long for its context, invalid): not an outage.

    It never fails open: otherwise an attacker could bypass the guard by sending oversized input.
    """


def defuse_control_markup(text: str) -> str:
    """``text`` with Qwen3 control-token markup broken up so a server tokenizes it as plain text."""
    return _CONTROL_MARKUP.sub("<" + _WORD_JOINER, text)


def normalize_base_url(url: str) -> str:
    """``http(s)://host:port/v1`` from what users type; a bare host gets vLLM/SGLang's ``/v1`` path."""
    text = check_http_url(url, "guard server URL ").rstrip("/")
    return text if urlsplit(text).path not in ("", "/") else text + "/v1"


def label_probabilities(logprobs: Any, content: str) -> dict[RiskLevel, float]:
    """P(Safe / Controversial / Unsafe) from an OpenAI ``choice.logprobs`` block; {} when unreadable.

    The label token is the one that starts right after ``Safety:`` in ``content``. Its top
    alternatives are renormalised over the three labels' first tokens; a label missing from the
    top list gets 0 (its true probability is below the last listed one).
    """
    start = content.find(ANSWER_PREFIX)
    if start < 0 or not isinstance(logprobs, Mapping) or not isinstance(logprobs.get("content"), list):
        return {}
    target, offset = start + len(ANSWER_PREFIX), 0
    for entry in logprobs["content"]:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("token"), str):
            return {}
        if offset == target:
            return _renormalise([entry, *(entry.get("top_logprobs") or [])])
        offset += len(entry["token"])
        if offset > target:
            return {}
    return {}


def _renormalise(candidates: Iterable[Any]) -> dict[RiskLevel, float]:
    logps: dict[RiskLevel, float] = {}
    for candidate in candidates:
        if not isinstance(candidate, Mapping):
            continue
        level = _LABEL_TOKENS.get(candidate.get("token"))  # type: ignore[arg-type]
        logp = candidate.get("logprob")
        if level is None or not isinstance(logp, (int, float)) or math.isnan(logp):
            continue
        logps[level] = max(logps.get(level, -math.inf), float(logp))
    if not logps:
        return {}
    top = max(logps.values())
    weights = {level: math.exp(logps[level] - top) if level in logps else 0.0 for level in _LEVELS}
    total = sum(weights.values())
    return {level: w / total for level, w in weights.items()}


@dataclass
class _Server:
    """One replica and its circuit breaker."""

    base_url: str
    breaker: CircuitBreaker
    #: Why the last call failed (kept for the message once its circuit is open).
    last_error: str | None = None

    @property
    def completions_url(self) -> str:
        return self.base_url + "/chat/completions"

    @property
    def models_url(self) -> str:
        return self.base_url + "/models"


@dataclass
class _Round:
    """Failures collected while trying each server once."""

    errors: list[str] = field(default_factory=list)
    retry_after: list[float] = field(default_factory=list)
    skipped: list[_Server] = field(default_factory=list)
    malformed: bool = False
    transient: bool = False

    def fail(self, server: _Server, error: TransientError | PermanentError) -> None:
        self.errors.append(f"{server.base_url}: {error}")
        self.malformed = self.malformed or isinstance(error, MalformedAnswerError)
        if isinstance(error, TransientError):
            self.transient = True
            if error.retry_after is not None:
                self.retry_after.append(error.retry_after)

    def outcome(self) -> Exception:
        """The error that ends this attempt: transient if any server may recover, permanent when every
        server tried is misconfigured (retrying cannot help), circuit open when none was tried (with
        each paused server's last error, the cause an operator has to fix)."""
        if not self.errors:
            wait = min(s.breaker.retry_in() for s in self.skipped)
            causes = "; ".join(f"{s.base_url}: {s.last_error}" for s in self.skipped if s.last_error)
            return CircuitOpenError(
                f"all {len(self.skipped)} guard server(s) failed repeatedly and are paused (circuit open); "
                f"next try in {wait:.1f}s" + (f"; last error: {causes}" if causes else ""), retry_in=wait)
        paused = f"; {len(self.skipped)} more paused (circuit open)" if self.skipped else ""
        if not self.transient:
            return PermanentError("; ".join(self.errors) + paused)
        kind = MalformedAnswerError if self.malformed else TransientError  # an answer with nothing in it is no outage
        return kind("; ".join(self.errors) + paused, retry_after=min(self.retry_after) if self.retry_after else None)


class RemoteGenGuard:
    """Moderates prompts and responses with Qwen3Guard-Gen served by vLLM or SGLang.

    Same public interface as ``GenGuard`` (``moderate``, ``moderate_batch``, ``amoderate``,
    ``amoderate_batch``, ``render_prompt``, ``model_id``), so adapters switch backends by
    configuration. ``base_urls`` are used round-robin; a failing one is skipped within the same
    attempt (failover) and paused by its circuit breaker. Thread-safe and usable from any number
    of event loops. ``moderate`` never raises for server trouble: it returns a verdict whose
    ``error`` says why no judgement was made. Bad input still raises ``ValueError``.
    """

    def __init__(
        self,
        base_urls: str | Sequence[str],
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        circuit_failures: int = 5,
        circuit_reset_s: float = 30.0,
        max_concurrency: int = 16,
        max_new_tokens: int = 128,
        logprobs: bool = True,
        top_logprobs: int = 5,
        fail_open: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Configure the client; nothing is sent until the first call, so servers may start later.

        ``model`` is the served model name (vLLM's ``--served-model-name``, by default the hub id
        it was started with); None asks the first reachable server's ``/v1/models``. ``timeout``
        bounds each HTTP request in seconds, from sending it to its last byte (at most
        ``config.MAX_TIMEOUT_S``); ``retry.deadline_s`` bounds the whole call. ``fail_open`` only
        changes ``verdict.risk`` for an unreachable guard (Safe instead of Unsafe); a ``Policy``
        decides with ``on_error``.
        """
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        for url in urls:
            if not isinstance(url, str):
                raise TypeError(f"base_urls must be a URL string or a list of them, got {type(url).__name__} {url!r}")
        urls = [u for url in urls for u in url.split(",") if u.strip()]
        if not urls:
            raise ValueError("no guard server URL given; pass base_urls=['http://host:8000/v1'] or set QWEN3GUARD_GEN_URL")
        timeout = check_timeout(timeout)
        check_count(max_concurrency, "max_concurrency")
        check_count(max_new_tokens, "max_new_tokens")
        check_count(circuit_failures, "circuit_failures")
        check_count(top_logprobs, "top_logprobs", minimum=0, maximum=20, hint=" (the OpenAI API limit)")
        for name, flag in (("logprobs", logprobs), ("fail_open", fail_open)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {type(flag).__name__} {flag!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a guard_core.RetryPolicy or None, got {type(retry).__name__}")
        self._servers = [_Server(normalize_base_url(u), CircuitBreaker(circuit_failures, circuit_reset_s)) for u in urls]
        self._model = model or None
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.max_concurrency = max_concurrency
        self.max_new_tokens = max_new_tokens
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.fail_open = fail_open
        self._headers = {"Accept": "application/json", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._cursor = itertools.count()
        self._lock = threading.Lock()
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary())

    @classmethod
    def from_server(cls, base_url: str | Sequence[str], model: str | None = None, **kwargs: Any) -> RemoteGenGuard:
        """The ``GenGuard.from_server`` spelling: one URL, a comma-separated list or a list of URLs."""
        return cls(base_url, model=model, **kwargs)

    @property
    def model_id(self) -> str:
        """The served model name: as configured, or as discovered on the first call ("" before that)."""
        return self._model or ""

    @property
    def base_urls(self) -> list[str]:
        """The normalised server URLs, in round-robin order."""
        return [s.base_url for s in self._servers]

    def circuit_states(self) -> dict[str, str]:
        """Each server's circuit state, for health endpoints and logs."""
        return {s.base_url: s.breaker.state for s in self._servers}

    def __repr__(self) -> str:
        return f"RemoteGenGuard({self.base_urls!r}, model={self._model!r}, timeout={self.timeout!r})"

    def render_prompt(self, messages: Iterable[MessageLike]) -> str:
        """The moderation prompt the server's (upstream) chat template builds from these messages."""
        return join_pieces(render_pieces(normalize_messages(messages)))

    def moderate(self, messages: Iterable[MessageLike]) -> Verdict:
        """Moderate one conversation: a prompt if the last turn is the user's, else the response."""
        return _run_blocking(self._amoderate_one(normalize_messages(messages)))

    def moderate_batch(self, conversations: Iterable[Iterable[MessageLike]]) -> list[Verdict]:
        """Moderate many conversations, at most ``max_concurrency`` requests in flight; input order kept."""
        return _run_blocking(self._amoderate_many(normalize_batch(conversations)))

    async def amoderate(self, messages: Iterable[MessageLike]) -> Verdict:
        """Async ``moderate`` (non-blocking HTTP)."""
        return await self._amoderate_one(normalize_messages(messages))

    async def amoderate_batch(self, conversations: Iterable[Iterable[MessageLike]]) -> list[Verdict]:
        """Async ``moderate_batch``: concurrent requests, at most ``max_concurrency`` in flight."""
        return await self._amoderate_many(normalize_batch(conversations))

    def close(self) -> None:
        """Close the HTTP client of blocking calls (async clients: ``aclose`` from their event loop)."""
        loop = _blocking_loop(start=False)
        with self._lock:
            client = self._async_clients.pop(loop, None) if loop is not None else None
        if client is not None:
            _run_blocking(client.aclose())

    async def aclose(self) -> None:
        """Close the HTTP clients of this event loop and the blocking one."""
        with self._lock:
            client = self._async_clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()
        self.close()

    def __enter__(self) -> RemoteGenGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> RemoteGenGuard:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _amoderate_many(self, normalized: list[list[Message]]) -> list[Verdict]:
        limit = asyncio.Semaphore(self.max_concurrency)

        async def one(messages: list[Message]) -> Verdict:
            async with limit:
                return await self._amoderate_one(messages)

        return list(await asyncio.gather(*(one(m) for m in normalized)))

    async def _amoderate_one(self, messages: list[Message]) -> Verdict:
        started, start = time.perf_counter(), next(self._cursor)
        deadline = None if self.retry.deadline_s is None else time.monotonic() + self.retry.deadline_s
        retrying = self.retry.async_retrying()
        try:
            async for attempt in retrying:
                with attempt:
                    content, logprobs = await self._around(messages, start + attempt.retry_state.attempt_number - 1, deadline)
        except (TransientError, PermanentError, CircuitOpenError) as exc:
            return self._failure(messages, exc, retrying.statistics.get("attempt_number", 1), started)
        return self._verdict(messages, content, logprobs, started)

    def _rotation(self, offset: int) -> list[_Server]:
        k = offset % len(self._servers)
        return self._servers[k:] + self._servers[:k]

    async def _around(self, messages: list[Message], offset: int, deadline: float | None) -> tuple[str, Any]:
        """One attempt: each server in round-robin order until one answers (failover).

        Each request gets ``timeout`` seconds, cut to what is left of the call's ``deadline``.
        """
        failures = _Round()
        for server in self._rotation(offset):
            budget = self.timeout if deadline is None else min(self.timeout, deadline - time.monotonic())
            if budget <= 0:
                failures.fail(server, TransientError(f"not tried: the call's deadline_s={self.retry.deadline_s:g} had passed"))
                break
            if not server.breaker.allow():
                failures.skipped.append(server)
                continue
            try:
                result = await asyncio.wait_for(self._acall(self._async_client(), server, messages), budget)
            except asyncio.TimeoutError:
                limit = f"the {self.timeout:g}s timeout" if budget >= self.timeout else f"deadline_s={self.retry.deadline_s:g}"
                result = TransientError(f"no complete answer within {limit}")
            except httpx.HTTPError as exc:
                result = _transport_error(exc, self.timeout)
            except RuntimeError as exc:  # asyncio at interpreter exit: no thread left to resolve the host name
                result = PermanentError(f"cannot reach the server while the interpreter shuts down ({exc})")
            if isinstance(result, tuple):
                server.breaker.record_success()
                return result
            self._settle(server, result, failures)
        raise failures.outcome()

    @staticmethod
    def _settle(server: _Server, error: TransientError | PermanentError, failures: _Round) -> None:
        """Book a failed call on the server's breaker, then let the attempt go on to the next server.

        A rejected conversation ends the attempt at once: the input is the problem, not the server.
        Any other permanent error (404, a redirect, 401/403, 501) is this replica's configuration:
        the next one may serve the request, and the replica's circuit counts it, so it is paused.
        """
        if isinstance(error, RejectedError):
            server.breaker.record_success()
            raise RejectedError(f"{server.base_url}: {error}")
        if isinstance(error, TransientError) and error.server_alive:
            server.breaker.record_success()
        else:
            server.breaker.record_failure()
            server.last_error = str(error)
        log = logger.warning if isinstance(error, PermanentError) else logger.info
        log("guard server %s failed: %s", server.base_url, error)
        failures.fail(server, error)

    def _body(self, messages: list[Message]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._model,
            "messages": [{"role": m.role, "content": defuse_control_markup(m.content)} for m in messages],
            "temperature": 0.0,
            "max_tokens": self.max_new_tokens,
        }
        if self.logprobs and self.top_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs
        return body

    def _read(self, response: httpx.Response) -> _Outcome:
        """The answer text and logprobs of a completion response, or the error it amounts to."""
        if response.status_code != 200:
            return self._status_error(response)
        try:
            data = response.json()
            choice = data["choices"][0]
            message = choice["message"]
            content = message.get("content") or message.get("reasoning_content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return MalformedAnswerError(f"malformed response body (expected an OpenAI chat.completion): {response.text[:120]!r}")
        if not isinstance(content, str):
            return MalformedAnswerError(f"malformed response body (no message content): {response.text[:120]!r}")
        return content, choice.get("logprobs")

    def _status_error(self, response: httpx.Response) -> TransientError | PermanentError:
        """Map an HTTP error status to retry-or-not, with a message that says what to fix."""
        status, detail = response.status_code, _error_detail(response)
        if status in _RETRYABLE_STATUS:
            return TransientError(f"HTTP {status}: {detail}", retry_after=parse_retry_after(response.headers.get("Retry-After")),
                                  server_alive=status == 429)
        if status in (401, 403):
            return PermanentError(f"HTTP {status}: {detail} (check the API key: api_key= or QWEN3GUARD_GEN_API_KEY)")
        if status == 404:
            return PermanentError(
                f"HTTP 404: {detail} (model {self._model!r}: set model= or QWEN3GUARD_GEN_MODEL to the server's "
                "--served-model-name, and make sure the URL ends in /v1)")
        if 300 <= status < 400:
            target = response.headers.get("Location", "elsewhere")
            return PermanentError(f"HTTP {status}: the guard URL redirects to {target} (redirects are not followed; "
                                  "set the server's own URL in base_urls= or QWEN3GUARD_GEN_URL)")
        if status not in _REJECTED_STATUS:  # 405, 410, 501 and other 5xx: this URL serves no completions
            return PermanentError(f"HTTP {status}: {detail} (the server cannot serve chat completions here; is the URL "
                                  "an OpenAI-compatible vLLM / SGLang server's /v1?)")
        return RejectedError(f"the server rejected the conversation, HTTP {status}: {detail}")

    async def _acall(self, client: httpx.AsyncClient, server: _Server, messages: list[Message]) -> _Outcome:
        """One HTTP exchange with one server (plus model discovery the first time)."""
        if self._model is None:
            found = self._read_models(await client.get(server.models_url))
            if not isinstance(found, str):
                return found
            self._set_model(server, found)
        return self._read(await client.post(server.completions_url, json=self._body(messages)))

    def _read_models(self, response: httpx.Response) -> str | TransientError | PermanentError:
        """The guard among the served models of ``/v1/models`` (the only one, or the one named like a
        Qwen3Guard model), or the error the response amounts to: a server with several models and no
        guard among them would otherwise be asked to judge by a chat model, which says what it is told."""
        if response.status_code != 200:
            return self._status_error(response)
        try:
            names = [str(entry["id"]) for entry in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            names = []
        guards = [n for n in names if "qwen3guard" in n.lower().replace("-", "").replace("_", "")]
        if guards:
            return guards[0]
        if len(names) == 1:
            logger.warning("the guard server's only model, %r, is not named like a Qwen3Guard model; set model= (or "
                           "QWEN3GUARD_GEN_MODEL) to silence this if it is one", names[0])
            return names[0]
        if not names:
            return PermanentError(f"/models lists no model ({response.text[:120]!r}); set model= or QWEN3GUARD_GEN_MODEL")
        return PermanentError(f"the server serves {len(names)} models ({', '.join(names[:5])}) and none is named like a "
                              "Qwen3Guard model; set model= or QWEN3GUARD_GEN_MODEL to the guard's served name")

    def _set_model(self, server: _Server, name: str) -> None:
        with self._lock:
            if self._model is None:
                self._model = name
                logger.info("guard server %s serves %r; using it", server.base_url, name)

    def _async_client(self) -> httpx.AsyncClient:
        """This event loop's client (httpx async pools are bound to the loop that created them)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._async_clients.get(loop)
            if client is None or client.is_closed:
                client = httpx.AsyncClient(headers=self._headers, timeout=self.timeout, limits=self._limits())
                self._async_clients[loop] = client
            return client

    def _limits(self) -> httpx.Limits:
        return httpx.Limits(max_connections=None, max_keepalive_connections=self.max_concurrency * len(self._servers))

    def _verdict(self, messages: list[Message], content: str, logprobs: Any, started: float) -> Verdict:
        role = moderation_role(messages)
        elapsed = time.perf_counter() - started
        parsed = parse_answer(content, response=role == "response")
        if not parsed.ok:
            return Verdict(RiskLevel.UNSAFE, role=role, model=self.model_id, elapsed_s=elapsed, raw_output=content,
                           error_kind="unparseable", error=f"unparseable model output {content[:80]!r} (is the server running a "
                                 "Qwen3Guard-Gen checkpoint with its own chat template?)")
        probabilities = label_probabilities(logprobs, content) if self.logprobs else {}
        return Verdict(parsed.risk, parsed.categories, parsed.refusal, probabilities, role, self.model_id, elapsed, content)

    def _failure(self, messages: list[Message], error: Exception, attempts: int, started: float) -> Verdict:
        """The verdict when no judgement was made: unavailable (fail_open decides) or rejected input (Unsafe)."""
        role = moderation_role(messages)
        elapsed = time.perf_counter() - started
        if isinstance(error, RejectedError):
            message, kind = f"guard request rejected: {error}", "rejected"
            risk = RiskLevel.UNSAFE
        elif isinstance(error, MalformedAnswerError):
            message, kind = f"unreadable guard answer after {attempts} attempt(s): {error}", "unparseable"
            risk = RiskLevel.UNSAFE
        else:
            tries = f" after {attempts} attempt(s)" if isinstance(error, TransientError) else ""
            message, kind = f"{_UNAVAILABLE_PREFIX}{error}{tries}", "unavailable"
            risk = RiskLevel.SAFE if self.fail_open else RiskLevel.UNSAFE
        logger.error("no moderation verdict (%s): %s", "fail open" if risk is RiskLevel.SAFE else "fail closed", message)
        return Verdict(risk, role=role, model=self.model_id, elapsed_s=elapsed, error=message, error_kind=kind)  # type: ignore[arg-type]


_blocking_lock = threading.Lock()
_blocking: tuple[int, asyncio.AbstractEventLoop] | None = None


def _blocking_loop(*, start: bool = True) -> asyncio.AbstractEventLoop | None:
    """The event loop blocking calls run on: a daemon thread's, started on first use and again
    in a forked child (whose copy of the thread is gone); None if not started and ``start`` is False."""
    global _blocking
    with _blocking_lock:
        if _blocking is None or _blocking[0] != os.getpid():
            if not start:
                return None
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="qwen3guard-remote", daemon=True).start()
            _blocking = (os.getpid(), loop)
        return _blocking[1]


def _run_blocking(work: Coroutine[Any, Any, _T]) -> _T:
    """Run ``work`` on the blocking calls' event loop and wait for its result in this thread."""
    loop = _blocking_loop()
    assert loop is not None
    return asyncio.run_coroutine_threadsafe(work, loop).result()


def _transport_error(exc: httpx.HTTPError, timeout: float) -> TransientError | PermanentError:
    if isinstance(exc, httpx.TimeoutException):
        return TransientError(f"no answer within the {timeout:g}s timeout ({type(exc).__name__})")
    if isinstance(exc, httpx.ConnectError):
        return TransientError(f"cannot connect ({exc or type(exc).__name__}); is the server running?")
    if isinstance(exc, httpx.TransportError):
        return TransientError(f"connection failed: {type(exc).__name__}: {exc}")
    return PermanentError(f"{type(exc).__name__}: {exc}")


def _error_detail(response: httpx.Response) -> str:
    """The server's own error message (OpenAI ``{"error": {"message": ...}}``, FastAPI ``detail``) or the body start."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(data, Mapping):
        error = data.get("error")
        if isinstance(error, Mapping) and error.get("message"):
            return str(error["message"])[:300]
        if isinstance(error, str):
            return error[:300]
        if data.get("message") or data.get("detail"):
            return str(data.get("message") or data.get("detail"))[:300]
    return response.text[:200]
