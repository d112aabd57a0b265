"""A node postprocessor that keeps unsafe queries and poisoned retrieved context away from the LLM.

Postprocessors run inside ``retrieve()``, before synthesis: there a guard sees the query and every
retrieved chunk before the model does. Nodes are the request's untrusted context, so they go to
``Moderator.check_context`` (prompt mode, where injected instructions come back as ``Jailbreak``).
A node the guard cannot read (a NUL byte, a lone surrogate) is blocked without asking the guard.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal, Sequence

from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from guard_core import METADATA_KEY, Action, Decision, GuardViolation, Moderator, Policy
from guard_core.conversation import from_text
from guard_core.steps import Flow, arun, run

DEFAULT_REDACTION_NOTICE = "[This passage was removed by Qwen3Guard content moderation.]"
#: Node fields holding non-text content (``ImageNode`` and the media resources of ``Node``).
_MEDIA_FIELDS = ("image", "image_path", "image_url", "image_resource", "audio_resource", "video_resource")


def build_moderator(moderator: Moderator | None, source: str, **options: Any) -> Moderator:
    """A component's one Moderator: ``moderator`` as given, else one built from ``options``
    (None = the Moderator's default, e.g. the environment's policy and review queue)."""
    given = {name: value for name, value in options.items() if value is not None}
    if moderator is None:
        return Moderator(source=source, **given)
    if not isinstance(moderator, Moderator):
        raise TypeError(f"moderator must be a guard_core.Moderator, got {type(moderator).__name__}")
    if given:
        raise ValueError(f"pass moderator= or {', '.join(given)}, not both (the Moderator already holds them)")
    return moderator


def query_text(bundle: QueryBundle) -> str:
    """The text of a query to judge; a query carrying an image (``image_path``, what multi-modal
    engines send to the model) raises ``ValueError``, as an image node does: the guard reads text
    only, and judging the words alone would let the image through unjudged."""
    if bundle.image_path:
        raise ValueError(f"the query carries an image ({bundle.image_path!r}): the guard reads text only, and passing it "
                         "on would let it through unjudged; send text-only queries to a guarded engine")
    return bundle.query_str


class QwenGuardNodePostprocessor(BaseNodePostprocessor):
    """Moderates the query and every retrieved node before synthesis.

    ``guard`` is the Gen guard in any form ``guard_core`` accepts, or pass a shared ``moderator``.
    Per node: ``ALLOW`` keeps it; ``FLAG`` / ``REVIEW`` keep a copy with ``Decision.to_dict()`` in
    ``metadata["qwen3guard"]`` (hidden from the LLM and embedder); ``BLOCK`` drops it or, with
    ``blocked_nodes="redact"``, replaces its text and removes the metadata judged with it. Order and
    scores are kept, the docstore is never modified. A blocked query raises ``GuardViolation`` or,
    with ``blocked_query="empty"``, yields no nodes.
    """

    blocked_nodes: Literal["drop", "redact"] = Field(default="drop", description="What happens to a node the policy blocks.")
    blocked_query: Literal["raise", "empty"] = Field(default="raise", description="What happens when the policy blocks the query.")
    check_query: bool = Field(default=True, description="Moderate the query string as well as the nodes.")
    redaction_notice: str = Field(default=DEFAULT_REDACTION_NOTICE, min_length=1)
    metadata_mode: MetadataMode = Field(default=MetadataMode.LLM, description="Node content moderated (LLM: what it reads).")

    _moderator: Moderator = PrivateAttr()
    #: A misspelt option is an error, not a silently kept default.
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    def __init__(self, guard: Any = None, *, moderator: Moderator | None = None, policy: Policy | None = None,
                 review: Any = None, cache_size: int | None = None, **data: Any) -> None:
        """``review`` is the ``ReviewQueue`` for ``Action.REVIEW`` (default: ``QWEN3GUARD_REVIEW_DB``)."""
        super().__init__(**data)
        if moderator is None and guard is None:
            raise ValueError("pass the Gen guard (a guard, model id, directory or server URL) or moderator=")
        self._moderator = build_moderator(moderator, "llamaindex.postprocessor", gen_guard=guard, policy=policy,
                                          review=review, context_cache_size=cache_size)

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> QwenGuardNodePostprocessor:
        """A copy shares the Moderator, as ``model_copy`` does: its loaded model and locks cannot be copied."""
        copied = self.model_copy()
        if memo is not None:
            memo[id(self)] = copied
        return copied

    def __getstate__(self) -> dict[str, Any]:
        """Refuse pickling: LlamaIndex would drop the Moderator and the copy would fail on first use."""
        raise TypeError(f"{self.class_name()} holds a loaded guard and cannot be pickled; build one in each process")

    @classmethod
    def class_name(cls) -> str:
        """Name LlamaIndex uses when serialising the component."""
        return "QwenGuardNodePostprocessor"

    @property
    def moderator(self) -> Moderator:
        """The Moderator judging queries and nodes (share it with other components)."""
        return self._moderator

    def clear_cache(self) -> None:
        """Forget cached node verdicts (e.g. after a checkpoint was retrained in place under the same name)."""
        self._moderator.clear_context_cache()

    def _postprocess_nodes(self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        return run(self._flow(nodes, query_bundle))

    async def _apostprocess_nodes(self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        return await arun(self._flow(nodes, query_bundle))

    def _flow(self, nodes: Sequence[NodeWithScore], query_bundle: QueryBundle | None) -> Flow[list[NodeWithScore]]:
        """The query first (a blocked one stops here), then every node with text, in one batch."""
        texts = [self._text(i, item) for i, item in enumerate(nodes)]
        query = query_text(query_bundle) if self.check_query and query_bundle is not None else ""
        if query.strip():
            decision = (yield from self._moderator.prompt_flow(from_text(query))).decision
            if decision is not None and decision.blocked:
                if self.blocked_query == "raise":
                    raise GuardViolation(decision.verdict)
                return []
        judged = [i for i, text in enumerate(texts) if text.strip()]
        decisions = yield from self._moderator.context_flow([texts[i] for i in judged], names=[f"node {i}" for i in judged])
        by_node = {i: replace(decision, context_index=i) for i, decision in zip(judged, decisions)}
        kept = (self._apply(item, by_node.get(i)) for i, item in enumerate(nodes))
        return [item for item in kept if item is not None]

    def _text(self, index: int, item: Any) -> str:
        if not isinstance(item, NodeWithScore):
            raise TypeError(f"node {index} is {type(item).__name__}, expected llama_index NodeWithScore")
        media = [name for name in _MEDIA_FIELDS if getattr(item.node, name, None)]
        if media:
            raise ValueError(f"node {index} carries {media[0]!r}: the guard reads text only, and passing it on would let it "
                             "through unjudged; keep image, audio and video nodes out of this retriever's results")
        return item.node.get_content(metadata_mode=self.metadata_mode)

    def _apply(self, item: NodeWithScore, decision: Decision | None) -> NodeWithScore | None:
        """The node as the policy leaves it: itself, an annotated or redacted copy, or None (dropped)."""
        if decision is None or decision.action is Action.ALLOW:
            return item
        if decision.blocked and self.blocked_nodes == "drop":
            return None
        node = item.node.model_copy(deep=True)
        if decision.blocked:
            # The blocked content was the text plus the metadata the moderated view shows: the notice
            # replaces both, or the synthesizer would still read the blocked metadata values.
            for key in self._judged_metadata_keys(node):
                del node.metadata[key]
            node.set_content(self.redaction_notice)
        node.metadata[METADATA_KEY] = decision.to_dict()
        for excluded in (node.excluded_llm_metadata_keys, node.excluded_embed_metadata_keys):
            if METADATA_KEY not in excluded:
                excluded.append(METADATA_KEY)
        return NodeWithScore(node=node, score=item.score)

    def _judged_metadata_keys(self, node: Any) -> list[str]:
        """The metadata keys ``get_content(self.metadata_mode)`` shows, i.e. the ones judged with the text."""
        if self.metadata_mode == MetadataMode.NONE:
            return []
        hidden = {MetadataMode.LLM: node.excluded_llm_metadata_keys, MetadataMode.EMBED: node.excluded_embed_metadata_keys}
        return [key for key in node.metadata if key not in hidden.get(self.metadata_mode, ())]
