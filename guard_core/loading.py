"""Finding model files, checking they hold the guard asked for, and choosing where to run them.

Users pass a hub id (``Qwen/Qwen3Guard-Gen-0.6B``) or a local directory. When the hub cannot be
reached the user gets one ``GuardUnavailableError`` that names the model and says how to use a
local copy, instead of a pile of retries and a traceback from deep inside huggingface_hub.

A directory that loads is not yet a guard: ``from_pretrained`` happily builds a random model
around missing weights, a BERT config or the other Qwen3Guard variant, and such a guard still
gives plausible verdicts. ``inspect_checkpoint`` and ``require_complete_weights`` turn each of
those into one ``GuardUnavailableError`` naming the directory and what it holds instead.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import torch
from safetensors import SafetensorError, safe_open

from .config import check_device
from .types import GuardUnavailableError

logger = logging.getLogger("guard_core")

_REQUIRED_FILES = ("config.json", "tokenizer.json")

GuardKind = Literal["gen", "stream"]
_KIND_NAMES: Mapping[GuardKind, str] = {"gen": "Qwen3Guard-Gen", "stream": "Qwen3Guard-Stream"}
_KIND_ARCHITECTURES: Mapping[GuardKind, str] = {"gen": "Qwen3ForCausalLM", "stream": "Qwen3ForGuardModel"}
_KIND_LOADERS: Mapping[GuardKind, str] = {
    "gen": "GenGuard.from_pretrained() (CLI: qwen3guard --model, proxy: --gen-model)",
    "stream": "StreamGuard.from_pretrained() (proxy: --stream-model)",
}
#: Config keys only Qwen3Guard-Stream configs have (its head sizes).
_STREAM_CONFIG_KEYS = ("guard_inner_size", "num_risk_level", "num_query_risk_level")


def _is_hub_id(source: str) -> bool:
    owner, _, name = source.partition("/")
    return bool(owner and name) and "/" not in name and not source.startswith((".", "~")) and "\\" not in source


def resolve_model_source(source: str | os.PathLike[str]) -> str:
    """A local directory holding the model files, downloading from the hub when needed.

    Raises ``GuardUnavailableError`` with instructions when neither works.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        missing = [f for f in _REQUIRED_FILES if not (path / f).is_file()]
        if missing:
            raise GuardUnavailableError(
                f"{path} is not a complete model directory: missing {', '.join(missing)}. "
                "Point at a directory written by save_pretrained() or downloaded with `hf download`."
            )
        return str(path)
    if not _is_hub_id(text):
        raise GuardUnavailableError(f"model directory {text!r} does not exist (and it is not a hub id: owner/name, like "
                                    "'Qwen/Qwen3Guard-Gen-0.6B' or 'Qwen/Qwen3Guard-Stream-0.6B')")
    return _download(text)


def _download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10)
    except Exception as exc:
        reason = (str(exc).splitlines() or [""])[0]
        reason = reason if len(reason) <= 300 else reason[:300] + "..."  # the hub says why in a sentence or two
        name = repo_id.split("/")[-1]
        raise GuardUnavailableError(
            f"could not get {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {reason}). "
            f"Download it where the hub is reachable (`hf download {repo_id} --local-dir ./{name}`), "
            f"copy that directory here and pass its path where you passed the id: from_pretrained('./{name}') "
            f"in Python, --model ./{name} for qwen3guard, --gen-model or --stream-model ./{name} for qwen3guard-proxy."
        ) from None


@dataclass(frozen=True)
class Checkpoint:
    """What a model directory holds, read from its ``config.json`` without building the model."""

    directory: Path
    architectures: tuple[str, ...]
    model_type: str
    has_stream_heads: bool

    @property
    def kind(self) -> GuardKind | None:
        """``"stream"`` or ``"gen"`` when the config is one of the two Qwen3Guard variants, else None."""
        if self.has_stream_heads or _KIND_ARCHITECTURES["stream"] in self.architectures:
            return "stream"
        if self.model_type == "qwen3" and (not self.architectures or _KIND_ARCHITECTURES["gen"] in self.architectures):
            return "gen"
        return None

    def describe(self) -> str:
        """What the directory holds, in words, for error messages."""
        if self.kind is not None:
            return f"a {_KIND_NAMES[self.kind]} checkpoint ({_KIND_ARCHITECTURES[self.kind]})"
        name = self.architectures[0] if self.architectures else "model"
        return f"a {name} checkpoint (model_type {self.model_type!r})"

    def require(self, kind: GuardKind) -> None:
        """Raise ``GuardUnavailableError`` unless this is a checkpoint of ``kind``."""
        found = self.kind
        if found == kind:
            return
        advice = f"load it with {_KIND_LOADERS[found]}" if found else f"point at a {_KIND_NAMES[kind]} model directory"
        raise GuardUnavailableError(f"{self.directory} is {self.describe()}, not a {_KIND_NAMES[kind]} checkpoint; {advice}.")


def inspect_checkpoint(directory: str | os.PathLike[str]) -> Checkpoint:
    """Read a model directory's config and check its weight files; ``GuardUnavailableError`` when unreadable."""
    path = Path(directory)
    config = _read_json(path / "config.json")
    for file in _weight_files(path):
        _check_safetensors(file)
    architectures = config.get("architectures") or ()
    return Checkpoint(
        directory=path,
        architectures=tuple(str(a) for a in architectures),
        model_type=str(config.get("model_type", "")),
        has_stream_heads=any(key in config for key in _STREAM_CONFIG_KEYS),
    )


def require_complete_weights(directory: str | os.PathLike[str], kind: GuardKind, loading_info: Mapping[str, Any], *,
                             ignore_unexpected: Iterable[str] = ()) -> None:
    """Raise ``GuardUnavailableError`` when ``from_pretrained`` left weights random or unused.

    ``loading_info`` is what ``from_pretrained(..., output_loading_info=True)`` returns; it knows
    which weights the architecture ties, so only real gaps count. A missing weight would be
    initialised at random with only a log line: for a guard that means plausible but meaningless
    verdicts. Unexpected names whose prefix is in ``ignore_unexpected`` are allowed.
    """
    skipped = tuple(ignore_unexpected)
    missing = sorted(loading_info.get("missing_keys", ()))
    unexpected = sorted(k for k in loading_info.get("unexpected_keys", ()) if not k.startswith(skipped))
    mismatched = sorted(str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in loading_info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:
        problems = [f"{label} {names[:8]}{' ...' if len(names) > 8 else ''}"
                    for label, names in (("missing weights", missing), ("unexpected weights", unexpected),
                                         ("wrong shapes", mismatched)) if names]
        raise GuardUnavailableError(
            f"{directory} does not hold the weights of a {_KIND_NAMES[kind]} model: {'; '.join(problems)}. "
            "Download the model again or point at the right directory."
        )


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GuardUnavailableError(f"{file} cannot be read as JSON ({type(exc).__name__}: {exc}); download the model again") from None
    if not isinstance(data, dict):
        raise GuardUnavailableError(f"{file} is not a JSON object; download the model again")
    return data


def _weight_files(directory: Path) -> list[Path]:
    """``model.safetensors``, or the shards a ``model.safetensors.index.json`` names."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise GuardUnavailableError(f"{index} has no weight_map; download the model again")
        files = [directory / name for name in sorted(set(map(str, weight_map.values())))]
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    else:
        raise GuardUnavailableError(f"{directory} has no model.safetensors (Qwen3Guard checkpoints ship their weights as safetensors)")
    for file in files:
        if not file.is_file():
            raise GuardUnavailableError(f"{file} is missing (named by {index.name}); download the model again")
    return files


def _check_safetensors(file: Path) -> None:
    """Read the file's header, which safetensors validates against the file's length."""
    try:
        with safe_open(str(file), framework="pt"):
            return
    except (SafetensorError, OSError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GuardUnavailableError(f"{file} is not a readable safetensors file ({detail}); download it again") from None


def model_name(source: str | os.PathLike[str]) -> str:
    """The name verdicts carry for a model: its hub id, or a local directory's own name.

    Verdicts travel to clients (the proxy's responses, adapters' metadata); a filesystem path of
    the server has no business there.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    return path.resolve().name if path.is_dir() else text


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device (checked to exist), else CUDA, then Apple MPS, then CPU."""
    if device is not None:
        target = torch.device(check_device(str(device)))
        mps = getattr(torch.backends, "mps", None)
        if (target.type == "cuda" and not torch.cuda.is_available()) or (target.type == "mps" and not (mps and mps.is_available())):
            raise GuardUnavailableError(
                f"device {str(device)!r} was asked for, but this torch {torch.__version__} has no {target.type.upper()} device "
                "here; install a torch build for it or use device 'cpu'")
        return target
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: torch.dtype | str | None = None) -> torch.dtype:
    """bfloat16 on accelerators; float32 on CPU, where bf16 matmuls are emulated and ~5x slower."""
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")
        return resolved
    if dtype is not None:
        return dtype
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "mps":
        return torch.float16
    return torch.float32
