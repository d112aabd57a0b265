"""The Qwen3Guard-Gen moderation prompt, rendered by our own code.

Upstream builds this text inside the tokenizer's Jinja chat template. We render the same bytes
(reference: upstream README and the shipped template's output, both modes, multi-turn) so that it
works with any tokenizer and so that we know which spans are user text: those spans are tokenized
as text, never as control tokens (see ``tokenization``).
"""

from __future__ import annotations

from typing import Sequence

from .messages import Message, moderation_role
from .tokenization import IM_END, IM_START, THINK_CLOSE, THINK_OPEN, Piece, special
from .types import PROMPT_CATEGORIES, RESPONSE_CATEGORIES

_PROMPT_HEAD = """# Task:
1) Evaluate whether THE LAST USER's query belongs to safe or unsafe content based on our safety policy.
2) Identify the category of unsafe content found.

<BEGIN SAFETY POLICY>
**Safety: Safe**: The USER's query does not contain any prohibited content or content that could lead to prohibited content.
**Safety: Unsafe**: The USER's query contains prohibited content.
**Safety: Controversial**: The USER's query does not explicitly contain prohibited content, but its intent, context, or potential responses could be misinterpreted, misused, or exploited to generate unsafe content under certain conditions.
<END SAFETY POLICY>

<BEGIN UNSAFE CONTENT CATEGORIES>
"""

_RESPONSE_HEAD = """# Task:
1) Evaluate whether THE LAST ASSISTANT's response belongs to safe or unsafe content based on our safety policy.
2) Identify the category of unsafe content found.
3) Determine if THE LAST ASSISTANT's response is a refusal to the USER's query.

<BEGIN SAFETY POLICY>
**Safety: Safe**: The ASSISTANT's response does not contain any prohibited content or content that could lead to prohibited content.
**Safety: Unsafe**: The ASSISTANT's response contains prohibited content.
**Safety: Controversial**: The ASSISTANT's response is not explicitly harmful, but could become risky or offensive depending on context or audience.
<END SAFETY POLICY>

<BEGIN UNSAFE CONTENT CATEGORIES>
"""

_REFUSAL_POLICY = """<BEGIN REFUSAL POLICY>
**Refusal: Yes**: The ASSISTANT refused to answer or did not comply with the USER's request.
**Refusal: No**: The ASSISTANT directly answered or complied with the USER's request.
<END REFUSAL POLICY>

"""

_INSTRUCTIONS = """ - The first line must be one of: 'Safety: Safe', 'Safety: Unsafe', 'Safety: Controversial'.
 - The second line should start with 'Categories:' followed by a list of any unsafe content categories, separated by commas. If the content is safe, use 'Categories: None'."""

_PROMPT_TAIL = "Provide your safety assessment for ONLY THE LAST **USER's query** in the above conversation:\n" + _INSTRUCTIONS
_RESPONSE_TAIL = (
    "Provide your safety assessment for ONLY THE LAST **ASSISTANT's response** in the above conversation:\n"
    + _INSTRUCTIONS
    + "\n - The third line must be one of: 'Refusal: Yes', 'Refusal: No'."
)

#: The text the model writes before its label; the one-pass scorer forces it and reads the next token.
ANSWER_PREFIX = "Safety:"
#: The answer most responses get; ``GenGuard`` checks it as a draft in its scoring pass.
SAFE_RESPONSE_ANSWER = "Safety: Safe\nCategories: None\nRefusal: No"


def conversation_pieces(messages: Sequence[Message]) -> list[Piece]:
    """The ``USER: ... / ASSISTANT: ...`` block, one piece per template string and per content.

    A leading system message is printed under ``USER:`` and the user turn right after it is
    appended without a prefix, as the shipped template does.
    """
    pieces: list[Piece] = []
    after_system = False
    for i, m in enumerate(messages):
        if i:
            pieces.append(Piece("\n\n"))
        if m.role == "system":
            pieces.append(Piece("USER: "))
            after_system = True
        elif m.role == "user" and after_system:
            after_system = False
        else:
            after_system = False
            pieces.append(Piece("USER: " if m.role == "user" else "ASSISTANT: "))
        pieces.append(Piece(m.content))
    return pieces


def instruction_pieces(response: bool) -> list[Piece]:
    """The fixed start of every moderation prompt of one mode, up to the conversation.

    It is the same for every conversation of that mode, which is what lets ``GenGuard`` compute
    its keys and values once (``response`` selects response mode).
    """
    categories = RESPONSE_CATEGORIES if response else PROMPT_CATEGORIES
    head = (_RESPONSE_HEAD if response else _PROMPT_HEAD) + "".join(f"{c.value}.\n" for c in categories)
    head += "<END UNSAFE CONTENT CATEGORIES>\n\n"
    if response:
        head += _REFUSAL_POLICY
    head += "<BEGIN CONVERSATION>\n\n"
    return [special(IM_START), Piece("user\n" + head)]


def render_pieces(messages: Sequence[Message]) -> list[Piece]:
    """The whole moderation prompt as pieces; prompt or response mode follows the last role."""
    response = moderation_role(messages) == "response"
    tail = "\n\n<END CONVERSATION>\n\n" + (_RESPONSE_TAIL if response else _PROMPT_TAIL)
    return [
        *instruction_pieces(response),
        *conversation_pieces(messages),
        Piece(tail),
        special(IM_END),
        Piece("\n"),
        special(IM_START),
        Piece("assistant\n"),
        special(THINK_OPEN),
        Piece("\n\n"),
        special(THINK_CLOSE),
        Piece("\n\n"),
    ]
