"""Per-token overhead of QwenGuardCallbackHandler on a streaming LangChain chat model.

The same scripted stream (``GenericFakeChatModel``, one chunk per word or space) is consumed
with and without the handler; the guard is the tiny planted Stream checkpoint, which says Safe
on every token of this text, so no run is ever blocked and both sides deliver the same chunks.
The ratio is guarded time / plain time; ``overhead_us_per_chunk`` is the absolute extra cost,
and ``gate_only_us_per_chunk`` is what the same chunks cost pushed straight into a StreamGate
(the guard engine itself), so the difference is the LangChain adapter's share.
The plain fake model costs microseconds per chunk, so the ratio is an upper bound on what a
real model (tens of milliseconds per token) would see. Prints one JSON line.

    python bench/langchain_overhead.py [--words 1000] [--repeats 3] [--stream-model DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import time

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage

from guard_core.stream import StreamGuard
from guard_core.testing.stream_fixture import PLANTED_SAFE_PROMPT, PLANTED_SAFE_TEXT, stream_checkpoint
from integrations.langchain import QwenGuardCallbackHandler


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=1000, help="approximate number of words streamed")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; the fastest counts")
    parser.add_argument("--stream-model", default=None, help="Stream checkpoint (default: the planted test fixture)")
    args = parser.parse_args()
    if args.words < 1 or args.repeats < 1:
        raise ValueError("--words and --repeats must be positive")
    guard = StreamGuard.from_pretrained(args.stream_model or str(stream_checkpoint("planted")))
    words = PLANTED_SAFE_TEXT.split(" ")
    text = " ".join(words[i % len(words)] for i in range(args.words))
    handler = QwenGuardCallbackHandler(guard, prompt_check="off")
    timed_stream(text, {"callbacks": [handler]})
    plain = min(timed_stream(text, {})[0] for _ in range(args.repeats))
    runs = [timed_stream(text, {"callbacks": [handler]}) for _ in range(args.repeats)]
    guarded, chunks = min(runs)
    gate_only = min(timed_gate(guard, re.split(r"(\s)", text)) for _ in range(args.repeats))
    print(json.dumps({
        "bench": "langchain_callback_overhead",
        "model": guard.model_id if args.stream_model else "planted-fixture",
        "chunks": chunks,
        "plain_s": round(plain, 6),
        "guarded_s": round(guarded, 6),
        "overhead_us_per_chunk": round((guarded - plain) / chunks * 1e6, 2),
        "gate_only_us_per_chunk": round(gate_only / chunks * 1e6, 2),
        "ratio": round(guarded / plain, 2),
    }))


if __name__ == "__main__":
    main()
