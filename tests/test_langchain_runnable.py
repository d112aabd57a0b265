"""QwenGuardRunnable in LCEL chains built from real langchain-core classes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
from langchain_core.documents import Document
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.output_parsers import JsonOutputParser, StrOutputParser
from langchain_core.prompt_values import ChatPromptValue
from langchain_core.prompts import ChatPromptTemplate
from pydantic import BaseModel

from langchain_helpers import acollect, collect
from guard_core import Action, Category, GuardViolation, Moderator, Policy, RiskLevel
from guard_core.stream import StreamGuard
from guard_core.testing.cases import JAILBREAK_PROMPT, SAFE_ANSWER, SAFE_PROMPT, UNSAFE_ANSWER, UNSAFE_PROMPT
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


def test_replace_mode_streams_the_refusal_set_apart_from_the_delivered_text(stream_guard: StreamGuard) -> None:
    guard = QwenGuardRunnable(stream_guard=stream_guard, on_violation="replace", refusal="No.")
    got = list((model(UNSAFE_REPLY) | guard | StrOutputParser()).stream(PLANTED_SAFE_PROMPT))
    assert got == [*SAFE_PREFIX, "\n\nNo."]
    chunks = list((model(UNSAFE_REPLY) | guard).stream(PLANTED_SAFE_PROMPT))
    assert chunks[-1].response_metadata[METADATA_KEY]["action"] == "block"
    replaced = guard.invoke(AIMessage(content=UNSAFE_REPLY))
    assert isinstance(replaced, AIMessage) and replaced.content == "No."
    assert replaced.response_metadata[METADATA_KEY]["risk"] == "Unsafe"
    assert QwenGuardRunnable(stream_guard=stream_guard, on_violation="replace").invoke(UNSAFE_REPLY) == DEFAULT_REFUSAL


def test_replace_mode_delivers_exactly_the_judged_text_before_the_refusal(stream_guard: StreamGuard) -> None:
    # One chunk carries judged text and the unsafe words: only its judged part is delivered.
    guard = QwenGuardRunnable(stream_guard=stream_guard, on_violation="replace", holdback_tokens=0)
    got = "".join(guard.transform(iter(["Sure, take a", " pipe bomb now."])))
    assert got == "Sure, take a\n\n" + DEFAULT_REFUSAL


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


@dataclass
class Note:
    """An object a chain returns: read by its fields."""

    text: str


class Answer(BaseModel):
    """A parsed answer (``with_structured_output``)."""

    text: str


@pytest.mark.parametrize("value,named", [(42, "int"), ([("human", "hi")], "messages")], ids=["int", "no-ai-turn"])
def test_an_answer_the_guard_cannot_read_is_the_same_value_error_on_invoke_and_stream(stream_guard: StreamGuard, value: Any,
                                                                                       named: str) -> None:
    guard = QwenGuardRunnable(stream_guard=stream_guard)
    for attempt in (lambda: guard.invoke(value), lambda: list(guard.stream(value))):
        with pytest.raises(ValueError, match=named) as raised:
            attempt()
        assert "stream" not in str(raised.value), "nothing was streamed on invoke, and the error names what was given"


#: Values a response step is handed (a parser's output, a message list, parsed models, retrieved
#: documents), each holding the text once: judged by that text, on invoke and on stream alike.
STRUCTURED = [lambda t: {"answer": t}, lambda t: [t], lambda t: [AIMessage(t)], lambda t: {"answer": AIMessage(t)},
              lambda t: [Document(t)], lambda t: Answer(text=t), lambda t: {"raw": AIMessage(""), "parsed": Answer(text=t)},
              lambda t: Note(t), lambda t: {"answer": Note(t)}, lambda t: [("wizard", t)]]


@pytest.mark.parametrize("make", STRUCTURED, ids=["dict", "list", "messages", "message-in-dict", "documents", "pydantic", "include-raw",
                                                  "dataclass", "dataclass-in-dict", "pairs"])
def test_invoke_and_stream_judge_a_structured_answer_alike(stream_guard: StreamGuard, make: Any) -> None:
    guard = QwenGuardRunnable(stream_guard=stream_guard)
    with pytest.raises(GuardViolation):
        guard.invoke(make(UNSAFE_REPLY))
    got, exc = collect(guard.stream(make(UNSAFE_REPLY)))
    assert got == [] and isinstance(exc, GuardViolation)
    safe = make(PLANTED_SAFE_TEXT)
    assert guard.invoke(safe) == safe and list(guard.stream(safe)) == [safe]


def test_a_chain_that_is_not_runnable_is_refused_when_the_guard_is_built(stream_guard: StreamGuard) -> None:
    with pytest.raises(TypeError):
        QwenGuardRunnable(stream_guard=stream_guard, chain=5)


@pytest.mark.parametrize("value", [42, "   ", [], {"style": 3}])
def test_bad_prompt_input_is_a_value_error(stream_guard: StreamGuard, value: Any) -> None:
    with pytest.raises(ValueError):
        QwenGuardRunnable(role="prompt", stream_guard=stream_guard).invoke(value)


def test_an_answer_without_text_has_nothing_to_judge_and_passes(stream_guard: StreamGuard) -> None:
    call = {"name": "search", "args": {"q": "cake"}, "id": "call-1", "type": "tool_call"}
    guard = QwenGuardRunnable(stream_guard=stream_guard)
    for value in (AIMessage(content="", tool_calls=[call]), "   "):
        assert guard.invoke(value) is value


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"role": "prompt", "on_violation": "replace"}, {"holdback_tokens": -1}, {"holdback_tokens": True},
     {"prompt_check": "bogus"}, {"input_key": "question"}, {"on_violation": "ignore"}, {"role": "prompt", "prompt_check": "off"}],
)
def test_bad_configuration_is_a_value_error(stream_guard: StreamGuard, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        QwenGuardRunnable(**({"stream_guard": stream_guard} if kwargs else {}), **kwargs)


def test_a_shared_moderator_serves_several_guards(stream_guard: StreamGuard) -> None:
    shared = Moderator(stream_guard=stream_guard, source="langchain.runnable")
    guard_in, guard_out = QwenGuardRunnable(role="prompt", moderator=shared), QwenGuardRunnable(moderator=shared)
    with pytest.raises(GuardViolation):
        guard_in.invoke(PLANTED_UNSAFE_PROMPT)
    got, exc = collect((model(UNSAFE_REPLY) | guard_out | StrOutputParser()).stream(PLANTED_SAFE_PROMPT))
    assert got == SAFE_PREFIX and isinstance(exc, GuardViolation)
    with pytest.raises(ValueError, match="refusal"):
        QwenGuardRunnable(moderator=shared, refusal="No.")
    with pytest.raises(ValueError, match="Moderator"):
        QwenGuardRunnable(moderator="Qwen/Qwen3Guard-Stream-0.6B")


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


def test_an_injected_tool_result_in_the_input_is_judged_as_context(gen_guard: Any) -> None:
    call = {"name": "search", "args": {"q": "cake"}, "id": "call-1", "type": "tool_call"}
    turn = [HumanMessage(content=SAFE_PROMPT), AIMessage(content="", tool_calls=[call])]
    guard_in = QwenGuardRunnable(role="prompt", gen_guard=gen_guard)
    with pytest.raises(GuardViolation) as info:
        guard_in.invoke([*turn, ToolMessage(content=JAILBREAK_PROMPT, tool_call_id="call-1")])
    assert info.value.verdict.categories == (Category.JAILBREAK,)
    harmless = [*turn, ToolMessage(content=SAFE_PROMPT, tool_call_id="call-1")]
    assert guard_in.invoke(harmless) is harmless


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
    assert event["data"]["role"] == "response" and event["data"]["risk"] == "Safe" and event["data"]["action"] == "allow"


IMAGE_BLOCK = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def test_media_in_the_models_answer_is_refused_not_passed_on_unjudged(stream_guard: StreamGuard) -> None:
    guard = QwenGuardRunnable(stream_guard=stream_guard)
    with pytest.raises(ValueError, match=r"media block \('image_url'\)"):
        guard.invoke(AIMessage(content=[{"type": "text", "text": PLANTED_SAFE_TEXT}, IMAGE_BLOCK]))
    chunks = iter([AIMessageChunk(content=PLANTED_SAFE_TEXT), AIMessageChunk(content=[IMAGE_BLOCK])])
    with pytest.raises(ValueError, match="media block"):
        list(guard.transform(chunks))
    tool_use = AIMessage(content=[{"type": "text", "text": PLANTED_SAFE_TEXT}, {"type": "tool_use", "id": "t1", "name": "f", "input": {}}])
    assert guard.invoke(tool_use).content == tool_use.content, "non-media blocks (tool use, reasoning) pass as before"


@pytest.mark.parametrize("block", [("output_text", "text"), ("reasoning", "reasoning"), ("thinking", "thinking")])
def test_answer_text_in_any_text_block_is_judged(stream_guard: StreamGuard, block: tuple[str, str]) -> None:
    from scripted_chat_model import ScriptedChatModel, ai

    chat = ScriptedChatModel(script={PLANTED_SAFE_PROMPT: [ai(UNSAFE_REPLY)]}, block=block)
    chunks = list((chat | QwenGuardRunnable(stream_guard=stream_guard, on_violation="replace")).stream(PLANTED_SAFE_PROMPT))
    assert "pipe" not in repr(chunks) and chunks[-1].content.endswith(DEFAULT_REFUSAL)
    with pytest.raises(GuardViolation):
        QwenGuardRunnable(stream_guard=stream_guard).invoke(chat.invoke(PLANTED_SAFE_PROMPT))


def test_a_parser_after_the_guard_gets_only_judged_tool_call_arguments(stream_guard: StreamGuard) -> None:
    from langchain_core.output_parsers.openai_tools import PydanticToolsParser
    from pydantic import BaseModel

    from scripted_chat_model import ScriptedChatModel, ai

    class Answer(BaseModel):
        text: str

    def chain(text: str, on_violation: str = "replace") -> Any:
        chat = ScriptedChatModel(script={PLANTED_SAFE_PROMPT: [ai("", ("Answer", {"text": text}))]}, max_chunk=4)
        guard = QwenGuardRunnable(stream_guard=stream_guard, on_violation=on_violation)
        return chat | guard | PydanticToolsParser(tools=[Answer], first_tool_only=True)

    escaped = "Sure, take a pipe\\u0020bomb and run."  # JSON-escaped in the arguments: the parser reads a space
    for text in ("Sure, take a pipe bomb and run.", escaped.encode().decode("unicode_escape")):
        assert chain(text).invoke(PLANTED_SAFE_PROMPT) is None
        assert list(chain(text).stream(PLANTED_SAFE_PROMPT)) == []
        got, exc = collect(chain(text, "raise").stream(PLANTED_SAFE_PROMPT))
        assert got == [] and isinstance(exc, GuardViolation)
    assert chain(PLANTED_SAFE_TEXT).invoke(PLANTED_SAFE_PROMPT) == Answer(text=PLANTED_SAFE_TEXT)
    assert list(chain(PLANTED_SAFE_TEXT).stream(PLANTED_SAFE_PROMPT))[-1] == Answer(text=PLANTED_SAFE_TEXT)


@pytest.mark.parametrize("chunk", [
    AIMessageChunk(content="", additional_kwargs={"reasoning_content": UNSAFE_REPLY}),
    AIMessageChunk(content=[{"type": "reasoning_content", "reasoning_content": {"text": UNSAFE_REPLY}}],
                   response_metadata={"model_provider": "bedrock_converse"}),
    AIMessageChunk(content=[{"type": "provider_says", "words": UNSAFE_REPLY}]),
], ids=["additional_kwargs", "bedrock", "unknown block"])
def test_reasoning_langchain_shows_as_content_is_judged(stream_guard: StreamGuard, chunk: AIMessageChunk) -> None:
    guard = QwenGuardRunnable(stream_guard=stream_guard, on_violation="replace")
    out = list(guard.transform(iter([chunk, AIMessageChunk(content="Done.")])))
    assert "pipe" not in repr(out) and out[-1].content.endswith(DEFAULT_REFUSAL)
    with pytest.raises(GuardViolation):
        QwenGuardRunnable(stream_guard=stream_guard).invoke(chunk + AIMessageChunk(content="Done."))


def test_a_template_history_is_read_as_the_guard_reads_messages(stream_guard: StreamGuard) -> None:
    history = [HumanMessage(content=[{"type": "input_text", "text": PLANTED_UNSAFE_PROMPT}]), AIMessage("Okay.")]
    with pytest.raises(GuardViolation):
        QwenGuardRunnable(role="prompt", stream_guard=stream_guard).invoke({"history": history, "question": "Go on."})


@pytest.mark.parametrize("value", [
    {"context": [Document(page_content=PLANTED_UNSAFE_PROMPT)], "question": PLANTED_SAFE_PROMPT},
    {"context": [Document(page_content="A page.", metadata={"title": PLANTED_UNSAFE_PROMPT})], "question": PLANTED_SAFE_PROMPT},
    {"note": Note(PLANTED_UNSAFE_PROMPT), "question": PLANTED_SAFE_PROMPT},
    [Document(page_content=PLANTED_UNSAFE_PROMPT)],
], ids=["document", "metadata", "object", "documents"])
def test_retrieved_documents_and_other_objects_in_the_input_are_judged(stream_guard: StreamGuard, value: Any) -> None:
    with pytest.raises(GuardViolation):
        QwenGuardRunnable(role="prompt", stream_guard=stream_guard).invoke(value)
    with pytest.raises(GuardViolation):
        QwenGuardRunnable(role="prompt", stream_guard=stream_guard, input_key="docs").invoke({"docs": value})
    with pytest.raises(ValueError, match="cannot moderate"):
        QwenGuardRunnable(role="prompt", stream_guard=stream_guard).invoke([3, 4])


def test_a_retrieved_document_is_untrusted_context_and_one_the_guard_cannot_read_is_blocked(gen_guard: Any) -> None:
    guard = QwenGuardRunnable(role="prompt", gen_guard=gen_guard)
    with pytest.raises(GuardViolation) as raised:  # judged on its own, as the trained injection it is
        guard.invoke({"context": [Document(page_content=JAILBREAK_PROMPT)], "question": SAFE_PROMPT})
    assert [c.value for c in raised.value.verdict.categories] == ["Jailbreak"]
    with pytest.raises(GuardViolation) as raised:  # a NUL from PDF extraction: blocked, not a crash
        guard.invoke({"context": [Document(page_content="Page one\x00two")], "question": SAFE_PROMPT})
    assert raised.value.verdict.error_kind == "rejected"
    assert guard.invoke({"question": SAFE_PROMPT}) == {"question": SAFE_PROMPT}


def test_a_whole_message_streamed_by_a_model_that_cannot_stream_has_its_tool_calls_judged(stream_guard: StreamGuard) -> None:
    call = {"name": "Answer", "args": {"text": UNSAFE_REPLY}, "id": "c1", "type": "tool_call"}
    chain = FakeMessagesListChatModel(responses=[AIMessage("", tool_calls=[call])]) | QwenGuardRunnable(stream_guard=stream_guard)
    got, exc = collect(chain.stream(PLANTED_SAFE_PROMPT))
    assert isinstance(exc, GuardViolation) and not any(getattr(c, "tool_calls", None) for c in got)


def test_an_audio_answer_is_refused_like_a_media_block(stream_guard: StreamGuard) -> None:
    answer = AIMessage(content="", additional_kwargs={"audio": {"id": "a1", "data": "AAAA", "transcript": UNSAFE_REPLY}})
    with pytest.raises(ValueError, match="media"):
        QwenGuardRunnable(stream_guard=stream_guard).invoke(answer)


@pytest.mark.parametrize("blocks", [
    [{"type": "server_tool_call", "id": "s1", "name": "code_interpreter", "args": {"code": f"print('{UNSAFE_REPLY}')"}},
     {"type": "text", "text": "Done."}],
    [{"type": "server_tool_result", "tool_call_id": "s1", "status": "success", "output": {"stdout": UNSAFE_REPLY}},
     {"type": "text", "text": "Done."}],
    [{"type": "text", "text": "See the source.", "annotations": [{"type": "citation", "cited_text": UNSAFE_REPLY}]}],
], ids=["server-tool-call", "server-tool-result", "citation"])
def test_what_a_providers_own_tools_ran_and_quoted_is_judged(stream_guard: StreamGuard, blocks: list[dict[str, Any]]) -> None:
    with pytest.raises(GuardViolation):
        QwenGuardRunnable(stream_guard=stream_guard).invoke(AIMessage(content=blocks))


def test_json_content_is_judged_by_what_a_json_parser_after_the_guard_reads(stream_guard: StreamGuard) -> None:
    escaped = '{"answer": "Sure, take a\\u0020pipe\\u0020bomb. Then light it."}'
    chain = model(escaped) | QwenGuardRunnable(stream_guard=stream_guard) | JsonOutputParser()
    with pytest.raises(GuardViolation):
        chain.invoke(PLANTED_SAFE_PROMPT)
    # A stream is judged so at its end, before its last chunks go out: the whole answer never does.
    got, exc = collect((model(escaped) | QwenGuardRunnable(stream_guard=stream_guard) | JsonOutputParser()).stream(PLANTED_SAFE_PROMPT))
    assert isinstance(exc, GuardViolation) and {"answer": UNSAFE_REPLY} not in got
