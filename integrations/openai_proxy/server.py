"""The guard proxy: an OpenAI-compatible HTTP server that moderates traffic to an upstream API.

It shares every decision with the client wrapper: ``chat_conversation`` / ``responses_conversation``
pick the conversation, ``Moderator`` judges it, ``ChatStreamModerator`` / ``ResponsesStreamModerator``
hold streams back and write the refusals. The proxy only moves bytes: upstream SSE events the
moderator hands back unchanged are forwarded as the very bytes upstream sent, so a safe stream is
byte-identical to the upstream one; objects the guard wrote are serialised with their verdicts in
``prompt_filter_results`` / ``content_filter_results`` (and ``qwen3guard``).

Message content and API keys are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import httpx
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response as HTTPResponse, StreamingResponse
from starlette.routing import Route

from guard_core import Verdict

from . import chunks
from .errors import UnsafeContentError
from .moderation import ANNOTATION_KEY, ChoiceGates, Conversation, Moderator, annotation, chat_conversation, responses_conversation
from .streaming import ChatStreamModerator, ResponsesStreamModerator, StreamModerator

ProxyOnUnsafe = Literal["finish", "error"]

log = logging.getLogger(__name__)

_SSE_END = re.compile(rb"\r?\n\r?\n")
#: The shared Moderator's ``on_unsafe`` behind each proxy ``on_unsafe``.
MODERATOR_MODES = {"finish": "rewrite", "error": "abort"}


class _BadRequest(Exception):
    """A request the proxy refuses before any upstream call."""

    def __init__(self, status: int, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _error(status: int, message: str, code: str, **extra: Any) -> JSONResponse:
    """An OpenAI-shaped error body."""
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": code}, **extra}, status_code=status)


def filter_results(note: dict[str, Any]) -> dict[str, Any]:
    """The verdict fields the proxy adds to what it writes, from a ``moderation.annotation`` dict."""
    out: dict[str, Any] = {ANNOTATION_KEY: note}
    if "prompt" in note:
        out["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": {ANNOTATION_KEY: note["prompt"]}}]
    if "response" in note:
        out["content_filter_results"] = {ANNOTATION_KEY: note["response"], **({"index": note["index"]} if "index" in note else {})}
    elif "choices" in note:
        out["content_filter_results"] = [{ANNOTATION_KEY: c.get("response"), "index": c.get("index")} for c in note["choices"]]
    return out


def _dump(obj: BaseModel) -> dict[str, Any]:
    """An openai object as JSON, with its verdicts (if the guard annotated it) spelled out."""
    data = obj.model_dump(mode="json", exclude_unset=True)
    note = data.get(ANNOTATION_KEY)
    return {**data, **filter_results(note)} if isinstance(note, dict) else data


def _sse(obj: BaseModel) -> bytes:
    """An object the guard wrote (or changed), as one SSE event."""
    name = getattr(obj, "type", None)
    head = f"event: {name}\n".encode() if isinstance(name, str) and not isinstance(obj, ChatCompletionChunk) else b""
    return head + b"data: " + json.dumps(_dump(obj)).encode() + b"\n\n"


def _sse_data(block: bytes) -> bytes:
    """The ``data:`` payload of one SSE event."""
    lines = [line[5:].lstrip() for line in block.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines)


def _unsafe_event(error: UnsafeContentError) -> bytes:
    """The SSE error event ending a stream in ``on_unsafe="error"`` mode."""
    note = annotation(response=error.verdict, index=error.choice_index)
    body = {"error": {"message": str(error), "type": "content_filter", "code": "content_filter"}, **filter_results(note)}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class _Endpoint:
    """What differs between chat completions and responses: conversation, parsing, refusals."""

    def __init__(self, path: str, list_key: str) -> None:
        self.path = path
        self.list_key = list_key

    def conversation(self, body: dict[str, Any]) -> Conversation:
        """The conversation the guard judges."""
        if self.path == "chat/completions":
            return chat_conversation(body.get("messages") or ())
        return responses_conversation(body.get("input"), body.get("instructions") or None)

    def parse_item(self, data: Any) -> BaseModel:
        """One upstream stream item as an openai object."""
        return ChatCompletionChunk.model_validate(data) if self.path == "chat/completions" else chunks.event(data)

    def stream_moderator(self, moderator: Moderator, gates: ChoiceGates, body: dict[str, Any]) -> StreamModerator[Any]:
        """The shared stream moderator for this endpoint."""
        if self.path == "chat/completions":
            return ChatStreamModerator(moderator, gates, body.get("n") or 1)
        return ResponsesStreamModerator(moderator, gates)

    def refusal_items(self, moderator: Moderator, body: dict[str, Any], note: dict[str, Any]) -> list[BaseModel]:
        """The stream answering a blocked prompt."""
        model = body.get("model", "")
        if self.path == "chat/completions":
            return list(chunks.prompt_refusal_chunks(model, moderator.refusal_message, note, body.get("n") or 1))
        return list(chunks.responses_refusal_events(
            None, item_id=chunks.new_id("msg"), output_index=0, content_index=0, delivered="",
            text=moderator.refusal_message, prior=[], sequence=0, note=note, model=model, opened=False))

    def refusal_whole(self, moderator: Moderator, body: dict[str, Any], note: dict[str, Any]) -> BaseModel:
        """The whole answer to a blocked prompt."""
        model = body.get("model", "")
        if self.path == "chat/completions":
            return chunks.refusal_completion(model, moderator.refusal_message, note, body.get("n") or 1)
        item = chunks.message_item(chunks.new_id("msg"), moderator.refusal_message)
        return chunks.incomplete_response(None, [item], note, model=model)

    async def check_whole(self, moderator: Moderator, conversation: Conversation, data: Any, prompt: Verdict) -> BaseModel:
        """Moderate a whole upstream answer."""
        if self.path == "chat/completions":
            return await moderator.acheck_completion(conversation, ChatCompletion.model_validate(data), prompt)
        return await moderator.acheck_response(conversation, Response.model_validate(data), prompt)


_CHAT = _Endpoint("chat/completions", "messages")
_RESPONSES = _Endpoint("responses", "input")


def create_app(
    upstream: str,
    *,
    moderator: Moderator | None = None,
    api_keys: set[str] | None = None,
    upstream_api_key: str | None = None,
    max_body_bytes: int = 1_000_000,
    max_messages: int = 256,
    on_unsafe: ProxyOnUnsafe = "finish",
) -> Starlette:
    """The proxy app in front of ``upstream`` (an OpenAI ``base_url``, e.g. ``http://host:8000/v1``).

    ``moderator`` defaults to one with the default guard models; its ``on_unsafe`` must match the
    proxy's: ``"finish"`` ends blocked answers with a refusal and ``finish_reason="content_filter"``
    (moderator ``"rewrite"``), ``"error"`` answers a blocked prompt with HTTP 400 and ends a blocked
    stream with an SSE error event (moderator ``"abort"``). ``api_keys``, when given, are the
    Bearer keys clients must present; ``upstream_api_key`` is sent upstream instead of the
    client's key (without it and without ``api_keys`` the client's ``Authorization`` is passed on).
    """
    if on_unsafe not in MODERATOR_MODES:
        raise ValueError(f"on_unsafe must be 'finish' or 'error', got {on_unsafe!r}")
    moderator = moderator or Moderator(on_unsafe=MODERATOR_MODES[on_unsafe])  # type: ignore[arg-type]
    if moderator.on_unsafe != MODERATOR_MODES[on_unsafe]:
        raise ValueError(f"on_unsafe={on_unsafe!r} needs a moderator with on_unsafe={MODERATOR_MODES[on_unsafe]!r}")
    base = upstream.rstrip("/") + "/"
    client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0))
    keys = {k.encode() for k in api_keys} if api_keys else None

    def authorized(request: Request) -> bool:
        if keys is None:
            return True
        given = request.headers.get("authorization", "")
        token = given[7:].strip().encode() if given.lower().startswith("bearer ") else b""
        return any(hmac.compare_digest(token, k) for k in keys)

    def upstream_headers(request: Request) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": request.headers.get("accept", "application/json")}
        if upstream_api_key:
            headers["authorization"] = f"Bearer {upstream_api_key}"
        elif keys is None and "authorization" in request.headers:
            headers["authorization"] = request.headers["authorization"]
        return headers

    async def read_body(request: Request, endpoint: _Endpoint) -> tuple[bytes, dict[str, Any]]:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body_bytes:
            raise _BadRequest(413, f"request body over {max_body_bytes} bytes", "request_too_large")
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > max_body_bytes:
                raise _BadRequest(413, f"request body over {max_body_bytes} bytes", "request_too_large")
        try:
            body = json.loads(raw)
        except ValueError:
            raise _BadRequest(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _BadRequest(400, "request body must be a JSON object")
        items = body.get(endpoint.list_key)
        if isinstance(items, list) and len(items) > max_messages:
            raise _BadRequest(400, f"more than {max_messages} {endpoint.list_key}", "too_many_messages")
        return bytes(raw), body

    def handler(endpoint: _Endpoint) -> Callable[[Request], Awaitable[HTTPResponse]]:
        async def handle(request: Request) -> HTTPResponse:
            if not authorized(request):
                return _error(401, "invalid or missing proxy API key", "invalid_api_key")
            try:
                raw, body = await read_body(request, endpoint)
                conversation = endpoint.conversation(body)
            except _BadRequest as exc:
                return _error(exc.status, str(exc), exc.code)
            except ValueError as exc:
                return _error(400, str(exc), "unsupported_content")
            upstream_request = client.build_request("POST", base + endpoint.path, content=raw, headers=upstream_headers(request))
            if body.get("stream"):
                return await stream(endpoint, body, conversation, upstream_request)
            return await whole(endpoint, body, conversation, upstream_request)
        return handle

    def blocked_prompt(endpoint: _Endpoint, body: dict[str, Any], verdict: Verdict) -> HTTPResponse | list[BaseModel]:
        note = annotation(prompt=verdict)
        log.info("prompt blocked on /v1/%s: %s", endpoint.path, verdict.risk.value)
        if moderator.on_unsafe == "abort":
            return _error(400, str(moderator.refuse(verdict)), "content_filter", **filter_results(note))
        return endpoint.refusal_items(moderator, body, note) if body.get("stream") else [endpoint.refusal_whole(moderator, body, note)]

    async def whole(endpoint: _Endpoint, body: dict[str, Any], conversation: Conversation, upstream_request: httpx.Request) -> HTTPResponse:
        verdict = await moderator.aprompt_verdict(conversation)
        if moderator.prompt_blocks(verdict):
            answer = blocked_prompt(endpoint, body, verdict)
            return answer if isinstance(answer, HTTPResponse) else JSONResponse(_dump(answer[0]))
        reply = await client.send(upstream_request)
        if reply.status_code != 200:
            return HTTPResponse(reply.content, reply.status_code, media_type=reply.headers.get("content-type"))
        try:
            checked = await endpoint.check_whole(moderator, conversation, reply.json(), verdict)
        except UnsafeContentError as exc:
            note = annotation(prompt=verdict, response=exc.verdict, index=exc.choice_index)
            return _error(400, str(exc), "content_filter", **filter_results(note))
        return JSONResponse(_dump(checked))

    async def stream(endpoint: _Endpoint, body: dict[str, Any], conversation: Conversation, upstream_request: httpx.Request) -> HTTPResponse:
        gate = await moderator.aopen_gate(conversation)
        if moderator.prompt_blocks(gate.prompt_verdict):
            gate.close()
            answer = blocked_prompt(endpoint, body, gate.prompt_verdict)
            if isinstance(answer, HTTPResponse):
                return answer
            done = [b"data: [DONE]\n\n"] if endpoint is _CHAT else []
            return StreamingResponse(iter([*map(_sse, answer), *done]), media_type="text/event-stream")
        gates = ChoiceGates(moderator, conversation, gate)
        try:
            reply = await client.send(upstream_request, stream=True)
        except BaseException:
            gates.close()
            raise
        if reply.status_code != 200:
            content = await reply.aread()
            await reply.aclose()
            gates.close()
            return HTTPResponse(content, reply.status_code, media_type=reply.headers.get("content-type"))
        events = relay(endpoint, endpoint.stream_moderator(moderator, gates, body), reply)
        return StreamingResponse(events, media_type="text/event-stream")

    async def relay(endpoint: _Endpoint, moderator_: StreamModerator[Any], reply: httpx.Response) -> AsyncIterator[bytes]:
        """Upstream SSE through the stream moderator; closes upstream and the guard sessions however it ends."""
        raw: dict[int, tuple[Any, bytes]] = {}  # the item is kept so its id is not reused

        def encode(items: list[Any]) -> list[bytes]:
            out = []
            for item in items:
                original = raw.pop(id(item), None)
                out.append(original[1] if original is not None and original[0] is item else _sse(item))
            return out

        tail: list[bytes] = []
        buffer = b""
        try:
            async for piece in reply.aiter_bytes():
                buffer += piece
                while (match := _SSE_END.search(buffer)) is not None:
                    block, buffer = buffer[: match.end()], buffer[match.end():]
                    data = _sse_data(block)
                    if not data:
                        continue
                    if data == b"[DONE]":
                        tail.append(block)
                        continue
                    payload = json.loads(data)
                    if isinstance(payload, dict) and "error" in payload and "type" not in payload:
                        yield block  # upstream failed mid-stream: say so, release nothing unjudged
                        return
                    item = endpoint.parse_item(payload)
                    raw[id(item)] = (item, block)
                    for out in encode(await moderator_.afeed(item)):
                        yield out
                    if moderator_.done:
                        break
                if moderator_.done:
                    break
            for out in encode(await moderator_.aend()):
                yield out
            for out in tail or ([b"data: [DONE]\n\n"] if endpoint is _CHAT and moderator_.done else []):
                yield out
        except UnsafeContentError as exc:
            log.info("stream blocked on /v1/%s: %s", endpoint.path, exc.verdict.risk.value)
            yield _unsafe_event(exc)
        finally:
            await reply.aclose()
            await moderator_.aclose()

    async def models(request: Request) -> HTTPResponse:
        if not authorized(request):
            return _error(401, "invalid or missing proxy API key", "invalid_api_key")
        reply = await client.get(base + "models", headers=upstream_headers(request))
        return HTTPResponse(reply.content, reply.status_code, media_type=reply.headers.get("content-type"))

    async def healthz(request: Request) -> HTTPResponse:
        await asyncio.to_thread(lambda: (moderator.stream_guard, moderator.gen_guard))
        try:
            reply = await client.get(base + "models", headers=upstream_headers(request), timeout=5.0)
            reachable = reply.status_code < 500
        except httpx.HTTPError:
            reachable = False
        return JSONResponse({"models": "loaded", "upstream": "reachable" if reachable else "unreachable"},
                            status_code=200 if reachable else 503)

    routes = [
        Route("/v1/chat/completions", handler(_CHAT), methods=["POST"]),
        Route("/v1/responses", handler(_RESPONSES), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(routes=routes, lifespan=lifespan)
