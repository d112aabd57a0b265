"""LangChain values -> the conversations guard_core moderates.

LangChain's message classes are mapped onto OpenAI-style roles here, and nothing else is decided
here: which turn is judged, how tool results and late system messages count, what happens to
images, all follow ``guard_core.conversation`` (the same rule as every other adapter).
"""

from __future__ import annotations

import json
from collections.abc import Container, Mapping, Sequence
from dataclasses import asdict, is_dataclass, replace
from enum import Enum
from typing import Any

from langchain_core.documents import Document
from langchain_core.load import Serializable
from langchain_core.messages import (AIMessage, AIMessageChunk, BaseMessage, ChatMessage, FunctionMessage, HumanMessage,
                                     SystemMessage, ToolMessage, convert_to_messages)
from langchain_core.outputs import ChatGenerationChunk, GenerationChunk
from langchain_core.prompt_values import PromptValue
from langchain_core.utils.json import parse_partial_json
from pydantic import BaseModel

from guard_core.conversation import Conversation, from_messages, from_text
from guard_core.messages import content_to_text
from guard_core.structured import json_source_text, json_text, strings

#: LangChain message classes (and their chunk subclasses) -> OpenAI-style roles.
_ROLES = ((SystemMessage, "system"), (HumanMessage, "user"), (ToolMessage, "tool"), (FunctionMessage, "function"))
_CHAT_ROLES = {"human": "user", "ai": "assistant"}


def message_to_dict(message: BaseMessage) -> dict[str, Any]:
    """One LangChain message as an OpenAI-style dict; an assistant turn (history, a prefill) has the
    text of every block, read as an answer is (``chunk_text``), so none reaches the model unjudged."""
    if isinstance(message, AIMessage):
        return {"role": "assistant", "content": chunk_text(message)}
    if isinstance(message, ChatMessage):
        role = _CHAT_ROLES.get(message.role.lower(), message.role.lower())
    else:
        role = next((r for kind, r in _ROLES if isinstance(message, kind)), message.type)
    return {"role": role, "content": message.content}


def messages_to_conversation(messages: Sequence[BaseMessage]) -> Conversation:
    """A LangChain message list as the guard's view of it (``guard_core.conversation`` rules)."""
    return from_messages([message_to_dict(m) for m in messages])


def to_conversation(value: Any, *, input_key: str | None = None) -> Conversation:
    """Any input a chain or a prompt guard receives, as the guard's view of the request.

    Strings and single messages are the user's turn; prompt values and message lists are whole
    conversations; a dict (the input of a prompt template) is a prompt made of its ``input_key``
    value, or of every text it holds when no key is given (strings, messages such as a
    ``MessagesPlaceholder`` history, retrieved ``Document``s, nested lists and dicts, other objects
    as the template renders them), so no field passes unjudged. Documents (one, or a list: a
    retriever's output) are a prompt made of their text too.
    """
    if isinstance(value, str):
        return from_text(value)
    if isinstance(value, Mapping):
        if input_key is not None:
            if input_key not in value:
                raise ValueError(f"input_key {input_key!r} is not in the input dict (keys: {sorted(value)})")
            return to_conversation(value[input_key])
        return _prompt_of_texts(value)
    if isinstance(value, Document) or (isinstance(value, Sequence) and any(isinstance(v, Document) for v in value)):
        return _prompt_of_texts(value)
    messages = [value] if isinstance(value, BaseMessage) else _messages(value)
    if messages is None:
        raise ValueError(f"cannot moderate a {type(value).__name__}; pass a string, a message, a list of messages, "
                         "a prompt value or a prompt-template input dict")
    return messages_to_conversation(messages)


def to_answer(value: Any) -> tuple[Conversation, str]:
    """A model output as (the conversation it answers, its text: ``answer_text``, JSON content
    decoded, as a JSON parser after the guard reads it): a message list (or prompt value) ends
    with the answer and the turns before it are its conversation; anything else is a lone answer
    (the question is not in view: see ``QwenGuardRunnable.around``)."""
    messages = _answer_messages(value)
    if messages is None:
        return Conversation(), answer_text(value, json_content=True)
    conversation = messages_to_conversation(messages[:-1]) if len(messages) > 1 else Conversation()
    return conversation, answer_text(messages[-1], json_content=True)


def answer_text(value: Any, *, json_content: bool = False) -> str:
    """The whole text of a model output an output guard is given, the same on ``invoke`` and on a
    stream: a text or message by its blocks' text (``chunk_text``; with ``json_content``, decoded
    when it is JSON) and the decoded arguments of its tool calls, which a parser after the guard
    (``PydanticToolsParser``, ``with_structured_output``) turns into the answer; a message list by
    its last, AI message; any other value (``is_structured``: a parser's dict or list, a pydantic
    model, documents) by what it says (``json_text``), every message, model or document nested in
    it read by its own text, never skipped. A value the guard cannot read raises ``ValueError``."""
    if isinstance(value, (str, BaseMessage, GenerationChunk, ChatGenerationChunk)):
        text, args = chunk_text(value), tool_args_text(value) if isinstance(value, BaseMessage) else ""
        return "\n".join(t for t in (json_source_text(text) if json_content else text, args) if t)
    messages = _answer_messages(value)
    if messages is not None:
        return answer_text(messages[-1], json_content=json_content)
    if value is None or isinstance(value, (bool, int, float)):
        raise ValueError(f"cannot moderate a {type(value).__name__} as a model answer; pass text, a message, messages "
                         "ending with the AI message, or a parsed value (dicts, lists, models, documents)")
    if not isinstance(value, (Mapping, list, tuple)):  # a document, a model, any other object by what it says
        return "\n".join(t for t in _nested_text(value, json_content) if t)
    return "\n".join(strings(value, keys=True, other=lambda v: _nested_text(v, json_content)))


def _nested_text(value: Any, json_content: bool) -> list[str]:
    """The text of an object inside (or as) a structured answer, for ``strings``."""
    if isinstance(value, Document):
        return [value.page_content, *strings(value.metadata)]
    if isinstance(value, BaseModel) and not isinstance(value, Serializable):
        return strings(value.model_dump(mode="json"), keys=True)
    if isinstance(value, (BaseMessage, PromptValue)):
        return [answer_text(value, json_content=json_content)]
    if isinstance(value, Enum):
        return strings(value.value)
    if is_dataclass(value) and not isinstance(value, type):
        return strings(asdict(value), keys=True, other=lambda v: _nested_text(v, json_content))
    return [str(value)]  # a date, an id, a price, a parser's error (``include_raw``): what it says is its str()


def _answer_messages(value: Any) -> list[BaseMessage] | None:
    """The messages of a prompt value or of a list made only of messages (or ``(role, text)`` pairs),
    which must end with the AI message; None for any other value."""
    items = value if isinstance(value, (list, tuple)) else None
    if not isinstance(value, PromptValue) and not (items and all(map(_is_message, items))):
        return None
    messages = _messages(value)
    if not messages or not isinstance(messages[-1], AIMessage):
        raise ValueError(f"cannot moderate these {len(messages or [])} messages as a model answer; they must end "
                         "with the AI message")
    return messages


#: The roles LangChain reads in a ``(role, text)`` pair (``convert_to_messages``).
_PAIR_ROLES = frozenset({"human", "user", "ai", "assistant", "system", "developer", "tool", "function"})


def _is_message(item: Any) -> bool:
    """A message, or a ``(role, text)`` pair naming a role: other pairs (``(Document, score)`` from a
    similarity search, ``("Paris", 0.9)``) are data."""
    if isinstance(item, BaseMessage):
        return True
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and item[0] in _PAIR_ROLES


def is_structured(value: Any) -> bool:
    """True for an answer that is a whole value rather than streamed text: a parser's dict or list,
    a pydantic model, documents, messages in a list (judged whole: ``answer_text``)."""
    return not isinstance(value, (str, BaseMessage, GenerationChunk, ChatGenerationChunk))


def _prompt_of_texts(value: Any) -> Conversation:
    """A prompt made of every text ``value`` holds (``_texts``); retrieved ``Document``s are untrusted
    context, judged on their own like LlamaIndex nodes (one the guard cannot read is blocked)."""
    documents: list[str] = []
    texts = [t for t in _texts(value, documents) if t.strip()]
    documents = [d for d in documents if d.strip()]
    if not texts and not documents:
        raise ValueError("the input has no text to moderate; set input_key to the field holding the prompt")
    prompt = from_text("\n\n".join(texts)) if texts else Conversation()
    return replace(prompt, context=(*prompt.context, *documents))


def _texts(value: Any, documents: list[str]) -> list[str]:
    """Every text a prompt-template input holds, in order: a message's as the guard reads it
    (``message_to_dict``: ``input_text`` parts too) and any other object as a template renders it
    (``str``); numbers and other scalars hold none. A ``Document``'s content and string metadata go
    to ``documents``."""
    if isinstance(value, str):
        return [value]
    if value is None or isinstance(value, (bool, int, float)):
        return []
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _texts(v, documents)]
    if isinstance(value, Document):
        documents.append("\n".join([value.page_content, *strings(value.metadata)]))
        return []
    if isinstance(value, BaseMessage):
        value = [value]
    elif isinstance(value, PromptValue):
        value = value.to_messages()
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        if value and all(isinstance(v, BaseMessage) for v in value):
            messages_to_conversation(value)  # refuses what the guard cannot read (images, unknown roles)
            return [content_to_text(message_to_dict(m)["content"]) for m in value]
        return [t for v in value for t in _texts(v, documents)]
    return [str(value)]


def as_chunk(message: BaseMessage) -> BaseMessage:
    """A whole ``AIMessage`` (a model that cannot stream yields one) as the ``AIMessageChunk`` it
    streams as, its tool calls as ``tool_call_chunks``; any other message as it is."""
    if isinstance(message, AIMessage) and not isinstance(message, AIMessageChunk):
        return AIMessageChunk(**message.model_dump(exclude={"type"}))
    return message


def _messages(value: Any) -> list[BaseMessage] | None:
    """The messages of a prompt value or a message list; None for anything else."""
    if isinstance(value, PromptValue):
        return value.to_messages()
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray)):
        try:
            return convert_to_messages(value)
        except NotImplementedError as exc:  # LangChain's answer to an item that is no message
            raise ValueError(f"cannot moderate this list as messages: {exc}") from None
    return None


#: LangChain's standard (v1) content blocks that carry text a user may be shown, and the field
#: holding it (a ``reasoning`` block may hold it in a ``summary`` list instead). ``content_blocks``
#: maps provider formats onto these (``additional_kwargs["reasoning_content"]``, Bedrock and Anthropic
#: blocks when the provider is known); ``BaseMessage.text`` keeps ``text`` only.
_TEXT_FIELDS = {"text": "text", "text-plain": "text", "refusal": "refusal", "reasoning": "reasoning"}
#: Standard blocks that carry no answer text (tool calls are an answer only as structured output:
#: ``tool_args_text``) and media the guard cannot read.
_NO_TEXT = frozenset({"tool_call", "tool_call_chunk", "invalid_tool_call"})
#: Blocks judged by every string one field holds: one LangChain does not know, and what a provider's
#: own tools ran (code a code interpreter ran, its output, search results): a UI shows them.
_STRUCTURED_FIELDS = {"non_standard": "value", "server_tool_call": "args", "server_tool_call_chunk": "args",
                      "server_tool_result": "output"}
_MEDIA_BLOCKS = frozenset({"image", "image_url", "input_image", "audio", "input_audio", "video", "file", "input_file"})
#: Fields of a block LangChain does not know that hold ids or opaque payloads, not text.
_OPAQUE_FIELDS = frozenset({"type", "id", "index", "signature", "data", "encrypted_content"})


def chunk_text(chunk: Any) -> str:
    """The text a streamed chunk adds to the response (``""`` for tool-call or metadata chunks): the
    text of every block of ``content_blocks`` a user may be shown, reasoning included; a block
    LangChain does not know (``non_standard``) is judged by every string it holds.

    Media blocks in a model's answer raise ``ValueError``, as they do in input: Qwen3Guard reads
    text only, and passing them on would show the user something never judged. So does an audio
    answer beside the content (``additional_kwargs["audio"]``, as langchain-openai puts it).
    """
    if isinstance(chunk, (str, GenerationChunk)):
        return chunk if isinstance(chunk, str) else chunk.text
    if isinstance(chunk, (BaseMessage, ChatGenerationChunk)):
        message = getattr(chunk, "message", chunk)
        _refuse_media(message.content)
        blocks = message.content_blocks
        _refuse_media(blocks)
        if message.additional_kwargs.get("audio"):  # langchain-openai's audio answer, beside the content
            _refuse_media([{"type": "audio"}])
        return "".join(map(_block_text, blocks))
    raise ValueError(f"cannot moderate a {type(chunk).__name__} as text; expected a string or a message")


def _refuse_media(content: Any) -> None:
    """``ValueError`` for a media block in a model's answer (see ``chunk_text``)."""
    blocks = content if isinstance(content, list) else []
    media = next((b["type"] for b in blocks if isinstance(b, dict) and b.get("type") in _MEDIA_BLOCKS), None)
    if media is not None:
        raise ValueError(f"the model's answer has a media block ({media!r}); Qwen3Guard judges text only and will "
                         "not pass it on unjudged (guard a text-only model, or moderate the media separately)")


def token_text(token: str | list[str | dict[str, Any]]) -> str:
    """The text of an ``on_llm_new_token`` token (a list of content blocks for v1 models), read
    like a message's (see ``chunk_text``)."""
    return token if isinstance(token, str) else chunk_text(AIMessageChunk(content=token))


#: ``stream_events(version="v3")`` deltas that stream a block's text, and the block they belong to.
_TEXT_DELTAS = {"text-delta": "text", "reasoning-delta": "reasoning"}


def event_token(event: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The content blocks a ``stream_events(version="v3")`` protocol event adds to the answer, as an
    ``on_llm_new_token`` token (``token_text``): each text or reasoning delta, and every other block
    when it is finished (whole: its text, or media, refused)."""
    kind = event.get("event")
    if kind == "content-block-delta":
        field = _TEXT_DELTAS.get(event["delta"].get("type"))
        return [{"type": field, field: event["delta"][field]}] if field else []
    if kind == "content-block-finish" and event["content"].get("type") not in _TEXT_DELTAS.values():
        return [dict(event["content"])]
    return []


def _block_text(block: Mapping[str, Any]) -> str:
    """The text of one standard content block."""
    kind = block.get("type")
    if kind in _STRUCTURED_FIELDS:
        return "\n".join(strings(block.get(_STRUCTURED_FIELDS[kind]), skip=_OPAQUE_FIELDS))
    if kind in _NO_TEXT:
        return ""
    text = block.get(_TEXT_FIELDS.get(kind, ""))
    summary = block.get("summary") if kind == "reasoning" else None
    parts = [text, *(s.get("text") for s in summary if isinstance(s, Mapping))] if isinstance(summary, list) else [text]
    quoted = [a.get("cited_text") for a in block.get("annotations") or [] if isinstance(a, Mapping)]  # citations a UI shows
    return "".join(p for p in parts if isinstance(p, str)) + "".join(f"\n{q}" for q in quoted if isinstance(q, str) and q)


def args_text(source: str, *, whole: bool = True) -> str:
    """The text of a tool call's streamed arguments, read as LangChain reads them (a cut document
    is completed): ``json_text`` of what it parses. A ``whole`` source that is not strict JSON is
    judged as parsed *and* as sent (the lenient parser drops what follows the document); a partial
    one that does not parse yet has no text yet."""
    try:
        strict = json.loads(source)
        return json_text(strict)
    except ValueError:
        pass
    try:
        parsed = json_text(parse_partial_json(source)) if source else ""
    except ValueError:
        parsed = ""
    return "\n".join(t for t in (parsed, source) if t) if whole else parsed


def tool_args_text(message: BaseMessage, names: Container[str] | None = None, *, whole: bool = True) -> str:
    """The text of the arguments of a message's tool calls (those named in ``names``, or all): the
    answer when the calls are structured output (``with_structured_output``, a parser after the guard)."""
    chunks = getattr(message, "tool_call_chunks", None)
    if chunks:
        sources = [c.get("args") or "" for c in chunks if names is None or c.get("name") in names]
        return "\n".join(t for s in sources if (t := args_text(s, whole=whole)))
    calls = [c for c in getattr(message, "tool_calls", None) or [] if names is None or c.get("name") in names]
    invalid = [c for c in getattr(message, "invalid_tool_calls", None) or [] if names is None or c.get("name") in names]
    texts = [json_text(c.get("args")) for c in calls] + [args_text(c.get("args") or "", whole=whole) for c in invalid]
    return "\n".join(t for t in texts if t)
