"""The hold-back window every streaming adapter uses to release only judged text.

An adapter sits between an LLM stream and its caller. It pushes each delta into a ``StreamGate``
and forwards only what ``push`` returns. With ``holdback_tokens=h >= 1`` that is text whose
tokens the guard has judged, minus the newest ``h - 1`` judged tokens: with the default
``h = 2`` (the debounce count) the first token of a flagged run is still held when the second
one flags the response, so no token of a flagged run ever reaches the caller. ``h = 0`` is
pass-through: text is released as soon as it is fed, and the gate only stops the stream once
the guard blocks.

Released text is cut from the caller's own characters by token offsets (the tokenizer
normalises to NFC, so decoded token strings are not always the caller's bytes). ``push`` takes
what ``StreamSession.feed`` takes (``str`` or UTF-8 ``bytes``) and refuses what it refuses with
the same error, before anything is released.

No torch here: the gate needs only a session object, so adapters can import it cheaply.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from .config import DEFAULT_CONSECUTIVE, check_holdback_tokens
from .debounce import Debounce
from .policy import Policy
from .types import TokenVerdict, Verdict

if TYPE_CHECKING:
    from .stream import StreamSession

_DELTA_TYPES = (str, bytes, bytearray, memoryview)


def token_verdict(token: TokenVerdict, model: str = "") -> Verdict:
    """One token's judgement as a response ``Verdict`` (so a ``Policy`` can be applied to it)."""
    categories = (token.category,) if token.category is not None else ()
    return Verdict(token.risk, categories, None, dict(token.probabilities), "response", model)


class StreamGate:
    """Releases a streamed response only as far as the guard has judged it safe under ``policy``.

    A token counts against the response when ``policy.blocks`` its own verdict (so thresholds,
    strict/loose and category overrides apply per token); the response is blocked after the
    session's debounce count of such tokens in a row. Once blocked, nothing more is released.
    ``holdback_tokens`` is validated here once (an int >= 0) for every adapter.
    """

    def __init__(self, session: StreamSession, policy: Policy, holdback_tokens: int = DEFAULT_CONSECUTIVE) -> None:
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a guard_core.Policy, got {type(policy).__name__} (e.g. Policy.strict())")
        self.holdback_tokens = check_holdback_tokens(holdback_tokens)
        self.session = session
        self.policy = policy
        model = session.guard.model_id
        self._debounce = Debounce(session.consecutive, lambda t: policy.blocks(token_verdict(t, model)))
        self._delivered = 0
        self._ends: list[int] = []
        self._blocked = False
        self._finished = False
        self._interrupted = False
        self._busy = threading.Lock()

    @property
    def prompt_verdict(self) -> Verdict:
        """The guard's verdict on the user turn."""
        return self.session.prompt_verdict

    @property
    def prompt_blocked(self) -> bool:
        """True when the policy blocks the prompt (adapters check this before streaming)."""
        return self.policy.blocks(self.session.prompt_verdict)

    @property
    def blocked(self) -> bool:
        """True once the policy has blocked the response."""
        return self._blocked

    @property
    def verdict(self) -> Verdict:
        """The response verdict: the blocking run's verdict once blocked, else the session's."""
        if self._blocked:
            return self._debounce.verdict(model=self.session.guard.model_id, elapsed_s=self.session.verdict.elapsed_s)
        return self.session.verdict

    @property
    def delivered(self) -> str:
        """All text released so far."""
        return self.session.text(0, self._delivered)

    def push(self, delta: str | bytes) -> str:
        """Feed a delta; return the text that may now be delivered (possibly ``""``)."""
        if not self._accepts(delta):
            return ""
        with self._judging():
            return self._absorb(self.session.feed(delta), final=False)

    async def apush(self, delta: str | bytes) -> str:
        """``push`` for asyncio."""
        if not self._accepts(delta):
            return ""
        with self._judging():
            return self._absorb(await self.session.afeed(delta), final=False)

    def finish(self) -> str:
        """End of the response: the rest of the text if it is not blocked, else ``""``.

        A refused call (a lone surrogate at the end) leaves the gate as it was, so it can be retried.
        """
        self._check_interrupted()
        if self._blocked or self._finished:
            return ""
        with self._judging():
            tokens = self.session.finish()
            self._finished = True
            return self._absorb(tokens, final=True)

    async def afinish(self) -> str:
        """``finish`` for asyncio."""
        self._check_interrupted()
        if self._blocked or self._finished:
            return ""
        with self._judging():
            tokens = await self.session.afinish()
            self._finished = True
            return self._absorb(tokens, final=True)

    def close(self) -> None:
        """Free the guard session."""
        self.session.close()

    async def aclose(self) -> None:
        """``close`` for asyncio."""
        self.session.close()

    def __enter__(self) -> StreamGate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accepts(self, delta: str | bytes) -> bool:
        if not isinstance(delta, _DELTA_TYPES):
            raise TypeError(f"a response delta must be str or UTF-8 bytes, got {type(delta).__name__}")
        self._check_interrupted()
        if self._finished:
            raise RuntimeError("the gate is finished")
        return not self._blocked

    @contextmanager
    def _judging(self) -> Iterator[None]:
        """One session call and the release it decides, one at a time; mark the gate unusable when
        such a call is interrupted (a cancelled ``apush``).

        A second call while one is judged (a ``finish`` from another task or thread before a push
        returned) would release text whose tokens the first has not absorbed yet: it is refused.
        An interrupted call leaves the session judging tokens the gate never sees; releasing text
        past them later would let it out unjudged, so the gate refuses further use instead. A
        refused input (``Exception``) changes nothing and keeps the gate usable.
        """
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("another push or finish on this gate is still being judged; a gate takes one call at a "
                               "time (await each push before the next one, and before finish)")
        try:
            yield
        except Exception:
            raise
        except BaseException:
            self._interrupted = True
            raise
        finally:
            self._busy.release()

    def _check_interrupted(self) -> None:
        if self._interrupted:
            raise RuntimeError("a push or finish on this gate was cancelled before the guard judged its text, so the "
                               "gate cannot release the rest safely; close it and moderate the response again")

    def _absorb(self, tokens: list[TokenVerdict], *, final: bool) -> str:
        for token in tokens:
            self._ends.append(token.end)
            if self._debounce.add(token):
                self._blocked = True
                return ""
        if final or self.holdback_tokens == 0:
            limit = self.session.received_chars
        else:
            releasable = len(self._ends) - (self.holdback_tokens - 1)
            limit = self._ends[releasable - 1] if releasable > 0 else 0
        if limit <= self._delivered:
            return ""
        out = self.session.text(self._delivered, limit)
        self._delivered = limit
        return out
