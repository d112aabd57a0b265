"""A tiny Qwen3Guard-Gen checkpoint that answers ``TRAINED_CASES`` exactly.

A two-layer Qwen3 with the real 151,936-row vocabulary is trained on the real moderation prompts
of the cases until greedy decoding reproduces every expected answer (then ``<|im_end|>``) with a
margin; the result is saved with ``save_pretrained`` like a released checkpoint, so tests exercise
``from_pretrained``, the one-pass scorer, ``generate()`` and the parser for real.

Training takes seconds because a step touches only what the answers depend on:

- the embedding stays at its random initialisation except for a learned offset on each row the
  cases use (a few hundred of 151,936), so the tied output layer needs only those rows and the
  softmax during training runs over them alone;
- the instruction text before the conversation is identical for every case of a mode, so each
  step runs that shared prefix once per mode and the cases continue from its KV cache.

The stopping test is then repeated on the merged weights with an ordinary forward over whole
prompts and all 151,936 logits, which is what greedy ``generate()`` sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from ..gen_template import render_pieces
from ..messages import moderation_role, normalize_messages
from ..tokenization import IM_END, TextTokenizer
from .cache import cached_directory
from .cases import TRAINED_CASES, GenCase
from .progress import BuildProgress
from .tokenizer import GEN_CHAT_TEMPLATE, QWEN3_VOCAB_SIZE, build_qwen3_tokenizer

#: Bump when the trained checkpoint changes, so cached copies are rebuilt.
GEN_FIXTURE_VERSION = "gen-v2"
#: Smallest gap between the right next token's logit and any other's, at every answer position.
REQUIRED_MARGIN = 3.0
_NO_TARGET = -100


def tiny_qwen3_config(hidden: int = 64, layers: int = 2, max_positions: int = 4096) -> Qwen3Config:
    """A Qwen3 config of the real vocabulary and token ids, shrunk to train in seconds on a CPU."""
    return Qwen3Config(
        vocab_size=QWEN3_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=max_positions,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
    )


@dataclass(frozen=True)
class _Sequence:
    """One case as token ids: moderation prompt, then answer and ``<|im_end|>``."""

    ids: list[int]
    answer_start: int


@dataclass(frozen=True)
class _Group:
    """Cases of one moderation mode as rows of the used-token table.

    ``prefix`` (shared by all of them) runs once; ``suffix`` holds each case's remaining tokens,
    right-padded (causal attention keeps padding out of the real positions), and ``targets`` the
    row each position must predict, ``_NO_TARGET`` outside the answers.
    """

    prefix: torch.Tensor
    suffix: torch.Tensor
    targets: torch.Tensor


def _sequences(tokens: TextTokenizer, cases: tuple[GenCase, ...]) -> list[_Sequence]:
    end = tokens.special_id(IM_END)
    out = []
    for case in cases:
        prompt = tokens.encode_pieces(render_pieces(normalize_messages(case.as_messages)))
        out.append(_Sequence(prompt + tokens.encode_text(case.output) + [end], len(prompt)))
    return out


def _shared_prefix_length(sequences: list[_Sequence]) -> int:
    """Tokens all prompts start with, leaving each at least its last prompt token (it predicts the answer)."""
    length = min(s.answer_start for s in sequences) - 1
    first = sequences[0].ids
    for seq in sequences[1:]:
        length = next((i for i in range(length) if seq.ids[i] != first[i]), length)
    return length


def _groups(cases: tuple[GenCase, ...], sequences: list[_Sequence], row_of: dict[int, int]) -> list[_Group]:
    by_mode: dict[str, list[_Sequence]] = {}
    for case, seq in zip(cases, sequences):
        by_mode.setdefault(moderation_role(normalize_messages(case.as_messages)), []).append(seq)
    groups = []
    for members in by_mode.values():
        shared = _shared_prefix_length(members)
        width = max(len(s.ids) for s in members) - shared
        suffix = torch.zeros((len(members), width), dtype=torch.long)
        targets = torch.full((len(members), width), _NO_TARGET, dtype=torch.long)
        for row, seq in enumerate(members):
            rows = [row_of[t] for t in seq.ids]
            suffix[row, : len(rows) - shared] = torch.tensor(rows[shared:])
            first, last = seq.answer_start - 1 - shared, len(rows) - 1 - shared
            targets[row, first:last] = torch.tensor(rows[seq.answer_start :])
        groups.append(_Group(torch.tensor([row_of[t] for t in members[0].ids[:shared]]), suffix, targets))
    return groups


def _step(model: Qwen3ForCausalLM, table: torch.Tensor, groups: list[_Group]) -> tuple[torch.Tensor, float]:
    """Cross-entropy over the used rows, and the greedy margin, for every answer position."""
    logits, targets = [], []
    for group in groups:
        cache = DynamicCache(config=model.config)
        model.model(inputs_embeds=table[group.prefix][None], cache=cache, use_cache=True)
        cache.batch_repeat_interleave(len(group.suffix))
        hidden = model.model(inputs_embeds=table[group.suffix], cache=cache, use_cache=True).last_hidden_state
        keep = group.targets != _NO_TARGET
        logits.append(hidden[keep] @ table.T)
        targets.append(group.targets[keep])
    all_logits, all_targets = torch.cat(logits), torch.cat(targets)
    return torch.nn.functional.cross_entropy(all_logits, all_targets), _margin(all_logits.detach(), all_targets)


def _margin(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Smallest gap between the right token's logit and the best other one (negative: a wrong greedy token)."""
    right = logits.gather(1, targets[:, None])[:, 0]
    others = logits.scatter(1, targets[:, None], float("-inf"))
    return (right - others.max(dim=-1).values).min().item()


@torch.no_grad()
def _full_vocabulary_margin(model: Qwen3ForCausalLM, sequences: list[_Sequence]) -> float:
    """The greedy margin of ordinary forwards over whole prompts, against all 151,936 logits."""
    width = max(len(s.ids) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    keep = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq.ids)] = torch.tensor(seq.ids)
        keep[row, seq.answer_start - 1 : len(seq.ids) - 1] = True
    hidden = model.model(input_ids=ids).last_hidden_state[keep]
    return _margin(model.lm_head(hidden), ids[:, 1:][keep[:, :-1]])


def train_gen_model(
    tokenizer: PreTrainedTokenizerFast,
    cases: tuple[GenCase, ...] = TRAINED_CASES,
    *,
    seed: int = 0,
    max_steps: int = 1000,
    progress: BuildProgress | None = None,
) -> Qwen3ForCausalLM:
    """The tiny model, trained until greedy decoding gives every answer of ``cases`` with a margin.

    Raises ``RuntimeError`` if it does not converge within ``max_steps`` or if the full-vocabulary
    check fails. The global torch random state is left as it was.
    """
    tokens = TextTokenizer(tokenizer)
    sequences = _sequences(tokens, cases)
    used = sorted({t for seq in sequences for t in seq.ids})
    row_of = {token: row for row, token in enumerate(used)}
    groups = _groups(cases, sequences, row_of)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(tiny_qwen3_config())
    with _one_thread():
        _fit(model, used, groups, max_steps, progress)
        model.eval()
        full = _full_vocabulary_margin(model, sequences)
    if full <= REQUIRED_MARGIN:
        raise RuntimeError(f"the Gen fixture's margin over the full vocabulary is {full:.2f}, below {REQUIRED_MARGIN}")
    return model


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one intra-op thread meanwhile: the matrices are tiny, and on a loaded machine a
    team of threads waiting on each other makes every step many times slower (170 s against 10 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(model: Qwen3ForCausalLM, used: list[int], groups: list[_Group], max_steps: int,
         progress: BuildProgress | None) -> None:
    """Train the layers and the used rows' embedding offsets, then merge the offsets into the embedding."""
    embedding = model.model.embed_tokens.weight
    embedding.requires_grad_(False)
    base = embedding[used].clone()
    offsets = torch.zeros_like(base, requires_grad=True)
    trained = [offsets, *(p for p in model.parameters() if p.requires_grad)]
    optimizer = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.0)
    for step in range(max_steps):
        loss, margin = _step(model, base + offsets, groups)
        if margin > REQUIRED_MARGIN:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress.update(f"step {step}, loss {loss.item():.3f}")
    else:
        raise RuntimeError(f"the Gen fixture did not converge in {max_steps} steps")
    with torch.no_grad():
        embedding[used] = base + offsets
    embedding.requires_grad_(True)


def _build(directory: Path, progress: BuildProgress) -> None:
    tokenizer = build_qwen3_tokenizer(GEN_CHAT_TEMPLATE)
    train_gen_model(tokenizer, progress=progress).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def gen_checkpoint() -> Path:
    """Directory of the trained tiny Gen checkpoint (built once, then cached on disk)."""
    return cached_directory(GEN_FIXTURE_VERSION, _build, what="the Qwen3Guard-Gen test checkpoint")
