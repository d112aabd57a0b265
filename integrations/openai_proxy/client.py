"""``guard_openai``: an OpenAI / AsyncOpenAI client whose chat completions and responses are moderated.

The wrapped client is a copy of the given one whose class is a subclass of the original
(``GuardedOpenAI(OpenAI)``, built per client class), so ``isinstance`` checks, every resource the
guard does not touch, and ``with_options()`` / ``copy()`` (which rebuild through ``__class__``)
keep working, the latter keeping the guard. Only ``create`` and ``parse`` of ``chat.completions``
and ``responses`` (and their ``beta`` twins) are replaced (openai's ``stream()`` helpers call
``create``); their raw-response wrappers and ``responses.retrieve`` refuse to run, since they hand
back bytes or stored answers the guard cannot judge. Each call is one flow
(``exchange``) run blocking or awaited, so the sync and async clients decide identically.

Streams come back as ``GuardedStream`` / ``AsyncGuardedStream``, subclasses of openai's
``Stream`` / ``AsyncStream`` in the same style: a generator over the upstream stream through the
guard (``streaming``) that always closes the upstream response and the guard sessions.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, TypeVar

import httpx2
from openai import AsyncOpenAI, AsyncStream, OpenAI, Stream
from openai.resources.chat import AsyncChat, Chat
from openai.resources.chat.completions import AsyncCompletions, Completions
from openai.resources.beta import AsyncBeta, Beta
from openai.resources.beta.responses import AsyncResponses as AsyncBetaResponses
from openai.resources.beta.responses import Responses as BetaResponses
from openai.resources.responses import AsyncResponses, Responses

from guard_core import CONFIGURED, DEFAULT_REFUSAL, Decision, Moderator, Policy, Verdict
from guard_core.config import DEFAULT_CONSECUTIVE
from guard_core.steps import Flow, Step, arun, run

from .exchange import DEFAULT_MAX_CHOICES, Endpoint, OnUnsafe, OpenAIGuard, Request, prompt_flow, whole_flow
from .streaming import GuardedItems, stream_items

_T = TypeVar("_T")
_RAW_HEADER = "x-stainless-raw-response"
_PATHS = {"chat": "chat/completions", "responses": "responses"}


@dataclass
class _Streamed:
    """A flow's answer for a stream: upstream's stream and the guard over it, or a replayed refusal."""

    upstream: Any
    items: GuardedItems | None
    replay: list[Any]
    prompt: Decision | None


class _Decisions:
    """What both stream classes expose: the guard's decisions."""

    _streamed: _Streamed

    @property
    def prompt_verdict(self) -> Verdict | None:
        """The guard's verdict on the prompt (None when prompts are not checked)."""
        return self._streamed.prompt.verdict if self._streamed.prompt is not None else None

    @property
    def decisions(self) -> dict[Any, Decision]:
        """Response decisions so far, by choice index (chat) or (output, content) index (Responses)."""
        return self._streamed.items.decisions if self._streamed.items is not None else {}

    @property
    def verdicts(self) -> dict[Any, Verdict]:
        """Response verdicts so far, keyed like ``decisions``."""
        return {key: d.verdict for key, d in self.decisions.items()}


class GuardedStream(_Decisions, Stream[_T]):
    """A moderated ``openai.Stream``: iterate it, ``close()`` it, use it in ``with``; ``.response`` is upstream's."""

    def __init__(self, streamed: _Streamed, response: httpx2.Response) -> None:
        self.response, self._streamed = response, streamed
        self._iterator = self.__stream__()

    def __stream__(self) -> Iterator[_T]:
        upstream, items = self._streamed.upstream, self._streamed.items
        try:
            yield from self._streamed.replay
            for item in upstream if items is not None else ():
                yield from items.feed(item)  # type: ignore[union-attr]
                if items.done:  # type: ignore[union-attr]
                    break
            yield from items.end() if items is not None else ()
        finally:
            self._release()

    def close(self) -> None:
        """Stop reading: close the upstream response and free the guard sessions."""
        self._iterator.close()
        self._release()

    def _release(self) -> None:
        if self._streamed.upstream is not None:
            self._streamed.upstream.close()
        if self._streamed.items is not None:
            self._streamed.items.close()


class AsyncGuardedStream(_Decisions, AsyncStream[_T]):
    """A moderated ``openai.AsyncStream``: ``async for``, ``await close()``, ``async with``; ``.response`` is upstream's."""

    def __init__(self, streamed: _Streamed, response: httpx2.Response) -> None:
        self.response, self._streamed = response, streamed
        self._iterator = self.__stream__()

    async def __stream__(self) -> AsyncIterator[_T]:
        upstream, items = self._streamed.upstream, self._streamed.items
        try:
            for item in self._streamed.replay:
                yield item
            if items is not None:
                async for item in upstream:
                    for out in await items.afeed(item):
                        yield out
                    if items.done:
                        break
                for out in await items.aend():
                    yield out
        finally:
            await self._release()

    async def close(self) -> None:
        """Stop reading: close the upstream response and free the guard sessions."""
        await self._iterator.aclose()
        await self._release()

    async def _release(self) -> None:
        if self._streamed.upstream is not None:
            await self._streamed.upstream.close()
        if self._streamed.items is not None:
            self._streamed.items.close()


def _flow(guard: OpenAIGuard, endpoint: Endpoint, kwargs: dict[str, Any], send: Step[Any], parsed: bool) -> Flow[Any]:
    """One call: the prompt first (a blocked one never goes upstream), then the answer."""
    headers = kwargs.get("extra_headers") or {}
    if any(str(k).lower() == _RAW_HEADER for k in headers):
        raise NotImplementedError("with_raw_response / with_streaming_response return raw HTTP bodies that Qwen3Guard "
                                  "cannot moderate; call create() on the guarded client, or use the unguarded client")
    extra = kwargs.get("extra_body")
    if isinstance(extra, Mapping) and "stream" in extra:
        raise ValueError("pass 'stream' to create() itself, not in extra_body: the client reads the reply by that argument")
    # The SDK sends extra_body merged over the arguments: the guard judges that body, as sent.
    request = Request.parse(endpoint, {**kwargs, **extra} if isinstance(extra, Mapping) else kwargs, guard.max_choices)
    prompt, refusal = yield from prompt_flow(guard, request, parsed=parsed)
    if refusal is not None:
        return _Streamed(None, None, refusal, prompt.decision) if request.stream else refusal
    if not request.stream:
        return (yield from whole_flow(guard, request, (yield send), prompt.decision))
    items = stream_items(guard, request, prompt.gate, prompt.decision)
    try:
        upstream = yield send
    except BaseException:
        items.close()
        raise
    return _Streamed(upstream, items, [], prompt.decision)


def _replayable(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with one-shot iterables (a generator of messages or input items) read into lists,
    so the guard and upstream both see every item (the SDK accepts any iterable there)."""
    return {k: list(v) if k in ("messages", "input") and isinstance(v, Iterator) else v for k, v in kwargs.items()}


def _unreachable() -> Any:
    raise AssertionError("a blocking client never awaits, and an async one never blocks")


def _guarded_call(endpoint: Endpoint, method: Callable[..., Any], *, parsed: bool = False) -> Callable[..., Any]:
    """A blocking ``create`` / ``parse`` that runs the flow over the original method."""

    @functools.wraps(method)
    def guarded(self: Any, **kwargs: Any) -> Any:
        kwargs = _replayable(kwargs)
        step = Step(lambda: method(self, **kwargs), _unreachable)
        out = run(_flow(self._client._qwen3guard, endpoint, kwargs, step, parsed))
        if isinstance(out, _Streamed):
            return GuardedStream(out, out.upstream.response if out.upstream else _sse_response(self._client, endpoint))
        return out

    return guarded


def _aguarded_call(endpoint: Endpoint, method: Callable[..., Any], *, parsed: bool = False) -> Callable[..., Any]:
    """The asyncio twin of ``_guarded_call`` (same flow, awaited)."""

    @functools.wraps(method)
    async def guarded(self: Any, **kwargs: Any) -> Any:
        kwargs = _replayable(kwargs)
        step = Step(_unreachable, lambda: method(self, **kwargs))
        out = await arun(_flow(self._client._qwen3guard, endpoint, kwargs, step, parsed))
        if isinstance(out, _Streamed):
            return AsyncGuardedStream(out, out.upstream.response if out.upstream else _sse_response(self._client, endpoint))
        return out

    return guarded


def _sse_response(client: OpenAI | AsyncOpenAI, endpoint: Endpoint) -> httpx2.Response:
    """The ``.response`` of a stream the guard answered itself: no request was sent upstream."""
    request = httpx2.Request("POST", client.base_url.join(_PATHS[endpoint]))
    return httpx2.Response(200, headers={"content-type": "text/event-stream"}, request=request)


def _unjudged_retrieve(self: Any, *args: Any, **kwargs: Any) -> Any:
    """Refused: a stored response comes back without the request it answers, so it cannot be moderated."""
    raise NotImplementedError("responses.retrieve() returns a stored answer Qwen3Guard cannot moderate without its "
                              "request; retrieve it with the unguarded client, or use create()")


def _resource(base: type, endpoint: Endpoint, wrap: Callable[..., Callable[..., Any]]) -> type:
    """``base`` (a completions or responses resource, GA or beta) with ``create`` and ``parse`` guarded
    and, for responses, ``retrieve`` refused."""
    members: dict[str, Any] = {"create": wrap(endpoint, base.create),
                               "__doc__": f"``{base.__name__}`` with ``create`` and ``parse`` moderated by Qwen3Guard."}
    if hasattr(base, "parse"):
        members["parse"] = wrap(endpoint, base.parse, parsed=True)
    if hasattr(base, "retrieve"):
        members["retrieve"] = _unjudged_retrieve
    return type(f"Guarded{base.__name__}", (base,), members)


_GuardedCompletions = _resource(Completions, "chat", _guarded_call)
_AsyncGuardedCompletions = _resource(AsyncCompletions, "chat", _aguarded_call)
_GuardedResponses = _resource(Responses, "responses", _guarded_call)
_AsyncGuardedResponses = _resource(AsyncResponses, "responses", _aguarded_call)
_GuardedBetaResponses = _resource(BetaResponses, "responses", _guarded_call)
_AsyncGuardedBetaResponses = _resource(AsyncBetaResponses, "responses", _aguarded_call)


def _chat(base: type, completions: type) -> type:
    def guarded_completions(self: Any) -> Any:
        """Moderated chat completions."""
        return completions(self._client)

    return type(f"Guarded{base.__name__}", (base,), {"completions": cached_property(guarded_completions)})


_CHATS = {False: _chat(Chat, _GuardedCompletions), True: _chat(AsyncChat, _AsyncGuardedCompletions)}
_RESPONSES = {False: _GuardedResponses, True: _AsyncGuardedResponses}


def _beta(base: type, is_async: bool, responses: type) -> type:
    def chat(self: Any) -> Any:
        """Chat with moderated completions (the same resource as ``client.chat``)."""
        return _CHATS[is_async](self._client)

    def guarded_responses(self: Any) -> Any:
        """The beta Responses API, moderated."""
        return responses(self._client)

    return type(f"Guarded{base.__name__}", (base,), {"chat": cached_property(chat), "responses": cached_property(guarded_responses)})


_BETAS = {False: _beta(Beta, False, _GuardedBetaResponses), True: _beta(AsyncBeta, True, _AsyncGuardedBetaResponses)}


def _guarded_namespace(cls: type) -> dict[str, Any]:
    """The members a guarded client class adds to ``cls``: guarded resources, a guard-keeping ``copy``.

    Built per class (not a mixin) because a mixin base changes the instance layout and then
    ``__class__`` cannot be swapped on the copy ``guard_openai`` makes.
    """
    is_async = issubclass(cls, AsyncOpenAI)

    def chat(self: Any) -> Any:
        """Chat with moderated completions."""
        return _CHATS[is_async](self)

    def responses(self: Any) -> Any:
        """The moderated Responses API."""
        return _RESPONSES[is_async](self)

    def beta(self: Any) -> Any:
        """openai's beta resources, with their chat completions and responses moderated."""
        return _BETAS[is_async](self)

    def guard(self: Any) -> OpenAIGuard:
        """The guard (core moderator, on_unsafe, choice cap) this client applies."""
        return self._qwen3guard  # type: ignore[no-any-return]

    def copy(self: Any, *args: Any, **kwargs: Any) -> Any:
        """openai's ``copy`` / ``with_options``; the copy is guarded by the same guard."""
        new = cls.copy(self, *args, **kwargs)
        new._qwen3guard = self._qwen3guard
        return new

    return {"__module__": __name__, "__doc__": cls.__doc__, "_unguarded": cls, "chat": cached_property(chat),
            "responses": cached_property(responses), "beta": cached_property(beta), "guard": property(guard), "copy": copy,
            "with_options": copy}


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
    stream_guard: Any = CONFIGURED,
    gen_guard: Any = CONFIGURED,
    policy: Policy | None = None,
    prompt_policy: Policy | None = None,
    prompt_check: Any = None,
    holdback_tokens: int = DEFAULT_CONSECUTIVE,
    refusal_message: str = DEFAULT_REFUSAL,
    review: Any = CONFIGURED,
    max_choices: int = DEFAULT_MAX_CHOICES,
    moderator: Moderator | None = None,
) -> _ClientT:
    """A guarded copy of ``client`` (``OpenAI``, ``AsyncOpenAI`` or a subclass); ``client`` is unchanged.

    Prompts are judged before anything is sent (Gen when configured, else Stream's prompt heads);
    a blocked prompt never reaches upstream. Streams are judged token by token by ``stream_guard``
    with a hold-back of ``holdback_tokens`` (the default releases only judged text; 0 releases at
    once); whole answers by ``gen_guard``. Guards are anything ``guard_core.backends`` accepts
    (default: the environment), loaded on first use. ``on_unsafe="abort"`` raises
    ``UnsafeContentError`` (closing upstream); ``"rewrite"`` answers with ``refusal_message`` and
    ``finish_reason="content_filter"``. ``moderator`` replaces every guard option at once.
    """
    if not isinstance(client, (OpenAI, AsyncOpenAI)):
        raise TypeError(f"guard_openai wraps an openai.OpenAI or openai.AsyncOpenAI client, got {type(client).__name__}")
    core = moderator or Moderator(gen_guard=gen_guard, stream_guard=stream_guard, policy=policy, prompt_policy=prompt_policy,
                                  prompt_check=prompt_check, holdback_tokens=holdback_tokens, refusal=refusal_message,
                                  review=review, source="openai.client")
    guarded = client.copy()
    guarded.__class__ = _guarded_class(type(client))
    guarded._qwen3guard = OpenAIGuard(core, on_unsafe=on_unsafe, max_choices=max_choices)  # type: ignore[attr-defined]
    return guarded
