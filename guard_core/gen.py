"""Qwen3Guard-Gen run locally with transformers.

Scoring takes one forward pass per conversation: the moderation prompt plus the forced answer
prefix ``Safety:``; the logits at the next position give P(Safe / Controversial / Unsafe)
directly, which both feeds policy thresholds and is the greedy label. In response mode the same
pass also carries the answer most responses get, ``Safe / Categories: None / Refusal: No``, as a
draft: greedy decoding is read off the draft's logits for as long as the model agrees with it
(speculative decoding checked against the model itself), so a safe response, refusal or not,
needs no decoding step at all. Only when more is needed (categories of a non-safe verdict, an
answer that leaves the draft early) does decoding continue, from the same KV cache, and only
until that line is complete. If the model would not have written ``Safety:`` first, or its best
next token is not a label, the conversation falls back to plain greedy ``generate()`` so the
verdict always equals what upstream's loop would produce.

Every prompt of a mode starts with the same ~200-270 tokens of instructions. Their keys and
values are computed once per loaded model and mode and copied into each call's cache, so a call
computes only the conversation and the closing instructions. A batch puts the shared prefix at
positions ``0..P-1`` of every row and left-pads the rest behind it (``prefix | pads | rest``), so
the prefix's keys are the same for every row and positions come from the attention mask as
before. Caching is exact only where the prompt's ids start with the prefix's own ids; that is
checked on probe conversations when the guard is built and again for every conversation, and a
mode whose seam differs is computed in full (one warning in the log).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation import StoppingCriteria, StoppingCriteriaList

from .gen_parser import REFUSAL_PATTERN, parse_answer
from .gen_template import ANSWER_PREFIX, SAFE_RESPONSE_ANSWER, instruction_pieces, render_pieces
from .batcher import Coalescer
from .config import check_count
from .loading import inspect_checkpoint, model_name, pick_device, pick_dtype, require_complete_weights, resolve_model_source
from .messages import Message, MessageLike, normalize_batch, normalize_messages
from .remote_gen import RemoteGenGuard
from .tokenization import ENDOFTEXT, IM_END, TextTokenizer, join_pieces, load_tokenizer
from .types import RiskLevel, Verdict
from .windows import plan_windows, worst_verdict

logger = logging.getLogger("guard_core.gen")

DEFAULT_GEN_MODEL = "Qwen/Qwen3Guard-Gen-0.6B"
_LABELS = (RiskLevel.SAFE, RiskLevel.CONTROVERSIAL, RiskLevel.UNSAFE)
_TEMPLATE_PROBES = (
    [{"role": "user", "content": "Probe question?"}],
    [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
)
#: Conversations of every shape the instruction prefix can be followed by: both modes, user or
#: assistant first, a leading system message.
_SEAM_PROBES = (
    [{"role": "user", "content": "Probe question?"}],
    [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Q1"}],
    [{"role": "assistant", "content": "A0"}, {"role": "user", "content": "Q1"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
    [{"role": "assistant", "content": "A1"}],
)


@dataclass(eq=False)
class _Prefix:
    """The fixed instructions of one mode: their ids, and their keys/values once computed.

    The keys/values are computed on first use, under the guard's lock, and never written to
    afterwards: every call copies them into a cache of its own.
    """

    ids: list[int]
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()


@dataclass
class _Job:
    """One conversation (or one window of a long one) on its way through the model."""

    ids: list[int]
    response: bool
    prefix: _Prefix | None = None
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
    ``prefix_cache=False`` computes every prompt in full (the reference the cache is tested and
    benchmarked against).
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
        prefix_cache: bool = True,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokens = TextTokenizer(tokenizer)
        self.model_id = model_id or model_name(getattr(model.config, "_name_or_path", "") or "qwen3guard-gen")
        self.max_new_tokens = check_count(max_new_tokens, "max_new_tokens")
        self.batch_size = check_count(batch_size, "batch_size")
        context = int(getattr(model.config, "max_position_embeddings", 32768))
        if max_input_tokens is not None:
            check_count(max_input_tokens, "max_input_tokens", minimum=max_new_tokens + 1)
        self.max_input_tokens = min(max_input_tokens or context, context) - max_new_tokens
        self.window_overlap_tokens = check_count(window_overlap_tokens, "window_overlap_tokens", minimum=0)
        self._lock = threading.Lock()
        self._coalescer: Coalescer[list[Message], Verdict] = Coalescer(lambda batch: self.moderate_batch(batch), max_batch=4 * batch_size)
        self._answer_ids = self.tokens.encode_text(ANSWER_PREFIX)
        self._label_ids = [self.tokens.encode_text(f"{ANSWER_PREFIX} {label.value}")[len(self._answer_ids)] for label in _LABELS]
        if len(set(self._label_ids)) != len(_LABELS):
            raise ValueError("the tokenizer does not give the three safety labels distinct first tokens")
        self._stop_ids = [self.tokens.special_id(IM_END), self.tokens.special_id(ENDOFTEXT)]
        self._response_draft = self._draft(SAFE_RESPONSE_ANSWER)
        self._pad_id = self._stop_ids[1]
        self._prefixes: dict[bool, _Prefix] = self._cacheable_prefixes() if prefix_cache else {}
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
        CPU. Other keyword arguments go to ``GenGuard``'s constructor. A directory that is not a
        complete Qwen3Guard-Gen checkpoint raises ``GuardUnavailableError`` (see ``loading``).
        """
        path = resolve_model_source(model_id_or_path)
        inspect_checkpoint(path).require("gen")
        target = pick_device(device)
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(target, dtype), output_loading_info=True,
                                                           ignore_mismatched_sizes=True)
        require_complete_weights(path, "gen", info)
        model = model.to(target)
        tokenizer = load_tokenizer(path)
        logger.info("loaded %s on %s (%s)", model_id_or_path, target, model.dtype)
        return cls(model, tokenizer, model_id=model_name(model_id_or_path), **kwargs)

    def render_prompt(self, messages: Iterable[MessageLike]) -> str:
        """The exact moderation prompt upstream's chat template builds for these messages."""
        return join_pieces(render_pieces(normalize_messages(messages)))

    def moderate(self, messages: Iterable[MessageLike]) -> Verdict:
        """Moderate one conversation: a prompt if the last turn is the user's, else the response.

        Calls made at the same time from several threads (a server's requests) are joined into one
        batch (``batcher.Coalescer``): an idle guard answers at once, a busy one serves everyone
        waiting with one batched forward instead of one forward each.
        """
        return self._coalescer(normalize_messages(messages))

    def moderate_batch(self, conversations: Iterable[Iterable[MessageLike]]) -> list[Verdict]:
        """Moderate many conversations, batched with padding; results keep the input order."""
        normalized = normalize_batch(conversations)
        started = time.perf_counter()
        plans = [plan_windows(m, self.tokens, self.max_input_tokens, self.window_overlap_tokens) for m in normalized]
        jobs = [self._job(window) for plan in plans for window in plan]
        with self._lock, torch.inference_mode():
            for batch in self._batches(jobs):
                self._run(batch)
        elapsed = time.perf_counter() - started
        verdicts, cursor = [], 0
        for plan in plans:
            window_verdicts = [self._verdict(job, elapsed / max(len(jobs), 1)) for job in jobs[cursor : cursor + len(plan)]]
            cursor += len(plan)
            verdicts.append(worst_verdict(window_verdicts))
        return verdicts

    async def amoderate(self, messages: Iterable[MessageLike]) -> Verdict:
        """Async ``moderate``; the model runs in a worker thread."""
        return await asyncio.to_thread(self.moderate, normalize_messages(messages))

    async def amoderate_batch(self, conversations: Iterable[Iterable[MessageLike]]) -> list[Verdict]:
        """Async ``moderate_batch``; the model runs in a worker thread."""
        return await asyncio.to_thread(self.moderate_batch, normalize_batch(conversations))

    def _verdict(self, job: _Job, elapsed: float) -> Verdict:
        parsed = parse_answer(job.answer, response=job.response)
        role = "response" if job.response else "prompt"
        if not parsed.ok:
            return Verdict(RiskLevel.UNSAFE, role=role, model=self.model_id, elapsed_s=elapsed, raw_output=job.answer,
                           error=f"unparseable model output {job.answer[:80]!r}", error_kind="unparseable")
        return Verdict(parsed.risk, parsed.categories, parsed.refusal, job.probabilities or {}, role, self.model_id,
                       elapsed, job.answer)

    def _job(self, messages: list[Message]) -> _Job:
        """The prompt ids of one conversation, and the cached prefix they start with (if any)."""
        response = messages[-1].role == "assistant"
        ids = self.tokens.encode_pieces(render_pieces(messages))
        prefix = self._prefixes.get(response)
        if prefix is not None and ids[: len(prefix.ids)] != prefix.ids:
            if self._prefixes.pop(response, None) is not None:
                logger.warning("prefix cache off for %s mode of %s: a conversation changed the tokens at the end of the "
                               "fixed instructions; every verdict of that mode computes the whole prompt",
                               "response" if response else "prompt", self.model_id)
            prefix = None
        return _Job(ids, response, prefix)

    def _batches(self, jobs: list[_Job]) -> Iterator[list[_Job]]:
        """Jobs of one mode that share a prefix (or have none), shortest first and ``batch_size`` at a time, so rows pad least."""
        groups: dict[tuple[_Prefix | None, bool], list[_Job]] = {}
        for job in jobs:
            groups.setdefault((job.prefix, job.response), []).append(job)
        for group in groups.values():
            group.sort(key=lambda j: len(j.ids))
            for start in range(0, len(group), self.batch_size):
                yield group[start : start + self.batch_size]

    def _batch_tensors(self, head: list[int], rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and attention mask laid out ``head | pads | row``: the shared head at the same positions in every row."""
        width = len(head) + max(map(len, rows))
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        ids[:, : len(head)] = torch.tensor(head, dtype=torch.long)
        mask[:, : len(head)] = 1
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        return ids.to(self.model.device), mask.to(self.model.device)

    def _prefix_cache(self, prefix: _Prefix, batch: int) -> DynamicCache:
        """A new cache holding the prefix's keys/values for ``batch`` rows (computed on first use)."""
        if not prefix.kv or prefix.kv[0][0].device != self.model.device or prefix.kv[0][0].dtype != self.model.dtype:
            out = self.model(input_ids=torch.tensor([prefix.ids], device=self.model.device), use_cache=True, logits_to_keep=1)
            prefix.kv = tuple((layer.keys, layer.values) for layer in out.cache.layers)
        rows = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in prefix.kv]
        return DynamicCache(rows, config=self.model.config)

    def _run(self, jobs: list[_Job]) -> None:
        """Score a padded batch in one pass, then finish only the answers that need more lines.

        All jobs share one mode and one prefix (or none): its keys/values come from the cache and
        only the rest of each prompt, plus the forced ``Safety:`` (and in response mode the draft),
        goes through the model.
        """
        prefix, answer = jobs[0].prefix, self._answer_ids
        draft = self._response_draft if jobs[0].response else []
        head = prefix.ids if prefix else []
        ids, mask = self._batch_tensors(head, [job.ids[len(head) :] + answer + draft for job in jobs])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._prefix_cache(prefix, len(jobs)) if prefix else None
        out = self.model(input_ids=ids[:, len(head) :], attention_mask=mask, position_ids=positions[:, len(head) :],
                         cache=cache, use_cache=True, logits_to_keep=len(answer) + len(draft) + 1)
        logits = out.logits.float()
        greedy = logits.argmax(-1)
        first_label_ids = torch.tensor(self._label_ids, device=logits.device)
        label_probs = torch.softmax(logits[:, len(answer), first_label_ids], dim=-1)
        prefix_ok = (greedy[:, : len(answer)] == torch.tensor(answer, device=greedy.device)).all(-1)
        continue_rows, fallback_rows = [], []
        firsts = greedy[:, len(answer)].tolist()
        for row, job in enumerate(jobs):
            best = firsts[row]
            if not prefix_ok[row] or best not in self._label_ids:
                fallback_rows.append(row)
                continue
            label = _LABELS[self._label_ids.index(best)]
            job.probabilities = {lvl: float(p) for lvl, p in zip(_LABELS, label_probs[row].tolist())}
            job.answer = f"{ANSWER_PREFIX} {label.value}"
            if draft and self._finish_from_draft(job, greedy[row, len(answer) :].tolist(), draft):
                continue
            if job.response or label is not RiskLevel.SAFE:
                continue_rows.append(row)
        if continue_rows:
            out.cache.crop(-len(draft))
            width = ids.shape[1] - len(draft)
            self._continue(jobs, continue_rows, firsts, out.cache, ids[:, :width], mask[:, :width])
        for row in fallback_rows:
            self._generate_plain(jobs[row])

    def _finish_from_draft(self, job: _Job, predicted: list[int], draft: list[int]) -> bool:
        """Complete ``job``'s answer from the draft pass if greedy decoding ends inside what it shows.

        ``predicted[i]`` is the model's greedy token after ``draft[:i]``: while its picks equal the
        draft, the next pick is known too, so the tokens greedy decoding writes are read off until
        the first disagreement (that token included). The answer is taken only if it is complete
        by then, by the same stop rules as ``_continue`` (an end token, the last needed line, or
        ``max_new_tokens`` after the label's first token).
        """
        written: list[int] = []
        for i, token in enumerate(predicted):
            if token in self._stop_ids:
                break
            written.append(token)
            after_label = self.tokenizer.decode(written[1:], skip_special_tokens=True)
            if len(written) > self.max_new_tokens or _answer_complete(after_label, job.response):
                break
            if i == len(draft) or token != draft[i]:
                return False
        job.answer = ANSWER_PREFIX + self.tokenizer.decode(written, skip_special_tokens=True)
        return True

    def _draft(self, answer: str) -> list[int]:
        """The ids ``answer`` adds after the forced ``Safety:``, or none where its tokens would not join there."""
        ids = self.tokens.encode_text(answer)
        if ids[: len(self._answer_ids)] != self._answer_ids or ids[len(self._answer_ids)] not in self._label_ids:
            return []
        return ids[len(self._answer_ids) :]

    def _continue(self, jobs: list[_Job], rows: list[int], firsts: list[int], cache: Any, ids: torch.Tensor,
                  mask: torch.Tensor) -> None:
        """Greedy-decode the rest of the answer after the label token, reusing the prompt's KV cache.

        Only each row's greedy first token is appended (labels differ in length: `` Cont`` +
        ``rovers`` + ``ial``); the model writes the rest itself, exactly as plain greedy decoding
        would. Rows not in ``rows`` ride along in the batch and are left as they are.
        """
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

    def _generate_plain(self, job: _Job) -> None:
        """Upstream's path (greedy ``generate()`` from the prompt), for answers the fast path cannot read."""
        ids, mask = self._batch_tensors([], [job.ids])
        generated = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                        do_sample=False, eos_token_id=self._stop_ids, pad_token_id=self._pad_id)
        job.answer = self.tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
        job.probabilities = None

    def _cacheable_prefixes(self) -> dict[bool, _Prefix]:
        """Each mode's instruction prefix, where its ids alone equal the start of a whole prompt's ids.

        That holds when the cut between instructions and conversation is a token boundary for this
        tokenizer; it is checked on probe conversations of every shape. A mode where it does not
        hold is not cached (one warning), which keeps verdicts exact at the cost of speed.
        """
        prefixes: dict[bool, _Prefix] = {}
        for response in (False, True):
            prefix = _Prefix(self.tokens.encode_pieces(instruction_pieces(response)))
            probes = [normalize_messages(p) for p in _SEAM_PROBES if (p[-1]["role"] == "assistant") == response]
            if all(self.tokens.encode_pieces(render_pieces(p))[: len(prefix.ids)] == prefix.ids for p in probes):
                prefixes[response] = prefix
            else:
                logger.warning("prefix cache off for %s mode of %s: the fixed instructions tokenize differently alone "
                               "than at the start of a prompt; every verdict of that mode computes the whole prompt",
                               "response" if response else "prompt", self.model_id)
        return prefixes

    def _check_chat_template(self) -> None:
        """Warn when the checkpoint's own chat template renders a different moderation prompt."""
        if not getattr(self.tokenizer, "chat_template", None):
            return
        for probe in _TEMPLATE_PROBES:
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
