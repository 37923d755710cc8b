"""A redis-server run as a child process, for a RedMessenger that is not
pointed at an existing Redis.

The child is an ordinary redis-server (see :mod:`redmessenger.redisserver`):
it keeps its append-only file in the data directory, so stored messages
survive a restart, and it is stopped with SIGTERM, on which redis-server
fsyncs that file before it exits.

Other users of the host can reach its port, so it requires a password (kept
in the data directory, see :mod:`redmessenger.datadir`), cannot be told to
write files elsewhere, and its files are this user's alone. An older
redis-server than the one that wrote the data directory is refused: it
would start empty.
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
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from . import datadir
from .redisserver import (
    RedisServerNotFound,
    find_redis_server,
    parse_version,
    protected_config,
    server_arguments,
)

__all__ = ["EmbeddedRedis", "EmbeddedRedisError"]

log = Logger()

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
#: What redis-server says at its warning level (``#``) on every start and
#: stop, which is news, not a warning.
_BANNER = re.compile(r"Reading config from stdin|oO0OoO0OoO0Oo \w+ is starting|"
                     r"\w+ version=|Configuration loaded|Server initialized|"
                     r"User requested shutdown|\w+ is now ready to exit")


class EmbeddedRedisError(Exception):
    """The embedded redis-server could not be started or did not get ready."""


class EmbeddedRedis(Service):
    """Runs redis-server on ``127.0.0.1:port`` with its files in ``data_dir``
    for as long as this service runs.

    :meth:`whenReady` tells when clients may connect: only once the child
    itself answers ``PING`` (a different Redis already on the port answers
    too, which is why the answering server's process id is checked).
    """

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
        self._ready_waiters: list[Deferred[None]] = []
        self._exit_waiters: list[Deferred[Any]] = []
        self._deadline = 0.0
        self._poll_call: Any = None
        self._probing: Deferred[str] | None = None
        self._kill_call: Any = None
        self._password: str | None = None
        #: Whether a probe sent the password to a server that is not ours.
        self._password_seen = False

    @property
    def password(self) -> str:
        """The server's password, from the data directory (made there, and
        the directory made private, on first use); :class:`EmbeddedRedisError`
        if the directory cannot be used."""
        if self._password is None:
            try:
                datadir.secure(self.data_dir)
                self._password = datadir.password(self.data_dir)
            except datadir.DataDirError as e:
                raise EmbeddedRedisError(str(e)) from None
        return self._password

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
            self._ready_waiters.append(d)
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
            self._exit_waiters.append(d)
        return d

    def startService(self) -> None:
        """Check the binary and the data directory, then spawn the child and
        begin polling it; failures go to :meth:`whenReady` rather than being
        raised, so there is one place to handle them."""
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
        asked = getProcessOutputAndValue(executable, ("--version",), env=dict(os.environ),
                                         reactor=self._reactor)
        asked.addTimeout(self.ready_timeout, self._reactor)
        asked.addCallback(self._spawn, executable)
        asked.addErrback(self._could_not_spawn, executable)

    def _could_not_spawn(self, failure: Failure, executable: str) -> None:
        if self._readiness is not None:  # stopped meanwhile
            return
        if not failure.check(EmbeddedRedisError):
            failure = Failure(EmbeddedRedisError(
                f"cannot run {executable}: {failure.getErrorMessage()}"))
        self._decide(failure)

    def _spawn(self, answer: tuple[bytes, bytes, int], executable: str) -> None:
        """Given ``--version``'s answer: refuse a server older than the data
        directory's, then run it with the protections fed on its stdin."""
        if self._readiness is not None:  # stopped meanwhile
            return
        said = (answer[0] + answer[1]).decode("utf-8", "replace")
        try:
            version = parse_version(said)
        except ValueError as e:
            raise EmbeddedRedisError(f"cannot tell which version {executable} is: {e}") from None
        shown = ".".join(map(str, version))
        try:
            config = protected_config(version, self.password)
            made_by = datadir.recorded_version(self.data_dir)
            if made_by is not None and version < made_by:
                raise EmbeddedRedisError(
                    f"the data directory {self.data_dir} was written by redis-server "
                    f"{'.'.join(map(str, made_by))}, and {executable} is {shown}: an older "
                    "one would not read its files and would start empty, hiding the "
                    f"messages stored there. Put redis-server {made_by[0]} or newer first "
                    "on PATH (or install it), or pass another --data-dir")
            datadir.record(self.data_dir, version, self.port)
        except datadir.DataDirError as e:
            raise EmbeddedRedisError(str(e)) from None
        args = [executable, "-", *server_arguments(self.port, self.data_dir,
                                                   bind=HOST, appendonly=self.appendonly)]
        process = _RedisServerProcessProtocol(self, config.encode())
        try:
            # redis-server changes to data_dir itself (--dir). It runs in a
            # session of its own: a Ctrl-C at the terminal must reach only
            # RedMessenger, which puts messages back into Redis before it
            # stops Redis itself.
            self._reactor.spawnProcess(process, sys.executable,
                                       [sys.executable, "-c", _SETSID_EXEC, *args],
                                       env=dict(os.environ))
        except OSError as e:
            raise EmbeddedRedisError(f"cannot run {executable}: {e}") from None
        self._process = process
        log.info("started {executable} (version {version}) as redis-server[{pid}] on "
                 "{host}:{port}, data in {data_dir}", executable=executable, version=shown,
                 pid=process.transport.pid, host=HOST, port=self.port,
                 data_dir=str(self.data_dir))
        self._deadline = self._reactor.seconds() + self.ready_timeout
        self._poll_call = self._reactor.callLater(0, self._poll)

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
        self._exit_waiters.append(d)
        d.addCallback(lambda _: None)
        if not self._stopping:
            self._stopping = True
            try:
                process.transport.signalProcess("TERM")
            except ProcessExitedAlready:
                pass  # processEnded is on its way
            else:
                self._kill_call = self._reactor.callLater(self.stop_timeout, self._kill)
        return d

    # Readiness

    def _poll(self) -> None:
        """Probe the server once, and again after ``probe_interval`` until it
        answers, exits, or ``ready_timeout`` passes."""
        self._poll_call = None
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
        protocol = _ProbeProtocol(self.password)
        connecting = connectProtocol(endpoint, protocol)

        def connected(_: object) -> Deferred[tuple[str, int | None]]:
            return protocol.result.addTimeout(timeout, self._reactor)

        def checked(answer: tuple[str, int | None]) -> str:
            reply, server_pid = answer
            if reply.startswith("AUTH refused") or (reply == "+PONG" and server_pid != self.pid):
                self._password_seen = True
            if reply == "+PONG" and server_pid != self.pid:
                return f"+PONG from another redis-server (pid {server_pid})"
            return reply

        return connecting.addCallback(connected).addCallback(checked)

    def _probed(self, result: str | Failure) -> None:
        self._probing = None
        if self._readiness is not None:
            return
        if result == "+PONG":
            log.info("redis-server[{pid}] is ready on {host}:{port}",
                     pid=self.pid, host=HOST, port=self.port)
            self._decide(True)
            return
        if isinstance(result, str) and result.startswith("-LOADING"):
            # It is reading a big append-only file: alive and progressing,
            # so the deadline is for answering at all, not for loading.
            self._deadline = self._reactor.seconds() + self.ready_timeout
        log.debug("redis-server on {host}:{port} is not ready yet: {why}",
                  host=HOST, port=self.port,
                  why=result if isinstance(result, str) else result.getErrorMessage())
        self._poll_call = self._reactor.callLater(self.probe_interval, self._poll)

    def _stop_polling(self) -> None:
        if self._poll_call is not None and self._poll_call.active():
            self._poll_call.cancel()
        self._poll_call = None
        if self._probing is not None:
            probing, self._probing = self._probing, None
            probing.cancel()

    def _decide(self, outcome: bool | Failure) -> None:
        """Settle readiness once: stop probing (after setting the outcome, so
        a cancelled probe does not schedule another) and tell the waiters."""
        self._readiness = outcome
        self._stop_polling()
        waiters, self._ready_waiters = self._ready_waiters, []
        if isinstance(outcome, Failure):
            log.error("embedded redis-server on {host}:{port} is not available: {why}",
                      host=HOST, port=self.port, why=outcome.getErrorMessage())
            if self._password_seen:
                self._forget_password()
        for d in waiters:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(None)

    def _forget_password(self) -> None:
        """Another server on our port was sent the password: the next start
        makes a new one, so what it learnt opens nothing."""
        self._password_seen = False
        self._password = None
        try:
            (self.data_dir / datadir.PASSWORD_FILE).unlink()
        except OSError as e:
            log.error("could not delete {path}, which another server on port {port} was "
                      "sent: {why}", path=str(self.data_dir / datadir.PASSWORD_FILE),
                      port=self.port, why=str(e))
        else:
            log.warn("another server answered on port {port} and was sent the password: "
                     "the next start makes a new one", port=self.port)

    # The child

    def _kill(self) -> None:
        self._kill_call = None
        if self._process is None:
            return
        log.warn("redis-server[{pid}] still running {timeout:g} s after SIGTERM; killing it",
                 pid=self.pid, timeout=self.stop_timeout)
        try:
            self._process.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    def _process_ended(self, process: _RedisServerProcessProtocol, reason: Failure) -> None:
        if process is not self._process:
            return
        self._process = None
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        exit_code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        log.info("redis-server[{pid}] exited with code {exit_code}, signal {signal}",
                 pid=process.pid, exit_code=exit_code, signal=signal)
        if self._readiness is None:
            self._decide(Failure(EmbeddedRedisError(self._why_ended(process, exit_code, signal))))
        elif not self._stopping:
            log.critical("redis-server[{pid}] exited while in use: {last_lines}",
                         pid=process.pid, last_lines=" | ".join(process.last_lines))
        waiters, self._exit_waiters = self._exit_waiters, []
        for d in waiters:
            d.callback(reason.value)

    def _why_ended(self, process: _RedisServerProcessProtocol, exit_code: int | None,
                  signal: int | None) -> str:
        if any("Address already in use" in line for line in process.last_lines):
            return f"port {self.port} is taken: pass --embedded-port or --redis URL"
        how = f"with code {exit_code}" if signal is None else f"on signal {signal}"
        said = " | ".join(list(process.last_lines)[-5:]) or "(no output)"
        return f"redis-server exited {how} before it answered PING on {HOST}:{self.port}: {said}"


#: Starts a new session, with a umask that keeps whatever redis-server
#: creates to this user, then becomes the program named by its arguments
#: (the pid stays the same, so signals reach redis-server itself).
_SETSID_EXEC = ("import os, sys; os.setsid(); os.umask(0o077); "
                "os.execv(sys.argv[1], sys.argv[1:])")


class _RedisServerProcessProtocol(ProcessProtocol):
    """Logs what the child says, line by line, keeping the last lines for
    error messages, and tells its owner when it exits."""

    def __init__(self, owner: EmbeddedRedis, config: bytes) -> None:
        self.owner = owner
        self.config = config
        self.pid: int | None = None
        self.last_lines: deque[str] = deque(maxlen=_KEPT_LINES)
        self._partial: dict[int, bytes] = {}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.write(self.config)  # redis-server - reads it, up to EOF
        self.transport.closeStdin()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        *lines, self._partial[fd] = (self._partial.get(fd, b"") + data).split(b"\n")
        for line in lines:
            self._log_line(fd, line.rstrip(b"\r"))

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in sorted(self._partial.items()):
            if rest:
                self._log_line(fd, rest)
        self._partial.clear()
        self.owner._process_ended(self, reason)

    def _log_line(self, fd: int, line: bytes) -> None:
        if not line.strip():
            return
        level = LogLevel.warn if fd == 2 else LogLevel.info
        match = _REDIS_LOG_LINE.match(line)
        if match and fd == 1:
            level = _REDIS_LEVELS[match.group(1)]
            if level is LogLevel.warn and _BANNER.match(match.group(2).decode("utf-8", "replace")):
                level = LogLevel.info
        text = line.decode("utf-8", "replace")
        self.last_lines.append(text)
        log.emit(level, "redis-server[{pid}]: {line}", pid=self.pid, line=text, fd=fd)


class _ProbeProtocol(Protocol):
    """Sends ``AUTH``, ``PING`` and ``INFO server`` in one go; ``result``
    fires with the first reply line that is not ``AUTH``'s ``+OK`` and,
    after a ``+PONG``, the answering server's ``process_id``."""

    def __init__(self, password: str) -> None:
        self.result: Deferred[tuple[str, int | None]] = Deferred(self._cancel)
        self._password = password
        self._buffer = b""

    def connectionMade(self) -> None:
        self.transport.write(b"AUTH %s\r\nPING\r\nINFO server\r\n" % self._password.encode())

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if self.result.called:
            return
        authorized, found, rest = self._buffer.partition(b"\r\n")
        if not found:
            return
        if authorized != b"+OK":
            self._finish(("AUTH refused: " + authorized.decode("utf-8", "replace"), None))
            return
        head, found, rest = rest.partition(b"\r\n")
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
