"""GenGuard latency on a Qwen3Guard-Gen-0.6B-shaped model: prefix cache, batching, one pass vs generate().

The weights are random (no hub here), which does not matter for timing: the cost of a forward
pass depends on the shape only. So that ``GenGuard.moderate`` takes the path it takes with the
real model instead of the unparseable fallback, a forward hook plants the real answer's tokens:
at every position whose context ends with a start of ``Safety: Safe\nCategories: None\nRefusal:
No``, the next token of that answer gets the top logit (the full matmuls, ``lm_head`` included,
still run). The bench's response is a safe, non-refusing answer, the common case. Figures, all
ratios measured in one run:

- ``prefix_cache_speedup``: ``moderate`` of a ~20-token prompt plus a ~60-token response, prefix
  cache off / on (``_prompt`` and ``_response`` for each alone);
- ``raw_forward_ratio_prompt`` / ``_response``: the model's own forward over the whole moderation
  prompt / over what a cached call computes (the rest after the prefix, on the prefix's cache),
  without ``GenGuard``: the most the cache can gain on this machine, against which
  ``prefix_cache_speedup_*`` is read (``prefix_tokens_*`` and ``computed_tokens_*`` give the split);
- ``batch_speedup``: 32 prompts as 32 ``moderate`` calls / one ``moderate_batch`` (cache on);
- ``speedup_<n>``: greedy ``generate()`` of a 12-token answer / the single forward GenGuard runs
  to read P(Safe/Controversial/Unsafe), for an n-token prompt.

Prints one JSON line.

    python bench/gen_latency.py [--layers 8] [--lengths 256,1024] [--device cpu] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel, PreTrainedTokenizerFast, Qwen3Config

from guard_core import GenGuard, RiskLevel
from guard_core.gen_template import ANSWER_PREFIX, SAFE_RESPONSE_ANSWER, instruction_pieces, render_pieces
from guard_core.loading import pick_device, pick_dtype
from guard_core.messages import normalize_messages
from guard_core.testing import build_qwen3_tokenizer
from guard_core.testing.tokenizer import GEN_CHAT_TEMPLATE
from guard_core.tokenization import IM_END

ANSWER_TOKENS = 12
PROMPT = "Can you recommend a few good books about the history of ancient Rome for a complete beginner?"
RESPONSE = (
    "Sure! Start with SPQR by Mary Beard, a lively overview of the first thousand years of Rome. "
    "Then read Rubicon by Tom Holland, which tells the fall of the Republic like a thriller, and "
    "finish with The Twelve Caesars by Suetonius for the emperors in the words of a Roman writer."
)
BATCH = 32


def real_shape_config(layers: int) -> Qwen3Config:
    """Qwen3Guard-Gen-0.6B's architecture (hidden 1024, 16 heads, 8 KV heads, vocab 151936)."""
    return Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
        rope_theta=1_000_000.0, tie_word_embeddings=False, eos_token_id=151645, pad_token_id=151643,
    )


class PlantedAnswer:
    """A forward hook that makes greedy decoding write ``SAFE_RESPONSE_ANSWER`` after any prompt.

    For each position whose logits are kept, the context's longest suffix that starts the answer
    names the answer's next token, which gets the top logit. Decoding steps see one new token, so
    the last tokens of every row are kept between calls that continue a cache.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> None:
        self.chain = tokenizer.encode(SAFE_RESPONSE_ANSWER) + [tokenizer.convert_tokens_to_ids(IM_END)]
        self.tails: list[list[int]] = []
        model.register_forward_hook(self._plant, with_kwargs=True)

    def _next(self, context: list[int]) -> int:
        for k in range(min(len(context), len(self.chain) - 1), 0, -1):
            if context[-k:] == self.chain[:k]:
                return self.chain[k]
        return self.chain[0]

    def _plant(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        ids = (args[0] if args else kwargs["input_ids"]).tolist()
        cache = kwargs.get("cache")
        continues = cache is not None and cache.get_seq_length() > len(ids[0]) and len(self.tails) == len(ids)
        histories = [(self.tails[row] if continues else []) + tokens for row, tokens in enumerate(ids)]
        logits = output.logits
        kept = logits.shape[1]
        for row, history in enumerate(histories):
            for j in range(kept):
                context = history[: len(history) - kept + j + 1]
                logits[row, j, self._next(context)] = logits[row, j].max() + 10.0
        self.tails = [history[-len(self.chain) :] for history in histories]


def best_of(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` runs of each function, in seconds.

    The functions take turns in every round, so load from other processes that comes and goes
    during the run weighs on all of them alike and their ratios stay meaningful.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def check_path(guard: GenGuard, conversations: list[list[dict[str, str]]]) -> None:
    """Fail unless every verdict came from the scoring pass (not the unparseable fallback)."""
    for verdict in guard.moderate_batch(conversations):
        if verdict.error is not None or verdict.risk is not RiskLevel.SAFE or not verdict.probabilities:
            raise SystemExit(f"the planted model did not answer as planned: {verdict.raw_output!r}")


def raw_forward_figures(model: PreTrainedModel, guard: GenGuard, conversations: dict[str, list[dict[str, str]]],
                        repeats: int) -> dict[str, object]:
    """For each mode: prefix and computed token counts, and full forward / cached-rest forward time."""
    result: dict[str, object] = {}
    answer = guard.tokens.encode_text(ANSWER_PREFIX)
    for name, conversation in conversations.items():
        ids = guard.tokens.encode_pieces(render_pieces(normalize_messages(conversation))) + answer
        prefix = len(guard.tokens.encode_pieces(instruction_pieces(name == "response")))
        whole = torch.tensor([ids], device=model.device)
        cache = model(input_ids=whole[:, :prefix], use_cache=True, logits_to_keep=1).cache
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        timing = best_of({
            "full": lambda: model(input_ids=whole, logits_to_keep=len(answer) + 1),
            "rest": lambda: model(input_ids=whole[:, prefix:], cache=DynamicCache(kv, config=model.config), use_cache=True,
                                  logits_to_keep=len(answer) + 1),
        }, repeats)
        result[f"prefix_tokens_{name}"] = prefix
        result[f"computed_tokens_{name}"] = len(ids) - prefix
        result[f"raw_forward_ratio_{name}"] = round(timing["full"] / timing["rest"], 2)
    return result


def moderation_figures(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, repeats: int) -> dict[str, object]:
    prompt = [{"role": "user", "content": PROMPT}]
    response = [*prompt, {"role": "assistant", "content": RESPONSE}]
    prompts = [[{"role": "user", "content": f"{PROMPT} (question {i})"}] for i in range(BATCH)]
    cached = GenGuard(model, tokenizer, model_id="bench", prefix_cache=True)
    full = GenGuard(model, tokenizer, model_id="bench", prefix_cache=False)
    for guard in (cached, full):
        check_path(guard, [prompt, response])
    timing = best_of({
        f"{name}_{cache}_s": lambda g=guard, c=conversation: g.moderate(c)
        for name, conversation in (("prompt", prompt), ("response", response))
        for cache, guard in (("cached", cached), ("uncached", full))
    }, repeats)
    batch = best_of({"singles": lambda: [cached.moderate(c) for c in prompts], "one_call": lambda: cached.moderate_batch(prompts)},
                    repeats)
    tokens = cached.tokens
    result: dict[str, object] = {
        "prompt_tokens": len(tokens.encode_text(PROMPT)),
        "response_tokens": len(tokens.encode_text(RESPONSE)),
        "moderation_prompt_tokens": len(tokens.encode_pieces(render_pieces(normalize_messages(prompt)))),
        "moderation_response_tokens": len(tokens.encode_pieces(render_pieces(normalize_messages(response)))),
        **{key: round(value, 4) for key, value in timing.items()},
        "prefix_cache_speedup_prompt": round(timing["prompt_uncached_s"] / timing["prompt_cached_s"], 2),
        "prefix_cache_speedup_response": round(timing["response_uncached_s"] / timing["response_cached_s"], 2),
        "prefix_cache_speedup": round((timing["prompt_uncached_s"] + timing["response_uncached_s"])
                                      / (timing["prompt_cached_s"] + timing["response_cached_s"]), 2),
        **raw_forward_figures(model, cached, {"prompt": prompt, "response": response}, repeats),
        "batch": BATCH,
        "batch_size": cached.batch_size,
        "batch_singles_s": round(batch["singles"], 4),
        "batch_one_call_s": round(batch["one_call"], 4),
        "batch_speedup": round(batch["singles"] / batch["one_call"], 2),
    }
    return result


def forward_figures(model: PreTrainedModel, device: torch.device, lengths: list[int], repeats: int) -> dict[str, object]:
    result: dict[str, object] = {"answer_tokens": ANSWER_TOKENS}
    for length in lengths:
        ids = torch.randint(0, 150000, (1, length), device=device)
        mask = torch.ones_like(ids)
        timing = best_of({
            "one_pass": lambda ids=ids, mask=mask: model(input_ids=ids, attention_mask=mask, logits_to_keep=3),
            "generate": lambda ids=ids, mask=mask: model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=ANSWER_TOKENS, min_new_tokens=ANSWER_TOKENS,
                do_sample=False, pad_token_id=151643),
        }, repeats)
        one_pass, generate = timing["one_pass"], timing["generate"]
        result[f"one_pass_s_{length}"] = round(one_pass, 4)
        result[f"generate_s_{length}"] = round(generate, 4)
        result[f"speedup_{length}"] = round(generate / one_pass, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, help="transformer layers (default: 28 on GPU, 8 on CPU)")
    parser.add_argument("--lengths", default="256,1024", help="prompt lengths in tokens for the one-pass vs generate() figures")
    parser.add_argument("--device", help="cpu / cuda (default: best available)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = pick_device(args.device)
    layers = args.layers or (28 if device.type == "cuda" else 8)
    dtype = pick_dtype(device)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(real_shape_config(layers), dtype=dtype).to(device).eval()
    tokenizer = build_qwen3_tokenizer(GEN_CHAT_TEMPLATE)
    PlantedAnswer(model, tokenizer)
    result: dict[str, object] = {"bench": "gen_latency", "device": device.type, "dtype": str(dtype).removeprefix("torch."),
                                 "layers": layers, "real_layers": 28, "threads": torch.get_num_threads()}
    with torch.inference_mode():
        model(torch.randint(0, 150000, (1, 16), device=device))
        result.update(moderation_figures(model, tokenizer, args.repeats))
        result.update(forward_figures(model, device, [int(x) for x in args.lengths.split(",")], args.repeats))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
