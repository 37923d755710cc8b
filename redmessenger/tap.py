"""The ``twistd redmessenger`` plugin's module: its command line
(``Options``) and the service it makes (``makeService``)."""

from __future__ import annotations

import errno
import gc
import re
import socket
from pathlib import Path

from twisted.application.service import Service
from twisted.python import usage

from . import compat, environment
from .redisserver import RedisServerNotFound, find_redis_server
from .service import RedMessengerService
from .settings import AuthMode, RedisAddress, Settings
from .store import MAX_TAKE
from .workers import Supervisor, shareable, worker_number, worker_service

_DEFAULTS = Settings()

#: Allocations (net) between two young collections, 700 by default. Every
#: socket keeps ~50 objects the cyclic collector tracks, and a connect+hello
#: allocates hundreds that live on: at 700 a storm of connects spent about
#: 14 % of its CPU in the collector (bench ``connections``), 4 % at 10,000.
YOUNG_COLLECTION_THRESHOLD = 10_000

#: Ready sockets handled per turn of the reactor at most. Each costs up to
#: a few hundred µs (a handshake, a hello, a close): 10,000 clients gone at
#: once took one 2.4 s turn, in which the node's lease (3 s) went unrenewed.
EVENTS_PER_TURN = 256


class Options(usage.Options):
    """Each option also reads ``REDMESSENGER_<NAME>`` (``--queue-max``:
    ``REDMESSENGER_QUEUE_MAX``); the command line wins."""

    synopsis = "[options]"
    longdesc = ("Deliver every Redis PUBLISH on <prefix>.users.<uid> and <prefix>.groups.<gid> "
                "to the users' WebSockets, storing it in Redis while a user is offline. With "
                "no --redis, an embedded redis-server is started (and stopped) with it.")

    optFlags = [
        ["verbose", "v", "Log every message's way (new, sent, queued, purged)."],
        ["inbox", None, "Also read the <prefix>:inbox stream (XADD <prefix>:inbox * to "
         "users.<uid> payload ...): kept in Redis until delivered or stored."],
    ]
    optParameters = [
        ["port", "p", "8080",
         "Where WebSocket clients connect: a port number or an endpoint description "
         "(tcp:8080:interface=127.0.0.1, ssl:8443:privateKey=key.pem, unix:/path)."],
        ["internal-port", None, None,
         "Where the demo page, /health and /metrics are served instead of --port, "
         "which then has only the WebSocket and /client.js: a port number or an endpoint "
         "description (tcp:9090:interface=127.0.0.1 keeps them off the network). "
         "Default: on --port."],
        ["redis", "r", None,
         "An existing Redis: redis://[:password@]host[:port][/db] or "
         "unix:///path/to/socket[?db=N]. Default: start an embedded redis-server."],
        ["embedded-port", None, str(_DEFAULTS.embedded_port),
         "TCP port (on 127.0.0.1) of the embedded redis-server."],
        ["data-dir", None, str(_DEFAULTS.data_dir),
         "Where the embedded redis-server keeps its append-only file."],
        ["prefix", None, _DEFAULTS.prefix, "Prefix of every channel and key."],
        ["auth", None, _DEFAULTS.auth.value,
         "required: the hello's key must match <prefix>:users:<uid>:key; optional: only "
         "users with a stored key need one; jwt: the key is a JWT (HS256/384/512, with "
         "exp) whose sub is the id, signed with --jwt-secret; off: no check "
         "(development only)."],
        ["jwt-secret", None, None, "The HMAC secret of --auth jwt."],
        ["jwt-audience", None, None,
         "With --auth jwt: a token's aud must be (or contain) this. Unset: any aud."],
        ["jwt-issuer", None, None, "With --auth jwt: a token's iss must be this. "
         "Unset: any iss."],
        ["jwt-max-age", None, "0",
         "With --auth jwt: refuse tokens valid for longer than this many seconds "
         "(exp - iat; iat is then required). 0: no limit."],
        ["max-connections", None, "0",
         "Open connections in total, from their accept (0: no limit; HTTP 503 past it)."],
        ["max-connections-per-address", None, "0",
         "Open connections per remote address, from their accept (0: no limit; HTTP 503 "
         "past it)."],
        ["ping-interval", None, f"{_DEFAULTS.ping_interval:g}",
         "Seconds between WebSocket pings, and heartbeat frames to clients that ask (0: none)."],
        ["ping-timeout", None, f"{_DEFAULTS.ping_timeout:g}",
         "Seconds a pong may take before the peer counts as gone and its messages are "
         "stored."],
        ["max-socket-buffer", None, str(_DEFAULTS.max_socket_buffer),
         "Bytes that may wait for a client beyond what its connection holds (it is "
         "written to up to 1 MiB unsent, then its messages wait in Redis); past it the "
         "socket is closed with 4010 and its messages go to the user's other sockets or "
         "are stored."],
        ["ack-window", None, str(_DEFAULTS.ack_window),
         "Unacknowledged messages per ack-mode socket; past it new messages are stored "
         "and a drain pauses until acks arrive."],
        ["inbox-claim-after", None, f"{_DEFAULTS.inbox_claim_after:g}",
         "Seconds after which inbox entries another process read and did not "
         "acknowledge (it died) are taken over."],
        ["hello-rate", None, "0",
         "Hellos per second per remote address, in bursts of as many, at least one "
         "(0: no limit; 4029)."],
        ["queue-ttl", None, str(_DEFAULTS.queue_ttl),
         "Seconds a user's stored queue lives after its last store (0: forever)."],
        ["queue-max", None, str(_DEFAULTS.queue_max),
         "Keep only the newest N stored messages per user (0: unbounded)."],
        ["max-pending-bytes", None, str(_DEFAULTS.max_pending_bytes),
         "Bytes of Redis commands not yet answered (while Redis is slow, away or out of "
         "memory); past it hellos get 1013 and the subscriber pauses (0: no bound)."],
        ["redis-replicas-ack", None, str(_DEFAULTS.redis_replicas_ack),
         "Replicas that must have a store, claim or ack (Redis WAIT) before it counts as "
         "done, so that a failover loses none; short of them it is waited for again, "
         "never dropped (0: the master's word is enough)."],
        ["dead-max", None, str(_DEFAULTS.dead_max),
         "Keep only the newest N messages Redis refused for good in <prefix>:dead "
         "(0: all)."],
        ["hello-timeout", None, f"{_DEFAULTS.hello_timeout:g}",
         "Seconds a new socket has to send its hello."],
        ["handshake-timeout", None, f"{_DEFAULTS.handshake_timeout:g}",
         "Seconds a new connection has, from its accept, to become a WebSocket (TLS "
         "handshake, HTTP request, upgrade); then it is closed."],
        ["max-sockets-per-user", None, str(_DEFAULTS.max_sockets_per_user),
         "Open sockets per user; one more closes the oldest (4009)."],
        ["max-frame", None, str(_DEFAULTS.max_frame),
         "Largest frame a client may send, in bytes (1009 past it)."],
        ["drain-chunk", None, str(_DEFAULTS.drain_chunk),
         f"Stored messages taken per Redis round trip while draining (1..{MAX_TAKE})."],
        ["shutdown-timeout", None, f"{_DEFAULTS.shutdown_timeout:g}",
         "Seconds a stop waits for Redis to take every pending write."],
        ["allowed-origins", None, ",".join(_DEFAULTS.allowed_origins),
         "Comma-separated web origins allowed to open a WebSocket (* wildcards), "
         "e.g. https://app.example.com; others get 403."],
        ["log-format", None, "text", "text (human-readable) or json (one object per line)."],
        ["partitions", None, str(_DEFAULTS.partitions),
         "Storer partitions of a new cluster (its first node sets it; 1 to 256): the "
         "nodes share the storing of offline users' messages by them."],
        ["workers", None, "1",
         "Processes that share the port (a tcp or ssl one), one per core, and the "
         "embedded Redis if any. A worker that dies is started again."],
    ]

    optFlags = [[long, short, f"{doc} [env: {environment.variable(long)}]"]
                for long, short, doc in optFlags]
    optParameters = [[long, short, default, f"{doc} [env: {environment.variable(long)}]"]
                     for long, short, default, doc in optParameters]

    def __init__(self) -> None:
        super().__init__()
        # Every option can come from the environment; the command line wins.
        # A flag's text is judged in postOptions, where a refusal is a usage error.
        for long, *_ in self.optParameters + self.optFlags:
            value = environment.value(long)
            if value is not None:
                self[long] = value

    def postOptions(self) -> None:
        try:
            auth = AuthMode(self["auth"])
        except ValueError:
            raise usage.UsageError("--auth must be required, optional, jwt or off") from None
        if auth is AuthMode.JWT and not self["jwt-secret"]:
            raise usage.UsageError("--auth jwt needs --jwt-secret")
        redis = None
        if self["redis"]:
            try:
                redis = RedisAddress.from_url(self["redis"])
            except ValueError as e:
                raise usage.UsageError(f"--redis: {e}") from None
        self.settings = Settings(
            port=self["port"], internal_port=self["internal-port"] or None, redis=redis,
            embedded_port=_number(self, "embedded-port", int, 1, 65535),
            data_dir=Path(self["data-dir"]), prefix=self["prefix"], auth=auth,
            queue_ttl=_number(self, "queue-ttl", int, 0),
            queue_max=_number(self, "queue-max", int, 0),
            max_pending_bytes=_number(self, "max-pending-bytes", int, 0),
            redis_replicas_ack=_number(self, "redis-replicas-ack", int, 0),
            dead_max=_number(self, "dead-max", int, 0),
            hello_timeout=_number(self, "hello-timeout", float, 0.001),
            handshake_timeout=_number(self, "handshake-timeout", float, 0.001),
            max_sockets_per_user=_number(self, "max-sockets-per-user", int, 1),
            max_frame=_number(self, "max-frame", int, 64),
            drain_chunk=_number(self, "drain-chunk", int, 1, MAX_TAKE),
            shutdown_timeout=_number(self, "shutdown-timeout", float, 0),
            verbose=_flag(self, "verbose"), jwt_secret=self["jwt-secret"],
            jwt_audience=self["jwt-audience"] or None, jwt_issuer=self["jwt-issuer"] or None,
            jwt_max_age=_number(self, "jwt-max-age", float, 0),
            max_connections=_number(self, "max-connections", int, 0),
            max_connections_per_address=_number(self, "max-connections-per-address", int, 0),
            hello_rate=_number(self, "hello-rate", float, 0),
            ping_interval=_number(self, "ping-interval", float, 0),
            ping_timeout=_number(self, "ping-timeout", float, 0),
            max_socket_buffer=_number(self, "max-socket-buffer", int, 1024),
            ack_window=_number(self, "ack-window", int, 1),
            inbox=_flag(self, "inbox"),
            inbox_claim_after=_number(self, "inbox-claim-after", float, 0),
            partitions=_number(self, "partitions", int, 1, 256),
            allowed_origins=tuple(o.strip() for o in self["allowed-origins"].split(",")
                                  if o.strip()) or ("*",))
        if not self.settings.prefix or any(c.isspace() for c in self.settings.prefix):
            raise usage.UsageError("--prefix must be non-empty, without spaces")
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError("--log-format must be text or json")
        if self["log-format"] == "json" and self.parent is not None:
            # twistd builds its log observer after parsing: hand it ours.
            self.parent["logger"] = "redmessenger.logs.json_observer"
        self.workers = _number(self, "workers", int, 1)
        if self.workers > 1 and not shareable(self.settings.listen_description):
            raise usage.UsageError(
                f"--workers needs a tcp or ssl --port, whose socket the workers share, "
                f"not {self.settings.listen_description!r}")
        if self.workers > 1 and self.settings.internal_port is not None:
            raise usage.UsageError(
                "--internal-port is not shared by --workers: run each worker as a "
                "twistd of its own to give each an internal port")
        if redis is None:
            _check_embedded(self.settings.embedded_port)
        if worker_number() is None:  # a worker's port is its supervisor's
            _check_listen(self.settings.listen_description)
        if self.settings.internal_port is not None:
            _check_listen(self.settings.internal_listen_description, "internal-port")

    def environment(self) -> dict[str, str]:
        """Every option given, as the variable that would give it: how a
        worker of ``--workers`` gets them, out of sight of ``ps``."""
        return {environment.variable(long): str(self[long])
                for long, *_ in self.optParameters + self.optFlags if self[long] is not None}


def _number(options: Options, name: str, kind: type, low: float, high: float | None = None):
    try:
        value = kind(options[name])
    except ValueError:
        raise usage.UsageError(f"--{name} must be a number, not {options[name]!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise usage.UsageError(f"--{name} must be {bounds}")
    return value


#: How a flag's environment variable may say on or off (any case, spaces around).
_FLAG_VALUES = {**dict.fromkeys(("1", "true", "yes", "on"), True),
               **dict.fromkeys(("0", "false", "no", "off", ""), False)}


def _flag(options: Options, name: str) -> bool:
    """A flag given on the command line is 1; from the environment, it is
    its variable's text, which must say on or off plainly."""
    value = options[name]
    if not isinstance(value, str):
        return bool(value)
    try:
        return _FLAG_VALUES[value.strip().lower()]
    except KeyError:
        raise usage.UsageError(
            f"{environment.variable(name)} must be 1, true, yes or on (for --{name}), "
            f"or 0, false, no, off or empty; not {value!r}") from None


def _check_embedded(port: int) -> None:
    """Say what to do now, rather than failing after start."""
    try:
        find_redis_server()
    except RedisServerNotFound as e:
        raise usage.UsageError(f"no --redis given and {e}") from None
    if _taken("127.0.0.1", port):
        raise usage.UsageError(
            f"no --redis given, and the embedded redis-server's port {port} is taken "
            "(is a Redis already running there?): pass --redis redis://127.0.0.1:"
            f"{port} to use that Redis, or --embedded-port to pick another port")


_TCP = re.compile(r"tcp:(?:port=)?(\d+)(?::interface=([^:]+))?(?::backlog=\d+)?$")


def _check_listen(description: str, option: str = "port") -> None:
    """A plain TCP port that is taken is worth saying before start; other
    endpoint kinds are left to fail when they listen."""
    match = _TCP.match(description)
    if match and int(match.group(1)) and _taken(match.group(2) or "", int(match.group(1))):
        raise usage.UsageError(f"--{option} {description}: the port is taken; pick another one")


def _taken(host: str, port: int) -> bool:
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise usage.UsageError(f"cannot listen on {host or '*'}:{port}: {e}") from None
        return True
    finally:
        probe.close()
    return False


def makeService(options: Options) -> Service:
    """Under twistd a start that fails ends the process (status 1): nothing
    else would notice. ``--workers N`` makes a supervisor, which runs N
    twistds that each make a worker."""
    if options.workers > 1:
        return Supervisor(options.settings, options.workers, options.environment())
    tune_collector()
    tune_reactor()
    number = worker_number()
    if number is not None:
        return worker_service(options.settings, number)
    return RedMessengerService(options.settings, fatal_start=True)


def tune_collector() -> None:
    """The process is RedMessenger's (twistd's), not an application's: its
    cyclic garbage collector is set for many long-lived sockets. What the
    start made (modules, classes, options) is never garbage: frozen, it
    stays out of every later full collection; young collections come less
    often (``YOUNG_COLLECTION_THRESHOLD``)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, older, oldest)


def tune_reactor() -> None:
    """One turn of twistd's reactor handles at most ``EVENTS_PER_TURN``
    ready sockets, so that timers (the lease's renewal) run between turns
    even when thousands of sockets are ready at once."""
    from twisted.internet import reactor

    compat.cap_events_per_turn(reactor, EVENTS_PER_TURN)
