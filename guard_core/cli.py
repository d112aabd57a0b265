"""``qwen3guard`` / ``python -m guard_core``: moderate text from the command line.

Prints one JSON object per conversation, so the command composes with ``jq`` and shell scripts;
the exit status says the verdict: 0 allowed, 1 blocked by the policy, 2 an error (usage, a bad
input line, a model that cannot be loaded, a guard server that cannot be reached while failing
closed), always with one line on stderr and never a traceback; 130 after Ctrl-C. Input is checked before the model
loads. With ``--lines`` every stdin line (split on ``\\n`` only) is one prompt, and every output
line carries its ``"line"`` number. The guard comes from ``--model`` or the environment
(``QWEN3GUARD_GEN_URL`` / ``QWEN3GUARD_GEN_MODEL``, see ``guard_core.config``).
``qwen3guard eval ...`` runs the evaluation harness, ``qwen3guard review ...`` the review queue.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .backends import CONFIGURED, GenBackend, default_policy, gen_backend, is_server_url
from .config import (
    CONTROVERSIAL_ENV,
    DEFAULT_GEN_MODEL,
    GEN_MODEL_ENV,
    GEN_URL_ENV,
    REVIEW_DB_ENV,
    Settings,
    check_device,
)
from .messages import check_text
from .policy import Action, Mode, Policy
from .types import GuardUnavailableError

if TYPE_CHECKING:
    from .review import ReviewQueue

EXIT_ALLOWED, EXIT_BLOCKED, EXIT_ERROR = 0, 1, 2
#: 128 + SIGPIPE: the status a shell reports for a filter whose reader closed the pipe (``yes | head``).
EXIT_BROKEN_PIPE = 141
#: 128 + SIGINT: the status a shell reports for a command stopped by Ctrl-C.
EXIT_INTERRUPTED = 130
#: What loading a model can raise besides our own errors (bad files, a device torch lacks).
LOAD_ERRORS = (ValueError, TypeError, GuardUnavailableError, OSError, RuntimeError, ImportError, AssertionError)


class Parser(argparse.ArgumentParser):
    """The argparse of every command line here (``qwen3guard``, ``eval``, ``review``, ``qwen3guard-proxy``).

    A usage error is one line, ``PROG: error: MESSAGE (see PROG --help)``, and exit status 2,
    instead of argparse's whole usage block. ``program`` names the program in the prefix when it
    is not ``prog`` (a subcommand's parser keeps its parent's prefix; the hint names the subcommand).
    Sub-parsers are of this class too (argparse's default ``parser_class``).
    """

    def __init__(self, *args: Any, program: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.program = program or self.prog

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.program}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def bounded_int(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` for an integer option in ``[low, high]``; other values are usage errors."""

    def parse(text: str) -> int:
        bounds = f"from {low} to {high}" if high is not None else f">= {low}"
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {text!r}")
        return value

    return parse


def check_model_path(value: str | None, where: str) -> None:
    """Say what a model path is when it exists but is no directory (the loader would say it does not exist).

    ``where`` starts the message (``"--model "``, ``"QWEN3GUARD_GEN_MODEL="``); server URLs and hub
    ids pass.
    """
    if value is None or is_server_url(value):
        return
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        kind = "a file" if path.is_file() else "not a directory"
        raise ValueError(f"{where}{value} is {kind}, not a model directory")


def quiet_model_loading(verbose: bool = False) -> None:
    """Keep transformers' output off stderr while a CLI loads a model, so its errors stay one line.

    transformers logs a multi-line LOAD REPORT table for missing weights (our loader then raises
    one ``GuardUnavailableError``) and draws "Loading weights" bars. ``verbose`` keeps them.
    """
    if verbose:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="qwen3guard",
        description="Moderate a prompt (or, with --response, an assistant response) with Qwen3Guard-Gen. "
        "Reads the text from the arguments, or from stdin when none are given. Exit status: 0 allowed, "
        "1 blocked, 2 error. `qwen3guard eval --help`: the evaluation harness; `qwen3guard review --help`: "
        "the human review queue.",
    )
    parser.add_argument("text", nargs="*", help="text to moderate (default: read stdin)")
    parser.add_argument("--response", metavar="ANSWER", help="moderate ANSWER as the assistant's reply to TEXT")
    parser.add_argument("--model", help=f"hub id, local directory or http(s):// server URL(s) (default: ${GEN_URL_ENV}, "
                                         f"else ${GEN_MODEL_ENV}, else {DEFAULT_GEN_MODEL})")
    parser.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: best available)")
    parser.add_argument("--dtype", help="float32, bfloat16, ... (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--mode", choices=[m.value for m in Mode],
                        help=f"strict blocks Controversial, loose allows it (default: as ${CONTROVERSIAL_ENV} says "
                             "(block, review, flag or allow), else strict)")
    parser.add_argument("--threshold", type=float, help="P(Unsafe) at or above which content is Unsafe, in (0, 1]")
    parser.add_argument("--lines", action="store_true",
                        help="treat each stdin line (split on \\n only) as a separate prompt; output lines carry its number")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return parser


def _read_texts(args: argparse.Namespace) -> list[tuple[int, str]]:
    """The texts to moderate, each with its line number (1 without ``--lines``).

    ``--lines`` splits on ``\\n`` only (a trailing ``\\r`` is dropped, so ``\\r\\n`` works):
    ``str.splitlines`` would also split on U+2028, U+0085, form feeds and ``\\x1c``-``\\x1e``,
    cutting one prompt into pieces that are each harmless. Blank lines are skipped but counted,
    so numbers are the input's physical lines.
    """
    if args.text:
        if args.lines:
            raise _UsageError("--lines reads the prompts from stdin, one a line: pipe them, or drop --lines to "
                              "moderate the text given as arguments")
        return [(1, " ".join(args.text))]
    if sys.stdin is None or sys.stdin.isatty():
        raise ValueError("no text given: pass it as arguments or pipe it on stdin")
    data = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
    if args.lines:
        lines = data.split("\n")
        if lines[-1] == "":
            lines.pop()  # the newline ending the last line starts no line of its own
        texts = [(n, line.removesuffix("\r")) for n, line in enumerate(lines, 1)]
        texts = [(n, t) for n, t in texts if t.strip()]
    else:
        texts = [(1, data)]
    if not texts or not any(t.strip() for _, t in texts):
        raise ValueError("stdin is empty: there is nothing to moderate")
    return texts


class _UsageError(ValueError):
    """Arguments that contradict each other: a usage error (``PROG: error: ... (see --help)``)."""


def _policy(args: argparse.Namespace, settings: Settings) -> Policy:
    """``--mode`` when given, else the environment's default policy (``QWEN3GUARD_CONTROVERSIAL``),
    as in every adapter; ``--threshold`` and ``QWEN3GUARD_FAIL_OPEN`` apply either way."""
    if args.mode is not None:
        return default_policy(settings, Policy(mode=Mode(args.mode), unsafe_threshold=args.threshold))
    policy = default_policy(settings)
    return policy if args.threshold is None else policy.with_overrides(unsafe_threshold=args.threshold)


def _review_queue(policy: Policy, settings: Settings) -> ReviewQueue | None:
    """The queue for ``Action.REVIEW`` verdicts (``QWEN3GUARD_REVIEW_DB``), None when the policy never
    reviews; a reviewing policy without one is a start-up error, or reviewed content would be lost."""
    if not policy.reviews:
        return None
    if settings.review_db is None:
        raise ValueError(f"{CONTROVERSIAL_ENV}=review sends Controversial content to human review, but there is no "
                         f"review queue: set {REVIEW_DB_ENV} (or pass --mode)")
    from .review import ReviewQueue

    return ReviewQueue(settings.review_db, store_content=settings.review_store_content)


def _conversation(text: str, response: str | None) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": text}]
    return turns + ([{"role": "assistant", "content": response}] if response is not None else [])


def _check(text: str, where: str) -> str | None:
    """The problem with one input text, or None when it can be moderated."""
    if not text.strip():
        return f"{where} is empty: there is nothing to moderate"
    try:
        check_utf8(text, where)
        check_text(text, where=where)
    except ValueError as exc:
        return str(exc)
    return None


def check_utf8(text: str, where: str) -> str:
    """``text`` unless it holds bytes that were not UTF-8 (``surrogateescape``: stdin, ``sys.argv``), else
    ``ValueError`` naming ``where`` and the byte, instead of a bare codec error later on."""
    undecodable = re.search("[\udc80-\udcff]", text)
    if undecodable is not None:
        byte = ord(undecodable.group()) - 0xDC00
        raise ValueError(f"{where} is not valid UTF-8 (byte 0x{byte:02X} at character {undecodable.start()})")
    return text


def stdout_closed() -> int:
    """The reader of stdout went away (``| head``): stop quietly, as a Unix filter killed by SIGPIPE.

    stdout is pointed at /dev/null so the interpreter's last flush does not raise again.
    """
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def log_level(verbose: bool) -> int:
    """The logging level of a command line: progress with ``-v``; else only what ends the run, so
    retries and per-item errors do not bury its one-line error (which carries the cause)."""
    return logging.INFO if verbose else logging.CRITICAL


def interrupted(program: str) -> int:
    """Ctrl-C: one line on stderr instead of a ``KeyboardInterrupt`` traceback, and exit status 130."""
    print(f"\n{program}: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def _error(message: str) -> int:
    print(f"qwen3guard: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qwen3guard`` console script; returns the exit status (130 after Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["eval"]:
            from .eval.__main__ import main as command
        elif argv[:1] == ["review"]:
            from .review_cli import main as command
        else:
            return _moderate(argv)
    except KeyboardInterrupt:  # while importing a subcommand, reading stdin, loading the model or waiting on the guard
        return interrupted("qwen3guard")
    return command(argv[1:])  # each subcommand answers Ctrl-C itself (eval says how to resume)


def _moderate(argv: list[str]) -> int:
    """The verdict command: moderate the texts of ``argv`` / stdin and print one JSON line each."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        Policy(unsafe_threshold=args.threshold)
    except ValueError as exc:  # a usage error naming the flag, as in ``qwen3guard eval``
        parser.error(f"--threshold: {exc}")
    logging.basicConfig(level=log_level(args.verbose), stream=sys.stderr)
    try:
        settings = Settings.from_env()
        policy = _policy(args, settings)
        check_device(args.device, "--device ")
        check_model_path(args.model, "--model ")
        if args.model is None and not settings.gen_urls:
            check_model_path(settings.gen_model, f"{GEN_MODEL_ENV}=")
        texts = _read_texts(args)
        response_problem = _check(args.response, "--response") if args.response is not None else None
        if response_problem:
            raise ValueError(response_problem)
        where = "line {}" if args.lines else "the text"
        problems = {i: p for i, (n, t) in enumerate(texts) if (p := _check(t, where.format(n)))}
        if problems and not args.lines:  # one text: its error is the whole answer, on stderr
            raise ValueError(problems[0])
        queue = _review_queue(policy, settings)
    except _UsageError as exc:
        parser.error(str(exc))
    except (ValueError, OSError, ImportError, RuntimeError) as exc:  # RuntimeError: ReviewStoreError, the queue's database
        return _error(one_line(exc, None))
    good = [i for i in range(len(texts)) if i not in problems]
    verdicts = {}
    if good:
        try:
            guard = _load(args, settings)
            verdicts = dict(zip(good, guard.moderate_batch([_conversation(texts[i][1], args.response) for i in good])))
        except LOAD_ERRORS as exc:
            return _error(one_line(exc))
    blocked = failed = False
    try:
        for i, (number, _) in enumerate(texts):
            line = {"line": number} if args.lines else {}
            if i in problems:
                print(json.dumps({**line, "error": problems[i]}))
                print(f"qwen3guard: error: {problems[i]}", file=sys.stderr)
                continue
            verdict = verdicts[i]
            action = policy.action_for(verdict)
            blocked |= action is Action.BLOCK
            if action is Action.REVIEW and queue is not None:
                review = {"review_id": queue.submit(verdict, source="cli", conversation=_conversation(texts[i][1], args.response))}
            else:
                review = {}
            print(json.dumps({**line, **verdict.to_dict(), "action": action.value, **review}, ensure_ascii=False))
            if verdict.error_kind == "unavailable" and action is Action.BLOCK:
                failed = True
                print(f"qwen3guard: error: {verdict.error}", file=sys.stderr)
        sys.stdout.flush()
    except BrokenPipeError:
        return stdout_closed()
    except RuntimeError as exc:  # ReviewStoreError: the review queue's database failed
        return _error(one_line(exc, None))
    if problems or failed:
        return EXIT_ERROR
    return EXIT_BLOCKED if blocked else EXIT_ALLOWED


def _load(args: argparse.Namespace, settings: Settings) -> GenBackend:
    """The Gen guard from ``--model`` or the environment (torch is imported only here, for a local model)."""
    spec = args.model if args.model is not None else CONFIGURED
    remote = is_server_url(args.model) if args.model is not None else bool(settings.gen_urls)
    if not remote:
        quiet_model_loading(args.verbose)
    local = {} if remote else {"device": args.device or settings.device, "dtype": args.dtype}
    return gen_backend(spec, settings=settings, **local)


def one_line(exc: BaseException, flag: str | None = "--model") -> str:
    """A load failure as one line; the loader's Python advice (``from_pretrained('./X')``) becomes ``flag ./X``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if flag is not None:
        text = re.sub(r"from_pretrained\('([^']*)'\)", lambda m: f"{flag} {m.group(1)}", text)
    return text if isinstance(exc, (ValueError, GuardUnavailableError)) else f"{type(exc).__name__}: {text}"
