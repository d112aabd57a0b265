"""LangChain values -> the OpenAI-style conversations guard_core moderates.

One place decides how LangChain's message types map onto the three roles Qwen3Guard knows, so
the callback handler and the Runnable judge the same input identically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    convert_to_messages,
)
from langchain_core.outputs import ChatGenerationChunk, GenerationChunk
from langchain_core.prompt_values import PromptValue

from guard_core.messages import content_to_text

Role = Literal["prompt", "response"]
Conversation = list[dict[str, str]]

_CHAT_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "ai": "assistant", "system": "system"}


def _role_of(message: BaseMessage) -> str:
    """Tool and function results are input the model reads, so they are judged like user turns."""
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, ChatMessage):
        return _CHAT_ROLES.get(message.role.lower(), "user")
    return "user"


def message_to_dict(message: BaseMessage, index: int = 0) -> dict[str, str]:
    """One message as a guard dict.

    Input turns keep every content part (a non-text part raises ``ValueError``: the guard reads
    text only and must not skip what the model will read); assistant turns keep their text
    blocks only, since tool calls and reasoning are not text shown to the user.
    """
    role = _role_of(message)
    if role == "assistant":
        return {"role": role, "content": message.text}
    return {"role": role, "content": content_to_text(message.content, where=f"message {index}")}


def messages_to_conversation(messages: Sequence[BaseMessage]) -> Conversation:
    """A LangChain message list as a conversation guard_core accepts.

    Qwen3Guard allows one system turn, first: leading system messages are joined into it and
    later ones become user turns (they are instructions the model reads). A conversation made
    only of system text is judged as a user turn.
    """
    converted = [message_to_dict(m, i) for i, m in enumerate(messages)]
    if not converted:
        raise ValueError("there are no messages to moderate")
    lead = 0
    while lead < len(converted) and converted[lead]["role"] == "system":
        lead += 1
    rest = [{**m, "role": "user"} if m["role"] == "system" else m for m in converted[lead:]]
    system = "\n\n".join(m["content"] for m in converted[:lead])
    if not rest:
        return [{"role": "user", "content": system}]
    return ([{"role": "system", "content": system}] if lead else []) + rest


def to_conversation(value: Any, role: Role, *, input_key: str | None = None) -> Conversation:
    """Any value a guard Runnable can receive, as a conversation ending with the judged turn.

    Strings and single messages are the judged turn itself; prompt values and message lists are
    whole conversations; a dict (the input of a prompt template) is a prompt made of its
    ``input_key`` value, or of all its string values when no key is given.
    """
    turn = "user" if role == "prompt" else "assistant"
    if isinstance(value, str):
        conversation = [{"role": turn, "content": value}]
    elif isinstance(value, BaseMessage):
        conversation = [{"role": turn, "content": message_to_dict(value)["content"]}]
    elif isinstance(value, PromptValue):
        conversation = messages_to_conversation(value.to_messages())
    elif isinstance(value, Mapping):
        if role != "prompt":
            raise ValueError("a response guard receives a model output (string or message), not a dict")
        conversation = _dict_prompt(value, input_key)
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        conversation = messages_to_conversation(convert_to_messages(value))
    else:
        raise ValueError(
            f"cannot moderate a {type(value).__name__}; pass a string, a message, a list of messages, "
            "a prompt value or (for prompt guards) a prompt-template input dict"
        )
    if conversation[-1]["role"] != turn:
        raise ValueError(f"a {role} guard needs a conversation ending with a {turn} turn, got {conversation[-1]['role']!r}")
    if not conversation[-1]["content"].strip():
        raise ValueError(f"the {role} to moderate is empty")
    return conversation


def _dict_prompt(value: Mapping[str, Any], input_key: str | None) -> Conversation:
    if input_key is not None:
        if input_key not in value:
            raise ValueError(f"input_key {input_key!r} is not in the input dict (keys: {sorted(value)})")
        return to_conversation(value[input_key], "prompt")
    texts = [v for v in value.values() if isinstance(v, str)]
    if not texts:
        raise ValueError("the input dict has no string values to moderate; set input_key to the field holding the prompt")
    return [{"role": "user", "content": "\n\n".join(texts)}]


def chunk_text(chunk: Any) -> str:
    """The text a streamed chunk adds to the response (``""`` for tool-call or metadata chunks)."""
    if isinstance(chunk, str):
        return chunk
    if isinstance(chunk, BaseMessage):
        return chunk.text
    if isinstance(chunk, (ChatGenerationChunk, GenerationChunk)):
        return chunk.text
    raise ValueError(f"cannot moderate a stream of {type(chunk).__name__}; expected strings or message chunks")


def token_text(token: str | list[str | dict[str, Any]]) -> str:
    """The text of an ``on_llm_new_token`` token, which is a list of content blocks for v1 models."""
    if isinstance(token, str):
        return token
    return "".join(b if isinstance(b, str) else b.get("text", "") for b in token
                   if isinstance(b, str) or b.get("type") == "text")
