"""The guard proxy end to end: FakeUpstream <- proxy (uvicorn, real HTTP) <- the openai client and raw httpx."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import uvicorn
from openai import OpenAI
from asgi_server import serve_app
from openai_fake_upstream import SAFE_PIECES, TAIL, UNSAFE_PIECES, FakeUpstream, Script, chat_completion, chat_events, responses_events

from guard_core import GenGuard, Moderator
from guard_core.stream import StreamGuard
from guard_core.testing.cases import SAFE_ANSWER, SAFE_PROMPT, UNSAFE_PROMPT
from guard_core.testing.stream_fixture import PLANTED_SAFE_PROMPT, stream_checkpoint
from integrations.openai_proxy import DEFAULT_REFUSAL
from integrations.openai_proxy.server import create_app

USER = [{"role": "user", "content": PLANTED_SAFE_PROMPT}]
PROXY_KEY = "proxy-key"
UPSTREAM_KEY = "sk-upstream-secret"


def _moderator(stream_guard: StreamGuard, gen_guard: GenGuard) -> Moderator:
    return Moderator(stream_guard=stream_guard, gen_guard=gen_guard, source="openai.proxy")


@pytest.fixture(scope="module")
def proxy(upstream: FakeUpstream, stream_guard: StreamGuard, gen_guard: GenGuard) -> Iterator[str]:
    app = create_app(upstream.base_url, moderator=_moderator(stream_guard, gen_guard), api_keys={PROXY_KEY},
                     upstream_api_key=UPSTREAM_KEY, max_body_bytes=20_000, max_messages=8)
    with serve_app(app) as url:
        yield url


@pytest.fixture(scope="module")
def proxy_error_mode(upstream: FakeUpstream, stream_guard: StreamGuard, gen_guard: GenGuard) -> Iterator[str]:
    app = create_app(upstream.base_url, moderator=_moderator(stream_guard, gen_guard), on_unsafe="error")
    with serve_app(app) as url:
        yield url


def client(base_url: str) -> OpenAI:
    return OpenAI(base_url=base_url, api_key=PROXY_KEY, max_retries=0)


def raw_stream(url: str, body: dict[str, Any], key: str = PROXY_KEY) -> bytes:
    with httpx.stream("POST", url, json=body, headers={"authorization": f"Bearer {key}"}, timeout=30) as reply:
        assert reply.status_code == 200, reply.read()
        return reply.read()


def chat_body(messages: list[dict[str, str]] = USER) -> dict[str, Any]:
    return {"model": "fake-model", "messages": messages, "stream": True}


def text_of(chunks: list[Any]) -> str:
    return "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)


def test_safe_chat_stream_is_byte_identical_to_upstream(upstream, proxy):
    events = chat_events(SAFE_PIECES, usage=True, logprobs=True)
    upstream.push(Script(events=events), Script(events=events))
    direct = raw_stream(upstream.base_url + "/chat/completions", chat_body())
    proxied = raw_stream(proxy + "/chat/completions", chat_body())
    assert proxied == direct
    sent = upstream.exchanges[-1]
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_safe_responses_stream_is_byte_identical_to_upstream(upstream, proxy):
    events = responses_events(SAFE_PIECES)
    upstream.push(Script(events=events), Script(events=events))
    body = {"model": "fake-model", "input": PLANTED_SAFE_PROMPT, "stream": True}
    assert raw_stream(proxy + "/responses", body) == raw_stream(upstream.base_url + "/responses", body)


def test_unsafe_stream_ends_with_content_filter(upstream, proxy):
    upstream.push(Script(events=chat_events(UNSAFE_PIECES + TAIL), delay_s=0.001))
    got = list(client(proxy).chat.completions.create(model="fake-model", messages=USER, stream=True))  # type: ignore[arg-type]
    assert text_of(got) == "Sure, here is how: take a\n\n" + DEFAULT_REFUSAL
    last = got[-1]
    assert last.choices[0].finish_reason == "content_filter"
    results = last.qwen3guard["response"]  # type: ignore[attr-defined]
    assert results["risk"] == "Unsafe" and results["categories"] == ["Violent"] and results["action"] == "block"
    exchange = upstream.exchanges[-1]
    assert upstream.wait_closed(exchange) and not exchange.completed


def test_unsafe_stream_in_error_mode_ends_with_an_error_event(upstream, proxy_error_mode):
    upstream.push(Script(events=chat_events(UNSAFE_PIECES + TAIL), delay_s=0.001))
    with httpx.stream("POST", proxy_error_mode + "/chat/completions", json=chat_body(), timeout=30) as reply:
        body = reply.read().decode()
    last = json.loads(body.strip().split("\n\n")[-1].removeprefix("data: "))
    assert last["error"]["code"] == "content_filter"
    assert last["qwen3guard"]["response"]["risk"] == "Unsafe"
    assert "pipe" not in body


def test_blocked_prompt_never_reaches_upstream(upstream, proxy):
    before = len(upstream.exchanges)
    messages = [{"role": "user", "content": UNSAFE_PROMPT}]
    got = list(client(proxy).chat.completions.create(model="fake-model", messages=messages, stream=True))  # type: ignore[arg-type]
    assert text_of(got) == DEFAULT_REFUSAL
    assert got[-1].choices[0].finish_reason == "content_filter"
    assert got[-1].qwen3guard["prompt"]["risk"] == "Unsafe"  # type: ignore[attr-defined]
    assert len(upstream.exchanges) == before


def test_proxy_key_is_required(upstream, proxy):
    before = len(upstream.exchanges)
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Bearer {UPSTREAM_KEY}"}):
        reply = httpx.post(proxy + "/chat/completions", json=chat_body(), headers=headers)
        assert reply.status_code == 401
        assert UPSTREAM_KEY not in reply.text
    assert len(upstream.exchanges) == before


def test_oversized_and_malformed_bodies_are_refused(upstream, proxy):
    before = len(upstream.exchanges)
    auth = {"authorization": f"Bearer {PROXY_KEY}"}
    huge = chat_body([{"role": "user", "content": "x" * 30_000}])
    assert httpx.post(proxy + "/chat/completions", json=huge, headers=auth).status_code == 413
    many = chat_body(USER * 9)
    assert httpx.post(proxy + "/chat/completions", json=many, headers=auth).status_code == 400
    assert httpx.post(proxy + "/chat/completions", content=b"{not json", headers=auth).status_code == 400
    assert len(upstream.exchanges) == before


def test_client_disconnect_cancels_the_upstream_stream(upstream, proxy):
    upstream.push(Script(events=chat_events(SAFE_PIECES + [" and"] * 20_000), delay_s=0.001))
    with httpx.stream("POST", proxy + "/chat/completions", json=chat_body(),
                      headers={"authorization": f"Bearer {PROXY_KEY}"}, timeout=30) as reply:
        for _ in zip(range(3), reply.iter_raw()):
            pass
    exchange = upstream.exchanges[-1]
    assert upstream.wait_closed(exchange, timeout=20)
    assert exchange.disconnected and not exchange.completed


def test_concurrent_streams_keep_their_verdicts_apart(upstream, proxy):
    n = 32
    unsafe = {i for i in range(n) if i % 3 == 0}
    # Each request takes the next script, so every script of a kind is the same: a stream's fate is its own.
    # Requests are sent one by one to pair script and request, then read concurrently.
    oai = client(proxy)
    streams = []
    for i in range(n):
        pieces = UNSAFE_PIECES if i in unsafe else SAFE_PIECES
        upstream.push(Script(events=chat_events(pieces), delay_s=0.001))
        streams.append(oai.chat.completions.create(model="fake-model", messages=USER, stream=True))  # type: ignore[arg-type]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda s: list(s), streams))
    for i, got in enumerate(results):
        if i in unsafe:
            assert got[-1].choices[0].finish_reason == "content_filter", i
            assert text_of(got).endswith(DEFAULT_REFUSAL)
        else:
            assert got[-1].choices[0].finish_reason == "stop", i
            assert text_of(got) == "".join(SAFE_PIECES)


def test_models_are_forwarded(upstream, proxy):
    upstream.push(Script(body={"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "me"}]}))
    assert [m.id for m in client(proxy).models.list()] == ["fake-model"]


def test_whole_chat_completion_carries_verdicts(upstream, proxy):
    upstream.push(Script(body=chat_completion(SAFE_ANSWER)))
    safe = client(proxy).chat.completions.create(model="fake-model", messages=[{"role": "user", "content": SAFE_PROMPT}])
    assert safe.choices[0].message.content == SAFE_ANSWER
    assert safe.qwen3guard["prompt"]["risk"] == "Safe"  # type: ignore[attr-defined]
    assert safe.qwen3guard["choices"] == [{"index": 0, "response": safe.qwen3guard["choices"][0]["response"]}]  # type: ignore[attr-defined]
    assert safe.qwen3guard["choices"][0]["response"]["risk"] == "Safe"  # type: ignore[attr-defined]


def test_whole_blocked_prompt_never_reaches_upstream(upstream, proxy):
    before = len(upstream.exchanges)
    blocked = client(proxy).chat.completions.create(model="fake-model", messages=[{"role": "user", "content": UNSAFE_PROMPT}])
    assert blocked.choices[0].finish_reason == "content_filter"
    assert blocked.qwen3guard["prompt"]["risk"] == "Unsafe"  # type: ignore[attr-defined]
    assert len(upstream.exchanges) == before


def test_blocked_responses_prompt_streams_an_incomplete_response(upstream, proxy):
    before = len(upstream.exchanges)
    events = list(client(proxy).responses.create(model="fake-model", input=UNSAFE_PROMPT, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "content_filter"  # type: ignore[union-attr]
    assert len(upstream.exchanges) == before


def test_healthz(upstream, proxy):
    upstream.push(Script(body={"object": "list", "data": []}))
    reply = httpx.get(proxy.removesuffix("/v1") + "/healthz", timeout=30)
    assert reply.status_code == 200 and reply.json() == {"models": "loaded", "upstream": "reachable"}


def test_main_wires_env_and_flags_into_the_app(monkeypatch, gen_dir, upstream):
    from integrations.openai_proxy import __main__ as cli

    served: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: served.update(
        app=server.config.app, address=sockets[0].getsockname()[:2]))
    monkeypatch.setenv("QWEN3GUARD_UPSTREAM", upstream.base_url)
    monkeypatch.setenv("QWEN3GUARD_PROXY_KEYS", "a, b")
    monkeypatch.setenv("QWEN3GUARD_UPSTREAM_API_KEY", UPSTREAM_KEY)
    with socket.socket() as probe:  # a port free on this machine: main() checks it can bind before loading
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["--port", str(port), "--gen-model", str(gen_dir), "--stream-model", str(stream_checkpoint("planted"))]
    assert cli.main(argv) == 0
    assert served["address"] == ("127.0.0.1", port)
    monkeypatch.delenv("QWEN3GUARD_UPSTREAM")
    with pytest.raises(SystemExit):
        cli.main([])
