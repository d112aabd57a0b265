"""The moderation core every adapter is a skin of: which guard judges what, and what follows.

Adapters map their framework's types onto these calls and raise their framework's errors;
the rules live here, once:

- ``check_prompt``: a request before the model runs. The prompt checker is Gen when a Gen guard
  is configured, else the Stream guard's query heads (``prompt_check`` overrides). The last user
  turn and every untrusted-context item of the request (``conversation``) are judged; the
  strictest decision wins.
- ``check_context``: text going into the model's context (retrieved nodes, tool results), each
  judged on its own in prompt mode and cached by content, since the same chunks come back.
- ``check_answers``: complete answers. Gen judges them when configured (it reads the whole reply
  and detects refusals), else a Stream gate reads each one through.
- ``open_gate`` / ``stream_decision``: streamed answers, through ``StreamGate``; ``relay`` builds on
  them for adapters that hand back the model's own chunks.
- ``Decision``: a verdict, the action the policy takes on it and the review item it opened, with
  one JSON form (``to_dict``) for every adapter's metadata.

Every method has a blocking and an asyncio form over one implementation (see ``steps``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .backends import CONFIGURED, GenBackend, check_guard_name, default_policy, gen_backend, stream_backend
from .config import DEFAULT_CONSECUTIVE, DEFAULT_REFUSAL, Settings, check_count, check_holdback_tokens
from .conversation import Conversation
from .messages import Message, check_text
from .policy import Action, Policy
from .steps import Flow, Step, arun, call, run, value
from .types import RiskLevel, Verdict

if TYPE_CHECKING:
    from .gate import StreamGate
    from .review import ReviewQueue
    from .stream import StreamGuard

logger = logging.getLogger("guard_core.moderator")

PromptCheck = Literal["gen", "stream", "off"]


@dataclass(frozen=True)
class Decision:
    """A verdict and what the policy does with it.

    ``review_id`` is the review item opened for an ``Action.REVIEW``; ``context_index`` says which
    untrusted-context item of the request decided (None: the conversation itself).
    """

    verdict: Verdict
    action: Action
    review_id: str | None = None
    context_index: int | None = None

    @property
    def blocked(self) -> bool:
        """True when the content must be stopped."""
        return self.action is Action.BLOCK

    def to_dict(self) -> dict[str, Any]:
        """The JSON form every adapter attaches under ``qwen3guard`` and puts in events."""
        return {"action": self.action.value, **self.verdict.to_dict(), "review_id": self.review_id,
                "context_index": self.context_index}


@dataclass(frozen=True)
class PromptResult:
    """``check_prompt``'s answer: the decision (None when prompts are not checked) and, when the
    Stream guard judged the prompt, its open gate, ready to judge the answer without a second prefill."""

    decision: Decision | None
    gate: StreamGate | None = None


def strictest(decisions: Sequence[Decision]) -> Decision:
    """The decision that rules a set: strictest action, then worst risk, then the first one."""
    return max(reversed(decisions), key=lambda d: (d.action.rank, d.verdict.risk.severity))


class Moderator:
    """The guards, the policies and the review queue behind one adapter instance.

    ``gen_guard`` / ``stream_guard`` are anything ``backends`` accepts (a loaded guard, a hub id,
    a directory, server URLs, ``CONFIGURED`` for the environment) or None for "not used"; guards
    given by name load on first use. ``policy`` judges answers, ``prompt_policy`` (default
    ``policy``) prompts and context; the default policy honours ``QWEN3GUARD_FAIL_OPEN``.
    ``review`` is the ``ReviewQueue`` for ``Action.REVIEW`` (default: ``QWEN3GUARD_REVIEW_DB``);
    ``source`` names the adapter in review items. Thread-safe and shareable.
    """

    def __init__(
        self,
        *,
        gen_guard: Any = None,
        stream_guard: Any = None,
        policy: Policy | None = None,
        prompt_policy: Policy | None = None,
        prompt_check: PromptCheck | None = None,
        holdback_tokens: int = DEFAULT_CONSECUTIVE,
        refusal: str = DEFAULT_REFUSAL,
        review: ReviewQueue | None = CONFIGURED,
        source: str = "guard_core",
        context_cache_size: int = 4096,
        settings: Settings | None = None,
    ) -> None:
        if gen_guard is None and stream_guard is None:
            raise ValueError("pass a gen_guard, a stream_guard or both")
        check = prompt_check or ("gen" if gen_guard is not None else "stream")
        if check not in ("gen", "stream", "off"):
            raise ValueError(f"prompt_check must be 'gen', 'stream' or 'off', got {prompt_check!r}")
        if (check == "gen" and gen_guard is None) or (check == "stream" and stream_guard is None):
            raise ValueError(f"prompt_check={check!r} needs a {check}_guard")
        for name, given in (("policy", policy), ("prompt_policy", prompt_policy)):
            if given is not None and not isinstance(given, Policy):
                raise TypeError(f"{name} must be a guard_core.Policy, got {type(given).__name__}")
        if not isinstance(refusal, str) or not refusal.strip():
            raise ValueError("refusal must be a non-empty string")
        check_count(context_cache_size, "context_cache_size", minimum=0, hint=" (0 disables the cache)")
        self.settings = settings or Settings.from_env()
        self.policy = policy or default_policy(self.settings)
        self.prompt_policy = prompt_policy or self.policy
        self.prompt_check: PromptCheck = check
        self.holdback_tokens = check_holdback_tokens(holdback_tokens)
        self.refusal = refusal
        self.source = source
        self.review = self._review_queue(review)
        stream_name = self.settings.stream_model if stream_guard is CONFIGURED else stream_guard
        for kind, name in (("Gen", gen_guard), ("Stream", stream_name)):
            if isinstance(name, str):
                check_guard_name(kind, name)
        self._gen = gen_guard if _is_name(gen_guard) else gen_backend(gen_guard)
        self._stream = stream_guard if _is_name(stream_guard) else stream_backend(stream_guard)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Verdict] = OrderedDict()
        self._cache_size = context_cache_size

    def _review_queue(self, review: Any) -> ReviewQueue | None:
        """The queue: given, opened from a path or URL (like ``QWEN3GUARD_REVIEW_DB``), or the environment's."""
        if review is CONFIGURED:
            review = self.settings.review_db or None
        if isinstance(review, (str, os.PathLike)):
            from .review import ReviewQueue

            review = ReviewQueue(review, store_content=self.settings.review_store_content)
        elif review is not None and not callable(getattr(review, "submit", None)):
            raise TypeError(f"review must be a guard_core.review.ReviewQueue, a database path or URL, or None, got "
                            f"{type(review).__name__}")
        if review is None and (self.policy.reviews or self.prompt_policy.reviews):
            raise ValueError("the policy sends content to human review (Action.REVIEW) but there is no review queue: "
                             "pass review=ReviewQueue(...) or set QWEN3GUARD_REVIEW_DB")
        return review

    @property
    def gen_guard(self) -> GenBackend | None:
        """The Gen guard (loaded now if it was given by name), or None when not configured."""
        with self._lock:
            if self._gen is not None and _is_name(self._gen):
                self._gen = gen_backend(self._gen, settings=self.settings)
            return self._gen

    @property
    def stream_guard(self) -> StreamGuard | None:
        """The Stream guard (loaded now if it was given by name), or None when not configured."""
        with self._lock:
            if self._stream is not None and _is_name(self._stream):
                self._stream = stream_backend(self._stream, settings=self.settings)
            return self._stream

    @property
    def has_gen(self) -> bool:
        """True when a Gen guard is configured (without loading it)."""
        return self._gen is not None

    @property
    def has_stream(self) -> bool:
        """True when a Stream guard is configured (without loading it)."""
        return self._stream is not None

    def clear_context_cache(self) -> None:
        """Forget cached context verdicts (e.g. after a checkpoint was retrained in place under the same name)."""
        with self._lock:
            self._cache.clear()

    def load(self) -> None:
        """Load every configured guard now (servers do this at start-up so the first request is fast)."""
        self.gen_guard, self.stream_guard  # noqa: B018 - the properties load

    # Whole prompts, context and answers.

    def check_prompt(self, conversation: Conversation, *, request_id: str | None = None, keep_gate: bool = False) -> PromptResult:
        """Judge a request before the model runs; ``keep_gate`` keeps the Stream prompt check's gate open."""
        return run(self.prompt_flow(_conversation(conversation), request_id, keep_gate))

    async def acheck_prompt(self, conversation: Conversation, *, request_id: str | None = None,
                            keep_gate: bool = False) -> PromptResult:
        """``check_prompt`` for asyncio."""
        return await arun(self.prompt_flow(_conversation(conversation), request_id, keep_gate))

    def check_context(self, texts: Sequence[str], *, request_id: str | None = None) -> list[Decision]:
        """Judge untrusted context (retrieved documents, tool results) one text at a time, in prompt mode."""
        return run(self.context_flow(_texts(texts), request_id))

    async def acheck_context(self, texts: Sequence[str], *, request_id: str | None = None) -> list[Decision]:
        """``check_context`` for asyncio."""
        return await arun(self.context_flow(_texts(texts), request_id))

    def check_answers(self, conversation: Conversation, texts: Sequence[str], *, request_id: str | None = None,
                      engine: Literal["gen", "stream"] | None = None) -> list[Decision | None]:
        """Judge complete answers to ``conversation`` (None for an answer without text)."""
        return run(self.answers_flow(_conversation(conversation), _texts(texts), request_id, engine))

    async def acheck_answers(self, conversation: Conversation, texts: Sequence[str], *, request_id: str | None = None,
                             engine: Literal["gen", "stream"] | None = None) -> list[Decision | None]:
        """``check_answers`` for asyncio."""
        return await arun(self.answers_flow(_conversation(conversation), _texts(texts), request_id, engine))

    # Streamed answers.

    def open_gate(self, conversation: Conversation, *, holdback_tokens: int | None = None) -> StreamGate:
        """A ``StreamGate`` for one streamed answer to ``conversation`` (one prefill)."""
        return run(self.gate_flow(_conversation(conversation), holdback_tokens))

    async def aopen_gate(self, conversation: Conversation, *, holdback_tokens: int | None = None) -> StreamGate:
        """``open_gate`` without blocking the event loop (the model loads and prefills off-loop)."""
        return await arun(self.gate_flow(_conversation(conversation), holdback_tokens))

    def stream_decision(self, gate: StreamGate, conversation: Conversation, *, request_id: str | None = None) -> Decision:
        """The decision on a streamed answer once its gate has finished (or blocked)."""
        return run(self.stream_decision_flow(gate, _conversation(conversation), request_id))

    async def astream_decision(self, gate: StreamGate, conversation: Conversation, *, request_id: str | None = None) -> Decision:
        """``stream_decision`` for asyncio (a review item is written off the event loop)."""
        return await arun(self.stream_decision_flow(gate, _conversation(conversation), request_id))

    def refusal_after(self, delivered: str = "") -> str:
        """The refusal that replaces blocked text, set apart from text already delivered."""
        return f"\n\n{self.refusal}" if delivered.strip() else self.refusal

    # Flows: one implementation behind each sync / async pair.

    def gate_flow(self, conversation: Conversation, holdback_tokens: int | None = None) -> Flow[StreamGate]:
        """``open_gate`` as a flow."""
        guard = yield self._guard_step("stream")
        holdback = self.holdback_tokens if holdback_tokens is None else holdback_tokens
        turns = conversation.stream_turns()
        gate = yield Step(lambda: guard.gate(turns, self.policy, holdback), lambda: guard.agate(turns, self.policy, holdback))
        return gate

    def stream_decision_flow(self, gate: StreamGate, conversation: Conversation, request_id: str | None = None,
                             *, record_review: bool = True) -> Flow[Decision]:
        """``stream_decision`` as a flow: the gate decides blocking; a non-safe verdict it let through
        is flagged (or sent to review; ``record_review=False`` when another check of the same answer
        has the last word and records it, so one answer never opens two review items)."""
        if gate.blocked:
            return Decision(gate.verdict, Action.BLOCK)
        decision = yield from self._decide(gate.verdict, self.policy, conversation.with_answer(gate.delivered), request_id,
                                           record_review)
        if decision.blocked:
            return Decision(decision.verdict, Action.FLAG)
        return decision

    def prompt_flow(self, conversation: Conversation, request_id: str | None = None, keep_gate: bool = False) -> Flow[PromptResult]:
        """``check_prompt`` as a flow (for adapters composing their own flows)."""
        if self.prompt_check == "off":
            return PromptResult(None)
        gate: StreamGate | None = None
        decisions: list[Decision] = []
        if conversation.has_prompt and self.prompt_check == "gen":
            gen = yield self._guard_step("gen")
            turns = list(conversation.turns)
            verdict = yield Step(lambda: gen.moderate(turns), lambda: gen.amoderate(turns))
            decisions.append((yield from self._decide(verdict, self.prompt_policy, turns, request_id)))
        elif conversation.has_prompt:
            gate = yield from self.gate_flow(conversation)
            decisions.append((yield from self._decide(gate.prompt_verdict, self.prompt_policy, list(conversation.turns), request_id)))
        try:
            decisions += yield from self.context_flow(list(conversation.context), request_id)
        except BaseException:
            if gate is not None:
                gate.close()
            raise
        if not decisions:
            return PromptResult(None)
        decision = strictest(decisions)
        if gate is not None and (not keep_gate or decision.blocked):
            gate.close()
            gate = None
        return PromptResult(decision, gate)

    def context_flow(self, texts: list[str], request_id: str | None = None, *,
                     names: Sequence[str] | None = None) -> Flow[list[Decision]]:
        """``check_context`` as a flow. A text the guard cannot read (a NUL byte, a lone surrogate:
        scraped pages and PDF extraction leave them) is blocked, failing closed, without failing the
        others: it is third-party text the application cannot fix first. ``names`` name the texts in
        such an error (default ``context item i``; the LlamaIndex postprocessor's ``node i``)."""
        rejected: dict[int, Verdict] = {}
        for index, text in enumerate(texts):
            try:
                check_text(text, where=names[index] if names else f"context item {index}")
            except ValueError as exc:
                logger.warning("blocked context the guard cannot read: %s", exc)
                rejected[index] = Verdict(RiskLevel.UNSAFE, error=str(exc), error_kind="rejected")
        readable = [i for i in range(len(texts)) if i not in rejected]
        judged = dict(zip(readable, (yield from self._context_verdicts([texts[i] for i in readable]))))
        decisions = []
        for index, text in enumerate(texts):
            if index in rejected:
                decisions.append(Decision(rejected[index], Action.BLOCK, context_index=index))
                continue
            decision = yield from self._decide(judged[index], self.prompt_policy, [Message("user", text)], request_id)
            decisions.append(Decision(decision.verdict, decision.action, decision.review_id, index))
        return decisions

    def _context_verdicts(self, texts: list[str]) -> Flow[list[Verdict]]:
        """Prompt-mode verdicts of standalone texts, from the cache where the same text was judged."""
        if not texts:
            return []
        use_gen = self.prompt_check != "stream" and self.has_gen
        guard = yield self._guard_step("gen" if use_gen else "stream")
        keys = [hashlib.sha256(f"{guard.model_id}\x00{text}".encode()).hexdigest() for text in texts]
        known = self._cached(keys)
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in known))
        if missing and use_gen:
            batch = [[Message("user", t)] for t in missing]
            fresh = yield Step(lambda: guard.moderate_batch(batch), lambda: guard.amoderate_batch(batch))
        elif missing:
            fresh = []
            for text in missing:
                session = yield Step(lambda t=text: guard.session([Message("user", t)]),
                                     lambda t=text: guard.asession([Message("user", t)]))
                session.close()
                fresh.append(session.prompt_verdict)
        else:
            fresh = []
        by_text = dict(zip(missing, fresh))
        self._remember({k: by_text[t] for t, k in zip(texts, keys) if t in by_text})
        return [known.get(k) or by_text[t] for t, k in zip(texts, keys)]

    def answers_flow(self, conversation: Conversation, texts: list[str], request_id: str | None = None,
                     engine: Literal["gen", "stream"] | None = None) -> Flow[list[Decision | None]]:
        """``check_answers`` as a flow."""
        use_gen = engine == "gen" or (engine is None and self.has_gen)
        judged = [i for i, t in enumerate(texts) if t.strip()]
        out: list[Decision | None] = [None] * len(texts)
        if use_gen and judged:
            gen = yield self._guard_step("gen")
            batch = [conversation.with_answer(texts[i]) for i in judged]
            verdicts = yield Step(lambda: gen.moderate_batch(batch), lambda: gen.amoderate_batch(batch))
            for i, verdict, turns in zip(judged, verdicts, batch):
                out[i] = yield from self._decide(verdict, self.policy, turns, request_id)
            return out
        for i in judged:
            gate = yield from self.gate_flow(conversation)
            try:
                yield Step(lambda t=texts[i]: gate.push(t), lambda t=texts[i]: gate.apush(t))
                yield Step(gate.finish, gate.afinish)
                out[i] = yield from self.stream_decision_flow(gate, conversation, request_id)
            finally:
                gate.close()
        return out

    def _decide(self, verdict: Verdict, policy: Policy, turns: list[Message], request_id: str | None,
                record_review: bool = True) -> Flow[Decision]:
        action = policy.action_for(verdict)
        if action is not Action.REVIEW or self.review is None or not record_review:
            return Decision(verdict, action)
        queue, dicts = self.review, [m.as_dict() for m in turns]
        options = {"source": self.source, "conversation": dicts, "request_id": request_id}
        review_id = yield Step(lambda: queue.submit(verdict, **options), lambda: queue.asubmit(verdict, **options))
        logger.info("%s sent to review as %s (%s)", verdict.role, review_id, verdict.risk.value)
        return Decision(verdict, action, review_id)

    def _cached(self, keys: list[str]) -> dict[str, Verdict]:
        with self._lock:
            found = {k: self._cache[k] for k in keys if k in self._cache}
            for k in found:
                self._cache.move_to_end(k)
            return found

    def _remember(self, fresh: dict[str, Verdict]) -> None:
        """Cache judged verdicts (failed ones are retried next time)."""
        if not self._cache_size:
            return
        with self._lock:
            for key, verdict in fresh.items():
                if verdict.error is None:
                    self._cache[key] = verdict
                    self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _guard_step(self, kind: Literal["gen", "stream"]) -> Step[Any]:
        """The guard of ``kind``: at once when loaded, else loaded (off the event loop for asyncio)."""
        loaded = self._gen if kind == "gen" else self._stream
        if loaded is None:
            raise ValueError(f"this check needs a {kind}_guard, and none is configured")
        if not _is_name(loaded):
            return value(loaded)
        return call(lambda: self.gen_guard if kind == "gen" else self.stream_guard)


def _is_name(guard: Any) -> bool:
    """True for what names a guard still to load (None, ``CONFIGURED``, an id, a directory, URLs)."""
    return guard is None or guard is CONFIGURED or isinstance(guard, str)


def _conversation(value: Any) -> Conversation:
    """The public checks take a ``Conversation``; anything else is a ``TypeError`` saying how to build one."""
    if not isinstance(value, Conversation):
        raise TypeError(f"conversation must be a guard_core.conversation.Conversation, got {type(value).__name__}; build "
                        "one with from_messages([...]) or from_text('...')")
    return value


def _texts(texts: Any) -> list[str]:
    """The texts of a public check: a list of strings (one string would be judged letter by letter)."""
    if isinstance(texts, (str, bytes, Mapping, Set)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}; wrap one text in a list: [text]")
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a string, got {type(text).__name__}")
    return out
