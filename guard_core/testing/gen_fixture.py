"""A tiny Qwen3Guard-Gen checkpoint that answers ``GEN_CASES`` exactly.

A two-layer Qwen3 with the real vocabulary is trained for a few seconds on the real moderation
prompts of ``GEN_CASES`` until greedy decoding reproduces every expected answer; the result is
saved with ``save_pretrained`` like a released checkpoint, so tests exercise ``from_pretrained``,
the one-pass scorer, ``generate()`` and the parser for real.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from ..gen_template import render_pieces
from ..messages import normalize_messages
from ..tokenization import IM_END, TextTokenizer
from .cache import cached_directory
from .cases import GEN_CASES, GenCase
from .tokenizer import GEN_CHAT_TEMPLATE, QWEN3_VOCAB_SIZE, build_qwen3_tokenizer

GEN_FIXTURE_VERSION = "gen-v1"


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


def _training_batch(tokens: TextTokenizer, cases: tuple[GenCase, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    end = tokens.special_id(IM_END)
    seqs, answer_starts = [], []
    for case in cases:
        prompt = tokens.encode_pieces(render_pieces(normalize_messages(case.as_messages)))
        answer = tokens.encode_text(case.output) + [end]
        seqs.append(prompt + answer)
        answer_starts.append(len(prompt))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), 151643, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, (seq, start) in enumerate(zip(seqs, answer_starts)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, start : len(seq)] = torch.tensor(seq[start:])
    return ids, mask, labels


def train_gen_model(cases: tuple[GenCase, ...] = GEN_CASES, *, seed: int = 0, max_steps: int = 1000) -> Qwen3ForCausalLM:
    """Train the tiny model until teacher-forced greedy decoding gives every answer with a margin.

    The softmax during training runs over the tokens that occur in the data only, which makes a
    step ~10x cheaper than over 151,936 entries; the stopping test uses the full vocabulary, so
    the saved model answers correctly under ordinary greedy ``generate()``.
    """
    tokens = TextTokenizer(build_qwen3_tokenizer(GEN_CHAT_TEMPLATE))
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_qwen3_config())
    ids, mask, labels = _training_batch(tokens, cases)
    targets = labels[:, 1:]
    keep = targets != -100
    used = torch.unique(ids)
    position_in_used = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    position_in_used[used] = torch.arange(len(used))
    answer = targets[keep]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for step in range(max_steps):
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][keep]
        loss = torch.nn.functional.cross_entropy(hidden @ model.lm_head.weight[used].T, position_in_used[answer])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0 and _greedy_margin(model, hidden.detach(), answer) > _REQUIRED_MARGIN:
            break
    else:
        raise RuntimeError(f"the Gen fixture did not converge in {max_steps} steps")
    model.eval()
    return model


_REQUIRED_MARGIN = 3.0


@torch.no_grad()
def _greedy_margin(model: Qwen3ForCausalLM, hidden: torch.Tensor, answer: torch.Tensor) -> float:
    """Smallest gap between the right token's logit and the best other one (negative: wrong)."""
    logits = model.lm_head(hidden)
    right = logits.gather(1, answer[:, None])[:, 0]
    logits.scatter_(1, answer[:, None], float("-inf"))
    return (right - logits.max(dim=-1).values).min().item()


def _build(directory: Path) -> None:
    train_gen_model().save_pretrained(directory)
    build_qwen3_tokenizer(GEN_CHAT_TEMPLATE).save_pretrained(directory)


def gen_checkpoint() -> Path:
    """Directory of the trained tiny Gen checkpoint (built once, then cached on disk)."""
    return cached_directory(GEN_FIXTURE_VERSION, _build)
