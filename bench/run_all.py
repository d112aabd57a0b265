"""Run every benchmark in bench/ and print one Markdown table of their figures, with the machine.

Each benchmark prints one JSON line of figures measured in a single run (ratios, so a noisy
machine moves them less); this script runs them one after another in fresh processes, so they do
not disturb each other, and flattens their JSON into ``bench | figure | value`` rows. The table
is what the README's benchmark section shows; run a script by hand for its own options (e.g.
``--device cuda --layers 28`` for the real model shapes on a GPU).

    python bench/run_all.py [--only gen_latency,stream_throughput] [--json results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def machine() -> str:
    """One line naming the machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` -> ``[("a.b", 1)]``; lists of scalars stay whole."""
    if isinstance(data, dict):
        return [row for key, value in data.items() for row in flatten(value, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), data)]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; returns 1 if any of them failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--json", type=Path, help="also write every benchmark's JSON line to this file")
    args = parser.parse_args(argv)
    names = sorted(p.stem for p in HERE.glob("*.py") if p.stem != Path(__file__).stem)
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    print(f"Machine: {machine()}\n\n| bench | figure | value |\n|---|---|---|", flush=True)
    failed = False
    lines = []
    for name in names:
        result = subprocess.run([sys.executable, str(HERE / f"{name}.py")], capture_output=True, text=True)
        last = result.stdout.strip().splitlines()[-1:] or [""]
        try:
            data = json.loads(last[0])
        except ValueError:
            failed = True
            print(f"| {name} | failed (exit {result.returncode}) | {(result.stderr.strip().splitlines() or [''])[-1][:120]} |")
            continue
        lines.append(last[0])
        for key, value in flatten(data):
            if key != "bench":
                print(f"| {name} | {key} | {value} |", flush=True)
    if args.json:
        args.json.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
