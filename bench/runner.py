"""The coordinator: runs the scenarios asked for, one after the other (each
repeated as asked), and keeps their results."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .scenarios import BY_NAME, Sizes

BENCH_DIR = Path(__file__).resolve().parent


class Bench:
    def __init__(self, out: Path, sizes: Sizes, *, pin: bool = True, profile: bool = False,
                 rm_args: tuple[str, ...] = (), smoke: bool = False, repeat: int = 1) -> None:
        self.out = out
        self.repeat = repeat
        self.suffix = ""
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = out / "work"
        self.work.mkdir(exist_ok=True)
        self.sizes = sizes
        self.smoke = smoke
        self.settle = 0.05 if smoke else 0.2
        self.rm_args = tuple(rm_args)
        self.profile = profile
        self.pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if profile and not os.access(self.pyspy, os.X_OK):
            raise SystemExit("--profile needs py-spy (pip install py-spy)")
        self.twistd = twistd_command()
        self.env = child_environment()
        self.subject_cpus, self.load_cpus = split_cpus(pin)
        self.results: dict[str, dict] = {}

    def run(self, names: list[str], say: Callable[[str], None] = print) -> dict[str, dict]:
        if self.load_cpus:
            os.sched_setaffinity(0, self.load_cpus)
        raise_fd_limit(max(self.sizes.connections, self.sizes.failover_sockets) + 1000)
        try:
            self._run(names, say)
        finally:
            try:
                self.work.rmdir()
            except OSError:
                pass
        return self.results

    def _run(self, names: list[str], say: Callable[[str], None]) -> None:
        for name in names:
            scenario = BY_NAME[name]
            say(f"{name:>13}  {scenario.description} ...")
            runs = []
            for attempt in range(self.repeat):
                self.suffix = f".{attempt + 1}" if attempt else ""
                started = time.monotonic()
                try:
                    found = scenario.run(self)
                except Exception as e:  # one scenario failing is reported, the others run
                    found = {"name": name, "ok": False, "error": f"{type(e).__name__}: {e}",
                             "checks": [str(e)]}
                found.update(kind=scenario.kind, description=scenario.description,
                             wall=round(time.monotonic() - started, 2), attempt=attempt + 1)
                runs.append(found)
                say("               " + one_line(found))
            self.suffix = ""
            self.results[name] = representative(runs)


def representative(runs: list[dict]) -> dict:
    """Of a repeated scenario's runs, the median one (by rate; by p99 for
    latency; of an even number, the worse of the middle two), with every
    run's numbers kept. A failed run fails it all."""
    if len(runs) == 1:
        return runs[0]
    measure = "p99_ms" if any("p99_ms" in run for run in runs) else "rate"
    # A run that failed without an error (not every message came) has no number.
    good = [run for run in runs if not run.get("error") and run.get(measure) is not None]
    if not good:
        return runs[0]
    sign = -1 if measure == "p99_ms" else 1
    chosen = dict(sorted(good, key=lambda run: sign * run[measure])[(len(good) - 1) // 2])
    chosen["repeats"] = [{name: run.get(name) for name in
                          ("attempt", "ok", "error", "rate", "subject_cpu", "subject_util",
                           "subject_stolen", "subject_us_per_item", "p99_ms", "p99.9_ms")
                          if name in run} for run in runs]
    if not all(run.get("ok") for run in runs):
        chosen["ok"] = False
        chosen["checks"] = [*chosen["checks"], "another run of this scenario failed"]
    return chosen


def one_line(found: dict) -> str:
    if found.get("error"):
        return f"FAILED: {found['error']}"
    parts = [f"{found['received']:,}/{found['sent']:,} "
             + ("ok" if found["ok"] else "MISMATCH"),
             f"{found['rate']:,.0f} {found['unit']}" if found.get("rate") else "-"]
    if found.get("subject_cpu") is not None:
        parts.append(f"{found['subject']} {found['subject_cpu']:.2f} CPU s "
                     f"({(found['subject_util'] or 0) * 100:.0f} %)")
    if "p99_ms" in found:
        parts.append(f"p50 {found['p50_ms']:.2f} / p99 {found['p99_ms']:.2f} / "
                     f"p99.9 {found['p99.9_ms']:.2f} ms")
    if "rss_per_connection" in found and found["rss_per_connection"] is not None:
        parts.append(f"{found['rss_per_connection'] / 1024:.1f} KiB/connection")
    if "rss_growth" in found:
        parts.append(f"peak RSS +{found['rss_growth'] / 2**20:.1f} MiB")
    for check in found["checks"]:
        parts.append("! " + check)
    return "; ".join(parts)


def twistd_command() -> Path:
    """The twistd beside this Python (the venv's), as deployed."""
    twistd = Path(sys.executable).with_name("twistd")
    if not twistd.exists():
        found = shutil.which("twistd")
        if not found:
            raise SystemExit(f"no twistd beside {sys.executable} nor on PATH")
        twistd = Path(found)
    return twistd


def child_environment() -> dict[str, str]:
    """Children import the same redmessenger and bench as this process: the
    directories holding them go first on PYTHONPATH (with an installed
    package that is site-packages, already there; from a checkout it is the
    checkout, whose twisted/plugins/ then holds the twistd plugin)."""
    roots = []
    spec = importlib.util.find_spec("redmessenger")
    if spec is None or spec.origin is None:
        raise SystemExit("redmessenger is not importable: pip install the package "
                         "(or run from the checkout's root)")
    for root in (Path(spec.origin).resolve().parent.parent, BENCH_DIR.parent):
        if str(root) not in roots:
            roots.append(str(root))
    env = dict(os.environ)
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(roots + ([existing] if existing else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def split_cpus(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """The CPU of the measured process, and those of everything else."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[-1]}, set(cpus[:-1])


def raise_fd_limit(wanted: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        print(f"note: the open-file limit is {hard}; --scale the connections down if "
              "they fail", file=sys.stderr)
