"""The protocol-neutral pieces the client wrapper and the proxy share (no models needed)."""

from __future__ import annotations

import pytest
from openai.types.chat import ChatCompletionChunk

from guard_core import RiskLevel, Verdict
from integrations.openai_proxy import Moderator, chat_conversation, responses_conversation
from integrations.openai_proxy.chunks import cut_choice, refusal_chunks, responses_refusal_events
from integrations.openai_proxy.moderation import annotation


def test_chat_conversation_keeps_what_qwen3guard_reads_up_to_the_last_user_turn() -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "sunny"},
        {"role": "assistant", "content": [{"type": "text", "text": "Sunny."}]},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "tomorrow?"}]},
        {"role": "assistant", "content": "Prefill"},
    ]
    assert chat_conversation(messages) == [
        {"role": "system", "content": "Be brief.\n\nBe kind."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "And\ntomorrow?"},
    ]


def test_conversations_fail_closed() -> None:
    with pytest.raises(ValueError, match="no user turn"):
        chat_conversation([{"role": "system", "content": "hi"}])
    with pytest.raises(ValueError, match="only text parts"):
        chat_conversation([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_responses_conversation_reads_input_and_instructions() -> None:
    assert responses_conversation("Hi", "Be brief.") == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    items = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Q1"}]},
        {"type": "function_call_output", "call_id": "c", "output": "42"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "A1"}]},
        {"role": "user", "content": "Q2"},
    ]
    assert responses_conversation(items) == [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                                             {"role": "user", "content": "Q2"}]


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
    verdict = Verdict(RiskLevel.UNSAFE, role="response")
    text, end = refusal_chunks(_chunk([]), 3, "No.", annotation(response=verdict, index=3))
    assert (text.id, text.choices[0].index, text.choices[0].delta.content) == ("c1", 3, "No.")
    assert end.choices[0].finish_reason == "content_filter" and end.qwen3guard == {"response": verdict.to_dict(), "index": 3}


def test_responses_refusal_events_form_a_complete_stream() -> None:
    events = responses_refusal_events(None, item_id="m1", output_index=0, content_index=0, delivered="", text="No.",
                                      prior=[], sequence=0, note={}, model="m", opened=False)
    assert [e.type for e in events] == [
        "response.created", "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(8))
    assert events[-1].response.output_text == "No." and events[-1].response.incomplete_details.reason == "content_filter"


def test_moderator_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="on_unsafe"):
        Moderator(on_unsafe="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="holdback_tokens"):
        Moderator(holdback_tokens=-1)
    assert Moderator().refusal_text("partial") == "\n\n" + Moderator().refusal_message
