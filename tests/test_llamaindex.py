"""LlamaIndex adapter on real llama-index-core objects and the trained tiny Gen checkpoint.

Node texts and queries are GEN_CASES texts, the only ones the tiny model answers reliably.
MockLLM (no max_tokens) echoes its prompt, so its answer shows exactly which context reached it.
"""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from llama_index.core import Document, MockEmbedding, VectorStoreIndex, get_response_synthesizer
from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.llms.types import CompletionResponse, CompletionResponseGen, LLMMetadata
from llama_index.core.base.response.schema import PydanticResponse
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.mock import MockLLM
from llama_index.core.schema import ImageNode, MediaResource, MetadataMode, Node, NodeWithScore, QueryBundle, TextNode
from pydantic import BaseModel, PrivateAttr

from guard_core import CONFIGURED, Action, Category, GenGuard, GuardViolation, Moderator, Policy, RiskLevel, StreamGuard
from guard_core.testing import PLANTED_SAFE_PROMPT, PLANTED_UNSAFE_PROMPT
from guard_core.testing.cases import (
    JAILBREAK_PROMPT,
    REFUSAL_ANSWER,
    SAFE_ANSWER,
    SAFE_PROMPT,
    UNSAFE_ANSWER,
    UNSAFE_PROMPT,
)
from integrations.llamaindex import (
    DEFAULT_REDACTION_NOTICE,
    DEFAULT_REFUSAL,
    GuardedQueryEngine,
    QwenGuardNodePostprocessor,
)

FRANCE = "What is the capital of France?"
CORPUS = [SAFE_PROMPT, UNSAFE_PROMPT, FRANCE, JAILBREAK_PROMPT]


class ScriptedLLM(CustomLLM):
    """A real LlamaIndex LLM that answers ``text`` (streamed in ``chunk``-sized deltas) and counts calls."""

    text: str
    chunk: int = 4
    _calls: int = PrivateAttr(default=0)
    _streamed: int = PrivateAttr(default=0)

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata()

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self._calls += 1
        return CompletionResponse(text=self.text)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        self._calls += 1

        def gen() -> CompletionResponseGen:
            for start in range(0, len(self.text), self.chunk):
                self._streamed += 1
                yield CompletionResponse(text=self.text[: start + self.chunk], delta=self.text[start : start + self.chunk])

        return gen()


def build_index(texts: list[str]) -> VectorStoreIndex:
    return VectorStoreIndex.from_documents([Document(text=t) for t in texts], embed_model=MockEmbedding(embed_dim=8))


@pytest.fixture(scope="module")
def index() -> VectorStoreIndex:
    return build_index(CORPUS)


def scored_nodes() -> list[NodeWithScore]:
    return [NodeWithScore(node=TextNode(text=t, id_=f"n{i}"), score=0.9 - i / 10) for i, t in enumerate(CORPUS)]


def texts_of(nodes: list[NodeWithScore]) -> list[str]:
    return [n.node.get_content() for n in nodes]


class CountingGuard:
    """Counts how many texts reach the model, to prove the cache and the single batch."""

    def __init__(self, guard: GenGuard, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[int] = []
        real = guard.moderate_batch

        def counting(conversations: Any) -> Any:
            conversations = list(conversations)
            self.batches.append(len(conversations))
            return real(conversations)

        monkeypatch.setattr(guard, "moderate_batch", counting)


def test_query_engine_drops_unsafe_and_injected_nodes_and_caches(
    gen_guard: GenGuard, index: VectorStoreIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = CountingGuard(gen_guard, monkeypatch)
    post = QwenGuardNodePostprocessor(gen_guard)
    engine = index.as_query_engine(llm=MockLLM(), node_postprocessors=[post], similarity_top_k=4)

    response = engine.query(FRANCE)

    assert sorted(texts_of(response.source_nodes)) == sorted([SAFE_PROMPT, FRANCE])
    assert SAFE_PROMPT in str(response)
    assert UNSAFE_PROMPT not in str(response) and JAILBREAK_PROMPT not in str(response)
    assert counter.batches == [1, 4]  # the query, then the 4 nodes in one call

    again = engine.query(FRANCE)
    assert sorted(texts_of(again.source_nodes)) == sorted([SAFE_PROMPT, FRANCE])
    assert counter.batches == [1, 4, 1]  # the nodes' verdicts came from the Moderator's cache


def test_redaction_keeps_order_scores_and_leaves_the_docstore_alone(gen_guard: GenGuard) -> None:
    nodes = scored_nodes()
    out = QwenGuardNodePostprocessor(gen_guard, blocked_nodes="redact").postprocess_nodes(nodes, query_str=FRANCE)

    assert [n.node.node_id for n in out] == ["n0", "n1", "n2", "n3"]
    assert [n.score for n in out] == [n.score for n in nodes]
    assert texts_of(out) == [SAFE_PROMPT, DEFAULT_REDACTION_NOTICE, FRANCE, DEFAULT_REDACTION_NOTICE]
    assert out[0] is nodes[0] and out[2] is nodes[2]
    assert out[1].node.metadata["qwen3guard"]["categories"] == ["Violent"]
    redacted = out[3].node.metadata["qwen3guard"]
    assert {k: redacted[k] for k in ("action", "risk", "categories", "role", "review_id", "context_index")} == {
        "action": "block", "risk": "Unsafe", "categories": ["Jailbreak"], "role": "prompt", "review_id": None,
        "context_index": 3,
    }
    assert out[3].node.get_content(metadata_mode=MetadataMode.LLM) == DEFAULT_REDACTION_NOTICE
    assert texts_of(nodes) == CORPUS and all(not n.node.metadata for n in nodes)


def test_redaction_removes_the_blocked_metadata_the_llm_would_read(stream_guard: StreamGuard) -> None:
    node = TextNode(text=FRANCE, metadata={"source_note": PLANTED_UNSAFE_PROMPT, "file_name": "notes.txt"},
                    excluded_llm_metadata_keys=["file_name"])
    post = QwenGuardNodePostprocessor(moderator=Moderator(stream_guard=stream_guard), blocked_nodes="redact")

    out = post.postprocess_nodes([NodeWithScore(node=node, score=0.5)], query_str=FRANCE)

    assert out[0].node.metadata["qwen3guard"]["action"] == "block"
    assert out[0].node.get_content(metadata_mode=MetadataMode.LLM) == DEFAULT_REDACTION_NOTICE
    assert out[0].node.metadata["file_name"] == "notes.txt"  # not shown to the LLM, so not judged, and kept
    echoed = str(get_response_synthesizer(llm=MockLLM(), response_mode="compact").synthesize(FRANCE, nodes=out))
    assert DEFAULT_REDACTION_NOTICE in echoed and PLANTED_UNSAFE_PROMPT not in echoed
    assert node.metadata["source_note"] == PLANTED_UNSAFE_PROMPT  # the retrieved node itself is untouched


async def test_flag_policy_annotates_without_leaking_into_the_llm_prompt(
    gen_guard: GenGuard, index: VectorStoreIndex
) -> None:
    policy = Policy(actions={RiskLevel.UNSAFE: Action.FLAG}, category_actions={Category.JAILBREAK: Action.BLOCK})
    post = QwenGuardNodePostprocessor(gen_guard, policy=policy)
    engine = index.as_query_engine(llm=MockLLM(), node_postprocessors=[post], similarity_top_k=4)

    response = await engine.aquery(FRANCE)

    by_text = {n.node.get_content(): n.node for n in response.source_nodes}
    assert sorted(by_text) == sorted([SAFE_PROMPT, UNSAFE_PROMPT, FRANCE])
    flagged = by_text[UNSAFE_PROMPT].metadata["qwen3guard"]
    assert (flagged["risk"], flagged["categories"], flagged["action"]) == ("Unsafe", ["Violent"], "flag")
    assert "qwen3guard" not in by_text[FRANCE].metadata
    assert UNSAFE_PROMPT in str(response) and JAILBREAK_PROMPT not in str(response)
    assert "qwen3guard" not in str(response) and "Violent" not in str(response)


def test_unsafe_query_raises_before_synthesis(gen_guard: GenGuard, index: VectorStoreIndex) -> None:
    llm = ScriptedLLM(text=SAFE_ANSWER)
    engine = index.as_query_engine(llm=llm, node_postprocessors=[QwenGuardNodePostprocessor(gen_guard)])

    with pytest.raises(GuardViolation) as caught:
        engine.query(JAILBREAK_PROMPT)

    assert caught.value.verdict.categories == (Category.JAILBREAK,)
    assert llm._calls == 0


async def test_blocked_query_can_return_no_nodes_async(gen_guard: GenGuard) -> None:
    post = QwenGuardNodePostprocessor(gen_guard, blocked_query="empty")

    assert await post.apostprocess_nodes(scored_nodes(), query_str=UNSAFE_PROMPT) == []
    kept = await post.apostprocess_nodes(scored_nodes(), query_bundle=QueryBundle(SAFE_PROMPT))
    assert texts_of(kept) == [SAFE_PROMPT, FRANCE]


def test_postprocessor_rejects_bad_input(gen_guard: GenGuard) -> None:
    with pytest.raises(ValueError, match="Gen guard .* or moderator="):
        QwenGuardNodePostprocessor()
    with pytest.raises(TypeError, match="GenGuard, a RemoteGenGuard"):
        QwenGuardNodePostprocessor(42)
    with pytest.raises(ValueError, match="blocked_nodes"):
        QwenGuardNodePostprocessor(gen_guard, blocked_nodes="hide")
    with pytest.raises(TypeError, match="guard_core.Policy"):
        QwenGuardNodePostprocessor(gen_guard, policy={"mode": "strict"})
    with pytest.raises(TypeError, match="expected llama_index NodeWithScore"):
        QwenGuardNodePostprocessor(gen_guard).postprocess_nodes([TextNode(text=FRANCE)])  # type: ignore[list-item]
    shared = Moderator(gen_guard=gen_guard)
    with pytest.raises(ValueError, match="moderator= or policy, not both"):
        QwenGuardNodePostprocessor(moderator=shared, policy=Policy())


@pytest.mark.parametrize("node", [ImageNode(image="aGk=", text=""), ImageNode(image_url="https://example.com/a.png", text=FRANCE),
                                  Node(image_resource=MediaResource(url="https://example.com/a.png")),
                                  Node(audio_resource=MediaResource(data=b"RIFF"))], ids=["image", "image-url", "image-resource", "audio"])
def test_nodes_with_media_are_refused_not_passed_unjudged(gen_guard: GenGuard, node: Any) -> None:
    nodes = [NodeWithScore(node=TextNode(text=FRANCE), score=1.0), NodeWithScore(node=node, score=0.5)]
    with pytest.raises(ValueError, match="node 1 carries .*reads text only"):
        QwenGuardNodePostprocessor(gen_guard).postprocess_nodes(nodes, query_str=FRANCE)


async def test_a_query_with_an_image_is_refused_not_passed_unjudged(stream_guard: StreamGuard, index: VectorStoreIndex) -> None:
    llm = ScriptedLLM(text="Paris.")
    engine = GuardedQueryEngine(index.as_query_engine(llm=llm), stream_guard=stream_guard)
    bundle = QueryBundle(FRANCE, image_path="/tmp/instructions.png")
    with pytest.raises(ValueError, match="query carries an image .*reads text only"):
        engine.query(bundle)
    with pytest.raises(ValueError, match="query carries an image"):
        await engine.aquery(bundle)
    assert llm._calls == 0
    post = QwenGuardNodePostprocessor(moderator=engine.moderator)
    with pytest.raises(ValueError, match="query carries an image"):
        post.postprocess_nodes([NodeWithScore(node=TextNode(text=FRANCE), score=1.0)], bundle)


@pytest.mark.parametrize(("text", "reason"), [("page 1\x00page 2", "NUL bytes"), ("broken \ud83d emoji", "lone surrogate U+D83D")],
                         ids=["nul", "surrogate"])
async def test_a_node_the_guard_cannot_read_is_blocked_and_the_others_go_on(gen_guard: GenGuard, text: str, reason: str) -> None:
    nodes = [NodeWithScore(node=TextNode(text=SAFE_PROMPT), score=1.0), NodeWithScore(node=TextNode(text=text), score=0.5),
             NodeWithScore(node=TextNode(text=UNSAFE_PROMPT), score=0.4)]
    assert texts_of(QwenGuardNodePostprocessor(gen_guard).postprocess_nodes(nodes, query_str=FRANCE)) == [SAFE_PROMPT]
    redacted = await QwenGuardNodePostprocessor(gen_guard, blocked_nodes="redact").apostprocess_nodes(nodes, query_str=FRANCE)
    assert texts_of(redacted) == [SAFE_PROMPT, DEFAULT_REDACTION_NOTICE, DEFAULT_REDACTION_NOTICE]
    decision = redacted[1].node.metadata["qwen3guard"]
    assert decision["action"] == "block" and decision["context_index"] == 1 and decision["error_kind"] == "rejected"
    assert decision["error"].startswith("node 1: ") and reason in decision["error"]


def test_a_deep_copy_shares_the_moderator_and_pickling_is_refused(gen_guard: GenGuard) -> None:
    post = QwenGuardNodePostprocessor(gen_guard, blocked_nodes="redact")
    copied = copy.deepcopy(post)
    assert copied.moderator is post.moderator and copied.blocked_nodes == "redact"
    assert post.model_copy(deep=True).moderator is post.moderator
    assert texts_of(copied.postprocess_nodes(scored_nodes(), query_str=FRANCE))[1] == DEFAULT_REDACTION_NOTICE
    with pytest.raises(TypeError, match="holds a loaded guard and cannot be pickled; build one in each process"):
        pickle.dumps(post)


def test_a_negative_cache_size_is_refused_when_built(gen_guard: GenGuard) -> None:
    with pytest.raises(ValueError, match="context_cache_size"):
        QwenGuardNodePostprocessor(gen_guard, cache_size=-1).postprocess_nodes(scored_nodes())


def test_guarded_engine_blocks_unsafe_query_before_the_wrapped_engine(gen_guard: GenGuard, index: VectorStoreIndex) -> None:
    llm = ScriptedLLM(text=SAFE_ANSWER)
    guarded = GuardedQueryEngine(index.as_query_engine(llm=llm), gen_guard=gen_guard)

    with pytest.raises(GuardViolation) as caught:
        guarded.query(UNSAFE_PROMPT)

    assert caught.value.verdict.categories == (Category.VIOLENT,)
    assert llm._calls == 0


def test_guarded_engine_passes_a_safe_answer_and_records_verdicts(gen_guard: GenGuard, index: VectorStoreIndex) -> None:
    guarded = GuardedQueryEngine(index.as_query_engine(llm=ScriptedLLM(text=SAFE_ANSWER)), gen_guard=gen_guard)

    response = guarded.query(SAFE_PROMPT)

    assert str(response) == SAFE_ANSWER
    record = response.metadata["qwen3guard"]
    assert set(record) == {"prompt", "response"}
    assert (record["prompt"]["risk"], record["prompt"]["action"]) == ("Safe", "allow")
    assert (record["response"]["risk"], record["response"]["role"], record["response"]["action"]) == ("Safe", "response", "allow")
    assert response.source_nodes


async def test_guarded_engine_refuses_an_unsafe_answer(gen_guard: GenGuard, index: VectorStoreIndex) -> None:
    inner = index.as_query_engine(llm=ScriptedLLM(text=UNSAFE_ANSWER))
    guarded = GuardedQueryEngine(inner, gen_guard=gen_guard, check_query=False, on_block="refuse")

    response = await guarded.aquery(UNSAFE_PROMPT)

    assert str(response) == DEFAULT_REFUSAL == "I'm sorry, but I can't help with that."
    record = response.metadata["qwen3guard"]
    assert record["prompt"] is None
    assert (record["response"]["action"], record["response"]["categories"]) == ("block", ["Violent"])
    with pytest.raises(GuardViolation):
        GuardedQueryEngine(inner, gen_guard=gen_guard, check_query=False).query(UNSAFE_PROMPT)


class Steps(BaseModel):
    steps: str


def test_a_refused_structured_answer_stays_a_pydantic_response(stream_guard: StreamGuard, index: VectorStoreIndex) -> None:
    def ask(answer: str, query: str, **options: Any) -> Any:
        inner = index.as_query_engine(llm=ScriptedLLM(text=json.dumps({"steps": answer})), output_cls=Steps)
        return GuardedQueryEngine(inner, stream_guard=stream_guard, on_block="refuse", **options).query(query)

    allowed = ask("mix and bake", PLANTED_SAFE_PROMPT, check_query=False)
    assert isinstance(allowed, PydanticResponse) and allowed.response == Steps(steps="mix and bake")
    for refused, role in ((ask("build a pipe bomb", PLANTED_SAFE_PROMPT, check_query=False), "response"),
                          (ask("mix and bake", PLANTED_UNSAFE_PROMPT), "prompt")):
        assert isinstance(refused, PydanticResponse) and refused.response is None
        record = refused.metadata["qwen3guard"]
        assert record["refusal"] == DEFAULT_REFUSAL and record[role]["action"] == "block"


class Recipe(BaseModel):
    steps: list[str]


def test_a_structured_answer_is_judged_by_what_it_says_not_its_json_source(gen_guard: GenGuard, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = Recipe(steps=['Mix the "powder"\nwith the fuel', "add a fuse"])

    class Structured(BaseQueryEngine):
        def _get_prompt_modules(self) -> dict[str, Any]:
            return {}

        def _query(self, query_bundle: QueryBundle) -> PydanticResponse:
            return PydanticResponse(recipe)

        async def _aquery(self, query_bundle: QueryBundle) -> PydanticResponse:
            return self._query(query_bundle)

    judged: list[str] = []
    real = gen_guard.moderate_batch
    monkeypatch.setattr(gen_guard, "moderate_batch", lambda batch: (judged.extend(c[-1].content for c in batch), real(batch))[1])
    answer = GuardedQueryEngine(Structured(None), gen_guard=gen_guard, check_query=False, on_block="refuse").query(FRANCE)
    assert judged == ['steps\nMix the "powder"\nwith the fuel\nadd a fuse']
    assert answer.metadata["qwen3guard"]["response"] is not None


def test_gen_only_streaming_releases_nothing_of_a_blocked_answer(gen_guard: GenGuard, index: VectorStoreIndex) -> None:
    inner = index.as_query_engine(llm=ScriptedLLM(text=UNSAFE_ANSWER), streaming=True)
    refused = GuardedQueryEngine(inner, gen_guard=gen_guard, check_query=False, on_block="refuse").query(UNSAFE_PROMPT)
    assert list(refused.response_gen) == [DEFAULT_REFUSAL]

    allowed_inner = index.as_query_engine(llm=ScriptedLLM(text=REFUSAL_ANSWER), streaming=True)
    allowed = GuardedQueryEngine(allowed_inner, gen_guard=gen_guard, check_query=False).query(UNSAFE_PROMPT)
    assert "".join(allowed.response_gen) == REFUSAL_ANSWER
    assert allowed.metadata["qwen3guard"]["response"]["refusal"] is True


def test_guarded_engine_rejects_bad_configuration(gen_guard: GenGuard, index: VectorStoreIndex) -> None:
    inner = index.as_query_engine(llm=MockLLM())
    with pytest.raises(TypeError, match="BaseQueryEngine"):
        GuardedQueryEngine(object(), gen_guard=gen_guard)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gen_guard, a stream_guard or both"):
        GuardedQueryEngine(inner)
    with pytest.raises(ValueError, match="on_block"):
        GuardedQueryEngine(inner, gen_guard=gen_guard, on_block="ignore")  # type: ignore[arg-type]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="holdback_tokens must be an int >= 0"):
            GuardedQueryEngine(inner, gen_guard=gen_guard, holdback_tokens=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="refusal"):
        GuardedQueryEngine(inner, gen_guard=gen_guard, refusal=" ")
    with pytest.raises(TypeError, match="guard_core.Moderator"):
        GuardedQueryEngine(inner, moderator="gen")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="moderator= or gen_guard, not both"):
        GuardedQueryEngine(inner, gen_guard=gen_guard, moderator=Moderator(gen_guard=gen_guard))


def test_cache_size_zero_judges_nodes_again(gen_guard: GenGuard, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingGuard(gen_guard, monkeypatch)
    post = QwenGuardNodePostprocessor(gen_guard, cache_size=0, check_query=False)

    assert texts_of(post.postprocess_nodes(scored_nodes())) == [SAFE_PROMPT, FRANCE]
    assert texts_of(post.postprocess_nodes(scored_nodes())) == [SAFE_PROMPT, FRANCE]
    assert counter.batches == [4, 4]


def test_clear_cache_makes_nodes_judged_again(gen_guard: GenGuard, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingGuard(gen_guard, monkeypatch)
    post = QwenGuardNodePostprocessor(gen_guard, check_query=False)
    post.postprocess_nodes(scored_nodes())
    post.postprocess_nodes(scored_nodes())
    assert counter.batches == [4]

    post.clear_cache()
    post.postprocess_nodes(scored_nodes())
    assert counter.batches == [4, 4]


def test_one_moderator_shared_by_both_components(gen_guard: GenGuard, index: VectorStoreIndex) -> None:
    shared = Moderator(gen_guard=gen_guard, refusal="Not here.")
    post = QwenGuardNodePostprocessor(moderator=shared, check_query=False)
    inner = index.as_query_engine(llm=ScriptedLLM(text=UNSAFE_ANSWER), node_postprocessors=[post], similarity_top_k=4)
    guarded = GuardedQueryEngine(inner, moderator=shared, check_query=False, on_block="refuse")

    response = guarded.query(UNSAFE_PROMPT)

    assert post.moderator is guarded.moderator is shared
    assert str(response) == "Not here."
    assert sorted(texts_of(response.source_nodes)) == sorted([SAFE_PROMPT, FRANCE])


def test_guards_given_by_directory_or_by_the_environment(gen_dir: Path, index: VectorStoreIndex,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QWEN3GUARD_GEN_URL", raising=False)
    monkeypatch.setenv("QWEN3GUARD_GEN_MODEL", str(gen_dir))
    post = QwenGuardNodePostprocessor(str(gen_dir))
    inner = index.as_query_engine(llm=ScriptedLLM(text=SAFE_ANSWER), node_postprocessors=[post], similarity_top_k=4)
    guarded = GuardedQueryEngine(inner, gen_guard=CONFIGURED)

    response = guarded.query(SAFE_PROMPT)

    assert str(response) == SAFE_ANSWER
    assert sorted(texts_of(response.source_nodes)) == sorted([SAFE_PROMPT, FRANCE])
    assert response.metadata["qwen3guard"]["prompt"]["model"] == post.moderator.gen_guard.model_id


def test_a_misspelt_postprocessor_option_is_an_error_not_a_silent_default(gen_guard: GenGuard) -> None:
    with pytest.raises(ValueError, match="blocked_node"):
        QwenGuardNodePostprocessor(gen_guard, blocked_node="redact")
