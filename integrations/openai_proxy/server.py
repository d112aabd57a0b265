"""The guard proxy: an OpenAI-compatible HTTP server that moderates traffic to an upstream API.

Every decision is the client wrapper's (``exchange``, ``streaming``); the proxy only moves bytes.
Upstream SSE events the guard hands back unchanged are forwarded as the very bytes upstream sent,
so a safe stream is byte-identical to the upstream one; objects the guard wrote or annotated are
serialised with their decisions in ``qwen3guard``. Errors use OpenAI's error body: 400 for the
client's mistakes (bad JSON or JSON not in UTF-8, a key twice in one object, wrong types, unknown
roles, a blocked prompt in ``error`` mode), 401, 404, 413, 415 (a compressed body), 500
(``guard_error``, not to be retried) when the guard itself fails, and 502 / 504 when the upstream
is down, slow or answers something unreadable; mid-stream, an SSE error event ends the stream
cleanly. Review items opened for a request are named in the ``x-qwen3guard-review`` header.
Content and keys are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Literal
from urllib.parse import quote

import httpx
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import ResponseStreamEvent
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from guard_core import CONFIGURED, METADATA_KEY, Moderator
from guard_core.cli import one_line
from guard_core.config import check_api_key, check_http_url
from guard_core.messages import GUARDED_KEYS, refuse_case_variants
from guard_core.steps import arun

from . import chunks
from .errors import MalformedReplyError, UnsafeContentError
from .exchange import DEFAULT_MAX_CHOICES, Endpoint, OpenAIGuard, Request, note, prompt_flow, review_ids, whole_flow
from .streaming import GuardedItems, stream_items

ProxyOnUnsafe = Literal["finish", "error"]
#: The ``on_unsafe`` of the guard behind each proxy ``on_unsafe``.
GUARD_MODES = {"finish": "rewrite", "error": "abort"}
REVIEW_HEADER = "x-qwen3guard-review"
#: The proxy's own headers: one from upstream (or a client) would pass for the proxy's decision metadata.
_OWN_HEADERS = "x-qwen3guard-"

log = logging.getLogger(__name__)
#: A blank line, which ends an event: two line ends, each CRLF, LF or a CR not followed by LF.
_SSE_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")
#: Headers that describe one hop, or that the proxy sets itself; every other header passes both ways.
_HOP_HEADERS = frozenset({
    "host", "connection", "keep-alive", "proxy-authorization", "proxy-authenticate", "proxy-connection", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length", "content-encoding", "content-type", "accept-encoding", "authorization",
    "date", "server",
})
_PATHS: dict[Endpoint, tuple[str, str]] = {"chat": ("chat/completions", "messages"), "responses": ("responses", "input")}


async def _ended(pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The upstream's bytes, then a blank line: it ends a last event the body stopped without one (after a
    complete stream it is an empty event, skipped)."""
    async for piece in pieces:
        yield piece
    yield b"\n\n"


def _passed(headers: Any) -> dict[str, str]:
    """The end-to-end headers of a request or reply (OpenAI-Organization, Idempotency-Key, x-request-id, rate limits, ...)."""
    return {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS and not k.lower().startswith(_OWN_HEADERS)}


class _HTTPError(Exception):
    """An answer in OpenAI's error format, raised anywhere in a handler."""

    def __init__(self, status: int, message: str, code: str, *, kind: str | None = None, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.extra, self.headers = status, code, extra, headers
        self.kind = kind or ("invalid_request_error" if status < 500 else "upstream_error")

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.kind, "code": self.code}, **self.extra},
                            status_code=self.status, headers=self.headers)


def _guard_failed(exc: Exception, path: str) -> Response:
    """A guard that raised (out of GPU memory, a bug) fails closed with a 500 the openai SDK does not retry:
    each retry would call (and bill) the upstream again only to throw its answer away the same way."""
    log.error("guarding /v1/%s failed: %s", path, one_line(exc, None))
    return _HTTPError(500, f"the guard failed ({type(exc).__name__}); nothing unjudged was sent", "guard_error",
                      kind="guard_error", headers={"x-should-retry": "false"}).response()


def _blocked(exc: UnsafeContentError, body: dict[str, Any], *, answered: bool) -> _HTTPError:
    """A block as an error: 400 ``content_filter``, or 503 ``guard_unavailable`` when the guard could not
    judge at all (an outage is not the client's fault). The SDK retries a 503, which is cheap before the
    upstream ran and bills it again after (``answered``: then the header says not to)."""
    if exc.verdict.error_kind == "unavailable":
        return _HTTPError(503, str(exc), "guard_unavailable", kind="guard_error",
                          headers={"x-should-retry": "false"} if answered else None, **{METADATA_KEY: body})
    return _HTTPError(400, str(exc), "content_filter", **{METADATA_KEY: body})


def _dump(obj: BaseModel) -> dict[str, Any]:
    """An openai object as JSON (the guard's decisions, where it wrote them, under ``qwen3guard``)."""
    return obj.model_dump(mode="json", exclude_unset=True, warnings=False)


def _sse(obj: BaseModel) -> bytes:
    """An object the guard wrote (or changed), as one SSE event."""
    name = getattr(obj, "type", None)
    head = f"event: {name}\n".encode() if isinstance(name, str) and not isinstance(obj, ChatCompletionChunk) else b""
    return head + b"data: " + json.dumps(_dump(obj)).encode() + b"\n\n"


class _DuplicateKey(ValueError):
    """A key twice in one object, or two keys that differ only in case; ``str()`` names them."""

    def __init__(self, first: str, key: str) -> None:
        super().__init__(f"the key {key!r} more than once" if key == first else
                         f"the keys {first!r} and {key!r}, which differ only in case,")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, str] = {}
    for key, _ in pairs:
        folded = key.casefold()
        if folded in seen:
            raise _DuplicateKey(seen[folded], key)
        seen[folded] = key
    return dict(pairs)


def _utf8(raw: bytes | bytearray) -> str | None:
    """A request body as text, or None unless it is UTF-8 without a byte order mark, as JSON must be
    (RFC 8259): ``json.loads`` would read bytes in any UTF, which the proxy forwards as sent, to an
    upstream that refuses them."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if text.startswith("\ufeff") else text


def _loads(raw: str | bytes | bytearray) -> Any:
    """JSON with each key at most once per object: the proxy forwards the very bytes it judged, and parsers
    disagree on which of two equal keys wins (Python's json the last, others the first), so such a body
    would be judged on one value and answered on the other. Keys equal but for case count as equal: Go's
    encoding/json (Ollama's OpenAI API) matches keys case-insensitively, so it reads ``Messages`` as
    ``messages``."""
    return json.loads(raw, object_pairs_hook=_unique, parse_constant=_not_json)


def _not_json(constant: str) -> Any:
    """``NaN`` / ``Infinity`` are Python's extensions, not JSON: upstream parsers refuse them."""
    raise ValueError(f"{constant} is not JSON")


def _error_event(message: str, code: str, *, kind: str | None = None, **extra: Any) -> bytes:
    """An SSE error event (the openai SDK raises ``APIError`` for it) ending a stream that already began;
    its type is ``kind`` (the HTTP error's type for the same fault), else the code."""
    error = {"message": message, "type": kind or code, "code": code}
    return b"data: " + json.dumps({"error": error, **extra}).encode() + b"\n\n"


def _check_keys(api_keys: Iterable[str] | None) -> list[bytes] | None:
    """The proxy keys as bytes, ``None`` for an open proxy; a setting that holds no real key is an error,
    never an open proxy (a str would make each of its characters a key)."""
    if api_keys is None:
        return None
    if isinstance(api_keys, (str, bytes)) or not isinstance(api_keys, Iterable):
        raise TypeError(f"api_keys must be a set of key strings (api_keys={{'key'}}), or None, got {type(api_keys).__name__}")
    keys = list(api_keys)
    if not keys:
        raise ValueError("api_keys is empty; give the keys clients must present, or api_keys=None for an open proxy")
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"api_keys must hold strings, got {type(key).__name__}")
        if not key.strip():
            raise ValueError(f"api_keys holds the blank key {key!r}; remove it")
        check_api_key(key, "a key in api_keys")
    return [k.encode() for k in keys]


def create_app(
    upstream: str,
    *,
    moderator: Moderator | None = None,
    on_unsafe: ProxyOnUnsafe = "finish",
    api_keys: Iterable[str] | None = None,
    upstream_api_key: str | None = None,
    max_body_bytes: int = 1_000_000,
    max_messages: int = 256,
    max_choices: int = DEFAULT_MAX_CHOICES,
) -> Starlette:
    """The proxy app in front of ``upstream`` (an OpenAI ``base_url``, e.g. ``http://host:8000/v1``).

    ``moderator`` defaults to one configured by the environment (``guard_core.config``).
    ``on_unsafe="finish"`` ends blocked answers with a refusal and ``finish_reason="content_filter"``;
    ``"error"`` answers a blocked prompt with HTTP 400 and ends a blocked stream with an SSE error
    event. ``api_keys``, when given, are the Bearer keys clients must present (at least one, none blank; a
    str or an empty set is an error, not an open proxy); ``upstream_api_key``
    is sent upstream instead of the client's key (without it and without ``api_keys`` the client's
    ``Authorization`` is passed on). Every key must be printable ASCII without blanks around it
    (``check_api_key``): any other can never be sent or presented. ``max_choices`` caps ``n``.
    """
    upstream = check_http_url(upstream, "upstream ")
    keys = _check_keys(api_keys)
    if upstream_api_key is not None:
        check_api_key(upstream_api_key, "upstream_api_key")
    if on_unsafe not in GUARD_MODES:
        raise ValueError(f"on_unsafe must be 'finish' or 'error', got {on_unsafe!r}")
    core = moderator or Moderator(gen_guard=CONFIGURED, stream_guard=CONFIGURED, source="openai.proxy")
    guard = OpenAIGuard(core, on_unsafe=GUARD_MODES[on_unsafe], max_choices=max_choices)  # type: ignore[arg-type]
    base = upstream.rstrip("/") + "/"
    client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=httpx.Limits(max_connections=None))

    def authorize(request: HTTPRequest) -> None:
        given = request.headers.get("authorization", "")
        token = given[7:].strip().encode() if given.lower().startswith("bearer ") else b""
        if keys is not None and not any(hmac.compare_digest(token, k) for k in keys):
            raise _HTTPError(401, "invalid or missing proxy API key", "invalid_api_key")

    def upstream_headers(request: HTTPRequest) -> dict[str, str]:
        odd = next((k for k, v in request.headers.items() if not v.isascii()), None)
        if odd is not None:
            raise _HTTPError(400, f"the header {odd!r} has a value that is not ASCII, which cannot be sent upstream; "
                             "percent-encode it", "invalid_header")
        headers = {**_passed(request.headers), "content-type": "application/json",
                   "accept": request.headers.get("accept", "application/json")}
        if upstream_api_key:
            headers["authorization"] = f"Bearer {upstream_api_key}"
        elif keys is None and "authorization" in request.headers:
            headers["authorization"] = request.headers["authorization"]
        return headers

    async def read_body(request: HTTPRequest, endpoint: Endpoint) -> tuple[bytes, Request]:
        codings = [c.strip() for c in request.headers.get("content-encoding", "").lower().split(",")]
        encoding = ", ".join(c for c in codings if c not in ("", "identity"))
        if encoding:  # the proxy judges the bytes it forwards; it does not unpack them
            raise _HTTPError(415, f"request bodies with Content-Encoding {encoding!r} are not supported; send the JSON "
                             "uncompressed", "unsupported_encoding")
        length = request.headers.get("content-length", "")
        raw = bytearray()
        if not (length.isdigit() and int(length) > max_body_bytes):
            try:
                async for piece in request.stream():
                    raw += piece
                    if len(raw) > max_body_bytes:
                        break
            except ClientDisconnect:
                raise _HTTPError(400, "the client hung up before its request body arrived", "client_disconnected") from None
        if len(raw) > max_body_bytes or (length.isdigit() and int(length) > max_body_bytes):
            raise _HTTPError(413, f"request body over {max_body_bytes} bytes", "request_too_large")
        text = _utf8(raw)
        if text is None:
            raise _HTTPError(400, "request body is not UTF-8 without a byte order mark, as JSON must be (RFC 8259)",
                             "invalid_json")
        try:
            body = _loads(text)
        except _DuplicateKey as exc:
            raise _HTTPError(400, f"request body has {exc} in one object; send each key once", "duplicate_key") from None
        except (ValueError, RecursionError):
            raise _HTTPError(400, "request body is not valid JSON (or nests too deeply)", "invalid_json") from None
        if not isinstance(body, dict):
            raise _HTTPError(400, "request body must be a JSON object", "invalid_request")
        for field in (_PATHS[endpoint][1], "tools", "functions", "documents"):
            if isinstance(body.get(field), list) and len(body[field]) > max_messages:
                raise _HTTPError(400, f"more than {max_messages} {field}", "too_many_messages")
        try:
            return bytes(raw), Request.parse(endpoint, body, max_choices)
        except ValueError as exc:
            raise _HTTPError(400, str(exc), "invalid_request") from None

    async def send(request: httpx.Request, *, stream: bool) -> httpx.Response:
        try:
            return await client.send(request, stream=stream)
        except httpx.TimeoutException:
            raise _HTTPError(504, "the upstream did not answer in time", "upstream_timeout") from None
        except httpx.HTTPError as exc:
            raise _HTTPError(502, f"the upstream could not be reached or broke off its reply ({type(exc).__name__})",
                             "upstream_unavailable") from None

    def handler(endpoint: Endpoint) -> Callable[[HTTPRequest], Awaitable[Response]]:
        async def handle(http: HTTPRequest) -> Response:
            try:
                authorize(http)
                sent_headers = upstream_headers(http)
                raw, request = await read_body(http, endpoint)
                prompt, refusal = await arun(prompt_flow(guard, request))
            except _HTTPError as exc:
                return exc.response()
            except UnsafeContentError as exc:
                log.info("prompt blocked on /v1/%s: %s", _PATHS[endpoint][0], exc.verdict.risk.value)
                return _blocked(exc, note(prompt=exc.decision), answered=False).response()
            except Exception as exc:  # fail closed, as a JSON error, never a plain-text 500
                return _guard_failed(exc, _PATHS[endpoint][0])
            headers = _review_header(review_ids(prompt.decision))
            if refusal is not None:
                if not request.stream:
                    return JSONResponse(_dump(refusal), headers=headers)
                done = [b"data: [DONE]\n\n"] if endpoint == "chat" else []
                return StreamingResponse(iter([*map(_sse, refusal), *done]), media_type="text/event-stream", headers=headers)
            upstream_request = client.build_request("POST", base + _PATHS[endpoint][0], params=http.query_params, content=raw,
                                                    headers=sent_headers)
            if not request.stream:
                return await whole(request, upstream_request, prompt.decision)
            items = stream_items(guard, request, prompt.gate, prompt.decision)
            try:
                reply = await send(upstream_request, stream=True)
            except _HTTPError as exc:
                items.close()
                return exc.response()
            streamed = reply.headers.get("content-type", "").lower().startswith("text/event-stream")
            if not (_succeeded(reply) and streamed):
                try:
                    content = await reply.aread()
                except httpx.HTTPError as exc:
                    return _HTTPError(502, f"the upstream broke off its reply ({type(exc).__name__})", "upstream_unavailable").response()
                finally:
                    await reply.aclose()
                    items.close()
                if _succeeded(reply):
                    return _HTTPError(502, "the upstream answered a stream request with something that is not an event "
                                      "stream; nothing unjudged was sent", "upstream_invalid").response()
                return _relayed(reply, content)
            return StreamingResponse(relay(endpoint, items, reply), media_type="text/event-stream",
                                     status_code=reply.status_code, headers={**_passed(reply.headers), **headers})
        return handle

    async def whole(request: Request, upstream_request: httpx.Request, prompt: Any) -> Response:
        try:
            reply = await send(upstream_request, stream=False)
            if not _succeeded(reply):
                return _relayed(reply, reply.content)
            data = _upstream_payload(reply.content, "a reply")  # what is judged is re-serialised
            checked = await arun(whole_flow(guard, request, data, prompt))
        except _HTTPError as exc:
            return exc.response()
        except MalformedReplyError as exc:
            return _HTTPError(502, str(exc), "upstream_invalid").response()
        except UnsafeContentError as exc:
            body = note(prompt=prompt, response=exc.decision, index=exc.choice_index)
            return _blocked(exc, body, answered=True).response()
        except Exception as exc:  # fail closed, as a JSON error, never a plain-text 500
            return _guard_failed(exc, _PATHS[request.endpoint][0])
        body = checked.model_extra.get(METADATA_KEY, {}) if checked.model_extra else {}
        decisions = [body.get("response"), *(c.get("response") for c in body.get("choices", ()))]
        ids = review_ids(prompt) + [d["review_id"] for d in decisions if d and d.get("review_id")]
        return JSONResponse(_dump(checked), reply.status_code, headers={**_passed(reply.headers), **_review_header(ids)})

    async def relay(endpoint: Endpoint, items: GuardedItems, reply: httpx.Response) -> AsyncIterator[bytes]:
        """Upstream SSE through the guard; closes upstream and the guard sessions however it ends."""
        raw: dict[int, tuple[Any, bytes]] = {}  # the item is kept so its id is not reused
        item_type = ChatCompletionChunk if endpoint == "chat" else ResponseStreamEvent

        def encode(out: list[Any]) -> list[bytes]:
            found = [raw.pop(id(item), None) for item in out]
            return [f[1] if f is not None and f[0] is item else _sse(item) for f, item in zip(found, out)]

        tail: list[bytes] = []
        buffer = bytearray()
        scanned = 0  # the buffer holds no event end before here (an end is at most 4 bytes long)
        got_data = False
        try:
            async for piece in _ended(reply.aiter_bytes()):
                buffer += piece
                while not items.done and (match := _SSE_END.search(buffer, max(0, scanned - 3))) is not None:
                    block = bytes(buffer[: match.end()])
                    del buffer[: match.end()]
                    scanned = 0
                    data = b"\n".join(line[5:].lstrip() for line in block.splitlines() if line.startswith(b"data:"))
                    got_data = got_data or bool(data)
                    if data == b"[DONE]":
                        tail.append(block)
                    elif data:
                        payload = _upstream_payload(data, "a stream event")
                        if isinstance(payload, dict) and payload.get("error") and "type" not in payload:
                            # Upstream failed mid-stream (the SDK raises on it): pass its error on, nothing else of the event.
                            yield b"data: " + json.dumps({"error": payload["error"]}).encode() + b"\n\n"
                            return
                        item = chunks.sdk_object(item_type, payload)
                        raw[id(item)] = (item, block)
                        for out in encode(await items.afeed(item)):
                            yield out
                scanned = len(buffer)
                if items.done:
                    break
            if not got_data:
                raise MalformedReplyError("the upstream's event stream held no data events (an empty body, or JSON or HTML "
                                          "sent as text/event-stream)")
            for out in encode(await items.aend()):
                yield out
            for out in tail or ([b"data: [DONE]\n\n"] if endpoint == "chat" and items.done else []):
                yield out
        except UnsafeContentError as exc:
            log.info("stream blocked on /v1/%s: %s", _PATHS[endpoint][0], exc.verdict.risk.value)
            body = note(response=exc.decision, index=exc.choice_index)
            blocked = _blocked(exc, body, answered=True)
            yield _error_event(str(exc), blocked.code, kind=blocked.kind if blocked.status >= 500 else None, **{METADATA_KEY: body})
        except MalformedReplyError as exc:
            log.warning("upstream stream on /v1/%s sent what the guard cannot read", _PATHS[endpoint][0])
            yield _error_event(f"{exc}; nothing unjudged was sent", "upstream_error")
        except httpx.HTTPError as exc:
            log.warning("upstream stream on /v1/%s failed: %s", _PATHS[endpoint][0], type(exc).__name__)
            yield _error_event(f"the upstream stream failed ({type(exc).__name__}); nothing unjudged was sent", "upstream_error")
        except Exception as exc:  # fail closed: the client gets an error event, never a dropped connection
            log.error("guarding the stream on /v1/%s failed: %s", _PATHS[endpoint][0], type(exc).__name__)
            yield _error_event(f"the guard failed ({type(exc).__name__}); nothing unjudged was sent", "guard_error")
        finally:
            await reply.aclose()
            items.close()

    async def models(request: HTTPRequest) -> Response:
        """``GET /v1/models`` and ``/v1/models/{id}``, passed through (they carry no content to judge).

        Only those two. A hub-style id (``Qwen/Qwen3-8B``, which the SDK sends as ``Qwen%2FQwen3-8B``)
        is forwarded as the SDK spells it, one segment; an id with a ``.`` / ``..`` part (or
        ``%2e%2e``) is refused, since a server that decodes ``%2F`` and resolves dot segments would
        take the client's id to any upstream path, with the upstream key.
        """
        model = request.path_params.get("model")
        try:
            if model is not None and {"", ".", ".."} & set(model.split("/")):
                raise _HTTPError(404, f"GET {request.url.path}: Not Found", "not_found")
            authorize(request)
            path = "models" if model is None else "models/" + quote(model, safe="!$&'()*+,;=:@")
            reply = await send(client.build_request("GET", base + path, params=request.query_params,
                                                    headers=upstream_headers(request)), stream=False)
        except _HTTPError as exc:
            return exc.response()
        return _relayed(reply, reply.content)

    async def healthz(request: HTTPRequest) -> Response:
        await asyncio.to_thread(core.load)
        try:
            reachable = (await client.get(base + "models", headers=upstream_headers(request), timeout=5.0)).status_code < 500
        except _HTTPError as exc:
            return exc.response()
        except httpx.HTTPError:
            reachable = False
        return JSONResponse({"models": "loaded", "upstream": "reachable" if reachable else "unreachable"},
                            status_code=200 if reachable else 503)

    async def not_found(request: HTTPRequest, exc: HTTPException) -> Response:
        code = "method_not_allowed" if exc.status_code == 405 else "not_found"
        answer = _HTTPError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code).response()
        answer.headers.update(exc.headers or {})  # a 405 says which methods the path takes (Allow)
        return answer

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    routes = [
        Route("/v1/chat/completions", handler("chat"), methods=["POST"]),
        Route("/v1/responses", handler("responses"), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found})
    # A path with a trailing slash is unknown, a 404 like any other: Starlette's default redirect to the
    # path without it would be a bare 307 built from the client's Host header, and the SDK never adds one.
    app.router.redirect_slashes = False
    return app


#: Keys of replies whose values the guard reads (or that lead to them): a case variant would be read by
#: case-insensitive clients (Go's encoding/json) as the text the guard never saw.
_REPLY_KEYS = GUARDED_KEYS | {"choices", "delta", "message", "item", "part", "response", "summary"}
#: Fields of a Responses reply that echo the request (its tools' schemas, text format, metadata): not
#: text the model wrote, and their keys are the client's own (a schema property ``Message``).
_ECHOED = frozenset({"tools", "tool_choice", "text", "metadata", "instructions", "prompt", "reasoning", "usage",
                     "parameters", "properties", "input_schema", "schema", "parsed"})


def _upstream_payload(data: bytes, what: str) -> Any:
    """The JSON of an upstream reply or stream event; ``MalformedReplyError`` when it is not JSON, has
    a key twice (see ``_loads``), or a case variant of a key the guard reads (``"Content"``)."""
    try:
        payload = _loads(data)
    except _DuplicateKey as exc:
        raise MalformedReplyError(f"the upstream sent {what} with {exc} in one object") from None
    except (ValueError, RecursionError):
        raise MalformedReplyError(f"the upstream sent {what} that is not JSON") from None
    pending = [payload]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            try:
                refuse_case_variants(node, where=f"the upstream sent {what}", keys=_REPLY_KEYS)
            except ValueError as exc:
                raise MalformedReplyError(str(exc)) from None
            pending += [value for key, value in node.items() if key not in _ECHOED]
        elif isinstance(node, list):
            pending += node
    return payload


def _succeeded(reply: httpx.Response) -> bool:
    """A reply the openai SDK reads as an answer (any 2xx): the guard judges it."""
    return 200 <= reply.status_code < 300


def _relayed(reply: httpx.Response, content: bytes) -> Response:
    """An upstream error passed on as it came. A redirect is never passed on: the SDK follows it,
    and would take the request to the upstream around the guard."""
    if reply.is_redirect or 300 <= reply.status_code < 400:
        log.warning("the upstream answered %d (a redirect); not followed", reply.status_code)
        return _HTTPError(502, f"the upstream answered {reply.status_code} (a redirect), which the proxy does not "
                          "follow; point it at the final upstream URL", "upstream_redirect").response()
    return Response(content, reply.status_code, media_type=reply.headers.get("content-type"), headers=_passed(reply.headers))


def _review_header(ids: list[str]) -> dict[str, str]:
    return {REVIEW_HEADER: ",".join(ids)} if ids else {}

