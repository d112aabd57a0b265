"""GuardedQueryEngine in every guard configuration, streaming and not, sync and async.

Issue 13 section 7: ``stream_guard=s, check_query=False`` on a non-streaming engine crashed with
``'NoneType' object has no attribute 'push'``. Each neighbour of that case is driven here:
Stream only / Gen only / both, query checked or not, plain and streaming engines.
"""

from __future__ import annotations

from typing import Any

import pytest
from llama_index.core import Document, MockEmbedding, VectorStoreIndex
from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse

from guard_core import DEFAULT_REFUSAL, GenGuard, GuardViolation, StreamGuard
from guard_core.testing import PLANTED_SAFE_PROMPT, PLANTED_SAFE_TEXT, PLANTED_UNSAFE_TEXT
from guard_core.testing.cases import REFUSAL_ANSWER, UNSAFE_ANSWER, UNSAFE_PROMPT
from integrations.llamaindex import GuardedQueryEngine
from tests.test_llamaindex import ScriptedLLM

UNSAFE_STREAM = f"Here is a tip. Take a{PLANTED_UNSAFE_TEXT} and light it, then run away fast."
BEFORE_PLANT = UNSAFE_STREAM[: UNSAFE_STREAM.index(PLANTED_UNSAFE_TEXT)]


@pytest.fixture(scope="module")
def index() -> VectorStoreIndex:
    return VectorStoreIndex.from_documents([Document(text=PLANTED_SAFE_TEXT)], embed_model=MockEmbedding(embed_dim=8))


async def ask(guarded: GuardedQueryEngine, query: str, asynchronous: bool) -> tuple[Any, str]:
    """The response and its whole text, read the way a caller of query() / aquery() reads it."""
    response = await guarded.aquery(query) if asynchronous else guarded.query(query)
    if isinstance(response, AsyncStreamingResponse):
        return response, "".join([delta async for delta in response.async_response_gen()])
    if isinstance(response, StreamingResponse):
        return response, "".join(response.response_gen)
    return response, str(response)


both = pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])


@both
@pytest.mark.parametrize("check_query", [False, True], ids=["unchecked", "checked"])
async def test_stream_only_judges_a_complete_answer(stream_guard: StreamGuard, index: VectorStoreIndex,
                                                    asynchronous: bool, check_query: bool) -> None:
    plain = index.as_query_engine(llm=ScriptedLLM(text=PLANTED_SAFE_TEXT))
    guarded = GuardedQueryEngine(plain, stream_guard=stream_guard, check_query=check_query)

    response, text = await ask(guarded, PLANTED_SAFE_PROMPT, asynchronous)

    assert isinstance(response, Response) and text == PLANTED_SAFE_TEXT
    record = response.metadata["qwen3guard"]
    assert (record["response"]["risk"], record["response"]["role"]) == ("Safe", "response")
    assert (record["prompt"] or {}).get("risk") == ("Safe" if check_query else None)


@both
async def test_stream_only_blocks_an_unsafe_complete_answer(stream_guard: StreamGuard, index: VectorStoreIndex,
                                                            asynchronous: bool) -> None:
    plain = index.as_query_engine(llm=ScriptedLLM(text=UNSAFE_STREAM))
    refusing = GuardedQueryEngine(plain, stream_guard=stream_guard, check_query=False, on_block="refuse")

    response, text = await ask(refusing, PLANTED_SAFE_PROMPT, asynchronous)

    assert text == DEFAULT_REFUSAL  # nothing of a complete answer was delivered before the refusal
    assert response.metadata["qwen3guard"]["response"]["categories"] == ["Violent"]
    with pytest.raises(GuardViolation):
        await ask(GuardedQueryEngine(plain, stream_guard=stream_guard, check_query=False), PLANTED_SAFE_PROMPT, asynchronous)


@both
async def test_stream_only_unchecked_query_stops_a_stream_before_the_plant(
    stream_guard: StreamGuard, index: VectorStoreIndex, asynchronous: bool
) -> None:
    streaming = index.as_query_engine(llm=ScriptedLLM(text=UNSAFE_STREAM, chunk=3), streaming=True)
    guarded = GuardedQueryEngine(streaming, stream_guard=stream_guard, check_query=False, on_block="refuse")

    response, text = await ask(guarded, PLANTED_SAFE_PROMPT, asynchronous)

    delivered, refusal = text.split("\n\n")
    assert delivered and BEFORE_PLANT.startswith(delivered) and refusal == DEFAULT_REFUSAL
    assert response.metadata["qwen3guard"]["prompt"] is None


@both
async def test_gen_only_judges_a_whole_stream_before_releasing_it(gen_guard: GenGuard, index: VectorStoreIndex,
                                                                  asynchronous: bool) -> None:
    unsafe = index.as_query_engine(llm=ScriptedLLM(text=UNSAFE_ANSWER), streaming=True)
    refusing = GuardedQueryEngine(unsafe, gen_guard=gen_guard, check_query=False, on_block="refuse")
    response, text = await ask(refusing, UNSAFE_PROMPT, asynchronous)
    assert text == DEFAULT_REFUSAL
    assert isinstance(response, AsyncStreamingResponse if asynchronous else StreamingResponse)

    refusal = index.as_query_engine(llm=ScriptedLLM(text=REFUSAL_ANSWER, chunk=3), streaming=True)
    allowing = GuardedQueryEngine(refusal, gen_guard=gen_guard, check_query=False)
    response, text = await ask(allowing, UNSAFE_PROMPT, asynchronous)
    assert text == REFUSAL_ANSWER
    assert response.metadata["qwen3guard"]["response"]["refusal"] is True


@both
async def test_with_both_guards_a_stream_is_judged_token_by_token(gen_guard: GenGuard, stream_guard: StreamGuard,
                                                                  index: VectorStoreIndex, asynchronous: bool) -> None:
    llm = ScriptedLLM(text=UNSAFE_STREAM, chunk=3)
    streaming = index.as_query_engine(llm=llm, streaming=True)
    guarded = GuardedQueryEngine(streaming, gen_guard=gen_guard, stream_guard=stream_guard)

    response = await guarded.aquery(PLANTED_SAFE_PROMPT) if asynchronous else guarded.query(PLANTED_SAFE_PROMPT)
    received: list[str] = []
    with pytest.raises(GuardViolation):
        if asynchronous:
            async for delta in response.async_response_gen():
                received.append(delta)
        else:
            received.extend(response.response_gen)

    assert response.metadata["qwen3guard"]["prompt"]["model"] == gen_guard.model_id  # Gen judged the query
    assert BEFORE_PLANT.startswith("".join(received))
    assert llm._streamed < len(range(0, len(UNSAFE_STREAM), 3))  # the LLM stream was closed early


def test_holdback_zero_passes_deltas_through_as_they_come(stream_guard: StreamGuard, index: VectorStoreIndex) -> None:
    streaming = index.as_query_engine(llm=ScriptedLLM(text=PLANTED_SAFE_TEXT, chunk=4), streaming=True)
    guarded = GuardedQueryEngine(streaming, stream_guard=stream_guard, holdback_tokens=0)

    chunks = list(guarded.query(PLANTED_SAFE_PROMPT).response_gen)

    assert chunks == [PLANTED_SAFE_TEXT[i : i + 4] for i in range(0, len(PLANTED_SAFE_TEXT), 4)]
