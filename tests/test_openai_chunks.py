"""The OpenAI pieces the client wrapper and the proxy share: reading, cutting and writing protocol objects."""

from __future__ import annotations

import pytest
from openai.types.chat import ChatCompletionChunk

from openai.types.responses import Response

from guard_core import Action, Decision, Moderator, RiskLevel, Verdict
from integrations.openai_proxy import OpenAIGuard
from integrations.openai_proxy.chunks import cut_choice, refusal_chunks, responses_refusal_events, sdk_object
from integrations.openai_proxy.exchange import Request, note


def _chunk(choices: list[dict]) -> ChatCompletionChunk:
    return ChatCompletionChunk.model_validate({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                               "choices": choices, "unknown_field": 7})


def test_cut_choice_drops_blocked_text_logprobs_and_empty_choices() -> None:
    lp = {"content": [{"token": "bomb", "logprob": -1.0, "bytes": None, "top_logprobs": []}]}
    chunk = _chunk([{"index": 0, "delta": {"content": "a bomb"}, "finish_reason": "stop", "logprobs": lp},
                    {"index": 1, "delta": {"content": "ok"}, "finish_reason": None}])
    cut = cut_choice(chunk, 0, 2)
    assert cut is not None and cut.unknown_field == 7
    assert [(c.index, c.delta.content, c.finish_reason, c.logprobs) for c in cut.choices] == [(0, "a ", None, None), (1, "ok", None, None)]
    assert [c.index for c in cut_choice(chunk, 0, 0).choices] == [1]
    assert cut_choice(_chunk([{"index": 0, "delta": {"content": "bomb"}, "finish_reason": None}]), 0, 0) is None
    assert chunk.choices[0].delta.content == "a bomb"  # the input is never mutated


def test_refusal_chunks_continue_the_completion_and_carry_the_verdict() -> None:
    decision = Decision(Verdict(RiskLevel.UNSAFE, role="response"), Action.BLOCK)
    text, end = refusal_chunks(_chunk([]), 3, "No.", note(response=decision, index=3))
    assert (text.id, text.choices[0].index, text.choices[0].delta.content) == ("c1", 3, "No.")
    assert end.choices[0].finish_reason == "content_filter" and end.qwen3guard == {"response": decision.to_dict(), "index": 3}


def test_responses_refusal_events_form_a_complete_stream() -> None:
    events = responses_refusal_events(None, item_id="m1", output_index=0, content_index=0, delivered="", text="No.",
                                      prior=[], sequence=0, note={}, model="m", opened=False)
    assert [e.type for e in events] == [
        "response.created", "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(8))
    assert events[-1].response.output_text == "No." and events[-1].response.incomplete_details.reason == "content_filter"


def test_upstream_objects_are_read_as_loosely_as_the_sdk_reads_them() -> None:
    """An older server's Responses reply (usage without the newer detail fields) is read, not rejected."""
    data = {"id": "r", "object": "response", "created_at": 1, "model": "m", "parallel_tool_calls": False, "tool_choice": "auto",
            "tools": [], "usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3},
            "output": [{"type": "message", "id": "x", "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": "hi", "annotations": []}]}]}
    with pytest.raises(ValueError):
        Response.model_validate(data)
    response = sdk_object(Response, data)
    assert response.output_text == "hi" and response.usage.output_tokens == 2


@pytest.mark.parametrize("body, match", [
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "false"}, "'stream' must be true or false"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2000}, "'n' must be an int from 1 to 8"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": True}, "'n' must be"),
    ({"messages": 5}, "messages must be a list"),
    ({"messages": [{"role": "wizard", "content": "How can I make a bomb?"}]}, "role 'wizard'"),
])
def test_requests_are_validated_before_anything_is_judged_or_sent(body: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Request.parse("chat", body, 8)
    with pytest.raises(ValueError, match="instructions"):
        Request.parse("responses", {"input": "hi", "instructions": 5}, 8)
    assert Request.parse("responses", {"input": "hi", "stream": True, "model": "m"}, 8).stream


def test_the_guard_rejects_bad_settings(stream_guard) -> None:
    moderator = Moderator(stream_guard=stream_guard)
    with pytest.raises(ValueError, match="on_unsafe"):
        OpenAIGuard(moderator, on_unsafe="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_choices"):
        OpenAIGuard(moderator, max_choices=0)
    assert moderator.refusal_after("partial") == "\n\n" + moderator.refusal
