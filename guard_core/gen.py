"""Qwen3Guard-Gen run locally with transformers.

Scoring takes one forward pass per conversation: the moderation prompt plus the forced answer
prefix ``Safety:``; the logits at the next position give P(Safe / Controversial / Unsafe)
directly, which both feeds policy thresholds and is the greedy label. Only when more is needed
(categories of a non-safe verdict, the refusal line in response mode) does decoding continue,
from the same KV cache, and only until that line is complete. If the model would not have
written ``Safety:`` first, or its best next token is not a label, the conversation falls back to
plain greedy ``generate()`` so the verdict always equals what upstream's loop would produce.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation import StoppingCriteria, StoppingCriteriaList

from .gen_parser import REFUSAL_PATTERN, parse_answer
from .gen_template import ANSWER_PREFIX, render_pieces
from .loading import pick_device, pick_dtype, resolve_model_source
from .messages import MessageLike, normalize_messages
from .remote_gen import RemoteGenGuard
from .tokenization import ENDOFTEXT, IM_END, TextTokenizer, join_pieces
from .types import RiskLevel, Verdict
from .windows import plan_windows, worst_verdict

logger = logging.getLogger("guard_core.gen")

DEFAULT_GEN_MODEL = "Qwen/Qwen3Guard-Gen-0.6B"
_LABELS = (RiskLevel.SAFE, RiskLevel.CONTROVERSIAL, RiskLevel.UNSAFE)
_PROBE = (
    [{"role": "user", "content": "Probe question?"}],
    [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
)


@dataclass
class _Job:
    """One conversation (or one window of a long one) on its way through the model."""

    ids: list[int]
    response: bool
    answer: str = ""
    probabilities: dict[RiskLevel, float] | None = None


class _AnswerComplete(StoppingCriteria):
    """Stops each row once its last needed line is written (Categories, or Refusal in response mode)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, start: int, response: Sequence[bool]) -> None:
        self.tokenizer, self.start, self.response = tokenizer, start, list(response)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = []
        for row, response in zip(input_ids, self.response):
            text = self.tokenizer.decode(row[self.start :], skip_special_tokens=True)
            done.append(_answer_complete(text, response))
        return torch.tensor(done, device=input_ids.device)


def _answer_complete(continuation: str, response: bool) -> bool:
    if response:
        return REFUSAL_PATTERN.search(continuation) is not None
    _, found, after = continuation.partition("Categories:")
    return bool(found) and "\n" in after


class GenGuard:
    """Moderates prompts and responses with a Qwen3Guard-Gen causal LM.

    Thread-safe (one model call at a time, guarded by a lock); the async methods run the model in
    a worker thread so they never block the event loop. Conversations longer than the context are
    moderated in overlapping windows; the worst window's verdict wins (see ``windows``).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model_id: str = "",
        max_new_tokens: int = 64,
        batch_size: int = 8,
        max_input_tokens: int | None = None,
        window_overlap_tokens: int = 64,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokens = TextTokenizer(tokenizer)
        self.model_id = model_id or getattr(model.config, "_name_or_path", "") or "qwen3guard-gen"
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        context = int(getattr(model.config, "max_position_embeddings", 32768))
        self.max_input_tokens = min(max_input_tokens or context, context) - max_new_tokens
        self.window_overlap_tokens = window_overlap_tokens
        self._lock = threading.Lock()
        self._prefix = self.tokens.encode_text(ANSWER_PREFIX)
        self._label_ids = [self.tokens.encode_text(f"{ANSWER_PREFIX} {label.value}")[len(self._prefix)] for label in _LABELS]
        if len(set(self._label_ids)) != len(_LABELS):
            raise ValueError("the tokenizer does not give the three safety labels distinct first tokens")
        self._stop_ids = [self.tokens.special_id(IM_END), self.tokens.special_id(ENDOFTEXT)]
        self._pad_id = self._stop_ids[1]
        self._check_chat_template()

    from_server = staticmethod(RemoteGenGuard.from_server)

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str = DEFAULT_GEN_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> GenGuard:
        """Load a Gen checkpoint from the hub id (default ``Qwen/Qwen3Guard-Gen-0.6B``) or a local directory.

        ``device`` defaults to CUDA, then MPS, then CPU; ``dtype`` to bfloat16 on GPU and float32 on
        CPU. Other keyword arguments go to ``GenGuard``'s constructor.
        """
        path = resolve_model_source(model_id_or_path)
        target = pick_device(device)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(target, dtype)).to(target)
        tokenizer = AutoTokenizer.from_pretrained(path)
        logger.info("loaded %s on %s (%s)", model_id_or_path, target, model.dtype)
        return cls(model, tokenizer, model_id=str(model_id_or_path), **kwargs)

    def render_prompt(self, messages: Iterable[MessageLike]) -> str:
        """The exact moderation prompt upstream's chat template builds for these messages."""
        return join_pieces(render_pieces(normalize_messages(messages)))

    def moderate(self, messages: Iterable[MessageLike]) -> Verdict:
        """Moderate one conversation: a prompt if the last turn is the user's, else the response."""
        return self.moderate_batch([messages])[0]

    def moderate_batch(self, conversations: Iterable[Iterable[MessageLike]]) -> list[Verdict]:
        """Moderate many conversations, batched with padding; results keep the input order."""
        normalized = [normalize_messages(c) for c in conversations]
        started = time.perf_counter()
        plans = [plan_windows(m, self.tokens, self.max_input_tokens, self.window_overlap_tokens) for m in normalized]
        jobs = [_Job(self.tokens.encode_pieces(render_pieces(w)), w[-1].role == "assistant") for plan in plans for w in plan]
        with self._lock, torch.inference_mode():
            for start in range(0, len(jobs), self.batch_size):
                self._run(sorted(jobs[start : start + self.batch_size], key=lambda j: len(j.ids)))
        elapsed = time.perf_counter() - started
        verdicts, cursor = [], 0
        for plan in plans:
            window_verdicts = [self._verdict(job, elapsed / max(len(jobs), 1)) for job in jobs[cursor : cursor + len(plan)]]
            cursor += len(plan)
            verdicts.append(worst_verdict(window_verdicts))
        return verdicts

    async def amoderate(self, messages: Iterable[MessageLike]) -> Verdict:
        """Async ``moderate``; the model runs in a worker thread."""
        return await asyncio.to_thread(self.moderate, list(messages))

    async def amoderate_batch(self, conversations: Iterable[Iterable[MessageLike]]) -> list[Verdict]:
        """Async ``moderate_batch``; the model runs in a worker thread."""
        return await asyncio.to_thread(self.moderate_batch, [list(c) for c in conversations])

    def _verdict(self, job: _Job, elapsed: float) -> Verdict:
        parsed = parse_answer(job.answer, response=job.response)
        role = "response" if job.response else "prompt"
        if not parsed.ok:
            return Verdict(RiskLevel.UNSAFE, role=role, model=self.model_id, elapsed_s=elapsed, raw_output=job.answer,
                           error=f"unparseable model output {job.answer[:80]!r}")
        return Verdict(parsed.risk, parsed.categories, parsed.refusal, job.probabilities or {}, role, self.model_id,
                       elapsed, job.answer)

    def _batch_tensors(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        return ids.to(self.model.device), mask.to(self.model.device)

    def _run(self, jobs: list[_Job]) -> None:
        """Score a padded batch in one pass, then finish only the answers that need more lines."""
        prefix = self._prefix
        ids, mask = self._batch_tensors([job.ids + prefix for job in jobs])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=len(prefix) + 1)
        logits = out.logits.float()
        greedy = logits.argmax(-1)
        first_label_ids = torch.tensor(self._label_ids, device=logits.device)
        label_probs = torch.softmax(logits[:, -1, first_label_ids], dim=-1)
        prefix_ok = (greedy[:, :-1] == torch.tensor(prefix, device=greedy.device)).all(-1)
        continue_rows, fallback_rows = [], []
        for row, job in enumerate(jobs):
            best = int(greedy[row, -1])
            if not prefix_ok[row] or best not in first_label_ids.tolist():
                fallback_rows.append(row)
                continue
            label = _LABELS[first_label_ids.tolist().index(best)]
            job.probabilities = {lvl: float(p) for lvl, p in zip(_LABELS, label_probs[row].tolist())}
            job.answer = f"{ANSWER_PREFIX} {label.value}"
            if job.response or label is not RiskLevel.SAFE:
                continue_rows.append(row)
        if continue_rows:
            self._continue(jobs, continue_rows, out.cache, ids, mask)
        for row in fallback_rows:
            self._generate_plain(jobs[row])

    def _continue(self, jobs: list[_Job], rows: list[int], cache: Any, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Greedy-decode the rest of the answer after the label token, reusing the prompt's KV cache.

        Only the label's first token is appended (labels differ in length: `` Cont`` + ``rovers``
        + ``ial``); the model writes the rest itself, exactly as plain greedy decoding would.
        """
        firsts = [self._label_ids[_LABELS.index(self._label_of(job))] for job in jobs]
        full_ids = torch.cat([ids, torch.tensor(firsts, device=ids.device)[:, None]], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        start = full_ids.shape[1]
        stop = StoppingCriteriaList([_AnswerComplete(self.tokenizer, start, [j.response for j in jobs])])
        generated = self.model.generate(
            input_ids=full_ids, attention_mask=full_mask, cache=cache, max_new_tokens=self.max_new_tokens,
            do_sample=False, eos_token_id=self._stop_ids, pad_token_id=self._pad_id, stopping_criteria=stop,
        )
        for r in rows:
            tail = self.tokenizer.decode([firsts[r], *generated[r, start:].tolist()], skip_special_tokens=True)
            jobs[r].answer = ANSWER_PREFIX + tail

    @staticmethod
    def _label_of(job: _Job) -> RiskLevel:
        return RiskLevel(job.answer.removeprefix(f"{ANSWER_PREFIX} ")) if job.answer else RiskLevel.SAFE

    def _generate_plain(self, job: _Job) -> None:
        """Upstream's path (greedy ``generate()`` from the prompt), for answers the fast path cannot read."""
        ids, mask = self._batch_tensors([job.ids])
        generated = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                        do_sample=False, eos_token_id=self._stop_ids, pad_token_id=self._pad_id)
        job.answer = self.tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
        job.probabilities = None

    def _check_chat_template(self) -> None:
        """Warn when the checkpoint's own chat template renders a different moderation prompt."""
        if not getattr(self.tokenizer, "chat_template", None):
            return
        for probe in _PROBE:
            try:
                theirs = self.tokenizer.apply_chat_template(probe, tokenize=False)
            except Exception as exc:  # a broken shipped template must not stop the guard from loading
                logger.warning("the chat template of %s could not render a probe conversation: %s", self.model_id, exc)
                return
            if theirs != self.render_prompt(probe):
                logger.warning(
                    "the chat template shipped with %s renders a different moderation prompt than upstream "
                    "Qwen3Guard-Gen; this guard uses the upstream prompt, so verdicts may not match the "
                    "checkpoint's training if it was fine-tuned with another template", self.model_id)
                return
