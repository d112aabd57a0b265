"""Every Python snippet in the README runs as written (against the offline checkpoints)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(code: str, gen_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_configuration_table_is_the_settings_the_code_reads() -> None:
    """One set of environment names, read in one place (guard_core.config) and documented in one table."""
    from guard_core.config import ENVIRONMENT

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for variable, meaning, default in ENVIRONMENT:
        assert f"| `{variable}` | {meaning} | {default} |" in readme, variable
    readers = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in [*(ROOT / "guard_core").rglob("*.py"), *(ROOT / "integrations").rglob("*.py"), *(ROOT / "examples").rglob("*.py")]
        if path.name != "config.py" and "testing" not in path.parts
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"""(environ(\.get)?|getenv)\s*[(\[]\s*["']QWEN3GUARD_""", line)
    ]
    assert readers == [], "QWEN3GUARD_* variables are read only by guard_core.config"
