"""Throughput and added per-chunk latency of the guard proxy against going straight upstream.

A scripted OpenAI-compatible SSE upstream (the tests' ``FakeUpstream``, real HTTP on 127.0.0.1)
streams the same safe answer to every request, paced at ``--gap-ms`` per chunk like a real LLM.
The same load (1 and 32 concurrent streams) is sent straight to it and through the proxy, run as
users run it: ``qwen3guard-proxy`` in its own process (tiny offline Stream + Gen checkpoints,
default hold-back window), so the load generator and the scripted upstream do not share its
interpreter. Per chunk, the added latency is its arrival time through the proxy minus its arrival
time when direct, matched by position; one warm-up stream runs first so model start-up is not
counted. Prints one JSON line.

    python bench/proxy_load.py [--chunks 60] [--gap-ms 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gen_server import unused_url  # noqa: E402
from openai_fake_upstream import FakeUpstream, Script, chat_events  # noqa: E402

from guard_core.testing import PLANTED_SAFE_PROMPT, gen_checkpoint, stream_checkpoint  # noqa: E402


#: One connection pool for every stream, so the figures measure the servers, not TLS-context set-up per request.
CLIENT = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))


def one_stream(base_url: str) -> list[float]:
    """Arrival time of each SSE data line, from the request start."""
    body = {"model": "fake", "messages": [{"role": "user", "content": PLANTED_SAFE_PROMPT}], "stream": True}
    start = time.perf_counter()
    arrivals = []
    with CLIENT.stream("POST", base_url + "/chat/completions", json=body) as reply:
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


@contextmanager
def proxy_process(upstream_url: str) -> Iterator[str]:
    """``qwen3guard-proxy`` in front of ``upstream_url`` in a process of its own; yields its base URL."""
    url = unused_url()
    port = url.rsplit(":", 1)[1].split("/")[0]
    command = [sys.executable, "-m", "integrations.openai_proxy", "--upstream", upstream_url, "--port", port,
               "--gen-model", str(gen_checkpoint()), "--stream-model", str(stream_checkpoint("planted"))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QWEN3GUARD_REVIEW_DB": ""}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if CLIENT.get(url.removesuffix("/v1") + "/healthz", timeout=5).status_code < 600:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        if server.poll() is not None:
            raise SystemExit(f"qwen3guard-proxy exited with status {server.returncode}")
        yield url
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=60)
    parser.add_argument("--gap-ms", type=float, default=5.0)
    args = parser.parse_args()
    pieces = [" and the oven" if i % 2 else " preheat" for i in range(args.chunks)]
    script = Script(events=chat_events(pieces), delay_s=args.gap_ms / 1000)
    result: dict[str, object] = {"bench": "proxy_load", "chunks_per_stream": args.chunks, "gap_ms": args.gap_ms,
                                 "guard": "tiny offline fixtures (planted Stream + trained Gen)"}
    with FakeUpstream() as upstream, proxy_process(upstream.base_url) as proxy_url:
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
    result["p99_ratio_c32_c1"] = round(result["c32"]["added_ms_p99"] / result["c1"]["added_ms_p99"], 2)  # type: ignore[index]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
