"""Stream guard throughput on a random-weight model of Qwen3Guard-Stream-0.6B's shape (float32, CPU).

Prints ONE JSON line:
- ``per_token_ms``: one response token at 256/1024/2048 tokens of context, our incremental step
  vs upstream's algorithm (a full forward over the whole sequence for every token); 30 steps
  are timed at each length, the lengths interleaved (min), not the whole loop.
  ``context_cost_ratio`` is the incremental step at 2048 divided by the one at 256 (goal <= 1.3:
  a longer cache costs little).
- ``forward_efficiency``: for the same tokens at the same context positions, the time of the
  raw ``packed_forward`` calls divided by the time through sessions (1.0 = sessions add
  nothing; goal >= 0.9): ``single`` (one session, one token per feed), ``delta16`` (one session,
  16-token deltas) and ``sessions16`` (16 concurrent sessions in threads, one token per feed,
  against one packed forward of 16 tokens per step). After one untimed run of each, raw and
  session runs alternate and the best of ``--reps`` is kept for each, so a passing load spike
  hits both sides alike.
- ``delta_throughput_ratio``: tokens/s when a 128-token response arrives in deltas of 1/4/16
  tokens, divided by the tokens/s of one forward over the same 128 tokens.
- ``concurrency_ratio``: aggregate tokens/s of 1/4/16/64 concurrent sessions (threads, one token
  per feed) divided by one session's tokens/s.

Usage: ``python bench/stream_throughput.py [--layers 4] [--threads 2] [--reps 5]`` (``--layers
28`` is the real depth; fewer layers keep the run short and are reported in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import Qwen3Config

from guard_core.stream import StreamGuard
from guard_core.stream_model import (
    PACKED_ATTENTION,
    KVStore,
    Qwen3ForGuardModel,
    packed_forward,
)
from guard_core.stream_template import RESPONSE_LEAD, encode_stream_prompt
from guard_core.testing.tokenizer import QWEN3_VOCAB_SIZE, build_qwen3_tokenizer

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
#: Response tokens timed per feed pattern (after one untimed first token).
TIMED_TOKENS = 32


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


def best(fn: Callable[[], None], reps: int) -> float:
    """Minimum wall time of ``reps`` calls."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def per_token(model: Qwen3ForGuardModel, contexts: tuple[int, ...], reps: int = 30) -> dict:
    """One incremental step at each context length (best of ``reps``, lengths interleaved) vs upstream's."""
    steps = {}
    for ctx in contexts:
        ids = torch.randint(0, 151000, (ctx + 1,)).tolist()
        store = KVStore(model.config, dtype=torch.float32, device=torch.device("cpu"))
        packed_forward(model, [store], [ids[:ctx]])
        steps[ctx] = (store, ids)
    ours: dict[int, list[float]] = {ctx: [] for ctx in contexts}
    for _ in range(reps):
        for ctx, (store, ids) in steps.items():
            store.length = ctx
            start = time.perf_counter()
            packed_forward(model, [store], [ids[ctx:]])
            ours[ctx].append(time.perf_counter() - start)
    out = {}
    for ctx, (_, ids) in steps.items():
        with torch.inference_mode():
            theirs = best(partial(model, torch.tensor([ids])), 2)
        mine = min(ours[ctx])
        out[str(ctx)] = {"incremental_ms": round(mine * 1e3, 2), "upstream_ms": round(theirs * 1e3, 1), "speedup": round(theirs / mine, 1)}
    return out


def response_ids(guard: StreamGuard, n: int) -> list[int]:
    text = "The keeper climbed the stairs every night and watched the ships pass in the dark. " * 20
    return guard.tokens.encode_text(text)[:n]


def _raw_run(guard: StreamGuard, ids: list[int], delta: int, streams: int) -> float:
    """Seconds of the bare packed forwards a session run performs (same tokens, same positions)."""
    head = encode_stream_prompt(guard.tokens, PROMPT).ids + guard.tokens.encode_text(RESPONSE_LEAD) + ids[:1]
    param = next(guard.model.parameters())
    stores = [KVStore(guard.model.config, dtype=param.dtype, device=param.device) for _ in range(streams)]
    packed_forward(guard.model, stores, [head] * streams)
    start = time.perf_counter()
    for i in range(1, len(ids), delta):
        packed_forward(guard.model, stores, [ids[i : i + delta]] * streams)
    return time.perf_counter() - start


def _session_run(guard: StreamGuard, ids: list[int], delta: int, streams: int) -> float:
    """Seconds for ``streams`` concurrent sessions (threads) to feed ``ids[1:]`` in ``delta`` steps."""
    sessions = [guard.session(PROMPT) for _ in range(streams)]
    for s in sessions:
        s.feed_ids(ids[:1])
    barrier = threading.Barrier(streams + 1)

    def run(s) -> None:
        barrier.wait()
        for i in range(1, len(ids), delta):
            s.feed_ids(ids[i : i + delta])

    threads = [threading.Thread(target=run, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for s in sessions:
        s.close()
    return elapsed


def forward_efficiency(guard: StreamGuard, ids: list[int], reps: int) -> dict:
    """Raw forward time / session time for the three feed patterns (best of ``reps`` each)."""
    shapes = {"single": (ids[: TIMED_TOKENS + 1], 1, 1), "delta16": (ids[: 8 * 16 + 1], 16, 1),
              "sessions16": (ids[: TIMED_TOKENS + 1], 1, 16)}
    out = {}
    for name, (tokens, delta, streams) in shapes.items():
        _raw_run(guard, tokens, delta, streams)
        _session_run(guard, tokens, delta, streams)
        raw, through = [], []
        for _ in range(reps):
            raw.append(_raw_run(guard, tokens, delta, streams))
            through.append(_session_run(guard, tokens, delta, streams))
        out[name] = round(min(raw) / min(through), 3)
    return out


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
    return sessions * (len(ids) - 1) / _session_run(guard, ids, 1, sessions)


def measure(args: argparse.Namespace) -> dict:
    """Every figure of the JSON line (run in a worker thread, see ``main``)."""
    started = time.perf_counter()
    model = build_model(args.layers)
    guard = StreamGuard(model, build_qwen3_tokenizer(), model_id="random-qwen3guard-stream-0.6b-shape")
    result: dict = {
        "bench": "stream_throughput", "model": "Qwen3Guard-Stream-0.6B shape, random weights", "dtype": "float32",
        "device": "cpu", "threads": torch.get_num_threads(), "layers": args.layers, "real_layers": 28,
    }
    result["per_token_ms"] = per_token(model, (256, 1024, 2048))
    result["context_cost_ratio"] = round(
        result["per_token_ms"]["2048"]["incremental_ms"] / result["per_token_ms"]["256"]["incremental_ms"], 3)
    ids = response_ids(guard, 8 * 16 + 1)
    result["forward_efficiency"] = forward_efficiency(guard, ids, args.reps)
    result["delta_throughput_ratio"] = {str(d): delta_ratio(guard, ids[:128], d) for d in (1, 4, 16)}
    single = concurrent_tokens_per_s(guard, ids[: TIMED_TOKENS + 1], 1)
    result["single_session_tokens_per_s"] = round(single, 1)
    result["concurrency_ratio"] = {
        str(n): round(concurrent_tokens_per_s(guard, ids[: TIMED_TOKENS + 1], n) / single, 2) for n in (1, 4, 16, 64)}
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5, help="repetitions per forward_efficiency figure (best kept)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The raw forwards run in a worker thread, like the scheduler's: on a loaded machine the
    # main thread's OpenMP team stalled far more often than a worker thread's (3x slower median
    # steps seen here), which would skew every raw/session ratio.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench") as pool:
        print(json.dumps(pool.submit(measure, args).result()))


if __name__ == "__main__":
    main()
