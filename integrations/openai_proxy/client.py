"""``guard_openai``: an OpenAI / AsyncOpenAI client whose chat completions and responses are moderated.

The wrapped client is a copy of the given one whose class is a subclass of the original
(``GuardedOpenAI(OpenAI)``, built per client class), so ``isinstance`` checks, every resource the
guard does not touch, and ``with_options()`` / ``copy()`` (which rebuild through ``__class__``)
keep working, the latter keeping the guard. Only ``create`` and ``parse`` of ``chat.completions``
and ``responses`` are replaced (openai's ``stream()`` helpers call ``create``); their raw-response
wrappers refuse to run, since they hand back bytes the guard cannot judge.

Streams come back as ``GuardedStream`` / ``AsyncGuardedStream``, subclasses of openai's
``Stream`` / ``AsyncStream`` written in the same style: a generator over the upstream stream,
driven through a ``StreamModerator`` (see ``streaming``), that always closes the upstream
response and the guard sessions in ``finally``.
"""

from __future__ import annotations

import functools
from functools import cached_property
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

import httpx2
from openai import AsyncOpenAI, AsyncStream, OpenAI, Stream
from openai.resources.chat import AsyncChat, Chat
from openai.resources.chat.completions import AsyncCompletions, Completions
from openai.resources.responses import AsyncResponses, Responses
from openai.types.responses import ResponseStreamEvent

from guard_core import GenGuard, Policy, Verdict
from guard_core.stream import DEFAULT_CONSECUTIVE, StreamGuard

from . import chunks
from .moderation import (
    DEFAULT_GEN_MODEL,
    DEFAULT_REFUSAL,
    DEFAULT_STREAM_MODEL,
    ChoiceGates,
    Conversation,
    Moderator,
    OnUnsafe,
    annotation,
    chat_conversation,
    responses_conversation,
)
from .streaming import ChatStreamModerator, ReplayStream, ResponsesStreamModerator, StreamModerator

_T = TypeVar("_T")
_RAW_HEADER = "x-stainless-raw-response"


def _sse_response(client: OpenAI | AsyncOpenAI, path: str) -> httpx2.Response:
    """The ``.response`` of a stream the guard answered itself: no request was sent upstream."""
    request = httpx2.Request("POST", client.base_url.join(path.lstrip("/")))
    return httpx2.Response(200, headers={"content-type": "text/event-stream"}, request=request)


class GuardedStream(Stream[_T]):
    """A moderated ``openai.Stream``: iterate it, ``close()`` it, use it in ``with``; ``.response`` is upstream's.

    ``prompt_verdict`` and ``verdicts`` (per choice) expose what the guard decided.
    """

    def __init__(self, upstream: Stream[_T] | None, moderator: StreamModerator[_T] | ReplayStream[_T],
                 response: httpx2.Response) -> None:
        self.response = response
        self._upstream = upstream
        self._moderator = moderator
        self._iterator = self.__stream__()

    @property
    def prompt_verdict(self) -> Verdict:
        """The guard's verdict on the prompt."""
        return self._moderator.prompt_verdict

    @property
    def verdicts(self) -> dict[Any, Verdict]:
        """Response verdicts so far, by choice index (chat) or (output, content) index (Responses)."""
        return self._moderator.verdicts

    def __stream__(self) -> Iterator[_T]:
        moderator, upstream = self._moderator, self._upstream
        try:
            if upstream is not None:
                for item in upstream:
                    yield from moderator.feed(item)
                    if moderator.done:
                        break
            yield from moderator.end()
        finally:
            if upstream is not None:
                upstream.close()
            moderator.close()

    def close(self) -> None:
        """Stop reading: close the upstream response and free the guard sessions."""
        self._iterator.close()
        if self._upstream is not None:
            self._upstream.close()
        self._moderator.close()


class AsyncGuardedStream(AsyncStream[_T]):
    """A moderated ``openai.AsyncStream``: ``async for``, ``await close()``, ``async with``; ``.response`` is upstream's."""

    def __init__(self, upstream: AsyncStream[_T] | None, moderator: StreamModerator[_T] | ReplayStream[_T],
                 response: httpx2.Response) -> None:
        self.response = response
        self._upstream = upstream
        self._moderator = moderator
        self._iterator = self.__stream__()

    @property
    def prompt_verdict(self) -> Verdict:
        """The guard's verdict on the prompt."""
        return self._moderator.prompt_verdict

    @property
    def verdicts(self) -> dict[Any, Verdict]:
        """Response verdicts so far, by choice index (chat) or (output, content) index (Responses)."""
        return self._moderator.verdicts

    async def __stream__(self) -> AsyncIterator[_T]:
        moderator, upstream = self._moderator, self._upstream
        try:
            if upstream is not None:
                async for item in upstream:
                    for out in await moderator.afeed(item):
                        yield out
                    if moderator.done:
                        break
            for out in await moderator.aend():
                yield out
        finally:
            if upstream is not None:
                await upstream.close()
            await moderator.aclose()

    async def close(self) -> None:
        """Stop reading: close the upstream response and free the guard sessions."""
        await self._iterator.aclose()
        if self._upstream is not None:
            await self._upstream.close()
        await self._moderator.aclose()


def _check_not_raw(kwargs: dict[str, Any]) -> None:
    headers = kwargs.get("extra_headers") or {}
    if any(str(k).lower() == _RAW_HEADER for k in headers):
        raise NotImplementedError(
            "with_raw_response / with_streaming_response return raw HTTP bodies that Qwen3Guard cannot "
            "moderate; call create() on the guarded client, or use the unguarded client explicitly")


def _blocked_prompt(moderator: Moderator, verdict: Verdict) -> dict[str, Any]:
    """Abort: raise. Rewrite: the annotation the refusal carries."""
    if moderator.on_unsafe == "abort":
        raise moderator.refuse(verdict)
    return annotation(prompt=verdict)


class _GuardedCompletions(Completions):
    """``chat.completions`` with ``create`` and ``parse`` moderated (``stream()`` goes through ``create``)."""

    @functools.wraps(Completions.create)
    def create(self, **kwargs: Any) -> Any:
        _check_not_raw(kwargs)
        if not kwargs.get("stream"):
            return self._whole(kwargs, super().create)
        moderator: Moderator = self._client._qwen3guard  # type: ignore[attr-defined]
        conversation = chat_conversation(kwargs.get("messages") or ())
        n = kwargs.get("n") or 1
        gate = moderator.open_gate(conversation)
        if moderator.prompt_blocks(gate.prompt_verdict):
            gate.close()
            note = _blocked_prompt(moderator, gate.prompt_verdict)
            replay = ReplayStream(chunks.prompt_refusal_chunks(kwargs.get("model", ""), moderator.refusal_message, note, n),
                                  gate.prompt_verdict)
            return GuardedStream(None, replay, _sse_response(self._client, "chat/completions"))
        gates = ChoiceGates(moderator, conversation, gate)
        upstream = _send(lambda: super(_GuardedCompletions, self).create(**kwargs), gates)
        return GuardedStream(upstream, ChatStreamModerator(moderator, gates, n), upstream.response)

    @functools.wraps(Completions.parse)
    def parse(self, **kwargs: Any) -> Any:
        _check_not_raw(kwargs)
        return self._whole(kwargs, super().parse, parsed=True)

    def _whole(self, kwargs: dict[str, Any], send: Any, *, parsed: bool = False) -> Any:
        """A non-streamed request: Gen judges the prompt, then every choice of the answer."""
        moderator: Moderator = self._client._qwen3guard  # type: ignore[attr-defined]
        conversation = chat_conversation(kwargs.get("messages") or ())
        verdict = moderator.prompt_verdict(conversation)
        if moderator.prompt_blocks(verdict):
            note = _blocked_prompt(moderator, verdict)
            return chunks.refusal_completion(kwargs.get("model", ""), moderator.refusal_message, note,
                                             kwargs.get("n") or 1, parsed=parsed)
        return moderator.check_completion(conversation, send(**kwargs), verdict)


class _AsyncGuardedCompletions(AsyncCompletions):
    """``chat.completions`` with ``create`` and ``parse`` moderated (asyncio)."""

    @functools.wraps(AsyncCompletions.create)
    async def create(self, **kwargs: Any) -> Any:
        _check_not_raw(kwargs)
        if not kwargs.get("stream"):
            return await self._whole(kwargs, super().create)
        moderator: Moderator = self._client._qwen3guard  # type: ignore[attr-defined]
        conversation = chat_conversation(kwargs.get("messages") or ())
        n = kwargs.get("n") or 1
        gate = await moderator.aopen_gate(conversation)
        if moderator.prompt_blocks(gate.prompt_verdict):
            gate.close()
            note = _blocked_prompt(moderator, gate.prompt_verdict)
            replay = ReplayStream(chunks.prompt_refusal_chunks(kwargs.get("model", ""), moderator.refusal_message, note, n),
                                  gate.prompt_verdict)
            return AsyncGuardedStream(None, replay, _sse_response(self._client, "chat/completions"))
        gates = ChoiceGates(moderator, conversation, gate)
        upstream = await _asend(super().create(**kwargs), gates)
        return AsyncGuardedStream(upstream, ChatStreamModerator(moderator, gates, n), upstream.response)

    @functools.wraps(AsyncCompletions.parse)
    async def parse(self, **kwargs: Any) -> Any:
        _check_not_raw(kwargs)
        return await self._whole(kwargs, super().parse, parsed=True)

    async def _whole(self, kwargs: dict[str, Any], send: Any, *, parsed: bool = False) -> Any:
        """A non-streamed request: Gen judges the prompt, then every choice of the answer."""
        moderator: Moderator = self._client._qwen3guard  # type: ignore[attr-defined]
        conversation = chat_conversation(kwargs.get("messages") or ())
        verdict = await moderator.aprompt_verdict(conversation)
        if moderator.prompt_blocks(verdict):
            note = _blocked_prompt(moderator, verdict)
            return chunks.refusal_completion(kwargs.get("model", ""), moderator.refusal_message, note,
                                             kwargs.get("n") or 1, parsed=parsed)
        return await moderator.acheck_completion(conversation, await send(**kwargs), verdict)


def _responses_conversation(kwargs: dict[str, Any]) -> Conversation:
    return responses_conversation(kwargs.get("input"), kwargs.get("instructions") or None)


def _prompt_refusal_events(model: str, moderator: Moderator, note: dict[str, Any]) -> list[ResponseStreamEvent]:
    return chunks.responses_refusal_events(
        None, item_id=chunks.new_id("msg"), output_index=0, content_index=0, delivered="",
        text=moderator.refusal_message, prior=[], sequence=0, note=note, model=model, opened=False)


def _prompt_refusal_response(kwargs: dict[str, Any], moderator: Moderator, note: dict[str, Any]) -> Any:
    item = chunks.message_item(chunks.new_id("msg"), moderator.refusal_message)
    return chunks.incomplete_response(None, [item], note, model=kwargs.get("model", ""))


class _GuardedResponses(Responses):
    """``responses`` with ``create`` and ``parse`` moderated (``stream()`` goes through ``create``)."""

    @functools.wraps(Responses.create)
    def create(self, **kwargs: Any) -> Any:
        _check_not_raw(kwargs)
        if not kwargs.get("stream"):
            return self._whole(kwargs, super().create)
        moderator: Moderator = self._client._qwen3guard  # type: ignore[attr-defined]
        conversation = _responses_conversation(kwargs)
        gate = moderator.open_gate(conversation)
        if moderator.prompt_blocks(gate.prompt_verdict):
            gate.close()
            note = _blocked_prompt(moderator, gate.prompt_verdict)
            replay = ReplayStream(_prompt_refusal_events(kwargs.get("model", ""), moderator, note), gate.prompt_verdict)
            return GuardedStream(None, replay, _sse_response(self._client, "responses"))
        gates = ChoiceGates(moderator, conversation, gate)
        upstream = _send(lambda: super(_GuardedResponses, self).create(**kwargs), gates)
        return GuardedStream(upstream, ResponsesStreamModerator(moderator, gates), upstream.response)

    @functools.wraps(Responses.parse)
    def parse(self, **kwargs: Any) -> Any:
        _check_not_raw(kwargs)
        return self._whole(kwargs, super().parse)

    def _whole(self, kwargs: dict[str, Any], send: Any) -> Any:
        """A non-streamed request: Gen judges the prompt, then the answer's text."""
        moderator: Moderator = self._client._qwen3guard  # type: ignore[attr-defined]
        conversation = _responses_conversation(kwargs)
        verdict = moderator.prompt_verdict(conversation)
        if moderator.prompt_blocks(verdict):
            return _prompt_refusal_response(kwargs, moderator, _blocked_prompt(moderator, verdict))
        return moderator.check_response(conversation, send(**kwargs), verdict)


class _AsyncGuardedResponses(AsyncResponses):
    """``responses`` with ``create`` and ``parse`` moderated (asyncio)."""

    @functools.wraps(AsyncResponses.create)
    async def create(self, **kwargs: Any) -> Any:
        _check_not_raw(kwargs)
        if not kwargs.get("stream"):
            return await self._whole(kwargs, super().create)
        moderator: Moderator = self._client._qwen3guard  # type: ignore[attr-defined]
        conversation = _responses_conversation(kwargs)
        gate = await moderator.aopen_gate(conversation)
        if moderator.prompt_blocks(gate.prompt_verdict):
            gate.close()
            note = _blocked_prompt(moderator, gate.prompt_verdict)
            replay = ReplayStream(_prompt_refusal_events(kwargs.get("model", ""), moderator, note), gate.prompt_verdict)
            return AsyncGuardedStream(None, replay, _sse_response(self._client, "responses"))
        gates = ChoiceGates(moderator, conversation, gate)
        upstream = await _asend(super().create(**kwargs), gates)
        return AsyncGuardedStream(upstream, ResponsesStreamModerator(moderator, gates), upstream.response)

    @functools.wraps(AsyncResponses.parse)
    async def parse(self, **kwargs: Any) -> Any:
        _check_not_raw(kwargs)
        return await self._whole(kwargs, super().parse)

    async def _whole(self, kwargs: dict[str, Any], send: Any) -> Any:
        """A non-streamed request: Gen judges the prompt, then the answer's text."""
        moderator: Moderator = self._client._qwen3guard  # type: ignore[attr-defined]
        conversation = _responses_conversation(kwargs)
        verdict = await moderator.aprompt_verdict(conversation)
        if moderator.prompt_blocks(verdict):
            return _prompt_refusal_response(kwargs, moderator, _blocked_prompt(moderator, verdict))
        return await moderator.acheck_response(conversation, await send(**kwargs), verdict)


def _send(request: Any, gates: ChoiceGates) -> Any:
    """Send upstream; if that fails, free the guard session opened for the prompt."""
    try:
        return request()
    except BaseException:
        gates.close()
        raise


async def _asend(request: Any, gates: ChoiceGates) -> Any:
    """``_send`` for a coroutine."""
    try:
        return await request
    except BaseException:
        gates.close()
        raise


class _GuardedChat(Chat):
    """``chat`` whose ``completions`` are the guarded ones."""

    @cached_property
    def completions(self) -> Completions:
        """Moderated chat completions."""
        return _GuardedCompletions(self._client)


class _AsyncGuardedChat(AsyncChat):
    """``chat`` whose ``completions`` are the guarded ones (asyncio)."""

    @cached_property
    def completions(self) -> AsyncCompletions:
        """Moderated chat completions."""
        return _AsyncGuardedCompletions(self._client)


def _guarded_namespace(cls: type) -> dict[str, Any]:
    """The members a guarded client class adds to ``cls``: guarded resources, a guard-keeping ``copy``.

    Built per class (not a mixin) because a mixin base changes the instance layout and then
    ``__class__`` cannot be swapped on the copy ``guard_openai`` makes.
    """
    is_async = issubclass(cls, AsyncOpenAI)
    chat_cls = _AsyncGuardedChat if is_async else _GuardedChat
    responses_cls = _AsyncGuardedResponses if is_async else _GuardedResponses

    def chat(self: Any) -> Any:
        """Chat with moderated completions."""
        return chat_cls(self)

    def responses(self: Any) -> Any:
        """The moderated Responses API."""
        return responses_cls(self)

    def guard(self: Any) -> Moderator:
        """The moderator (guards, policy, on_unsafe, hold-back) this client applies."""
        return self._qwen3guard  # type: ignore[no-any-return]

    def copy(self: Any, *args: Any, **kwargs: Any) -> Any:
        """openai's ``copy`` / ``with_options``; the copy is guarded by the same moderator."""
        new = cls.copy(self, *args, **kwargs)
        new._qwen3guard = self._qwen3guard
        return new

    return {
        "__module__": __name__, "__doc__": cls.__doc__, "_unguarded": cls,
        "chat": cached_property(chat), "responses": cached_property(responses), "guard": property(guard),
        "copy": copy, "with_options": copy,
    }


_CLASSES: dict[type, type] = {}


def _guarded_class(cls: type) -> type:
    """A subclass of ``cls`` with the guard, one per client class; guarding a guarded client re-guards its base."""
    cls = getattr(cls, "_unguarded", cls)
    if cls not in _CLASSES:
        # Same __name__: openai derives the User-Agent header from it, and upstream must see the same client.
        guarded = type(cls.__name__, (cls,), _guarded_namespace(cls))
        guarded.__qualname__ = f"guarded.{cls.__qualname__}"
        _CLASSES[cls] = guarded
    return _CLASSES[cls]


_ClientT = TypeVar("_ClientT", OpenAI, AsyncOpenAI)


def guard_openai(
    client: _ClientT,
    *,
    on_unsafe: OnUnsafe = "abort",
    stream_guard: StreamGuard | str = DEFAULT_STREAM_MODEL,
    gen_guard: GenGuard | str = DEFAULT_GEN_MODEL,
    policy: Policy | None = None,
    prompt_policy: Policy | None = None,
    holdback_tokens: int = DEFAULT_CONSECUTIVE,
    refusal_message: str = DEFAULT_REFUSAL,
) -> _ClientT:
    """A guarded copy of ``client`` (``OpenAI``, ``AsyncOpenAI`` or a subclass); ``client`` is unchanged.

    Prompts are judged before anything is sent; a blocked prompt never reaches upstream. Streams
    are judged token by token by ``stream_guard`` with a hold-back of ``holdback_tokens`` (the
    default releases only text the guard has judged; 0 releases at once); whole responses and
    their prompts by ``gen_guard``. ``on_unsafe="abort"`` raises ``UnsafeContentError`` (closing
    upstream); ``"rewrite"`` answers with ``refusal_message`` and ``finish_reason="content_filter"``.
    ``prompt_policy`` (default ``policy``) judges prompts, ``policy`` responses. Guards given as
    ids or paths load on first use.
    """
    moderator = Moderator(stream_guard=stream_guard, gen_guard=gen_guard, policy=policy, prompt_policy=prompt_policy, on_unsafe=on_unsafe,
                          holdback_tokens=holdback_tokens, refusal_message=refusal_message)
    guarded = client.copy()
    guarded.__class__ = _guarded_class(type(client))
    guarded._qwen3guard = moderator  # type: ignore[attr-defined]
    return guarded
