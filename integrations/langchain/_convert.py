"""LangChain values -> the conversations guard_core moderates.

LangChain's message classes are mapped onto OpenAI-style roles here, and nothing else is decided
here: which turn is judged, how tool results and late system messages count, what happens to
images, all follow ``guard_core.conversation`` (the same rule as every other adapter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, FunctionMessage, HumanMessage, SystemMessage
from langchain_core.messages import ToolMessage, convert_to_messages
from langchain_core.outputs import ChatGenerationChunk, GenerationChunk
from langchain_core.prompt_values import PromptValue

from guard_core.conversation import Conversation, from_messages, from_text

#: LangChain message classes (and their chunk subclasses) -> OpenAI-style roles.
_ROLES = ((SystemMessage, "system"), (HumanMessage, "user"), (ToolMessage, "tool"), (FunctionMessage, "function"))
_CHAT_ROLES = {"human": "user", "ai": "assistant"}


def message_to_dict(message: BaseMessage) -> dict[str, Any]:
    """One LangChain message as an OpenAI-style dict (assistant turns keep their text blocks only)."""
    if isinstance(message, AIMessage):
        return {"role": "assistant", "content": message.text}
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
    ``MessagesPlaceholder`` history, nested lists and dicts), so no field passes unjudged.
    """
    if isinstance(value, str):
        return from_text(value)
    if isinstance(value, Mapping):
        if input_key is not None:
            if input_key not in value:
                raise ValueError(f"input_key {input_key!r} is not in the input dict (keys: {sorted(value)})")
            return to_conversation(value[input_key])
        texts = [t for t in _texts(value) if t.strip()]
        if not texts:
            raise ValueError("the input dict has no text to moderate; set input_key to the field holding the prompt")
        return from_text("\n\n".join(texts))
    messages = [value] if isinstance(value, BaseMessage) else _messages(value)
    if messages is None:
        raise ValueError(f"cannot moderate a {type(value).__name__}; pass a string, a message, a list of messages, "
                         "a prompt value or a prompt-template input dict")
    return messages_to_conversation(messages)


def to_answer(value: Any) -> tuple[Conversation, str]:
    """A model output as (the conversation it answers, its text): strings and messages are a lone
    answer (the question is not in view: see ``QwenGuardRunnable.around``), message lists end with it."""
    if isinstance(value, (str, BaseMessage)):
        return Conversation(), chunk_text(value)
    messages = _messages(value)
    if not messages or not isinstance(messages[-1], AIMessage):
        raise ValueError(f"cannot moderate a {type(value).__name__} as a model answer; pass a string, a message, "
                         "or messages ending with the AI message")
    return (messages_to_conversation(messages[:-1]) if len(messages) > 1 else Conversation()), chunk_text(messages[-1])


def _texts(value: Any) -> list[str]:
    """Every text a prompt-template input holds, in order; numbers and other scalars hold none."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _texts(v)]
    if isinstance(value, BaseMessage):
        value = [value]
    elif isinstance(value, PromptValue):
        value = value.to_messages()
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        if value and all(isinstance(v, BaseMessage) for v in value):
            messages_to_conversation(value)  # refuses what the guard cannot read (images, unknown roles)
            return [m.text for m in value]
        return [t for v in value for t in _texts(v)]
    return []


def _messages(value: Any) -> list[BaseMessage] | None:
    """The messages of a prompt value or a message list; None for anything else."""
    if isinstance(value, PromptValue):
        return value.to_messages()
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray)):
        return convert_to_messages(value)
    return None


#: Content blocks a model may answer with whose text a user may be shown, and the field holding it
#: (OpenAI ``output_text`` / ``refusal``, LangChain v1 ``reasoning``, Anthropic ``thinking``; an
#: OpenAI reasoning block holds its text in a ``summary`` list). ``BaseMessage.text`` keeps ``text`` only.
_TEXT_FIELDS = {"text": "text", "output_text": "text", "text-plain": "text", "refusal": "refusal",
                "reasoning": "reasoning", "thinking": "thinking"}
#: Content blocks a model may answer with that carry media the guard cannot read.
_MEDIA_BLOCKS = frozenset({"image", "image_url", "input_image", "audio", "input_audio", "video", "file", "input_file"})


def chunk_text(chunk: Any) -> str:
    """The text a streamed chunk adds to the response (``""`` for tool-call or metadata chunks): the
    text of every block a user may be shown (``_TEXT_FIELDS``), reasoning included.

    Media blocks in a model's answer raise ``ValueError``, as they do in input: Qwen3Guard reads
    text only, and passing them on would show the user something never judged.
    """
    if isinstance(chunk, (str, GenerationChunk)):
        return chunk if isinstance(chunk, str) else chunk.text
    if isinstance(chunk, (BaseMessage, ChatGenerationChunk)):
        return token_text(getattr(chunk, "message", chunk).content)
    raise ValueError(f"cannot moderate a stream of {type(chunk).__name__}; expected strings or message chunks")


def _refuse_media(content: Any) -> None:
    """``ValueError`` for a media block in a model's answer (see ``chunk_text``)."""
    blocks = content if isinstance(content, list) else []
    media = next((b["type"] for b in blocks if isinstance(b, dict) and b.get("type") in _MEDIA_BLOCKS), None)
    if media is not None:
        raise ValueError(f"the model's answer has a media block ({media!r}); Qwen3Guard judges text only and will "
                         "not pass it on unjudged (guard a text-only model, or moderate the media separately)")


def token_text(token: str | list[str | dict[str, Any]]) -> str:
    """The text of a message's content, or of an ``on_llm_new_token`` token (a list of content blocks
    for v1 models): every text-bearing block, media refused (see ``chunk_text``)."""
    if isinstance(token, str):
        return token
    _refuse_media(token)
    return "".join(map(_block_text, token))


def _block_text(block: str | dict[str, Any]) -> str:
    """The text of one content block (``""`` for tool-call and other blocks that carry none)."""
    if isinstance(block, str):
        return block
    text = block.get(_TEXT_FIELDS.get(block.get("type"), ""))
    summary = block.get("summary") if block.get("type") == "reasoning" else None
    parts = [text, *(s.get("text") for s in summary if isinstance(s, Mapping))] if isinstance(summary, list) else [text]
    return "".join(p for p in parts if isinstance(p, str))
