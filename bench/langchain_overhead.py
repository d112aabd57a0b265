"""Per-chunk overhead of the LangChain adapters: the callback on a chat model, the agent middleware.

1. ``QwenGuardCallbackHandler``: the same scripted stream (``GenericFakeChatModel``, one chunk per
   word or space) consumed with and without the handler. The fake model costs microseconds per
   chunk, so this ratio is an upper bound; ``gate_only_us_per_chunk`` is what the same chunks cost
   pushed straight into a StreamGate (the guard engine itself), the rest is the adapter's share.
2. ``QwenGuardMiddleware``: a ``create_agent`` agent streamed with ``stream_mode="messages"``, bare
   and guarded (input check and streamed answer), its model paced like a real one
   (``--chunk-ms``, 20 ms per chunk by default) so ``agent_ratio`` is what a user would feel.

The guard is the tiny planted Stream checkpoint, which says Safe on every token of this text, so
no run is ever blocked and both sides deliver the same chunks. Prints one JSON line.

    python bench/langchain_overhead.py [--words 1000] [--agent-words 100] [--chunk-ms 20] [--repeats 3] [--stream-model DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from collections.abc import Iterator
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.outputs import ChatGenerationChunk

from guard_core.stream import StreamGuard
from guard_core.testing.stream_fixture import PLANTED_SAFE_PROMPT, PLANTED_SAFE_TEXT, stream_checkpoint
from integrations.langchain import QwenGuardCallbackHandler
from integrations.langchain.middleware import QwenGuardMiddleware


class PacedChatModel(GenericFakeChatModel):
    """``GenericFakeChatModel`` that waits ``delay_s`` before each chunk, like a model generating tokens."""

    delay_s: float = 0.02

    def _stream(self, *args: Any, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for chunk in super()._stream(*args, **kwargs):
            time.sleep(self.delay_s)
            yield chunk


def timed_stream(text: str, config: dict) -> tuple[float, int]:
    """Seconds to consume the whole stream, and how many chunks it had."""
    model = GenericFakeChatModel(messages=iter([AIMessage(content=text)]))
    started = time.perf_counter()
    chunks = sum(1 for _ in model.stream(PLANTED_SAFE_PROMPT, config=config))
    return time.perf_counter() - started, chunks


def timed_gate(guard: StreamGuard, chunks: list[str]) -> float:
    """Seconds to push the same chunks straight into a gate: the engine's cost without LangChain."""
    with guard.gate([{"role": "user", "content": PLANTED_SAFE_PROMPT}], holdback_tokens=0) as gate:
        started = time.perf_counter()
        for chunk in chunks:
            gate.push(chunk)
        gate.finish()
        return time.perf_counter() - started


def timed_agent(text: str, delay_s: float, middleware: list[Any]) -> tuple[float, int]:
    """Seconds for one agent run streamed in messages mode, and how many answer chunks arrived."""
    model = PacedChatModel(messages=itertools.cycle([AIMessage(content=text)]), delay_s=delay_s)
    agent = create_agent(model, [], middleware=middleware)
    started = time.perf_counter()
    chunks = sum(isinstance(chunk, AIMessageChunk) and bool(chunk.text)
                 for chunk, _ in agent.stream({"messages": [("user", PLANTED_SAFE_PROMPT)]}, stream_mode="messages"))
    return time.perf_counter() - started, chunks


def repeat_text(words: int) -> str:
    """About ``words`` words of the planted safe text."""
    pool = PLANTED_SAFE_TEXT.split(" ")
    return " ".join(pool[i % len(pool)] for i in range(words))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=1000, help="approximate number of words streamed (callback)")
    parser.add_argument("--agent-words", type=int, default=100, help="approximate number of words streamed (agent)")
    parser.add_argument("--chunk-ms", type=float, default=20.0, help="the agent's model paces each chunk this long")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; the fastest counts")
    parser.add_argument("--stream-model", default=None, help="Stream checkpoint (default: the planted test fixture)")
    args = parser.parse_args()
    if args.words < 1 or args.agent_words < 1 or args.repeats < 1 or args.chunk_ms < 0:
        raise ValueError("--words, --agent-words and --repeats must be positive and --chunk-ms not negative")
    guard = StreamGuard.from_pretrained(args.stream_model or str(stream_checkpoint("planted")))
    text = repeat_text(args.words)
    handler = QwenGuardCallbackHandler(guard, prompt_check="off")
    timed_stream(text, {"callbacks": [handler]})
    plain = min(timed_stream(text, {})[0] for _ in range(args.repeats))
    guarded, chunks = min(timed_stream(text, {"callbacks": [handler]}) for _ in range(args.repeats))
    gate_only = min(timed_gate(guard, re.split(r"(\s)", text)) for _ in range(args.repeats))

    answer, delay_s, middleware = repeat_text(args.agent_words), args.chunk_ms / 1000, [QwenGuardMiddleware(None, guard)]
    timed_agent(answer, 0.0, middleware)
    bare, agent_chunks = min(timed_agent(answer, delay_s, []) for _ in range(args.repeats))
    watched, watched_chunks = min(timed_agent(answer, delay_s, middleware) for _ in range(args.repeats))
    if watched_chunks != agent_chunks:
        raise RuntimeError(f"the guarded agent delivered {watched_chunks} chunks, the bare one {agent_chunks}")
    print(json.dumps({
        "bench": "langchain_callback_overhead",
        "model": guard.model_id if args.stream_model else "planted-fixture",
        "chunks": chunks,
        "plain_s": round(plain, 6),
        "guarded_s": round(guarded, 6),
        "overhead_us_per_chunk": round((guarded - plain) / chunks * 1e6, 2),
        "gate_only_us_per_chunk": round(gate_only / chunks * 1e6, 2),
        "ratio": round(guarded / plain, 2),
        "agent_chunks": agent_chunks,
        "agent_chunk_ms": args.chunk_ms,
        "agent_bare_s": round(bare, 4),
        "agent_guarded_s": round(watched, 4),
        "agent_overhead_ms_per_chunk": round((watched - bare) / agent_chunks * 1e3, 3),
        "agent_ratio": round(watched / bare, 3),
    }))


if __name__ == "__main__":
    main()
