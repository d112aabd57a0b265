"""The guard proxy answers every mistake in OpenAI's error format with the right status, and never forwards
what it did not judge; the environment configures it; review ids travel in the x-qwen3guard-review header."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_server import serve_app
from gen_server import GenServer, load_gen_model, unused_url
from openai_fake_upstream import SAFE_PIECES, FakeUpstream, Script, chat_completion, chat_events, responses_body, responses_events

from guard_core import Action, GenGuard, Moderator, Policy, RiskLevel
from guard_core.review import ReviewQueue
from guard_core.stream import StreamGuard
from guard_core.testing.cases import CONTROVERSIAL_PROMPT, JAILBREAK_PROMPT, SAFE_ANSWER, SAFE_PROMPT, UNSAFE_PROMPT
from guard_core.testing.stream_fixture import stream_checkpoint
from integrations.openai_proxy.server import REVIEW_HEADER, create_app

USER = [{"role": "user", "content": SAFE_PROMPT}]


@pytest.fixture(scope="module")
def proxy(upstream: FakeUpstream, stream_guard: StreamGuard, gen_guard: GenGuard) -> Iterator[str]:
    with serve_app(create_app(upstream.base_url, moderator=Moderator(stream_guard=stream_guard, gen_guard=gen_guard))) as url:
        yield url


def post(url: str, body: Any = None, *, content: bytes | None = None) -> httpx.Response:
    return httpx.post(url, json=body, content=content, timeout=60) if content is None else httpx.post(url, content=content, timeout=60)


def is_openai_error(reply: httpx.Response, status: int, code: str | None = None) -> bool:
    error = reply.json().get("error", {})
    return reply.status_code == status and isinstance(error.get("message"), str) and (code is None or error.get("code") == code)


@pytest.mark.parametrize("path, body", [
    ("/chat/completions", {"model": "m", "messages": 5}),
    ("/chat/completions", {"model": "m", "messages": [{"role": "wizard", "content": UNSAFE_PROMPT}]}),
    ("/chat/completions", {"model": "m", "messages": USER, "stream": "false"}),
    ("/chat/completions", {"model": "m", "messages": USER, "n": 2000}),
    ("/chat/completions", {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    ("/responses", {"model": "m", "input": 5}),
    ("/responses", {"model": "m", "input": [{"type": "mystery"}]}),
])
def test_client_mistakes_are_400s_and_nothing_goes_upstream(upstream, proxy, path, body) -> None:
    before = len(upstream.exchanges)
    assert is_openai_error(post(proxy + path, body), 400, "invalid_request")
    assert len(upstream.exchanges) == before


def test_malformed_json_of_any_kind_is_a_400(upstream, proxy) -> None:
    before = len(upstream.exchanges)
    deep = b'{"model": "m", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    surrogate = b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}'
    nan = b'{"model": "m", "temperature": NaN, "messages": [{"role": "user", "content": "hi"}]}'
    for raw, code in ((deep, "invalid_json"), (surrogate, "invalid_request"), (b"{not json", "invalid_json"), (b"[1]", "invalid_request"),
                      (nan, "invalid_json")):
        reply = post(proxy + "/chat/completions", content=raw)
        assert is_openai_error(reply, 400, code), raw[:40]
    assert "lone surrogate" in post(proxy + "/chat/completions", content=surrogate).json()["error"]["message"]
    assert len(upstream.exchanges) == before


def test_unknown_paths_and_methods_answer_json(proxy) -> None:
    assert is_openai_error(httpx.get(proxy + "/nothing-here"), 404, "not_found")
    wrong_method = httpx.get(proxy + "/chat/completions")
    assert is_openai_error(wrong_method, 405, "method_not_allowed") and wrong_method.headers["allow"] == "POST"


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/chat/completions/"), ("POST", "/v1/responses/"), ("GET", "/v1/models/"),
                                              ("GET", "/healthz/")])
def test_a_trailing_slash_is_an_unknown_path_not_a_redirect(upstream, proxy, method, path) -> None:
    """A redirect would be built from the client's Host header, and the SDK never adds the slash."""
    before = len(upstream.exchanges)
    reply = httpx.request(method, proxy.removesuffix("/v1") + path, json={"model": "m", "messages": USER},
                          headers={"host": "elsewhere.example"})
    assert is_openai_error(reply, 404, "not_found") and "location" not in reply.headers
    assert len(upstream.exchanges) == before


@pytest.mark.parametrize(("upstream_url", "error"), [("ftp://x/v1", ValueError), ("not a url", ValueError), (8001, TypeError),
                                                     ("http://127.0.0.1:8001\n/v1", ValueError), ("http://127.0.0.1:8001/\tv1", ValueError),
                                                     ("http://[::1/v1", ValueError)])
def test_create_app_checks_the_upstream_url_as_the_command_does(upstream_url, error) -> None:
    with pytest.raises(error, match="URL"):
        create_app(upstream_url)


@pytest.mark.parametrize(("keys", "error"), [("team-a-key", TypeError), (b"team-a-key", TypeError), (set(), ValueError),
                                             ({""}, ValueError), ({"a", "  "}, ValueError), ({5}, TypeError),
                                             ({"cl\u00e9"}, ValueError), ({"team-a-key\n"}, ValueError), ({" team-a-key"}, ValueError)])
def test_api_keys_that_hold_no_real_key_are_refused_not_an_open_proxy(upstream, keys, error) -> None:
    """Also a key no client can present: not ASCII (headers are bytes), a line end, blanks around it."""
    with pytest.raises(error, match="api_keys"):
        create_app(upstream.base_url, api_keys=keys)


@pytest.mark.parametrize(("key", "fault"), [("sk-abc\n", "a control character"), ("sk-\tabc", "a control character"),
                                            ("sk-\u00e9abc", "not ASCII")])
def test_an_upstream_key_that_no_header_can_carry_is_refused_without_echoing_it(upstream, key, fault) -> None:
    """It would make every request a 502 that blames the network."""
    with pytest.raises(ValueError, match="upstream_api_key") as info:
        create_app(upstream.base_url, upstream_api_key=key)
    assert fault in str(info.value) and "abc" not in str(info.value)


def test_a_body_must_be_uncompressed_utf8_json(upstream, proxy) -> None:
    """Python's json would read any UTF (and a BOM), forwarding bytes the upstream refuses; gzip is not unpacked."""
    before = len(upstream.exchanges)
    text = json.dumps({"model": "m", "messages": USER})
    for raw in (text.encode("utf-16"), text.encode("utf-16-le"), b"\xef\xbb\xbf" + text.encode(), text.encode("latin-1") + b"\xe9"):
        assert is_openai_error(post(proxy + "/chat/completions", content=raw), 400, "invalid_json"), raw[:8]
    assert "UTF-8" in post(proxy + "/chat/completions", content=text.encode("utf-16")).json()["error"]["message"]
    reply = httpx.post(proxy + "/chat/completions", content=gzip.compress(text.encode()), headers={"content-encoding": "gzip"})
    assert is_openai_error(reply, 415, "unsupported_encoding") and "'gzip'" in reply.json()["error"]["message"]
    wizard = json.dumps({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}).encode()
    for identity in ("", "identity", "Identity, identity"):  # no coding at all: the body is read (and refused for its role)
        reply = httpx.post(proxy + "/chat/completions", content=wizard, headers={"content-encoding": identity})
        assert is_openai_error(reply, 400, "invalid_request"), identity
    assert len(upstream.exchanges) == before


def test_an_injected_tool_result_blocks_the_request(upstream, proxy) -> None:
    before = len(upstream.exchanges)
    messages = [*USER, {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "1", "content": JAILBREAK_PROMPT}]
    reply = post(proxy + "/chat/completions", {"model": "m", "messages": messages})
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "content_filter"
    assert reply.json()["qwen3guard"]["prompt"]["context_index"] == 0
    assert len(upstream.exchanges) == before


DEFINITIONS = {
    "tools[].function.description": {"tools": [{"type": "function", "function": {"name": "f", "description": JAILBREAK_PROMPT}}]},
    "a parameter's description": {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "description": JAILBREAK_PROMPT}}}}}]},
    "response_format json_schema": {"response_format": {"type": "json_schema", "json_schema": {
        "name": "a", "description": JAILBREAK_PROMPT, "schema": {"type": "object"}}}},
    "an enum value": {"response_format": {"type": "json_schema", "json_schema": {
        "name": "a", "schema": {"type": "string", "enum": [JAILBREAK_PROMPT]}}}},
    "a property name": {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {JAILBREAK_PROMPT: {"type": "string"}}}}}]},
}


@pytest.mark.parametrize("extra", DEFINITIONS.values(), ids=DEFINITIONS.keys())
def test_text_in_tool_and_schema_definitions_is_judged_as_untrusted_context(upstream, proxy, extra) -> None:
    before = len(upstream.exchanges)
    reply = post(proxy + "/chat/completions", {"model": "m", "messages": USER, **extra})
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "content_filter"
    assert reply.json()["qwen3guard"]["prompt"]["context_index"] == 0
    tools = [{"type": "function", "name": "f", "description": JAILBREAK_PROMPT, "parameters": {"type": "object"}}]
    assert post(proxy + "/responses", {"model": "m", "input": SAFE_PROMPT, "tools": tools}).json()["status"] == "incomplete"
    text = {"format": {"type": "json_schema", "name": "a", "description": JAILBREAK_PROMPT, "schema": {"type": "object"}}}
    assert post(proxy + "/responses", {"model": "m", "input": SAFE_PROMPT, "text": text}).json()["status"] == "incomplete"
    assert len(upstream.exchanges) == before
    bad = {"tools": [{"type": "function", "function": {"name": "f", "description": "\ud800"}}]}
    raw = json.dumps({"model": "m", "messages": USER, **bad}).encode()  # a lone surrogate only as a JSON escape
    assert is_openai_error(post(proxy + "/chat/completions", content=raw), 400, "invalid_request")


@pytest.mark.parametrize(("path", "body"), [
    ("/chat/completions", {"messages": [*USER, {"role": "assistant", "Content": UNSAFE_PROMPT}]}),
    ("/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "Text": UNSAFE_PROMPT}]}]}),
    ("/responses", {"input": SAFE_PROMPT, "Instructions": UNSAFE_PROMPT}),
    ("/responses", {"input": [{"type": "function_call_output", "call_id": "1", "Output": UNSAFE_PROMPT}]}),
    ("/chat/completions", {"messages": USER, "N": 500}),
    ("/chat/completions", {"messages": USER, "Stream": True}),
    ("/chat/completions", {"messages": USER, "Documents": [{"text": UNSAFE_PROMPT}]}),
    ("/responses", {"input": SAFE_PROMPT, "Previous_Response_Id": "resp_1"}),
], ids=["assistant Content", "part Text", "Instructions", "item Output", "N past the cap", "Stream", "Documents",
        "Previous_Response_Id"])
def test_a_key_the_guard_reads_in_another_case_is_a_400(upstream, proxy, path, body) -> None:
    """Servers that match JSON keys case-insensitively (Go's encoding/json, e.g. Ollama) would read it unjudged."""
    before = len(upstream.exchanges)
    reply = post(proxy + path, {"model": "m", **body})
    assert is_openai_error(reply, 400, "invalid_request") and "only in case" in reply.json()["error"]["message"]
    assert len(upstream.exchanges) == before


@pytest.mark.parametrize("body", [{"messages": [{"role": ["user"], "content": SAFE_PROMPT}]},
                                  {"messages": [{"role": {"r": 1}, "content": SAFE_PROMPT}]}])
def test_a_role_of_the_wrong_type_is_a_400_not_a_guard_error(proxy, body) -> None:
    assert is_openai_error(post(proxy + "/chat/completions", {"model": "m", **body}), 400, "invalid_request")


def test_safe_tool_descriptions_are_forwarded(upstream, proxy) -> None:
    upstream.push(Script(body=chat_completion(SAFE_ANSWER)))
    tools = [{"type": "function", "function": {"name": "f", "description": SAFE_PROMPT, "parameters": {"type": "object"}}}]
    reply = post(proxy + "/chat/completions", {"model": "m", "messages": USER, "tools": tools})
    assert reply.json()["qwen3guard"]["prompt"]["risk"] == "Safe" and upstream.exchanges[-1].body["tools"] == tools


def test_a_down_or_garbled_upstream_is_a_502_and_an_older_one_passes(upstream, proxy, stream_guard, gen_guard) -> None:
    with serve_app(create_app(unused_url(), moderator=Moderator(stream_guard=stream_guard, gen_guard=gen_guard))) as down:
        for stream in (False, True):
            assert is_openai_error(post(down + "/chat/completions", {"model": "m", "messages": USER, "stream": stream}), 502, "upstream_unavailable")
    upstream.push(Script(body={"unexpected": True}))
    assert is_openai_error(post(proxy + "/chat/completions", {"model": "m", "messages": USER}), 502, "upstream_invalid")

    older = {**responses_body("Preheat the oven."), "usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}}
    upstream.push(Script(body=older))
    whole = post(proxy + "/responses", {"model": "m", "input": SAFE_PROMPT})
    assert whole.status_code == 200 and whole.json()["usage"] == older["usage"]
    events = responses_events(SAFE_PIECES)
    events[-1]["response"]["usage"] = older["usage"]  # type: ignore[index]
    upstream.push(Script(events=events), Script(events=events))
    body = {"model": "m", "input": SAFE_PROMPT, "stream": True}
    direct = httpx.post(upstream.base_url + "/responses", json=body).content
    assert httpx.post(proxy + "/responses", json=body, timeout=60).content == direct


def test_a_stream_whose_upstream_sends_garbage_ends_with_an_error_event(upstream, proxy) -> None:
    upstream.push(Script(events=[*chat_events(SAFE_PIECES[:2], done=False)[:-1], "{not json"]))
    body = httpx.post(proxy + "/chat/completions", json={"model": "m", "messages": USER, "stream": True}, timeout=60).text
    last = json.loads(body.strip().split("\n\n")[-1].removeprefix("data: "))
    assert last["error"]["code"] == "upstream_error"


def test_the_environment_configures_the_proxy(monkeypatch, upstream, gen_dir: Path) -> None:
    with GenServer(*load_gen_model(gen_dir)) as server:
        monkeypatch.setenv("QWEN3GUARD_GEN_URL", server.base_url)
        monkeypatch.setenv("QWEN3GUARD_GEN_MODEL", server.model_name)
        monkeypatch.setenv("QWEN3GUARD_STREAM_MODEL", str(stream_checkpoint("planted")))
        with serve_app(create_app(upstream.base_url)) as url:
            blocked = post(url + "/chat/completions", {"model": "m", "messages": [{"role": "user", "content": UNSAFE_PROMPT}]})
            assert blocked.json()["qwen3guard"]["prompt"]["model"] == server.model_name
    monkeypatch.setenv("QWEN3GUARD_GEN_URL", unused_url())
    with serve_app(create_app(upstream.base_url)) as url:
        closed = post(url + "/chat/completions", {"model": "m", "messages": USER})
        assert closed.json()["qwen3guard"]["prompt"]["error_kind"] == "unavailable"
        assert closed.json()["choices"][0]["finish_reason"] == "content_filter"
    with serve_app(create_app(upstream.base_url, on_unsafe="error")) as url:
        down = post(url + "/chat/completions", {"model": "m", "messages": USER})
        assert is_openai_error(down, 503, "guard_unavailable"), "an outage is no content filter, and the SDK retries a 503"
        assert "not judged" in down.json()["error"]["message"] and "x-should-retry" not in down.headers
    monkeypatch.setenv("QWEN3GUARD_FAIL_OPEN", "1")
    upstream.push(Script(events=chat_events(SAFE_PIECES)))
    with serve_app(create_app(upstream.base_url)) as url:
        reply = httpx.post(url + "/chat/completions", json={"model": "m", "messages": USER, "stream": True}, timeout=60)
        assert reply.status_code == 200 and "".join(SAFE_PIECES) == "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            for line in reply.text.splitlines() if line.startswith("data: {") and json.loads(line[6:])["choices"])


def test_review_ids_travel_in_a_header_and_on_the_stream(tmp_path, upstream, stream_guard, gen_guard) -> None:
    queue = ReviewQueue(tmp_path / "review.db")
    moderator = Moderator(stream_guard=stream_guard, gen_guard=gen_guard, review=queue, source="openai.proxy",
                          policy=Policy(actions={RiskLevel.CONTROVERSIAL: Action.REVIEW}))
    pieces = ["It was a", " rigged", " election", ", some say."]
    upstream.push(Script(events=chat_events(pieces)))
    with serve_app(create_app(upstream.base_url, moderator=moderator)) as url:
        reply = httpx.post(url + "/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": CONTROVERSIAL_PROMPT}],
                                                           "stream": True}, timeout=60)
    prompt_item, answer_item = queue.list(status="pending")
    assert reply.headers[REVIEW_HEADER] == prompt_item.id and prompt_item.source == "openai.proxy"
    chunks = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "".join(pieces)
    assert [c["qwen3guard"]["response"]["review_id"] for c in chunks if "qwen3guard" in c] == [answer_item.id]
