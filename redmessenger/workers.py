"""``twistd redmessenger --workers N``: N worker processes on one host, one
listening port, so that one command uses every core.

The supervisor (the twistd that was started) binds the port once and hands
the listening socket to each worker as its file descriptor 3; the kernel
gives each new connection to whichever worker accepts it first. It does not
use ``SO_REUSEPORT`` (a socket per worker, balanced by the kernel) because:

- connections already queued on a worker's own ``SO_REUSEPORT`` socket are
  reset when that worker dies, while the one shared queue outlives any
  worker, and a restarted worker picks up where the dead one stopped;
- a worker that is slow or restarting would still get its hash's share of
  new connections, while on a shared socket only idle workers accept;
- the port is bound once, by the supervisor, before any worker runs: a
  taken port or a bad certificate fails the start, not each worker;
- any process of the same user could bind the port with ``SO_REUSEPORT``
  too and take a share of the connections.

Each worker is an ordinary ``twistd redmessenger`` with every option of the
supervisor's, passed in its environment (``REDMESSENGER_<NAME>``, out of
sight of ``ps``); with no ``--redis``, the supervisor runs the embedded
redis-server and the workers are given its address and password. A worker
logs in JSON to the supervisor, which logs each event again with the
worker's number and pid. It watches its standard input, a pipe from the
supervisor: when that closes, the supervisor is gone (``kill -9``) and the
worker stops as on SIGTERM rather than run on unsupervised.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any
from urllib.parse import quote

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone, ProcessExitedAlready, ReactorNotRunning
from twisted.internet.interfaces import IListeningPort
from twisted.internet.process import ProcessReader
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import InvalidLogLevelError, Logger, LogLevel
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from . import environment
from .embedded import HOST, EmbeddedRedis
from .service import RedMessengerService, _exit_after_shutdown
from .settings import Settings
from .websocket import CLOSE_TIMEOUT

__all__ = ["Supervisor", "shareable", "worker_number", "worker_service"]

log = Logger()

#: The listening socket's file descriptor in a worker.
LISTEN_FD = 3
#: Set in a worker's environment to its number (from 1).
WORKER_VARIABLE = "REDMESSENGER_WORKER"
#: What a worker runs: twistd, however the supervisor itself was started.
_TWISTD = "from twisted.scripts.twistd import run; run()"
#: The endpoint kinds whose listening socket a worker can adopt.
_SHAREABLE = ("tcp", "tcp6", "ssl")

#: A dead worker is started again after RESTART_FIRST seconds, doubling
#: up to RESTART_MAX while it keeps dying; one that ran for HEALTHY_AFTER
#: seconds starts again from RESTART_FIRST.
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
HEALTHY_AFTER = 30.0
#: Seconds a worker gets beyond its own bounded stop before it is killed.
STOP_MARGIN = 5.0


def shareable(description: str) -> bool:
    """Whether workers can share a port of this endpoint description
    (``unix:`` cannot: a worker that stops would remove the socket file
    that the others still listen on)."""
    return description.split(":", 1)[0] in _SHAREABLE


def worker_number() -> int | None:
    """This process' number if a supervisor started it as a worker."""
    value = os.environ.get(WORKER_VARIABLE, "")
    return int(value) if value.isdigit() else None


def worker_service(settings: Settings, number: int) -> RedMessengerService:
    """This process as worker ``number``: it listens on the socket it was
    handed, leaves Ctrl-C at the terminal to the supervisor (which stops
    it, once), and stops when the supervisor is gone."""
    from twisted.internet import reactor

    os.setpgid(0, 0)
    ProcessReader(reactor, _SupervisorWatch(reactor), "supervisor", 0)
    endpoint = serverFromString(_InheritedSocket(reactor, LISTEN_FD),
                                settings.listen_description)
    return RedMessengerService(settings, reactor, fatal_start=True, endpoint=endpoint,
                               worker=number)


class _InheritedSocket:
    """The reactor as ``serverFromString``'s endpoints see it in a worker:
    where they would listen, the inherited socket is adopted instead (with
    TLS on top, as ``listenSSL`` does), so that ``--port`` keeps meaning
    what it says, certificate and all."""

    def __init__(self, reactor: Any, fd: int) -> None:
        self._reactor = reactor
        self._fd = fd

    def listenTCP(self, port: int, factory: Factory, backlog: int = 50,
                  interface: str = "") -> IListeningPort:
        inherited = socket.socket(fileno=self._fd)  # which family it is
        try:
            adopted = self._reactor.adoptStreamPort(self._fd, inherited.family, factory)
        finally:
            inherited.detach()
        os.close(self._fd)  # adopted as a copy
        return adopted

    def listenSSL(self, port: int, factory: Factory, contextFactory: Any,
                  backlog: int = 50, interface: str = "") -> IListeningPort:
        return self.listenTCP(port, TLSMemoryBIOFactory(contextFactory, False, factory))


class _SupervisorWatch:
    """Standard input's reader in a worker: its end means the supervisor
    died, and the worker stops as on SIGTERM."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def childDataReceived(self, name: str, data: bytes) -> None:
        pass

    def childConnectionLost(self, name: str, reason: Failure) -> None:
        if not reason.check(ConnectionDone):
            return  # the reactor's own shutdown
        log.warn("The supervisor is gone: stopping")
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass  # already stopping


class Supervisor(Service):
    """Runs ``count`` workers on one listening socket (and the embedded
    redis-server they share, with no ``--redis``), starts again those that
    die, and stops them all, gracefully, when it stops."""

    def __init__(self, settings: Settings, count: int, options: dict[str, str],
                 reactor: Any = None) -> None:
        """``options``: every option as its ``REDMESSENGER_`` variable."""
        if reactor is None:
            from twisted.internet import reactor
        self.settings = settings
        self.count = count
        self.reactor = reactor
        self.embedded = (EmbeddedRedis(settings.embedded_port, settings.data_dir, reactor)
                         if settings.redis is None else None)
        self._options = options
        self._environment: dict[str, str] = {}
        self._port: IListeningPort | None = None
        #: The running workers, by number.
        self.workers: dict[int, _Worker] = {}
        self._delays: dict[int, float] = {}
        self._restarts: dict[int, Any] = {}

    def startService(self) -> None:
        super().startService()
        defer.ensureDeferred(self._start()).addErrback(self._could_not_start)

    async def _start(self) -> None:
        if self.embedded is not None:
            self.embedded.startService()
            await self.embedded.whenReady()
        self._environment = {**os.environ, **self._options,
                             environment.variable("workers"): "1",
                             environment.variable("log-format"): "json"}
        if self.embedded is not None:
            self._environment[environment.variable("redis")] = (
                f"redis://:{quote(self.embedded.password, safe='')}@{HOST}:"
                f"{self.settings.embedded_port}/0")
        endpoint = serverFromString(self.reactor, self.settings.listen_description)
        unused = Factory.forProtocol(Protocol)  # the workers accept, with their own
        unused.noisy = False
        port = await endpoint.listen(unused)
        port.stopReading()  # only the workers accept
        if not self.running:  # stopped meanwhile
            await port.stopListening()
            return
        self._port = port
        log.info("{count} workers share {where}", count=self.count, where=str(port.getHost()))
        for number in range(1, self.count + 1):
            self._delays[number] = RESTART_FIRST
            self._spawn(number)

    def _could_not_start(self, failure: Failure) -> None:
        if not self.running:
            return  # stopped while starting (the embedded Redis says so)
        log.critical("RedMessenger could not start: {why}", why=failure.getErrorMessage())
        _exit_after_shutdown(self.reactor, 1)

    def _spawn(self, number: int) -> None:
        self._restarts.pop(number, None)
        worker = _Worker(number, self.reactor.seconds())
        try:
            self.reactor.spawnProcess(
                worker, sys.executable,
                [sys.executable, "-c", _TWISTD, "--nodaemon", "--pidfile=", "redmessenger"],
                env={**self._environment, WORKER_VARIABLE: str(number)},
                childFDs={0: "w", 1: "r", 2: "r", LISTEN_FD: self._port.fileno()})
        except OSError as e:
            log.error("Could not start worker {worker}: {why}", worker=number, why=str(e))
            self._restart_later(number)
            return
        self.workers[number] = worker
        worker.exited.addCallback(self._ended, worker)
        log.info("Started worker {worker} (pid {worker_pid})", worker=number,
                 worker_pid=worker.pid)

    def _ended(self, reason: Exception, worker: _Worker) -> None:
        del self.workers[worker.number]
        how = _how(reason)
        if not self.running:
            log.info("Worker {worker} (pid {worker_pid}) stopped ({how})",
                     worker=worker.number, worker_pid=worker.pid, how=how)
            return
        lived = self.reactor.seconds() - worker.started
        if lived >= HEALTHY_AFTER:
            self._delays[worker.number] = RESTART_FIRST
        delay = self._restart_later(worker.number)
        log.warn("Worker {worker} (pid {worker_pid}) {how} after {lived:.1f} s: starting it "
                 "again in {delay:g} s", worker=worker.number, worker_pid=worker.pid,
                 how=how, lived=lived, delay=delay)

    def _restart_later(self, number: int) -> float:
        delay = self._delays[number]
        self._delays[number] = min(delay * 2, RESTART_MAX)
        self._restarts[number] = self.reactor.callLater(delay, self._spawn, number)
        return delay

    @defer.inlineCallbacks
    def stopService(self):
        """SIGTERM every worker (each gives back what it holds, says 1001
        and exits), kill those still there after their own stop's bound,
        and only then close the port and stop the embedded Redis."""
        super().stopService()
        for call in self._restarts.values():
            call.cancel()
        self._restarts.clear()
        workers = list(self.workers.values())
        for worker in workers:
            worker.signal("TERM")
        grace = self.settings.shutdown_timeout + CLOSE_TIMEOUT + STOP_MARGIN
        killing = self.reactor.callLater(grace, self._kill, workers, grace)
        yield defer.DeferredList([w.exited for w in workers])
        if killing.active():
            killing.cancel()
        if self._port is not None:
            yield self._port.stopListening()
        if self.embedded is not None and self.embedded.running:
            yield self.embedded.stopService()

    def _kill(self, workers: list[_Worker], grace: float) -> None:
        for worker in workers:
            if not worker.exited.called:
                log.warn("Worker {worker} (pid {worker_pid}) did not stop within {grace:g} s: "
                         "killing it", worker=worker.number, worker_pid=worker.pid, grace=grace)
                worker.signal("KILL")


def _how(reason: Exception) -> str:
    """How a process ended (``ProcessDone`` or ``ProcessTerminated``), in words."""
    signal, code = getattr(reason, "signal", None), getattr(reason, "exitCode", 0)
    return f"ended by signal {signal}" if signal else f"exited with code {code}"


class _Worker(ProcessProtocol):
    """One worker process: its output, logged again as its own events with
    its number and pid; ``exited`` fires with how it ended."""

    def __init__(self, number: int, started: float) -> None:
        self.number = number
        self.started = started
        self.pid: int | None = None
        self.exited: defer.Deferred[Exception] = defer.Deferred()
        self._partial: dict[int, bytes] = {}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except ProcessExitedAlready:
            pass  # processEnded is on its way

    def childDataReceived(self, fd: int, data: bytes) -> None:
        *lines, self._partial[fd] = (self._partial.get(fd, b"") + data).split(b"\n")
        for line in lines:
            self._relay(fd, line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in sorted(self._partial.items()):
            self._relay(fd, rest.decode("utf-8", "replace"))
        self._partial.clear()
        self.exited.callback(reason.value)

    def _relay(self, fd: int, line: str) -> None:
        """An event the worker logged (a JSON line) as the supervisor's own
        event, with the worker's time, level, namespace and fields; anything
        else it wrote (a crash's traceback) as a line."""
        if not line.strip():
            return
        try:
            record = json.loads(line)
            level = LogLevel.levelWithName(record.pop("level"))
            namespace, text = record.pop("namespace"), record.pop("message")
        except (ValueError, TypeError, KeyError, AttributeError, InvalidLogLevelError):
            level = LogLevel.warn if fd == 2 else LogLevel.info
            log.emit(level, "{line}", line=line, worker=self.number, worker_pid=self.pid,
                     log_system=self._system(log.namespace, level))
            return
        traceback, when = record.pop("traceback", None), record.pop("time", None)
        if traceback:
            text += "\n" + traceback
        log.observer({
            **record, "worker": self.number, "worker_pid": self.pid,
            "log_time": when, "log_level": level,
            "log_namespace": namespace, "log_system": self._system(namespace, level),
            "log_format": text.replace("{", "{{").replace("}", "}}"),
        })

    def _system(self, namespace: str, level: LogLevel) -> str:
        """What a text log shows in brackets: whose event, and which worker's."""
        return f"{namespace}#{level.name} worker {self.number} pid {self.pid}"
