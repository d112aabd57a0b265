"""The proxy as a transparent hop: query strings and end-to-end headers both ways, and upstream bodies
the SDK reads (CR-only SSE, a last event without its blank line) or that are not a stream at all;
and what it does not pass on: other upstream paths than the models', the proxy's own headers."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from asgi_server import serve_app
from openai_fake_upstream import SAFE_PIECES, chat_completion, chat_events

from guard_core import GenGuard, Moderator
from guard_core.stream import StreamGuard
from guard_core.testing.stream_fixture import PLANTED_SAFE_PROMPT
from integrations.openai_proxy.server import create_app

USER = [{"role": "user", "content": PLANTED_SAFE_PROMPT}]
SAFE_TEXT = "".join(SAFE_PIECES)


class RawUpstream:
    """An upstream answering fixed bytes with fixed headers, recording each request's path and headers."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, dict[str, str], bytes]] = []
        self.seen: list[tuple[str, dict[str, str]]] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.do_POST()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                upstream.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                status, headers, body = upstream.answers.pop(0)
                self.send_response(status)
                for key, value in {"content-length": str(len(body)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = "content-length" in headers  # a longer length promised: the body breaks off

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def sse(events: list[Any], end: bytes = b"\n\n") -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, str) else json.dumps(e)).encode() + end for e in events)


@pytest.fixture(scope="module")
def proxied(stream_guard: StreamGuard, gen_guard: GenGuard) -> Iterator[tuple[RawUpstream, str]]:
    upstream = RawUpstream()
    app = create_app(upstream.base_url, moderator=Moderator(stream_guard=stream_guard, gen_guard=gen_guard, source="openai.proxy"))
    with serve_app(app) as url:
        yield upstream, url
    upstream.server.shutdown()


def test_query_strings_and_end_to_end_headers_pass_both_ways(proxied: tuple[RawUpstream, str]) -> None:
    upstream, url = proxied
    limited = {"content-type": "application/json", "retry-after": "7", "x-request-id": "req_123", "x-ratelimit-remaining-requests": "0"}
    upstream.answers.append((429, limited, b'{"error": {"message": "rate limited", "type": "rate_limit_error"}}'))
    sent = {"openai-organization": "org-1", "openai-project": "proj-1", "idempotency-key": "idem-1", "x-custom": "c"}
    reply = httpx.post(url + "/chat/completions?api-version=2024-10-21", json={"model": "m", "messages": USER}, headers=sent)
    path, headers = upstream.seen[-1]
    assert path == "/v1/chat/completions?api-version=2024-10-21"
    assert {k: headers.get(k) for k in sent} == sent
    assert reply.status_code == 429 and {k: reply.headers.get(k) for k in limited} == limited
    upstream.answers.append((200, {"content-type": "application/json", "x-request-id": "req_m"}, b'{"object": "list", "data": []}'))
    reply = httpx.get(url + "/models?limit=1&after=x")
    assert upstream.seen[-1][0] == "/v1/models?limit=1&after=x" and reply.headers["x-request-id"] == "req_m"
    upstream.answers.append((200, {"content-type": "application/json"}, b'{"id": "ft:gpt-4o:org::m1", "object": "model"}'))
    reply = httpx.get(url + "/models/ft:gpt-4o:org::m1")
    assert upstream.seen[-1][0] == "/v1/models/ft:gpt-4o:org::m1" and reply.json()["id"] == "ft:gpt-4o:org::m1"
    upstream.answers.append((200, {"content-type": "text/event-stream", "x-request-id": "req_s"}, sse(chat_events(SAFE_PIECES))))
    with httpx.stream("POST", url + "/chat/completions", json={"model": "m", "messages": USER, "stream": True}) as streamed:
        assert streamed.headers["x-request-id"] == "req_s"
        streamed.read()


@pytest.mark.parametrize("body", [sse(chat_events(SAFE_PIECES), b"\r\r"), sse(chat_events(SAFE_PIECES)).removesuffix(b"\n\n")],
                         ids=["cr-only-lines", "last-event-without-blank-line"])
def test_streams_the_sdk_reads_are_judged_and_relayed(proxied: tuple[RawUpstream, str], body: bytes) -> None:
    upstream, url = proxied
    upstream.answers.append((200, {"content-type": "text/event-stream"}, body))
    reply = httpx.post(url + "/chat/completions", json={"model": "m", "messages": USER, "stream": True}, timeout=60)
    events = [json.loads(line[5:]) for line in reply.text.splitlines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events if c.get("choices"))
    assert reply.status_code == 200 and text == SAFE_TEXT
    assert reply.text.rstrip().endswith("[DONE]")


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_error_whose_body_breaks_off_is_a_502(proxied: tuple[RawUpstream, str], stream: bool) -> None:
    upstream, url = proxied
    upstream.answers.append((503, {"content-type": "application/json", "content-length": "500"}, b'{"error":'))
    reply = httpx.post(url + "/chat/completions", json={"model": "m", "messages": USER, "stream": stream}, timeout=60)
    assert reply.status_code == 502 and reply.json()["error"]["code"] == "upstream_unavailable"
    assert "broke off" in reply.json()["error"]["message"]


@pytest.mark.parametrize(("kind", "body"), [("application/json", json.dumps(chat_completion(SAFE_TEXT)).encode()),
                                            ("text/html", b"<html>captive portal</html>")], ids=["json", "html"])
def test_a_stream_request_answered_with_something_else_is_a_502(proxied: tuple[RawUpstream, str], kind: str, body: bytes) -> None:
    upstream, url = proxied
    upstream.answers.append((200, {"content-type": kind}, body))
    reply = httpx.post(url + "/chat/completions", json={"model": "m", "messages": USER, "stream": True}, timeout=60)
    assert reply.status_code == 502 and reply.json()["error"]["code"] == "upstream_invalid"
    assert SAFE_TEXT not in reply.text


@pytest.mark.parametrize("path", ["/v1/models/%2e%2e/responses/resp_1", "/v1/models/%2E%2E/%2E%2E/admin", "/v1/models/..%2fresponses",
                                  "/v1/models/..", "/v1/models/.", "/v1/models/org/../../files", "/v1/models/org//x"])
def test_only_the_models_and_one_model_id_are_forwarded(proxied: tuple[RawUpstream, str], path: str) -> None:
    """A dot segment in the id would reach another upstream path (a stored response, a file), with the upstream key."""
    upstream, url = proxied
    before = len(upstream.seen)
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path)  # sent as written: httpx would resolve the dot segments itself
    reply = conn.getresponse()
    assert reply.status == 404 and json.loads(reply.read())["error"]["code"] == "not_found"
    conn.close()
    assert len(upstream.seen) == before


def test_a_hub_style_model_id_is_forwarded_as_the_sdk_spells_it(proxied: tuple[RawUpstream, str]) -> None:
    """vLLM serves models under hub ids; ``models.retrieve("Qwen/Qwen3-8B")`` sends ``Qwen%2FQwen3-8B``."""
    upstream, url = proxied
    for sent in ("/models/Qwen%2FQwen3-8B", "/models/Qwen/Qwen3-8B"):
        upstream.answers.append((200, {"content-type": "application/json"}, b'{"id": "Qwen/Qwen3-8B", "object": "model"}'))
        reply = httpx.get(url + sent)
        assert reply.status_code == 200 and reply.json()["id"] == "Qwen/Qwen3-8B"
        assert upstream.seen[-1][0] == "/v1/models/Qwen%2FQwen3-8B"


@pytest.mark.parametrize("status, kind, body", [(200, "application/json", json.dumps(chat_completion(SAFE_TEXT)).encode()),
                                                (200, "text/event-stream", sse(chat_events(SAFE_PIECES))),
                                                (429, "application/json", b'{"error": {"message": "slow down"}}')],
                         ids=["whole", "stream", "error"])
def test_the_upstream_cannot_set_the_proxys_own_headers(proxied: tuple[RawUpstream, str], status: int, kind: str, body: bytes) -> None:
    upstream, url = proxied
    upstream.answers.append((status, {"content-type": kind, "x-qwen3guard-review": "rev_spoofed", "x-qwen3guard-note": "x"}, body))
    reply = httpx.post(url + "/chat/completions", json={"model": "m", "messages": USER, "stream": kind == "text/event-stream"},
                       timeout=60)
    assert reply.status_code == status and not [k for k in reply.headers if k.startswith("x-qwen3guard-")]


@pytest.mark.parametrize("body", [json.dumps(chat_completion(SAFE_TEXT)).encode(), b"<html>captive portal</html>", b""],
                         ids=["json", "html", "empty"])
def test_an_event_stream_without_events_ends_with_an_error_event(proxied: tuple[RawUpstream, str], body: bytes) -> None:
    upstream, url = proxied
    upstream.answers.append((200, {"content-type": "text/event-stream"}, body))
    reply = httpx.post(url + "/chat/completions", json={"model": "m", "messages": USER, "stream": True}, timeout=60)
    events = [json.loads(line[5:]) for line in reply.text.splitlines() if line.startswith("data: {")]
    assert reply.status_code == 200 and [e["error"]["code"] for e in events] == ["upstream_error"]
    assert SAFE_TEXT not in reply.text
