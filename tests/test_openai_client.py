"""guard_openai end to end: the real openai client, over real HTTP, against a scripted local upstream."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from typing import Any

import httpx2
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletion, ParsedChatCompletion
from openai.types.chat.parsed_chat_completion import ParsedChatCompletionMessage
from openai_fake_upstream import (
    SAFE_PIECES,
    TAIL,
    UNSAFE_PIECES,
    Script,
    chat_completion,
    chat_events,
    responses_body,
    responses_events,
)

from guard_core import Action, Category, Policy, RiskLevel
from guard_core.testing.cases import REFUSAL_ANSWER, SAFE_ANSWER, SAFE_PROMPT, UNSAFE_ANSWER, UNSAFE_PROMPT
from guard_core.testing.stream_fixture import PLANTED_SAFE_PROMPT, PLANTED_UNSAFE_PROMPT
from integrations.openai_proxy import DEFAULT_REFUSAL, GuardFailedError, MalformedReplyError, OpenAIGuard, UnsafeContentError, guard_openai

USER = [{"role": "user", "content": PLANTED_SAFE_PROMPT}]


def text_of(chunks: list[Any], index: int = 0) -> str:
    return "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices if c.index == index)


def dumps(items: list[Any]) -> list[str]:
    return [i.model_dump_json() for i in items]


def stream_chat(client: OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(model="fake-model", messages=kwargs.pop("messages", USER), stream=True, **kwargs)


def gates_closed(stream: Any) -> bool:
    return all(gate.session.closed for gate in stream._streamed.items.relay.gates.values())


def read_until_error(stream: Any) -> tuple[list[Any], Exception | None]:
    got: list[Any] = []
    try:
        for item in stream:
            got.append(item)
    except Exception as exc:  # the tests compare what was raised
        return got, exc
    return got, None


# Chat completions, streamed


@pytest.mark.parametrize("holdback", [2, 0])
def test_safe_stream_is_identical_to_the_unwrapped_clients(upstream, bare, guard, holdback):
    events = chat_events(SAFE_PIECES, usage=True, logprobs=True)
    upstream.push(Script(events=events), Script(events=events))
    plain = list(stream_chat(bare, stream_options={"include_usage": True}, logprobs=True))
    guarded = list(stream_chat(guard(bare, holdback_tokens=holdback), stream_options={"include_usage": True}, logprobs=True))
    assert dumps(guarded) == dumps(plain)
    assert guarded[-1].usage is not None and guarded[-1].choices == []


def test_abort_raises_with_the_verdict_and_hangs_up_on_upstream(upstream, bare, guard):
    upstream.push(Script(events=chat_events(UNSAFE_PIECES + TAIL), delay_s=0.002))
    got, error = read_until_error(stream_chat(guard(bare)))
    assert isinstance(error, UnsafeContentError) and isinstance(error, openai.OpenAIError)
    assert error.verdict.risk is RiskLevel.UNSAFE and error.verdict.categories == (Category.VIOLENT,)
    assert error.verdict.role == "response" and error.choice_index == 0
    assert error.delivered == text_of(got) == "Sure, here is how: take a"
    exchange = upstream.exchanges[-1]
    assert upstream.wait_closed(exchange)
    assert exchange.disconnected and not exchange.completed


def test_rewrite_ends_with_a_refusal_and_a_content_filter_chunk(upstream, bare, guard):
    upstream.push(Script(events=chat_events(UNSAFE_PIECES + TAIL), delay_s=0.002))
    stream = stream_chat(guard(bare, on_unsafe="rewrite"))
    got = list(stream)
    assert text_of(got) == "Sure, here is how: take a\n\n" + DEFAULT_REFUSAL
    last = got[-1]
    assert last.choices[0].finish_reason == "content_filter"
    assert last.qwen3guard["response"]["risk"] == "Unsafe" and last.qwen3guard["response"]["categories"] == ["Violent"]
    assert all(c.id == got[0].id for c in got)
    assert stream.verdicts[0].risk is RiskLevel.UNSAFE
    exchange = upstream.exchanges[-1]
    assert upstream.wait_closed(exchange) and exchange.disconnected


def test_no_planted_token_reaches_the_caller_with_the_holdback_window(upstream, bare, guard):
    """Planted tokens split across chunks, whole, or glued to safe text: never delivered, in text or logprobs."""
    scripts = [["A pi", "pe", " bo", "mb!"], ["Take a pipe bomb now."], ["Take a", " pipe bomb", " now."]]
    for pieces in scripts:
        upstream.push(Script(events=chat_events(pieces, logprobs=True)))
        got = list(stream_chat(guard(bare, on_unsafe="rewrite"), logprobs=True))
        delivered = "".join(c.model_dump_json() for c in got)
        assert "pipe" not in delivered and "bomb" not in delivered, pieces
        assert got[-1].choices[0].finish_reason == "content_filter"


def test_without_holdback_text_flows_at_once_and_the_abort_comes_as_early_as_the_guard_allows(upstream, bare, guard):
    upstream.push(Script(events=chat_events(UNSAFE_PIECES + TAIL), delay_s=0.002))
    got, error = read_until_error(stream_chat(guard(bare, holdback_tokens=0)))
    assert isinstance(error, UnsafeContentError)
    # The run is judged Unsafe when its second token is complete, i.e. once the next delta arrives.
    assert error.delivered == text_of(got) == "Sure, here is how: take a pipe bomb"


def test_blocked_prompt_never_reaches_upstream(upstream, bare, guard):
    before = len(upstream.exchanges)
    with pytest.raises(UnsafeContentError) as info:
        stream_chat(guard(bare), messages=[{"role": "user", "content": UNSAFE_PROMPT}])
    assert info.value.verdict.role == "prompt" and info.value.choice_index is None
    stream = stream_chat(guard(bare, on_unsafe="rewrite"), messages=[{"role": "user", "content": UNSAFE_PROMPT}], n=2)
    with stream:
        got = list(stream)
    assert isinstance(stream, openai.Stream) and isinstance(stream.response, httpx2.Response)
    assert text_of(got, 0) == text_of(got, 1) == DEFAULT_REFUSAL
    assert [c.choices[0].finish_reason for c in got] == [None, "content_filter"] * 2
    assert stream.prompt_verdict.risk is RiskLevel.UNSAFE
    assert len(upstream.exchanges) == before


def test_tool_call_deltas_pass_through(upstream, bare, guard):
    events = chat_events(["Let me check", " the weather."], tool_call={"name": "get_weather", "arguments": '{"city": "Paris"}'})
    upstream.push(Script(events=events), Script(events=events))
    assert dumps(list(stream_chat(guard(bare)))) == dumps(list(stream_chat(bare)))


def test_each_of_n_choices_is_judged_on_its_own(upstream, bare, guard):
    upstream.push(Script(events=chat_events([SAFE_PIECES, UNSAFE_PIECES])))
    stream = stream_chat(guard(bare, on_unsafe="rewrite"), n=2)
    got = list(stream)
    assert text_of(got, 0) == "".join(SAFE_PIECES)
    assert text_of(got, 1) == "Sure, here is how: take a\n\n" + DEFAULT_REFUSAL
    finishes = {c.index: c.finish_reason for chunk in got for c in chunk.choices if c.finish_reason}
    assert finishes == {0: "stop", 1: "content_filter"}
    assert stream.verdicts[0].risk is RiskLevel.SAFE and stream.verdicts[1].risk is RiskLevel.UNSAFE


@pytest.mark.parametrize("mode,error", [("error", openai.APIError), ("drop", openai.APIConnectionError)])
def test_upstream_errors_mid_stream_propagate_unchanged_and_free_the_guard(upstream, bare, guard, mode, error):
    script = Script(events=chat_events(SAFE_PIECES), fail_after=5, fail_mode=mode)
    upstream.push(script, script)
    _, plain = read_until_error(stream_chat(bare))
    stream = stream_chat(guard(bare))
    _, guarded = read_until_error(stream)
    assert type(guarded) is type(plain) and isinstance(guarded, error)
    assert str(guarded) == str(plain)
    assert gates_closed(stream)


def test_stream_keeps_openais_interface(upstream, bare, guard):
    upstream.push(Script(events=chat_events(SAFE_PIECES + TAIL), delay_s=0.002))
    with stream_chat(guard(bare)) as stream:
        assert isinstance(stream, openai.Stream)
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
    assert stream.response.is_closed
    exchange = upstream.exchanges[-1]
    assert upstream.wait_closed(exchange) and exchange.disconnected
    assert gates_closed(stream)


def test_with_options_keeps_the_guard_and_the_client_is_still_an_openai_client(upstream, bare, guard):
    client = guard(bare).with_options(timeout=30)
    assert isinstance(client, OpenAI) and client.timeout == 30
    with pytest.raises(UnsafeContentError):
        stream_chat(client, messages=[{"role": "user", "content": UNSAFE_PROMPT}])
    upstream.push(Script(body={"object": "list", "data": []}), Script(events=chat_events(SAFE_PIECES)))
    assert client.models.list().data == []  # not moderated: the original resource
    list(stream_chat(client))
    assert upstream.exchanges[-1].headers["user-agent"] == upstream.exchanges[-2].headers["user-agent"]
    assert upstream.exchanges[-1].headers["user-agent"].startswith("OpenAI/Python")


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_the_clients_own_http_methods_refuse_the_moderated_paths(upstream, bare, abare, guard, is_async):
    client = guard(abare if is_async else bare)
    before = len(upstream.exchanges)
    body = {"model": "fake-model", "messages": [{"role": "user", "content": UNSAFE_PROMPT}]}
    for call in (lambda: client.post("/chat/completions", body=body, cast_to=ChatCompletion),
                 lambda: client.post("/Chat/Completions/", body=body, cast_to=ChatCompletion),
                 lambda: client.get("/responses/resp_1", cast_to=object),
                 lambda: client.post(str(client.base_url) + "responses", body=body, cast_to=object)):
        with pytest.raises(NotImplementedError, match=r"past Qwen3Guard; use the guarded resources"):
            call()
    assert len(upstream.exchanges) == before
    for path in ("/models", "/organization/usage/completions"):  # only the APIs themselves: usage statistics are not
        upstream.push(Script(body={"object": "list", "data": []}))
        listed = client.get(path, cast_to=object)
        assert (await listed if is_async else listed) == {"object": "list", "data": []}


def test_a_gateway_prefix_that_names_an_api_is_no_moderated_path(upstream, bare, guard):
    gateway = guard(bare).with_options(base_url=upstream.base_url + "/realtime/v1/")
    upstream.push(Script(body={"object": "list", "data": []}))
    assert gateway.get("/models", cast_to=object) == {"object": "list", "data": []}


def test_raw_response_wrappers_refuse_rather_than_bypass_the_guard(bare, guard):
    with pytest.raises(NotImplementedError):
        guard(bare).chat.completions.with_raw_response.create(model="fake-model", messages=USER)


# Chat completions, whole


def test_whole_completions_are_moderated_with_gen(upstream, bare, guard):
    unsafe = [{"role": "user", "content": UNSAFE_PROMPT}]
    safe = [{"role": "user", "content": SAFE_PROMPT}]
    upstream.push(Script(body=chat_completion([SAFE_ANSWER])))
    completion = guard(bare).chat.completions.create(model="fake-model", messages=safe)
    assert completion.choices[0].message.content == SAFE_ANSWER
    assert completion.qwen3guard["choices"][0]["response"]["risk"] == "Safe"

    before = len(upstream.exchanges)
    with pytest.raises(UnsafeContentError):
        guard(bare).chat.completions.create(model="fake-model", messages=unsafe)
    refused = guard(bare, on_unsafe="rewrite").chat.completions.create(model="fake-model", messages=unsafe)
    assert refused.choices[0].message.content == DEFAULT_REFUSAL and refused.choices[0].finish_reason == "content_filter"
    assert len(upstream.exchanges) == before


#: Gen judges the fixture's unsafe prompt Unsafe/Violent; flagging that category for prompts only
#: lets the request through, so the answer's own verdict decides (the fixture knows answers to it).
ASK_ANYWAY = Policy(category_actions={Category.VIOLENT: Action.FLAG})


def test_whole_completion_blocks_per_choice_and_reports_refusals(upstream, bare, guard):
    conversation = [{"role": "user", "content": UNSAFE_PROMPT}]
    upstream.push(Script(body=chat_completion([REFUSAL_ANSWER, UNSAFE_ANSWER])))
    client = guard(bare, on_unsafe="rewrite", prompt_policy=ASK_ANYWAY)
    completion = client.chat.completions.create(model="fake-model", messages=conversation, n=2)
    assert completion.choices[0].message.content == REFUSAL_ANSWER
    assert completion.choices[1].message.content == DEFAULT_REFUSAL
    assert completion.choices[1].finish_reason == "content_filter"
    notes = completion.qwen3guard
    assert notes["prompt"]["risk"] == "Unsafe"
    assert notes["choices"][0]["response"]["refusal"] is True and notes["choices"][0]["response"]["action"] == "allow" and notes["choices"][0]["response"]["risk"] == "Safe"
    assert notes["choices"][1]["response"]["risk"] == "Unsafe"

    upstream.push(Script(body=chat_completion([REFUSAL_ANSWER, UNSAFE_ANSWER])))
    with pytest.raises(UnsafeContentError) as info:
        guard(bare, prompt_policy=ASK_ANYWAY).chat.completions.create(model="fake-model", messages=conversation, n=2)
    assert info.value.choice_index == 1 and info.value.verdict.role == "response"


# Responses API


def test_responses_stream_safe_is_identical_and_unsafe_is_rewritten(upstream, bare, guard):
    upstream.push(Script(events=responses_events(SAFE_PIECES)), Script(events=responses_events(SAFE_PIECES)))
    plain = list(bare.responses.create(model="fake-model", input=PLANTED_SAFE_PROMPT, stream=True))
    guarded = list(guard(bare).responses.create(model="fake-model", input=PLANTED_SAFE_PROMPT, stream=True))
    assert dumps(guarded) == dumps(plain)

    upstream.push(Script(events=responses_events(UNSAFE_PIECES + TAIL), delay_s=0.002))
    events = list(guard(bare, on_unsafe="rewrite").responses.create(model="fake-model", input=PLANTED_SAFE_PROMPT, stream=True))
    assert "pipe" not in json.dumps([e.model_dump() for e in events])
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "Sure, here is how: take a\n\n" + DEFAULT_REFUSAL
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == deltas
    last = events[-1]
    assert last.type == "response.incomplete" and last.response.incomplete_details.reason == "content_filter"
    assert last.response.output_text == deltas
    assert [e.sequence_number for e in events] == sorted({e.sequence_number for e in events})


def test_responses_abort_and_blocked_prompt(upstream, bare, guard):
    upstream.push(Script(events=responses_events(UNSAFE_PIECES + TAIL), delay_s=0.002))
    _, error = read_until_error(guard(bare).responses.create(model="fake-model", input=PLANTED_SAFE_PROMPT, stream=True))
    assert isinstance(error, UnsafeContentError) and error.delivered == "Sure, here is how: take a"
    assert upstream.wait_closed(upstream.exchanges[-1]) and upstream.exchanges[-1].disconnected

    before = len(upstream.exchanges)
    events = list(guard(bare, on_unsafe="rewrite").responses.create(
        model="fake-model", input=[{"role": "user", "content": UNSAFE_PROMPT}], stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == DEFAULT_REFUSAL
    assert len(upstream.exchanges) == before


def test_whole_responses_are_moderated_with_gen(upstream, bare, guard):
    upstream.push(Script(body=responses_body(UNSAFE_ANSWER)))
    refused = guard(bare, on_unsafe="rewrite", prompt_policy=ASK_ANYWAY).responses.create(model="fake-model", input=UNSAFE_PROMPT)
    assert refused.status == "incomplete" and refused.incomplete_details.reason == "content_filter"
    assert refused.output_text == DEFAULT_REFUSAL
    upstream.push(Script(body=responses_body(REFUSAL_ANSWER)))
    answer = guard(bare, prompt_policy=ASK_ANYWAY).responses.create(model="fake-model", input=UNSAFE_PROMPT)
    assert answer.output_text == REFUSAL_ANSWER and answer.qwen3guard["response"]["refusal"] is True


# asyncio


async def test_async_chat_streams(upstream, abare, guard):
    upstream.push(Script(events=chat_events(SAFE_PIECES)), Script(events=chat_events(SAFE_PIECES)))
    plain = [c async for c in await abare.chat.completions.create(model="fake-model", messages=USER, stream=True)]
    client = guard(abare)
    assert isinstance(client, AsyncOpenAI)
    stream = await client.chat.completions.create(model="fake-model", messages=USER, stream=True)
    assert isinstance(stream, openai.AsyncStream)
    assert dumps([c async for c in stream]) == dumps(plain)

    upstream.push(Script(events=chat_events(UNSAFE_PIECES + TAIL), delay_s=0.002))
    stream = await client.chat.completions.create(model="fake-model", messages=USER, stream=True)
    got = []
    with pytest.raises(UnsafeContentError) as info:
        async with stream:
            async for chunk in stream:
                got.append(chunk)
    assert info.value.delivered == text_of(got) == "Sure, here is how: take a"
    assert upstream.wait_closed(upstream.exchanges[-1]) and upstream.exchanges[-1].disconnected

    upstream.push(Script(events=chat_events(UNSAFE_PIECES)))
    rewrite = guard(abare, on_unsafe="rewrite")
    got = [c async for c in await rewrite.chat.completions.create(model="fake-model", messages=USER, stream=True)]
    assert got[-1].choices[0].finish_reason == "content_filter"
    with pytest.raises(UnsafeContentError):
        await client.with_options(timeout=10).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": UNSAFE_PROMPT}], stream=True)


async def test_async_responses_and_whole_completions(upstream, abare, guard):
    upstream.push(Script(events=responses_events(UNSAFE_PIECES)))
    client = guard(abare, on_unsafe="rewrite")
    events = [e async for e in await client.responses.create(model="fake-model", input=PLANTED_SAFE_PROMPT, stream=True)]
    assert events[-1].type == "response.incomplete"
    assert "pipe" not in json.dumps([e.model_dump() for e in events])

    upstream.push(Script(body=chat_completion([SAFE_ANSWER])))
    completion = await client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": SAFE_PROMPT}])
    assert completion.choices[0].message.content == SAFE_ANSWER
    upstream.push(Script(body=responses_body(UNSAFE_ANSWER)))
    with pytest.raises(UnsafeContentError):
        await guard(abare, prompt_policy=ASK_ANYWAY).responses.create(model="fake-model", input=UNSAFE_PROMPT)


async def test_async_upstream_error_mid_stream(upstream, abare, guard):
    upstream.push(Script(events=chat_events(SAFE_PIECES), fail_after=4))
    stream = await guard(abare).chat.completions.create(model="fake-model", messages=USER, stream=True)
    with pytest.raises(openai.APIError, match="upstream failed mid-stream"):
        async for _ in stream:
            pass
    assert gates_closed(stream)


def test_openais_stream_helper_and_parse_are_guarded_too(upstream, bare, guard):
    upstream.push(Script(events=chat_events(UNSAFE_PIECES)))
    events: list[Any] = []
    # openai's helper treats the guard's content_filter ending like OpenAI's own filter.
    with pytest.raises(openai.ContentFilterFinishReasonError):
        with guard(bare, on_unsafe="rewrite").chat.completions.stream(model="fake-model", messages=USER) as stream:
            events.extend(stream)
            stream.get_final_completion()
    text = "".join(e.delta for e in events if e.type == "content.delta")
    assert text == "Sure, here is how: take a\n\n" + DEFAULT_REFUSAL

    before = len(upstream.exchanges)
    with pytest.raises(UnsafeContentError):
        guard(bare).chat.completions.parse(model="fake-model", messages=[{"role": "user", "content": UNSAFE_PROMPT}])
    refused = guard(bare, on_unsafe="rewrite").chat.completions.parse(
        model="fake-model", messages=[{"role": "user", "content": UNSAFE_PROMPT}])
    assert refused.choices[0].message.parsed is None and refused.choices[0].finish_reason == "content_filter"
    assert len(upstream.exchanges) == before


@pytest.mark.parametrize("client", ["sk-test", None, object()])
def test_guard_openai_takes_only_an_openai_client(client):
    with pytest.raises(TypeError, match="wraps an openai.OpenAI or openai.AsyncOpenAI client"):
        guard_openai(client)


# What the SDK sends is what the guard judges


UNSAFE_USER = [{"role": "user", "content": UNSAFE_PROMPT}]


@pytest.mark.parametrize(("endpoint", "kwargs", "extra"), [
    ("chat", {"messages": USER}, {"messages": UNSAFE_USER}),
    ("responses", {"input": PLANTED_SAFE_PROMPT}, {"input": UNSAFE_PROMPT}),
    ("responses", {"input": PLANTED_SAFE_PROMPT}, {"instructions": UNSAFE_PROMPT}),
], ids=["chat-messages", "responses-input", "responses-instructions"])
def test_extra_body_is_judged_as_the_body_the_sdk_sends(upstream, bare, guard, endpoint, kwargs, extra):
    before = len(upstream.exchanges)
    resource = guard(bare).chat.completions if endpoint == "chat" else guard(bare).responses
    with pytest.raises(UnsafeContentError):
        resource.create(model="fake-model", stream=True, extra_body=extra, **kwargs)
    assert len(upstream.exchanges) == before


def test_extra_body_cannot_raise_n_past_the_cap_or_change_how_the_reply_is_read(upstream, bare, guard):
    before = len(upstream.exchanges)
    with pytest.raises(ValueError, match="'n' must be an int from 1 to 8"):
        stream_chat(guard(bare), messages=USER, extra_body={"n": 12})
    with pytest.raises(ValueError, match="pass 'stream' to create"):
        guard(bare).chat.completions.create(model="fake-model", messages=USER, extra_body={"stream": True})
    assert len(upstream.exchanges) == before


@pytest.mark.parametrize("extra", [{"Messages": UNSAFE_USER}, {"MESSAGES": UNSAFE_USER}], ids=["Messages", "MESSAGES"])
def test_extra_body_cannot_smuggle_a_field_in_another_case(upstream, bare, guard, extra):
    """Servers that match JSON keys case-insensitively (Go's encoding/json) would read it as ``messages``."""
    before = len(upstream.exchanges)
    with pytest.raises(ValueError, match="only in case"):
        stream_chat(guard(bare), messages=USER, extra_body=extra)
    assert len(upstream.exchanges) == before


def test_a_generator_of_messages_reaches_upstream_whole(upstream, bare, guard):
    upstream.push(Script(events=chat_events(SAFE_PIECES)))
    list(stream_chat(guard(bare), messages=(m for m in USER)))
    assert upstream.exchanges[-1].body["messages"] == USER


def test_beta_chat_and_responses_are_guarded_and_retrieve_refuses(upstream, bare, guard):
    before = len(upstream.exchanges)
    client = guard(bare)
    with pytest.raises(UnsafeContentError):
        client.beta.chat.completions.create(model="fake-model", messages=UNSAFE_USER, stream=True)
    with pytest.raises(UnsafeContentError):
        client.beta.responses.create(model="fake-model", input=UNSAFE_PROMPT, stream=True)
    for responses in (client.responses, client.beta.responses):
        with pytest.raises(NotImplementedError, match="retrieve it with the unguarded client"):
            responses.retrieve("resp_123", stream=True)
    with pytest.raises(ValueError, match="'background' responses are fetched later"):
        client.responses.create(model="fake-model", input=PLANTED_SAFE_PROMPT, background=True)
    assert len(upstream.exchanges) == before


def test_reusable_prompt_variables_are_judged(upstream, bare, guard):
    before = len(upstream.exchanges)
    with pytest.raises(UnsafeContentError):
        guard(bare).responses.create(model="fake-model", prompt={"id": "pmpt_1", "variables": {"question": UNSAFE_PROMPT}},
                                     stream=True)
    with pytest.raises(ValueError, match="prompt variable 'photo'.*only text parts"):
        guard(bare).responses.create(model="fake-model", input=PLANTED_SAFE_PROMPT, stream=True, prompt={
            "id": "pmpt_1", "variables": {"photo": {"type": "input_image", "image_url": "https://x/y.png"}}})
    assert len(upstream.exchanges) == before
    upstream.push(Script(events=responses_events(SAFE_PIECES)))
    list(guard(bare).responses.create(model="fake-model", prompt={"id": "pmpt_1", "variables": {"q": PLANTED_SAFE_PROMPT}},
                                      stream=True))
    assert upstream.exchanges[-1].body["prompt"]["variables"] == {"q": PLANTED_SAFE_PROMPT}


def test_a_refused_responses_stream_is_one_response_for_the_sdk(bare, guard):
    stream = guard(bare, on_unsafe="rewrite").responses.create(model="fake-model", input=UNSAFE_PROMPT, stream=True)
    events = list(stream)
    ids = {e.response.id for e in events if e.type in ("response.created", "response.incomplete")}
    assert [e.type for e in events][0] == "response.created" and events[-1].type == "response.incomplete"
    assert len(ids) == 1, "response.created and response.incomplete name the same response"


def test_responses_parse_refusals_stay_parsed_responses(upstream, bare, guard):
    from openai.types.responses import ParsedResponse
    from pydantic import BaseModel

    from integrations.openai_proxy import chunks

    class Answer(BaseModel):
        answer: str

    refused = guard(bare, on_unsafe="rewrite").responses.parse(model="fake-model", input=UNSAFE_PROMPT, text_format=Answer)
    assert isinstance(refused, ParsedResponse) and refused.output_parsed is None
    part = refused.output[0].content[0]  # a structured answer's refusal is a refusal part, not JSON-less text
    assert refused.incomplete_details.reason == "content_filter" and (part.type, part.refusal) == ("refusal", DEFAULT_REFUSAL)
    upstream.push(Script(body=responses_body('{"answer": "fine"}')))
    parsed = bare.responses.parse(model="fake-model", input=PLANTED_SAFE_PROMPT, text_format=Answer)
    cut = chunks.refused_response(parsed, DEFAULT_REFUSAL, {})
    assert type(cut) is type(parsed) and cut.output_parsed is None and cut.output_text == DEFAULT_REFUSAL


#: What a guarded client refuses because it would move text past the guard, by the name the error gives.
BYPASSES = {
    "responses.connect": lambda c: c.responses.connect(),
    "beta.responses.connect": lambda c: c.beta.responses.connect(),
    "responses.cancel": lambda c: c.responses.cancel("resp_1"),
    "beta.responses.cancel": lambda c: c.beta.responses.cancel("resp_1"),
    "responses.compact": lambda c: c.responses.compact(model="fake-model", input=UNSAFE_PROMPT),
    "responses.input_items.list": lambda c: c.responses.input_items.list("resp_1"),
    "responses.input_tokens.count": lambda c: c.responses.input_tokens.count(input=UNSAFE_PROMPT),
    "beta.responses.input_tokens.count": lambda c: c.beta.responses.input_tokens.count(input=UNSAFE_PROMPT),
    "chat.completions.retrieve": lambda c: c.chat.completions.retrieve("chatcmpl-1"),
    "chat.completions.list": lambda c: c.chat.completions.list(),
    "chat.completions.update": lambda c: c.chat.completions.update("chatcmpl-1", metadata={}),
    "chat.completions.messages.list": lambda c: c.chat.completions.messages.list("chatcmpl-1"),
    "completions.create": lambda c: c.completions.create(model="fake-model", prompt=UNSAFE_PROMPT),
    "live.connect": lambda c: c.live.connect(),
    "live.sessions.accept": lambda c: c.live.sessions.accept("sess_1"),
    "realtime.connect": lambda c: c.realtime.connect(model="fake-model"),
    "beta.realtime.connect": lambda c: c.beta.realtime.connect(model="fake-model"),
    "realtime.client_secrets.create": lambda c: c.realtime.client_secrets.create(session={"type": "realtime",
                                                                                          "instructions": UNSAFE_PROMPT}),
    "realtime.calls.create": lambda c: c.realtime.calls.create(sdp="v=0"),
    "realtime.translations.connect": lambda c: c.realtime.translations.connect(model="fake-model"),
    "beta.realtime.sessions.create": lambda c: c.beta.realtime.sessions.create(instructions=UNSAFE_PROMPT),
    "conversations.create": lambda c: c.conversations.create(items=[{"role": "user", "content": UNSAFE_PROMPT}]),
    "conversations.items.create": lambda c: c.conversations.items.create("conv_1", items=[{"role": "user", "content": UNSAFE_PROMPT}]),
    "conversations.items.list": lambda c: c.conversations.items.list("conv_1"),
    "conversations.items.retrieve": lambda c: c.conversations.items.retrieve("item_1", conversation_id="conv_1"),
}


@pytest.mark.parametrize("name", BYPASSES)
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_methods_that_would_bypass_the_guard_refuse_and_say_what_to_use(upstream, bare, abare, guard, name, is_async):
    before = len(upstream.exchanges)
    with pytest.raises(NotImplementedError, match=rf"^{re.escape(name)}\(\) .*the unguarded client"):
        BYPASSES[name](guard(abare if is_async else bare))
    assert len(upstream.exchanges) == before


class _Meddling:
    """The test Gen guard, but while it judges a prompt ``meddle`` runs: the caller's request changes meanwhile."""

    def __init__(self, guard: Any, meddle: Any) -> None:
        self.guard, self.meddle, self.model_id = guard, meddle, guard.model_id

    def moderate(self, messages: Any) -> Any:
        self.meddle()
        return self.guard.moderate(messages)

    async def amoderate(self, messages: Any) -> Any:
        self.meddle()
        return await self.guard.amoderate(messages)

    def moderate_batch(self, conversations: Any) -> Any:
        return self.guard.moderate_batch(conversations)

    async def amoderate_batch(self, conversations: Any) -> Any:
        return await self.guard.amoderate_batch(conversations)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_upstream_gets_the_request_that_was_judged_even_if_the_caller_changes_it_meanwhile(
        upstream, bare, abare, stream_guard, gen_guard, is_async):
    history = [{"role": "user", "content": SAFE_PROMPT}]

    def meddle() -> None:  # a shared chat history, changed by another task or thread while the guard judges
        history[0]["content"] = UNSAFE_PROMPT
        history.append({"role": "user", "content": UNSAFE_PROMPT})

    client = guard_openai(abare if is_async else bare, stream_guard=stream_guard, gen_guard=_Meddling(gen_guard, meddle))
    upstream.push(Script(body=chat_completion([SAFE_ANSWER])))
    call = client.chat.completions.create(model="fake-model", messages=history)
    completion = await call if is_async else call
    assert completion.qwen3guard["prompt"]["risk"] == "Safe"
    assert upstream.exchanges[-1].body["messages"] == [{"role": "user", "content": SAFE_PROMPT}]


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_a_guard_that_fails_is_an_openai_error_and_nothing_goes_upstream(upstream, bare, abare, gen_guard, is_async):
    def crash() -> None:
        raise RuntimeError("CUDA out of memory")

    client = guard_openai(abare if is_async else bare, stream_guard=None, gen_guard=_Meddling(gen_guard, crash))
    before = len(upstream.exchanges)
    with pytest.raises(openai.OpenAIError, match=r"^the guard failed \(RuntimeError: CUDA out of memory\)") as info:
        call = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": SAFE_PROMPT}])
        await call if is_async else call
    assert isinstance(info.value, GuardFailedError) and isinstance(info.value.__cause__, RuntimeError)
    assert len(upstream.exchanges) == before


def test_messages_from_any_iterable_the_sdk_takes_are_judged_and_sent(upstream, bare, stream_guard, gen_guard):
    history = {"a": {"role": "user", "content": SAFE_PROMPT}}
    upstream.push(Script(body=chat_completion([SAFE_ANSWER])))
    client = guard_openai(bare, stream_guard=stream_guard, gen_guard=gen_guard)
    completion = client.chat.completions.create(model="fake-model", messages=history.values())
    assert completion.qwen3guard["prompt"]["risk"] == "Safe"
    assert upstream.exchanges[-1].body["messages"] == [{"role": "user", "content": SAFE_PROMPT}]


def test_close_from_another_thread_stops_the_reader_as_on_the_bare_client(upstream, bare, guard):
    upstream.push(Script(events=chat_events(SAFE_PIECES + TAIL), delay_s=0.005))
    stream = stream_chat(guard(bare))
    errors: list[Exception] = []

    def read() -> None:
        try:
            for _ in stream:
                pass
        except Exception as exc:  # what the reader sees is compared below
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    while reader.is_alive() and not stream._iterator.gi_running:  # until the reader waits inside the stream
        time.sleep(0.001)
    stream.close()  # a "stop" button: must not fail because the stream is being read right now
    reader.join(10)
    assert not reader.is_alive()
    assert all(isinstance(e, openai.APIConnectionError) for e in errors), errors  # as the bare client's reader
    exchange = upstream.exchanges[-1]
    assert upstream.wait_closed(exchange) and exchange.disconnected and not exchange.completed
    assert gates_closed(stream)


async def test_close_from_another_task_stops_the_reader_as_on_the_bare_client(upstream, abare, guard):
    upstream.push(Script(events=chat_events(SAFE_PIECES + TAIL), delay_s=0.005))
    stream = await guard(abare).chat.completions.create(model="fake-model", messages=USER, stream=True)
    started = asyncio.Event()

    async def read() -> None:
        async for _ in stream:
            started.set()

    reader = asyncio.create_task(read())
    await started.wait()  # the reader now waits inside the stream
    await stream.close()
    (outcome,) = await asyncio.gather(asyncio.wait_for(reader, 10), return_exceptions=True)
    assert outcome is None or isinstance(outcome, openai.APIConnectionError), outcome
    exchange = upstream.exchanges[-1]
    assert upstream.wait_closed(exchange) and exchange.disconnected and not exchange.completed
    assert gates_closed(stream)


def test_parse_answers_a_blocked_prompt_with_a_parsed_completion(upstream, bare, guard):
    before = len(upstream.exchanges)
    refused = guard(bare, on_unsafe="rewrite").chat.completions.parse(model="fake-model", messages=UNSAFE_USER)
    assert isinstance(refused, ParsedChatCompletion)
    message = refused.choices[0].message
    assert isinstance(message, ParsedChatCompletionMessage) and message.parsed is None
    assert message.content == DEFAULT_REFUSAL and refused.choices[0].finish_reason == "content_filter"
    assert len(upstream.exchanges) == before


def test_closing_the_guarded_client_closes_the_original_as_with_options_copies_do(upstream, bare, guard):
    upstream.push(Script(body=chat_completion([SAFE_ANSWER])))
    with guard(bare) as client:
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": SAFE_PROMPT}])
    assert client.is_closed() and bare.is_closed()


# Gen as the only guard: a stream is held until Gen has judged each choice whole.


def pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [words[0], *(" " + w for w in words[1:])]


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_a_gen_only_guard_holds_a_stream_until_gen_has_judged_it(upstream, bare, gen_guard, endpoint):
    client = guard_openai(bare, stream_guard=None, gen_guard=gen_guard, on_unsafe="rewrite", prompt_check="off")
    events = chat_events if endpoint == "chat" else responses_events
    upstream.push(Script(events=events(pieces(SAFE_ANSWER))), Script(events=events(pieces(SAFE_ANSWER))),
                  Script(events=events(pieces(UNSAFE_ANSWER))))

    def ask(c: OpenAI, prompt: str) -> list[Any]:
        if endpoint == "chat":
            return list(stream_chat(c, messages=[{"role": "user", "content": prompt}]))
        return list(c.responses.create(model="fake-model", input=prompt, stream=True))

    assert dumps(ask(client, SAFE_PROMPT)) == dumps(ask(bare, SAFE_PROMPT))
    refused = ask(client, UNSAFE_PROMPT)
    shown = text_of(refused) if endpoint == "chat" else "".join(e.delta for e in refused if e.type == "response.output_text.delta")
    assert shown == DEFAULT_REFUSAL and "fuse" not in repr(refused)


def test_a_rewritten_choice_loses_the_tool_calls_held_behind_its_text(upstream, bare, stream_guard):
    upstream.push(Script(events=chat_events(UNSAFE_PIECES, tool_call={"name": "search", "arguments": '{"q": "x"}'})))
    chunks = list(stream_chat(guard_openai(bare, stream_guard=stream_guard, gen_guard=None, on_unsafe="rewrite")))
    assert text_of(chunks).endswith(DEFAULT_REFUSAL) and chunks[-1].choices[0].finish_reason == "content_filter"
    assert not [c for chunk in chunks for c in chunk.choices if c.delta.tool_calls or c.delta.function_call]


# Requests: what parse() sends, history stored upstream, raw bodies.


def test_parse_judges_the_schema_a_pydantic_class_becomes(upstream, bare, abare, stream_guard):
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        steps: str = Field(description=PLANTED_UNSAFE_PROMPT)

    before = len(upstream.exchanges)
    client, aclient = (guard_openai(c, stream_guard=stream_guard, gen_guard=None) for c in (bare, abare))
    for call in (lambda: client.chat.completions.parse(model="fake-model", messages=USER, response_format=Answer),
                 lambda: client.responses.parse(model="fake-model", input=PLANTED_SAFE_PROMPT, text_format=Answer),
                 lambda: asyncio.run(aclient.chat.completions.parse(model="fake-model", messages=USER, response_format=Answer))):
        with pytest.raises(UnsafeContentError, match="prompt blocked"):
            call()
    assert len(upstream.exchanges) == before


def test_a_blocked_stored_response_cannot_be_continued_and_conversations_are_refused(upstream, bare, stream_guard):
    client = guard_openai(bare, stream_guard=stream_guard, gen_guard=None, on_unsafe="rewrite")
    upstream.push(Script(body=responses_body("".join(UNSAFE_PIECES))), Script(body=responses_body(SAFE_ANSWER)))
    refused = client.responses.create(model="fake-model", input=PLANTED_SAFE_PROMPT)
    assert refused.status == "incomplete" and refused.id == "resp_fake"
    before = len(upstream.exchanges)
    other = guard_openai(bare, stream_guard=stream_guard, gen_guard=None)  # any guard of the process knows it
    with pytest.raises(ValueError, match="'resp_fake' is a response .or an item of one. Qwen3Guard blocked"):
        other.responses.create(model="fake-model", input="go on", previous_response_id=refused.id)
    with pytest.raises(ValueError, match="'msg_fake' is a response .or an item of one. Qwen3Guard blocked"):
        client.responses.create(model="fake-model", input=[{"type": "item_reference", "id": "msg_fake"}])
    with pytest.raises(ValueError, match="'conversation' makes the response read and extend history stored upstream"):
        client.responses.create(model="fake-model", input="go on", conversation="conv_1")
    assert len(upstream.exchanges) == before
    assert client.responses.create(model="fake-model", input="go on", previous_response_id="resp_other").status == "completed"
    OpenAIGuard.refused.clear()  # the memory is the process's: leave none for other tests


def test_a_raw_response_header_in_the_clients_defaults_is_refused(upstream, bare, stream_guard):
    raw = bare.with_options(default_headers={"X-Stainless-Raw-Response": "true"})
    client, before = guard_openai(raw, stream_guard=stream_guard, gen_guard=None), len(upstream.exchanges)
    for stream in (False, True):
        with pytest.raises(NotImplementedError, match="raw HTTP bodies"):
            client.chat.completions.create(model="fake-model", messages=USER, stream=stream)
    assert len(upstream.exchanges) == before


def test_a_blocked_call_survives_pickling(upstream, bare, stream_guard):
    import pickle

    upstream.push(Script(body=chat_completion("".join(UNSAFE_PIECES))))
    with pytest.raises(UnsafeContentError) as raised:
        guard_openai(bare, stream_guard=stream_guard, gen_guard=None).chat.completions.create(model="fake-model", messages=USER)
    copy = pickle.loads(pickle.dumps(raised.value))
    assert type(copy) is UnsafeContentError and str(copy) == str(raised.value)
    assert copy.verdict == raised.value.verdict and copy.choice_index == 0 and copy.decision.action is Action.BLOCK


# Replies: every part a caller may render is judged; structured answers by what their JSON says.


def test_responses_parts_of_any_text_type_are_judged_and_unknown_items_refused(upstream, bare, stream_guard):
    client = guard_openai(bare, stream_guard=stream_guard, gen_guard=None, on_unsafe="rewrite")
    for part in ({"type": "text", "text": "".join(UNSAFE_PIECES)}, {"text": "".join(UNSAFE_PIECES)}):
        body = responses_body("x")
        body["output"][0]["content"] = [part]
        upstream.push(Script(body=body))
        reply = client.responses.create(model="fake-model", input=PLANTED_SAFE_PROMPT)
        assert reply.status == "incomplete" and "bomb" not in reply.model_dump_json(warnings=False)
    body = responses_body("x")
    body["output"] = [{"type": "assistant_message", "id": "a", "text": "".join(UNSAFE_PIECES)}]
    upstream.push(Script(body=body))
    with pytest.raises(MalformedReplyError, match="output item 0 of type 'assistant_message', which Qwen3Guard cannot judge"):
        client.responses.create(model="fake-model", input=PLANTED_SAFE_PROMPT)


def escaped(text: str) -> str:
    return '{"steps": "' + text.replace(" ", "\\u0020") + '"}'


def test_a_structured_answer_is_judged_by_what_its_json_says(upstream, bare, stream_guard):
    client = guard_openai(bare, stream_guard=stream_guard, gen_guard=None, on_unsafe="rewrite")
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
    source = escaped("".join(UNSAFE_PIECES))
    assert "pipe bomb" not in source
    cut = source[:-2]  # cut off by max_tokens: no longer a JSON document, its escapes are still decoded
    upstream.push(Script(body=chat_completion(source)), Script(body=chat_completion(cut)))
    for _ in range(2):
        whole = client.chat.completions.create(model="fake-model", messages=USER, response_format=schema).choices[0].message
        assert whole.content is None and whole.refusal == DEFAULT_REFUSAL  # a parser reads content as JSON
    upstream.push(Script(events=chat_events([source[:20], source[20:40], source[40:]])))
    chunks = list(stream_chat(client, response_format=schema))
    # Held whole: none of the JSON went out before it was judged; the refusal comes as a refusal.
    assert text_of(chunks) == "" and "".join(c.delta.refusal or "" for ch in chunks for c in ch.choices) == DEFAULT_REFUSAL
    upstream.push(Script(events=chat_events([escaped("Preheat the oven.")])))
    assert json.loads(text_of(list(stream_chat(client, response_format=schema)))) == {"steps": "Preheat the oven."}


def test_openais_stream_helpers_free_the_guard_sessions_when_they_close(upstream, bare, abare, stream_guard):
    client, aclient = (guard_openai(c, stream_guard=stream_guard, gen_guard=None) for c in (bare, abare))
    upstream.push(Script(events=chat_events(SAFE_PIECES + TAIL)), Script(events=chat_events(SAFE_PIECES + TAIL)))
    with client.chat.completions.stream(model="fake-model", messages=USER) as helper:
        next(iter(helper))
        guarded = helper._raw_stream
    assert guarded._streamed.items.relay.gates and gates_closed(guarded)

    async def go() -> Any:
        async with aclient.chat.completions.stream(model="fake-model", messages=USER) as helper:
            await helper.__aiter__().__anext__()
            return helper._raw_stream

    guarded = asyncio.run(go())
    assert gates_closed(guarded)
