"""Reading and writing OpenAI response objects: the only places the guard touches protocol data.

Upstream objects are read the way the openai SDK itself reads them (``sdk_object``: loose
construction, no validation against the newest types), so vLLM, SGLang, llama.cpp and older
servers pass through as they do with the bare client. Objects the guard writes itself are
validated strictly and carry a ``qwen3guard`` field with the decisions; objects it forwards are
never touched unless a decision must ride on them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, TypeVar

from openai._models import construct_type
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.chat.chat_completion import Choice as CompletionChoice
from openai.types.responses import Response, ResponseStreamEvent

from guard_core import METADATA_KEY

CONTENT_FILTER = "content_filter"
T = TypeVar("T")


def sdk_object(type_: Any, data: Any) -> Any:
    """``data`` as the openai SDK builds it from a reply: nested types, unknown fields kept, no validation."""
    return construct_type(type_=type_, value=data)


def new_id(prefix: str) -> str:
    """An id for an object the guard writes, recognisable as such."""
    return f"{prefix}-qwen3guard-{uuid.uuid4().hex[:24]}"


def annotated(obj: T, note: dict[str, Any]) -> T:
    """A copy of ``obj`` carrying the guard's decisions under ``qwen3guard``."""
    return obj.model_copy(update={METADATA_KEY: note})  # type: ignore[attr-defined,no-any-return]


# Chat completions


def choice_text(chunk: ChatCompletionChunk, index: int) -> str:
    """The content delta of choice ``index`` in ``chunk`` ("" when it has none)."""
    return next((c.delta.content or "" for c in chunk.choices if c.index == index), "")


def cut_choice(chunk: ChatCompletionChunk, index: int, keep: int) -> ChatCompletionChunk | None:
    """``chunk`` with choice ``index`` cut to its first ``keep`` characters of content.

    Everything that could carry blocked text goes with the cut: the rest of the content, the
    choice's logprobs (their tokens spell the text) and its finish_reason (the guard writes its
    own). A choice left with nothing is removed; a chunk left with no choice becomes ``None``.
    """
    choices = []
    for choice in chunk.choices:
        if choice.index != index:
            choices.append(choice)
            continue
        delta = choice.delta.model_copy(update={"content": (choice.delta.content or "")[:keep] or None})
        if delta.model_dump(exclude_none=True):
            choices.append(choice.model_copy(update={"delta": delta, "logprobs": None, "finish_reason": None}))
    if not choices and chunk.choices:
        return None
    return chunk.model_copy(update={"choices": choices})


def refusal_chunks(template: ChatCompletionChunk | None, index: int, text: str, note: dict[str, Any],
                   *, model: str = "", role: bool = False) -> list[ChatCompletionChunk]:
    """The end of a rewritten choice: the refusal text, then ``finish_reason="content_filter"``.

    ``template`` (the last upstream chunk) supplies id, model and fingerprint so the chunks
    belong to the same completion; ``role`` adds ``role: assistant`` for a choice that never
    started (a blocked prompt).
    """
    base: dict[str, Any] = {"id": template.id if template else new_id("chatcmpl"),
                            "created": template.created if template else int(time.time()),
                            "model": template.model if template else model, "object": "chat.completion.chunk"}
    if template is not None:
        base.update(system_fingerprint=template.system_fingerprint, service_tier=template.service_tier)
    delta = {"role": "assistant", "content": text} if role else {"content": text}
    return [
        ChatCompletionChunk.model_validate({**base, "choices": [{"index": index, "delta": delta, "finish_reason": None}]}),
        ChatCompletionChunk.model_validate({**base, "choices": [{"index": index, "delta": {}, "finish_reason": CONTENT_FILTER}],
                                            METADATA_KEY: note}),
    ]


def refused_choice(choice: CompletionChoice, text: str) -> CompletionChoice:
    """A whole-response choice replaced by the refusal (tool calls, logprobs and parsed output dropped with it)."""
    update: dict[str, Any] = {"content": text, "tool_calls": None, "function_call": None, "audio": None, "annotations": None}
    if "parsed" in type(choice.message).model_fields:
        update["parsed"] = None
    message = choice.message.model_copy(update=update)
    return choice.model_copy(update={"message": message, "finish_reason": CONTENT_FILTER, "logprobs": None})


def refusal_completion(model: str, text: str, note: dict[str, Any], n: int = 1, *, parsed: bool = False) -> ChatCompletion:
    """The answer to a blocked prompt in ``rewrite`` mode: a completion that never reached upstream.

    ``parsed`` adds ``message.parsed = None``, as ``chat.completions.parse`` callers read it.
    """
    message: dict[str, Any] = {"role": "assistant", "content": text, **({"parsed": None} if parsed else {})}
    choices = [{"index": i, "finish_reason": CONTENT_FILTER, "message": message} for i in range(n)]
    return ChatCompletion.model_validate({"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                                          "model": model, "choices": choices, METADATA_KEY: note})


def prompt_refusal_chunks(model: str, text: str, note: dict[str, Any], n: int = 1) -> list[ChatCompletionChunk]:
    """The stream answering a blocked prompt in ``rewrite`` mode, one refused choice per ``n``."""
    first = refusal_chunks(None, 0, text, note, model=model, role=True)
    return [c.model_copy(update={"choices": [c.choices[0].model_copy(update={"index": i})]}) for i in range(n) for c in first]


# Responses API


def message_item(item_id: str, text: str, status: str = "incomplete") -> dict[str, Any]:
    """An assistant message output item holding ``text``."""
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def incomplete_response(base: Response | None, output: list[Any], note: dict[str, Any], *, model: str = "") -> Response:
    """``base`` (or a fresh response) ended as incomplete for ``content_filter`` with ``output``."""
    data: dict[str, Any] = base.model_dump(exclude_unset=True) if base is not None else {
        "id": new_id("resp"), "object": "response", "created_at": time.time(), "model": model,
        "parallel_tool_calls": False, "tool_choice": "auto", "tools": [],
    }
    data.update(status="incomplete", incomplete_details={"reason": CONTENT_FILTER}, output=[_plain(o) for o in output],
                **{METADATA_KEY: note})
    return sdk_object(Response, data)  # type: ignore[no-any-return]


def refused_response(response: Response, text: str, note: dict[str, Any]) -> Response:
    """A whole response whose text was blocked: its output becomes one message with the refusal."""
    item_id = next((o.id for o in response.output if o.type == "message"), new_id("msg"))
    return incomplete_response(response, [message_item(item_id, text)], note)


def responses_refusal_events(base: Response | None, *, item_id: str, output_index: int, content_index: int,
                             delivered: str, text: str, prior: list[Any], sequence: int,
                             note: dict[str, Any], model: str = "", opened: bool = True) -> list[ResponseStreamEvent]:
    """The end of a rewritten Responses stream: the refusal delta, the done events of its text part
    and item (with the text the caller actually got), and ``response.incomplete`` for
    ``content_filter``. ``opened`` is False when the item and part were never announced (a blocked
    prompt), so their ``added`` events come first; ``prior`` are output items finished before.
    """
    full = delivered + text
    where = {"item_id": item_id, "output_index": output_index, "content_index": content_index}
    part = {"type": "output_text", "text": full, "annotations": [], "logprobs": []}
    item = message_item(item_id, full)
    datas: list[dict[str, Any]] = []
    if not opened:
        started = incomplete_response(base, [], note, model=model).model_dump()
        started.update(status="in_progress", incomplete_details=None)
        datas += [
            {"type": "response.created", "response": started},
            {"type": "response.output_item.added", "output_index": output_index, "item": {**item, "content": [], "status": "in_progress"}},
            {"type": "response.content_part.added", **where, "part": {**part, "text": ""}},
        ]
    final = incomplete_response(base, [*prior, item], note, model=model).model_dump()
    datas += [
        {"type": "response.output_text.delta", **where, "delta": text, "logprobs": []},
        {"type": "response.output_text.done", **where, "text": full, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": part},
        {"type": "response.output_item.done", "output_index": output_index, "item": item},
        {"type": "response.incomplete", "response": final, METADATA_KEY: note},
    ]
    return [sdk_object(ResponseStreamEvent, {**data, "sequence_number": sequence + i}) for i, data in enumerate(datas)]


def _plain(obj: Any) -> Any:
    return obj.model_dump() if hasattr(obj, "model_dump") else obj
