"""guard_openai on what upstreams really send: text outside the deltas, odd or broken chunks, other text channels.

Every model-written text the caller is shown is judged wherever it arrives (deltas, done events,
whole parts, items and responses; content and refusal); a reply the guard cannot read raises
``MalformedReplyError`` (one line) with nothing unjudged delivered; what carries nothing to judge
reaches the caller as the bare client reads it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import AsyncOpenAI, OpenAI
from openai_fake_upstream import (
    SAFE_PIECES,
    UNSAFE_PIECES,
    Script,
    chat_chunk,
    chat_completion,
    chat_events,
    responses_body,
    responses_events,
)

from guard_core import Action, Category, Policy
from guard_core.testing.cases import UNSAFE_ANSWER, UNSAFE_PROMPT
from guard_core.testing.stream_fixture import PLANTED_SAFE_PROMPT
from integrations.openai_proxy import DEFAULT_REFUSAL, MalformedReplyError, UnsafeContentError

USER = [{"role": "user", "content": PLANTED_SAFE_PROMPT}]
UNSAFE_TEXT = "".join(UNSAFE_PIECES)
#: Gen blocks the trained unsafe prompt; flagging its category lets the request through so the answer decides.
ASK_ANYWAY = Policy(category_actions={Category.VIOLENT: Action.FLAG})


def whole_events_only(pieces: list[str]) -> list[Any]:
    """response.created, then response.completed carrying the whole text: no delta at all."""
    events = responses_events(pieces)
    return [events[0], events[-1]]


def without_deltas(pieces: list[str]) -> list[Any]:
    """The full event list with the output_text.delta events left out (text only in done / part / item / response)."""
    return [e for e in responses_events(pieces) if e["type"] != "response.output_text.delta"]


SHAPES = [whole_events_only, without_deltas]


def dumps(items: list[Any]) -> list[str]:
    return [i.model_dump_json() for i in items]


def read(stream: Any) -> tuple[list[Any], Exception | None]:
    got: list[Any] = []
    try:
        for item in stream:
            got.append(item)
    except Exception as exc:  # the tests look at what was raised
        return got, exc
    return got, None


def respond(client: OpenAI, **kwargs: Any) -> Any:
    return client.responses.create(model="fake-model", input=PLANTED_SAFE_PROMPT, stream=True, **kwargs)


def chat(client: OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(model="fake-model", messages=USER, stream=True, **kwargs)


def gates_closed(stream: Any) -> bool:
    return all(gate.session.closed for gate in stream._streamed.items.relay.gates.values())


# Responses: text that never comes as an output_text delta


@pytest.mark.parametrize("shape", SHAPES, ids=lambda f: f.__name__)
def test_responses_text_outside_the_deltas_is_judged_before_it_is_released(upstream, bare, guard, shape):
    upstream.push(Script(events=shape(UNSAFE_PIECES)))
    got, error = read(respond(guard(bare)))
    assert isinstance(error, UnsafeContentError) and error.verdict.categories == (Category.VIOLENT,)
    assert error.delivered == "" and "pipe" not in json.dumps([e.model_dump() for e in got])

    upstream.push(Script(events=shape(UNSAFE_PIECES)))
    events = list(respond(guard(bare, on_unsafe="rewrite")))
    assert "pipe" not in json.dumps([e.model_dump() for e in events])
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == DEFAULT_REFUSAL
    assert events[-1].response.incomplete_details.reason == "content_filter"
    # The caller is told of the refusal's item and part exactly once, before its text.
    types = [e.type for e in events]
    assert types.count("response.output_item.added") == types.count("response.content_part.added") == 1
    assert types.index("response.content_part.added") < types.index("response.output_text.delta")
    assert [e.sequence_number for e in events] == sorted({e.sequence_number for e in events})


@pytest.mark.parametrize("shape", SHAPES, ids=lambda f: f.__name__)
def test_responses_safe_text_outside_the_deltas_passes_unchanged(upstream, bare, guard, shape):
    upstream.push(Script(events=shape(SAFE_PIECES)), Script(events=shape(SAFE_PIECES)))
    plain = list(respond(bare))
    stream = respond(guard(bare))
    assert dumps(list(stream)) == dumps(plain)
    assert set(stream.decisions) == {(0, 0)} and stream.decisions[(0, 0)].action is Action.ALLOW


def test_responses_rewritten_stream_is_consistent_for_openais_stream_helper(upstream, bare, guard):
    upstream.push(Script(events=whole_events_only(UNSAFE_PIECES)))
    with guard(bare, on_unsafe="rewrite").responses.stream(model="fake-model", input=PLANTED_SAFE_PROMPT) as stream:
        events = list(stream)  # the helper accumulates every event and asserts each delta's part exists
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == DEFAULT_REFUSAL and events[-1].type == "response.incomplete"


def test_a_rewritten_shim_stream_never_opens_a_part_after_its_deltas(upstream, bare, guard):
    """Some Responses shims send deltas alone (no ``response.created`` / ``*.added``): the refusal must
    not announce, after the caller saw a delta of it, a part that was open all along."""
    deltas = [{"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": d} for d in UNSAFE_PIECES]
    upstream.push(Script(events=[*deltas, {"type": "response.completed", "response": {"id": "r", "output": [], "status": "completed"}}]))
    events = list(respond(guard(bare, on_unsafe="rewrite")))
    types = [e.type for e in events]
    assert types[0] == "response.output_text.delta" and events[0].delta == UNSAFE_PIECES[0]
    assert not {"response.created", "response.output_item.added", "response.content_part.added"} & set(types)
    assert types[-1] == "response.incomplete" and "pipe" not in json.dumps([e.model_dump() for e in events])


def test_responses_final_text_longer_than_the_deltas_is_judged_and_a_contradicting_one_refused(upstream, bare, guard):
    safe = "".join(SAFE_PIECES)
    longer = responses_events(SAFE_PIECES)
    for event in longer:
        if event["type"] == "response.output_text.done":
            event["text"] = safe + " Then take a pipe bomb."
    upstream.push(Script(events=longer))
    got, error = read(respond(guard(bare)))
    assert isinstance(error, UnsafeContentError)
    assert "pipe" not in json.dumps([e.model_dump() for e in got])

    contradicting = responses_events(SAFE_PIECES)
    contradicting[-1]["response"]["output"][0]["content"][0]["text"] = UNSAFE_TEXT
    upstream.push(Script(events=contradicting))
    stream = respond(guard(bare))
    got, error = read(stream)
    assert isinstance(error, MalformedReplyError) and "\n" not in str(error)
    assert "contradicts the deltas" in str(error)
    assert "pipe" not in json.dumps([e.model_dump() for e in got]) and gates_closed(stream)


def test_responses_refusal_parts_are_judged_like_output_text(upstream, bare, guard):
    upstream.push(Script(events=responses_events(SAFE_PIECES, refusal=True)),
                  Script(events=responses_events(SAFE_PIECES, refusal=True)))
    assert dumps(list(respond(guard(bare)))) == dumps(list(respond(bare)))

    upstream.push(Script(events=responses_events(UNSAFE_PIECES, refusal=True)))
    got, error = read(respond(guard(bare)))
    assert isinstance(error, UnsafeContentError) and error.delivered == "Sure, here is how: take a"

    upstream.push(Script(events=responses_events(UNSAFE_PIECES, refusal=True)))
    events = list(respond(guard(bare, on_unsafe="rewrite")))
    assert "pipe" not in json.dumps([e.model_dump() for e in events])
    done = next(e for e in events if e.type == "response.refusal.done")
    assert done.refusal == "Sure, here is how: take a\n\n" + DEFAULT_REFUSAL
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output[0].content[0].type == "refusal"


@pytest.mark.parametrize("payload", ["[1,2]", "5", {"type": "response.output_text.delta", "delta": 5, "output_index": 0,
                                                    "content_index": 0, "item_id": "m"},
                                     {"type": "response.output_text.delta", "delta": " pipe bomb"}, {"no": "type"}])
def test_responses_events_the_guard_cannot_read_are_refused(upstream, bare, guard, payload):
    events = responses_events(SAFE_PIECES)
    upstream.push(Script(events=[*events[:5], payload, *events[5:]]))
    got, error = read(respond(guard(bare)))
    assert isinstance(error, MalformedReplyError) and "\n" not in str(error), error
    assert "pipe" not in json.dumps([e.model_dump() for e in got if hasattr(e, "model_dump")])


def test_a_whole_response_is_judged_on_its_refusal_parts_too(upstream, bare, guard):
    body = responses_body("")
    body["output"][0]["content"] = [{"type": "refusal", "refusal": UNSAFE_ANSWER}]
    upstream.push(Script(body=body))
    client = guard(bare, on_unsafe="rewrite", prompt_policy=ASK_ANYWAY)
    refused = client.responses.create(model="fake-model", input=UNSAFE_PROMPT)
    assert refused.output_text == DEFAULT_REFUSAL and refused.qwen3guard["response"]["risk"] == "Unsafe"
    assert UNSAFE_ANSWER not in refused.model_dump_json()

    bad = responses_body("x")
    bad["output"][0]["content"][0]["text"] = 5
    upstream.push(Script(body=bad))
    with pytest.raises(MalformedReplyError, match="not a string"):
        client.responses.create(model="fake-model", input=UNSAFE_PROMPT)


# Chat completions: odd and broken chunks


#: Chunks that carry nothing to judge: the caller gets them as the bare client reads them.
NOTHING_TO_JUDGE = {
    "no choices": {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": "fake-model"},
    "null choices": chat_chunk(None),  # type: ignore[arg-type]
    "null delta": chat_chunk([{"index": 0, "delta": None, "finish_reason": None}]),
}


@pytest.mark.parametrize("odd", NOTHING_TO_JUDGE.values(), ids=NOTHING_TO_JUDGE.keys())
def test_chunks_with_nothing_to_judge_pass_like_the_bare_client_reads_them(upstream, bare, guard, odd):
    events = chat_events(SAFE_PIECES)
    events = [*events[:3], odd, *events[3:]]
    upstream.push(Script(events=events), Script(events=events))
    plain = list(chat(bare))
    assert dumps(list(chat(guard(bare)))) == dumps(plain)


def _finished_then(text: str) -> list[Any]:
    events = chat_events(SAFE_PIECES[:2], done=False)
    return [*events, chat_chunk([{"index": 0, "delta": {"content": text}, "finish_reason": None}]), "[DONE]"]


#: Replies the guard cannot judge as they stand, with the words the error says.
BROKEN = {
    "content 5": ([chat_chunk([{"index": 0, "delta": {"content": 5}, "finish_reason": None}])], "as int, not a string"),
    "no index": ([chat_chunk([{"delta": {"content": " pipe bomb"}, "finish_reason": None}])], "no integer 'index'"),
    "string index": ([chat_chunk([{"index": "0", "delta": {"content": "hi"}, "finish_reason": None}])], "no integer 'index'"),
    "unasked choice": ([chat_chunk([{"index": 3, "delta": {"content": "hi"}, "finish_reason": None}])], "choice 3"),
    "list payload": (["[1,2]"], "not a chat.completion.chunk"),
    "number payload": (["5"], "not a chat.completion.chunk"),
    "choices not a list": ([chat_chunk(5)], "not a list"),  # type: ignore[arg-type]
    "delta not an object": ([chat_chunk([{"index": 0, "delta": "hi", "finish_reason": None}])], "not an object"),
    "lone surrogate": (['{"choices": [{"index": 0, "delta": {"content": "\\ud800"}}]}'], "lone surrogate"),
    "choice twice": ([chat_chunk([{"index": 0, "delta": {"content": "a"}}, {"index": 0, "delta": {"content": " pipe bomb"}}])],
                     "choice 0 twice"),
}


@pytest.mark.parametrize("inserted, words", BROKEN.values(), ids=BROKEN.keys())
async def test_chunks_the_guard_cannot_read_raise_malformed_reply_error(upstream, bare, guard, inserted, words):
    events = chat_events(SAFE_PIECES[:2], done=False)
    upstream.push(Script(events=[*events[:2], *inserted, *events[2:], "[DONE]"]))
    stream = chat(guard(bare))
    got, error = read(stream)
    assert isinstance(error, MalformedReplyError), error
    assert words in str(error) and "\n" not in str(error)
    assert "pipe" not in json.dumps([c.model_dump() for c in got]) and gates_closed(stream)

    upstream.push(Script(events=[*events[:2], *inserted, *events[2:], "[DONE]"]))
    aclient = guard(AsyncOpenAI(base_url=upstream.base_url, api_key="sk-test", max_retries=0))
    with pytest.raises(MalformedReplyError, match=words):
        async for _ in await aclient.chat.completions.create(model="fake-model", messages=USER, stream=True):
            pass


def test_text_after_finish_reason_is_an_upstream_fault_not_an_internal_error(upstream, bare, guard):
    upstream.push(Script(events=_finished_then(" take a pipe bomb")))
    got, error = read(chat(guard(bare)))
    assert isinstance(error, MalformedReplyError) and "after its finish_reason" in str(error)
    assert "pipe" not in json.dumps([c.model_dump() for c in got])
    # An empty delta after the finish is nothing to judge and passes.
    upstream.push(Script(events=_finished_then("")), Script(events=_finished_then("")))
    assert dumps(list(chat(guard(bare)))) == dumps(list(chat(bare)))


def test_chat_refusal_deltas_are_judged_like_content(upstream, bare, guard):
    def refusal_events(pieces: list[str]) -> list[Any]:
        events = chat_events(pieces)
        for event in events:
            if isinstance(event, dict) and "content" in event["choices"][0]["delta"] and event["choices"][0]["delta"]["content"]:
                event["choices"][0]["delta"] = {"refusal": event["choices"][0]["delta"]["content"]}
        return events

    upstream.push(Script(events=refusal_events(SAFE_PIECES)), Script(events=refusal_events(SAFE_PIECES)))
    assert dumps(list(chat(guard(bare)))) == dumps(list(chat(bare)))

    upstream.push(Script(events=refusal_events(UNSAFE_PIECES)))
    got, error = read(chat(guard(bare)))
    assert isinstance(error, UnsafeContentError) and error.delivered == "Sure, here is how: take a"
    assert "pipe" not in json.dumps([c.model_dump() for c in got])

    upstream.push(Script(events=refusal_events(UNSAFE_PIECES)))
    got = list(chat(guard(bare, on_unsafe="rewrite")))
    assert "pipe" not in json.dumps([c.model_dump() for c in got])
    assert "".join(c.delta.refusal or "" for chunk in got for c in chunk.choices) == "Sure, here is how: take a"
    assert got[-1].choices[0].finish_reason == "content_filter"


def test_reasoning_and_tool_call_arguments_pass_through_unjudged_as_documented(upstream, bare, guard):
    events = chat_events(SAFE_PIECES, tool_call={"name": "get_weather", "arguments": '{"city": "Paris"}'})
    events.insert(1, chat_chunk([{"index": 0, "delta": {"reasoning_content": "The user wants a recipe."}, "finish_reason": None}]))
    upstream.push(Script(events=events), Script(events=events))
    stream = chat(guard(bare))
    assert dumps(list(stream)) == dumps(list(chat(bare)))
    assert stream.decisions[0].action is Action.ALLOW  # the content was judged; the reasoning was not


def test_whole_completions_the_guard_cannot_read_raise_malformed_reply_error(upstream, bare, guard):
    client = guard(bare)
    for content, words in ((5, "as int, not a string"), ("\ud800", "lone surrogate")):
        body = chat_completion(["x"])
        body["choices"][0]["message"]["content"] = content
        upstream.push(Script(body=body))
        with pytest.raises(MalformedReplyError, match=words):
            client.chat.completions.create(model="fake-model", messages=USER)
    upstream.push(Script(body={**chat_completion(["x"]), "choices": [5]}))
    with pytest.raises(MalformedReplyError, match="no message in choice 0"):
        client.chat.completions.create(model="fake-model", messages=USER)


def test_a_whole_refusal_field_is_judged_and_a_refused_choice_keeps_nothing_else(upstream, bare, guard):
    body = chat_completion([""])
    body["choices"][0]["message"].update(content=None, refusal=UNSAFE_ANSWER, reasoning_content="my plan")
    upstream.push(Script(body=body))
    refused = guard(bare, on_unsafe="rewrite", prompt_policy=ASK_ANYWAY).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": UNSAFE_PROMPT}])
    message = refused.choices[0].message
    assert message.content == DEFAULT_REFUSAL and message.refusal is None
    assert refused.choices[0].finish_reason == "content_filter"
    assert UNSAFE_ANSWER not in refused.model_dump_json() and "my plan" not in refused.model_dump_json()
