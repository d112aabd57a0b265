"""QwenGuardMiddleware's leak guarantee: a real ``create_agent`` agent, a real tool, a scripted model.

An unsafe answer (the planted `` pipe bomb``) is streamed in many seeded random chunkings and read
through every way LangChain hands out a run: ``stream`` / ``astream`` with the messages, values and
updates modes, ``stream_events(version="v3")`` sync and async, and ``invoke``. No item any of them
yields, no final state and no checkpoint may hold the planted text, and what was streamed is the
message the state keeps. A safe stream must come out chunk for chunk as the bare agent's does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver

from guard_core import DEFAULT_REFUSAL, GuardViolation, StreamGuard
from guard_core.testing import PLANTED_SAFE_PROMPT, PLANTED_SAFE_TEXT
from integrations.langchain.middleware import QwenGuardMiddleware
from scripted_chat_model import ScriptedChatModel, ai

UNSAFE_ANSWER = "Sure, take a pipe bomb and run."
SAFE_PART = "Sure, take a"
LEAK = "pipe"
#: (seed, longest chunk): one character at a time up to the whole answer in one chunk.
CHUNKINGS = [(0, 1), (1, 2), (2, 3), (3, 5), (4, 8), (5, 13), (6, 40)]
MODES = ["messages", "values", "updates"]


@tool
def recipe_lookup(dish: str) -> str:
    """Look up a recipe."""
    return f"A recipe for {dish}: bake at 180C for 30 minutes."


def script(answer: str) -> dict[str, list[AIMessage]]:
    return {PLANTED_SAFE_PROMPT: [ai("", ("recipe_lookup", {"dish": "cake"})), ai(answer)]}


def agent(model: ScriptedChatModel, middleware: list[Any], saver: InMemorySaver | None = None) -> Any:
    return create_agent(model, [recipe_lookup], middleware=middleware, checkpointer=saver)


def ask(thread: str = "t") -> tuple[dict[str, Any], dict[str, Any]]:
    return {"messages": [("user", PLANTED_SAFE_PROMPT)]}, {"configurable": {"thread_id": thread}}


def chunk_answer(items: list[Any]) -> str:
    """The text of the last AI message streamed in messages mode (its chunks share an id)."""
    chunks = [item[0] for item in items if isinstance(item, tuple) and isinstance(item[0], AIMessageChunk)]
    return "".join(c.text for c in chunks if c.id == chunks[-1].id)


def v3_answer(events: list[Any]) -> str:
    """The text of the last AI message streamed on the v3 messages channel."""
    text = ""
    for event in events:
        payload = event["params"]["data"][0] if event["method"] == "messages" else {}
        if isinstance(payload, dict) and payload.get("event") == "message-start":
            text = ""
        elif isinstance(payload, dict) and payload.get("event") == "content-block-delta":
            text += payload["delta"].get("text", "")
    return text


def run_stream(graph: Any) -> tuple[list[Any], str]:
    items = [data for _, data in graph.stream(*ask(), stream_mode=MODES)]
    return items, chunk_answer(items)


def run_astream(graph: Any) -> tuple[list[Any], str]:
    async def go() -> list[Any]:
        return [data async for _, data in graph.astream(*ask(), stream_mode=MODES)]

    items = asyncio.run(go())
    return items, chunk_answer(items)


def run_v3(graph: Any) -> tuple[list[Any], str]:
    events = list(graph.stream_events(*ask(), version="v3"))
    return events, v3_answer(events)


def run_av3(graph: Any) -> tuple[list[Any], str]:
    async def go() -> list[Any]:
        return [event async for event in await graph.astream_events(*ask(), version="v3")]

    events = asyncio.run(go())
    return events, v3_answer(events)


def run_invoke(graph: Any) -> tuple[list[Any], str]:
    state = graph.invoke(*ask())
    return [state], state["messages"][-1].text


RUNS: dict[str, Callable[[Any], tuple[list[Any], str]]] = {
    "stream": run_stream, "astream": run_astream, "stream_events_v3": run_v3, "astream_events_v3": run_av3,
    "invoke": run_invoke,
}


def stored(graph: Any, saver: InMemorySaver) -> tuple[list[BaseMessage], str]:
    """The final messages, and everything every checkpoint (and its pending writes) holds, as text."""
    config = ask()[1]
    checkpoints = list(saver.list(config))
    assert checkpoints, "the run left no checkpoint"
    return graph.get_state(config).values["messages"], repr([(c.checkpoint, c.pending_writes) for c in checkpoints])


@pytest.mark.parametrize("seed,longest", CHUNKINGS)
@pytest.mark.parametrize("how", list(RUNS))
def test_an_unsafe_answer_leaks_nowhere(stream_guard: StreamGuard, how: str, seed: int, longest: int) -> None:
    saver = InMemorySaver()
    model = ScriptedChatModel(script=script(UNSAFE_ANSWER), seed=seed, max_chunk=longest)
    graph = agent(model, [QwenGuardMiddleware(None, stream_guard)], saver)
    items, streamed = RUNS[how](graph)
    messages, checkpoints = stored(graph, saver)
    assert LEAK not in repr(items) and LEAK not in checkpoints and LEAK not in repr(messages)
    answer = messages[-1]
    assert answer.text.endswith(DEFAULT_REFUSAL) and SAFE_PART.startswith(answer.text.removesuffix(DEFAULT_REFUSAL).strip())
    assert answer.response_metadata["qwen3guard"]["action"] == "block" and not answer.tool_calls
    assert streamed == answer.text
    assert model.calls == [PLANTED_SAFE_PROMPT] * 2


def ai_chunks(items: list[Any]) -> list[tuple[str, list[Any]]]:
    return [(c.text, c.tool_call_chunks) for c, _ in items if isinstance(c, AIMessageChunk)]


@pytest.mark.parametrize("seed,longest", CHUNKINGS[::2])
def test_a_safe_stream_is_unchanged_chunk_for_chunk(stream_guard: StreamGuard, seed: int, longest: int) -> None:
    def streams(middleware: list[Any]) -> tuple[list[Any], list[Any], list[Any]]:
        graph = agent(ScriptedChatModel(script=script(PLANTED_SAFE_TEXT), seed=seed, max_chunk=longest), middleware)

        async def go() -> list[Any]:
            return [item async for item in graph.astream(*ask(), stream_mode="messages")]

        events = [e["params"]["data"][0] for e in graph.stream_events(*ask(), version="v3") if e["method"] == "messages"]
        v3 = [e["delta"] for e in events if e.get("event") == "content-block-delta"]
        return ai_chunks(list(graph.stream(*ask(), stream_mode="messages"))), ai_chunks(asyncio.run(go())), v3

    bare, guarded = streams([]), streams([QwenGuardMiddleware(None, stream_guard)])
    for plain, judged in zip(bare, guarded):
        assert judged == plain
    assert "".join(text for text, _ in guarded[0]) == PLANTED_SAFE_TEXT


@pytest.mark.parametrize("exit_behavior", ["end", "replace"])
def test_end_and_replace_end_the_answer_with_the_refusal(stream_guard: StreamGuard, exit_behavior: str) -> None:
    model = ScriptedChatModel(script=script(UNSAFE_ANSWER), seed=3)
    graph = agent(model, [QwenGuardMiddleware(None, stream_guard, exit_behavior=exit_behavior)])
    items, streamed = run_stream(graph)
    assert streamed.endswith(DEFAULT_REFUSAL) and LEAK not in repr(items)


def test_error_raises_and_keeps_the_answer_out_of_the_state(stream_guard: StreamGuard) -> None:
    saver, items = InMemorySaver(), []
    middleware = [QwenGuardMiddleware(None, stream_guard, exit_behavior="error")]
    graph = agent(ScriptedChatModel(script=script(UNSAFE_ANSWER), seed=3), middleware, saver)
    with pytest.raises(GuardViolation) as raised:
        items.extend(graph.stream(*ask(), stream_mode=MODES))
    messages, checkpoints = stored(graph, saver)
    assert raised.value.verdict.risk.value == "Unsafe"
    assert LEAK not in repr(items) and LEAK not in checkpoints
    assert not any(isinstance(m, AIMessage) and m.text for m in messages)
