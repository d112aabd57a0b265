"""One-pass label scoring vs greedy generate() on a Qwen3Guard-Gen-0.6B-shaped model.

The weights are random (no hub here), which does not matter for timing: the cost of a forward
pass depends on the shape only. ``generate`` decodes a typical two-line answer (12 tokens, EOS
disabled so every run does the same work); ``one_pass`` is the single forward GenGuard runs to
read P(Safe/Controversial/Unsafe). Prints one JSON line.

    python bench/gen_latency.py [--layers 8] [--lengths 256,1024] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from guard_core.loading import pick_device, pick_dtype

ANSWER_TOKENS = 12


def real_shape_config(layers: int) -> Qwen3Config:
    """Qwen3Guard-Gen-0.6B's architecture (hidden 1024, 16 heads, 8 KV heads, vocab 151936)."""
    return Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
        rope_theta=1_000_000.0, tie_word_embeddings=True, eos_token_id=151645, pad_token_id=151643,
    )


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, help="transformer layers (default: 28 on GPU, 8 on CPU)")
    parser.add_argument("--lengths", default="256,1024", help="prompt lengths in tokens")
    parser.add_argument("--device", help="cpu / cuda (default: best available)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = pick_device(args.device)
    layers = args.layers or (28 if device.type == "cuda" else 8)
    dtype = pick_dtype(device)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(real_shape_config(layers), dtype=dtype).to(device).eval()
    result: dict[str, object] = {"bench": "gen_latency", "device": device.type, "dtype": str(dtype).removeprefix("torch."),
                                 "layers": layers, "real_layers": 28, "threads": torch.get_num_threads(),
                                 "answer_tokens": ANSWER_TOKENS}
    with torch.inference_mode():
        model(torch.randint(0, 150000, (1, 16), device=device))
        for length in (int(x) for x in args.lengths.split(",")):
            ids = torch.randint(0, 150000, (1, length), device=device)
            mask = torch.ones_like(ids)
            one_pass = best_of(lambda: model(input_ids=ids, attention_mask=mask, logits_to_keep=3), args.repeats)
            generate = best_of(lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=ANSWER_TOKENS,
                                                      min_new_tokens=ANSWER_TOKENS, do_sample=False, pad_token_id=151643),
                               args.repeats)
            result[f"one_pass_s_{length}"] = round(one_pass, 4)
            result[f"generate_s_{length}"] = round(generate, 4)
            result[f"speedup_{length}"] = round(generate / one_pass, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
