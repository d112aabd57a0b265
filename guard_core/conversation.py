"""One rule for what Qwen3Guard reads of a conversation, whichever framework it came from.

Qwen3Guard knows one leading system turn, user turns and assistant turns; it judges the last user
turn (prompt moderation) or the last assistant turn (response moderation). Applications send
more: developer messages, tool and function results, images, reasoning, roles nobody has heard
of. Every adapter maps its framework's messages to OpenAI-style dicts (or Responses input items)
and calls ``from_messages`` / ``from_responses_input`` (a whole OpenAI request body: ``from_request``)
here, so one conversation gets one verdict in every adapter. The rule (the README's conversation table):

- leading ``system`` / ``developer`` turns: joined into the guard's one system turn;
- ``user``: a user turn; the last one is the prompt being judged;
- ``assistant``: its text (text parts, refusal parts, ``refusal``) is an assistant turn;
  tool calls, audio and reasoning are not text anyone reads and are left out;
- ``assistant`` turns after the last user turn (an agent's tool-calling steps, a prefill the model
  will continue): untrusted context, since whoever sends the request wrote them;
- ``tool`` / ``function`` results, Responses ``*_output`` items and what hosted tools returned into
  their items (file search results, code interpreter logs, MCP output and tool lists): untrusted context;
- ``system`` / ``developer`` turns after the first user or assistant turn: untrusted context
  (instructions inserted mid-conversation, often retrieved text);
- the text of a request's tool definitions and output schema (``definition_texts``): untrusted context;
- image, audio and file parts: ``ValueError`` (the guard reads text; dropping them would let them
  through unjudged); any other role or item type: ``ValueError``, never forwarded unjudged.

Untrusted context is judged on its own, in prompt mode, like a retrieved document (indirect
prompt injection comes back as ``Jailbreak``); see ``Moderator.check_prompt``. A request with no
user turn and no context is judged by its system text, as the prompt.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from .messages import Message, check_text, content_to_text, refuse_case_variants

#: The user turn a Stream session is given when a conversation has none (it must prefill one).
FALLBACK_PROMPT = "(the request is not available)"

_SYSTEM_ROLES = frozenset({"system", "developer"})
_TOOL_ROLES = frozenset({"tool", "function"})
#: Responses input items carrying what a tool returned: judged as untrusted context.
_TOOL_OUTPUT_ITEMS = frozenset({
    "function_call_output", "custom_tool_call_output", "computer_call_output", "local_shell_call_output",
    "shell_call_output", "apply_patch_call_output",
})
#: Responses items of hosted tools that hold what the tool returned beside the call, and those fields
#: (retrieved chunks, program logs, an MCP server's output, error and tool descriptions, an approval's
#: reason): judged as untrusted context; the rest of the item is the model's own action.
_HOSTED_RESULTS = {
    "file_search_call": ("results",), "code_interpreter_call": ("outputs",), "mcp_call": ("output", "error"),
    "mcp_list_tools": ("tools", "error"), "mcp_approval_response": ("reason",),
}
#: Fields of hosted-tool results that hold ids, links and kinds, not text.
_RESULT_IDS = frozenset({"type", "id", "file_id", "container_id", "url", "image_url"})
#: Responses input items that record the model's own earlier actions: not new input.
_MODEL_ACTION_ITEMS = frozenset({
    "function_call", "custom_tool_call", "reasoning", "web_search_call", "computer_call",
    "image_generation_call", "local_shell_call", "shell_call", "apply_patch_call",
    "mcp_approval_request", "item_reference", "compaction",
})


@dataclass(frozen=True)
class Conversation:
    """The guard's view of a request: the turns it reads, and untrusted context judged on its own.

    ``turns`` is a valid guard conversation (optional system turn, then user and assistant turns)
    ending with the last user turn, or empty when the request has none. ``context`` holds the
    texts of tool results, late system messages and prefills.
    """

    turns: tuple[Message, ...] = ()
    context: tuple[str, ...] = ()

    @property
    def has_prompt(self) -> bool:
        """True when there is a user turn to judge."""
        return bool(self.turns) and self.turns[-1].role == "user"

    def with_answer(self, text: str) -> list[Message]:
        """The conversation plus the model's answer, as response moderation reads it."""
        return [*self.turns, Message("assistant", text)]

    def stream_turns(self) -> list[Message]:
        """What a Stream session prefills before the answer: it needs a final user turn."""
        return list(self.turns) if self.has_prompt else [*self.turns, Message("user", FALLBACK_PROMPT)]

    def digest(self, answer: str | None = None) -> str:
        """A sha256 of the conversation (and answer): identifies it without storing it."""
        data = [m.as_dict() for m in (self.turns if answer is None else self.with_answer(answer))]
        canonical = json.dumps({"turns": data, "context": list(self.context)}, ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def from_text(text: str) -> Conversation:
    """A one-turn conversation: ``text`` as the user's prompt."""
    return _fold([("user", text)])


def from_messages(messages: Iterable[Any]) -> Conversation:
    """The guard's view of a chat request (OpenAI ``messages``, or any framework's messages as dicts)."""
    if messages is None or isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    turns: list[tuple[str, str]] = []
    for i, raw in enumerate(messages):
        message = _plain(raw)
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i} is {type(raw).__name__}, expected a dict with 'role' and 'content'")
        role, where = message.get("role"), f"message {i}"
        refuse_case_variants(message, where=where)
        if role == "assistant":
            turns.append(("assistant", _assistant_text(message, where)))
        elif isinstance(role, str) and (role in _SYSTEM_ROLES or role == "user" or role in _TOOL_ROLES):
            turns.append((_kind(role), content_to_text(message.get("content"), where=where)))
        else:
            raise ValueError(f"{where} has role {role!r}; expected system, developer, user, assistant, tool or function")
    return _fold(turns)


def from_responses_input(input: Any, instructions: str | None = None, prompt: Any = None) -> Conversation:
    """The guard's view of a Responses API request (``input``, ``instructions`` and a reusable ``prompt``).

    The variables of a reusable prompt are filled into a template the guard never sees, so each
    one is judged on its own as untrusted context; a request may then have no ``input``.
    """
    turns: list[tuple[str, str]] = []
    if instructions:
        turns.append(("system", content_to_text(instructions, where="instructions")))
    turns += [("tool", text) for text in _prompt_variables(prompt)]
    if input is None and prompt is not None:
        input = []
    if isinstance(input, str):
        turns.append(("user", content_to_text(input, where="input")))
    elif input is None or isinstance(input, (bytes, Mapping)) or not isinstance(input, Iterable):
        raise ValueError(f"input must be a string or a list of input items, got {type(input).__name__}")
    else:
        for i, raw in enumerate(input):
            item, where = _plain(raw), f"input item {i}"
            if not isinstance(item, Mapping):
                raise ValueError(f"{where} is {type(raw).__name__}, expected a dict")
            kind = item.get("type", "message")
            refuse_case_variants(item, where=where)
            if not isinstance(kind, str) or not isinstance(item.get("role", ""), str):
                raise ValueError(f"{where} has type {kind!r} and role {item.get('role')!r}; both must be strings")
            if kind == "message":
                role = item.get("role")
                if role == "assistant":
                    turns.append(("assistant", _assistant_text(item, where)))
                elif role in _SYSTEM_ROLES or role == "user":
                    turns.append((_kind(role), content_to_text(item.get("content"), where=where)))
                else:
                    raise ValueError(f"{where} has role {role!r}; expected user, assistant, system or developer")
            elif kind in _TOOL_OUTPUT_ITEMS:
                turns.append(("tool", _tool_output_text(item.get("output"), where)))
            elif kind in _HOSTED_RESULTS:
                turns.append(("tool", _hosted_result_text(item, kind, where)))
            elif kind not in _MODEL_ACTION_ITEMS:
                raise ValueError(f"{where} has type {kind!r}, which Qwen3Guard cannot judge; remove it or send it as text")
    return _fold(turns)


def from_request(body: Mapping[str, Any], endpoint: Literal["chat", "responses"]) -> Conversation:
    """The guard's view of an OpenAI request body: a chat completion's ``messages``, or a Responses
    request's ``input``, ``instructions`` and reusable ``prompt``; the text of its tool definitions
    and output schema (``definition_texts``) joins the untrusted context."""
    if endpoint == "chat":
        conversation = from_messages(body.get("messages"))
    else:
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise ValueError(f"'instructions' must be a string, got {type(instructions).__name__}")
        conversation = from_responses_input(body.get("input"), instructions, body.get("prompt"))
    definitions = definition_texts(body)
    return replace(conversation, context=(*conversation.context, *definitions)) if definitions else conversation


#: Keys whose string values are JSON-schema or API vocabulary (``"string"``, ``"json_schema"``) or an
#: identifier the API restricts to ``[a-zA-Z0-9_-]`` (``name``), not text anyone wrote: skipped when
#: they look like one (``_IDENTIFIER``), judged like any other value when they hold prose.
_VOCABULARY_KEYS = frozenset({"type", "format", "$ref", "$schema", "verbosity", "name"})
_IDENTIFIER = re.compile(r"[A-Za-z0-9_.$#/:-]{1,128}")
#: Schema keys whose own keys are names the client chose (property names), read by the model like any
#: text; compared casefolded (Go upstreams read ``Properties`` as ``properties``).
_NAMING_KEYS = frozenset(k.casefold() for k in ("properties", "patternProperties", "$defs", "definitions",
                                                "dependentSchemas", "dependentRequired", "dependencies"))
#: Credentials of a remote (MCP) tool: sent to the tool's server, never to the model, so never to the guard.
_SECRET_KEYS = frozenset({"authorization", "headers"})
#: Request fields beside the tools that the server renders into the model's prompt: chat's
#: ``response_format``, Responses' ``text.format``, and vLLM / SGLang extensions (RAG ``documents``,
#: a per-request ``chat_template`` and its ``chat_template_kwargs``).
_RENDERED_FIELDS = ("response_format", "text", "chat_template", "chat_template_kwargs")


def definition_texts(body: Mapping[str, Any]) -> list[str]:
    """The text in a request's tool definitions, structured-output schema and other rendered fields
    (``_RENDERED_FIELDS``, ``documents``): per definition, its descriptions as one text and the rest
    of its free text (property names, ``enum``, ``default``, examples, titles) as another.

    The client writes them and the model reads them (chat templates render the whole definition
    into its prompt), so like a tool result they are untrusted context: an instruction injected
    anywhere in a definition is judged. Descriptions are prose and are judged as such, apart from
    the short values around them. Definitions may be the SDK's pydantic objects (read as it sends
    them); a value the walk cannot read is refused. The walk is iterative, since a schema can nest
    as deep as JSON allows.
    """
    listed = ("tools", "functions", "documents")
    definitions = [(f"{field}[{i}]", d) for field in listed if isinstance(body.get(field), (list, tuple))
                   for i, d in enumerate(body[field])]
    definitions += [(field, body.get(field)) for field in (*listed, *_RENDERED_FIELDS)
                    if not isinstance(body.get(field), (list, tuple))]
    texts = []
    for where, definition in definitions:
        descriptions: list[str] = []
        values: list[str] = []
        pending: deque[tuple[str, Any, bool]] = deque([("", definition, True)])
        while pending:
            key, node, top = pending.popleft()
            node = _plain(node)
            if isinstance(node, str):
                if key not in _VOCABULARY_KEYS or not _IDENTIFIER.fullmatch(node):
                    (descriptions if key == "description" else values).append(node)
            elif isinstance(node, Mapping):
                values += [k for k in node if key.casefold() in _NAMING_KEYS and isinstance(k, str)]
                secret = _SECRET_KEYS if top and node.get("type") == "mcp" else frozenset()
                pending.extend((k if isinstance(k, str) else "", v, False) for k, v in node.items() if k not in secret)
            elif isinstance(node, (list, tuple)):
                pending.extend((key, item, False) for item in node)
            elif not isinstance(node, (int, float, type(None))):
                raise ValueError(f"{where} holds a {type(node).__name__}, which Qwen3Guard cannot read; pass plain "
                                 "JSON values (dicts, lists, strings, numbers)")
        for found in (descriptions, values):
            text = check_text("\n".join(found), where=f"the text in {where!r}")
            if text.strip():
                texts.append(text)
    return texts


def _kind(role: str) -> str:
    return "system" if role in _SYSTEM_ROLES else "tool" if role in _TOOL_ROLES else role


def _fold(turns: list[tuple[str, str]]) -> Conversation:
    """Apply the rule to (kind, text) pairs in order; kinds are system, user, assistant, tool."""
    system: list[str] = []
    kept: list[Message] = []
    context: list[str] = []
    for index, (kind, text) in enumerate(turns):
        if not text.strip():
            continue
        if kind == "system" and not kept:
            system.append(text)
        elif kind == "user":
            kept.append(Message("user", text))
        elif kind == "assistant" and index == len(turns) - 1:
            context.append(text)
        elif kind == "assistant":
            kept.append(Message("assistant", text))
        else:
            context.append(text)
    last_user = max((i for i, m in enumerate(kept) if m.role == "user"), default=None)
    head = [Message("system", "\n\n".join(system))] if system else []
    if last_user is not None:
        # Assistant turns after the last user turn reach the model as its own words, but whoever sends
        # the request wrote them: untrusted context, like a prefill.
        context = [m.content for m in kept[last_user + 1:]] + context
        return Conversation(tuple(head + kept[: last_user + 1]), tuple(context))
    if context:
        return Conversation((), tuple(context))
    if system:
        return Conversation((Message("user", head[0].content),))
    raise ValueError("the request has no text to moderate (no user, system or tool message with text)")


def _plain(obj: Any) -> Any:
    """Request items may be pydantic objects (a previous response's output) as well as dicts."""
    return obj.model_dump(exclude_none=True) if hasattr(obj, "model_dump") else obj


def _assistant_text(message: Mapping[str, Any], where: str) -> str:
    """The words of an assistant turn: its text and refusal parts, and ``refusal``.

    Tool calls and audio are fields beside the content, not parts of it, so every part is text
    or a refusal; any other part (an image, a part without a type) is refused like in a user
    turn, because servers that render it would hand the model text the guard never read.
    """
    content = message.get("content")
    pieces: list[str] = []
    if isinstance(content, str):
        pieces.append(content)
    elif isinstance(content, Iterable) and not isinstance(content, (bytes, Mapping)):
        for i, part in enumerate(map(_plain, content)):
            if isinstance(part, Mapping):
                refuse_case_variants(part, where=f"{where} content part {i}")
            if isinstance(part, Mapping) and part.get("type") == "refusal":
                if not isinstance(part.get("refusal"), str):
                    raise ValueError(f"{where}: content part {i} ('refusal') has no string 'refusal'")
                pieces.append(part["refusal"])
            else:
                pieces.append(content_to_text([part], where=f"{where} content part {i}"))
    elif content is not None:
        raise ValueError(f"{where}: assistant content must be a string or a list of parts, got {type(content).__name__}")
    if isinstance(message.get("refusal"), str):
        pieces.append(message["refusal"])
    return check_text("\n".join(p for p in pieces if p), where=where)


def _prompt_variables(prompt: Any) -> list[str]:
    """The texts of a reusable prompt's ``variables`` (strings or input text parts; images and files are refused)."""
    if prompt is None:
        return []
    prompt = _plain(prompt)
    variables = prompt.get("variables") if isinstance(prompt, Mapping) else None
    if not isinstance(prompt, Mapping) or not isinstance(variables, (Mapping, type(None))):
        raise ValueError("prompt must be an object with an 'id' and optional 'variables' object")
    refuse_case_variants(prompt, where="prompt")
    return [content_to_text(value if isinstance(value, str) else [_plain(value)], where=f"prompt variable {name!r}")
            for name, value in (variables or {}).items()]


def _hosted_result_text(item: Mapping[str, Any], kind: str, where: str) -> str:
    """What a hosted tool returned into its item (``_HOSTED_RESULTS``): an MCP server's tool list is
    read like tool definitions, every other result by all the text it holds."""
    texts = definition_texts({"tools": item.get("tools") or []}) if kind == "mcp_list_tools" else []
    pending: deque[tuple[str, Any]] = deque((f, item.get(f)) for f in _HOSTED_RESULTS[kind] if (kind, f) != ("mcp_list_tools", "tools"))
    while pending:
        key, node = pending.popleft()
        node = _plain(node)
        if isinstance(node, str):
            texts.append(node)
        elif isinstance(node, Mapping):  # search results' attributes are named by whoever indexed them: keys too
            texts += [k for k in node if key == "attributes" and isinstance(k, str)]
            pending.extend((k, v) for k, v in node.items() if k not in _RESULT_IDS)
        elif isinstance(node, (list, tuple)):
            pending.extend((key, v) for v in node)
    return check_text("\n".join(texts), where=where)


def _tool_output_text(output: Any, where: str) -> str:
    """What a tool returned: a string, text parts, or shell output (images and files are refused)."""
    if isinstance(output, Mapping) and ("stdout" in output or "stderr" in output):
        return check_text("\n".join(str(output.get(k) or "") for k in ("stdout", "stderr")), where=where)
    if isinstance(output, list) and all(isinstance(o, Mapping) and ("stdout" in o or "stderr" in o) for o in output):
        return "\n".join(_tool_output_text(o, where) for o in output)
    return content_to_text(output if output is not None else "", where=where)
