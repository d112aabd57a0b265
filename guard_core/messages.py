"""Checking and normalising the conversations users hand to a guard.

Messages arrive from OpenAI clients (content-part lists), LangChain (message objects already
converted by the adapter) and people typing dicts by hand. Every backend takes the output of
``normalize_messages`` so a bad conversation fails once, early, with a reason, instead of
producing a silently wrong moderation prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence

ChatRole = Literal["system", "user", "assistant"]
MessageLike = Mapping[str, Any]

MAX_MESSAGE_CHARS = 1_000_000
_ALLOWED_ROLES = ("system", "user", "assistant")
_TEXT_PART_TYPES = ("text", "input_text", "output_text")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Message:
    """A validated chat message with plain-text content."""

    role: ChatRole
    content: str

    def as_dict(self) -> dict[str, str]:
        """The OpenAI-style dict form (what chat templates expect)."""
        return {"role": self.role, "content": self.content}


def content_to_text(content: Any, *, where: str = "message") -> str:
    """Plain text of a message content: a string, or an OpenAI list of text parts.

    Non-text parts (images, audio, files) raise ``ValueError``: Qwen3Guard reads text only, and
    silently dropping a part would let unmoderated content through.
    """
    if isinstance(content, str):
        text = content
    elif isinstance(content, (bytes, bytearray)):
        raise ValueError(f"{where}: content is bytes; decode it to str first")
    elif isinstance(content, Sequence):
        pieces = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                pieces.append(part)
                continue
            if not isinstance(part, Mapping):
                raise ValueError(f"{where}: content part {i} is {type(part).__name__}, expected a dict")
            refuse_case_variants(part, where=f"{where}: content part {i}")
            kind = part.get("type")
            if kind in _TEXT_PART_TYPES and not isinstance(part.get("text"), str):
                raise ValueError(f"{where}: content part {i} ({kind!r}) has no string 'text', got {type(part.get('text')).__name__}")
            if kind not in _TEXT_PART_TYPES:
                raise ValueError(
                    f"{where}: content part {i} has type {kind!r}; only text parts can be moderated "
                    "(remove or transcribe non-text parts first)"
                )
            pieces.append(part["text"])
        text = "\n".join(pieces)
    elif content is None:
        raise ValueError(f"{where}: content is missing")
    else:
        raise ValueError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")
    return check_text(text, where=where)


#: The keys whose values the guard reads as text (top level, messages, items and parts), in requests
#: and in replies.
GUARDED_KEYS = frozenset({
    "messages", "input", "instructions", "prompt", "variables", "tools", "functions", "response_format", "text",
    "role", "content", "refusal", "type", "output", "stdout", "stderr",
})
#: A request body's top-level keys the guard reads too: the vLLM / SGLang fields it judges, and those
#: that decide how it judges (``n`` choices, a ``stream``) or what it refuses (stored history). Only
#: a request's top level: a reply's free-form maps (search result attributes) may hold such keys.
REQUEST_KEYS = GUARDED_KEYS | {"documents", "chat_template", "chat_template_kwargs", "n", "stream", "background",
                               "conversation", "previous_response_id"}


def refuse_case_variants(obj: Mapping[str, Any], *, where: str, keys: frozenset[str] = GUARDED_KEYS) -> None:
    """``ValueError`` for a key that differs from one the guard reads (``keys``) only in case (``"Content"``).

    The guard reads the exact key; servers and clients that match keys case-insensitively (Go's
    ``encoding/json``, e.g. Ollama's OpenAI API) would read the variant as that field, unjudged.
    """
    for key in obj:
        if isinstance(key, str) and key not in keys and key.casefold() in keys:
            raise ValueError(f"{where}: key {key!r} differs from {key.casefold()!r} only in case; some servers read "
                             f"it as {key.casefold()!r} without the guard having judged it: send {key.casefold()!r}")


def check_text(text: str, *, where: str = "message") -> str:
    """``text`` if the tokenizer can read it; else ``ValueError`` saying what is wrong and where.

    Lone surrogates (from JSON ``"\\ud800"`` escapes or ``surrogateescape`` decoding) are not
    Unicode text: tokenizers fail on them deep inside, so they are refused here with a reason.
    """
    if "\x00" in text:
        raise ValueError(f"{where}: content contains NUL bytes (binary data?)")
    if len(text) > MAX_MESSAGE_CHARS:
        raise ValueError(f"{where}: content is {len(text)} characters; the limit is {MAX_MESSAGE_CHARS}")
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise ValueError(
            f"{where}: content has a lone surrogate U+{ord(bad.group()):04X} at character {bad.start()}, which is not "
            "valid Unicode; decode bytes with errors='replace' or fix the \\u escape")
    return text


def normalize_messages(messages: Iterable[MessageLike | Message]) -> list[Message]:
    """Validate a conversation to be moderated.

    Rules: at least one message; roles are ``system`` (first message only), ``user`` or
    ``assistant``; the last message is ``user`` (prompt moderation) or ``assistant`` (response
    moderation); the last message must not be empty.
    """
    if messages is None or isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            m = m.as_dict()
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} is {type(m).__name__}, expected a dict with 'role' and 'content'")
        role = m.get("role")
        if role not in _ALLOWED_ROLES:
            raise ValueError(f"message {i} has role {role!r}; Qwen3Guard moderates 'system', 'user' and 'assistant' turns")
        if role == "system" and i != 0:
            raise ValueError(f"message {i} is a system message; only the first message may be one")
        out.append(Message(role, content_to_text(m.get("content"), where=f"message {i}")))
    if not out:
        raise ValueError("messages is empty; pass at least one user message")
    if out[-1].role not in ("user", "assistant"):
        raise ValueError("the last message must be 'user' (prompt moderation) or 'assistant' (response moderation)")
    if not out[-1].content.strip():
        raise ValueError(f"the last message ({out[-1].role}) is empty; there is nothing to moderate")
    return out


def normalize_batch(conversations: Iterable[Iterable[MessageLike | Message]]) -> list[list[Message]]:
    """Validate many conversations (``normalize_messages`` each), naming the one that is wrong."""
    if conversations is None or isinstance(conversations, (str, bytes, Mapping)) or not isinstance(conversations, Iterable):
        raise ValueError(f"conversations must be a list of conversations (each a list of message dicts), got {type(conversations).__name__}")
    out = []
    for i, conversation in enumerate(conversations):
        try:
            out.append(normalize_messages(conversation))
        except ValueError as exc:
            raise ValueError(f"conversation {i}: {exc}") from None
    return out


def moderation_role(messages: Sequence[Message]) -> Literal["prompt", "response"]:
    """Which kind of moderation a normalised conversation asks for."""
    return "response" if messages[-1].role == "assistant" else "prompt"
