"""Stream guard throughput on a random-weight model of Qwen3Guard-Stream-0.6B's shape (float32, CPU).

Prints ONE JSON line:
- ``per_token_ms``: one response token at 256/1024/2048 tokens of context, our incremental step
  vs upstream's algorithm (a full forward over the whole sequence for every token); a few steps
  are timed at each length (min), not the whole loop.
- ``delta_throughput_ratio``: tokens/s when a 128-token response arrives in deltas of 1/4/16
  tokens, divided by the tokens/s of one forward over the same 128 tokens.
- ``concurrency_ratio``: aggregate tokens/s of 1/4/16 concurrent sessions (threads, one token
  per feed) divided by one session's tokens/s.

Usage: ``python bench/stream_throughput.py [--layers 4] [--threads 2]`` (``--layers 28`` is the
real depth; fewer layers keep the run short and are reported in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import Qwen3Config

from guard_core.stream import StreamGuard
from guard_core.stream_model import KVStore, PACKED_ATTENTION, Qwen3ForGuardModel, packed_forward
from guard_core.testing.tokenizer import QWEN3_VOCAB_SIZE, build_qwen3_tokenizer

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def build_model(layers: int) -> Qwen3ForGuardModel:
    """Qwen3Guard-Stream-0.6B's shape with random weights (``layers`` deep)."""
    config = Qwen3Config(
        vocab_size=QWEN3_VOCAB_SIZE, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, tie_word_embeddings=True, guard_inner_size=512, num_risk_level=3, num_category=8,
        num_query_risk_level=3, num_query_category=9,
    )
    torch.manual_seed(0)
    model = Qwen3ForGuardModel(config).eval()
    model.set_attn_implementation(PACKED_ATTENTION)
    return model


def best(fn, reps: int) -> float:
    """Minimum wall time of ``reps`` calls."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def per_token(model: Qwen3ForGuardModel, ctx: int) -> dict:
    ids = torch.randint(0, 151000, (ctx + 1,)).tolist()
    store = KVStore(model.config, dtype=torch.float32, device=torch.device("cpu"))
    packed_forward(model, [store], [ids[:ctx]])

    def incremental() -> None:
        store.length = ctx
        packed_forward(model, [store], [ids[ctx:]])

    def upstream() -> None:
        with torch.inference_mode():
            model(torch.tensor([ids]))

    ours, theirs = best(incremental, 5), best(upstream, 2)
    return {"incremental_ms": round(ours * 1e3, 2), "upstream_ms": round(theirs * 1e3, 1), "speedup": round(theirs / ours, 1)}


def response_ids(guard: StreamGuard, n: int) -> list[int]:
    text = "The keeper climbed the stairs every night and watched the ships pass in the dark. " * 20
    return guard.tokens.encode_text(text)[:n]


def delta_ratio(guard: StreamGuard, ids: list[int], delta: int) -> float:
    def stream() -> None:
        with guard.session(PROMPT) as s:
            start = time.perf_counter()
            for i in range(0, len(ids), delta):
                s.feed_ids(ids[i : i + delta])
            timings.append(time.perf_counter() - start)

    def one_shot() -> None:
        with guard.session(PROMPT) as s:
            start = time.perf_counter()
            s.feed_ids(ids)
            timings.append(time.perf_counter() - start)

    timings: list[float] = []
    stream()
    streamed = timings.pop()
    one_shot()
    one_shot()
    return round(min(timings) / streamed, 3)


def concurrent_tokens_per_s(guard: StreamGuard, ids: list[int], sessions: int) -> float:
    opened = [guard.session(PROMPT) for _ in range(sessions)]
    barrier = threading.Barrier(sessions + 1)

    def run(s) -> None:
        barrier.wait()
        for t in ids:
            s.feed_ids([t])

    threads = [threading.Thread(target=run, args=(s,)) for s in opened]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for s in opened:
        s.close()
    return sessions * len(ids) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = build_model(args.layers)
    guard = StreamGuard(model, build_qwen3_tokenizer(), model_id="random-qwen3guard-stream-0.6b-shape")
    result: dict = {
        "bench": "stream_throughput", "model": "Qwen3Guard-Stream-0.6B shape, random weights", "dtype": "float32",
        "device": "cpu", "threads": torch.get_num_threads(), "layers": args.layers, "real_layers": 28,
    }
    result["per_token_ms"] = {str(ctx): per_token(model, ctx) for ctx in (256, 1024, 2048)}
    ids = response_ids(guard, 128)
    result["delta_throughput_ratio"] = {str(d): delta_ratio(guard, ids, d) for d in (1, 4, 16)}
    single = concurrent_tokens_per_s(guard, ids[:32], 1)
    result["single_session_tokens_per_s"] = round(single, 1)
    result["concurrency_ratio"] = {str(n): round(concurrent_tokens_per_s(guard, ids[:32], n) / single, 2) for n in (1, 4, 16)}
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
