"""Accuracy and latency of a run's exported formats on every runtime here, side by side.

Calls ``featx_edge.bench.bench_run`` (which also writes RUN/bench.json, RUN/bench.md and
RUN/bench.png) and writes the same JSON report to ``--out``. With ``--compare OTHER_RUN`` it also
prints the two runs' bench tables side by side (OTHER_RUN must have been benchmarked already).

    python benchmarks/bench_formats.py --run runs/demo --out bench-out/formats.json
    python benchmarks/bench_formats.py --run runs/demo --out f.json --threads 1 --batches 1 \
        --formats tflite-int8,onnx-float32 --repeats 10 --min-seconds 0.2
"""

from __future__ import annotations

import argparse
import sys


def _ints(text: str) -> tuple[int, ...]:
    from featx_edge.config import parse_int_list
    from featx_edge.errors import ConfigError

    try:
        return parse_int_list("threads/--batches", text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    from featx_edge.bench import DEFAULT_BATCHES, DEFAULT_THREADS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory with exported artifacts")
    parser.add_argument("--out", required=True, help="JSON file to write (the bench report)")
    parser.add_argument("--threads", type=_ints, default=DEFAULT_THREADS,
                        help=f"thread counts, comma-separated (default {','.join(map(str, DEFAULT_THREADS))})")
    parser.add_argument("--batches", type=_ints, default=DEFAULT_BATCHES,
                        help=f"batch sizes, comma-separated (default {','.join(map(str, DEFAULT_BATCHES))})")
    parser.add_argument("--formats", default=None, help="comma-separated formats (default: every exported one)")
    parser.add_argument("--repeats", type=int, default=30, help="minimum timed calls per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per row before timing")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="minimum seconds of timing per row")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="maximum seconds of timing per row")
    parser.add_argument("--no-tf", action="store_true", help="skip the Keras reference on TensorFlow")
    parser.add_argument("--compare", default=None, help="another benchmarked run to print side by side")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    args = parser.parse_args(argv)

    from featx_edge.bench import bench_run, compare_runs
    from featx_edge.errors import FeatxError
    from featx_edge.files.atomic import write_json
    from featx_edge.progress import configure

    configure(quiet=args.quiet)  # bench_run logs its progress and the table at INFO
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip()) if args.formats else None
    try:
        report = bench_run(args.run, threads=args.threads, batches=args.batches, formats=formats,
                           repeats=args.repeats, warmup=args.warmup, min_seconds=args.min_seconds,
                           max_seconds=args.max_seconds, include_tf=not args.no_tf)
        write_json(args.out, report)
        if args.compare:
            print(compare_runs(args.run, args.compare))
    except FeatxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {args.out} ({report['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
