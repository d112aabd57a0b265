"""Where built test checkpoints are kept between runs.

Building a fixture costs seconds (training, tokenizer conversion); caching it on disk keyed by a
version string keeps test suites fast. Directories are built aside and renamed into place, so
parallel test processes never see a half-written checkpoint. A build that takes longer than a
few seconds reports its progress on stderr (``progress``); a cache hit prints nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .progress import BuildProgress

CACHE_ENV = "QWEN3GUARD_FIXTURE_CACHE"


def fixture_cache_root() -> Path:
    """``$QWEN3GUARD_FIXTURE_CACHE``, else ``~/.cache/qwen3guard-middleware/fixtures``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "qwen3guard-middleware", "fixtures")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_directory(name: str, build: Callable[[Path, BuildProgress], None], *, what: str) -> Path:
    """The cached directory ``name``, calling ``build(tmp_dir, progress)`` to create it when missing.

    ``what`` names the fixture in the progress lines (``"the Qwen3Guard-Gen test checkpoint"``).
    """
    target = fixture_cache_root() / name
    if (target / ".complete").is_file():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        with BuildProgress(what, target) as progress:
            build(tmp, progress)
        (tmp / ".complete").write_text("ok\n", encoding="utf-8")
        try:
            tmp.rename(target)
        except OSError:
            if not (target / ".complete").is_file():
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
