"""The coordinator: starts every process a scenario needs, measures, checks
and stops them, one scenario after the other."""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import wire
from .proc import BenchError, Process, accepting, free_port, wait_until
from .resp import Redis

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
#: How long a process gets to start, and to stop after SIGTERM.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
#: How long the coordinator polls Redis between checks while waiting.
POLL = 0.002


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is; ``--smoke`` and ``--scale`` change them."""

    raw: int = 200_000
    live: int = 200_000
    live_users: int = 100
    group_members: int = 1_000
    group_online: int = 500
    group_messages: int = 1_000
    store: int = 200_000
    store_users: int = 100
    drain: int = 100_000
    drain_big: int = 1_000_000
    latency_rate: int = 10_000
    latency_seconds: float = 10.0
    latency_users: int = 100
    connections: int = 10_000
    payload_size: int = wire.PAYLOAD_SIZE
    #: Handshakes a client keeps in flight (Twisted listens with a backlog of 50).
    concurrency: int = 50

    def scaled(self, factor: float) -> Sizes:
        def s(value: int) -> int:
            return max(1, int(value * factor))
        return replace(self, raw=s(self.raw), live=s(self.live), store=s(self.store),
                       group_messages=s(self.group_messages), drain=s(self.drain),
                       drain_big=s(self.drain_big), connections=s(self.connections),
                       latency_seconds=max(0.5, self.latency_seconds * factor))


FULL = Sizes()
SMOKE = Sizes(raw=2_000, live=2_000, live_users=10, group_members=40, group_online=20,
              group_messages=50, store=2_000, store_users=10, drain=2_000, drain_big=5_000,
              latency_rate=1_000, latency_seconds=1.0, latency_users=10, connections=200)


@dataclass
class Scenario:
    name: str
    kind: str  # "baseline" or "scenario"
    description: str
    run: Callable[[Bench], dict]
    needs: tuple[str, ...] = ()


# --------------------------------------------------------------------------
# One scenario's processes
# --------------------------------------------------------------------------


class Stage:
    """The processes of one scenario, stopped in reverse order at the end
    (clients before RedMessenger, RedMessenger before Redis)."""

    def __init__(self, bench: Bench, name: str) -> None:
        self.bench = bench
        # Logs and files of a repeated scenario's later runs get a suffix.
        self.name = name + bench.suffix
        self.processes: list[Process] = []
        # Every process of the stage runs here (redis-server keeps its files
        # here too), so a leftover would be easy to find; removed at the end.
        self.work = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=bench.work))
        self.redis_port = 0
        self.redis: Redis | None = None
        self.rm: Process | None = None
        self.rm_port = 0
        self.profiler: Process | None = None

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.profile_stop()
            for process in reversed(self.processes):
                try:
                    self.stop(process)
                except Exception as e:  # stop the others all the same
                    print(f"  ! could not stop {process.name} (pid {process.pid}): {e}",
                          file=sys.stderr)
        finally:
            if self.redis is not None:
                self.redis.close()
            shutil.rmtree(self.work, ignore_errors=True)

    def _spawn(self, name: str, argv: list[str], *, control: bool = False,
               subject: bool = False, cwd: Path | None = None) -> Process:
        process = Process(name, argv, log_path=self.bench.logs / f"{self.name}.{name}.log",
                          env=self.bench.env, cwd=cwd or self.work, control=control,
                          cpus=self.bench.subject_cpus if subject else None)
        self.processes.append(process)
        return process

    def stop(self, process: Process) -> int | None:
        if process not in self.processes:
            return process.popen.returncode
        self.processes.remove(process)
        return process.stop(STOP_TIMEOUT)

    # -- the processes --------------------------------------------------------

    def start_redis(self) -> Redis:
        from redmessenger.redisserver import find_redis_server, server_arguments

        self.redis_port = free_port()
        argv = [find_redis_server(), *server_arguments(self.redis_port, self.work,
                                                       appendonly=False),
                # The bench publishes faster than anyone can read: lift the
                # pub/sub output buffer limit (32 MB hard by default), or
                # Redis would drop the subscriber mid-scenario.
                "--client-output-buffer-limit", "pubsub", "0", "0", "0"]
        process = self._spawn("redis", argv)
        wait_until(lambda: accepting(self.redis_port), "redis-server to listen",
                   START_TIMEOUT, process.alive)
        self.redis = Redis(self.redis_port)
        self.redis.command("PING")
        return self.redis

    def start_rm(self, *extra: str) -> Process:
        self.rm_port = free_port()
        argv = [str(self.bench.twistd), "-n", "redmessenger",
                "--port", f"tcp:{self.rm_port}:interface={HOST}",
                "--redis", f"redis://{HOST}:{self.redis_port}", "--auth", "off",
                *self.bench.rm_args, *extra]
        self.rm = self._spawn("redmessenger", argv, subject=True)
        wait_until(lambda: accepting(self.rm_port), "RedMessenger to listen",
                   START_TIMEOUT, self.rm.alive)
        wait_until(lambda: self.redis.command("PUBSUB", "NUMPAT") >= 2,
                   "RedMessenger to PSUBSCRIBE", START_TIMEOUT, self.rm.alive)
        return self.rm

    def stop_rm(self) -> None:
        """Stop RedMessenger now (it gives back to Redis what it holds)."""
        if self.rm is not None:
            self.stop(self.rm)

    def start_worker(self, module: str, *, subject: bool = False) -> Process:
        return self._spawn(module, [sys.executable, "-m", f"bench.{module}"],
                           control=True, subject=subject)

    def start_publisher(self, prepare: dict) -> Process:
        """A publisher, connected and with its commands built: ``go`` starts it."""
        publisher = self.start_worker("publisher")
        publisher.call({"cmd": "prepare", **prepare}, "prepared", START_TIMEOUT)
        return publisher

    def snapshot(self) -> dict:
        """Now, and the CPU seconds of every live process so far (and how
        long each waited for a CPU while it could have run)."""
        cpu, waited = {}, {}
        for process in self.processes:
            try:
                cpu[process.name] = process.cpu()
                waited[process.name] = process.waited()
            except OSError:
                pass
        return {"t": time.monotonic(), "cpu": cpu, "waited": waited}

    # -- profiling ----------------------------------------------------------

    def profile_start(self, process: Process) -> None:
        if not self.bench.profile:
            return
        path = self.bench.out / f"profile-{self.name}.txt"
        self.profiler = Process(
            "py-spy", [self.bench.pyspy, "record", "--pid", str(process.pid), "--rate", "250",
                       "--format", "raw", "--function", "--nonblocking",
                       "--output", str(path) + ".raw"],
            log_path=self.bench.logs / f"{self.name}.py-spy.log")
        time.sleep(0.5)  # py-spy attaches

    def profile_stop(self) -> None:
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        profiler.stop(STOP_TIMEOUT, sig=signal.SIGINT)
        raw = self.bench.out / f"profile-{self.name}.txt.raw"
        if raw.exists():
            from .report import summarize_profile

            (self.bench.out / f"profile-{self.name}.txt").write_text(summarize_profile(raw))


# --------------------------------------------------------------------------
# Expectations and checks
# --------------------------------------------------------------------------


def spread(n: int, users: int) -> list[tuple[int, int]]:
    """(count, sum of seqs) of each user when message ``seq`` of ``n`` goes
    to user ``seq % users``."""
    result = []
    for index in range(users):
        count = (n - index + users - 1) // users if index < n else 0
        # index, index + users, ..., index + (count - 1) * users
        result.append((count, count * index + users * count * (count - 1) // 2))
    return result


def check_clients(checks: list[str], waited: dict, expected: dict[str, tuple[int, int]]) -> int:
    """Every user got exactly its messages, in order; the total received."""
    per_user = waited["per_user"]
    wrong = [uid for uid, want in expected.items() if tuple(per_user.get(uid, (0, 0))) != want]
    if wrong:
        uid = wrong[0]
        checks.append(f"{len(wrong)} users got other messages than were sent to them "
                      f"(e.g. {uid}: count, seqsum {per_user.get(uid)} instead of "
                      f"{list(expected[uid])})")
    for key, what in (("order_errors", "messages out of order or twice"),
                      ("other_frames", "unexpected frames"),
                      ("lost", "connections lost")):
        if waited.get(key):
            checks.append(f"{waited[key]} {what}")
    if waited.get("errors"):
        checks.append("client: " + "; ".join(waited["errors"][:3]))
    if not waited.get("reached"):
        checks.append("not everything arrived before the deadline")
    return sum(count for count, _ in per_user.values())


def check_published(checks: list[str], published: dict) -> None:
    if published["zero"]:
        checks.append(f"{published['zero']} PUBLISHes reached no subscriber")
    if published["errors"]:
        checks.append("PUBLISH errors: " + "; ".join(published["errors"]))


def check_rm_log(checks: list[str], stage: Stage) -> None:
    path = stage.bench.logs / f"{stage.name}.redmessenger.log"
    if not path.exists():
        return
    bad = [line for line in path.read_text(errors="replace").splitlines()
           if "Traceback" in line or "#critical]" in line or "#error]" in line]
    if bad:
        checks.append(f"RedMessenger logged {len(bad)} errors, first: {bad[0][:200]}")


def queue_contents(redis: Redis, uids: list[str]) -> dict[str, list[int]]:
    """The payload sequence numbers stored in each user's queue, in order."""
    import json

    found = {}
    for start in range(0, len(uids), 50):
        batch = uids[start:start + 50]
        replies = redis.pipeline([("LRANGE", wire.queue_key(uid), 0, -1) for uid in batch])
        for uid, entries in zip(batch, replies, strict=True):
            found[uid] = [wire.seq_of(json.loads(entry)["payload"].encode())
                          for entry in entries]
    return found


def leftovers(redis: Redis, uids: list[str]) -> int:
    """Entries still in these users' queues or drain claims."""
    total = sum(redis.pipeline([("LLEN", wire.queue_key(uid)) for uid in uids]))
    cursor = b"0"
    while True:
        cursor, keys = redis.command("SCAN", cursor, "MATCH", f"{wire.PREFIX}:users:*:taking:*",
                                     "COUNT", 1000)
        for key in keys:
            total += redis.command("LLEN", key)
        if cursor == b"0":
            return total


def measure(snap0: dict, snap1: dict, seconds: float, subject: str) -> dict:
    cpu = {name: round(snap1["cpu"][name] - value, 3)
           for name, value in snap0["cpu"].items() if name in snap1["cpu"]}
    busy = {name: round(value / seconds, 3) if seconds > 0 else None
            for name, value in cpu.items()}
    waited = {name: round(snap1["waited"][name] - value, 3)
              for name, value in snap0["waited"].items() if name in snap1["waited"]}
    return {"cpu": cpu, "util": busy, "runqueue_wait": waited, "subject": subject,
            "subject_cpu": cpu.get(subject), "subject_util": busy.get(subject),
            # The share of the interval the measured process was runnable
            # but another process had its CPU: a busy machine, not a slow
            # program.
            "subject_stolen": (round(waited[subject] / seconds, 3)
                               if subject in waited and seconds > 0 else None)}


def result(name: str, *, sent: int, received: int, checks: list[str], seconds: float,
           count: int, unit: str, snap0: dict, snap1: dict, subject: str = "redmessenger",
           **extra) -> dict:
    rate = count / seconds if seconds > 0 else None
    found = {"name": name, "sent": sent, "received": received,
             "ok": sent == received and not checks, "checks": checks,
             "seconds": round(seconds, 4), "count": count, "rate": rate, "unit": unit,
             **measure(snap0, snap1, seconds, subject), **extra}
    subject_cpu = found["subject_cpu"]
    found["subject_us_per_item"] = (subject_cpu / count * 1e6
                                    if subject_cpu is not None and count else None)
    return found


def deadline(n: int, least_rate: float = 2000.0) -> float:
    """Seconds a scenario of n items may take before it is called failed:
    it must move at least ``least_rate`` of them a second."""
    return 30.0 + n / least_rate


# --------------------------------------------------------------------------
# The scenarios
# --------------------------------------------------------------------------


def uids_of(kind: str, count: int) -> list[str]:
    return [f"bench-{kind}-{index}" for index in range(count)]


def raw_recv(bench: Bench) -> dict:
    n = bench.sizes.raw
    with Stage(bench, "raw-recv") as stage:
        stage.start_redis()
        subscriber = stage.start_worker("rawsub", subject=True)
        subscriber.call({"cmd": "subscribe", "port": stage.redis_port,
                         "patterns": [f"{wire.PREFIX}.users.*", f"{wire.PREFIX}.groups.*"]},
                        "subscribed", START_TIMEOUT)
        publisher = stage.start_publisher({
            "port": stage.redis_port, "n": n, "targets": [wire.user_channel("bench-u-0")],
            "payload_size": bench.sizes.payload_size, "timeout": deadline(n)})
        snap0 = stage.snapshot()
        publisher.send({"cmd": "go"})
        published = publisher.receive("published", deadline(n) + 5)
        waited = subscriber.call({"cmd": "wait", "total": n, "timeout": deadline(n)},
                                 "waited", deadline(n) + 5)
        snap1 = stage.snapshot()
        checks: list[str] = []
        check_published(checks, published)
        if waited["seqsum"] != n * (n - 1) // 2 or waited["order_errors"]:
            checks.append("the subscriber got other messages than were published")
        return result("raw-recv", sent=n, received=waited["received"], checks=checks,
                      seconds=waited["t_target"] - published["t_start"], count=n,
                      unit="msg/s", snap0=snap0, snap1=snap1, subject="rawsub",
                      publish_rate=n / (published["t_sent"] - published["t_start"]))


def raw_send(users: int) -> Callable[[Bench], dict]:
    def run(bench: Bench) -> dict:
        n = bench.sizes.raw
        name = f"raw-send-{users}"
        uids = uids_of("u", users)
        with Stage(bench, name) as stage:
            server = stage.start_worker("rawws", subject=True)
            port = free_port()
            server.call({"cmd": "listen", "port": port}, "listening", START_TIMEOUT)
            client = stage.start_worker("wsclient")
            opened = client.call({"cmd": "open", "port": port, "uids": uids,
                                  "concurrency": bench.sizes.concurrency},
                                 "opened", START_TIMEOUT + 5)
            if opened["welcomed"] != users:
                raise BenchError(f"only {opened['welcomed']} of {users} connected: "
                                 f"{opened['errors']}")
            snap0 = stage.snapshot()
            server.send({"cmd": "send", "uids": uids, "n": n,
                         "payload_size": bench.sizes.payload_size})
            sent = server.receive("sent", deadline(n))
            waited = client.call({"cmd": "wait", "total": n, "timeout": deadline(n),
                                  "settle": bench.settle}, "waited", deadline(n) + 5)
            snap1 = stage.snapshot()
            checks: list[str] = []
            expected = dict(zip(uids, spread(n, users), strict=True))
            received = check_clients(checks, waited, expected)
            return result(name, sent=n, received=received, checks=checks,
                          seconds=waited["t_target"] - sent["t_start"], count=n, unit="msg/s",
                          snap0=snap0, snap1=snap1, subject="rawws",
                          send_loop_rate=n / (sent["t_end"] - sent["t_start"]))
    return run


def live(users: int, ack: bool = False) -> Callable[[Bench], dict]:
    def run(bench: Bench) -> dict:
        n = bench.sizes.live
        users_now = bench.sizes.live_users if users != 1 else 1
        name = f"live-{users}" + ("-ack" if ack else "")
        uids = uids_of("u", users_now)
        with Stage(bench, name) as stage:
            redis = stage.start_redis()
            rm = stage.start_rm()
            client = stage.start_worker("wsclient")
            opened = client.call({"cmd": "open", "port": stage.rm_port, "uids": uids,
                                  "ack": ack, "concurrency": bench.sizes.concurrency},
                                 "opened", START_TIMEOUT + 5)
            if opened["welcomed"] != users_now:
                raise BenchError(f"only {opened['welcomed']} of {users_now} connected: "
                                 f"{opened['errors']}")
            publisher = stage.start_publisher({
                "port": stage.redis_port, "n": n,
                "targets": [wire.user_channel(uid) for uid in uids],
                "payload_size": bench.sizes.payload_size, "timeout": deadline(n)})
            stage.profile_start(rm)
            snap0 = stage.snapshot()
            publisher.send({"cmd": "go"})
            published = publisher.receive("published", deadline(n) + 5)
            waited = client.call({"cmd": "wait", "total": n, "timeout": deadline(n),
                                  "settle": bench.settle}, "waited", deadline(n) + 5)
            snap1 = stage.snapshot()
            stage.profile_stop()
            checks: list[str] = []
            check_published(checks, published)
            expected = dict(zip(uids, spread(n, users_now), strict=True))
            received = check_clients(checks, waited, expected)
            client.call({"cmd": "close"}, "closed", 15)
            stage.stop_rm()
            left = leftovers(redis, uids)
            if left:
                checks.append(f"{left} messages were stored or given back to Redis "
                              "though every one was delivered" + (" and acked" if ack else ""))
            check_rm_log(checks, stage)
            return result(name, sent=n, received=received, checks=checks,
                          seconds=waited["t_target"] - published["t_start"], count=n,
                          unit="msg/s", snap0=snap0, snap1=snap1, users=users_now, ack=ack,
                          publish_rate=n / (published["t_sent"] - published["t_start"]))
    return run


def group(bench: Bench) -> dict:
    sizes = bench.sizes
    n, gid = sizes.group_messages, "bench-g"
    members = uids_of("m", sizes.group_members)
    online = members[:sizes.group_online]
    offline = members[sizes.group_online:]
    with Stage(bench, "group") as stage:
        redis = stage.start_redis()
        redis.command("RPUSH", wire.members_key(gid), *members)
        rm = stage.start_rm()
        client = stage.start_worker("wsclient")
        opened = client.call({"cmd": "open", "port": stage.rm_port, "uids": online,
                              "concurrency": sizes.concurrency}, "opened", START_TIMEOUT + 5)
        if opened["welcomed"] != len(online):
            raise BenchError(f"only {opened['welcomed']} of {len(online)} connected: "
                             f"{opened['errors']}")
        deliveries, stores = n * len(online), n * len(offline)
        limit = deadline(deliveries + stores)
        publisher = stage.start_publisher({
            "port": stage.redis_port, "n": n, "targets": [wire.group_channel(gid)],
            "payload_size": sizes.payload_size, "timeout": limit})
        stage.profile_start(rm)
        snap0 = stage.snapshot()
        publisher.send({"cmd": "go"})
        client.send({"cmd": "wait", "total": deliveries, "timeout": limit,
                     "settle": bench.settle})
        # Stores are done when the last offline member has the last message
        # (RedMessenger writes in order on one connection): watch for that
        # while the client counts deliveries.
        last_queue = wire.queue_key(offline[-1]) if offline else None
        t_stores = 0.0 if last_queue else time.monotonic()
        end = time.monotonic() + limit
        waited = None
        while waited is None or not t_stores:
            if time.monotonic() > end:
                raise BenchError("timed out waiting for group deliveries and stores")
            if waited is None and client.ready():
                waited = client.receive("waited", 1)
            if not t_stores and redis.command("LLEN", last_queue) >= n:
                t_stores = time.monotonic()
            time.sleep(POLL)
        published = publisher.receive("published", limit)
        snap1 = stage.snapshot()
        stage.profile_stop()
        checks: list[str] = []
        check_published(checks, published)
        received = check_clients(checks, waited, {uid: (n, n * (n - 1) // 2) for uid in online})
        stored = queue_contents(redis, offline)
        wrong = [uid for uid in offline if stored[uid] != list(range(n))]
        if wrong:
            checks.append(f"{len(wrong)} offline members' queues are not the {n} messages "
                          f"in order (e.g. {wrong[0]}: {len(stored[wrong[0]])} entries)")
        stored_ok = sum(len(stored[uid]) for uid in offline)
        client.call({"cmd": "close"}, "closed", 15)
        check_rm_log(checks, stage)
        t_start = published["t_start"]
        t_end = max(waited["t_target"], t_stores)
        found = result("group", sent=deliveries + stores, received=received + stored_ok,
                       checks=checks, seconds=t_end - t_start, count=deliveries + stores,
                       unit="copies/s", snap0=snap0, snap1=snap1, messages=n,
                       members=len(members), online=len(online), deliveries=deliveries,
                       stores=stores, delivered=received, stored=stored_ok)
        found["deliveries_per_s"] = (deliveries / (waited["t_target"] - t_start)
                                     if waited["t_target"] > t_start else None)
        found["stores_per_s"] = stores / (t_stores - t_start) if stores else None
        return found


def store(bench: Bench) -> dict:
    n, users = bench.sizes.store, bench.sizes.store_users
    uids = uids_of("s", users)
    expected = spread(n, users)
    last_uid = uids[(n - 1) % users]
    with Stage(bench, "store") as stage:
        redis = stage.start_redis()
        rm = stage.start_rm()
        publisher = stage.start_publisher({
            "port": stage.redis_port, "n": n, "targets": [wire.user_channel(uid) for uid in uids],
            "payload_size": bench.sizes.payload_size, "timeout": deadline(n)})
        stage.profile_start(rm)
        snap0 = stage.snapshot()
        publisher.send({"cmd": "go"})
        want = expected[(n - 1) % users][0]
        key = wire.queue_key(last_uid)
        wait_until(lambda: redis.command("LLEN", key) >= want, "the last store",
                   deadline(n), rm.alive, interval=POLL)
        t_end = time.monotonic()
        snap1 = stage.snapshot()
        stage.profile_stop()
        published = publisher.receive("published", deadline(n))
        checks: list[str] = []
        check_published(checks, published)
        stored = queue_contents(redis, uids)
        wrong = [uid for index, uid in enumerate(uids)
                 if stored[uid] != list(range(index, n, users))]
        if wrong:
            checks.append(f"{len(wrong)} queues are not their messages in order "
                          f"(e.g. {wrong[0]}: {len(stored[wrong[0]])} entries)")
        check_rm_log(checks, stage)
        return result("store", sent=n, received=sum(len(v) for v in stored.values()),
                      checks=checks, seconds=t_end - published["t_start"], count=n,
                      unit="stores/s", snap0=snap0, snap1=snap1, users=users)


def fill_queue(redis: Redis, uid: str, n: int, size: int) -> None:
    """n envelopes in the user's queue, as RedMessenger would have stored them."""
    source = wire.user_channel(uid).encode()
    boot = os.urandom(8).hex().encode()
    timestamp = int(time.time() * 1000)
    key = wire.queue_key(uid)
    for first in range(0, n, 100_000):
        commands = []
        for start in range(first, min(n, first + 100_000), 1000):
            commands.append(("RPUSH", key, *(
                wire.ENVELOPE % (boot, seq + 1, source, timestamp, wire.payload(seq, 0, size))
                for seq in range(start, min(n, start + 1000)))))
        redis.pipeline(commands)


def drain(name: str, big: bool = False, ack: bool = False) -> Callable[[Bench], dict]:
    def run(bench: Bench) -> dict:
        n = bench.sizes.drain_big if big else bench.sizes.drain
        uid = "bench-d-0"
        with Stage(bench, name) as stage:
            redis = stage.start_redis()
            fill_queue(redis, uid, n, bench.sizes.payload_size)
            rm = stage.start_rm()
            time.sleep(bench.settle)
            before = rm.memory()
            client = stage.start_worker("wsclient")
            stage.profile_start(rm)
            snap0 = stage.snapshot()
            opened = client.call({"cmd": "open", "port": stage.rm_port, "uids": [uid],
                                  "ack": ack}, "opened", START_TIMEOUT)
            if opened["welcomed"] != 1:
                raise BenchError(f"could not connect: {opened['errors']}")
            waited = client.call({"cmd": "wait", "total": n, "timeout": deadline(n),
                                  "settle": bench.settle}, "waited", deadline(n) + 5)
            snap1 = stage.snapshot()
            stage.profile_stop()
            after = rm.memory()
            checks: list[str] = []
            if opened["queued"] != n:
                checks.append(f"the welcome said {opened['queued']} queued, not {n}")
            received = check_clients(checks, waited, {uid: (n, n * (n - 1) // 2)})
            client.call({"cmd": "close"}, "closed", 15)
            stage.stop_rm()
            left = leftovers(redis, [uid])
            if left:
                checks.append(f"{left} messages left in Redis after the drain")
            check_rm_log(checks, stage)
            return result(name, sent=n, received=received, checks=checks,
                          seconds=waited["t_target"] - opened["t_first_hello"], count=n,
                          unit="msg/s", snap0=snap0, snap1=snap1, ack=ack,
                          rss_before=before["VmRSS"], rss_after=after["VmRSS"],
                          rss_peak=after["VmHWM"],
                          rss_growth=after["VmHWM"] - before["VmRSS"])
    return run


def latency(bench: Bench) -> dict:
    sizes = bench.sizes
    rate, users = sizes.latency_rate, sizes.latency_users
    n = int(rate * sizes.latency_seconds)
    uids = uids_of("l", users)
    with Stage(bench, "latency") as stage:
        stage.start_redis()
        rm = stage.start_rm()
        client = stage.start_worker("wsclient")
        opened = client.call({"cmd": "open", "port": stage.rm_port, "uids": uids,
                              "latency": True, "concurrency": sizes.concurrency},
                             "opened", START_TIMEOUT + 5)
        if opened["welcomed"] != users:
            raise BenchError(f"only {opened['welcomed']} of {users} connected: "
                             f"{opened['errors']}")
        limit = sizes.latency_seconds + deadline(n)
        publisher = stage.start_publisher({
            "port": stage.redis_port, "n": n, "rate": rate,
            "targets": [wire.user_channel(uid) for uid in uids],
            "payload_size": sizes.payload_size, "timeout": limit})
        stage.profile_start(rm)
        snap0 = stage.snapshot()
        publisher.send({"cmd": "go"})
        published = publisher.receive("published", limit + 5)
        samples_path = bench.out / f"latency-samples{bench.suffix}.bin"
        waited = client.call({"cmd": "wait", "total": n, "timeout": deadline(n),
                              "settle": bench.settle, "latency_file": str(samples_path)},
                             "waited", deadline(n) + 5)
        snap1 = stage.snapshot()
        stage.profile_stop()
        checks: list[str] = []
        check_published(checks, published)
        received = check_clients(checks, waited, dict(zip(uids, spread(n, users), strict=True)))
        samples = array("q")
        with open(samples_path, "rb") as f:
            samples.frombytes(f.read())
        ordered = sorted(samples)
        client.call({"cmd": "close"}, "closed", 15)
        check_rm_log(checks, stage)
        seconds = waited["t_target"] - published["t_start"]
        return result("latency", sent=n, received=received, checks=checks, seconds=seconds,
                      count=n, unit="msg/s", snap0=snap0, snap1=snap1, users=users,
                      requested_rate=rate, samples=len(ordered),
                      **{f"p{label}_ms": percentile(ordered, q) / 1e6
                         for label, q in PERCENTILES},
                      max_ms=ordered[-1] / 1e6 if ordered else None,
                      samples_file=samples_path.name)


PERCENTILES = (("50", 0.50), ("90", 0.90), ("99", 0.99), ("99.9", 0.999))


def percentile(ordered: list[int], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def connections(bench: Bench) -> dict:
    n = bench.sizes.connections
    uids = uids_of("c", n)
    with Stage(bench, "connections") as stage:
        stage.start_redis()
        rm = stage.start_rm()
        time.sleep(bench.settle)
        before = rm.memory()
        client = stage.start_worker("wsclient")
        stage.profile_start(rm)
        snap0 = stage.snapshot()
        limit = deadline(n, least_rate=100)
        opened = client.call({"cmd": "open", "port": stage.rm_port, "uids": uids,
                              "concurrency": bench.sizes.concurrency, "timeout": limit},
                             "opened", limit + 5)
        snap1 = stage.snapshot()
        stage.profile_stop()
        time.sleep(max(bench.settle, 0.5))
        after = rm.memory()
        checks: list[str] = []
        if opened["failed"]:
            checks.append(f"{opened['failed']} connections failed: {opened['errors'][:3]}")
        welcomed = opened["welcomed"]
        client.call({"cmd": "close"}, "closed", 30)
        check_rm_log(checks, stage)
        found = result("connections", sent=n, received=welcomed, checks=checks,
                       seconds=opened["t_last"] - opened["t_first"], count=welcomed,
                       unit="conn/s", snap0=snap0, snap1=snap1, rss_before=before["VmRSS"],
                       rss_after=after["VmRSS"])
        found["rss_per_connection"] = ((after["VmRSS"] - before["VmRSS"]) / welcomed
                                       if welcomed else None)
        return found


SCENARIOS = [
    Scenario("raw-recv", "baseline", "hiredis subscriber (txredisapi) counting PUBLISHes, "
             "no RedMessenger", raw_recv),
    Scenario("raw-send-1", "baseline", "bare Autobahn server sending message-sized frames "
             "to 1 client, no Redis", raw_send(1)),
    Scenario("raw-send-100", "baseline", "bare Autobahn server sending message-sized frames "
             "round-robin to 100 clients, no Redis", raw_send(100)),
    Scenario("live-1", "scenario", "1 online user, direct messages published as fast as "
             "possible", live(1), ("raw-recv", "raw-send-1")),
    Scenario("live-100", "scenario", "100 online users, direct messages round-robin",
             live(100), ("raw-recv", "raw-send-100")),
    Scenario("live-1-ack", "scenario", "live-1 in ack mode (one cumulative ack per read)",
             live(1, ack=True), ("live-1",)),
    Scenario("group", "scenario", "one group of 1,000 members, half online: live "
             "deliveries and stores", group),
    Scenario("store", "scenario", "messages for 100 offline users, stored in Redis",
             store),
    Scenario("drain", "scenario", "stored messages drained to a user who connects "
             "(hello to last message)", drain("drain"), ("raw-send-1",)),
    Scenario("drain-ack", "scenario", "drain in ack mode", drain("drain-ack", ack=True),
             ("drain",)),
    Scenario("drain-1m", "scenario", "drain of a 1,000,000-message queue: peak memory",
             drain("drain-1m", big=True), ("drain",)),
    Scenario("latency", "scenario", "a steady rate to 100 online users: PUBLISH to "
             "receipt", latency),
    Scenario("connections", "scenario", "idle identified WebSocket connections: memory "
             "and connects+hellos per second", connections),
]
BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}


def with_needs(names: list[str]) -> list[str]:
    """The scenarios asked for plus those their ratios need, in suite order."""
    wanted: set[str] = set()

    def add(name: str) -> None:
        if name not in wanted:
            wanted.add(name)
            for need in BY_NAME[name].needs:
                add(need)

    for name in names:
        add(name)
    return [scenario.name for scenario in SCENARIOS if scenario.name in wanted]


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


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
        raise_fd_limit(self.sizes.connections + 1000)
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


def sizes_dict(sizes: Sizes) -> dict:
    return asdict(sizes)
