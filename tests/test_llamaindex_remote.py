"""Both LlamaIndex components with Gen served over HTTP (a real local vLLM-like server)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gen_server import GenServer, load_gen_model
from llama_index.core import Document, MockEmbedding, VectorStoreIndex
from llama_index.core.llms.mock import MockLLM

from guard_core import Category, GuardViolation, RemoteGenGuard
from guard_core.testing.cases import JAILBREAK_PROMPT, SAFE_ANSWER, SAFE_PROMPT, UNSAFE_PROMPT
from integrations.llamaindex import GuardedQueryEngine, QwenGuardNodePostprocessor
from tests.test_llamaindex import ScriptedLLM

FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def server(gen_dir: Path) -> Iterator[GenServer]:
    with GenServer(*load_gen_model(gen_dir)) as running:
        yield running


@pytest.fixture(scope="module")
def index() -> VectorStoreIndex:
    texts = [SAFE_PROMPT, UNSAFE_PROMPT, FRANCE, JAILBREAK_PROMPT]
    return VectorStoreIndex.from_documents([Document(text=t) for t in texts], embed_model=MockEmbedding(embed_dim=8))


def test_postprocessor_with_a_remote_guard_drops_unsafe_and_injected_nodes(server: GenServer, index: VectorStoreIndex) -> None:
    remote = RemoteGenGuard(server.base_url, model=server.model_name)
    engine = index.as_query_engine(llm=MockLLM(), node_postprocessors=[QwenGuardNodePostprocessor(remote)],
                                   similarity_top_k=4)

    response = engine.query(FRANCE)

    assert sorted(n.node.get_content() for n in response.source_nodes) == sorted([SAFE_PROMPT, FRANCE])
    assert JAILBREAK_PROMPT not in str(response)
    with pytest.raises(GuardViolation) as caught:
        engine.query(UNSAFE_PROMPT)
    assert caught.value.verdict.model == server.model_name


async def test_query_engine_with_a_server_url_checks_query_and_answer(server: GenServer, index: VectorStoreIndex,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QWEN3GUARD_GEN_MODEL", raising=False)  # the served name is discovered
    llm = ScriptedLLM(text=SAFE_ANSWER)
    guarded = GuardedQueryEngine(index.as_query_engine(llm=llm), gen_guard=server.base_url)

    response = await guarded.aquery(SAFE_PROMPT)

    assert str(response) == SAFE_ANSWER
    record = response.metadata["qwen3guard"]
    assert (record["prompt"]["risk"], record["response"]["risk"]) == ("Safe", "Safe")
    assert record["response"]["model"] == server.model_name
    with pytest.raises(GuardViolation) as caught:
        await guarded.aquery(UNSAFE_PROMPT)
    assert caught.value.verdict.categories == (Category.VIOLENT,)
    assert llm._calls == 1
