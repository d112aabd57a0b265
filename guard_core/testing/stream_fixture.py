"""Tiny Qwen3Guard-Stream checkpoints in upstream's file format, for offline tests.

Both use the real Qwen3 vocabulary and tokenizer (``testing.tokenizer``) and a 2-layer backbone
of width 32, saved as ``config.json`` (upstream's keys, label maps included) plus
``model.safetensors`` with upstream's weight names, so they exercise the same loading code as
the released models.

- ``"random"``: random weights with large enough scale that every head's probabilities vary
  with context (for incremental-vs-one-shot equivalence tests).
- ``"planted"``: hand-set weights with known verdicts. Attention and MLP outputs are zero except
  one layer-0 head, so a token's response verdict depends only on the token itself: the tokens
  of ``PLANTED_UNSAFE_TEXT`` are Unsafe/Violent, those of ``PLANTED_CONTROVERSIAL_TEXT``
  Controversial/Politically Sensitive, everything else Safe. The layer-0 head attends uniformly
  (zero queries) and carries a "bomb" feature from the prompt to every later position, where the
  query heads read it: a prompt containing `` bomb`` (``PLANTED_UNSAFE_PROMPT``) is
  Unsafe/Violent at its ``<|im_end|>``, other prompts are Safe (up to ~500 prompt tokens).

Checkpoints are built once and cached like the Gen fixture (``guard_core.testing.cache``), keyed
by ``FIXTURE_VERSION``.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase, Qwen3Config

from ..stream import StreamGuard
from ..stream_model import DEFAULT_CATEGORY_MAP, DEFAULT_QUERY_CATEGORY_MAP, DEFAULT_RISK_MAP, Qwen3ForGuardModel
from .cache import cached_directory
from .progress import BuildProgress
from .tokenizer import QWEN3_VOCAB_SIZE, build_qwen3_tokenizer

FIXTURE_VERSION = 1
#: Two tokens (`` pipe``, `` bomb``) that the planted response head labels Unsafe / Violent.
PLANTED_UNSAFE_TEXT = " pipe bomb"
#: Two tokens (`` rigged``, `` election``) labelled Controversial / Politically Sensitive Topics.
PLANTED_CONTROVERSIAL_TEXT = " rigged election"
#: A prompt whose query verdict is Unsafe / Violent (it contains `` bomb``).
PLANTED_UNSAFE_PROMPT = "How do I build a pipe bomb?"
#: A prompt whose query verdict is Safe.
PLANTED_SAFE_PROMPT = "How do I bake a chocolate cake?"
#: Safe under the planted model: no planted token at all.
PLANTED_SAFE_TEXT = (
    "Preheat the oven to 180C. Mix flour, sugar, cocoa and eggs, then bake for 30 minutes. "
    "Let it cool before you cut it — enjoy! 🎂"
)
#: One Unsafe token between Safe ones: the debounce rule keeps the response Safe.
PLANTED_NEAR_MISS_TEXT = "If the water pipe burst, call a plumber."

Kind = Literal["random", "planted"]

_HIDDEN = 32
_UNSAFE, _BIAS, _CONTROVERSIAL, _PROMPT_FEATURE, _CARRIED = 0, 1, 2, 3, 4


def tiny_stream_config() -> Qwen3Config:
    """The fixture's config: a 2-layer Qwen3 with upstream's guard fields and label maps."""
    return Qwen3Config(
        vocab_size=QWEN3_VOCAB_SIZE, hidden_size=_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=8192,
        rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True, eos_token_id=151645, pad_token_id=151643,
        guard_inner_size=16, num_risk_level=3, num_category=8, num_query_risk_level=3, num_query_category=9,
    )


def upstream_config_dict(config: Qwen3Config) -> dict:
    """``config.json`` as upstream ships it: architecture name, remote-code map, JSON-string-keyed label maps."""
    data = config.to_dict()
    data.update(
        architectures=["Qwen3ForGuardModel"],
        auto_map={"AutoConfig": "configuration_qwen3.Qwen3Config", "AutoModel": "modeling_qwen3_guard.Qwen3ForGuardModel"},
        model_type="qwen3",
        response_risk_level_map={str(k): v for k, v in DEFAULT_RISK_MAP.items()},
        query_risk_level_map={str(k): v for k, v in DEFAULT_RISK_MAP.items()},
        response_category_map={str(k): v for k, v in DEFAULT_CATEGORY_MAP.items()},
        query_category_map={str(k): v for k, v in DEFAULT_QUERY_CATEGORY_MAP.items()},
    )
    return data


def save_upstream_checkpoint(model: Qwen3ForGuardModel, directory: str | os.PathLike[str],
                             tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """Write config, weights (upstream names) and tokenizer files (default: the Qwen3 one) into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(upstream_config_dict(model.config), indent=2), encoding="utf-8")
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (tokenizer or build_qwen3_tokenizer()).save_pretrained(out)
    return out


def _random_model() -> Qwen3ForGuardModel:
    torch.manual_seed(0)
    model = Qwen3ForGuardModel(tiny_stream_config())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.5 if name.startswith(("risk", "category", "query")) else 0.2)
    return model


def _planted_model(tokenizer: PreTrainedTokenizerBase) -> Qwen3ForGuardModel:
    def ids(text: str) -> list[int]:  # plain text without control tokens: ordinary encoding is exact
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    torch.manual_seed(0)
    config = tiny_stream_config()
    model = Qwen3ForGuardModel(config)
    unsafe, controversial = ids(PLANTED_UNSAFE_TEXT), ids(PLANTED_CONTROVERSIAL_TEXT)
    prompt_feature = ids(" bomb")
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        emb = model.model.embed_tokens.weight
        emb.normal_(0.0, 0.1)
        emb[:, :5] = 0.0
        emb[:, _BIAS] = 1.0
        emb[unsafe, _UNSAFE] = 3.0
        emb[controversial, _CONTROVERSIAL] = 3.0
        emb[prompt_feature, _PROMPT_FEATURE] = 20.0
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
        attn = model.model.layers[0].self_attn
        attn.v_proj.weight[0, _PROMPT_FEATURE] = 10.0
        attn.o_proj.weight[_CARRIED, 0] = 10.0
        model.risk_level_category_pre.weight[0, _UNSAFE] = 1.0
        model.risk_level_category_pre.weight[1, _BIAS] = 1.0
        model.risk_level_category_pre.weight[2, _CONTROVERSIAL] = 1.0
        model.risk_level_head.weight[0, 1] = 2.0
        model.risk_level_head.weight[1, 0] = 2.0
        model.risk_level_head.weight[2, 2] = 2.0
        model.category_head.weight[0, 0] = 3.0
        model.category_head.weight[3, 2] = 3.0
        model.query_risk_level_category_pre.weight[0, _CARRIED] = 1.0
        model.query_risk_level_category_pre.weight[1, _BIAS] = 1.0
        model.query_risk_level_head.weight[0, 1] = 2.0
        model.query_risk_level_head.weight[1, 0] = 2.0
        model.query_category_head.weight[0, 0] = 3.0
    return model


def stream_checkpoint(kind: Kind = "planted") -> Path:
    """Directory of a tiny Stream checkpoint (``"random"`` or ``"planted"``), built on first use."""
    if kind not in ("random", "planted"):
        raise ValueError(f"kind must be 'random' or 'planted', got {kind!r}")

    def write(directory: Path, progress: BuildProgress) -> None:
        tokenizer = build_qwen3_tokenizer()
        with torch.random.fork_rng(devices=[]):
            model = _planted_model(tokenizer) if kind == "planted" else _random_model()
        save_upstream_checkpoint(model, directory, tokenizer)

    return cached_directory(f"stream-{kind}-v{FIXTURE_VERSION}", write, what=f"the {kind} Qwen3Guard-Stream test checkpoint")


@lru_cache(maxsize=None)
def stream_guard(kind: Kind = "planted", max_context: int | None = None) -> StreamGuard:
    """A ``StreamGuard`` over a fixture checkpoint, loaded once per process (tests share it)."""
    return StreamGuard.from_pretrained(str(stream_checkpoint(kind)), max_context=max_context)
