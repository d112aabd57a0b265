"""Streaming answers through GuardedQueryEngine with the planted tiny Stream checkpoint.

The planted model labels the tokens of PLANTED_UNSAFE_TEXT (" pipe bomb") Unsafe/Violent and
flags prompts containing " bomb"; everything else is Safe.
"""

from __future__ import annotations

import pytest
from llama_index.core import Document, MockEmbedding, VectorStoreIndex
from llama_index.core.base.response.schema import AsyncStreamingResponse, StreamingResponse

from guard_core import Category, GuardViolation
from guard_core.stream import StreamGuard
from guard_core.testing.stream_fixture import (
    PLANTED_SAFE_PROMPT,
    PLANTED_SAFE_TEXT,
    PLANTED_UNSAFE_PROMPT,
    PLANTED_UNSAFE_TEXT,
)
from integrations.llamaindex import DEFAULT_REFUSAL, GuardedQueryEngine
from tests.test_llamaindex import ScriptedLLM

UNSAFE_STREAM = f"Here is a tip. Take a{PLANTED_UNSAFE_TEXT} and light it, then run away fast."
BEFORE_PLANT = UNSAFE_STREAM[: UNSAFE_STREAM.index(PLANTED_UNSAFE_TEXT)]


@pytest.fixture(scope="module")
def index() -> VectorStoreIndex:
    docs = [Document(text=PLANTED_SAFE_TEXT), Document(text="Paris is the capital of France.")]
    return VectorStoreIndex.from_documents(docs, embed_model=MockEmbedding(embed_dim=8))


def streaming_engine(index: VectorStoreIndex, text: str) -> tuple[ScriptedLLM, object]:
    llm = ScriptedLLM(text=text, chunk=3)
    return llm, index.as_query_engine(llm=llm, streaming=True)


def test_safe_stream_passes_through_unchanged(stream_guard: StreamGuard, index: VectorStoreIndex) -> None:
    _, inner = streaming_engine(index, PLANTED_SAFE_TEXT)
    response = GuardedQueryEngine(inner, stream_guard=stream_guard).query(PLANTED_SAFE_PROMPT)

    assert isinstance(response, StreamingResponse)
    assert "".join(response.response_gen) == PLANTED_SAFE_TEXT
    record = response.metadata["qwen3guard"]
    assert (record["prompt"]["risk"], record["prompt"]["action"]) == ("Safe", "allow")
    assert (record["response"]["risk"], record["response"]["action"]) == ("Safe", "allow")
    assert response.source_nodes


def test_unsafe_stream_stops_before_the_planted_text(stream_guard: StreamGuard, index: VectorStoreIndex) -> None:
    llm, inner = streaming_engine(index, UNSAFE_STREAM)
    response = GuardedQueryEngine(inner, stream_guard=stream_guard).query(PLANTED_SAFE_PROMPT)

    received: list[str] = []
    with pytest.raises(GuardViolation) as caught:
        for delta in response.response_gen:
            received.append(delta)

    text = "".join(received)
    assert text and BEFORE_PLANT.startswith(text)
    assert caught.value.verdict.categories == (Category.VIOLENT,)
    assert llm._streamed < len(range(0, len(UNSAFE_STREAM), 3))  # the LLM stream was closed early


def test_unsafe_stream_can_be_rewritten_with_a_refusal(stream_guard: StreamGuard, index: VectorStoreIndex) -> None:
    _, inner = streaming_engine(index, UNSAFE_STREAM)
    response = GuardedQueryEngine(inner, stream_guard=stream_guard, on_block="refuse").query(PLANTED_SAFE_PROMPT)

    chunks = list(response.response_gen)

    delivered = "".join(chunks[:-1])
    assert delivered and BEFORE_PLANT.startswith(delivered)
    assert chunks[-1] == "\n\n" + DEFAULT_REFUSAL  # set apart from the delivered text
    answer = response.metadata["qwen3guard"]["response"]
    assert (answer["action"], answer["categories"]) == ("block", ["Violent"])


def test_stream_guard_blocks_the_query_without_running_the_engine(stream_guard: StreamGuard, index: VectorStoreIndex) -> None:
    llm, inner = streaming_engine(index, PLANTED_SAFE_TEXT)
    guarded = GuardedQueryEngine(inner, stream_guard=stream_guard, on_block="refuse")

    response = guarded.query(PLANTED_UNSAFE_PROMPT)

    assert list(response.response_gen) == [DEFAULT_REFUSAL]
    record = response.metadata["qwen3guard"]
    assert (record["prompt"]["action"], record["prompt"]["categories"], record["response"]) == ("block", ["Violent"], None)
    assert llm._calls == 0


async def test_async_stream_stops_before_the_planted_text(stream_guard: StreamGuard, index: VectorStoreIndex) -> None:
    _, inner = streaming_engine(index, UNSAFE_STREAM)
    response = await GuardedQueryEngine(inner, stream_guard=stream_guard, on_block="refuse").aquery(PLANTED_SAFE_PROMPT)

    assert isinstance(response, AsyncStreamingResponse)
    chunks = [delta async for delta in response.async_response_gen()]

    assert chunks[-1] == "\n\n" + DEFAULT_REFUSAL
    assert BEFORE_PLANT.startswith("".join(chunks[:-1]))
    assert PLANTED_UNSAFE_TEXT not in "".join(chunks)
    assert response.metadata["qwen3guard"]["response"]["action"] == "block"


async def test_async_safe_stream_passes_through(stream_guard: StreamGuard, index: VectorStoreIndex) -> None:
    _, inner = streaming_engine(index, PLANTED_SAFE_TEXT)
    response = await GuardedQueryEngine(inner, stream_guard=stream_guard).aquery(PLANTED_SAFE_PROMPT)

    assert "".join([delta async for delta in response.async_response_gen()]) == PLANTED_SAFE_TEXT
