"""A scripted OpenAI-compatible server on 127.0.0.1, for tests that need real HTTP and real SSE.

The client wrapper's tests and the guard proxy's tests both drive real openai clients against it:

    with FakeUpstream() as upstream:
        upstream.push(Script(events=chat_events(["Hello", " world"])))
        client = OpenAI(base_url=upstream.base_url, api_key="sk-test", max_retries=0)
        ...
        upstream.exchanges[0].disconnected   # did the client hang up mid-stream?

Each request takes the next queued ``Script`` (a request with none queued gets HTTP 500, so a
test that expected no upstream call fails loudly). Streams are sent with chunked encoding, one
SSE event per write, optionally paced, so a client that stops reading is seen as a disconnect.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

MODEL = "fake-model"


#: Scripted answers the client-wrapper and proxy tests share; `` pipe`` `` bomb`` trips the planted Stream guard.
SAFE_PIECES = ["Preheat", " the oven", " to 180C.", " Mix flour,", " sugar and", " eggs,", " then bake", " for 30 minutes."]
UNSAFE_PIECES = ["Sure,", " here", " is", " how:", " take a", " pipe", " bomb", " and", " light", " it."]
TAIL = [" and"] * 2000  # keeps upstream busy, so a hang-up is seen while it still has tokens to send


@dataclass
class Script:
    """What the server answers to one request.

    ``events`` are SSE ``data:`` payloads (dicts become JSON, strings go as they are; ``[DONE]``
    is appended for chat streams by ``chat_events``); ``body`` is the JSON of a non-streamed
    answer. ``fail_after`` events into the stream the server fails: ``"error"`` sends an
    ``{"error": ...}`` event (openai raises ``APIError``), ``"drop"`` cuts the connection.
    ``headers`` are sent with the reply; ``content_type`` is a 2xx stream's.
    """

    events: list[dict[str, Any] | str] = field(default_factory=list)
    body: dict[str, Any] | None = None
    status: int = 200
    delay_s: float = 0.0
    fail_after: int | None = None
    fail_mode: Literal["error", "drop"] = "error"
    headers: dict[str, str] = field(default_factory=dict)  # extra reply headers (a redirect's Location)
    content_type: str = "text/event-stream"  # of a streamed answer with a 2xx status


@dataclass
class Exchange:
    """One request as the server saw it, and how its answer went."""

    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    events_sent: int = 0
    completed: bool = False
    disconnected: bool = False
    closed: threading.Event = field(default_factory=threading.Event)


class FakeUpstream:
    """The server; a context manager that starts it on a free port and stops it."""

    def __init__(self) -> None:
        self.scripts: deque[Script] = deque()
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-openai-upstream", daemon=True)

    @property
    def base_url(self) -> str:
        """The ``base_url`` to give an OpenAI client."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def push(self, *scripts: Script) -> None:
        """Queue answers for the next requests, in order."""
        with self._lock:
            self.scripts.extend(scripts)

    def start(self) -> FakeUpstream:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()

    def wait_closed(self, exchange: Exchange, timeout: float = 10.0) -> bool:
        """Wait until the server is done with ``exchange`` (sent it all, failed it, or saw the hang-up)."""
        return exchange.closed.wait(timeout)

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _next(self, exchange: Exchange) -> Script | None:
        with self._lock:
            self.exchanges.append(exchange)
            return self.scripts.popleft() if self.scripts else None


def _handler(upstream: FakeUpstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def handle(self) -> None:
            try:
                super().handle()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client hung up between requests (a guard that closed upstream): nothing to report

        def do_GET(self) -> None:
            self.do_POST()

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            exchange = Exchange(self.path, json.loads(raw or b"{}"), {k.lower(): v for k, v in self.headers.items()})
            script = upstream._next(exchange)
            try:
                if script is None:
                    self._json(500, {"error": {"message": "no scripted answer for this request", "type": "server_error"}})
                elif exchange.body.get("stream"):
                    self._stream(script, exchange)
                else:
                    self._json(script.status, script.body or {}, script.headers)
                    exchange.completed = True
            except (BrokenPipeError, ConnectionResetError):
                exchange.disconnected = True
                self.close_connection = True
            finally:
                exchange.closed.set()

        def _json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, script: Script, exchange: Exchange) -> None:
            if not 200 <= script.status < 300:
                self._json(script.status, script.body or {"error": {"message": "scripted failure"}}, script.headers)
                return
            self.send_response(script.status)
            self.send_header("content-type", script.content_type)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i, event in enumerate(script.events):
                if script.fail_after is not None and i == script.fail_after:
                    if script.fail_mode == "drop":
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self._chunk(_sse({"error": {"message": "upstream failed mid-stream", "type": "server_error"}}))
                    break
                self._chunk(_sse(event))
                exchange.events_sent += 1
                if script.delay_s:
                    time.sleep(script.delay_s)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            exchange.completed = script.fail_after is None

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    return Handler


def _sse(event: dict[str, Any] | str) -> bytes:
    if isinstance(event, str):
        return f"data: {event}\n\n".encode()
    name = f"event: {event['type']}\n" if isinstance(event.get("type"), str) else ""
    return f"{name}data: {json.dumps(event)}\n\n".encode()


# Chat completions


def chat_chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """One ``chat.completion.chunk`` payload."""
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": MODEL,
            "system_fingerprint": "fp_fake", "choices": choices, **extra}


def chat_events(pieces: list[str] | list[list[str]], *, finish_reason: str = "stop", usage: bool = False,
                logprobs: bool = False, tool_call: dict[str, str] | None = None, done: bool = True) -> list[dict[str, Any] | str]:
    """A streamed chat completion: a role chunk, one chunk per piece, the finish chunk(s), [DONE].

    ``pieces`` is one choice's deltas, or a list of them per choice (n > 1; chunks interleave).
    ``tool_call`` ({"name", "arguments"}) adds tool-call deltas to choice 0 after its text.
    """
    per_choice = [pieces] if not pieces or isinstance(pieces[0], str) else pieces
    events: list[dict[str, Any] | str] = [chat_chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                                          for i in range(len(per_choice))]
    for step in range(max(len(p) for p in per_choice)):
        for i, choice_pieces in enumerate(per_choice):
            if step < len(choice_pieces):
                piece = choice_pieces[step]
                lp = {"content": [{"token": piece, "logprob": -0.1, "bytes": list(piece.encode()), "top_logprobs": []}]} if logprobs else None
                events.append(chat_chunk([{"index": i, "delta": {"content": piece}, "finish_reason": None, "logprobs": lp}]))
    if tool_call:
        events.append(chat_chunk([{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_fake", "type": "function",
                                                                         "function": {"name": tool_call["name"], "arguments": ""}}]},
                                   "finish_reason": None}]))
        events.append(chat_chunk([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": tool_call["arguments"]}}]},
                                   "finish_reason": None}]))
    for i in range(len(per_choice)):
        events.append(chat_chunk([{"index": i, "delta": {}, "finish_reason": "tool_calls" if tool_call and i == 0 else finish_reason}]))
    if usage:
        events.append(chat_chunk([], usage={"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}))
    if done:
        events.append("[DONE]")
    return events


def chat_completion(texts: list[str] | str) -> dict[str, Any]:
    """A non-streamed chat completion with one choice per text."""
    texts = [texts] if isinstance(texts, str) else texts
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": MODEL,
            "choices": [{"index": i, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": t, "refusal": None}} for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}}


# Responses API


def _response(status: str, text: str | None) -> dict[str, Any]:
    output = [] if text is None else [{"id": "msg_fake", "type": "message", "role": "assistant", "status": "completed",
                                       "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}]
    return {"id": "resp_fake", "object": "response", "created_at": 1700000000, "model": MODEL, "status": status,
            "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "error": None,
            "incomplete_details": None, "instructions": None, "metadata": {}, "temperature": 1.0, "top_p": 1.0}


def responses_events(pieces: list[str], *, refusal: bool = False) -> list[dict[str, Any] | str]:
    """A streamed Responses API answer with one message item of output text (or, with ``refusal``, a refusal part)."""
    text = "".join(pieces)
    where = {"item_id": "msg_fake", "output_index": 0, "content_index": 0}
    item = {"id": "msg_fake", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    if refusal:
        part, field = {"type": "refusal", "refusal": ""}, "refusal"
        deltas = [{"type": "response.refusal.delta", **where, "delta": p} for p in pieces]
        done = {"type": "response.refusal.done", **where, "refusal": text}
    else:
        part, field = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}, "text"
        deltas = [{"type": "response.output_text.delta", **where, "delta": p, "logprobs": []} for p in pieces]
        done = {"type": "response.output_text.done", **where, "text": text, "logprobs": []}
    final = _response("completed", text)
    final["output"][0]["content"] = [{**part, field: text}]
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": _response("in_progress", None)},
        {"type": "response.in_progress", "response": _response("in_progress", None)},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {"type": "response.content_part.added", **where, "part": part},
        *deltas,
        done,
        {"type": "response.content_part.done", **where, "part": {**part, field: text}},
        {"type": "response.output_item.done", "output_index": 0,
         "item": {**item, "status": "completed", "content": [{**part, field: text}]}},
        {"type": "response.completed", "response": final},
    ]
    for i, event in enumerate(events):
        event["sequence_number"] = i
    return list(events)


def responses_body(text: str) -> dict[str, Any]:
    """A non-streamed Responses API answer."""
    return _response("completed", text)
