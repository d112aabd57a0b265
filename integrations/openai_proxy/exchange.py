"""One OpenAI request through the guard, decided the same way by the client wrapper and the proxy.

Both take a request body (the wrapper's keyword arguments, the proxy's JSON), validate it
(``Request.parse``), judge the prompt before anything goes upstream (``prompt_flow``) and judge
whole answers once they are back (``whole_flow``); streams go through ``streaming``. Each is a
flow over the core ``Moderator`` (``guard_core.steps``), run blocking by the sync client and
awaited by the async client and the proxy. Decisions ride on what the caller gets under
``qwen3guard``: ``{"prompt": decision, "response": decision, "index": i}``, or for a whole chat
completion ``{"prompt": decision, "choices": [{"index": i, "response": decision}, ...]}``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from openai import NotGiven, Omit
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from guard_core import Decision, Moderator
from guard_core.config import check_count
from guard_core.conversation import Conversation, from_request
from guard_core.messages import REQUEST_KEYS, refuse_case_variants
from guard_core.moderator import PromptResult
from guard_core.steps import Flow
from guard_core.structured import json_source_text

from . import chunks
from .errors import MalformedReplyError, UnsafeContentError

Endpoint = Literal["chat", "responses"]
OnUnsafe = Literal["abort", "rewrite"]
#: Chat choices (``n``) one request may ask for: each one is a guard session.
DEFAULT_MAX_CHOICES = 8
#: The highest ``max_choices``: OpenAI's own limit on ``n``.
MAX_CHOICES = 128
#: How many blocked response ids a guard remembers (``OpenAIGuard.refused``).
REFUSED_IDS = 10_000


class OpenAIGuard:
    """What guarding OpenAI traffic needs beside the core ``Moderator``.

    ``on_unsafe="abort"`` raises ``UnsafeContentError`` (the proxy answers an error);
    ``"rewrite"`` answers with the refusal and ``finish_reason="content_filter"``.
    ``max_choices`` caps ``n`` (at most ``MAX_CHOICES``), since every choice is judged by its own guard session.
    ``refused`` holds the ids of the last ``REFUSED_IDS`` responses (and their output items) that a
    guard of this process blocked: upstream stored the unsafe answer under each, so a request
    continuing from one (``previous_response_id``, an ``item_reference``) is refused.
    """

    refused: ClassVar[OrderedDict[str, None]] = OrderedDict()
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, moderator: Moderator, *, on_unsafe: OnUnsafe = "abort", max_choices: int = DEFAULT_MAX_CHOICES) -> None:
        if on_unsafe not in ("abort", "rewrite"):
            raise ValueError(f"on_unsafe must be 'abort' or 'rewrite', got {on_unsafe!r}")
        self.max_choices = check_count(max_choices, "max_choices", maximum=MAX_CHOICES, hint=" (OpenAI's limit on 'n')")
        self.moderator = moderator
        self.on_unsafe: OnUnsafe = on_unsafe

    def refuse_history(self, response: Any, item_ids: Iterable[Any] = ()) -> None:
        """Remember a blocked response's id and its output items' (its stored text is the unsafe answer)."""
        ids = [chunks.field(response, "id"), *(chunks.field(item, "id") for item in chunks.field(response, "output") or ()),
               *item_ids]
        with self._lock:
            for stored in ids:
                if isinstance(stored, str) and stored:
                    self.refused[stored] = None
            while len(self.refused) > REFUSED_IDS:
                self.refused.popitem(last=False)


@dataclass(frozen=True)
class Request:
    """A validated request: which endpoint, the conversation the guard reads, and how it is answered."""

    endpoint: Endpoint
    conversation: Conversation
    stream: bool
    n: int
    model: str
    structured: bool = False  #: the answer is JSON (``response_format`` / ``text.format``): judged by what it says

    @property
    def refusal_kind(self) -> chunks.PartKind:
        """Where the guard's refusal goes: a structured answer's content is read as JSON, so it is a refusal."""
        return "refusal" if self.structured else "output_text"

    @classmethod
    def parse(cls, endpoint: Endpoint, body: Mapping[str, Any], max_choices: int) -> Request:
        """Check what the guard relies on; ``ValueError`` says what is wrong (the proxy's 400), also for
        a request continuing from a response the process's guards blocked (``OpenAIGuard.refused``)."""
        body = {k: v for k, v in body.items() if not isinstance(v, (NotGiven, Omit))}  # the SDK's "not given" markers
        refuse_case_variants(body, where="the request", keys=REQUEST_KEYS)
        stream, n, model = body.get("stream"), body.get("n"), body.get("model")
        if stream is not None and not isinstance(stream, bool):
            raise ValueError(f"'stream' must be true or false, got {stream!r}")
        if n is not None:
            check_count(n, "'n'", maximum=max_choices, hint=" (the guard's cap on choices: max_choices of guard_openai / "
                        "create_app)")
        if endpoint == "responses" and body.get("background"):
            raise ValueError("'background' responses are fetched later with retrieve(), which Qwen3Guard cannot "
                             "moderate; send the request without 'background'")
        if endpoint == "responses" and body.get("conversation") is not None:
            raise ValueError("'conversation' makes the response read and extend history stored upstream, which "
                             "Qwen3Guard cannot judge; send the history as input (or use the unguarded client)")
        items = body.get("input") if isinstance(body.get("input"), (list, tuple)) else ()
        stored = [body.get("previous_response_id"), *(chunks.field(i, "id") for i in items if chunks.field(i, "type") == "item_reference")]
        blocked = next((s for s in stored if endpoint == "responses" and isinstance(s, str) and s in OpenAIGuard.refused), None)
        if blocked is not None:
            raise ValueError(f"{blocked!r} is a response (or an item of one) Qwen3Guard blocked, and upstream stored its "
                             "unsafe answer; continue from an earlier response, or send the history as input")
        conversation = from_request(body, endpoint)
        text = chunks.field(body.get("text"), "format") if endpoint == "responses" else None
        answer_format = body.get("response_format") if endpoint == "chat" else text
        structured = chunks.field(answer_format, "type") in ("json_schema", "json_object")
        return cls(endpoint, conversation, bool(stream), n or 1, model if isinstance(model, str) else "", structured)


def note(*, prompt: Decision | None = None, response: Decision | None = None, index: int | None = None) -> dict[str, Any]:
    """The ``qwen3guard`` field: the decisions, and which choice (or output item) they are about."""
    out: dict[str, Any] = {}
    if prompt is not None:
        out["prompt"] = prompt.to_dict()
    if response is not None:
        out["response"] = response.to_dict()
    if index is not None:
        out["index"] = index
    return out


def refusal_for_prompt(guard: OpenAIGuard, request: Request, decision: Decision, *, parsed: bool = False) -> Any:
    """What answers a blocked prompt in rewrite mode: a refusal stream (list of items) or object."""
    text, model, body, kind = guard.moderator.refusal, request.model, note(prompt=decision), request.refusal_kind
    if request.endpoint == "chat":
        if request.stream:
            return chunks.prompt_refusal_chunks(model, text, body, request.n, kind)
        return chunks.refusal_completion(model, text, body, request.n, parsed=parsed, kind=kind)
    item = chunks.message_item(chunks.new_id("msg"), text, kind=kind)
    if request.stream:
        return chunks.responses_refusal_events(None, item_id=item["id"], output_index=0, content_index=0, delivered="",
                                               text=text, prior=[], sequence=0, note=body, model=model, opened=False,
                                               kind=kind)
    return chunks.incomplete_response(None, [item], body, model=model, parsed=parsed)


def prompt_flow(guard: OpenAIGuard, request: Request, *, parsed: bool = False) -> Flow[tuple[PromptResult, Any]]:
    """Judge the prompt; a block raises (abort) or comes back as the refusal to answer with (rewrite)."""
    # A structured stream is held and judged whole by its own check, so a Stream prompt gate would be prefilled for nothing.
    result = yield from guard.moderator.prompt_flow(request.conversation, keep_gate=request.stream and not request.structured)
    decision = result.decision
    if decision is None or not decision.blocked:
        return result, None
    if guard.on_unsafe == "abort":
        raise UnsafeContentError(decision)
    return result, refusal_for_prompt(guard, request, decision, parsed=parsed)


def whole_flow(guard: OpenAIGuard, request: Request, reply: Any, prompt: Decision | None) -> Flow[Any]:
    """Judge every choice of a whole chat completion (content and refusal), or the text of a whole response
    (its output text and refusal parts); a reply the guard cannot read raises ``MalformedReplyError``."""
    kind, field = (ChatCompletion, "choices") if request.endpoint == "chat" else (Response, "output")
    completion = reply if isinstance(reply, kind) else chunks.sdk_object(kind, reply)
    if not isinstance(getattr(completion, field, None), list):
        raise MalformedReplyError(f"the upstream's reply has no '{field}' list, so there is nothing the guard can judge")
    if field == "choices" and len(completion.choices) > request.n:  # as a stream's extra choice is refused
        raise MalformedReplyError(f"the upstream sent {len(completion.choices)} choices, but the request asked for {request.n}")
    texts = chunks.completion_texts(completion) if field == "choices" else [chunks.response_answer(completion)]
    texts = [json_source_text(t) for t in texts] if request.structured else texts
    decisions = yield from guard.moderator.answers_flow(request.conversation, texts)
    judged = [(i, d) for i, d in enumerate(decisions) if d is not None]
    blocked = [(i, d) for i, d in judged if d.blocked]
    if blocked and field == "output":
        guard.refuse_history(completion)
    if blocked and guard.on_unsafe == "abort":
        index, decision = blocked[0]
        if field == "choices":
            raise UnsafeContentError(decision, choice_index=completion.choices[index].index)
        raise UnsafeContentError(decision, choice_index=0, output="output")
    refusal = guard.moderator.refusal
    if field == "output":
        body = note(prompt=prompt, response=decisions[0])
        return chunks.refused_response(completion, refusal, body, request.refusal_kind) if blocked else chunks.annotated(
            completion, body)
    refused = {i for i, _ in blocked}
    choices = [chunks.refused_choice(c, refusal, request.refusal_kind) if i in refused else c
               for i, c in enumerate(completion.choices)]
    body = {**note(prompt=prompt), "choices": [{"index": completion.choices[i].index, "response": d.to_dict()} for i, d in judged]}
    return chunks.annotated(completion.model_copy(update={"choices": choices}), body)


def review_ids(*decisions: Decision | None) -> list[str]:
    """The review items opened by these decisions (the proxy's ``x-qwen3guard-review`` header)."""
    return [d.review_id for d in decisions if d is not None and d.review_id]

