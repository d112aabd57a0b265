"""Qwen3Guard-Stream as a plain transformers model, loadable without ``trust_remote_code``.

The released checkpoints are a Qwen3 backbone (weights ``model.*``) plus two classification
paths read at every position (reference section 2.1): a response path and a query (prompt) path,
each ``Linear(hidden -> guard_inner) -> RMSNorm -> {risk Linear, category Linear}``. Module names
match upstream's ``Qwen3ForGuardModel`` so ``from_pretrained`` reads their safetensors as-is.

Upstream's own code re-runs the whole sequence for every token (reference 2.4). Here the model is
a normal forward; incremental, batched streaming lives in ``KVStore`` / ``PackedStep`` below: each
stream keeps its own preallocated key/value buffers, and one forward carries the new tokens of
many streams packed into a single row. A custom attention function attends every stream's
queries to that stream's own keys only, so there is no padding and no cross-stream leakage, and
each stream's result is the same as if it ran alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3Config
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface
from transformers.models.qwen3.modeling_qwen3 import Qwen3Model, Qwen3PreTrainedModel, Qwen3RMSNorm

from .types import Category, GuardUnavailableError, RiskLevel

#: Upstream's index order (eval_stream.py); used only when a config has no label maps.
DEFAULT_RISK_MAP: Mapping[int, str] = {0: "Safe", 1: "Unsafe", 2: "Controversial"}
DEFAULT_CATEGORY_MAP: Mapping[int, str] = {
    0: "Violent", 1: "Sexual Content or Sexual Acts", 2: "Suicide & Self-Harm", 3: "Politically Sensitive Topics",
    4: "PII", 5: "Copyright Violation", 6: "Non-violent Illegal Acts", 7: "Unethical Acts",
}
DEFAULT_QUERY_CATEGORY_MAP: Mapping[int, str] = {**DEFAULT_CATEGORY_MAP, 8: "Jailbreak"}

#: Module names of the two heads, as in the released checkpoints.
HEAD_MODULES = (
    "risk_level_category_pre", "risk_level_category_layernorm", "risk_level_head", "category_head",
    "query_risk_level_category_pre", "query_risk_level_category_layernorm", "query_risk_level_head",
    "query_category_head",
)
PACKED_ATTENTION = "qwen3guard_packed"


@dataclass
class GuardLogits:
    """Head logits for every input position, ``[batch, seq, classes]`` each."""

    risk_level_logits: torch.Tensor
    category_logits: torch.Tensor
    query_risk_level_logits: torch.Tensor
    query_category_logits: torch.Tensor


@dataclass(frozen=True)
class HeadProbabilities:
    """Softmax of the four heads at some positions, as Python lists (one row per position).

    Computed once per packed step for every position that needs a verdict, so the cost of the
    small tensor operations does not grow with the number of sessions in the step.
    """

    risk: list[list[float]]
    category: list[list[float]]
    query_risk: list[list[float]]
    query_category: list[list[float]]

    @classmethod
    def of(cls, logits: GuardLogits, rows: Sequence[int]) -> HeadProbabilities:
        """Probabilities at the packed positions ``rows`` of a ``[1, seq, classes]`` step."""
        heads = (logits.risk_level_logits, logits.category_logits, logits.query_risk_level_logits, logits.query_category_logits)
        index = torch.tensor(rows, device=heads[0].device)
        joined = torch.cat([torch.softmax(h[0].index_select(0, index).float(), dim=-1) for h in heads], dim=-1).tolist()
        per_head, start = [], 0
        for head in heads:
            end = start + head.shape[-1]
            per_head.append([row[start:end] for row in joined])
            start = end
        return cls(*per_head)

    def slice(self, start: int, end: int) -> HeadProbabilities:
        """The rows ``[start, end)``."""
        return HeadProbabilities(self.risk[start:end], self.category[start:end], self.query_risk[start:end], self.query_category[start:end])


@dataclass(frozen=True)
class LabelMaps:
    """Class index -> label for the four heads, read from the config (index order differs from severity)."""

    risk: tuple[RiskLevel, ...]
    category: tuple[Category, ...]
    query_risk: tuple[RiskLevel, ...]
    query_category: tuple[Category, ...]

    @classmethod
    def from_config(cls, config: Qwen3Config) -> LabelMaps:
        """Maps from ``response_risk_level_map`` & co., falling back to upstream's order."""

        def read(name: str, default: Mapping[int, str], size: int, kind: type) -> tuple:
            raw = getattr(config, name, None) or default
            table = {int(k): str(v).strip().strip('"') for k, v in dict(raw).items()}
            if sorted(table) != list(range(size)):
                raise GuardUnavailableError(f"config {name} has indices {sorted(table)}, expected 0..{size - 1}")
            try:
                return tuple(kind(table[i]) for i in range(size))
            except ValueError as exc:
                raise GuardUnavailableError(f"config {name}: {exc}") from None

        return cls(
            risk=read("response_risk_level_map", DEFAULT_RISK_MAP, config.num_risk_level, RiskLevel),
            category=read("response_category_map", DEFAULT_CATEGORY_MAP, config.num_category, Category),
            query_risk=read("query_risk_level_map", DEFAULT_RISK_MAP, config.num_query_risk_level, RiskLevel),
            query_category=read("query_category_map", DEFAULT_QUERY_CATEGORY_MAP, config.num_query_category, Category),
        )


class Qwen3ForGuardModel(Qwen3PreTrainedModel):
    """Qwen3 backbone + response and query heads (upstream's architecture and weight names)."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__(config)
        for key in ("guard_inner_size", "num_risk_level", "num_category", "num_query_risk_level", "num_query_category"):
            if not isinstance(getattr(config, key, None), int):
                raise GuardUnavailableError(f"config has no integer {key!r}; is this a Qwen3Guard-Stream checkpoint?")
        hidden, inner, eps = config.hidden_size, config.guard_inner_size, config.rms_norm_eps
        self.model = Qwen3Model(config)
        self.risk_level_category_pre = nn.Linear(hidden, inner, bias=False)
        self.risk_level_category_layernorm = Qwen3RMSNorm(inner, eps=eps)
        self.risk_level_head = nn.Linear(inner, config.num_risk_level, bias=False)
        self.category_head = nn.Linear(inner, config.num_category, bias=False)
        self.query_risk_level_category_pre = nn.Linear(hidden, inner, bias=False)
        self.query_risk_level_category_layernorm = Qwen3RMSNorm(inner, eps=eps)
        self.query_risk_level_head = nn.Linear(inner, config.num_query_risk_level, bias=False)
        self.query_category_head = nn.Linear(inner, config.num_query_category, bias=False)
        self.post_init()

    def heads(self, hidden: torch.Tensor) -> GuardLogits:
        """Apply both heads to final hidden states ``[..., hidden]``."""
        x = self.risk_level_category_layernorm(self.risk_level_category_pre(hidden))
        q = self.query_risk_level_category_layernorm(self.query_risk_level_category_pre(hidden))
        return GuardLogits(self.risk_level_head(x), self.category_head(x), self.query_risk_level_head(q), self.query_category_head(q))

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: object | None = None,
        use_cache: bool = False,
    ) -> GuardLogits:
        """Head logits at every position (a plain causal forward unless a ``PackedStep`` is passed)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=use_cache)
        return self.heads(out.last_hidden_state)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Qwen3ForGuardModel:
        """Load a checkpoint directory, failing loudly on any missing or unexpected weight.

        ``from_pretrained`` would randomly initialise missing heads with only a log line, which
        for a guard means silently random verdicts.
        """
        from .loading import inspect_checkpoint, require_complete_weights

        path = Path(directory)
        inspect_checkpoint(path).require("stream")
        config = Qwen3Config.from_pretrained(path)
        model, info = cls.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
        require_complete_weights(path, "stream", info, ignore_unexpected=("lm_head.",))
        model.set_attn_implementation(PACKED_ATTENTION)
        return model.to(device).eval()


def read_guard_config(directory: str | os.PathLike[str]) -> dict:
    """The raw ``config.json`` (for tools that only need sizes or label maps)."""
    return json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))


class KVStore:
    """One stream's keys and values: per-layer buffers grown in chunks, written in place.

    ``DynamicCache`` concatenates on every step (copying the whole cache per token); these
    buffers are appended in place and can be rolled back by just lowering ``length``.
    """

    def __init__(self, config: Qwen3Config, *, dtype: torch.dtype, device: torch.device, chunk: int = 256) -> None:
        self.layers = config.num_hidden_layers
        self.heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.dtype, self.device, self.chunk = dtype, device, chunk
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0

    @property
    def capacity(self) -> int:
        """Positions the buffers can hold without growing."""
        return self.keys[0].shape[2] if self.keys else 0

    def reserve(self, total: int) -> None:
        """Make room for ``total`` positions (growth by at least one chunk, or x1.5)."""
        if total <= self.capacity:
            return
        new_cap = max(total, self.capacity + self.chunk, int(self.capacity * 1.5))
        shape = (1, self.heads, new_cap, self.head_dim)
        for store in (self.keys, self.values):
            for i in range(self.layers):
                grown = torch.empty(shape, dtype=self.dtype, device=self.device)
                if i < len(store):
                    grown[:, :, : self.length] = store[i][:, :, : self.length]
                    store[i] = grown
                else:
                    store.append(grown)

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def release(self) -> None:
        """Drop the buffers (a closed session must not keep its cache alive)."""
        self.keys.clear()
        self.values.clear()
        self.length = 0


@dataclass(frozen=True)
class Segment:
    """The new tokens of one stream inside a packed step: ``count`` tokens after ``past`` cached ones.

    ``mask`` is the causal mask of those tokens' grouped queries over the stream's cache
    (``None`` for a single token, which sees the whole cache); it is built once per step and
    shared by all layers.
    """

    store: KVStore
    offset: int
    past: int
    count: int
    mask: torch.Tensor | None


class PackedStep:
    """Cache and attention mask for one forward over the new tokens of several streams.

    Passed as both ``cache`` and the attention mask: ``update`` writes each stream's new keys
    into its own ``KVStore``; the packed attention function then attends each stream's queries
    to its own keys. The stores' ``length`` advances only in ``commit``, after the forward.
    """

    def __init__(self, segments: Sequence[Segment]) -> None:
        self.segments = list(segments)
        for seg in self.segments:
            seg.store.reserve(seg.past + seg.count)

    @classmethod
    def build(cls, stores: Sequence[KVStore], counts: Sequence[int], query_group: int) -> tuple[PackedStep, torch.Tensor]:
        """The step and its ``position_ids [1, sum(counts)]``.

        ``query_group`` is the number of query heads sharing one key/value head: the attention
        runs each group as one head with ``query_group * count`` query rows (see
        ``_packed_attention``), so the mask repeats the causal rows that many times.
        """
        segments, positions, offset = [], [], 0
        device = stores[0].device
        for store, count in zip(stores, counts):
            past = store.length
            mask = None
            if count > 1:
                rows = torch.arange(past, past + count, device=device).repeat(query_group).unsqueeze(1)
                mask = torch.arange(past + count, device=device).unsqueeze(0) <= rows
            segments.append(Segment(store, offset, past, count, mask))
            positions.extend(range(past, past + count))
            offset += count
        return cls(segments), torch.tensor([positions], dtype=torch.long, device=device)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of every segment at its position."""
        for seg in self.segments:
            end = seg.past + seg.count
            seg.store.keys[layer_idx][:, :, seg.past : end] = key[:, :, seg.offset : seg.offset + seg.count]
            seg.store.values[layer_idx][:, :, seg.past : end] = value[:, :, seg.offset : seg.offset + seg.count]
        return key, value

    def commit(self) -> None:
        """Advance every store past the tokens of this step."""
        for seg in self.segments:
            seg.store.length = seg.past + seg.count


def _packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | PackedStep | None,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Per-stream causal attention over each stream's own cache; plain SDPA for ordinary calls.

    The query heads that share a key/value head are folded into one head with more query rows
    (``[1, kv_heads, group * count, dim]``), so each stream's cache is streamed once per
    key/value head instead of once per query head (SDPA's own ``enable_gqa`` path): reading the
    cache is what a decode step over a long context is bound by.
    """
    if not isinstance(attention_mask, PackedStep):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    layer = module.layer_idx
    batch, heads, _, dim = query.shape
    outputs = []
    for seg in attention_mask.segments:
        total = seg.past + seg.count
        keys, values = seg.store.keys[layer][:, :, :total], seg.store.values[layer][:, :, :total]
        grouped = query[:, :, seg.offset : seg.offset + seg.count].reshape(batch, keys.shape[1], -1, dim)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=seg.mask, scale=scaling)
        outputs.append(out.reshape(batch, heads, seg.count, dim))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


@torch.inference_mode()
def packed_forward(model: Qwen3ForGuardModel, stores: Sequence[KVStore], ids: Sequence[Sequence[int]]) -> GuardLogits:
    """One forward over the new ``ids`` of each stream (in order), appending to their stores.

    Returns logits ``[1, sum(len(ids)), classes]`` in the same packed order.
    """
    counts = [len(x) for x in ids]
    config = model.config
    step, positions = PackedStep.build(stores, counts, config.num_attention_heads // config.num_key_value_heads)
    flat = torch.tensor([t for x in ids for t in x], dtype=torch.long, device=positions.device).unsqueeze(0)
    logits = model(flat, attention_mask={"full_attention": step}, position_ids=positions, cache=step, use_cache=True)
    step.commit()
    return logits
