"""QwenGuardRunnable in LCEL chains built from real langchain-core classes."""

from __future__ import annotations

import asyncio
from typing import Any, Iterator

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompt_values import ChatPromptValue
from langchain_core.prompts import ChatPromptTemplate

from guard_core import Action, GuardViolation, Policy, RiskLevel
from guard_core.stream import StreamGuard
from guard_core.testing.cases import SAFE_ANSWER, SAFE_PROMPT, UNSAFE_ANSWER, UNSAFE_PROMPT
from guard_core.testing.stream_fixture import (
    PLANTED_CONTROVERSIAL_TEXT,
    PLANTED_SAFE_PROMPT,
    PLANTED_SAFE_TEXT,
    PLANTED_UNSAFE_PROMPT,
)
from integrations.langchain import DEFAULT_REFUSAL, GUARD_EVENT, METADATA_KEY, QwenGuardRunnable

UNSAFE_REPLY = "Sure, take a pipe bomb. Then light it."
#: With the default hold-back the chunk carrying " pipe" is still held when " bomb" blocks.
SAFE_PREFIX = ["Sure,", " ", "take", " ", "a"]


def model(text: str) -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(content=text)]))


def prompt() -> ChatPromptTemplate:
    return ChatPromptTemplate.from_messages([("human", "{question}")])


def collect(stream: Any) -> tuple[list[Any], BaseException | None]:
    got: list[Any] = []
    try:
        for chunk in stream:
            got.append(chunk)
    except GuardViolation as exc:
        return got, exc
    return got, None


async def acollect(stream: Any) -> tuple[list[Any], BaseException | None]:
    got: list[Any] = []
    try:
        async for chunk in stream:
            got.append(chunk)
    except GuardViolation as exc:
        return got, exc
    return got, None


def test_stream_stops_before_the_unsafe_chunk(stream_guard: StreamGuard) -> None:
    chain = prompt() | model(UNSAFE_REPLY) | QwenGuardRunnable(stream_guard=stream_guard) | StrOutputParser()
    got, exc = collect(chain.stream({"question": PLANTED_SAFE_PROMPT}))
    assert got == SAFE_PREFIX
    assert isinstance(exc, GuardViolation) and exc.verdict.risk is RiskLevel.UNSAFE


def test_astream_stops_before_the_unsafe_chunk(stream_guard: StreamGuard) -> None:
    chain = model(UNSAFE_REPLY) | StrOutputParser() | QwenGuardRunnable(stream_guard=stream_guard)
    got, exc = asyncio.run(acollect(chain.astream(PLANTED_SAFE_PROMPT)))
    assert got == SAFE_PREFIX and isinstance(exc, GuardViolation)


def test_safe_stream_passes_unchanged_in_the_same_chunks(stream_guard: StreamGuard) -> None:
    plain = list(model(PLANTED_SAFE_TEXT).stream(PLANTED_SAFE_PROMPT))
    guarded = list((model(PLANTED_SAFE_TEXT) | QwenGuardRunnable(stream_guard=stream_guard)).stream(PLANTED_SAFE_PROMPT))
    assert [c.content for c in guarded] == [c.content for c in plain]
    assert all(isinstance(c, AIMessageChunk) for c in guarded)
    agen = model(PLANTED_SAFE_TEXT) | StrOutputParser() | QwenGuardRunnable(stream_guard=stream_guard)
    got, exc = asyncio.run(acollect(agen.astream(PLANTED_SAFE_PROMPT)))
    assert exc is None and got == [c.content for c in plain]


def test_transform_releases_chunks_before_the_stream_ends(stream_guard: StreamGuard) -> None:
    words = PLANTED_SAFE_TEXT.split(" ")
    consumed = 0

    def source() -> Iterator[str]:
        nonlocal consumed
        for i, word in enumerate(words):
            consumed += 1
            yield word if i == 0 else " " + word

    out = QwenGuardRunnable(stream_guard=stream_guard).transform(source())
    first = next(out)
    assert first == words[0] and consumed < len(words) // 2
    assert first + "".join(out) == PLANTED_SAFE_TEXT


def test_replace_mode_streams_the_refusal(stream_guard: StreamGuard) -> None:
    guard = QwenGuardRunnable(stream_guard=stream_guard, on_violation="replace", refusal="No.")
    got = list((model(UNSAFE_REPLY) | guard | StrOutputParser()).stream(PLANTED_SAFE_PROMPT))
    assert got == [*SAFE_PREFIX, "No."]
    replaced = guard.invoke(AIMessage(content=UNSAFE_REPLY))
    assert isinstance(replaced, AIMessage) and replaced.content == "No."
    assert replaced.response_metadata[METADATA_KEY]["risk"] == "Unsafe"
    assert QwenGuardRunnable(stream_guard=stream_guard, on_violation="replace").invoke(UNSAFE_REPLY) == DEFAULT_REFUSAL


def test_pass_mode_attaches_the_verdict(stream_guard: StreamGuard) -> None:
    guard = QwenGuardRunnable(stream_guard=stream_guard, on_violation="pass")
    out = guard.invoke(AIMessage(content=UNSAFE_REPLY))
    assert out.content == UNSAFE_REPLY and out.response_metadata[METADATA_KEY]["risk"] == "Unsafe"
    chunks = list((model(UNSAFE_REPLY) | guard).stream(PLANTED_SAFE_PROMPT))
    joined = sum(chunks[1:], chunks[0])
    assert joined.content == UNSAFE_REPLY and joined.response_metadata[METADATA_KEY]["categories"] == ["Violent"]


def test_flagged_verdicts_pass_with_the_verdict_attached(stream_guard: StreamGuard) -> None:
    guard = QwenGuardRunnable(stream_guard=stream_guard, policy=Policy(actions={RiskLevel.CONTROVERSIAL: Action.FLAG}))
    text = "They say it was a" + PLANTED_CONTROVERSIAL_TEXT + "."
    out = guard.invoke(AIMessage(content=text))
    assert out.content == text and out.response_metadata[METADATA_KEY]["risk"] == "Controversial"


@pytest.mark.parametrize(
    "value",
    [
        UNSAFE_REPLY,
        AIMessage(content=UNSAFE_REPLY),
        AIMessageChunk(content=UNSAFE_REPLY),
        ChatPromptValue(messages=[HumanMessage(content=PLANTED_SAFE_PROMPT), AIMessage(content=UNSAFE_REPLY)]),
        [("human", PLANTED_SAFE_PROMPT), ("ai", [{"type": "text", "text": UNSAFE_REPLY}])],
    ],
    ids=["str", "message", "chunk", "prompt-value", "message-list"],
)
def test_accepts_strings_messages_prompt_values_and_chunks(stream_guard: StreamGuard, value: Any) -> None:
    guard = QwenGuardRunnable(stream_guard=stream_guard)
    with pytest.raises(GuardViolation):
        guard.invoke(value)
    safe = AIMessage(content=PLANTED_SAFE_TEXT)
    assert guard.invoke(safe) is safe


@pytest.mark.parametrize("value", [42, {"question": "hi"}, "   ", [("human", "hi")]])
def test_bad_input_is_a_value_error(stream_guard: StreamGuard, value: Any) -> None:
    with pytest.raises(ValueError):
        QwenGuardRunnable(stream_guard=stream_guard).invoke(value)


def test_bad_configuration_is_a_value_error(stream_guard: StreamGuard) -> None:
    with pytest.raises(ValueError):
        QwenGuardRunnable()
    with pytest.raises(ValueError):
        QwenGuardRunnable(role="prompt", stream_guard=stream_guard, on_violation="replace")
    with pytest.raises(ValueError):
        QwenGuardRunnable(stream_guard=stream_guard, holdback_tokens=-1)


def test_input_guard_blocks_before_the_model_and_passes_safe_input(gen_guard: Any, stream_guard: StreamGuard) -> None:
    chat_model = model(SAFE_ANSWER)
    guard_in = QwenGuardRunnable(role="prompt", gen_guard=gen_guard)
    chain = guard_in | prompt() | chat_model | QwenGuardRunnable(stream_guard=stream_guard) | StrOutputParser()
    with pytest.raises(GuardViolation) as info:
        chain.invoke({"question": UNSAFE_PROMPT})
    assert info.value.verdict.role == "prompt"
    assert next(chat_model.messages, None) is not None
    chat_model.messages = iter([AIMessage(content=SAFE_ANSWER)])
    assert "".join(chain.stream({"question": SAFE_PROMPT})) == SAFE_ANSWER


def test_stream_prompt_head_guards_input(stream_guard: StreamGuard) -> None:
    guard_in = QwenGuardRunnable(role="prompt", stream_guard=stream_guard, input_key="question")
    with pytest.raises(GuardViolation):
        guard_in.invoke({"question": PLANTED_UNSAFE_PROMPT, "style": "short"})
    safe = {"question": PLANTED_SAFE_PROMPT}
    assert asyncio.run(guard_in.ainvoke(safe)) is safe


def test_batch_keeps_verdicts_apart(gen_guard: Any) -> None:
    guard_in = QwenGuardRunnable(role="prompt", gen_guard=gen_guard)
    out = guard_in.batch([{"q": SAFE_PROMPT}, {"q": UNSAFE_PROMPT}, {"q": SAFE_PROMPT}], return_exceptions=True)
    assert out[0] == {"q": SAFE_PROMPT} and out[2] == {"q": SAFE_PROMPT}
    assert isinstance(out[1], GuardViolation)
    guard_out = QwenGuardRunnable(gen_guard=gen_guard)
    answers = [[("human", UNSAFE_PROMPT), ("ai", UNSAFE_ANSWER)], [("human", SAFE_PROMPT), ("ai", SAFE_ANSWER)]]
    unsafe, safe = guard_out.batch(answers, return_exceptions=True)
    assert isinstance(unsafe, GuardViolation) and unsafe.verdict.role == "response"
    assert safe == answers[1]


def test_concurrent_abatch_keeps_verdicts_apart(stream_guard: StreamGuard) -> None:
    guard = QwenGuardRunnable(stream_guard=stream_guard, on_violation="pass")
    inputs = [AIMessage(content=t) for t in (PLANTED_SAFE_TEXT, UNSAFE_REPLY) * 3]
    out = asyncio.run(guard.abatch(inputs))
    risks = [m.response_metadata.get(METADATA_KEY, {}).get("risk") for m in out]
    assert risks == [None, "Unsafe"] * 3
    assert [m.content for m in out] == [m.content for m in inputs]


def test_verdicts_show_up_in_astream_events(stream_guard: StreamGuard) -> None:
    chain = model(PLANTED_SAFE_TEXT) | QwenGuardRunnable(stream_guard=stream_guard).with_config(run_name="guard")

    async def events() -> list[dict[str, Any]]:
        return [e async for e in chain.astream_events(PLANTED_SAFE_PROMPT, version="v2") if e["event"] == "on_custom_event"]

    (event,) = asyncio.run(events())
    assert event["name"] == GUARD_EVENT
    assert event["data"]["role"] == "response" and event["data"]["verdict"]["risk"] == "Safe"
