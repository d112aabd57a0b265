"""A node postprocessor that keeps unsafe queries and poisoned retrieved context away from the LLM.

Postprocessors run inside ``retrieve()`` before synthesis, so this is the one place where
LlamaIndex lets a guard see both the query and every retrieved chunk before either reaches the
model. Retrieved text is moderated in *prompt* mode: it is going into the model's context, and
prompt mode is where Qwen3Guard reports ``Jailbreak`` (indirect prompt injection).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Literal, Sequence

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from pydantic import SkipValidation
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from guard_core import Action, GenGuard, GuardViolation, Policy, Verdict

DEFAULT_REDACTION_NOTICE = "[This passage was removed by Qwen3Guard content moderation.]"
DEFAULT_METADATA_KEY = "qwen3guard"


def as_gen_guard(guard: GenGuard | str) -> GenGuard:
    """Accept an injected guard (shared, already loaded) or a model id / local directory to load."""
    if isinstance(guard, GenGuard):
        return guard
    if isinstance(guard, str) and guard.strip():
        return GenGuard.from_pretrained(guard)
    raise ValueError(f"guard must be a GenGuard or a model id / directory, got {type(guard).__name__}")


def prompt_messages(text: str) -> list[dict[str, str]]:
    """The one-turn conversation that asks Qwen3Guard to judge ``text`` as model input."""
    return [{"role": "user", "content": text}]


class QwenGuardNodePostprocessor(BaseNodePostprocessor):
    """Moderates the query and every retrieved node with Qwen3Guard-Gen before synthesis.

    The ``policy`` turns each verdict into an action: ``ALLOW`` keeps the node untouched, ``FLAG``
    keeps it and records the verdict under ``metadata_key`` (hidden from the LLM and the
    embedder), ``BLOCK`` drops it or, with ``blocked_nodes="redact"``, replaces its text with
    ``redaction_notice`` so the answer can still cite that a source was withheld. Kept nodes are
    copies, so documents in the docstore are never modified, and they keep their order and scores.

    A blocked query raises ``GuardViolation`` (``blocked_query="raise"``) or yields no nodes
    (``"empty"``, the synthesizer then answers from nothing). Verdicts are cached by a hash of
    the moderated text, so chunks that come back on every query are classified once.
    """

    policy: SkipValidation[Policy] = Field(
        default_factory=Policy, description="Maps each verdict to ALLOW / FLAG / BLOCK (per level and category)."
    )
    blocked_nodes: Literal["drop", "redact"] = Field(
        default="drop", description="What happens to a node the policy blocks."
    )
    blocked_query: Literal["raise", "empty"] = Field(
        default="raise", description="What happens when the policy blocks the query itself."
    )
    check_query: bool = Field(default=True, description="Moderate the query string as well as the nodes.")
    redaction_notice: str = Field(default=DEFAULT_REDACTION_NOTICE, min_length=1)
    metadata_key: str = Field(default=DEFAULT_METADATA_KEY, min_length=1)
    metadata_mode: MetadataMode = Field(
        default=MetadataMode.LLM, description="Which node content is moderated; LLM = what the model will read."
    )
    cache_size: int = Field(default=4096, ge=0, description="Verdicts kept in the content-hash cache (0 disables).")

    _guard: GenGuard = PrivateAttr()
    _cache: OrderedDict[str, Verdict] = PrivateAttr(default_factory=OrderedDict)
    _cache_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, guard: GenGuard | str, **data: Any) -> None:
        """``guard`` is a loaded ``GenGuard`` (share one across components) or a model id / directory."""
        super().__init__(**data)
        if not isinstance(self.policy, Policy):
            raise ValueError(f"policy must be a guard_core.Policy, got {type(self.policy).__name__}")
        self._guard = as_gen_guard(guard)

    @classmethod
    def class_name(cls) -> str:
        """Name LlamaIndex uses when serialising the component."""
        return "QwenGuardNodePostprocessor"

    @property
    def guard(self) -> GenGuard:
        """The Gen guard doing the moderation."""
        return self._guard

    def clear_cache(self) -> None:
        """Forget cached verdicts (e.g. after changing the guard model's threshold or checkpoint)."""
        with self._cache_lock:
            self._cache.clear()

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        texts, query = self._collect(nodes, query_bundle)
        known, missing = self._cached([query, *texts])
        verdicts = self._guard.moderate_batch([prompt_messages(t) for t in missing]) if missing else []
        return self._apply(nodes, texts, query, {**known, **self._remember(missing, verdicts)})

    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        texts, query = self._collect(nodes, query_bundle)
        known, missing = self._cached([query, *texts])
        verdicts = await self._guard.amoderate_batch([prompt_messages(t) for t in missing]) if missing else []
        return self._apply(nodes, texts, query, {**known, **self._remember(missing, verdicts)})

    def _collect(
        self, nodes: Sequence[NodeWithScore], query_bundle: QueryBundle | None
    ) -> tuple[list[str | None], str | None]:
        """The text to judge per node (None: nothing to judge) and the query text, validated up front."""
        texts: list[str | None] = []
        for i, item in enumerate(nodes):
            if not isinstance(item, NodeWithScore):
                raise ValueError(f"node {i} is {type(item).__name__}, expected llama_index NodeWithScore")
            text = item.node.get_content(metadata_mode=self.metadata_mode)
            texts.append(text if text.strip() else None)
        query = None
        if self.check_query and query_bundle is not None and query_bundle.query_str.strip():
            query = query_bundle.query_str
        return texts, query

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self._guard.model_id}\x00{text}".encode()).hexdigest()

    def _cached(self, texts: list[str | None]) -> tuple[dict[str, Verdict], list[str]]:
        """Cached verdicts, and the distinct texts still to judge: the single batch sent to the model."""
        known: dict[str, Verdict] = {}
        missing: list[str] = []
        with self._cache_lock:
            for text in dict.fromkeys(t for t in texts if t is not None):
                verdict = self._cache.get(self._key(text))
                if verdict is None:
                    missing.append(text)
                else:
                    known[text] = verdict
                    self._cache.move_to_end(self._key(text))
        return known, missing

    def _remember(self, texts: list[str], verdicts: list[Verdict]) -> dict[str, Verdict]:
        """Cache fresh verdicts (not failed ones: the next call should retry them) and return them by text."""
        fresh = dict(zip(texts, verdicts))
        if self.cache_size:
            with self._cache_lock:
                for text, verdict in fresh.items():
                    if verdict.error is None:
                        self._cache[self._key(text)] = verdict
                        self._cache.move_to_end(self._key(text))
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return fresh

    def _apply(
        self, nodes: list[NodeWithScore], texts: list[str | None], query: str | None, verdicts: dict[str, Verdict]
    ) -> list[NodeWithScore]:
        if query is not None:
            verdict = verdicts[query]
            if self.policy.blocks(verdict):
                if self.blocked_query == "raise":
                    raise GuardViolation(verdict)
                return []
        kept: list[NodeWithScore] = []
        for item, text in zip(nodes, texts):
            if text is None:
                kept.append(item)
                continue
            verdict = verdicts[text]
            action = self.policy.action_for(verdict)
            if action is Action.ALLOW:
                kept.append(item)
            elif action is Action.FLAG:
                kept.append(self._annotated(item, verdict, "flag"))
            elif self.blocked_nodes == "redact":
                redacted = self._annotated(item, verdict, "redact")
                redacted.node.set_content(self.redaction_notice)
                kept.append(redacted)
        return kept

    def _annotated(self, item: NodeWithScore, verdict: Verdict, action: str) -> NodeWithScore:
        """A copy of the node carrying its verdict in metadata the LLM and embedder never read."""
        node = item.node.model_copy(deep=True)
        node.metadata[self.metadata_key] = {**verdict.to_dict(), "action": action}
        for excluded in (node.excluded_llm_metadata_keys, node.excluded_embed_metadata_keys):
            if self.metadata_key not in excluded:
                excluded.append(self.metadata_key)
        return NodeWithScore(node=node, score=item.score)
