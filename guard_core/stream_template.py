"""The Qwen3 chat template pieces that Qwen3Guard-Stream reads, rendered by our own code.

Upstream renders ``apply_chat_template(messages, enable_thinking=False)`` with the standard Qwen3
template and streams the ids of the final assistant turn (reference 2.5). The session prefills
everything up to the assistant header and the empty think block; the response text then follows
``"\\n\\n"``, which is tokenized together with the response (as one-shot tokenization does). We
render the same bytes as ``Piece``s so user text is always encoded as text, never as control
tokens (a user writing ``<|im_end|>`` cannot end their turn early).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .messages import Message, MessageLike, normalize_messages
from .tokenization import IM_END, IM_START, THINK_CLOSE, THINK_OPEN, Piece, TextTokenizer, special

#: Text between ``</think>`` and the first response character in upstream's rendering.
RESPONSE_LEAD = "\n\n"


@dataclass(frozen=True)
class StreamPrompt:
    """Prompt ids for a Stream session and where the query heads are read."""

    ids: list[int]
    query_index: int


def _assistant_history_content(content: str) -> str:
    """An earlier assistant turn as the template prints it (reasoning before ``</think>`` dropped)."""
    if THINK_CLOSE in content:
        return content.split(THINK_CLOSE)[-1].lstrip("\n")
    return content


def conversation_pieces(messages: Sequence[Message]) -> list[Piece]:
    """The conversation turns as the Qwen3 template renders them (no generation header)."""
    pieces: list[Piece] = []
    for m in messages:
        content = _assistant_history_content(m.content) if m.role == "assistant" else m.content
        pieces += [special(IM_START), Piece(f"{m.role}\n{content}"), special(IM_END), Piece("\n")]
    return pieces


def response_header_pieces() -> list[Piece]:
    """The final assistant header with the empty think block (``enable_thinking=False``)."""
    return [special(IM_START), Piece("assistant\n"), special(THINK_OPEN), Piece("\n\n"), special(THINK_CLOSE)]


def stream_prompt_pieces(messages: Iterable[MessageLike | Message]) -> list[Piece]:
    """Everything the session prefills: the conversation ending with a user turn, then the header.

    Raises ``ValueError`` unless the last message is from the user: the Stream guard judges the
    user turn and then the assistant's answer to it.
    """
    msgs = normalize_messages(messages)
    if msgs[-1].role != "user":
        raise ValueError("a Stream session starts from a conversation whose last message is the user turn")
    return conversation_pieces(msgs) + response_header_pieces()


def encode_stream_prompt(tokenizer: TextTokenizer, messages: Iterable[MessageLike | Message]) -> StreamPrompt:
    """Prompt ids and the index of the ``<|im_end|>`` closing the last user turn."""
    pieces = stream_prompt_pieces(messages)
    ids = tokenizer.encode_pieces(pieces)
    im_end = tokenizer.special_id(IM_END)
    tail = len(tokenizer.encode_pieces(pieces[-(len(response_header_pieces()) + 1):]))
    query_index = len(ids) - tail - 1
    if ids[query_index] != im_end:
        raise AssertionError("prompt layout changed: the last user <|im_end|> was not found where expected")
    return StreamPrompt(ids, query_index)


def front_windows(tokenizer: TextTokenizer, prompt: StreamPrompt, end: int, width: int, overlap: int) -> list[StreamPrompt]:
    """Prompts of at most ``width`` tokens that together cover ``prompt.ids[:end]``, for the query heads.

    A session keeps only the last part of a prompt too long for its context, so an attacker could
    put the harmful request first and pad it; each window (a user header, a slice of the ids, then
    the prompt's own closing ``<|im_end|>`` and assistant header) is judged too, and the slices
    overlap by ``overlap`` tokens (into the kept part as well) so a sentence on an edge is whole in
    one of them, as Gen's windows are (``guard_core.windows``).
    """
    if end <= 0:  # the whole prompt fits (every session but a long prompt's): nothing to encode
        return []
    head = tokenizer.encode_pieces([special(IM_START), Piece("user\n")])
    tail = prompt.ids[prompt.query_index :]
    span = width - len(head) - len(tail)
    if span < 1:
        return []
    overlap = min(overlap, span // 4)
    stop = min(end + overlap, prompt.query_index)
    windows = []
    for start in range(0, end, span - overlap):
        piece = prompt.ids[start : min(start + span, stop)]
        windows.append(StreamPrompt(head + piece + tail, len(head) + len(piece)))
    return windows
