"""Reading and writing OpenAI response objects: the only places the guard touches protocol data.

Upstream objects are read the way the openai SDK itself reads them (``sdk_object``: loose
construction, no validation against the newest types), so vLLM, SGLang, llama.cpp and older
servers pass through as they do with the bare client. What the guard must judge is then read
strictly: the readers here (``chat_choices``, ``completion_texts``, ``event_delta``,
``event_texts``, ``response_texts``) find every text the caller is shown (content and refusal;
Responses output text and refusal parts, in deltas, done events, parts, items and whole
responses) and raise ``MalformedReplyError`` for what they cannot read, so nothing unreadable
passes unjudged. Reasoning, tool-call arguments and audio are not read (the README says so).
Objects the guard writes itself are validated strictly and carry a ``qwen3guard`` field with the
decisions; objects it forwards are never touched unless a decision must ride on them.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

from openai._models import construct_type
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage, ParsedChatCompletion
from openai.types.chat.chat_completion import Choice as CompletionChoice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.responses import ParsedResponse, Response, ResponseOutputItem, ResponseStreamEvent
from pydantic import BaseModel

from guard_core import METADATA_KEY
from guard_core.messages import check_text, content_to_text

from .errors import MalformedReplyError

CONTENT_FILTER = "content_filter"
T = TypeVar("T")
#: Where a Responses text lives: (output_index, content_index).
Part = tuple[int, int]
#: The kind of a Responses text part the guard reads: model output text, or the model's refusal.
PartKind = Literal["output_text", "refusal"]
#: The chat message field that carries a text of each kind.
_CHAT_FIELDS: dict[PartKind, str] = {"output_text": "content", "refusal": "refusal"}
#: Extra fields (vLLM, SGLang, OpenRouter) carrying a chat choice's reasoning; passed through unjudged.
REASONING_FIELDS = ("reasoning_content", "reasoning")


def sdk_object(type_: Any, data: Any) -> Any:
    """``data`` as the openai SDK builds it from a reply: nested types, unknown fields kept, no validation."""
    return construct_type(type_=type_, value=data)


def new_id(prefix: str) -> str:
    """An id for an object the guard writes, recognisable as such."""
    return f"{prefix}-qwen3guard-{uuid.uuid4().hex[:24]}"


def annotated(obj: T, note: dict[str, Any]) -> T:
    """A copy of ``obj`` carrying the guard's decisions under ``qwen3guard``."""
    return obj.model_copy(update={METADATA_KEY: note})  # type: ignore[attr-defined,no-any-return]


def upstream_text(value: Any, where: str) -> str:
    """A text field of an upstream reply ("" for None); anything else is the upstream's fault."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedReplyError(f"the upstream sent {where} as {type(value).__name__}, not a string")
    try:
        return check_text(value, where=f"the upstream's {where}")
    except ValueError as exc:
        raise MalformedReplyError(str(exc)) from None


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Chat completions


def _delta_text(delta: Any) -> str:
    """The text a chunk's delta adds to its choice: content, then refusal (both are shown to the user)."""
    return "" if delta is None else (delta.content or "") + (delta.refusal or "")


def chat_choices(chunk: Any) -> list[tuple[int, str, bool]]:
    """What a streamed chunk says per choice: ``(index, text, finished)``, read as the SDK reads it.

    A chunk without ``choices`` (usage chunks) or a choice with a null ``delta`` carries nothing
    to judge; a payload that is not a chunk object, ``choices`` that is not a list, a choice
    without an integer ``index`` (or twice in one chunk), or text that is not a string (or not
    valid Unicode) is the upstream's fault (``MalformedReplyError``).
    """
    if not isinstance(chunk, ChatCompletionChunk):
        raise MalformedReplyError(f"the upstream sent a stream event that is not a chat.completion.chunk object "
                                  f"(a JSON {type(chunk).__name__})")
    choices = chunk.choices
    if choices is None:
        return []
    if not isinstance(choices, list):
        raise MalformedReplyError(f"the upstream sent a chunk whose 'choices' is {type(choices).__name__}, not a list")
    out: list[tuple[int, str, bool]] = []
    for i, choice in enumerate(choices):
        if not isinstance(choice, ChunkChoice) or not _int(choice.index):
            raise MalformedReplyError(f"the upstream sent a chunk whose choice {i} has no integer 'index'")
        if any(choice.index == seen for seen, _, _ in out):
            raise MalformedReplyError(f"the upstream sent a chunk with choice {choice.index} twice")
        delta = choice.delta
        if delta is not None and not isinstance(delta, ChoiceDelta):
            raise MalformedReplyError(f"the upstream sent a chunk whose choice {choice.index} has a 'delta' that is not an object")
        if delta is not None:
            upstream_text(delta.content, f"the content of choice {choice.index}")
            upstream_text(delta.refusal, f"the refusal of choice {choice.index}")
        out.append((choice.index, _delta_text(delta), choice.finish_reason is not None))
    return out


def choice_text(chunk: ChatCompletionChunk, index: int) -> str:
    """The text (content, then refusal) that ``chunk`` adds to choice ``index`` ("" when none)."""
    return next((_delta_text(c.delta) for c in chunk.choices or () if c.index == index), "")


def completion_texts(completion: ChatCompletion) -> list[str]:
    """The answer of every choice of a whole completion: its content (a string or text parts) and refusal."""
    texts = []
    for i, choice in enumerate(completion.choices):
        message = getattr(choice, "message", None)
        if not isinstance(choice, CompletionChoice) or not isinstance(message, ChatCompletionMessage):
            raise MalformedReplyError(f"the upstream's reply has no message in choice {i}")
        content = message.content
        if isinstance(content, list):
            try:
                content = content_to_text([_plain(p) for p in content], where=f"the upstream's choice {i}")
            except ValueError as exc:
                raise MalformedReplyError(str(exc)) from None
        pieces = [upstream_text(content, f"the content of choice {i}"), upstream_text(message.refusal, f"the refusal of choice {i}")]
        texts.append("\n".join(p for p in pieces if p))
    return texts


def cut_choice(chunk: ChatCompletionChunk, index: int, keep: int) -> ChatCompletionChunk | None:
    """``chunk`` with choice ``index`` cut to its first ``keep`` characters of content.

    Everything that could carry blocked text goes with the cut: the rest of the content, the
    choice's tool calls, audio and reasoning (held behind its text, never judged safe), its logprobs
    (their tokens spell the text) and its finish_reason (the guard writes its own). A choice left
    with nothing is removed; a chunk left with no choice becomes ``None``.
    """
    choices = []
    for choice in chunk.choices or ():
        if choice.index != index:
            choices.append(choice)
            continue
        delta = choice.delta
        if delta is not None:
            content, refusal = delta.content or "", delta.refusal or ""
            unjudged = {f: None for f in ("tool_calls", "function_call", "audio", *REASONING_FIELDS)
                        if getattr(delta, f, None) is not None}
            delta = delta.model_copy(update={"content": content[:keep] or None,
                                             "refusal": refusal[: max(0, keep - len(content))] or None, **unjudged})
        if delta is not None and delta.model_dump(exclude_none=True):
            choices.append(choice.model_copy(update={"delta": delta, "logprobs": None, "finish_reason": None}))
    if not choices and chunk.choices:
        return None
    return chunk.model_copy(update={"choices": choices})


def refusal_chunks(template: ChatCompletionChunk | None, index: int, text: str, note: dict[str, Any],
                   *, model: str = "", role: bool = False, kind: PartKind = "output_text") -> list[ChatCompletionChunk]:
    """The end of a rewritten choice: the refusal text, then ``finish_reason="content_filter"``.

    ``template`` (the last upstream chunk) supplies id, model and fingerprint so the chunks
    belong to the same completion; ``role`` adds ``role: assistant`` for a choice that never
    started (a blocked prompt). ``kind="refusal"`` (a structured answer, whose content a parser
    reads as JSON) sends the text as ``refusal``, as OpenAI answers a refused structured output.
    """
    tid, created, tmodel = (getattr(template, f, None) for f in ("id", "created", "model"))
    base: dict[str, Any] = {"id": tid if isinstance(tid, str) else new_id("chatcmpl"),
                            "created": created if _int(created) else int(time.time()),
                            "model": tmodel if isinstance(tmodel, str) else model, "object": "chat.completion.chunk"}
    delta = {**({"role": "assistant"} if role else {}), _CHAT_FIELDS[kind]: text}
    out = [
        ChatCompletionChunk.model_validate({**base, "choices": [{"index": index, "delta": delta, "finish_reason": None}]}),
        ChatCompletionChunk.model_validate({**base, "choices": [{"index": index, "delta": {}, "finish_reason": CONTENT_FILTER}],
                                            METADATA_KEY: note}),
    ]
    if template is None:
        return out
    # Upstream's own fields ride along as upstream sent them (unvalidated, like everything read from it).
    carried = {"system_fingerprint": template.system_fingerprint, "service_tier": template.service_tier}
    return [c.model_copy(update=carried) for c in out]


def refused_choice(choice: CompletionChoice, text: str, kind: PartKind = "output_text") -> CompletionChoice:
    """A whole-response choice replaced by the refusal (in ``refusal`` for ``kind="refusal"``: see
    ``refusal_chunks``); its other text, reasoning, tool calls, logprobs and parsed output go with it."""
    update: dict[str, Any] = {"content": None, "refusal": None, "tool_calls": None, "function_call": None, "audio": None,
                              "annotations": None, _CHAT_FIELDS[kind]: text}
    update.update({f: None for f in REASONING_FIELDS if f in (choice.message.model_extra or {})})
    if "parsed" in type(choice.message).model_fields:
        update["parsed"] = None
    message = choice.message.model_copy(update=update)
    return choice.model_copy(update={"message": message, "finish_reason": CONTENT_FILTER, "logprobs": None})


def refusal_completion(model: str, text: str, note: dict[str, Any], n: int = 1, *, parsed: bool = False,
                       kind: PartKind = "output_text") -> ChatCompletion:
    """The answer to a blocked prompt in ``rewrite`` mode: a completion that never reached upstream.

    ``parsed`` makes it the ``ParsedChatCompletion`` that ``chat.completions.parse`` returns, with
    ``message.parsed = None`` (as a refused answer from upstream is).
    """
    message = {"role": "assistant", "content": None, _CHAT_FIELDS[kind]: text}
    choices = [{"index": i, "finish_reason": CONTENT_FILTER, "message": message} for i in range(n)]
    kind = ParsedChatCompletion if parsed else ChatCompletion
    return kind.model_validate({"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                                "model": model, "choices": choices, METADATA_KEY: note})


def prompt_refusal_chunks(model: str, text: str, note: dict[str, Any], n: int = 1,
                          kind: PartKind = "output_text") -> list[ChatCompletionChunk]:
    """The stream answering a blocked prompt in ``rewrite`` mode, one refused choice per ``n``."""
    first = refusal_chunks(None, 0, text, note, model=model, role=True, kind=kind)
    return [c.model_copy(update={"choices": [c.choices[0].model_copy(update={"index": i})]}) for i in range(n) for c in first]


# Responses API

#: Events carrying the whole response (its ``output`` holds the text so far); the last three end it.
_RESPONSE_EVENTS = frozenset({"response.created", "response.queued", "response.in_progress",
                              "response.completed", "response.incomplete", "response.failed"})
_FINAL_RESPONSE_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_DELTA_EVENTS: dict[str, PartKind] = {"response.output_text.delta": "output_text", "response.refusal.delta": "refusal"}
#: Message part types holding output text: the API's, and those Responses shims over chat servers write.
_TEXT_PARTS = frozenset({"output_text", "text", "input_text"})
#: The output item types this SDK knows (``ResponseOutputItem``); any other one is refused.
_OUTPUT_ITEM_TYPES = frozenset(get_args(cls.model_fields["type"].annotation)[0]
                               for cls in get_args(get_args(ResponseOutputItem)[0]))


@dataclass(frozen=True)
class PartText:
    """Text of one Responses content part found in an event: where, what, which kind, in which item."""

    part: Part
    text: str
    kind: PartKind
    item_id: Any = None


def field(obj: Any, name: str) -> Any:
    """``obj[name]`` of a dict, ``obj.name`` of an SDK object; None when it has none (or is neither)."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None) if isinstance(obj, BaseModel) else None


def _part(output_index: Any, content_index: Any, what: str) -> Part:
    if not (_int(output_index) and _int(content_index)):
        raise MalformedReplyError(f"the upstream sent a {what} event without integer output_index and content_index")
    return output_index, content_index


def _part_text(part: Any, where: Part, item_id: Any) -> PartText | None:
    """The text of a message content part: output text (also written ``text`` / ``input_text`` or
    untyped by some servers) or a refusal; None for reasoning text (not read: README). Any other
    part is the upstream's fault, since its text would reach the caller unjudged."""
    kind = field(part, "type")
    if part is None or kind == "reasoning_text":
        return None
    where_text = f"output {where[0]} part {where[1]}"
    if kind == "refusal":
        return PartText(where, upstream_text(field(part, "refusal"), f"refusal of {where_text}"), "refusal", item_id)
    if kind in _TEXT_PARTS or (kind is None and isinstance(field(part, "text"), str)):
        return PartText(where, upstream_text(field(part, "text"), f"{kind or 'text'} of {where_text}"), "output_text", item_id)
    raise MalformedReplyError(f"the upstream sent {where_text} of type {kind!r}, which Qwen3Guard cannot judge")


def item_texts(item: Any, output_index: int) -> list[PartText]:
    """The texts of an output item: those of a message's parts. Other items the SDK knows (tool
    calls, reasoning) have none the guard reads; an item type it does not know is refused."""
    kind = field(item, "type")
    if not isinstance(kind, str):
        raise MalformedReplyError(f"the upstream sent output item {output_index} without a type")
    if kind != "message" and kind not in _OUTPUT_ITEM_TYPES:
        raise MalformedReplyError(f"the upstream sent output item {output_index} of type {kind!r}, which Qwen3Guard "
                                  "cannot judge")
    content = field(item, "content")
    if kind != "message" or content is None:
        return []
    if not isinstance(content, list):
        raise MalformedReplyError(f"the upstream sent output item {output_index} whose content is not a list")
    found = (_part_text(part, (output_index, i), field(item, "id")) for i, part in enumerate(content))
    return [f for f in found if f is not None]


def response_texts(response: Any) -> list[PartText]:
    """The texts of a response's output, part by part."""
    output = field(response, "output")
    if output is None:
        return []
    if not isinstance(output, list):
        raise MalformedReplyError("the upstream's response has an 'output' that is not a list")
    return [t for i, item in enumerate(output) for t in item_texts(item, i)]


def response_answer(response: Any) -> str:
    """What a whole response says, as one text for Gen: its output text and refusal parts."""
    return "\n".join(t.text for t in response_texts(response) if t.text)


def event_type(event: Any) -> str:
    """The type of a Responses stream event; a payload that is not an event object is the upstream's fault."""
    kind = getattr(event, "type", None) if isinstance(event, BaseModel) else None
    if not isinstance(kind, str):
        what = "an object without a 'type'" if isinstance(event, BaseModel) else f"a JSON {type(event).__name__}"
        raise MalformedReplyError(f"the upstream sent a Responses stream event that is {what}")
    return kind


def event_delta(event: Any) -> PartText | None:
    """The text an output_text or refusal delta event adds to its part (None for other events)."""
    kind = _DELTA_EVENTS.get(event.type)
    if kind is None:
        return None
    where = _part(getattr(event, "output_index", None), getattr(event, "content_index", None), event.type)
    text = upstream_text(getattr(event, "delta", None), f"{event.type} of output {where[0]} part {where[1]}")
    return PartText(where, text, kind, getattr(event, "item_id", None))


def event_texts(event: Any) -> tuple[list[PartText], bool]:
    """The whole texts an event carries (done events, added / done parts and items, whole responses),
    and whether they are final (the part, item or response is done)."""
    kind: str = event.type
    get = lambda name: getattr(event, name, None)  # noqa: E731 - loosely built: any field may be missing
    if kind in ("response.output_text.done", "response.refusal.done"):
        where = _part(get("output_index"), get("content_index"), kind)
        field, part_kind = ("text", "output_text") if kind == "response.output_text.done" else ("refusal", "refusal")
        text = upstream_text(get(field), f"{kind} of output {where[0]} part {where[1]}")
        return [PartText(where, text, part_kind, get("item_id"))], True  # type: ignore[arg-type]
    if kind in ("response.content_part.added", "response.content_part.done"):
        found = _part_text(get("part"), _part(get("output_index"), get("content_index"), kind), get("item_id"))
        return ([found] if found else []), kind.endswith(".done")
    if kind in ("response.output_item.added", "response.output_item.done"):
        if not _int(get("output_index")):
            raise MalformedReplyError(f"the upstream sent a {kind} event without an integer output_index")
        return item_texts(get("item"), get("output_index")), kind.endswith(".done")
    if kind in _RESPONSE_EVENTS:
        return response_texts(get("response")), kind in _FINAL_RESPONSE_EVENTS
    return [], False


def message_item(item_id: str, text: str, status: str = "incomplete", kind: PartKind = "output_text") -> dict[str, Any]:
    """An assistant message output item holding ``text`` (as output text, or as a refusal part)."""
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": [content_part(text, kind)]}


def content_part(text: str, kind: PartKind = "output_text") -> dict[str, Any]:
    """A message content part holding ``text``."""
    if kind == "refusal":
        return {"type": "refusal", "refusal": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def incomplete_response(base: Response | None, output: list[Any], note: dict[str, Any], *, model: str = "",
                        parsed: bool = False) -> Response:
    """``base`` (or a fresh response) ended as incomplete for ``content_filter`` with ``output``.

    It keeps ``base``'s type: a ``ParsedResponse`` from ``responses.parse`` (or ``parsed`` with no
    base) stays one, its text parts with ``parsed=None``, so ``output_parsed`` reads None.
    """
    data: dict[str, Any] = base.model_dump(exclude_unset=True) if base is not None else {
        "id": new_id("resp"), "object": "response", "created_at": time.time(), "model": model,
        "parallel_tool_calls": False, "tool_choice": "auto", "tools": [],
    }
    kind = type(base) if base is not None else ParsedResponse if parsed else Response
    items = [_plain(o) for o in output]
    if issubclass(kind, ParsedResponse):
        items = [{**o, "content": [{"parsed": None, **c} if c.get("type") == "output_text" else c for c in o.get("content") or []]}
                 if isinstance(o, dict) and o.get("type") == "message" else o for o in items]
    data.update(status="incomplete", incomplete_details={"reason": CONTENT_FILTER}, output=items, **{METADATA_KEY: note})
    return sdk_object(kind, data)  # type: ignore[no-any-return]


def refused_response(response: Response, text: str, note: dict[str, Any], kind: PartKind = "output_text") -> Response:
    """A whole response whose text was blocked: its output becomes one message with the refusal."""
    item_id = next((field(o, "id") for o in response.output if field(o, "type") == "message"), None)
    item = message_item(item_id if isinstance(item_id, str) else new_id("msg"), text, kind=kind)
    return incomplete_response(response, [item], note)


def responses_refusal_events(base: Response | None, *, item_id: str, output_index: int, content_index: int,
                             delivered: str, text: str, prior: list[Any], sequence: int,
                             note: dict[str, Any], model: str = "", opened: bool = True,
                             item_opened: bool | None = None, part_opened: bool | None = None,
                             kind: PartKind = "output_text") -> list[ResponseStreamEvent]:
    """The end of a rewritten Responses stream: the refusal delta, the done events of its text part
    and item (with the text the caller actually got), and ``response.incomplete`` for
    ``content_filter``. ``opened`` is False when nothing was announced (a blocked prompt), so
    ``response.created`` and the ``added`` events come first; ``item_opened`` / ``part_opened``
    (default ``opened``) say whether the item and the part were announced. ``kind`` is the
    part's kind (a blocked refusal part ends as a refusal); ``prior`` are output items finished before.
    """
    item_opened = opened if item_opened is None else item_opened
    part_opened = item_opened if part_opened is None else part_opened
    base = base if base is not None else incomplete_response(None, [], note, model=model)  # one id for every event
    full = delivered + text
    where = {"item_id": item_id, "output_index": output_index, "content_index": content_index}
    part = content_part(full, kind)
    item = message_item(item_id, full, kind=kind)
    datas: list[dict[str, Any]] = []
    if not opened:
        started = incomplete_response(base, [], note, model=model).model_dump()
        started.update(status="in_progress", incomplete_details=None)
        datas.append({"type": "response.created", "response": started})
    if not item_opened:
        datas.append({"type": "response.output_item.added", "output_index": output_index,
                      "item": {**item, "content": [], "status": "in_progress"}})
    if not part_opened:
        datas.append({"type": "response.content_part.added", **where, "part": content_part("", kind)})
    final = incomplete_response(base, [*prior, item], note, model=model).model_dump()
    if kind == "refusal":
        datas += [{"type": "response.refusal.delta", **where, "delta": text},
                  {"type": "response.refusal.done", **where, "refusal": full}]
    else:
        datas += [{"type": "response.output_text.delta", **where, "delta": text, "logprobs": []},
                  {"type": "response.output_text.done", **where, "text": full, "logprobs": []}]
    datas += [
        {"type": "response.content_part.done", **where, "part": part},
        {"type": "response.output_item.done", "output_index": output_index, "item": item},
        {"type": "response.incomplete", "response": final, METADATA_KEY: note},
    ]
    return [sdk_object(ResponseStreamEvent, {**data, "sequence_number": sequence + i}) for i, data in enumerate(datas)]


def _plain(obj: Any) -> Any:
    return obj.model_dump() if hasattr(obj, "model_dump") else obj
