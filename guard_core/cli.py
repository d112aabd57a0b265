"""``qwen3guard`` / ``python -m guard_core``: moderate text from the command line.

Prints one JSON object per conversation, so the command composes with ``jq`` and shell scripts;
the exit status says the verdict (0 allowed, 1 blocked by the policy, 2 usage or load error).
``qwen3guard eval ...`` runs the evaluation harness.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from .gen import DEFAULT_GEN_MODEL
from .policy import Mode, Policy
from .types import GuardUnavailableError

EXIT_ALLOWED, EXIT_BLOCKED, EXIT_ERROR = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen3guard",
        description="Moderate a prompt (or, with --response, an assistant response) with Qwen3Guard-Gen. "
        "Reads the text from the arguments, or from stdin when none are given. "
        "Run `qwen3guard eval --help` for the evaluation harness.",
    )
    parser.add_argument("text", nargs="*", help="text to moderate (default: read stdin)")
    parser.add_argument("--response", metavar="ANSWER", help="moderate ANSWER as the assistant's reply to TEXT")
    parser.add_argument("--model", default=DEFAULT_GEN_MODEL, help=f"hub id or local directory (default {DEFAULT_GEN_MODEL})")
    parser.add_argument("--device", help="cuda, mps or cpu (default: best available)")
    parser.add_argument("--dtype", help="float32, bfloat16, ... (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.STRICT.value,
                        help="strict blocks Controversial, loose allows it (default strict)")
    parser.add_argument("--threshold", type=float, help="P(Unsafe) at or above which content is Unsafe")
    parser.add_argument("--lines", action="store_true", help="treat each stdin line as a separate prompt")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return parser


def _read_texts(args: argparse.Namespace) -> list[str]:
    if args.text:
        return [" ".join(args.text)]
    if sys.stdin is None or sys.stdin.isatty():
        raise ValueError("no text given: pass it as arguments or pipe it on stdin")
    data = sys.stdin.read()
    texts = [line for line in data.splitlines() if line.strip()] if args.lines else [data]
    if not texts or not any(t.strip() for t in texts):
        raise ValueError("stdin is empty: there is nothing to moderate")
    return texts


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qwen3guard`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        from .eval.__main__ import main as eval_main

        return eval_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        texts = _read_texts(args)
        policy = Policy(mode=Mode(args.mode), unsafe_threshold=args.threshold)
        conversations = [
            [{"role": "user", "content": t}] + ([{"role": "assistant", "content": args.response}] if args.response is not None else [])
            for t in texts
        ]
        from .gen import GenGuard

        guard = GenGuard.from_pretrained(args.model, device=args.device, dtype=args.dtype)
        verdicts = guard.moderate_batch(conversations)
    except (ValueError, GuardUnavailableError) as exc:
        print(f"qwen3guard: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    blocked = False
    for verdict in verdicts:
        action = policy.action_for(verdict)
        blocked |= policy.blocks(verdict)
        print(json.dumps({**verdict.to_dict(), "action": action.value}, ensure_ascii=False))
    return EXIT_BLOCKED if blocked else EXIT_ALLOWED
