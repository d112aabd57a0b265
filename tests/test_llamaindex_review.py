"""Action.REVIEW through the LlamaIndex adapters: content passes unchanged, one review item each.

A real SQLite ReviewQueue per test; Controversial content from the trained Gen checkpoint
(CONTROVERSIAL_PROMPT) and the planted Stream checkpoint (" rigged election").
"""

from __future__ import annotations

from pathlib import Path

import pytest
from llama_index.core import Document, MockEmbedding, VectorStoreIndex
from llama_index.core.llms.mock import MockLLM
from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode

from guard_core import Action, GenGuard, Policy, RiskLevel, StreamGuard
from guard_core.review import ReviewQueue
from guard_core.testing import PLANTED_CONTROVERSIAL_TEXT, PLANTED_SAFE_PROMPT, PLANTED_SAFE_TEXT
from guard_core.testing.cases import CONTROVERSIAL_PROMPT, SAFE_PROMPT
from integrations.llamaindex import GuardedQueryEngine, QwenGuardNodePostprocessor
from tests.test_llamaindex import ScriptedLLM

REVIEW_CONTROVERSIAL = Policy(actions={RiskLevel.CONTROVERSIAL: Action.REVIEW})
CONTROVERSIAL_STREAM = f"Some say it was a{PLANTED_CONTROVERSIAL_TEXT}, and others disagree about it."


@pytest.fixture
def queue(tmp_path: Path) -> ReviewQueue:
    with ReviewQueue(tmp_path / "review.db") as opened:
        yield opened


@pytest.fixture(scope="module")
def index() -> VectorStoreIndex:
    return VectorStoreIndex.from_documents([Document(text=PLANTED_SAFE_TEXT)], embed_model=MockEmbedding(embed_dim=8))


def only_pending(queue: ReviewQueue, review_id: str, source: str, role: str) -> None:
    pending = queue.list(status="pending")
    assert [(i.id, i.source, i.role, i.risk) for i in pending] == [(review_id, source, role, RiskLevel.CONTROVERSIAL)]
    assert pending[0].content is None  # privacy by default


def test_controversial_query_passes_and_is_queued(gen_guard: GenGuard, stream_guard: StreamGuard,
                                                  index: VectorStoreIndex, queue: ReviewQueue) -> None:
    inner = index.as_query_engine(llm=ScriptedLLM(text=PLANTED_SAFE_TEXT, chunk=5), streaming=True)
    guarded = GuardedQueryEngine(inner, gen_guard=gen_guard, stream_guard=stream_guard, policy=REVIEW_CONTROVERSIAL,
                                 review=queue)

    response = guarded.query(CONTROVERSIAL_PROMPT)

    assert "".join(response.response_gen) == PLANTED_SAFE_TEXT
    record = response.metadata["qwen3guard"]
    assert (record["prompt"]["action"], record["prompt"]["risk"]) == ("review", "Controversial")
    assert record["response"]["action"] == "allow"
    only_pending(queue, record["prompt"]["review_id"], "llamaindex.query_engine", "prompt")


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_controversial_streamed_answer_passes_unchanged_and_is_queued(
    stream_guard: StreamGuard, index: VectorStoreIndex, queue: ReviewQueue, asynchronous: bool
) -> None:
    inner = index.as_query_engine(llm=ScriptedLLM(text=CONTROVERSIAL_STREAM, chunk=3), streaming=True)
    guarded = GuardedQueryEngine(inner, stream_guard=stream_guard, policy=REVIEW_CONTROVERSIAL, review=queue)

    if asynchronous:
        response = await guarded.aquery(PLANTED_SAFE_PROMPT)
        text = "".join([delta async for delta in response.async_response_gen()])
    else:
        response = guarded.query(PLANTED_SAFE_PROMPT)
        text = "".join(response.response_gen)

    assert text == CONTROVERSIAL_STREAM
    record = response.metadata["qwen3guard"]
    assert record["prompt"]["action"] == "allow"
    answer = record["response"]
    assert (answer["action"], answer["risk"], answer["role"]) == ("review", "Controversial", "response")
    only_pending(queue, answer["review_id"], "llamaindex.query_engine", "response")


def test_controversial_node_is_kept_unchanged_and_queued(gen_guard: GenGuard, queue: ReviewQueue) -> None:
    nodes = [NodeWithScore(node=TextNode(text=t, id_=f"n{i}"), score=0.5) for i, t in enumerate([SAFE_PROMPT, CONTROVERSIAL_PROMPT])]
    post = QwenGuardNodePostprocessor(gen_guard, policy=REVIEW_CONTROVERSIAL, review=queue)

    kept = post.postprocess_nodes(nodes, query_str=SAFE_PROMPT)

    assert [n.node.get_content() for n in kept] == [SAFE_PROMPT, CONTROVERSIAL_PROMPT]
    decision = kept[1].node.metadata["qwen3guard"]
    assert (decision["action"], decision["risk"], decision["context_index"]) == ("review", "Controversial", 1)
    assert kept[1].node.get_content(metadata_mode=MetadataMode.LLM) == CONTROVERSIAL_PROMPT  # hidden from the LLM
    assert kept[1].node.get_content(metadata_mode=MetadataMode.EMBED) == CONTROVERSIAL_PROMPT
    only_pending(queue, decision["review_id"], "llamaindex.postprocessor", "prompt")


def test_a_controversial_node_reaches_the_llm_in_a_query_engine(gen_guard: GenGuard, queue: ReviewQueue) -> None:
    index = VectorStoreIndex.from_documents([Document(text=CONTROVERSIAL_PROMPT)], embed_model=MockEmbedding(embed_dim=8))
    post = QwenGuardNodePostprocessor(gen_guard, policy=REVIEW_CONTROVERSIAL, review=queue, check_query=False)

    response = index.as_query_engine(llm=MockLLM(), node_postprocessors=[post]).query(SAFE_PROMPT)

    assert CONTROVERSIAL_PROMPT in str(response) and "review_id" not in str(response)
    assert len(queue.list(status="pending")) == 1


def test_a_review_policy_without_a_queue_is_refused(gen_guard: GenGuard, index: VectorStoreIndex,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QWEN3GUARD_REVIEW_DB", raising=False)
    with pytest.raises(ValueError, match="review queue"):
        QwenGuardNodePostprocessor(gen_guard, policy=REVIEW_CONTROVERSIAL)
    with pytest.raises(ValueError, match="review queue"):
        GuardedQueryEngine(index.as_query_engine(llm=MockLLM()), gen_guard=gen_guard, policy=REVIEW_CONTROVERSIAL)


def test_the_review_database_comes_from_the_environment(gen_guard: GenGuard, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN3GUARD_REVIEW_DB", str(tmp_path / "env.db"))
    post = QwenGuardNodePostprocessor(gen_guard, policy=REVIEW_CONTROVERSIAL)

    kept = post.postprocess_nodes([NodeWithScore(node=TextNode(text=CONTROVERSIAL_PROMPT))])

    with ReviewQueue(tmp_path / "env.db") as queue:
        assert [i.id for i in queue.list(status="pending")] == [kept[0].node.metadata["qwen3guard"]["review_id"]]
