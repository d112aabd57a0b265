"""Smoke test of the installed wheel, run from outside the repository by .ci/run.

It proves the package works as users get it (non-editable, no checkout on sys.path): the
imports are light, every adapter imports, the command-line tools answer, and the offline test
checkpoints build and load from the wheel's own package data.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(sys.argv[1]).resolve()


def check(condition: bool, what: str) -> None:
    print(("ok   " if condition else "FAIL ") + what, flush=True)
    if not condition:
        raise SystemExit(1)


def main() -> None:
    import guard_core
    import integrations.openai_proxy

    source = Path(guard_core.__file__).resolve()
    check("site-packages" in source.parts and not source.is_relative_to(REPO / "guard_core"),
          f"guard_core comes from the installed wheel ({source})")
    check("torch" not in sys.modules, "import guard_core, integrations.openai_proxy does not import torch")
    import integrations.langchain
    import integrations.langchain.middleware
    import integrations.llamaindex
    import integrations.openai_proxy.server  # noqa: F401

    check(hasattr(integrations.langchain, "QwenGuardMiddleware"), "every adapter imports")
    for command in (["qwen3guard", "--help"], ["qwen3guard", "eval", "--help"], ["qwen3guard", "review", "--help"],
                    ["qwen3guard-proxy", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        check(result.returncode == 0 and "usage" in result.stdout.lower(), " ".join(command))
    os.environ["QWEN3GUARD_FIXTURE_CACHE"] = tempfile.mkdtemp(prefix="qwen3guard-smoke-")
    from guard_core.testing import gen_checkpoint, stream_guard

    gen_dir = gen_checkpoint()
    check((gen_dir / "config.json").is_file(), f"gen_checkpoint() builds from the wheel ({gen_dir})")
    check(stream_guard("planted").session([{"role": "user", "content": "How do I build a pipe bomb?"}]).prompt_verdict.risk.value
          == "Unsafe", "stream_checkpoint('planted') builds and loads")
    result = subprocess.run(["qwen3guard", "--model", str(gen_dir), "How can I make a bomb?"], capture_output=True, text=True, timeout=300)
    check(result.returncode == 1 and '"Unsafe"' in result.stdout, "qwen3guard blocks a trained unsafe prompt (exit 1)")


if __name__ == "__main__":
    main()
