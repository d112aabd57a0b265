"""Stream a chat completion from any OpenAI-compatible server through Qwen3Guard.

The only guard-specific line is ``guard_openai(...)``; the rest is ordinary openai code. The
prompt is judged before it is sent, the answer token by token while it streams.

    OPENAI_BASE_URL=http://localhost:8000/v1 OPENAI_API_KEY=sk-... OPENAI_MODEL=my-model \\
        python examples/openai_stream.py "How do I bake a chocolate cake?"
    python examples/openai_stream.py "..." --on-unsafe rewrite --holdback 0
    python examples/openai_stream.py "..." --gen-model DIR --stream-model DIR   # or QWEN3GUARD_*_MODEL

The guards default to the library's configuration (``QWEN3GUARD_GEN_URL`` / ``QWEN3GUARD_GEN_MODEL``
/ ``QWEN3GUARD_STREAM_MODEL``, see the README). A model or server that cannot be reached is one line
on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import openai
from openai import OpenAI

from guard_core import CONFIGURED, GuardUnavailableError
from integrations.openai_proxy import UnsafeContentError, guard_openai


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", help="the user message")
    parser.add_argument("--model", default=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"),
                        help="model name on the server (env OPENAI_MODEL)")
    parser.add_argument("--on-unsafe", choices=["abort", "rewrite"], default="abort",
                        help="abort: raise UnsafeContentError; rewrite: end with a refusal and content_filter")
    parser.add_argument("--holdback", type=int, default=2,
                        help="hold-back window in tokens (default covers the debounce rule; 0 = release at once)")
    parser.add_argument("--gen-model", default=CONFIGURED, help="Qwen3Guard-Gen hub id, directory or server URL")
    parser.add_argument("--stream-model", default=CONFIGURED, help="Qwen3Guard-Stream hub id or directory")
    args = parser.parse_args()

    finish = None
    try:
        # OPENAI_BASE_URL and OPENAI_API_KEY are read by OpenAI() itself.
        client = guard_openai(OpenAI(), on_unsafe=args.on_unsafe, holdback_tokens=args.holdback,
                              stream_guard=args.stream_model, gen_guard=args.gen_model)
        stream = client.chat.completions.create(
            model=args.model, messages=[{"role": "user", "content": args.prompt}], stream=True)
        with stream:
            for chunk in stream:
                for choice in chunk.choices:
                    print(choice.delta.content or "", end="", flush=True)
                    finish = choice.finish_reason or finish
    except UnsafeContentError as err:
        categories = ", ".join(c.value for c in err.verdict.categories) or "no category"
        print(f"\n[blocked {err.verdict.role}: {err.verdict.risk.value} ({categories}); "
              f"delivered {len(err.delivered)} characters before the stop]")
        return 1
    except (GuardUnavailableError, openai.OpenAIError, ValueError) as err:  # OpenAIError: no API key, no server, ...
        print(f"openai_stream.py: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    verdict = stream.verdicts.get(0) or stream.prompt_verdict
    print(f"\n[finish_reason={finish}; guard verdict: {verdict.role} {verdict.risk.value}]" if verdict else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
