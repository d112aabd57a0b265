"""QwenGuardCallbackHandler / AsyncQwenGuardCallbackHandler on real langchain-core models and chains."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, ToolMessage
from langchain_core.prompts import ChatPromptTemplate

import langchain_helpers
from langchain_helpers import Recorder
from guard_core import Category, GuardViolation, Moderator, RiskLevel
from guard_core.stream import StreamGuard
from guard_core.testing.cases import (
    JAILBREAK_PROMPT,
    REFUSAL_ANSWER,
    SAFE_ANSWER,
    SAFE_PROMPT,
    UNSAFE_ANSWER,
    UNSAFE_PROMPT,
)
from guard_core.testing.stream_fixture import PLANTED_SAFE_PROMPT, PLANTED_SAFE_TEXT, PLANTED_UNSAFE_PROMPT
from integrations.langchain import GUARD_EVENT, AsyncQwenGuardCallbackHandler, QwenGuardCallbackHandler
from scripted_chat_model import ScriptedChatModel, ai

#: The planted " pipe bomb" inside a chunk "bomb." that also carries the token boundary after " bomb".
UNSAFE_REPLY = "Sure, take a pipe bomb. Then light it."
SAFE_PREFIX = ["Sure,", " ", "take", " ", "a", " ", "pipe", " "]


def model(text: str) -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(content=text)]))


def untouched(chat_model: GenericFakeChatModel) -> bool:
    """True when the model never produced its scripted answer (i.e. it was not called)."""
    return next(chat_model.messages, None) is not None


def test_stream_stops_before_the_chunk_that_completes_the_unsafe_run(stream_guard: StreamGuard) -> None:
    handler = QwenGuardCallbackHandler(stream_guard)
    got, exc = collect(model(UNSAFE_REPLY).stream(PLANTED_SAFE_PROMPT, config={"callbacks": [handler]}))
    assert got == SAFE_PREFIX
    assert isinstance(exc, GuardViolation)
    assert exc.verdict.role == "response" and exc.verdict.risk is RiskLevel.UNSAFE
    assert exc.verdict.categories == (Category.VIOLENT,)
    assert handler.active_runs == 0


def test_astream_stops_with_the_async_handler(stream_guard: StreamGuard) -> None:
    handler = AsyncQwenGuardCallbackHandler(stream_guard)
    got, exc = asyncio.run(acollect(model(UNSAFE_REPLY).astream(PLANTED_SAFE_PROMPT, config={"callbacks": [handler]})))
    assert got == SAFE_PREFIX
    assert isinstance(exc, GuardViolation) and exc.verdict.risk is RiskLevel.UNSAFE
    assert handler.active_runs == 0


def test_safe_stream_passes_unchanged_in_the_same_chunks(stream_guard: StreamGuard) -> None:
    plain = [c.content for c in model(PLANTED_SAFE_TEXT).stream(PLANTED_SAFE_PROMPT)]
    handler = QwenGuardCallbackHandler(stream_guard)
    guarded = [c.content for c in model(PLANTED_SAFE_TEXT).stream(PLANTED_SAFE_PROMPT, config={"callbacks": [handler]})]
    assert guarded == plain and "".join(guarded) == PLANTED_SAFE_TEXT
    assert handler.active_runs == 0


def test_stream_prompt_head_blocks_before_the_model_is_called(stream_guard: StreamGuard) -> None:
    chat_model = model(PLANTED_SAFE_TEXT)
    handler = QwenGuardCallbackHandler(stream_guard)
    got, exc = collect(chat_model.stream(PLANTED_UNSAFE_PROMPT, config={"callbacks": [handler]}))
    assert got == [] and isinstance(exc, GuardViolation) and exc.verdict.role == "prompt"
    assert untouched(chat_model)
    assert handler.active_runs == 0


def test_gen_prompt_check_blocks_a_templated_prompt(stream_guard: StreamGuard, gen_guard: Any) -> None:
    chat_model = model(PLANTED_SAFE_TEXT)
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | chat_model
    handler = QwenGuardCallbackHandler(stream_guard, gen_guard)
    with pytest.raises(GuardViolation) as info:
        chain.invoke({"question": UNSAFE_PROMPT}, config={"callbacks": [handler]})
    assert info.value.verdict.categories == (Category.VIOLENT,) and info.value.verdict.model == gen_guard.model_id
    assert untouched(chat_model)


def test_non_streaming_invoke_is_moderated_with_the_stream_guard(stream_guard: StreamGuard) -> None:
    handler = QwenGuardCallbackHandler(stream_guard)
    with pytest.raises(GuardViolation) as info:
        model(UNSAFE_REPLY).invoke(PLANTED_SAFE_PROMPT, config={"callbacks": [handler]})
    assert info.value.verdict.role == "response"
    assert model(PLANTED_SAFE_TEXT).invoke(PLANTED_SAFE_PROMPT, config={"callbacks": [handler]}).content == PLANTED_SAFE_TEXT
    assert handler.active_runs == 0


def test_non_streaming_invoke_is_moderated_with_gen(gen_guard: Any) -> None:
    handler = QwenGuardCallbackHandler(gen_guard=gen_guard, prompt_check="off")
    with pytest.raises(GuardViolation) as info:
        model(UNSAFE_ANSWER).invoke(UNSAFE_PROMPT, config={"callbacks": [handler]})
    assert info.value.verdict.role == "response" and info.value.verdict.refusal is False
    assert model(REFUSAL_ANSWER).invoke(UNSAFE_PROMPT, config={"callbacks": [handler]}).content == REFUSAL_ANSWER


def test_gen_confirms_a_stream_the_token_guard_let_through(stream_guard: StreamGuard, gen_guard: Any) -> None:
    # One planted token (" pipe") never makes a debounced run, so only Gen's full-response check catches it.
    handler = QwenGuardCallbackHandler(stream_guard, gen_guard, prompt_check="off", confirm_with_gen=True)
    got, exc = collect(model(UNSAFE_ANSWER).stream(UNSAFE_PROMPT, config={"callbacks": [handler]}))
    assert "".join(got) == UNSAFE_ANSWER
    assert isinstance(exc, GuardViolation) and exc.verdict.model == gen_guard.model_id
    assert handler.active_runs == 0


def test_concurrent_runs_keep_their_own_sessions(stream_guard: StreamGuard) -> None:
    handler = AsyncQwenGuardCallbackHandler(stream_guard)

    async def both() -> list[tuple[list[str], BaseException | None]]:
        config = {"callbacks": [handler]}
        return await asyncio.gather(
            acollect(model(PLANTED_SAFE_TEXT).astream(PLANTED_SAFE_PROMPT, config=config)),
            acollect(model(UNSAFE_REPLY).astream(PLANTED_SAFE_PROMPT, config=config)),
            acollect(model(PLANTED_SAFE_TEXT).astream(PLANTED_SAFE_PROMPT, config=config)),
        )

    (safe1, e1), (unsafe, e2), (safe2, e3) = asyncio.run(both())
    assert "".join(safe1) == "".join(safe2) == PLANTED_SAFE_TEXT and e1 is None and e3 is None
    assert unsafe == SAFE_PREFIX and isinstance(e2, GuardViolation)
    assert handler.active_runs == 0


def test_a_consumer_that_stops_early_frees_the_session(stream_guard: StreamGuard) -> None:
    handler = QwenGuardCallbackHandler(stream_guard)
    stream = model(PLANTED_SAFE_TEXT).stream(PLANTED_SAFE_PROMPT, config={"callbacks": [handler]})
    next(stream)
    assert handler.active_runs == 1
    stream.close()
    assert handler.active_runs == 0


def test_verdicts_are_dispatched_as_custom_events(stream_guard: StreamGuard) -> None:
    recorder = Recorder()
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | model(PLANTED_SAFE_TEXT)
    handler = QwenGuardCallbackHandler(stream_guard)
    list(chain.stream({"question": PLANTED_SAFE_PROMPT}, config={"callbacks": [handler, recorder]}))
    assert [(e["role"], e["action"], e["risk"]) for e in recorder.events] == [
        ("prompt", "allow", "Safe"), ("response", "allow", "Safe")]
    assert len({e["run_id"] for e in recorder.events}) == 1 and recorder.events[0]["review_id"] is None


def test_events_reach_the_run_handlers_when_the_model_is_called_directly(stream_guard: StreamGuard) -> None:
    # Outside a chain there is no ambient RunnableConfig: the events used to reach no handler.
    recorder = Recorder()
    handler = QwenGuardCallbackHandler(stream_guard)
    got, exc = collect(model(UNSAFE_REPLY).stream(PLANTED_SAFE_PROMPT, config={"callbacks": [handler, recorder]}))
    assert got == SAFE_PREFIX and isinstance(exc, GuardViolation)
    assert [(e["role"], e["action"]) for e in recorder.events] == [("prompt", "allow"), ("response", "block")]
    assert recorder.events[1]["categories"] == ["Violent"]
    FakeListLLM(responses=[PLANTED_SAFE_TEXT]).invoke(PLANTED_SAFE_PROMPT, config={"callbacks": [handler, recorder]})
    assert [(e["role"], e["action"]) for e in recorder.events[2:]] == [("prompt", "allow"), ("response", "allow")]


def test_async_events_show_up_in_astream_events_of_a_model_called_directly(stream_guard: StreamGuard) -> None:
    handler = AsyncQwenGuardCallbackHandler(stream_guard)

    async def events() -> list[dict[str, Any]]:
        stream = model(PLANTED_SAFE_TEXT).astream_events(PLANTED_SAFE_PROMPT, version="v2", config={"callbacks": [handler]})
        return [e async for e in stream if e["event"] == "on_custom_event"]

    found = asyncio.run(events())
    assert [(e["name"], e["data"]["role"], e["data"]["risk"]) for e in found] == [
        (GUARD_EVENT, "prompt", "Safe"), (GUARD_EVENT, "response", "Safe")]


def injected(question: str, tool_result: str) -> list[BaseMessage]:
    """An agent turn: the user's question, the model's tool call, and what the tool returned."""
    call = {"name": "search", "args": {"q": question}, "id": "call-1", "type": "tool_call"}
    return [HumanMessage(content=question), AIMessage(content="", tool_calls=[call]),
            ToolMessage(content=tool_result, tool_call_id="call-1")]


def test_an_injected_tool_result_blocks_the_model_call(gen_guard: Any) -> None:
    chat_model = model(SAFE_ANSWER)
    handler = QwenGuardCallbackHandler(gen_guard=gen_guard)
    got, exc = collect(chat_model.stream(injected(SAFE_PROMPT, JAILBREAK_PROMPT), config={"callbacks": [handler]}))
    assert got == [] and isinstance(exc, GuardViolation)
    assert exc.verdict.role == "prompt" and exc.verdict.categories == (Category.JAILBREAK,)
    assert untouched(chat_model) and handler.active_runs == 0
    # A harmless tool result (a text the Gen fixture knows as Safe) lets the same turn through.
    got, exc = collect(model(SAFE_ANSWER).stream(injected(SAFE_PROMPT, SAFE_PROMPT), config={"callbacks": [handler]}))
    assert exc is None and "".join(got) == SAFE_ANSWER


def test_an_injected_tool_result_blocks_the_async_model_call(gen_guard: Any) -> None:
    chat_model = model(SAFE_ANSWER)
    handler = AsyncQwenGuardCallbackHandler(gen_guard=gen_guard)
    with pytest.raises(GuardViolation) as info:
        asyncio.run(chat_model.ainvoke(injected(SAFE_PROMPT, JAILBREAK_PROMPT), config={"callbacks": [handler]}))
    assert info.value.verdict.categories == (Category.JAILBREAK,)
    assert untouched(chat_model) and handler.active_runs == 0


def test_completion_llms_are_moderated_too(stream_guard: StreamGuard) -> None:
    from langchain_core.language_models.fake import FakeStreamingListLLM

    handler = QwenGuardCallbackHandler(stream_guard)
    llm = FakeStreamingListLLM(responses=[UNSAFE_REPLY])
    with pytest.raises(GuardViolation):
        "".join(llm.stream(PLANTED_SAFE_PROMPT, config={"callbacks": [handler]}))
    with pytest.raises(GuardViolation):
        llm.invoke(PLANTED_UNSAFE_PROMPT, config={"callbacks": [handler]})
    assert handler.active_runs == 0


def test_a_shared_moderator_serves_both_handlers(stream_guard: StreamGuard) -> None:
    shared = Moderator(stream_guard=stream_guard, holdback_tokens=0, source="langchain.callback")
    handlers = [QwenGuardCallbackHandler(moderator=shared), AsyncQwenGuardCallbackHandler(moderator=shared)]
    assert all(h.moderator is shared for h in handlers)
    got, exc = collect(model(UNSAFE_REPLY).stream(PLANTED_SAFE_PROMPT, config={"callbacks": [handlers[0]]}))
    assert got == SAFE_PREFIX and isinstance(exc, GuardViolation)
    with pytest.raises(ValueError, match="not both"):
        QwenGuardCallbackHandler(stream_guard, moderator=shared)
    with pytest.raises(TypeError, match="Moderator"):
        QwenGuardCallbackHandler(moderator="Qwen/Qwen3Guard-Stream-0.6B")


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"prompt_check": "gen"}, {"prompt_check": "bogus"}, {"confirm_with_gen": True}],
)
def test_bad_configuration_is_a_value_error(stream_guard: StreamGuard, kwargs: dict[str, Any]) -> None:
    guard = None if not kwargs else stream_guard
    with pytest.raises(ValueError):
        QwenGuardCallbackHandler(guard, **kwargs)


def test_an_unknown_message_role_is_a_value_error_before_the_model_runs(stream_guard: StreamGuard) -> None:
    chat_model = model(PLANTED_SAFE_TEXT)
    with pytest.raises(ValueError, match="wizard"):
        chat_model.invoke([ChatMessage(role="wizard", content=PLANTED_UNSAFE_PROMPT)],
                          config={"callbacks": [QwenGuardCallbackHandler(stream_guard)]})
    assert untouched(chat_model)


def collect(stream: Any) -> tuple[list[str], BaseException | None]:
    return langchain_helpers.collect(stream, lambda chunk: chunk.content)


async def acollect(stream: Any) -> tuple[list[str], BaseException | None]:
    return await langchain_helpers.acollect(stream, lambda chunk: chunk.content)


def test_media_in_a_whole_answer_is_refused_by_the_callback(stream_guard: StreamGuard) -> None:
    from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    chat = FakeMessagesListChatModel(responses=[AIMessage(content=[{"type": "text", "text": "Here it is."}, image])])
    with pytest.raises(ValueError, match="media block"):
        chat.invoke(PLANTED_SAFE_PROMPT, config={"callbacks": [QwenGuardCallbackHandler(stream_guard)]})


@pytest.mark.parametrize("block", [("output_text", "text"), ("reasoning", "reasoning"), ("thinking", "thinking")])
def test_answer_text_in_any_text_block_is_judged(stream_guard: StreamGuard, block: tuple[str, str]) -> None:
    from scripted_chat_model import ScriptedChatModel, ai

    handler = QwenGuardCallbackHandler(stream_guard)
    chat = ScriptedChatModel(script={PLANTED_SAFE_PROMPT: [ai(UNSAFE_REPLY)]}, block=block)
    got, exc = langchain_helpers.collect(chat.stream(PLANTED_SAFE_PROMPT, config={"callbacks": [handler]}))
    assert isinstance(exc, GuardViolation) and "light" not in repr(got)
    with pytest.raises(GuardViolation):
        chat.invoke(PLANTED_SAFE_PROMPT, config={"callbacks": [handler]})
    assert handler.active_runs == 0


def test_a_multi_prompt_call_blocked_at_a_later_prompt_frees_every_run(stream_guard: StreamGuard) -> None:
    sync, async_ = QwenGuardCallbackHandler(stream_guard), AsyncQwenGuardCallbackHandler(stream_guard)
    prompts = [PLANTED_SAFE_PROMPT, PLANTED_UNSAFE_PROMPT, PLANTED_SAFE_PROMPT]
    with pytest.raises(GuardViolation):
        FakeListLLM(responses=["ok"] * 3).batch(prompts, config={"callbacks": [sync]})
    with pytest.raises(GuardViolation):
        model(PLANTED_SAFE_TEXT).generate([[HumanMessage(p)] for p in prompts], callbacks=[sync])
    assert sync.active_runs == 0
    with pytest.raises(GuardViolation):
        asyncio.run(FakeListLLM(responses=["ok"] * 3).agenerate(prompts, callbacks=[async_]))
    with pytest.raises(GuardViolation):
        asyncio.run(model(PLANTED_SAFE_TEXT).agenerate([[HumanMessage(p)] for p in prompts], callbacks=[async_]))
    assert async_.active_runs == 0


def test_with_structured_output_is_judged_by_its_decoded_arguments(stream_guard: StreamGuard) -> None:
    from pydantic import BaseModel

    from scripted_chat_model import ScriptedChatModel, ai

    class Answer(BaseModel):
        text: str

    class ToolModel(ScriptedChatModel):
        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            return self.bind(**kwargs)  # as real chat models do: the structured-output mark reaches the callbacks

    def structured(text: str) -> Any:
        chat = ToolModel(script={PLANTED_SAFE_PROMPT: [ai("", ("Answer", {"text": text}))]}, max_chunk=4)
        return chat.with_structured_output(Answer, method="function_calling")

    unsafe = "Sure, take a pipe bomb and run."
    sync, async_ = QwenGuardCallbackHandler(stream_guard), AsyncQwenGuardCallbackHandler(stream_guard)
    with pytest.raises(GuardViolation):
        structured(unsafe).invoke(PLANTED_SAFE_PROMPT, config={"callbacks": [sync]})
    got, exc = langchain_helpers.collect(structured(unsafe).stream(PLANTED_SAFE_PROMPT, config={"callbacks": [sync]}))
    assert isinstance(exc, GuardViolation) and "run" not in repr(got), "stopped at the chunk completing the unsafe run"
    with pytest.raises(GuardViolation):
        asyncio.run(structured(unsafe).ainvoke(PLANTED_SAFE_PROMPT, config={"callbacks": [async_]}))
    safe = structured(PLANTED_SAFE_TEXT).invoke(PLANTED_SAFE_PROMPT, config={"callbacks": [sync]})
    assert safe == Answer(text=PLANTED_SAFE_TEXT) and sync.active_runs == async_.active_runs == 0


def test_reasoning_beside_the_content_is_judged_by_the_callback(stream_guard: StreamGuard) -> None:
    from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel

    chat = FakeMessagesListChatModel(responses=[AIMessage(content="Done.", additional_kwargs={"reasoning_content": UNSAFE_REPLY})])
    with pytest.raises(GuardViolation):
        chat.invoke(PLANTED_SAFE_PROMPT, config={"callbacks": [QwenGuardCallbackHandler(stream_guard)]})


@pytest.mark.parametrize("chat_model", [
    lambda: ScriptedChatModel(script={PLANTED_SAFE_PROMPT: [ai(UNSAFE_REPLY)]}, max_chunk=1),  # events only
    lambda: model(UNSAFE_REPLY),  # its _stream also calls on_llm_new_token, before the events of each chunk
], ids=["events", "events-and-tokens"])
def test_stream_events_v3_stops_at_the_unsafe_text(stream_guard: StreamGuard, chat_model: Any) -> None:
    guard = QwenGuardCallbackHandler(stream_guard)
    stream = chat_model().stream_events(PLANTED_SAFE_PROMPT, config={"callbacks": [guard]}, version="v3")
    got, exc = langchain_helpers.collect(stream.text)
    assert isinstance(exc, GuardViolation) and "light" not in "".join(got) and guard.active_runs == 0
