"""The processes of one scenario: Redis, RedMessenger under twistd, the load
workers and the profiler, started for it and stopped in reverse order."""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .proc import HOST, Process, accepting, free_port, wait_until
from .resp import Redis

if TYPE_CHECKING:
    from .runner import Bench

#: How long a process gets to start, and to stop after SIGTERM.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


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

    def stop(self, process: Process) -> int | None:
        if process not in self.processes:
            return process.popen.returncode
        self.processes.remove(process)
        return process.stop(STOP_TIMEOUT)

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

    def start_rm(self, *extra: str) -> Process:
        self.rm_port = free_port()
        argv = [
            str(self.bench.twistd),
            "-n",
            "redmessenger",
            "--port",
            f"tcp:{self.rm_port}:interface={HOST}",
            "--redis",
            f"redis://{HOST}:{self.redis_port}",
            "--auth",
            "off",
            *self.bench.rm_args,
            *extra,
        ]
        self.rm = self._spawn("redmessenger", argv, subject=True)
        wait_until(
            lambda: accepting(self.rm_port), "RedMessenger to listen", START_TIMEOUT, self.rm.alive
        )
        wait_until(
            lambda: self.redis.command("PUBSUB", "NUMPAT") >= 2,
            "RedMessenger to PSUBSCRIBE",
            START_TIMEOUT,
            self.rm.alive,
        )
        return self.rm

    def stop_rm(self) -> None:
        """Stop RedMessenger now (it gives back to Redis what it holds)."""
        if self.rm is not None:
            self.stop(self.rm)

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

    def begin(self, subject: Process) -> dict:
        """Start measuring ``subject``: its profiler (with --profile), then
        the first snapshot."""
        self.profile_start(subject)
        return self.snapshot()

    def profile_start(self, process: Process) -> None:
        if not self.bench.profile:
            return
        path = self.bench.out / f"profile-{self.name}.txt"
        self.profiler = Process(
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
