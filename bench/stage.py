"""The processes of one scenario: Redis, RedMessenger under twistd, the load
workers and the profiler, started for it and stopped in reverse order."""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import wire
from .proc import HOST, BenchError, Process, accepting, free_port, wait_until
from .resp import Redis

if TYPE_CHECKING:
    from .runner import Bench

#: How long a process gets to start, and to stop after SIGTERM.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
#: What a node logs once it is subscribed (redmessenger/subscriber.py).
READY = b"Subscribed to "


@dataclass(frozen=True)
class Node:
    """A RedMessenger process of the stage and the port it listens on."""

    process: Process
    port: int


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
        #: Every RedMessenger started, stopped or not (their logs are checked).
        self.nodes: list[Node] = []
        self.rm: Process | None = None
        self.rm_port = 0
        #: py-spy, with the file its summary goes to, per measured process.
        self.profilers: list[tuple[Process, Path]] = []

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.profile_stop()
            for process in reversed(self.processes):
                try:
                    self.stop(process)
                except Exception as e:  # stop the others all the same
                    print(
                        f"  ! could not stop {process.name} (pid {process.pid}): {e}",
                        file=sys.stderr,
                    )
        finally:
            if self.redis is not None:
                self.redis.close()
            shutil.rmtree(self.work, ignore_errors=True)

    def _spawn(
        self,
        name: str,
        argv: list[str],
        *,
        control: bool = False,
        subject: bool = False,
        cwd: Path | None = None,
    ) -> Process:
        process = Process(
            name,
            argv,
            log_path=self.bench.logs / f"{self.name}.{name}.log",
            env=self.bench.env,
            cwd=cwd or self.work,
            control=control,
            cpus=self.bench.subject_cpus if subject else None,
        )
        self.processes.append(process)
        return process

    def stop(self, process: Process, sig: int = signal.SIGTERM) -> int | None:
        """Stop one process now (``SIGKILL`` kills a node as a crash would)."""
        if process not in self.processes:
            return process.popen.returncode
        self.processes.remove(process)
        return process.stop(STOP_TIMEOUT, sig=sig)

    # -- the processes --------------------------------------------------------

    def start_redis(self) -> Redis:
        from redmessenger.redisserver import find_redis_server, server_arguments

        self.redis_port = free_port()
        argv = [
            find_redis_server(),
            *server_arguments(self.redis_port, self.work, appendonly=False),
            # The bench publishes faster than anyone can read: lift the
            # pub/sub output buffer limit (32 MB hard by default), or
            # Redis would drop the subscriber mid-scenario.
            "--client-output-buffer-limit",
            "pubsub",
            "0",
            "0",
            "0",
        ]
        process = self._spawn("redis", argv)
        wait_until(
            lambda: accepting(self.redis_port),
            "redis-server to listen",
            START_TIMEOUT,
            process.alive,
        )
        self.redis = Redis(self.redis_port)
        self.redis.command("PING")
        return self.redis

    def start_replica(self) -> Redis:
        """A replica of the stage's Redis, once in sync with it: what
        ``--redis-replicas-ack 1`` waits for."""
        from redmessenger.redisserver import find_redis_server, server_arguments

        # Not the 5 s a master waits by default for more replicas before a
        # diskless full sync.
        self.redis.command("CONFIG", "SET", "repl-diskless-sync-delay", "0")
        port = free_port()
        where = self.work / "replica"
        where.mkdir(exist_ok=True)
        process = self._spawn("replica", [
            find_redis_server(), *server_arguments(port, where, appendonly=False),
            "--replicaof", HOST, str(self.redis_port)])
        wait_until(lambda: accepting(port), "the replica to listen", START_TIMEOUT,
                   process.alive)
        replica = Redis(port)
        wait_until(
            lambda: b"master_link_status:up" in replica.command("INFO", "replication"),
            "the replica to sync",
            START_TIMEOUT,
            process.alive,
        )
        return replica

    def start_node(self, name: str, *extra: str) -> Node:
        """One more RedMessenger on the stage's Redis, on a port of its own,
        once it is ready: listening, subscribed, and storing for the
        partitions it took (so nothing published after this is missed).
        Every node gets the measured CPUs: the load keeps off them."""
        port = free_port()
        argv = [
            str(self.bench.twistd),
            "-n",
            "redmessenger",
            "--port",
            f"tcp:{port}:interface={HOST}",
            "--redis",
            f"redis://{HOST}:{self.redis_port}",
            "--auth",
            "off",
            *self.bench.rm_args,
            *extra,
        ]
        # A folder of its own: twistd keeps its twistd.pid in it.
        cwd = self.work / name
        cwd.mkdir()
        node = Node(self._spawn(name, argv, subject=True, cwd=cwd), port)
        self.nodes.append(node)
        alive = node.process.alive
        wait_until(lambda: accepting(port), f"{name} to listen", START_TIMEOUT, alive)
        # Logged once the subscriber is subscribed and the partitions the
        # node found vacant are its own.
        wait_until(
            lambda: READY in node.process.log(), f"{name} to subscribe", START_TIMEOUT, alive
        )
        return node

    def start_nodes(self, count: int) -> list[Node]:
        """``count`` nodes (``node-a``, ``node-b``...) on the stage's Redis,
        started one after the other, so that the first, alone then, holds
        every storer partition: checked, since which node stores is what
        the cluster scenarios compare."""
        nodes = [self.start_node(f"node-{chr(ord('a') + i)}") for i in range(count)]
        storers = self.storers()
        if set(storers.values()) != {nodes[0].process.name}:
            raise BenchError(f"{nodes[0].process.name} should store for every partition, "
                             f"but the storers are {storers}")
        return nodes

    def start_rm(self, *extra: str) -> Process:
        """The one RedMessenger of a single-node scenario."""
        node = self.start_node("redmessenger", *extra)
        self.rm, self.rm_port = node.process, node.port
        return self.rm

    def stop_rm(self) -> None:
        """Stop RedMessenger now (it gives back to Redis what it holds)."""
        if self.rm is not None:
            self.stop(self.rm)

    def storers(self) -> dict[int, str | None]:
        """Which node (by name) stores for each partition's offline users,
        from Redis: the holder's lease names its pid."""
        pids = {node.process.pid: node.process.name for node in self.nodes}
        count = int(self.redis.command("GET", wire.partitions_key()) or 1)
        found = {}
        for k in range(count):
            owner = self.redis.command("GET", wire.storer_key(k))
            lease = owner and self.redis.command("GET", wire.lease_key(owner.decode()))
            found[k] = pids.get(int(lease.split()[-1])) if lease else None
        return found

    def start_worker(self, module: str, *, subject: bool = False) -> Process:
        return self._spawn(
            module, [sys.executable, "-m", f"bench.{module}"], control=True, subject=subject
        )

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

    def begin(self, *subjects: Process) -> dict:
        """Start measuring the ``subjects``: their profilers (with
        --profile), then the first snapshot."""
        for process in subjects:
            self.profile_start(process, several=len(subjects) > 1)
        return self.snapshot()

    def _profile_path(self, process: Process, several: bool) -> Path:
        """profile-<scenario>.txt, or profile-<scenario>.<node>.txt when a
        scenario measures several nodes."""
        return self.bench.out / (
            f"profile-{self.name}.{process.name}.txt" if several else f"profile-{self.name}.txt"
        )

    def profile_start(self, process: Process, several: bool = False) -> None:
        if not self.bench.profile:
            return
        path = self._profile_path(process, several)
        profiler = Process(
            "py-spy",
            [
                self.bench.pyspy,
                "record",
                "--pid",
                str(process.pid),
                "--rate",
                "250",
                "--format",
                "raw",
                "--function",
                "--nonblocking",
                "--output",
                str(path) + ".raw",
            ],
            log_path=self.bench.logs / f"{self.name}.py-spy.log",
        )
        self.profilers.append((profiler, path))
        time.sleep(0.5)  # py-spy attaches

    def profile_stop(self) -> None:
        from .report import summarize_profile

        profilers, self.profilers = self.profilers, []
        for profiler, path in profilers:
            profiler.stop(STOP_TIMEOUT, sig=signal.SIGINT)
            raw = Path(str(path) + ".raw")
            if raw.exists():
                path.write_text(summarize_profile(raw))
