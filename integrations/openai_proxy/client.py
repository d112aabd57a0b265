"""``guard_openai``: an OpenAI / AsyncOpenAI client whose chat completions and responses are moderated.

The wrapped client is a copy of the given one whose class is a subclass of the original
(``GuardedOpenAI(OpenAI)``, built per client class), so ``isinstance`` checks, every resource the
guard does not touch, and ``with_options()`` / ``copy()`` (which rebuild through ``__class__``)
keep working, the latter keeping the guard. Only ``create`` and ``parse`` of ``chat.completions``
and ``responses`` (and their ``beta`` twins) are replaced (openai's ``stream()`` helpers call
``create``). Their raw-response wrappers, and every other method there that would move text past
the guard (``_REFUSED``: stored answers and items, ``responses.connect`` over a WebSocket, the
legacy ``completions.create``; and the whole Realtime API), refuse to run. Each call is one flow (``exchange``)
over a snapshot of the arguments, run blocking or awaited, so the sync and async clients decide
identically.

Streams come back as ``GuardedStream`` / ``AsyncGuardedStream``, subclasses of openai's
``Stream`` / ``AsyncStream`` in the same style: a generator over the upstream stream through the
guard (``streaming``) that always closes the upstream response and the guard sessions.
"""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, TypeVar

import httpx2
from openai import AsyncOpenAI, AsyncStream, OpenAI, Stream
from openai.resources.chat import AsyncChat, Chat
from openai.resources.chat.completions import AsyncCompletions, Completions
from openai.resources.chat.completions.messages import AsyncMessages, Messages
from openai.lib._parsing._completions import type_to_response_format_param
from openai.lib._parsing._responses import type_to_text_format_param
from openai.resources.beta import AsyncBeta, Beta
from openai.resources.beta.responses import AsyncResponses as AsyncBetaResponses
from openai.resources.beta.responses import Responses as BetaResponses
from openai.resources.beta.responses.input_items import AsyncInputItems as AsyncBetaInputItems
from openai.resources.beta.responses.input_items import InputItems as BetaInputItems
from openai.resources.beta.responses.input_tokens import AsyncInputTokens as AsyncBetaInputTokens
from openai.resources.beta.responses.input_tokens import InputTokens as BetaInputTokens
from openai.resources.beta.realtime import AsyncRealtime as AsyncBetaRealtime
from openai.resources.beta.realtime import Realtime as BetaRealtime
from openai.resources.completions import AsyncCompletions as AsyncTextCompletions
from openai.resources.completions import Completions as TextCompletions
from openai.resources.conversations import AsyncConversations, Conversations
from openai.resources.conversations.items import AsyncItems, Items
from openai.resources.realtime import AsyncRealtime, Realtime

try:
    from openai.resources.live import AsyncLive, Live
except ImportError:  # an openai release from before the Live API: nothing to refuse
    Live = AsyncLive = None  # type: ignore[assignment,misc]
from openai.resources.responses import AsyncResponses, Responses
from openai.resources.responses.input_items import AsyncInputItems, InputItems
from openai.resources.responses.input_tokens import AsyncInputTokens, InputTokens

from guard_core import CONFIGURED, DEFAULT_REFUSAL, Decision, Moderator, Policy, Verdict
from guard_core.config import DEFAULT_CONSECUTIVE
from guard_core.steps import Flow, Step, arun, run

from .errors import guard_failures
from .exchange import DEFAULT_MAX_CHOICES, Endpoint, OnUnsafe, OpenAIGuard, Request, prompt_flow, whole_flow
from .streaming import GuardedItems, stream_items

_T = TypeVar("_T")
_RAW_HEADER = "x-stainless-raw-response"
_PATHS = {"chat": "chat/completions", "responses": "responses"}
_STORED = "Qwen3Guard cannot moderate without the request it answers"
#: Arguments the SDK takes as any iterable, read into lists so the guard and upstream both see every item.
_LISTS = frozenset({"messages", "input", "tools", "functions"})
#: What the guarded resources refuse (``beta`` ones too), by resource and method: each would move text
#: past the guard, a stored answer without its request or a request that does not go through ``create``.
_REFUSED: dict[str, dict[str, str]] = {
    "chat.completions": {
        "retrieve": f"returns a stored answer {_STORED}; retrieve it with the unguarded client, or use create()",
        "list": f"returns stored answers, each of which {_STORED}; list them with the unguarded client",
        "update": f"returns a stored answer {_STORED}; update it with the unguarded client",
    },
    "chat.completions.messages": {
        "list": f"returns a stored completion's messages, its answer among them, which {_STORED}; list them with the "
                "unguarded client",
    },
    "responses": {
        "retrieve": f"returns a stored answer {_STORED}; retrieve it with the unguarded client, or use create()",
        "cancel": f"returns a stored (background) answer {_STORED}; cancel it with the unguarded client",
        "compact": "sends the conversation upstream unjudged and returns items the model wrote, which Qwen3Guard does "
                   "not moderate; compact it with the unguarded client",
        "connect": "(the Responses API over a WebSocket) is not moderated by Qwen3Guard; use create(stream=True) on the "
                   "guarded client, or connect with the unguarded client",
    },
    "responses.input_items": {
        "list": f"returns a stored response's input, earlier answers among it, which {_STORED}; list it with the "
                "unguarded client",
    },
    "responses.input_tokens": {
        "count": "sends the input upstream without Qwen3Guard judging it; count tokens with the unguarded client",
    },
    "conversations": {
        "create": "stores items upstream unjudged that later responses read as context; send them as input to "
                  "responses.create() on the guarded client, or use the unguarded client",
    },
    "conversations.items": {
        "create": "stores items upstream unjudged that later responses read as context; send them as input to "
                  "responses.create() on the guarded client, or use the unguarded client",
        "list": f"returns stored items, earlier answers among them, which {_STORED}; list them with the unguarded client",
        "retrieve": f"returns a stored item {_STORED}; retrieve it with the unguarded client",
    },
    "completions": {
        "create": "(the legacy text completions API) is not moderated by Qwen3Guard; use chat.completions.create() on "
                  "the guarded client, or call the unguarded client and judge the prompt and the text yourself with "
                  "guard_core.Moderator (check_prompt, check_answers)",
    },
}


@dataclass
class _Streamed:
    """A flow's answer for a stream: upstream's stream and the guard over it, or a replayed refusal."""

    upstream: Any
    items: GuardedItems | None
    replay: list[Any]
    prompt: Decision | None


class _Decisions:
    """What both stream classes share: the guard's decisions, and freeing its sessions."""

    _streamed: _Streamed

    def _release_guard(self) -> None:
        if self._streamed.items is not None:
            self._streamed.items.close()

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
        _closing_also(response, "close", self._abandon)

    def _abandon(self) -> None:
        """The response was closed without this stream (openai's ``stream()`` helpers end a stream so):
        free the guard sessions, unless a reader is in the stream right now (it frees them itself)."""
        if not self._iterator.gi_running:  # type: ignore[attr-defined]
            self._iterator.close()
            self._release_guard()

    def __stream__(self) -> Iterator[_T]:
        upstream, items = self._streamed.upstream, self._streamed.items
        try:
            yield from self._streamed.replay
            for item in upstream if items is not None else ():
                with guard_failures():
                    judged = items.feed(item)  # type: ignore[union-attr]
                yield from judged
                if items.done:  # type: ignore[union-attr]
                    break
            with guard_failures():
                judged = items.end() if items is not None else []
            yield from judged
        finally:
            self._release()

    def close(self) -> None:
        """Stop reading: close the upstream response, then free the guard sessions.

        Upstream goes first, so a ``close()`` from another thread (a "stop" button) stops a reader
        there as it stops one of openai's own streams: its read fails, and its ``finally`` frees the
        sessions (they are never freed under a judgement in progress).
        """
        if self._streamed.upstream is not None:
            self._streamed.upstream.close()
        try:
            self._iterator.close()
        except ValueError:
            if not self._iterator.gi_running:  # type: ignore[attr-defined]
                raise
            return  # read by another thread right now, which releases the rest
        self._release()

    def _release(self) -> None:
        if self._streamed.upstream is not None:
            self._streamed.upstream.close()
        self._release_guard()


class AsyncGuardedStream(_Decisions, AsyncStream[_T]):
    """A moderated ``openai.AsyncStream``: ``async for``, ``await close()``, ``async with``; ``.response`` is upstream's."""

    def __init__(self, streamed: _Streamed, response: httpx2.Response) -> None:
        self.response, self._streamed = response, streamed
        self._iterator = self.__stream__()
        _closing_also(response, "aclose", self._abandon)

    async def _abandon(self) -> None:
        """``GuardedStream._abandon`` for asyncio."""
        if not self._iterator.ag_running:  # type: ignore[attr-defined]
            await self._iterator.aclose()
            self._release_guard()

    async def __stream__(self) -> AsyncIterator[_T]:
        upstream, items = self._streamed.upstream, self._streamed.items
        try:
            for item in self._streamed.replay:
                yield item
            if items is not None:
                async for item in upstream:
                    with guard_failures():
                        judged = await items.afeed(item)
                    for out in judged:
                        yield out
                    if items.done:
                        break
                with guard_failures():
                    judged = await items.aend()
                for out in judged:
                    yield out
        finally:
            await self._release()

    async def close(self) -> None:
        """Stop reading: close the upstream response, then free the guard sessions (as ``GuardedStream.close``:
        a reader in another task stops as it does on openai's own stream, and frees them itself)."""
        if self._streamed.upstream is not None:
            await self._streamed.upstream.close()
        try:
            await self._iterator.aclose()
        except RuntimeError:
            if not self._iterator.ag_running:  # type: ignore[attr-defined]
                raise
            return  # read by another task right now, which releases the rest
        await self._release()

    async def _release(self) -> None:
        if self._streamed.upstream is not None:
            await self._streamed.upstream.close()
        self._release_guard()


def _closing_also(response: httpx2.Response, name: str, then: Callable[[], Any]) -> None:
    """Make ``response.<name>()`` (``close`` / ``aclose``) call ``then`` after it: openai's stream
    helpers (``chat.completions.stream()``, ``responses.stream()``) end a stream by closing its
    response only, which would leave the guard sessions open until garbage collection."""
    original = getattr(response, name)
    if name == "aclose":
        async def closing() -> None:
            await original()
            await then()
    else:
        def closing() -> None:  # type: ignore[misc]
            original()
            then()
    setattr(response, name, closing)


def _flow(guard: OpenAIGuard, endpoint: Endpoint, kwargs: dict[str, Any], send: Step[Any], parsed: bool) -> Flow[Any]:
    """One call: the prompt first (a blocked one never goes upstream), then the answer."""
    extra = kwargs.get("extra_body")
    if isinstance(extra, Mapping) and "stream" in extra:
        raise ValueError("pass 'stream' to create() itself, not in extra_body: the client reads the reply by that argument")
    # The SDK sends extra_body merged over the arguments: the guard judges that body, as sent.
    body = _schemas_as_sent(endpoint, kwargs) if parsed else kwargs
    request = Request.parse(endpoint, {**body, **extra} if isinstance(extra, Mapping) else body, guard.max_choices)
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


def _refuse_raw(client: OpenAI | AsyncOpenAI, kwargs: dict[str, Any]) -> None:
    """``NotImplementedError`` for a call the SDK would answer with the raw HTTP body: the header
    ``with_raw_response`` sets, in the call's or the client's headers."""
    headers = [*(kwargs.get("extra_headers") or {}), *client.default_headers]
    if any(str(k).lower() == _RAW_HEADER for k in headers):
        raise NotImplementedError("with_raw_response / with_streaming_response (or an x-stainless-raw-response header) "
                                  "return raw HTTP bodies that Qwen3Guard cannot moderate; call create() on the guarded "
                                  "client, or use the unguarded client")


def _schemas_as_sent(endpoint: Endpoint, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``parse()``'s arguments with a class given as ``response_format`` / ``text_format`` turned
    into the JSON schema the SDK sends for it (inside the method the guard wraps), so the guard
    judges that schema's text as it judges one given as a dict."""
    body = dict(kwargs)
    if endpoint == "chat" and isinstance(body.get("response_format"), type):
        body["response_format"] = type_to_response_format_param(body["response_format"])
    if endpoint == "responses" and isinstance(body.get("text_format"), type):
        text = body.get("text") if isinstance(body.get("text"), Mapping) else {}
        body["text"] = {**text, "format": type_to_text_format_param(body.pop("text_format"))}
    return body


def _snapshot(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``kwargs``: what the guard judges and what the SDK sends.

    The SDK serialises the arguments only after the guard has judged them, so a list the caller
    changes meanwhile (a chat history another task or thread appends to) must not be the one sent.
    Iterables that are not sequences (a generator of messages or input items, ``dict.values()``;
    the SDK accepts any iterable) are read into lists first, so the guard and upstream both see
    every item.
    """
    replayable = {k: list(v) if k in _LISTS and _one_pass(v) else v for k, v in kwargs.items()}
    try:
        return copy.deepcopy(replayable)
    except TypeError as exc:
        raise TypeError(f"guard_openai judges and sends a copy of the request, and an argument cannot be copied "
                        f"({exc}); pass plain values (str, list, dict, pydantic models)") from None


def _one_pass(value: Any) -> bool:
    """An iterable the SDK reads but that cannot be copied or read twice as it stands."""
    return isinstance(value, Iterable) and not isinstance(value, (Sequence, Mapping))


def _unreachable() -> Any:
    raise AssertionError("a blocking client never awaits, and an async one never blocks")


def _guarded_call(endpoint: Endpoint, method: Callable[..., Any], *, parsed: bool = False) -> Callable[..., Any]:
    """A blocking ``create`` / ``parse`` that runs the flow over the original method."""

    @functools.wraps(method)
    def guarded(self: Any, **kwargs: Any) -> Any:
        _refuse_raw(self._client, kwargs)
        kwargs = _snapshot(kwargs)
        step = Step(lambda: method(self, **kwargs), _unreachable)
        with guard_failures():
            out = run(_flow(self._client._qwen3guard, endpoint, kwargs, step, parsed))
        if isinstance(out, _Streamed):
            return GuardedStream(out, out.upstream.response if out.upstream else _sse_response(self._client, endpoint))
        return out

    return guarded


def _aguarded_call(endpoint: Endpoint, method: Callable[..., Any], *, parsed: bool = False) -> Callable[..., Any]:
    """The asyncio twin of ``_guarded_call`` (same flow, awaited)."""

    @functools.wraps(method)
    async def guarded(self: Any, **kwargs: Any) -> Any:
        _refuse_raw(self._client, kwargs)
        kwargs = _snapshot(kwargs)
        step = Step(_unreachable, lambda: method(self, **kwargs))
        with guard_failures():
            out = await arun(_flow(self._client._qwen3guard, endpoint, kwargs, step, parsed))
        if isinstance(out, _Streamed):
            return AsyncGuardedStream(out, out.upstream.response if out.upstream else _sse_response(self._client, endpoint))
        return out

    return guarded


def _sse_response(client: OpenAI | AsyncOpenAI, endpoint: Endpoint) -> httpx2.Response:
    """The ``.response`` of a stream the guard answered itself: no request was sent upstream."""
    request = httpx2.Request("POST", client.base_url.join(_PATHS[endpoint]))
    return httpx2.Response(200, headers={"content-type": "text/event-stream"}, request=request)


def _refused(name: str, why: str) -> Callable[..., Any]:
    """A method that raises ``NotImplementedError``: calling ``name()`` would move text past the guard."""

    def refused(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{name}() {why}")

    refused.__name__, refused.__doc__ = name.rsplit(".", 1)[-1], f"Refused: ``{name}()`` {why}."
    return refused


def _refusing(base: type, where: str, members: Mapping[str, Any] | None = None) -> type:
    """``base`` (the SDK's resource at ``client.<where>``) with ``members`` and the methods ``_REFUSED`` lists refused."""
    why = _REFUSED.get(where.removeprefix("beta."), {})
    refused = {m: _refused(f"{where}.{m}", reason) for m, reason in why.items() if hasattr(base, m)}
    doc = f"``client.{where}`` with {', '.join(f'``{m}``' for m in refused)} refused."
    return type(f"Guarded{base.__name__}", (base,), {"__doc__": doc, **refused, **(members or {})})


def _subresource(cls: type, doc: str | None = None, *, of_client: bool = False) -> cached_property[Any]:
    """A resource attribute as ``cls``, built and cached like openai's own: from the owner's client
    (a sub-resource: ``messages``, ``input_items``), or ``of_client``, from the client itself. It
    sends through the client's own HTTP methods, which the guarded client refuses for the moderated
    paths (``_checked_http``)."""
    def get(self: Any) -> Any:
        client = self if of_client else self._client
        resource = cls(client)
        for verb in _HTTP_VERBS:
            setattr(resource, f"_{verb}", functools.partial(getattr(client._unguarded, verb), client))
        return resource

    get.__doc__ = doc or cls.__doc__
    return cached_property(get)


def _resource(base: type, endpoint: Endpoint, wrap: Callable[..., Callable[..., Any]], where: str,
              subresources: Mapping[str, type]) -> type:
    """``base`` (a completions or responses resource, GA or beta) with ``create`` and ``parse`` guarded,
    and what would move text past the guard (``_REFUSED``) refused, on ``subresources`` too."""
    members: dict[str, Any] = {"create": wrap(endpoint, base.create),
                               "__doc__": f"``client.{where}`` with ``create`` and ``parse`` moderated by Qwen3Guard."}
    if hasattr(base, "parse"):
        members["parse"] = wrap(endpoint, base.parse, parsed=True)
    for name, sub in subresources.items():
        members[name] = _subresource(_refusing(sub, f"{where}.{name}"))
    return _refusing(base, where, members)


_GuardedCompletions = _resource(Completions, "chat", _guarded_call, "chat.completions", {"messages": Messages})
_AsyncGuardedCompletions = _resource(AsyncCompletions, "chat", _aguarded_call, "chat.completions", {"messages": AsyncMessages})
_GuardedResponses = _resource(Responses, "responses", _guarded_call, "responses",
                              {"input_items": InputItems, "input_tokens": InputTokens})
_AsyncGuardedResponses = _resource(AsyncResponses, "responses", _aguarded_call, "responses",
                                   {"input_items": AsyncInputItems, "input_tokens": AsyncInputTokens})
_GuardedBetaResponses = _resource(BetaResponses, "responses", _guarded_call, "beta.responses",
                                  {"input_items": BetaInputItems, "input_tokens": BetaInputTokens})
_AsyncGuardedBetaResponses = _resource(AsyncBetaResponses, "responses", _aguarded_call, "beta.responses",
                                       {"input_items": AsyncBetaInputItems, "input_tokens": AsyncBetaInputTokens})
_TEXT_COMPLETIONS = {False: _refusing(TextCompletions, "completions"), True: _refusing(AsyncTextCompletions, "completions")}
_SESSIONS_WHY = ("belongs to the {} API (voice and WebSocket sessions), which Qwen3Guard does not moderate; use "
                 "chat.completions.create() or responses.create() on the guarded client, or the unguarded client")
_REALTIME_WHY = _SESSIONS_WHY.format("Realtime")


def _refused_api(base: type, where: str, why: str = _REALTIME_WHY) -> type:
    """``base`` with every method refused, its sub-resources too: an API the guard reads nothing of."""
    members: dict[str, Any] = {"__doc__": f"``client.{where}``, refused: it {why}."}
    for name, attr in vars(base).items():
        if name.startswith("_") or name in ("with_raw_response", "with_streaming_response"):
            continue
        if isinstance(attr, cached_property):
            sub = attr.func.__annotations__.get("return")
            sub = getattr(sys.modules[base.__module__], sub, None) if isinstance(sub, str) else sub
            if isinstance(sub, type):
                members[name] = _subresource(_refused_api(sub, f"{where}.{name}", why))
        elif callable(attr):
            members[name] = _refused(f"{where}.{name}", why)
    return type(f"Guarded{base.__name__}", (base,), members)


_REALTIME = {False: _refused_api(Realtime, "realtime"), True: _refused_api(AsyncRealtime, "realtime")}
_BETA_REALTIME = {False: _refused_api(BetaRealtime, "beta.realtime"), True: _refused_api(AsyncBetaRealtime, "beta.realtime")}
_LIVE = {is_async: _refused_api(base, "live", _SESSIONS_WHY.format("Live")) for is_async, base in ((False, Live), (True, AsyncLive))
         if base is not None}
_CONVERSATIONS = {
    is_async: _refusing(base, "conversations", {"items": _subresource(_refusing(items, "conversations.items"))})
    for is_async, base, items in ((False, Conversations, Items), (True, AsyncConversations, AsyncItems))
}


def _chat(base: type, completions: type) -> type:
    return type(f"Guarded{base.__name__}", (base,), {"completions": _subresource(completions, "Moderated chat completions.")})


_CHATS = {False: _chat(Chat, _GuardedCompletions), True: _chat(AsyncChat, _AsyncGuardedCompletions)}
_RESPONSES = {False: _GuardedResponses, True: _AsyncGuardedResponses}


def _beta(base: type, is_async: bool, responses: type) -> type:
    return type(f"Guarded{base.__name__}", (base,), {
        "chat": _subresource(_CHATS[is_async], "Chat with moderated completions (the same resource as ``client.chat``)."),
        "responses": _subresource(responses, "The beta Responses API, moderated."),
        "realtime": _subresource(_BETA_REALTIME[is_async], "The beta Realtime API, refused like ``client.realtime``."),
    })


_BETAS = {False: _beta(Beta, False, _GuardedBetaResponses), True: _beta(AsyncBeta, True, _AsyncGuardedBetaResponses)}


#: The client's HTTP methods (``client.post(path, ...)``), each taking the path first.
_HTTP_VERBS = ("get", "post", "patch", "put", "delete", "get_api_list")
#: The APIs whose text the guard judges or refuses, by their path under the base URL: a raw request
#: there would pass it.
_MODERATED_PATHS = ("chat/completions", "responses", "completions", "conversations", "realtime", "live")


def _moderated(client: Any, path: str) -> bool:
    """True for a path (relative, or a full URL) of an API in ``_MODERATED_PATHS``, read under the
    client's base URL as the server routes it (a gateway's own ``/realtime/`` prefix is not one)."""
    full, base = client._prepare_url(path).path.lower(), client.base_url.path.lower().rstrip("/") + "/"
    under = (full.removeprefix(base) if full.startswith(base) else full).strip("/")
    return any(under == api or under.startswith(api + "/") for api in _MODERATED_PATHS)


def _checked_http(cls: type, verb: str) -> Callable[..., Any]:
    """``client.<verb>(path, ...)``, refused for a moderated path (``post("/chat/completions")`` would
    send the request past the guard); every other path is openai's own method."""
    original = getattr(cls, verb)

    @functools.wraps(original)
    def checked(self: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        if _moderated(self, path):
            raise NotImplementedError(f"client.{verb}({path!r}) would send a request past Qwen3Guard; use the guarded "
                                      "resources (chat.completions.create, responses.create), or the unguarded client")
        return original(self, path, *args, **kwargs)

    return checked


def _guarded_namespace(cls: type) -> dict[str, Any]:
    """The members a guarded client class adds to ``cls``: guarded resources, a guard-keeping ``copy``.

    Built per class (not a mixin) because a mixin base changes the instance layout and then
    ``__class__`` cannot be swapped on the copy ``guard_openai`` makes.
    """
    is_async = issubclass(cls, AsyncOpenAI)

    def guard(self: Any) -> OpenAIGuard:
        """The guard (core moderator, on_unsafe, choice cap) this client applies."""
        return self._qwen3guard  # type: ignore[no-any-return]

    def copy(self: Any, *args: Any, **kwargs: Any) -> Any:
        """openai's ``copy`` / ``with_options``; the copy is guarded by the same guard."""
        new = cls.copy(self, *args, **kwargs)
        new._qwen3guard = self._qwen3guard
        return new

    resources = {name: _subresource(table[is_async], doc, of_client=True) for name, (table, doc) in _CLIENT_RESOURCES.items()}
    http = {verb: _checked_http(cls, verb) for verb in _HTTP_VERBS}
    return {"__module__": __name__, "__doc__": cls.__doc__, "_unguarded": cls, **resources, **http, "guard": property(guard),
            "copy": copy, "with_options": copy}


#: The client's resources a guarded client replaces: the class for sync and async clients, and its docstring.
_CLIENT_RESOURCES: dict[str, tuple[dict[bool, type], str]] = {
    "chat": (_CHATS, "Chat with moderated completions."),
    "responses": (_RESPONSES, "The moderated Responses API."),
    "beta": (_BETAS, "openai's beta resources, with their chat completions and responses moderated."),
    "completions": (_TEXT_COMPLETIONS, "The legacy completions API, refused (the guard reads chat and Responses requests only)."),
    "realtime": (_REALTIME, "The Realtime API, refused (voice and WebSocket sessions the guard does not read)."),
    **({"live": (_LIVE, "The Live API, refused like the Realtime API.")} if _LIVE else {}),
    "conversations": (_CONVERSATIONS, "Stored conversations, with the methods that store or return items unjudged refused."),
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
    """A guarded copy of ``client`` (``OpenAI``, ``AsyncOpenAI`` or a subclass); ``client`` itself stays unguarded.

    Like openai's ``with_options()`` copies, the copy shares ``client``'s connection pool (its HTTP
    client): closing either one (``close()``, or leaving ``with``) closes both.

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
