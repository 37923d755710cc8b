"""What a run leaves behind: the table (results.txt), everything measured
(results.json), the picture (results.png), and the targets judged."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from array import array
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

KiB, MiB = 1024, 1024 * 1024

#: The bench's reading of "memory bounded for a 1,000,000-message queue":
#: draining it must not raise RedMessenger's peak RSS by more than this.
DRAIN_MEMORY_BOUND = 64 * MiB


# --------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------


def machine_info(bench) -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("twisted", "autobahn", "txredisapi", "hiredis", "txaio", "matplotlib"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import redmessenger
    from redmessenger.redisserver import find_redis_server

    try:
        redis_version = subprocess.run([find_redis_server(), "--version"], capture_output=True,
                                       text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        redis_version = f"unknown ({e})"
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "pinning": ({"measured_process": sorted(bench.subject_cpus),
                     "everything_else": sorted(bench.load_cpus)}
                    if bench.subject_cpus else None),
        "memory_total": _meminfo("MemTotal"),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "twistd": str(bench.twistd),
        "redis_server": redis_version,
        "packages": versions,
        "redmessenger": {"version": redmessenger.__version__,
                         "path": str(Path(redmessenger.__file__).resolve().parent),
                         **_git(Path(redmessenger.__file__).resolve().parent)},
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def _meminfo(name: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * KiB
    except OSError:
        pass
    return None


def _git(where: Path) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode:
            return {}
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=where,
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {}


# --------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------


def _good(results: dict, name: str) -> dict | None:
    found = results.get(name)
    return found if found and not found.get("error") else None


def _rate(results: dict, name: str) -> float | None:
    found = _good(results, name)
    return found["rate"] if found else None


def limits(results: dict) -> dict:
    """The one-process limit for live delivery: 1 / (1/receive + 1/send)."""
    receive = _rate(results, "raw-recv")
    found = {}
    for users in (1, 100):
        send = _rate(results, f"raw-send-{users}")
        found[f"live-{users}"] = 1 / (1 / receive + 1 / send) if receive and send else None
    return found


def evaluate(results: dict) -> list[dict]:
    """Each target of the issue that this run can judge."""
    targets = []
    limit = limits(results)

    def add(scenario: str, what: str, measured: str, value: float | None, goal: str,
            passed: bool | None, shown: str = "") -> None:
        targets.append({"scenario": scenario, "target": what, "measured": measured,
                        "value": value, "shown": shown, "goal": goal, "pass": passed})

    for users in (1, 100):
        name = f"live-{users}"
        rate, top = _rate(results, name), limit[name]
        if rate and top:
            add(name, "rate / one-process limit", f"{rate:,.0f} / {top:,.0f} msg/s",
                rate / top, ">= 60 %", rate / top >= 0.60, f"{rate / top * 100:.0f} %")
    rate, send = _rate(results, "drain"), _rate(results, "raw-send-1")
    if rate and send:
        add("drain", "rate / raw Autobahn send rate", f"{rate:,.0f} / {send:,.0f} msg/s",
            rate / send, ">= 60 %", rate / send >= 0.60, f"{rate / send * 100:.0f} %")
    big = _good(results, "drain-1m")
    if big:
        add("drain-1m", f"peak RSS growth draining {big['sent']:,} messages",
            f"{big['rss_growth'] / MiB:.1f} MiB", big["rss_growth"],
            f"<= {DRAIN_MEMORY_BOUND / MiB:.0f} MiB", big["rss_growth"] <= DRAIN_MEMORY_BOUND)
    rate = _rate(results, "store")
    if rate:
        add("store", "stores per second", f"{rate:,.0f} stores/s", rate, ">= 100,000",
            rate >= 100_000)
    replicas_targets(results, add)
    found = _good(results, "latency")
    if found:
        add("latency", f"p99 at {found['requested_rate']:,} msg/s", f"{found['p99_ms']:.2f} ms",
            found["p99_ms"], "<= 5 ms", found["p99_ms"] <= 5)
        add("latency", f"p99.9 at {found['requested_rate']:,} msg/s",
            f"{found['p99.9_ms']:.2f} ms", found["p99.9_ms"], "<= 20 ms",
            found["p99.9_ms"] <= 20)
    found = _good(results, "connections")
    if found and found.get("rss_per_connection") is not None:
        per = found["rss_per_connection"]
        add("connections", "RSS per idle identified connection", f"{per / KiB:.1f} KiB", per,
            "<= 20 KiB", per <= 20 * KiB)
        add("connections", "connects+hellos per second", f"{found['rate']:,.0f} /s",
            found["rate"], ">= 2,000", found["rate"] >= 2000)
        us = found["subject_us_per_item"]
        add("connections", "CPU per connect+hello", f"{us:.0f} µs", us, "<= 300 µs", us <= 300)
        raw = _good(results, "raw-connect")
        if raw and raw["subject_us_per_item"]:
            ratio = us / raw["subject_us_per_item"]
            add("connections", "CPU per connect+hello / bare Autobahn's (raw-connect)",
                f"{us:.0f} vs {raw['subject_us_per_item']:.0f} µs", ratio, "(no target)",
                None, f"{ratio:.2f}x")
    rate, plain = _rate(results, "live-1-ack"), _rate(results, "live-1")
    if rate and plain:
        add("live-1-ack", "ack-mode time / plain time (live-1)",
            f"{rate:,.0f} vs {plain:,.0f} msg/s", plain / rate, "<= 2x", plain / rate <= 2,
            f"{plain / rate:.2f}x")
    found, websocket = _good(results, "live-1-events"), _good(results, "live-1-ack")
    if found and websocket and found["rate"] and websocket["rate"]:
        ratio = websocket["rate"] / found["rate"]
        add("live-1-events", "event stream time / WebSocket time (live-1-ack)",
            f"{found['rate']:,.0f} vs {websocket['rate']:,.0f} msg/s", ratio, "(no target)",
            None, f"{ratio:.2f}x")
        us, us_ws = found["subject_us_per_item"], websocket["subject_us_per_item"]
        if us and us_ws:
            add("live-1-events", "CPU per message / live-1-ack's", f"{us:.1f} vs {us_ws:.1f} µs",
                us / us_ws, "(no target)", None, f"{us / us_ws:.2f}x")
    rate, plain = _rate(results, "drain-ack"), _rate(results, "drain")
    if rate and plain:
        add("drain-ack", "ack-mode time / plain time (drain)",
            f"{rate:,.0f} vs {plain:,.0f} msg/s", plain / rate, "(no target)", None,
            f"{plain / rate:.2f}x")
    cluster_targets(results, add)
    return targets


def replicas_targets(results: dict, add: Callable[..., None]) -> None:
    """What waiting for a replica (``--redis-replicas-ack 1``) costs, against
    the same scenario without, in this run: CPU per item and latency."""
    for name, base in (("store-replica", "store"), ("live-1-ack-replica", "live-1-ack")):
        found, plain = _good(results, name), _good(results, base)
        if not (found and plain and found["rate"] and plain["rate"]):
            continue
        add(name, f"time / {base}'s (rate)", f"{found['rate']:,.0f} vs {plain['rate']:,.0f} "
            f"{found['unit']}", plain["rate"] / found["rate"], "(no target)", None,
            f"{plain['rate'] / found['rate']:.2f}x")
        us, us_plain = found["subject_us_per_item"], plain["subject_us_per_item"]
        if us and us_plain:
            add(name, f"CPU per item / {base}'s", f"{us:.1f} vs {us_plain:.1f} µs",
                us / us_plain, "(no target)", None, f"{us / us_plain:.2f}x")
    found, plain = _good(results, "latency-ack-replica"), _good(results, "latency-ack")
    if found and plain:
        for label in ("50", "99"):
            mine, base = found[f"p{label}_ms"], plain[f"p{label}_ms"]
            add("latency-ack-replica", f"p{label} / latency-ack's",
                f"{mine:.2f} vs {base:.2f} ms", mine / base if base else None,
                "(no target)", None, f"{mine / base:.2f}x" if base else "")


def cluster_targets(results: dict, add: Callable[..., None]) -> None:
    """The cluster's costs, as CPU per message against one node delivering
    (live-100 of the same run), and what a failover takes and loses."""
    single = _good(results, "live-100")
    us = single and single["subject_us_per_item"]
    found = _good(results, "cluster-live")
    if found and us:
        ratio = found["subject_us_per_item"] / us
        add("cluster-live", "both nodes' CPU per message / one node's (live-100)",
            f"{found['subject_us_per_item']:.1f} vs {us:.1f} µs/msg", ratio, "<= 1.25x",
            ratio <= 1.25, f"{ratio:.2f}x")
    storer = _good(results, "cluster-storer")
    if found and storer and us:
        # docs/scaling.rst's capacity model: a message costs a delivery on
        # its user's node, and a skip on its storer when that is the other
        # node (half of them, with two nodes and the users split evenly).
        predicted = us + storer["subject_us_per_item"] / 2
        off = found["subject_us_per_item"] / predicted - 1
        add("cluster-live", "the capacity model (docs/scaling.rst) against this run",
            f"{found['subject_us_per_item']:.1f} µs/msg vs {predicted:.1f} predicted", off,
            "within 25 %", abs(off) <= 0.25, f"{off * 100:+.0f} %")
    found = _good(results, "cluster-foreign")
    if found and us:
        ratio = found["subject_us_per_item"] / us
        add("cluster-foreign", "idle node's CPU per message published / live-100's",
            f"{found['subject_us_per_item']:.2f} vs {us:.1f} µs/msg", ratio, "<= 10 %",
            ratio <= 0.10, f"{ratio * 100:.1f} %")
    found = _good(results, "cluster-storer")
    if found and us and found["subject_us_per_item"]:  # 0: too little CPU to measure
        ratio = us / found["subject_us_per_item"]
        add("cluster-storer", "storer's capacity / one node's delivery capacity",
            f"{1e6 / found['subject_us_per_item']:,.0f} vs {1e6 / us:,.0f} msg/s per CPU",
            ratio, ">= 2x", ratio >= 2, f"{ratio:.2f}x")
    for name in ("failover", "failover-user-node"):
        found = _good(results, name)
        if not found:
            continue
        add(name, "ack-mode messages in flight at the kill, lost",
            f"{found['lost']:,} of {found['in_flight']:,}", found["lost"], "0",
            found["lost"] == 0)
        late = found["in_flight"] - found["came_connected"]
        add(name, "of them, not back without another connect",
            f"{late:,} of {found['in_flight']:,}", late, "0", late == 0)
        if found["storer_after"] is not None:
            add(name, "kill -9 to the other node storing", f"{found['storer_after']:.2f} s",
                found["storer_after"], "<= 5 s", found["storer_after"] <= 5)
        add(name, f"kill -9 to all {found['sent']:,} sockets welcomed again",
            f"{found['seconds']:.2f} s", found["seconds"], "(no target)", None)
        # The node left takes the storm: its lease (3 s, renewed every
        # second) must not come near expiring. Past 2 s, the node warns.
        add(name, "longest gap between the lease renewals of the node left",
            f"{found['lease_gap']:.2f} s", found["lease_gap"], "<= 2 s",
            found["lease_gap"] <= 2)


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------


def _n(value, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _busiest_other(found: dict) -> str:
    subject = (found.get("subject") or "").split("+")
    util = {name: value for name, value in (found.get("util") or {}).items()
            if name not in subject and value is not None}
    if not util:
        return "-"
    name = max(util, key=util.get)
    return f"{name} {util[name] * 100:.0f} %"


def table(document: dict) -> str:
    results, machine = document["results"], document["machine"]
    lines = [f"RedMessenger bench, {document['started']} ({document['mode']} sizes)",
             f"{machine['cpu_model']}, {machine['cpus']} CPUs, Python {machine['python']}, "
             f"Twisted {machine['packages']['twisted']}, Autobahn "
             f"{machine['packages']['autobahn']}, txredisapi {machine['packages']['txredisapi']}"
             f", hiredis {machine['packages']['hiredis']}; {machine['redis_server']}",
             "RedMessenger {version} at {path}".format(**machine["redmessenger"])
             + (f" (commit {machine['redmessenger']['commit'][:12]}"
                + (", with changes" if machine["redmessenger"].get("dirty") else "") + ")"
                if machine["redmessenger"].get("commit") else ""),
             ("measured process pinned to CPU {measured_process}, everything else to "
              "{everything_else}".format(**machine["pinning"]) if machine["pinning"]
              else "no CPU pinning") + f"; load average at start {machine['loadavg']}",
             ""]
    if document.get("repeat", 1) > 1:
        lines[-1:-1] = [f"each scenario ran {document['repeat']} times: the median run is shown "
                        "(all runs in results.json)"]
    if document.get("interrupted"):
        lines[-1:-1] = ["INTERRUPTED: only the scenarios that finished are here"]
    head = ("scenario", "sent", "received", "ok", "seconds", "rate", "unit", "CPU s",
            "CPU %", "stolen %", "µs/item", "busiest other")
    rows = [head]
    for found in results.values():
        if found.get("error"):
            rows.append((found["name"], "-", "-", "FAIL", "-", "-", "-", "-", "-", "-", "-",
                         found["error"][:60]))
            continue
        rows.append((found["name"], _n(found["sent"]), _n(found["received"]),
                     "yes" if found["ok"] else "NO", _n(found["seconds"], 2),
                     _n(found["rate"]), found["unit"], _n(found["subject_cpu"], 2),
                     _n((found["subject_util"] or 0) * 100),
                     _n((found["subject_stolen"] or 0) * 100),
                     _n(found["subject_us_per_item"], 1), _busiest_other(found)))
    lines += _columns(rows)
    lines.append("")
    lines.append("CPU s, CPU % and µs/item are the measured process's (RedMessenger, or the "
                 "baseline's server or subscriber);")
    lines.append("CPU % near 100 means it was the bottleneck, as it should be; stolen % is the "
                 "share of the time it")
    lines.append("was ready to run but another process (of this run or not) had its CPU: "
                 "high means a busy machine.")
    details = []
    limit = document["limits"]
    for name, value in limit.items():
        if value:
            details.append(f"one-process limit for {name}: {value:,.0f} msg/s "
                           "(1 / (1/raw-recv + 1/raw-send))")
    found = results.get("group")
    if found and not found.get("error"):
        details.append(f"group: {_n(found['deliveries_per_s'])} deliveries/s, "
                       f"{_n(found['stores_per_s'])} stores/s ({found['messages']:,} messages "
                       f"x {found['members']:,} members, {found['online']:,} online)")
    found = results.get("latency")
    if found and not found.get("error"):
        details.append("latency: " + ", ".join(
            f"p{label} {found[f'p{label}_ms']:.2f} ms" for label in ("50", "90", "99", "99.9"))
            + f", max {found['max_ms']:.2f} ms over {found['samples']:,} messages at "
            f"{found['requested_rate']:,}/s requested, {found['rate']:,.0f}/s achieved")
    for name in ("drain", "drain-ack", "drain-1m"):
        found = results.get(name)
        if found and not found.get("error"):
            details.append(f"{name}: RSS {found['rss_before'] / MiB:.1f} MiB before, peak "
                           f"{found['rss_peak'] / MiB:.1f} MiB (+{found['rss_growth'] / MiB:.1f})")
    for found in results.values():
        if found.get("nodes") and not found.get("error"):
            details.append(f"{found['name']}: " + ", ".join(
                f"{name}{' (storer)' if node['storer'] else ''}"
                f"{' with users' if node['serving'] else ' without users'} "
                f"{node['us_per_message']:.2f} µs/msg" for name, node in found["nodes"].items()))
    for name in ("failover", "failover-user-node"):
        found = results.get(name)
        if found and not found.get("error"):
            details.append(
                f"{name}: {found['sent']:,} sockets ({found['ack_users']:,} in ack mode with "
                f"{found['in_flight']:,} messages in flight) reconnecting with 0-"
                f"{found['jitter']:g} s jitter: all welcomed {found['seconds']:.2f} s after "
                "the kill; "
                + (f"the other node storing after {found['storer_after']:.2f} s; "
                   if found["storer_after"] is not None else "")
                + f"{found['came_connected']:,} in-flight messages came again "
                + (f"(the last {found['came_after']:.2f} s after the kill)"
                   if found["came_after"] is not None else "before the deadline")
                + f", {found['came_on_next_connect']:,} only on the user's next connect, "
                f"{found['lost']:,} lost")
    found = results.get("connections")
    if found and not found.get("error") and found.get("rss_per_connection") is not None:
        details.append(f"connections: RSS {found['rss_before'] / MiB:.1f} -> "
                       f"{found['rss_after'] / MiB:.1f} MiB for {found['received']:,} "
                       f"connections, {found['rss_per_connection'] / KiB:.1f} KiB each")
    if details:
        lines += details + [""]
    targets = document["targets"]
    if targets:
        rows = [("target", "scenario", "measured", "ratio", "goal", "result")]
        for target in targets:
            rows.append((target["target"], target["scenario"], target["measured"],
                         target["shown"],
                         target["goal"], {True: "met", False: "MISSED", None: "-"}[
                             target["pass"]]))
        lines += _columns(rows) + [""]
    problems = [f"{found['name']}: {check}" for found in results.values()
                for check in found.get("checks", [])]
    problems += document.get("notes", [])
    if problems:
        lines.append("Problems:")
        lines += ["  " + problem for problem in problems]
        lines.append("")
    return "\n".join(lines)


def _columns(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    out = []
    for index, row in enumerate(rows):
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [str(cell).ljust(width) if i == 0 or not _numeric(str(cell))
                 else str(cell).rjust(width) for i, (cell, width) in pairs]
        out.append("  ".join(cells).rstrip())
        if index == 0:
            out.append("  ".join("-" * width for width in widths))
    return out


def _numeric(text: str) -> bool:
    return bool(text) and (text[0].isdigit() or text == "-")


# --------------------------------------------------------------------------
# The picture
# --------------------------------------------------------------------------


def bar_goals(document: dict) -> dict[str, float]:
    """The rate each throughput target asks of a scenario, in this run."""
    results, limit = document["results"], document["limits"]
    goals = {"store": 100_000.0, "connections": 2_000.0}
    for name in ("live-1", "live-100"):
        if limit.get(name):
            goals[name] = 0.6 * limit[name]
    send = _rate(results, "raw-send-1")
    if send:
        goals["drain"] = 0.6 * send
    plain = _rate(results, "live-1")
    if plain:
        goals["live-1-ack"] = plain / 2
    return goals


def picture(document: dict, out: Path) -> str | None:
    """results.png: the latency CDF and the throughput of each scenario.
    Returns why not, if it could not be drawn."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no results.png"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    results = document["results"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(15, 6.5),
                                         gridspec_kw={"width_ratios": [1, 1.3]})
    found = results.get("latency")
    samples_file = out / found["samples_file"] if found and found.get("samples_file") else None
    if samples_file is not None and samples_file.exists():
        samples = array("q")
        samples.frombytes(samples_file.read_bytes())
        ordered = sorted(value / 1e6 for value in samples)
        count = len(ordered)
        # A logit y axis spreads out the tail: 0.5, 0.9, 0.99, 0.999 are
        # equally far apart.
        left.plot(ordered, [(i + 0.5) / count for i in range(count)], color="tab:blue")
        left.set_xscale("log")
        left.set_yscale("logit")
        levels = [level for level in (0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
                  if 1 / count <= level <= 1 - 1 / count]
        left.set_yticks(levels, [f"{level * 100:g} %" for level in levels])
        left.yaxis.set_minor_locator(NullLocator())
        for label, colour in (("50", "tab:green"), ("99", "tab:orange"), ("99.9", "tab:red")):
            value = found[f"p{label}_ms"]
            left.axvline(value, color=colour, linestyle=":",
                         label=f"p{label} {value:.2f} ms")
        for goal, level in ((5, 0.99), (20, 0.999)):
            left.plot([goal], [level], marker="x", color="black", markersize=9)
        left.set_title(f"latency, PUBLISH to receipt: {found['requested_rate']:,} msg/s to "
                       f"{found['users']} users (x: targets p99 5 ms, p99.9 20 ms)")
        left.set_xlabel("milliseconds (log)")
        left.set_ylabel("fraction of messages received within (logit)")
        left.grid(True, which="both", alpha=0.3)
        left.legend(loc="lower right")
        left.title.set_fontsize(9)
    else:
        left.text(0.5, 0.5, "no latency scenario in this run", ha="center", va="center")
        left.set_axis_off()
    goals = bar_goals(document)
    names, rates, colours, marks = [], [], [], []
    for found in results.values():
        if found.get("error") or not found.get("rate"):
            continue
        names.append(f"{found['name']} ({found['unit']})")
        rates.append(found["rate"])
        marks.append(goals.get(found["name"]))
        colours.append("tab:grey" if found.get("kind") == "baseline"
                       else "tab:blue" if found["ok"] else "tab:red")
    if rates:
        positions = range(len(rates))
        right.barh(positions, rates, color=colours)
        right.set_yticks(list(positions), names)
        right.invert_yaxis()
        right.set_xscale("log")
        for position, rate, mark in zip(positions, rates, marks, strict=True):
            right.text(rate, position, f" {rate:,.0f}", va="center", fontsize=8)
            if mark:
                right.plot([mark, mark], [position - 0.42, position + 0.42], color="black",
                           linewidth=2)
        right.set_title("throughput per scenario (grey: baselines; black bar: the target's "
                        "rate; log scale)")
        right.title.set_fontsize(9)
        right.set_xlabel("per second")
        right.grid(True, axis="x", which="both", alpha=0.3)
    figure.suptitle(f"RedMessenger bench, {document['started']} ({document['mode']}), "
                    f"{document['machine']['cpu_model']}, {document['machine']['cpus']} CPUs",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(out / "results.png", dpi=110)
    plt.close(figure)
    return None


# --------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------


def summarize_profile(raw: Path, top: int = 25) -> str:
    """py-spy's collapsed stacks as the functions with the most samples:
    self (on top of the stack) and total (anywhere in it)."""
    own: Counter = Counter()
    total: Counter = Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        count = int(count)
        samples += count
        frames = [frame.strip() for frame in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if not samples:
        return "no samples\n"
    lines = [f"{samples} samples of the RedMessenger process", "", "self %  function"]
    lines += [f"{count * 100 / samples:6.1f}  {frame}" for frame, count in own.most_common(top)]
    lines += ["", "total %  function"]
    lines += [f"{count * 100 / samples:7.1f}  {frame}" for frame, count in total.most_common(top)]
    return "\n".join(lines) + "\n"


def write(document: dict, out: Path) -> list[str]:
    """results.json, results.txt and results.png; notes for the console."""
    notes = []
    (out / "results.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    text = table(document)
    (out / "results.txt").write_text(text + "\n")
    why = picture(document, out)
    if why:
        notes.append(why)
    return notes
