"""``python -m guard_core.eval`` / ``qwen3guard eval``: measure a guard on public safety sets.

Prints the report's kind of table to stdout and writes ``predictions.jsonl``, ``results.json``
and ``results.csv`` to ``--out``; ``--sweep`` adds the threshold sweep (``thresholds.csv``,
``report.html`` and the recommended ``Policy(...)`` line), which ``qwen3guard eval report DIR``
draws for a finished directory without loading a model. Exit status: 0 done, 2 usage or load
error or a guard server that could not judge an item (nothing is scored), 130 interrupted (rerun
the same command to resume).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from ..cli import LOAD_ERRORS, Parser, check_model_path, log_level, one_line, quiet_model_loading, stdout_closed
from ..config import Settings, check_device
from ..policy import Policy
from ..types import GuardUnavailableError
from . import evaluate, require_matplotlib, threshold_report
from .datasets import REGISTRY, REPORT_SETS, DatasetSpec, EvalSet, file_spec, load_set, select_specs
from .runner import Engine, GenEngine, StreamEngine

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130
_MAX_FPR_HELP = ("also recommend the line catching most unsafe content at no more than this false-positive "
                 "rate (e.g. 0.01)")


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="qwen3guard eval",
        description="Evaluate Qwen3Guard Gen and/or Stream on safety datasets: F1 in strict and loose mode, "
        "precision/recall, refusal F1, category confusion and Stream stop positions. Resumable: rerun the "
        "same command after an interruption. `qwen3guard eval report DIR` sweeps the threshold of a finished "
        "run without loading a model (see `qwen3guard eval report --help`).",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, metavar="DIR", help="folder laid out like shared/datasets (one sub-folder per set)")
    data.add_argument("--sets", action="append", metavar="NAME[,NAME]",
                      help="sets to run from --data (default: the report's sets that are present; 'all' for every known set)")
    data.add_argument("--list-sets", action="store_true", help="list the known sets and exit")
    data.add_argument("--file", type=Path, help="any .jsonl/.json/.csv file (optionally .gz) with a text and a label column")
    data.add_argument("--name", help="name of the --file set in the tables (default: the file name)")
    data.add_argument("--text-col", help="--file column holding the prompt")
    data.add_argument("--response-col", help="--file column holding the response (response moderation)")
    data.add_argument("--label-col", help="--file column holding the safety label")
    data.add_argument("--positive", action="append", metavar="VALUE",
                      help="label value(s) meaning unsafe, case-insensitive (repeatable; default 'unsafe')")
    data.add_argument("--negative", action="append", metavar="VALUE",
                      help="label value(s) meaning safe; when given, any other value is an error (default: 'safe' "
                           "when --positive is not given either, else every value that is not positive)")
    data.add_argument("--refusal-col", help="--file column holding a refusal label")
    data.add_argument("--refusal-positive", action="append", metavar="VALUE",
                      help="refusal value(s) meaning refused (default 'refusal')")
    data.add_argument("--category-col", help="--file column holding a gold category")
    data.add_argument("--span-cols", metavar="START,END",
                      help="--file columns with the character offsets of the unsafe part of the response")
    data.add_argument("--limit", type=int, metavar="N", help="evaluate N items per set, spread evenly over the set")
    models = parser.add_argument_group("models")
    models.add_argument("--gen", metavar="MODEL", help="Gen model: hub id, local directory, or http(s):// URL(s) of vLLM/SGLang servers")
    models.add_argument("--stream", metavar="MODEL", help="Stream model: hub id or local directory")
    models.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: $QWEN3GUARD_DEVICE, else best available)")
    models.add_argument("--dtype", help="float32, bfloat16, ... (default: bfloat16 on GPU, float32 on CPU)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, default=Path("qwen3guard-eval"), help="output directory (default ./qwen3guard-eval)")
    run.add_argument("--batch-size", type=int, default=16, help="items per batch (default 16)")
    run.add_argument("--threshold", type=float, help="P(Unsafe) at or above which a verdict is Unsafe (Policy.unsafe_threshold)")
    run.add_argument("--fresh", action="store_true", help="discard earlier predictions in --out instead of resuming")
    run.add_argument("--sweep", action="store_true",
                     help="then sweep unsafe_threshold: thresholds.csv, report.html and the recommended Policy line "
                     "(needs the report extra)")
    run.add_argument("--max-fpr", type=float, metavar="RATE", help=_MAX_FPR_HELP)
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    return parser


def _report_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="qwen3guard eval report",
        description="Sweep unsafe_threshold over the stored predictions of a finished qwen3guard eval directory: "
        "precision, recall, F1 and false-positive rate per engine and set, the recommended Policy line, "
        "thresholds.csv and report.html (plots embedded). Loads and runs no model.",
    )
    parser.add_argument("directory", type=Path, metavar="DIR", help="the --out directory of a qwen3guard eval run")
    parser.add_argument("--max-fpr", type=float, metavar="RATE", help=_MAX_FPR_HELP)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    return parser


def _check_max_fpr(parser: argparse.ArgumentParser, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        parser.error(f"--max-fpr is a rate between 0 and 1, got {value:g}")


def _print_sweep(directory: Path, max_fpr: float | None, progress: bool) -> None:
    report = threshold_report(directory, max_fpr=max_fpr, progress=progress)
    print(report["text"])
    print(f"\nwrote {report['files'][0]} and {report['files'][1]}", file=sys.stderr)


def report_main(argv: Sequence[str]) -> int:
    """``qwen3guard eval report DIR``: the threshold sweep of a finished directory; returns the exit status."""
    parser = _report_parser()
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=log_level(args.verbose), stream=sys.stderr)
    _check_max_fpr(parser, args.max_fpr)
    try:
        if args.directory.exists() and not args.directory.is_dir():
            raise ValueError(f"{args.directory} is a file, not the --out directory of a qwen3guard eval run")
        _print_sweep(args.directory, args.max_fpr, not args.no_progress)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (``| head``): quiet, like the verdict command
        return stdout_closed()
    except (ValueError, OSError, ImportError) as exc:
        print(f"qwen3guard eval report: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _list_sets(root: Path | None) -> str:
    lines = []
    for name, spec in REGISTRY.items():
        present = "" if root is None else ("  [present]" if (root / spec.path).is_file() else "  [missing]")
        report = " (report)" if name in REPORT_SETS else ""
        rule = spec.label.describe() if spec.label else "no safety label"
        lines.append(f"{name}{report}{present}\n    {spec.level}: {spec.path}; unsafe: {rule}" + (f"; {spec.note}" if spec.note else ""))
    return "\n".join(lines)


def _split(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _specs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[tuple[DatasetSpec, Path | None]]:
    specs: list[tuple[DatasetSpec, Path | None]] = []
    if args.data is not None:
        if not args.data.is_dir():
            raise ValueError(f"--data {args.data} is not a directory")
        specs += [(s, args.data) for s in select_specs(_split(args.sets), args.data)]
    elif args.sets:
        parser.error("--sets needs --data")
    if args.file is not None:
        if not args.text_col:
            parser.error("--file needs --text-col")
        span = _split([args.span_cols]) if args.span_cols else None
        if span is not None and len(span) != 2:
            parser.error("--span-cols takes two column names: START,END")
        specs.append((file_spec(
            args.file, text_col=args.text_col, label_col=args.label_col, positive=_split(args.positive) or ["unsafe"],
            negative=_split(args.negative) or ([] if args.positive else ["safe"]), response_col=args.response_col, refusal_col=args.refusal_col,
            refusal_positive=_split(args.refusal_positive) or ["refusal"], category_col=args.category_col,
            span_cols=(span[0], span[1]) if span else None, name=args.name), None))
    elif any(getattr(args, a) for a in ("text_col", "label_col", "response_col", "refusal_col", "span_cols")):
        parser.error("column options need --file")
    if not specs:
        parser.error("nothing to evaluate: give --data DIR and/or --file FILE")
    names = [s.name for s, _ in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"two sets are named {', '.join(duplicates)}; pass --name for the --file set")
    return specs


def _check_out(out: Path) -> None:
    """``--out`` must be (or become) a directory: refuse a file before any model loads."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory; pass a directory for the results")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, not a directory")


def _engines(args: argparse.Namespace, settings: Settings) -> list[Engine]:
    """Load the models; a load failure is one ``ValueError`` line naming the flag."""
    engines: list[Engine] = []
    device = args.device or settings.device
    if args.gen:
        from ..backends import is_server_url, load_gen_guard

        remote = is_server_url(args.gen)
        local = {} if remote else {"device": device, "dtype": args.dtype, "batch_size": args.batch_size}
        try:
            engines.append(GenEngine(load_gen_guard(args.gen, **local)))
        except LOAD_ERRORS as exc:
            raise ValueError(f"--gen: {one_line(exc, '--gen')}") from None
    if args.stream:
        from ..stream import StreamGuard

        try:
            engines.append(StreamEngine(StreamGuard.from_pretrained(args.stream, device=device, dtype=args.dtype)))
        except LOAD_ERRORS as exc:
            raise ValueError(f"--stream: {one_line(exc, '--stream')}") from None
    return engines


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m guard_core.eval`` and ``qwen3guard eval``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=log_level(args.verbose), stream=sys.stderr)
    if args.list_sets:
        try:
            print(_list_sets(args.data), flush=True)
        except BrokenPipeError:
            return stdout_closed()
        return EXIT_OK
    if not (args.gen or args.stream):
        parser.error("give --gen MODEL and/or --stream MODEL")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.max_fpr is not None and not args.sweep:
        parser.error("--max-fpr needs --sweep")
    _check_max_fpr(parser, args.max_fpr)
    try:
        Policy(unsafe_threshold=args.threshold)
    except ValueError as exc:
        parser.error(f"--threshold: {exc}")
    try:
        settings = Settings.from_env()
        check_device(args.device, "--device ")
        check_model_path(args.gen, "--gen ")
        check_model_path(args.stream, "--stream ")
        _check_out(args.out)
        if args.sweep:
            require_matplotlib()
        sets: list[EvalSet] = [load_set(spec, root, limit=args.limit) for spec, root in _specs(args, parser)]
        quiet_model_loading(args.verbose)
        engines = _engines(args, settings)
        summary = evaluate(sets, engines, args.out, batch_size=args.batch_size, progress=not args.no_progress,
                           fresh=args.fresh, threshold=args.threshold)
        print(summary["table"])
        print(f"\nwrote {summary['files'][0]} and {summary['files'][1]}", file=sys.stderr)
        if args.sweep:
            print()
            _print_sweep(args.out, args.max_fpr, not args.no_progress)
        sys.stdout.flush()
    except BrokenPipeError:
        return stdout_closed()
    except KeyboardInterrupt:
        print(f"\nqwen3guard eval: interrupted; finished batches are saved in {args.out}. "
              "Run the same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, ImportError, GuardUnavailableError) as exc:
        print(f"qwen3guard eval: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
