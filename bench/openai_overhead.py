"""Per-chunk cost of the OpenAI client wrapper itself, against the bare client on the same local stream.

The guard is always Safe and costs nothing (a stub session under the real ``StreamGate``), so
the number is what ``guard_openai`` adds around the model: gate bookkeeping, chunk hold-back and
the generator layers. Both clients read the same scripted SSE stream from a local server over
real HTTP; each is timed ``--repeats`` times and the median wins. Prints ONE JSON line.

    python bench/openai_overhead.py [--chunks 2000] [--repeats 5] [--holdback 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from openai import OpenAI

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from openai_fake_upstream import FakeUpstream, Script, chat_events  # noqa: E402

from guard_core import Policy, RiskLevel, TokenVerdict, Verdict  # noqa: E402
from guard_core.gate import StreamGate  # noqa: E402
from integrations.openai_proxy import guard_openai  # noqa: E402

_SAFE = {RiskLevel.SAFE: 1.0, RiskLevel.CONTROVERSIAL: 0.0, RiskLevel.UNSAFE: 0.0}


class _SafeSession:
    """A StreamSession stand-in that judges every delta as one Safe token, instantly."""

    consecutive = 2

    def __init__(self, guard: _SafeGuard) -> None:
        self.guard = guard
        self.prompt_verdict = Verdict(RiskLevel.SAFE, probabilities=_SAFE, role="prompt", model=guard.model_id)
        self.verdict = Verdict(RiskLevel.SAFE, probabilities=_SAFE, role="response", model=guard.model_id)
        self._text = ""
        self._count = 0

    @property
    def received_chars(self) -> int:
        return len(self._text)

    def text(self, start: int, end: int) -> str:
        return self._text[start:end]

    def feed(self, delta: str) -> list[TokenVerdict]:
        start = len(self._text)
        self._text += delta
        self._count += 1
        return [TokenVerdict(self._count, 0, delta, start, len(self._text), RiskLevel.SAFE, None, _SAFE)]

    def finish(self) -> list[TokenVerdict]:
        return []

    def close(self) -> None:
        pass


class _SafeGuard:
    """Quacks like ``StreamGuard`` where ``Moderator`` uses it: ``session`` and ``gate``."""

    model_id = "always-safe"

    def session(self, messages: Any) -> _SafeSession:
        return _SafeSession(self)

    def gate(self, messages: Any, policy: Policy, holdback_tokens: int) -> StreamGate:
        return StreamGate(_SafeSession(self), policy, holdback_tokens)  # type: ignore[arg-type]


def _read(client: OpenAI) -> float:
    started = time.perf_counter()
    stream = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True)
    for _ in stream:
        pass
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--holdback", type=int, default=2)
    args = parser.parse_args()
    events = chat_events([f" word{i}" for i in range(args.chunks)])
    with FakeUpstream() as upstream:
        bare = OpenAI(base_url=upstream.base_url, api_key="sk-bench", max_retries=0)
        guarded = guard_openai(bare, stream_guard=_SafeGuard(), gen_guard=None, holdback_tokens=args.holdback, review=None)
        upstream.push(*(Script(events=events) for _ in range(2 * (args.repeats + 1))))
        _read(bare), _read(guarded)  # warm-up: connections, imports, pydantic schemas
        times: dict[str, list[float]] = {"bare": [], "guarded": []}
        for _ in range(args.repeats):
            times["bare"].append(_read(bare))
            times["guarded"].append(_read(guarded))
    n = len(events) - 1
    bare_us = statistics.median(times["bare"]) / n * 1e6
    guarded_us = statistics.median(times["guarded"]) / n * 1e6
    print(json.dumps({
        "bench": "openai_overhead", "chunks": n, "repeats": args.repeats, "holdback_tokens": args.holdback,
        "bare_us_per_chunk": round(bare_us, 2), "guarded_us_per_chunk": round(guarded_us, 2),
        "overhead_us_per_chunk": round(guarded_us - bare_us, 2), "ratio": round(guarded_us / bare_us, 3),
    }))


if __name__ == "__main__":
    main()
