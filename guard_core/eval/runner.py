"""Running guards over evaluation sets: batched, with a progress bar, resumable.

Every finished batch is appended to ``predictions.jsonl`` in the output directory (one record
per item and engine, keyed by set name and a hash of the item's text and labels) and flushed to
disk before the next batch starts. A rerun with the same output directory skips every key
already there, so an interrupted evaluation of a large model loses at most one batch; a rerun
with a larger ``--limit`` reuses the items it shares with the earlier slice, and a row edited
in the source file is predicted afresh instead of being reported with its old verdict. The
directory remembers which model each engine ran, so results of two different models are never
mixed. A verdict the guard could not give (its server unreachable: ``error_kind ==
"unavailable"``) is no prediction: it is never stored, and the run stops with
``GuardUnavailableError``, so an outage is neither scored nor reused by the rerun.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

from ..backends import GenBackend
from ..debounce import Debounce
from ..types import GuardUnavailableError, RiskLevel, TokenVerdict
from .datasets import EvalItem, EvalSet

PREDICTIONS_FILE = "predictions.jsonl"
RUN_FILE = "run.json"


@runtime_checkable
class Engine(Protocol):
    """One guard under evaluation; ``predict`` returns one record fragment per item, in order."""

    name: str
    model_id: str

    def predict(self, items: Sequence[EvalItem]) -> list[dict[str, Any]]: ...


class GenEngine:
    """Evaluates a Gen backend: one ``moderate_batch`` call per batch of items."""

    name = "gen"

    def __init__(self, guard: GenBackend) -> None:
        if not callable(getattr(guard, "moderate_batch", None)):
            raise TypeError(f"{type(guard).__name__} has no moderate_batch(); pass a GenGuard or a remote Gen client")
        self.guard = guard
        self.model_id = str(getattr(guard, "model_id", "") or type(guard).__name__)

    def predict(self, items: Sequence[EvalItem]) -> list[dict[str, Any]]:
        verdicts = self.guard.moderate_batch([item.messages() for item in items])
        if len(verdicts) != len(items):
            raise RuntimeError(f"{self.model_id} returned {len(verdicts)} verdicts for {len(items)} conversations")
        return [{"verdict": v.to_dict()} for v in verdicts]


class StreamEngine:
    """Evaluates a ``StreamGuard``: prompts by the query heads, responses token by token.

    The items of a batch are judged concurrently (one thread each, mostly waiting), so the
    guard's scheduler packs their tokens into shared forward passes. For items with a labelled unsafe span the record also says
    where the response would have been stopped (see ``detection_offsets``).
    """

    name = "stream"

    def __init__(self, guard: Any) -> None:
        if not callable(getattr(guard, "session", None)):
            raise TypeError(f"{type(guard).__name__} is not a StreamGuard (no session())")
        self.guard = guard
        self.model_id = str(getattr(guard, "model_id", "") or type(guard).__name__)

    def predict(self, items: Sequence[EvalItem]) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(max_workers=len(items), thread_name_prefix="qwen3guard-eval") as pool:
            return list(pool.map(self._one, items))

    def _one(self, item: EvalItem) -> dict[str, Any]:
        with self.guard.session([{"role": "user", "content": item.prompt}]) as session:
            if item.response is None:
                return {"verdict": session.prompt_verdict.to_dict()}
            tokens = session.feed(item.response) + session.finish()
            record: dict[str, Any] = {"verdict": session.verdict.to_dict()}
            if item.span is not None:
                record["detection"] = detection_offsets(tokens, item.span, session.consecutive)
            return record


def detection_offsets(tokens: Sequence[TokenVerdict], span: tuple[int, int], consecutive: int) -> dict[str, int | None]:
    """Where the Stream debounce stops the response, relative to the labelled unsafe span.

    Replays the guard's own debounce over the tokens. Strict mode stops at the first token that
    flags the response; loose mode at the first that makes it Unsafe. The offset counts tokens
    as upstream's latency evaluation does: 0 when the stopping token overlaps the span, ``-n``
    when it is ``n`` tokens before the span's first token, ``+n`` when ``n`` tokens after its
    last one, None when the response is never stopped.
    """
    inside = [i for i, t in enumerate(tokens) if t.start < span[1] and t.end > span[0]]
    if not inside:
        raise ValueError(f"no response token overlaps the unsafe span {span}")
    first, last = inside[0], inside[-1]
    debounce = Debounce(consecutive)
    stops: dict[str, int | None] = {"strict": None, "loose": None}
    for i, token in enumerate(tokens):
        if not debounce.add(token):
            continue
        if stops["strict"] is None:
            stops["strict"] = i
        if debounce.risk is RiskLevel.UNSAFE:
            stops["loose"] = i
            break

    def offset(i: int | None) -> int | None:
        if i is None:
            return None
        return i - first if i < first else (i - last if i > last else 0)

    return {mode: offset(i) for mode, i in stops.items()}


class PredictionStore:
    """The append-only record of finished predictions in an output directory."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / PREDICTIONS_FILE
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            self._load()

    @staticmethod
    def key(engine: str, item: EvalItem) -> str:
        """Identity of one prediction."""
        return f"{engine}:{item.key}"

    def _load(self) -> None:
        """Read earlier records; a line cut off by an interruption is dropped and rewritten later."""
        data = self.path.read_bytes()
        keep = data[: data.rfind(b"\n") + 1]
        if len(keep) != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(len(keep))
        for number, line in enumerate(keep.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{self.path}:{number} is not valid JSON; delete the file or pass --fresh") from None
            if _unavailable(record) is None:  # an outage stored by an older version is judged again
                self.records[record["key"]] = record

    def get(self, engine: str, item: EvalItem) -> dict[str, Any] | None:
        """The stored record of ``engine`` on ``item``, if any."""
        return self.records.get(self.key(engine, item))

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Persist finished records before anything else happens."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for record in records:
            self.records[record["key"]] = record


def open_store(directory: str | os.PathLike[str], engines: Sequence[Engine], *, fresh: bool = False) -> PredictionStore:
    """The directory's store, after checking that earlier results came from the same models."""
    directory = Path(directory)
    run_file = directory / RUN_FILE
    if fresh:
        for name in (PREDICTIONS_FILE, RUN_FILE):
            (directory / name).unlink(missing_ok=True)
    models = json.loads(run_file.read_text(encoding="utf-8")).get("models", {}) if run_file.is_file() else {}
    for engine in engines:
        earlier = models.get(engine.name)
        if earlier is not None and earlier != engine.model_id:
            raise ValueError(
                f"{directory} holds {engine.name} results of {earlier!r}, not {engine.model_id!r}; "
                "use another --out directory, or --fresh to discard them"
            )
        models[engine.name] = engine.model_id
    directory.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"models": models}, indent=2) + "\n", encoding="utf-8")
    return PredictionStore(directory)


def run(
    sets: Sequence[EvalSet],
    engines: Sequence[Engine],
    store: PredictionStore,
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> None:
    """Predict every item not yet in ``store``, batch by batch; interrupting loses one batch at most.

    Raises ``GuardUnavailableError`` after the first batch with an item the guard could not judge,
    once that batch's real verdicts are stored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    from tqdm import tqdm

    todo = []
    for engine in engines:
        for s in sets:
            pending = {item.key: item for item in s.items if store.get(engine.name, item) is None}
            todo.append((engine, s, _by_length(list(pending.values()))))
    total = sum(len(items) for _, _, items in todo)
    with tqdm(total=total, unit="item", disable=not progress, dynamic_ncols=True) as bar:
        for engine, s, items in todo:
            bar.set_description(f"{engine.name} {s.name}")
            for start in range(0, len(items), batch_size):
                batch = items[start : start + batch_size]
                records = [_record(engine, item, fragment) for item, fragment in zip(batch, engine.predict(batch))]
                failed = [r for r in records if _unavailable(r) is not None]
                store.append([r for r in records if _unavailable(r) is None])
                bar.update(len(batch))
                if failed:
                    raise GuardUnavailableError(
                        f"{engine.name}: the guard could not judge {len(failed)} of {len(records)} items of a batch "
                        f"({_unavailable(failed[0])}); nothing was scored. Judged items are saved in "
                        f"{store.directory}: run the same command again once the guard is reachable"
                    )


def _by_length(items: list[EvalItem]) -> list[EvalItem]:
    """Similar lengths share a batch, so little compute goes to padding (keys keep results in place).

    Callers pass each key once: identical rows of a set share one prediction.
    """
    return sorted(items, key=lambda item: len(item.prompt) + len(item.response or ""))


def _unavailable(record: dict[str, Any]) -> str | None:
    """The error of a record whose verdict is an outage's fallback (``error_kind == "unavailable"``), else None."""
    verdict = record.get("verdict") or {}
    return (verdict.get("error") or "guard unavailable") if verdict.get("error_kind") == "unavailable" else None


def _record(engine: Engine, item: EvalItem, fragment: dict[str, Any]) -> dict[str, Any]:
    return {
        "key": PredictionStore.key(engine.name, item),
        "engine": engine.name,
        "model": engine.model_id,
        "dataset": item.dataset,
        "index": item.index,
        "level": item.level,
        "label_unsafe": item.unsafe,
        "label_refusal": item.refusal,
        **fragment,
    }
