"""Qwen3Guard-Stream: per-token moderation of a response while it is being generated.

``StreamGuard`` holds the model, tokenizer and the scheduler shared by all its sessions.
``StreamSession`` prefills one conversation once, then judges each response token with one
incremental step (reference 2.4 explains why upstream's per-token re-run is unusable on a CPU).
Text from any LLM is re-tokenized incrementally (``retokenize``); verdicts carry a full softmax
per head so policies can use thresholds; the response verdict follows upstream's debounce rule
(``debounce``).

Input is checked before anything reaches the model, and a refused call leaves the session as it
was: text must be valid Unicode (``retokenize.TextDeltas`` says how bytes, split surrogate pairs
and mixed deltas are read), and ``feed_ids`` takes only text tokens of the vocabulary (a fed
``<|im_end|>`` would forge the end of the turn inside the guard's context).

Long conversations: the Stream context is ``max_position_embeddings`` (8192). A prompt longer
than three quarters of it keeps its last part (the end of the last user turn, which is what the
query heads judge); the part before it is judged in overlapping windows first, on the same lane,
and the prompt verdict is the worst of all (``stream_template.front_windows``), so nothing of a
long prompt goes unjudged. When the response would overflow the context, the session re-prefills a
window made of the kept prompt and the most recent response tokens (half the context in all)
and carries on: moderation never stops, and each token is judged with as much context as fits.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import weakref
from collections.abc import Mapping, Set as AbstractSet
from dataclasses import replace
from typing import Any, Iterable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .config import DEFAULT_CONSECUTIVE, DEFAULT_STREAM_MODEL, check_count, check_holdback_tokens
from .debounce import Debounce, is_flagged
from .gate import StreamGate
from .loading import model_name, pick_device, pick_dtype, resolve_model_source
from .messages import Message, MessageLike
from .policy import Policy
from .retokenize import IncrementalTokenizer, StreamToken, TextDeltas
from .scheduler import Lane, StreamScheduler, Ticket
from .stream_model import HeadProbabilities, LabelMaps, Qwen3ForGuardModel
from .stream_template import RESPONSE_LEAD, encode_stream_prompt, front_windows
from .tokenization import TextTokenizer, load_tokenizer
from .types import Category, RiskLevel, TokenVerdict, Verdict
from .windows import worst_verdict

__all__ = ["DEFAULT_CONSECUTIVE", "DEFAULT_STREAM_MODEL", "Debounce", "StreamGuard", "StreamSession", "is_flagged"]

logger = logging.getLogger("guard_core.stream")


class _Query:
    """Marks the prompt position whose query heads give the prompt verdict."""


_QUERY = _Query()
#: Overlap of the windows over the front of a long prompt (``GenGuard``'s default for its windows).
_WINDOW_OVERLAP_TOKENS = 64


def _query_metas(length: int, query_index: int) -> list[Any]:
    """Metas of a prompt prefill: only the query position is read (for the prompt verdict)."""
    metas: list[Any] = [None] * length
    metas[query_index] = _QUERY
    return metas


def _argmax(probs: dict[Any, float]) -> Any:
    return max(probs, key=probs.__getitem__)


class StreamGuard:
    """A loaded Qwen3Guard-Stream model serving any number of concurrent sessions."""

    def __init__(
        self,
        model: Qwen3ForGuardModel,
        tokenizer: PreTrainedTokenizerBase | TextTokenizer,
        *,
        model_id: str = "",
        consecutive: int = DEFAULT_CONSECUTIVE,
        max_context: int | None = None,
        max_tokens_per_step: int = 512,
    ) -> None:
        self.model = model
        self.tokens = tokenizer if isinstance(tokenizer, TextTokenizer) else TextTokenizer(tokenizer)
        self.labels = LabelMaps.from_config(model.config)
        self.model_id = model_id
        self.consecutive = Debounce(consecutive).consecutive
        positions = int(model.config.max_position_embeddings)
        self.max_context = positions if max_context is None else check_count(
            max_context, "max_context", minimum=64, maximum=positions, hint=" (tokens; the model has that many positions)")
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
        tokenizer = load_tokenizer(path)
        logger.info("loaded %s on %s (%s)", model_id_or_path, target, model.dtype)
        return cls(model, tokenizer, model_id=model_name(model_id_or_path), **kwargs)

    def session(self, messages: Iterable[MessageLike | Message], *, consecutive: int | None = None) -> StreamSession:
        """Start moderating the answer to ``messages`` (which end with the user turn); prefills once."""
        return StreamSession(self, messages, consecutive=self.consecutive if consecutive is None else consecutive)

    async def asession(self, messages: Iterable[MessageLike | Message], *, consecutive: int | None = None) -> StreamSession:
        """``session`` without blocking the event loop during the prefill."""
        session = StreamSession(self, messages, consecutive=self.consecutive if consecutive is None else consecutive, prefill=False)
        try:
            await session._prefill_ticket.wait_async()
            session._check_prefill()
        except BaseException:  # a cancelled wait (a timeout, a client gone) must not keep the cache
            session.close()
            raise
        return session

    def gate(self, messages: Iterable[MessageLike | Message], policy: Policy | None = None, holdback_tokens: int = DEFAULT_CONSECUTIVE) -> StreamGate:
        """A ``StreamGate`` releasing only judged text of the answer to ``messages``."""
        check_holdback_tokens(holdback_tokens)
        return StreamGate(self.session(messages), policy or Policy(), holdback_tokens)

    async def agate(self, messages: Iterable[MessageLike | Message], policy: Policy | None = None, holdback_tokens: int = DEFAULT_CONSECUTIVE) -> StreamGate:
        """``gate`` without blocking the event loop during the prefill."""
        check_holdback_tokens(holdback_tokens)
        return StreamGate(await self.asession(messages), policy or Policy(), holdback_tokens)


class StreamSession:
    """One response being moderated token by token (see ``StreamGuard.session``).

    Thread-safe; ``feed`` calls on one session are applied in call order. Sessions never see
    each other's tokens: each has its own cache and the batched forward keeps them apart.
    A call that raises ``ValueError``/``TypeError`` for its input changes nothing: the session
    stays usable and nothing fed before is lost.
    """

    def __init__(self, guard: StreamGuard, messages: Iterable[MessageLike | Message], *, consecutive: int, prefill: bool = True) -> None:
        self.guard = guard
        self._lock = threading.Lock()
        prompt = encode_stream_prompt(guard.tokens, messages)
        self._debounce = Debounce(consecutive)
        keep = guard.max_context * 3 // 4
        cut = max(0, len(prompt.ids) - keep)
        self._prompt_ids = prompt.ids[cut:]
        windows = front_windows(guard.tokens, prompt, cut, keep, _WINDOW_OVERLAP_TOKENS)
        self._keep_prompt = self._prompt_ids[-min(len(self._prompt_ids), guard.max_context // 4) :]
        self._response_ids: list[int] = []
        self._context = len(self._prompt_ids)
        self._deltas = TextDeltas()
        self._retok = IncrementalTokenizer(guard.tokens, RESPONSE_LEAD)
        self._text = io.StringIO()
        self._received = 0
        self._ids_mode: bool | None = None
        self._tokens: list[TokenVerdict] = []
        self._submitted_tokens = 0
        self._elapsed = 0.0
        self._final: tuple[int, int, Ticket | None] | None = None
        self._closed = False
        self._prompt_verdict: Verdict | None = None
        self._window_verdicts: list[Verdict] = []
        self._prompt_windows = len(windows) + 1
        ref = weakref.ref(self)

        def on_probabilities(metas: Sequence[Any], probs: HeadProbabilities) -> None:
            session = ref()
            if session is not None:
                session._on_probabilities(metas, probs)

        self._lane: Lane = guard.scheduler.open_lane(on_probabilities)
        self._finalizer = weakref.finalize(self, guard.scheduler.close_lane, self._lane)
        self._started = time.perf_counter()
        for window in windows:  # the same lane runs them in order, each on a fresh cache, before the kept part
            guard.scheduler.submit(self._lane, window.ids, _query_metas(len(window.ids), window.query_index), reset=True)
        metas = _query_metas(len(self._prompt_ids), prompt.query_index - cut)
        self._prefill_ticket = guard.scheduler.submit(self._lane, self._prompt_ids, metas, reset=bool(windows))
        if prefill:
            try:
                self._prefill_ticket.wait()
                self._check_prefill()
            except BaseException:  # Ctrl-C or a failed step: free the lane now, not at garbage collection
                self.close()
                raise

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
    def received_chars(self) -> int:
        """Characters of response text received so far (the length of ``text()``)."""
        return self._received

    def text(self, start: int = 0, end: int | None = None) -> str:
        """The response text received so far (or its ``[start, end)`` slice), as the guard reads it.

        UTF-8 bytes are decoded and split surrogate pairs joined, so this is the text that
        ``TokenVerdict.start``/``end`` index into, which adapters cut released text from.
        """
        with self._lock:
            start = max(start, 0)
            stop = self._received if end is None else min(end, self._received)
            if stop <= start:
                return ""
            self._text.seek(start)
            return self._text.read(stop - start)

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

    @property
    def finished(self) -> bool:
        """True after ``finish``: the whole response has been handed to the guard."""
        return self._final is not None

    def feed(self, delta: str | bytes) -> list[TokenVerdict]:
        """Judge a response delta; returns the tokens that became final (the tail waits for more text).

        ``delta`` is ``str`` or UTF-8 ``bytes`` split anywhere (see ``retokenize.TextDeltas``);
        text that is not valid Unicode raises ``ValueError`` and is not taken.
        """
        return self._collect(*self._submit_text(delta))

    async def afeed(self, delta: str | bytes) -> list[TokenVerdict]:
        """``feed`` for asyncio: awaits the guard step without blocking the loop or a thread."""
        return await self._acollect(*self._submit_text(delta))

    def feed_ids(self, ids: Sequence[int]) -> list[TokenVerdict]:
        """Judge response token ids from a Qwen3-family LLM (no re-tokenization; all ids are final).

        Only text tokens are accepted: control and other added tokens (``<|im_end|>``,
        ``<think>``) and ids outside the vocabulary raise ``ValueError``, values that are not
        integers ``TypeError``; nothing of the call is taken.
        """
        return self._collect(*self._submit_ids(ids))

    async def afeed_ids(self, ids: Sequence[int]) -> list[TokenVerdict]:
        """``feed_ids`` for asyncio."""
        return await self._acollect(*self._submit_ids(ids))

    def finish(self) -> list[TokenVerdict]:
        """End of the response: judge the held-back tail. Calling it again returns ``[]``."""
        start, end, ticket = self._submit_final()
        return self._collect(start, end, ticket)

    async def afinish(self) -> list[TokenVerdict]:
        """``finish`` for asyncio."""
        return await self._acollect(*self._submit_final())

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

    def _check_open(self, *, ids_mode: bool | None) -> None:
        """Refuse calls on a closed or finished session, and mixing text with token ids."""
        if self._closed:
            raise RuntimeError("the Stream session is closed")
        if self._final is not None:
            raise RuntimeError("the Stream session is finished; start a new session for a new response")
        if ids_mode is not None and self._ids_mode is not None and self._ids_mode != ids_mode:
            raise RuntimeError("a session takes either text (feed) or token ids (feed_ids), not both")

    def _accept(self, text: str, *, ids_mode: bool) -> None:
        """Record response text taken by a call (after every check has passed)."""
        self._ids_mode = ids_mode
        if text:
            self._text.seek(self._received)
            self._text.write(text)
            self._received += len(text)

    def _submit_text(self, delta: str | bytes) -> tuple[int, int, Ticket | None]:
        with self._lock:
            self._check_open(ids_mode=False)
            text = self._deltas.decode(delta)
            self._accept(text, ids_mode=False)
            return self._submit(self._retok.push(text))

    def _submit_ids(self, ids: Sequence[int]) -> tuple[int, int, Ticket | None]:
        with self._lock:
            self._check_open(ids_mode=True)
            # A dict iterates its keys, a set in no order: neither is a sequence of ids, so both are refused like a str.
            if isinstance(ids, (str, bytes, bytearray, Mapping, AbstractSet)) or not hasattr(ids, "__iter__"):
                raise TypeError(f"feed_ids takes a sequence of token ids, got {type(ids).__name__}")
            ids = list(ids)
            pieces = self.guard.tokens.text_token_bytes(ids)
            tokens = []
            if self._ids_mode is None:
                tokens = [StreamToken(t, -len(RESPONSE_LEAD), 0, RESPONSE_LEAD) for t in self.guard.tokens.encode_text(RESPONSE_LEAD)]
            cursor = self._received
            for raw, piece in zip(ids, pieces):
                text = self._deltas.decode(piece)
                tokens.append(StreamToken(int(raw), cursor, cursor + len(text), text))
                cursor += len(text)
            self._accept("".join(t.text for t in tokens if not t.context_only), ids_mode=True)
            return self._submit(tokens)

    def _submit_final(self) -> tuple[int, int, Ticket | None]:
        with self._lock:
            if self._final is not None and not self._closed:
                return self._submitted_tokens, self._submitted_tokens, self._final[2]
            self._check_open(ids_mode=None)
            rest = self._deltas.flush()
            tokens = [] if self._ids_mode else self._retok.push(rest) + self._retok.flush()
            self._accept(rest, ids_mode=bool(self._ids_mode))
            self._final = self._submit(tokens if any(not t.context_only for t in tokens) else [])
            return self._final

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

    def _on_probabilities(self, metas: Sequence[Any], probs: HeadProbabilities) -> None:
        """Worker-thread callback: turn one step's probabilities into verdicts, in token order."""
        labels = self.guard.labels
        for j, meta in enumerate(metas):
            if meta is _QUERY:
                verdict = self._make_prompt_verdict(
                    dict(zip(labels.query_risk, probs.query_risk[j])), dict(zip(labels.query_category, probs.query_category[j])))
                self._window_verdicts.append(verdict)
                if len(self._window_verdicts) == self._prompt_windows:  # the kept part, judged last
                    self._prompt_verdict = replace(worst_verdict(self._window_verdicts), elapsed_s=verdict.elapsed_s)
                continue
            risk_probs = dict(zip(labels.risk, probs.risk[j]))
            cat_probs = dict(zip(labels.category, probs.category[j]))
            risk = _argmax(risk_probs)
            token = TokenVerdict(
                index=len(self._tokens), token_id=meta.id, text=meta.text, start=meta.start, end=meta.end, risk=risk,
                category=None if risk is RiskLevel.SAFE else _argmax(cat_probs),
                probabilities=risk_probs, category_probabilities=cat_probs,
            )
            self._tokens.append(token)
            self._debounce.add(token)

    def _make_prompt_verdict(self, risk_probs: dict[RiskLevel, float], cat_probs: dict[Category, float]) -> Verdict:
        risk = _argmax(risk_probs)
        categories = () if risk is RiskLevel.SAFE else (_argmax(cat_probs),)
        return Verdict(risk, categories, None, risk_probs, "prompt", self.guard.model_id, time.perf_counter() - self._started)
