"""A redis-server run as a child process, for a RedMessenger that is not
pointed at an existing Redis.

The child is an ordinary redis-server (see :mod:`redmessenger.redisserver`):
it keeps its append-only file in the data directory, so stored messages
survive a restart, and it is stopped with SIGTERM, on which redis-server
fsyncs that file before it exits.
"""

from __future__ import annotations

import os
import re
import sys
from collections import deque
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from redmessenger.redisserver import RedisServerNotFound, find_redis_server, server_arguments

__all__ = ["EmbeddedRedis", "EmbeddedRedisError"]

#: The only address the embedded server listens on and is probed at.
HOST = "127.0.0.1"

#: How many of the child's last output lines an error message may quote.
_KEPT_LINES = 20

#: ``2760:M 26 Nov 2026 15:29:52.416 * Ready to accept connections``: the
#: character before the message is redis-server's own level.
_REDIS_LOG_LINE = re.compile(rb"^\d+:[A-Z] \d+ \w+ \d+ [\d:.]+ ([.\-*#]) (.*)$")
_REDIS_LEVELS = {
    b".": LogLevel.debug,
    b"-": LogLevel.debug,
    b"*": LogLevel.info,
    b"#": LogLevel.warn,
}


class EmbeddedRedisError(Exception):
    """The embedded redis-server could not be started or did not get ready."""


class EmbeddedRedis(Service):
    """Runs redis-server on ``127.0.0.1:port`` with its files in ``data_dir``
    for as long as this service runs.

    :meth:`whenReady` tells when clients may connect: only once the child
    itself answers ``PING`` (a different Redis already on the port answers
    too, which is why the answering server's process id is checked).
    """

    log = Logger()

    def __init__(self, port: int, data_dir: Path, reactor: Any = None, *,
                 executable: str | None = None, appendonly: bool = True,
                 ready_timeout: float = 10.0, stop_timeout: float = 10.0,
                 probe_interval: float = 0.05) -> None:
        if reactor is None:
            # Imported here, not at module level, so that importing this
            # module never installs the default reactor.
            from twisted.internet import reactor
        self.port = port
        self.data_dir = Path(data_dir)
        self.executable = executable
        self.appendonly = appendonly
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.probe_interval = probe_interval
        self._reactor = reactor
        self._process: _RedisServerProcessProtocol | None = None
        self._stopping = False
        #: ``None`` while undecided, then ``True`` or the ``Failure``.
        self._readiness: bool | Failure | None = None
        self._readyWaiters: list[Deferred[None]] = []
        self._exitWaiters: list[Deferred[Any]] = []
        self._deadline = 0.0
        self._pollCall: Any = None
        self._probing: Deferred[str] | None = None
        self._killCall: Any = None

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs, else ``None``."""
        if self._process is None or self._process.transport is None:
            return None
        return self._process.transport.pid

    def whenReady(self) -> Deferred[None]:
        """A Deferred that fires once the child answers ``PING``, or fails
        with :class:`EmbeddedRedisError` if it exits, cannot be started, does
        not answer within ``ready_timeout`` seconds, or is stopped first."""
        if self._readiness is None:
            d: Deferred[None] = Deferred()
            self._readyWaiters.append(d)
            return d
        if isinstance(self._readiness, Failure):
            return fail(self._readiness)
        return succeed(None)

    def whenExited(self) -> Deferred[Any]:
        """A Deferred that fires, with the ``ProcessDone`` or
        ``ProcessTerminated`` that ended it, when the running child exits
        (at once, with ``None``, if none is running), so that an owner can
        notice a redis-server that died under it."""
        d: Deferred[Any] = Deferred()
        if self._process is None:
            d.callback(None)
        else:
            self._exitWaiters.append(d)
        return d

    def startService(self) -> None:
        """Spawn the child and begin polling it; failures go to
        :meth:`whenReady` rather than being raised, so there is one place to
        handle them."""
        super().startService()
        self._readiness = None
        self._stopping = False
        try:
            executable = self.executable or find_redis_server()
        except RedisServerNotFound as e:
            self._decide(Failure(EmbeddedRedisError(str(e))))
            return
        if not (os.path.isfile(executable) and os.access(executable, os.X_OK)):
            self._decide(Failure(EmbeddedRedisError(
                f"{executable} is not an executable redis-server")))
            return
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._decide(Failure(EmbeddedRedisError(
                f"cannot create the data directory {self.data_dir}: {e}")))
            return
        args = [executable, *server_arguments(self.port, self.data_dir,
                                              bind=HOST, appendonly=self.appendonly)]
        process = _RedisServerProcessProtocol(self)
        try:
            # redis-server changes to data_dir itself (--dir). It runs in a
            # session of its own: a Ctrl-C at the terminal must reach only
            # RedMessenger, which puts messages back into Redis before it
            # stops Redis itself.
            self._reactor.spawnProcess(process, sys.executable,
                                       [sys.executable, "-c", _SETSID_EXEC, *args],
                                       env=dict(os.environ))
        except OSError as e:
            self._decide(Failure(EmbeddedRedisError(f"cannot run {executable}: {e}")))
            return
        self._process = process
        self.log.info("started redis-server[{pid}] on {host}:{port}, data in {dataDir}",
                      pid=process.transport.pid, host=HOST, port=self.port,
                      dataDir=str(self.data_dir))
        self._deadline = self._reactor.seconds() + self.ready_timeout
        self._pollCall = self._reactor.callLater(0, self._poll)

    def stopService(self) -> Deferred[None]:
        """SIGTERM the child (redis-server then fsyncs its append-only file
        and exits); the Deferred fires once it has exited. One that is still
        running after ``stop_timeout`` seconds is killed."""
        super().stopService()
        if self._readiness is None:
            self._decide(Failure(EmbeddedRedisError(
                "redis-server was stopped before it answered PING")))
        process = self._process
        if process is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._exitWaiters.append(d)
        d.addCallback(lambda _: None)
        if not self._stopping:
            self._stopping = True
            try:
                process.transport.signalProcess("TERM")
            except ProcessExitedAlready:
                pass  # processEnded is on its way
            else:
                self._killCall = self._reactor.callLater(self.stop_timeout, self._kill)
        return d

    # Readiness

    def _poll(self) -> None:
        """Probe the server once, and again after ``probe_interval`` until it
        answers, exits, or ``ready_timeout`` passes."""
        self._pollCall = None
        if self._readiness is not None:
            return
        if self._reactor.seconds() > self._deadline:
            self._decide(Failure(EmbeddedRedisError(
                f"redis-server did not answer PING on {HOST}:{self.port} "
                f"within {self.ready_timeout:g} s")))
            return
        self._probing = self._probe()
        self._probing.addBoth(self._probed)

    def _probe(self) -> Deferred[str]:
        """Connect once; fire with the server's answer to ``PING``, or with
        ``"+PONG"`` only if the server is this child."""
        timeout = max(self.probe_interval, 1.0)
        endpoint = TCP4ClientEndpoint(self._reactor, HOST, self.port, timeout=int(timeout))
        protocol = _ProbeProtocol()
        connecting = connectProtocol(endpoint, protocol)

        def connected(_: object) -> Deferred[tuple[str, int | None]]:
            return protocol.result.addTimeout(timeout, self._reactor)

        def checked(answer: tuple[str, int | None]) -> str:
            reply, serverPid = answer
            if reply == "+PONG" and serverPid != self.pid:
                return f"+PONG from another redis-server (pid {serverPid})"
            return reply

        return connecting.addCallback(connected).addCallback(checked)

    def _probed(self, result: str | Failure) -> None:
        self._probing = None
        if self._readiness is not None:
            return
        if result == "+PONG":
            self.log.info("redis-server[{pid}] is ready on {host}:{port}",
                          pid=self.pid, host=HOST, port=self.port)
            self._decide(True)
            return
        if isinstance(result, str) and result.startswith("-LOADING"):
            # It is reading a big append-only file: alive and progressing,
            # so the deadline is for answering at all, not for loading.
            self._deadline = self._reactor.seconds() + self.ready_timeout
        self.log.debug("redis-server on {host}:{port} is not ready yet: {why}",
                       host=HOST, port=self.port,
                       why=result if isinstance(result, str) else result.getErrorMessage())
        self._pollCall = self._reactor.callLater(self.probe_interval, self._poll)

    def _stopPolling(self) -> None:
        if self._pollCall is not None and self._pollCall.active():
            self._pollCall.cancel()
        self._pollCall = None
        if self._probing is not None:
            probing, self._probing = self._probing, None
            probing.cancel()

    def _decide(self, outcome: bool | Failure) -> None:
        """Settle readiness once: stop probing (after setting the outcome, so
        a cancelled probe does not schedule another) and tell the waiters."""
        self._readiness = outcome
        self._stopPolling()
        waiters, self._readyWaiters = self._readyWaiters, []
        if isinstance(outcome, Failure):
            self.log.error("embedded redis-server on {host}:{port} is not available: {why}",
                           host=HOST, port=self.port, why=outcome.getErrorMessage())
        for d in waiters:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(None)

    # The child

    def _kill(self) -> None:
        self._killCall = None
        if self._process is None:
            return
        self.log.warn("redis-server[{pid}] still running {timeout:g} s after SIGTERM; killing it",
                      pid=self.pid, timeout=self.stop_timeout)
        try:
            self._process.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    def _processEnded(self, process: _RedisServerProcessProtocol, reason: Failure) -> None:
        if process is not self._process:
            return
        self._process = None
        if self._killCall is not None and self._killCall.active():
            self._killCall.cancel()
        self._killCall = None
        exitCode = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        self.log.info("redis-server[{pid}] exited with code {exitCode}, signal {signal}",
                      pid=process.pid, exitCode=exitCode, signal=signal)
        if self._readiness is None:
            self._decide(Failure(EmbeddedRedisError(self._whyEnded(process, exitCode, signal))))
        elif not self._stopping:
            self.log.critical("redis-server[{pid}] exited while in use: {lastLines}",
                              pid=process.pid, lastLines=" | ".join(process.lastLines))
        waiters, self._exitWaiters = self._exitWaiters, []
        for d in waiters:
            d.callback(reason.value)

    def _whyEnded(self, process: _RedisServerProcessProtocol, exitCode: int | None,
                  signal: int | None) -> str:
        if any("Address already in use" in line for line in process.lastLines):
            return f"port {self.port} is taken: pass --embedded-port or --redis URL"
        how = f"with code {exitCode}" if signal is None else f"on signal {signal}"
        said = " | ".join(list(process.lastLines)[-5:]) or "(no output)"
        return f"redis-server exited {how} before it answered PING on {HOST}:{self.port}: {said}"


#: Starts a new session, then becomes the program named by its arguments
#: (the pid stays the same, so signals reach redis-server itself).
_SETSID_EXEC = "import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])"


class _RedisServerProcessProtocol(ProcessProtocol):
    """Logs what the child says, line by line, keeping the last lines for
    error messages, and tells its owner when it exits."""

    def __init__(self, owner: EmbeddedRedis) -> None:
        self.owner = owner
        self.pid: int | None = None
        self.lastLines: deque[str] = deque(maxlen=_KEPT_LINES)
        self._partial: dict[int, bytes] = {}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.closeStdin()  # redis-server reads nothing from it

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        *lines, self._partial[childFD] = (self._partial.get(childFD, b"") + data).split(b"\n")
        for line in lines:
            self._logLine(childFD, line.rstrip(b"\r"))

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in sorted(self._partial.items()):
            if rest:
                self._logLine(childFD, rest)
        self._partial.clear()
        self.owner._processEnded(self, reason)

    def _logLine(self, childFD: int, line: bytes) -> None:
        if not line.strip():
            return
        level = LogLevel.warn if childFD == 2 else LogLevel.info
        match = _REDIS_LOG_LINE.match(line)
        if match and childFD == 1:
            level = _REDIS_LEVELS[match.group(1)]
        text = line.decode("utf-8", "replace")
        self.lastLines.append(text)
        self.owner.log.emit(level, "redis-server[{pid}]: {line}", pid=self.pid, line=text,
                            fd=childFD)


class _ProbeProtocol(Protocol):
    """Sends ``PING`` and ``INFO server`` in one go; ``result`` fires with
    the PING reply line and, after a ``+PONG``, the answering server's
    ``process_id``."""

    def __init__(self) -> None:
        self.result: Deferred[tuple[str, int | None]] = Deferred(self._cancel)
        self._buffer = b""

    def connectionMade(self) -> None:
        self.transport.write(b"PING\r\nINFO server\r\n")

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if self.result.called:
            return
        head, found, rest = self._buffer.partition(b"\r\n")
        if not found:
            return
        reply = head.decode("utf-8", "replace")
        if reply != "+PONG":
            self._finish((reply, None))
            return
        size, found, body = rest.partition(b"\r\n")
        if not found:
            return
        if not size.startswith(b"$") or not size[1:].isdigit():
            self._finish((reply, None))
            return
        if len(body) < int(size[1:]):
            return
        match = re.search(rb"^process_id:(\d+)", body[:int(size[1:])], re.MULTILINE)
        self._finish((reply, int(match.group(1)) if match else None))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.result.called:
            self.result.errback(reason)

    def _finish(self, answer: tuple[str, int | None]) -> None:
        self.transport.loseConnection()
        self.result.callback(answer)

    def _cancel(self, _: Deferred[Any]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()
