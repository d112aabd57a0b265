"""Qwen3Guard-Stream: per-token moderation of a response while it is being generated.

``StreamGuard`` holds the model, tokenizer and the scheduler shared by all its sessions.
``StreamSession`` prefills one conversation once, then judges each response token with one
incremental step (reference 2.4 explains why upstream's per-token re-run is unusable on a CPU).
Text from any LLM is re-tokenized incrementally (``retokenize``); verdicts carry a full softmax
per head so policies can use thresholds; the response verdict follows upstream's debounce rule.

Long conversations: the Stream context is ``max_position_embeddings`` (8192). A prompt longer
than three quarters of it keeps its last part (the end of the last user turn, which is what the
query heads judge). When the response would overflow the context, the session re-prefills a
window made of the kept prompt and the most recent response tokens (half the context in all)
and carries on: moderation never stops, and each token is judged with as much context as fits.
"""

from __future__ import annotations

import codecs
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .loading import pick_device, pick_dtype, resolve_model_source
from .messages import Message, MessageLike
from .policy import Policy
from .retokenize import IncrementalTokenizer, StreamToken, byte_level_decoder
from .scheduler import Lane, StreamScheduler, Ticket
from .stream_model import GuardLogits, LabelMaps, Qwen3ForGuardModel
from .stream_template import RESPONSE_LEAD, encode_stream_prompt
from .tokenization import TextTokenizer
from .types import Category, RiskLevel, TokenVerdict, Verdict

logger = logging.getLogger("guard_core")

DEFAULT_STREAM_MODEL = "Qwen/Qwen3Guard-Stream-0.6B"
#: Upstream's debounce: two consecutive non-safe tokens flag the response (report section 4.4).
DEFAULT_CONSECUTIVE = 2


class _Query:
    """Marks the prompt position whose query heads give the prompt verdict."""


_QUERY = _Query()


def is_flagged(token: TokenVerdict) -> bool:
    """Upstream's per-token test: the token's label is Unsafe or Controversial."""
    return token.risk is not RiskLevel.SAFE


class Debounce:
    """Upstream's response aggregation: ``consecutive`` flagged tokens in a row flag the response.

    The triggering token's category becomes the response category; the response level is the
    worst level in the triggering run (a mixed Unsafe/Controversial pair flags as Unsafe, the
    cautious reading of the report's rule). A later, more severe run escalates the verdict.
    ``flags`` decides which tokens count (default: the model's label is not Safe); ``StreamGate``
    passes its policy here.
    """

    def __init__(self, consecutive: int = DEFAULT_CONSECUTIVE, flags: Callable[[TokenVerdict], bool] = is_flagged) -> None:
        if consecutive < 1:
            raise ValueError(f"consecutive must be >= 1, got {consecutive}")
        self.consecutive = consecutive
        self.flags = flags
        self.run: list[TokenVerdict] = []
        self.trigger: TokenVerdict | None = None
        self.risk = RiskLevel.SAFE
        self.worst: TokenVerdict | None = None

    def add(self, token: TokenVerdict) -> bool:
        """Account for the next token; True when this token flags (or escalates) the response."""
        if self.worst is None or token.probabilities.get(RiskLevel.UNSAFE, 0.0) > self.worst.probabilities.get(RiskLevel.UNSAFE, 0.0):
            self.worst = token
        if not self.flags(token):
            self.run.clear()
            return False
        self.run.append(token)
        if len(self.run) < self.consecutive:
            return False
        level = max((t.risk for t in self.run[-self.consecutive :]), key=lambda r: r.severity)
        if level is RiskLevel.SAFE:
            level = RiskLevel.UNSAFE
        if self.trigger is None or level.severity > self.risk.severity:
            self.trigger, self.risk = token, level
            return True
        return False

    @property
    def flagged(self) -> bool:
        """True once a run has flagged the response."""
        return self.trigger is not None

    def verdict(self, *, model: str = "", elapsed_s: float = 0.0) -> Verdict:
        """The response verdict so far."""
        source = self.trigger or self.worst
        probabilities = dict(source.probabilities) if source else {}
        categories = (self.trigger.category,) if self.trigger and self.trigger.category else ()
        return Verdict(self.risk, categories, None, probabilities, "response", model, elapsed_s)


@dataclass(frozen=True)
class _Softmaxed:
    risk: list[dict[RiskLevel, float]]
    category: list[dict[Category, float]]


def _softmax(risk_logits: torch.Tensor, cat_logits: torch.Tensor, risk_labels: Sequence[RiskLevel], cat_labels: Sequence[Category]) -> _Softmaxed:
    risk = torch.softmax(risk_logits.float(), dim=-1).tolist()
    cats = torch.softmax(cat_logits.float(), dim=-1).tolist()
    return _Softmaxed(
        [dict(zip(risk_labels, row)) for row in risk],
        [dict(zip(cat_labels, row)) for row in cats],
    )


def _argmax(probs: dict[Any, float]) -> Any:
    return max(probs, key=probs.__getitem__)


class StreamGuard:
    """A loaded Qwen3Guard-Stream model serving any number of concurrent sessions."""

    def __init__(
        self,
        model: Qwen3ForGuardModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model_id: str = "",
        consecutive: int = DEFAULT_CONSECUTIVE,
        max_context: int | None = None,
        max_tokens_per_step: int = 512,
    ) -> None:
        self.model = model
        self.tokens = TextTokenizer(tokenizer)
        self.labels = LabelMaps.from_config(model.config)
        self.model_id = model_id
        self.consecutive = consecutive
        self.max_context = max_context or int(model.config.max_position_embeddings)
        if self.max_context < 64:
            raise ValueError(f"max_context must be at least 64 tokens, got {self.max_context}")
        self.scheduler = StreamScheduler(model, max_tokens_per_step=max_tokens_per_step)

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str = DEFAULT_STREAM_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> StreamGuard:
        """Load a Stream checkpoint (hub id or local directory) with our own model class.

        No ``trust_remote_code``: the released weights load into ``Qwen3ForGuardModel``; a
        missing or unexpected head weight raises ``GuardUnavailableError``. ``device``/``dtype``
        default as for Gen (float32 on CPU). Other keyword arguments go to the constructor.
        """
        path = resolve_model_source(model_id_or_path)
        target = pick_device(device)
        model = Qwen3ForGuardModel.load(path, dtype=pick_dtype(target, dtype), device=target)
        tokenizer = AutoTokenizer.from_pretrained(path)
        logger.info("loaded %s on %s (%s)", model_id_or_path, target, model.dtype)
        return cls(model, tokenizer, model_id=str(model_id_or_path), **kwargs)

    def session(self, messages: Iterable[MessageLike | Message], *, consecutive: int | None = None) -> StreamSession:
        """Start moderating the answer to ``messages`` (which end with the user turn); prefills once."""
        return StreamSession(self, messages, consecutive=consecutive or self.consecutive)

    async def asession(self, messages: Iterable[MessageLike | Message], *, consecutive: int | None = None) -> StreamSession:
        """``session`` without blocking the event loop during the prefill."""
        session = StreamSession(self, messages, consecutive=consecutive or self.consecutive, prefill=False)
        await session._prefill_ticket.wait_async()
        session._check_prefill()
        return session

    def gate(self, messages: Iterable[MessageLike | Message], policy: Policy | None = None, holdback_tokens: int = DEFAULT_CONSECUTIVE) -> Any:
        """A ``StreamGate`` releasing only judged text of the answer to ``messages``."""
        from .gate import StreamGate

        return StreamGate(self.session(messages), policy or Policy(), holdback_tokens)

    async def agate(self, messages: Iterable[MessageLike | Message], policy: Policy | None = None, holdback_tokens: int = DEFAULT_CONSECUTIVE) -> Any:
        """``gate`` without blocking the event loop during the prefill."""
        from .gate import StreamGate

        return StreamGate(await self.asession(messages), policy or Policy(), holdback_tokens)


class StreamSession:
    """One response being moderated token by token (see ``StreamGuard.session``).

    Thread-safe; ``feed`` calls on one session are applied in call order. Sessions never see
    each other's tokens: each has its own cache and the batched forward keeps them apart.
    """

    def __init__(self, guard: StreamGuard, messages: Iterable[MessageLike | Message], *, consecutive: int, prefill: bool = True) -> None:
        self.guard = guard
        self._lock = threading.Lock()
        prompt = encode_stream_prompt(guard.tokens, messages)
        keep = guard.max_context * 3 // 4
        cut = max(0, len(prompt.ids) - keep)
        self._prompt_ids = prompt.ids[cut:]
        self._keep_prompt = self._prompt_ids[-min(len(self._prompt_ids), guard.max_context // 4) :]
        self._response_ids: list[int] = []
        self._context = len(self._prompt_ids)
        self._retok = IncrementalTokenizer(guard.tokens, RESPONSE_LEAD)
        self._ids_mode: bool | None = None
        self._byte_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids_cursor = 0
        self._tokens: list[TokenVerdict] = []
        self._debounce = Debounce(consecutive)
        self._submitted_tokens = 0
        self._elapsed = 0.0
        self._finished = False
        self._closed = False
        self._prompt_verdict: Verdict | None = None
        ref = weakref.ref(self)

        def on_logits(metas: Sequence[Any], rows: GuardLogits) -> None:
            session = ref()
            if session is not None:
                session._on_logits(metas, rows)

        self._lane: Lane = guard.scheduler.open_lane(on_logits)
        self._finalizer = weakref.finalize(self, guard.scheduler.close_lane, self._lane)
        metas: list[Any] = [None] * len(self._prompt_ids)
        metas[prompt.query_index - cut] = _QUERY
        self._started = time.perf_counter()
        self._prefill_ticket = guard.scheduler.submit(self._lane, self._prompt_ids, metas)
        if prefill:
            self._prefill_ticket.wait()
            self._check_prefill()

    def _check_prefill(self) -> None:
        self._elapsed += time.perf_counter() - self._started
        if self._prompt_verdict is None:
            raise RuntimeError("the Stream session was closed during its prefill")

    @property
    def prompt_verdict(self) -> Verdict:
        """The query heads' verdict at the ``<|im_end|>`` closing the last user turn."""
        assert self._prompt_verdict is not None
        return self._prompt_verdict

    @property
    def verdict(self) -> Verdict:
        """The response verdict so far (debounced; Safe until a run of flagged tokens)."""
        return self._debounce.verdict(model=self.guard.model_id, elapsed_s=self._elapsed)

    @property
    def tokens(self) -> list[TokenVerdict]:
        """Every response token judged so far, in order."""
        return list(self._tokens)

    @property
    def context_tokens(self) -> int:
        """Tokens in the guard's context after the queued ones (prompt + response window)."""
        return self._context

    @property
    def consecutive(self) -> int:
        """Flagged tokens in a row that flag the response (upstream: 2)."""
        return self._debounce.consecutive

    @property
    def closed(self) -> bool:
        """True after ``close``."""
        return self._closed

    def feed(self, delta: str | bytes) -> list[TokenVerdict]:
        """Judge a response delta; returns the tokens that became final (the tail waits for more text)."""
        return self._collect(*self._submit_text(delta, final=False))

    async def afeed(self, delta: str | bytes) -> list[TokenVerdict]:
        """``feed`` for asyncio: awaits the guard step without blocking the loop or a thread."""
        return await self._acollect(*self._submit_text(delta, final=False))

    def feed_ids(self, ids: Sequence[int]) -> list[TokenVerdict]:
        """Judge response token ids from a Qwen3-family LLM (no re-tokenization; all ids are final)."""
        return self._collect(*self._submit_ids(ids))

    async def afeed_ids(self, ids: Sequence[int]) -> list[TokenVerdict]:
        """``feed_ids`` for asyncio."""
        return await self._acollect(*self._submit_ids(ids))

    def finish(self) -> list[TokenVerdict]:
        """End of the response: judge the held-back tail."""
        return self._collect(*self._submit_text("", final=True))

    async def afinish(self) -> list[TokenVerdict]:
        """``finish`` for asyncio."""
        return await self._acollect(*self._submit_text("", final=True))

    def close(self) -> None:
        """Stop moderating and free the cache now (also done when the session is garbage-collected)."""
        self._closed = True
        self._finalizer()

    async def aclose(self) -> None:
        """``close`` for asyncio."""
        self.close()

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> StreamSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _collect(self, start: int, end: int, ticket: Ticket | None) -> list[TokenVerdict]:
        began = time.perf_counter()
        if ticket is not None:
            ticket.wait()
        self._elapsed += time.perf_counter() - began
        return self._tokens[start:end]

    async def _acollect(self, start: int, end: int, ticket: Ticket | None) -> list[TokenVerdict]:
        began = time.perf_counter()
        if ticket is not None:
            await ticket.wait_async()
        self._elapsed += time.perf_counter() - began
        return self._tokens[start:end]

    def _check_open(self, *, ids_mode: bool) -> None:
        if self._closed:
            raise RuntimeError("the Stream session is closed")
        if self._finished:
            raise RuntimeError("the Stream session is finished; start a new session for a new response")
        if self._ids_mode is None:
            self._ids_mode = ids_mode
        elif self._ids_mode != ids_mode:
            raise RuntimeError("a session takes either text (feed) or token ids (feed_ids), not both")

    def _submit_text(self, delta: str | bytes, *, final: bool) -> tuple[int, int, Ticket | None]:
        with self._lock:
            self._check_open(ids_mode=bool(self._ids_mode) if final else False)
            tokens = self._retok.flush() if final else self._retok.push(delta)
            self._finished = final
            return self._submit(tokens)

    def _submit_ids(self, ids: Sequence[int]) -> tuple[int, int, Ticket | None]:
        with self._lock:
            first = self._ids_mode is None
            self._check_open(ids_mode=True)
            lead = [StreamToken(t, -len(RESPONSE_LEAD), 0, RESPONSE_LEAD) for t in self.guard.tokens.encode_text(RESPONSE_LEAD)] if first else []
            return self._submit(lead + self._ids_to_tokens(ids))

    def _ids_to_tokens(self, ids: Sequence[int]) -> list[StreamToken]:
        """Exact text per token: the token's bytes through an incremental UTF-8 decoder."""
        table = byte_level_decoder()
        vocab = self.guard.tokens.tokenizer.convert_ids_to_tokens([int(t) for t in ids])
        out, cursor = [], self._ids_cursor
        for tid, piece in zip(ids, vocab):
            if piece is None or any(ch not in table for ch in piece):
                raise ValueError(f"token id {tid} is not a text token of the Qwen3 vocabulary (stop feeding at <|im_end|>)")
            text = self._byte_decoder.decode(bytes(table[ch] for ch in piece))
            out.append(StreamToken(int(tid), cursor, cursor + len(text), text))
            cursor += len(text)
        self._ids_cursor = cursor
        return out

    def _submit(self, tokens: list[StreamToken]) -> tuple[int, int, Ticket | None]:
        start = self._submitted_tokens
        ticket = None
        for ids, metas, reset in self._window_chunks(tokens) if tokens else ():
            ticket = self.guard.scheduler.submit(self._lane, ids, metas, reset=reset)
        self._submitted_tokens += sum(1 for t in tokens if not t.context_only)
        return start, self._submitted_tokens, ticket

    def _window_chunks(self, tokens: list[StreamToken]) -> list[tuple[list[int], list[Any], bool]]:
        """Split new tokens where the context would overflow, re-prefilling a window there."""
        chunks: list[tuple[list[int], list[Any], bool]] = []
        ids: list[int] = []
        metas: list[Any] = []
        reset = False
        limit = self.guard.max_context
        for tok in tokens:
            if self._context + 1 > limit:
                if ids:
                    chunks.append((ids, metas, reset))
                keep = limit // 2 - len(self._keep_prompt)
                window = self._keep_prompt + (self._response_ids[-keep:] if keep > 0 else [])
                ids, metas, reset = list(window), [None] * len(window), True
                self._context = len(window)
            ids.append(tok.id)
            metas.append(None if tok.context_only else tok)
            self._response_ids.append(tok.id)
            self._context += 1
        if len(self._response_ids) > limit:
            del self._response_ids[: len(self._response_ids) - limit]
        chunks.append((ids, metas, reset))
        return chunks

    def _on_logits(self, metas: Sequence[Any], rows: GuardLogits) -> None:
        """Worker-thread callback: turn one step's logits into verdicts, in token order."""
        labels = self.guard.labels
        wanted = [i for i, m in enumerate(metas) if m is not None]
        if not wanted:
            return
        index = torch.tensor(wanted)
        resp = _softmax(rows.risk_level_logits[index], rows.category_logits[index], labels.risk, labels.category)
        query = _softmax(rows.query_risk_level_logits[index], rows.query_category_logits[index], labels.query_risk, labels.query_category)
        for j, i in enumerate(wanted):
            meta = metas[i]
            if meta is _QUERY:
                self._prompt_verdict = self._make_prompt_verdict(query.risk[j], query.category[j])
                continue
            risk = _argmax(resp.risk[j])
            token = TokenVerdict(
                index=len(self._tokens), token_id=meta.id, text=meta.text, start=meta.start, end=meta.end, risk=risk,
                category=None if risk is RiskLevel.SAFE else _argmax(resp.category[j]),
                probabilities=resp.risk[j], category_probabilities=resp.category[j],
            )
            self._tokens.append(token)
            self._debounce.add(token)

    def _make_prompt_verdict(self, risk_probs: dict[RiskLevel, float], cat_probs: dict[Category, float]) -> Verdict:
        risk = _argmax(risk_probs)
        categories = () if risk is RiskLevel.SAFE else (_argmax(cat_probs),)
        return Verdict(risk, categories, None, risk_probs, "prompt", self.guard.model_id, time.perf_counter() - self._started)
