"""Throughput and added per-chunk latency of the guard proxy against going straight upstream.

A scripted OpenAI-compatible SSE upstream (the tests' ``FakeUpstream``, real HTTP on 127.0.0.1)
streams the same safe answer to every request, paced at ``--gap-ms`` per chunk like a real LLM.
The same load (1 and 32 concurrent streams) is sent straight to it and through the proxy (tiny
offline Stream + Gen checkpoints, default hold-back window). Per chunk, the added latency is its
arrival time through the proxy minus its arrival time when direct, matched by position; one warm-up
stream runs first so model start-up is not counted. Prints one JSON line.

    python bench/proxy_load.py [--chunks 60] [--gap-ms 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from asgi_server import serve_app  # noqa: E402
from openai_fake_upstream import FakeUpstream, Script, chat_events  # noqa: E402

from guard_core import GenGuard, StreamGuard  # noqa: E402
from guard_core.testing import PLANTED_SAFE_PROMPT, gen_checkpoint, stream_checkpoint  # noqa: E402
from integrations.openai_proxy import Moderator  # noqa: E402
from integrations.openai_proxy.server import create_app  # noqa: E402


def one_stream(base_url: str) -> list[float]:
    """Arrival time of each SSE data line, from the request start."""
    body = {"model": "fake", "messages": [{"role": "user", "content": PLANTED_SAFE_PROMPT}], "stream": True}
    start = time.perf_counter()
    arrivals = []
    with httpx.stream("POST", base_url + "/chat/completions", json=body, timeout=120) as reply:
        for line in reply.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.perf_counter() - start)
    return arrivals


def run_load(base_url: str, upstream: FakeUpstream, script: Script, concurrency: int) -> tuple[float, list[list[float]]]:
    upstream.push(*[script] * concurrency)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        streams = list(pool.map(lambda _: one_stream(base_url), range(concurrency)))
    return time.perf_counter() - start, streams


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=60)
    parser.add_argument("--gap-ms", type=float, default=5.0)
    args = parser.parse_args()
    pieces = [" and the oven" if i % 2 else " preheat" for i in range(args.chunks)]
    script = Script(events=chat_events(pieces), delay_s=args.gap_ms / 1000)
    result: dict[str, object] = {"bench": "proxy_load", "chunks_per_stream": args.chunks, "gap_ms": args.gap_ms,
                                 "guard": "tiny offline fixtures (planted Stream + trained Gen)"}
    with FakeUpstream() as upstream:
        moderator = Moderator(stream_guard=StreamGuard.from_pretrained(str(stream_checkpoint("planted"))),
                              gen_guard=GenGuard.from_pretrained(str(gen_checkpoint())), on_unsafe="rewrite")
        with serve_app(create_app(upstream.base_url, moderator=moderator)) as proxy_url:
            run_load(proxy_url, upstream, script, 1)
            for concurrency in (1, 32):
                direct_s, direct = run_load(upstream.base_url, upstream, script, concurrency)
                proxied_s, proxied = run_load(proxy_url, upstream, script, concurrency)
                added = [p - d for ps, ds in zip(proxied, direct) for p, d in zip(ps, ds)]
                chunks = sum(map(len, proxied))
                result[f"c{concurrency}"] = {
                    "direct_chunks_per_s": round(sum(map(len, direct)) / direct_s, 1),
                    "proxy_chunks_per_s": round(chunks / proxied_s, 1),
                    "throughput_ratio": round((chunks / proxied_s) / (sum(map(len, direct)) / direct_s), 3),
                    "added_ms_p50": round(1000 * statistics.median(added), 2),
                    "added_ms_p99": round(1000 * percentile(added, 0.99), 2),
                }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
