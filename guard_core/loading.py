"""Finding model files and choosing where to run them.

Users pass a hub id (``Qwen/Qwen3Guard-Gen-0.6B``) or a local directory. When the hub cannot be
reached the user gets one ``GuardUnavailableError`` that names the model and says how to use a
local copy, instead of a pile of retries and a traceback from deep inside huggingface_hub.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .types import GuardUnavailableError

logger = logging.getLogger("guard_core")

_REQUIRED_FILES = ("config.json", "tokenizer.json")


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
        raise GuardUnavailableError(f"model directory {text!r} does not exist (and it is not a hub id like 'Qwen/Qwen3Guard-Gen-0.6B')")
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
        raise GuardUnavailableError(
            f"could not get {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            f"Download it where the hub is reachable (`hf download {repo_id} --local-dir ./{repo_id.split('/')[-1]}`), "
            f"copy that directory here and pass its path instead of the id, e.g. from_pretrained('./{repo_id.split('/')[-1]}')."
        ) from None


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else CUDA, then Apple MPS, then CPU."""
    if device is not None:
        return torch.device(device)
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
