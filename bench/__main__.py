"""``python -m bench``: run RedMessenger's benchmark suite (bench/README.rst)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from . import report, wire
from .runner import BENCH_DIR, Bench
from .scenarios import FULL, SCENARIOS, SMOKE, sizes_dict, with_needs


def parse(argv: list[str]) -> argparse.Namespace:
    names = [scenario.name for scenario in SCENARIOS]
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure RedMessenger (twistd -n redmessenger, a private redis-server, "
                    "load clients in their own processes, all on 127.0.0.1) against "
                    "baselines measured in the same run. Scenarios: " + ", ".join(names))
    parser.add_argument("--scenarios", default="all",
                        help="comma-separated scenarios (default: all); the baselines and "
                             "scenarios their ratios need are added unless --only")
    parser.add_argument("--only", action="store_true",
                        help="run exactly --scenarios, without what their ratios need")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes: checks that everything works, in seconds; "
                             "its numbers mean nothing")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the message and connection counts (e.g. 0.1)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run each scenario N times and report the median run "
                             "(by rate; by p99 for latency), all runs kept in results.json")
    parser.add_argument("--out", type=Path,
                        help="results folder (default bench/results/<timestamp>/)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin the measured process to its own CPU")
    parser.add_argument("--profile", action="store_true",
                        help="sample RedMessenger with py-spy during each scenario "
                             "(profile-<scenario>.txt; adds some overhead)")
    parser.add_argument("--rm-arg", action="append", default=[], metavar="ARG",
                        help="one more twistd redmessenger argument, e.g. "
                             "--rm-arg=--drain-chunk=2000 (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    if args.scenarios == "all":
        args.names = names
    else:
        args.names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
        unknown = [name for name in args.names if name not in names]
        if unknown:
            parser.error(f"unknown scenarios {unknown}; choose from {names}")
    if not args.only:
        args.names = with_needs(args.names)
    if args.scale <= 0:
        parser.error("--scale must be positive")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def _terminate(signum, frame) -> None:
    # SIGTERM unwinds like Ctrl-C, so every process started is stopped; a
    # second one must not cut that short (each stop has its own deadline).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.list:
        for scenario in SCENARIOS:
            print(f"{scenario.name:>13}  {scenario.kind:8}  {scenario.description}")
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out = args.out or BENCH_DIR / "results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    sizes = SMOKE if args.smoke else FULL
    if args.scale != 1.0:
        sizes = sizes.scaled(args.scale)
    bench = Bench(out, sizes, pin=args.pin, profile=args.profile, rm_args=args.rm_arg,
                  smoke=args.smoke, repeat=args.repeat)
    document = {"started": started, "mode": "smoke" if args.smoke else "full",
                "scale": args.scale, "repeat": args.repeat, "argv": sys.argv,
                "sizes": sizes_dict(sizes), "rm_args": args.rm_arg,
                "machine": report.machine_info(bench)}
    document["notes"] = wire.product_mismatches()
    for note in document["notes"]:
        print("warning: " + note, file=sys.stderr)
    print(f"RedMessenger bench: {', '.join(args.names)}; results in {out}")
    began = time.monotonic()
    interrupted = False
    try:
        results = bench.run(args.names)
    except KeyboardInterrupt:
        interrupted = True
        results = bench.results
        document["interrupted"] = True
        print("interrupted: every process started has been stopped; writing what was "
              "measured", file=sys.stderr)
    document["results"] = results
    document["limits"] = report.limits(results)
    document["targets"] = report.evaluate(results)
    document["seconds"] = round(time.monotonic() - began, 1)
    document["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    notes = report.write(document, out)
    print()
    print((out / "results.txt").read_text())
    for note in notes:
        print("note: " + note)
    print(f"{document['seconds']:.0f} s; results in {out}/ (results.txt, results.json"
          + (", results.png" if (out / "results.png").exists() else "") + ", logs/)")
    if interrupted:
        return 130
    failed = [found["name"] for found in results.values() if not found.get("ok")]
    if failed:
        print(f"FAILED (errors or received != sent): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
