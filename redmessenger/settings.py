"""What a RedMessenger is told at start: one value object shared by the
twistd options, the embeddable service and the tests."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


class AuthMode(str, enum.Enum):
    """How a hello's key is checked against ``rm:users:<uid>:key``."""

    REQUIRED = "required"
    OPTIONAL = "optional"
    OFF = "off"
    JWT = "jwt"


#: Connections the kernel keeps waiting for their accept on a plain port.
LISTEN_BACKLOG = 1024
#: Connections accepted per turn of the reactor at most (compat.cap_accepts_per_turn):
#: a storm of connects then waits in the backlog, not in one long turn.
ACCEPTS_PER_TURN = 64


@dataclass(frozen=True)
class RedisAddress:
    """Where a Redis server is: TCP host and port, or a Unix socket path."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    db: int = 0
    password: str | None = None
    username: str | None = None
    #: rediss://: TLS, checked against ``ca_file`` (else the system's roots).
    tls: bool = False
    ca_file: str | None = None
    #: redis+sentinel://: the Sentinels to ask where the master named
    #: ``master_name`` is (``host`` and ``port`` are then where it was last).
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        """Parse ``redis[s]://[[user]:password@]host[:port][/db][?ca=PEM]``
        or ``unix:///path/to/sock[?db=N]``; raise ``ValueError`` with a
        message fit for the command line otherwise."""
        parts = urlsplit(url)
        url = _redacted(url)  # for the messages below
        password = unquote(parts.password) if parts.password else None
        username = unquote(parts.username) if parts.username else None
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError(f"{url!r}: a unix:// Redis URL needs a socket path")
            db = parse_qs(parts.query).get("db", ["0"])[0]
            return cls(path=parts.path, db=_db_number(url, db),
                       password=password, username=username)
        if parts.scheme in ("redis+sentinel", "rediss+sentinel"):
            return cls._sentinel(url, parts, password, username)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(
                f"{url!r}: expected redis[s]://[:password@]host[:port][/db], "
                "redis[s]+sentinel://[:password@]host:port[,host:port...]/master[/db] "
                "or unix:///path/to/socket[?db=N]")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"{url!r}: the port is not a number") from None
        return cls(host=parts.hostname or "127.0.0.1", port=port,
                   db=_db_number(url, parts.path.lstrip("/") or "0"),
                   password=password, username=username, tls=parts.scheme == "rediss",
                   ca_file=parse_qs(parts.query).get("ca", [None])[0])

    @classmethod
    def _sentinel(cls, url: str, parts, password: str | None,
                  username: str | None) -> RedisAddress:
        """``redis[s]+sentinel://[[user]:password@]host:port[,host:port...]
        /<master name>[/db][?ca=PEM&sentinel_password=...]``."""
        sentinels = []
        for where in parts.netloc.rpartition("@")[2].split(","):
            host, _, port = where.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{url!r}: each Sentinel is host:port, not {where!r}")
            sentinels.append((host.strip("[]"), int(port)))
        name, _, db = parts.path.lstrip("/").partition("/")
        if not name:
            raise ValueError(f"{url!r}: a Sentinel URL names its master: .../<master name>")
        query = parse_qs(parts.query)
        return cls(host=sentinels[0][0], port=sentinels[0][1], db=_db_number(url, db or "0"),
                   password=password, username=username,
                   tls=parts.scheme == "rediss+sentinel", ca_file=query.get("ca", [None])[0],
                   sentinels=tuple(sentinels), master_name=unquote(name),
                   sentinel_password=query.get("sentinel_password", [None])[0])

    def at(self, host: str, port: int) -> RedisAddress:
        """The master a Sentinel says is at ``host:port``, as a plain address."""
        return replace(self, host=host, port=port, sentinels=(), master_name=None,
                       sentinel_password=None)

    def client_endpoint(self) -> str:
        """A Twisted client endpoint description for this address."""
        if self.path is not None:
            return "unix:path=" + _escape(self.path)
        return f"tcp:host={_escape(self.host)}:port={self.port}"

    def __str__(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        if self.sentinels:
            where = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"{scheme}+sentinel://{where}/{self.master_name}/{self.db}"
        where = f"unix://{self.path}" if self.path else f"{scheme}://{self.host}:{self.port}"
        return f"{where}/{self.db}"


#: ``scheme://user:`` and everything up to the last ``@``: a password, even
#: one that breaks the URL (an unescaped ``#``, ``/`` or ``@`` in it).
_PASSWORD = re.compile(r"(://[^:/@?#]*:).*@", re.S)
_SENTINEL_PASSWORD = re.compile(r"([?&]sentinel_password=)[^&#]*")


def _redacted(url: str) -> str:
    """The URL with its passwords hidden, fit for an error message or a log."""
    return _SENTINEL_PASSWORD.sub(r"\1***", _PASSWORD.sub(r"\1***@", url))


def _db_number(url: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{url!r}: the database {text!r} is not a number") from None


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:")


@dataclass(frozen=True)
class Settings:
    """Every setting of a RedMessenger; the defaults are the documented ones."""

    #: Where WebSocket clients connect: a port number or an endpoint
    #: description; ``None``: nowhere of its own (``RedMessengerService.resource()``
    #: is mounted in the application's twisted.web site instead).
    port: str | None = "tcp:8080"
    #: Where the demo page, ``/health`` and ``/metrics`` are served, away
    #: from ``port``; ``None``: on ``port`` (or in ``resource()``), with the rest.
    internal_port: str | None = None
    #: An existing Redis; ``None`` starts the embedded one.
    redis: RedisAddress | None = None
    embedded_port: int = 6379
    data_dir: Path = field(default_factory=lambda: Path("redmessenger-data"))
    prefix: str = "rm"
    auth: AuthMode = AuthMode.REQUIRED
    #: Seconds a stored queue lives after its last store; 0 is forever.
    queue_ttl: int = 0
    #: Keep only the newest N stored messages per user; 0 is unbounded.
    queue_max: int = 0
    #: Bytes of unanswered Redis commands past which hellos are refused
    #: (1013) and the subscriber stops reading; 0 is no bound.
    max_pending_bytes: int = 256 * 1024 * 1024
    #: Replicas that must have a store, claim or ack (``WAIT``) before it
    #: counts as done; 0: the master's word is enough.
    redis_replicas_ack: int = 0
    #: Keep only the newest N dead letters (``<prefix>:dead``); 0 keeps all.
    dead_max: int = 100_000
    hello_timeout: float = 10.0
    #: Seconds from a connection's accept to its WebSocket upgrade (the TLS
    #: handshake and HTTP request included); then it is closed.
    handshake_timeout: float = 10.0
    max_sockets_per_user: int = 8
    max_frame: int = 64 * 1024
    #: How many stored messages one Redis round trip takes while draining.
    drain_chunk: int = 500
    #: How long a stop waits for Redis to take pending writes.
    shutdown_timeout: float = 10.0
    #: Log every message's way (new, sent, queued, purged) at debug level:
    #: a line per message, to follow one through; off by default.
    verbose: bool = False
    #: Web origins allowed to open a WebSocket (patterns, ``*`` wildcards).
    allowed_origins: tuple[str, ...] = ("*",)
    #: The HMAC secret of ``--auth jwt``.
    jwt_secret: str | None = None
    #: What a JWT's ``aud`` and ``iss`` must be; ``None``: not checked.
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    #: Longest lifetime (``exp - iat``, seconds) of a JWT; 0: no limit.
    jwt_max_age: float = 0
    #: Limits against abuse; 0 is none.
    max_connections: int = 0
    max_connections_per_address: int = 0
    #: Hellos per second per remote address (a burst of as many is allowed).
    hello_rate: float = 0
    #: Seconds between WebSocket pings, and how long a pong may take before
    #: the peer counts as gone (its messages are then stored); 0: no pings.
    ping_interval: float = 30.0
    ping_timeout: float = 10.0
    #: Unsent bytes a socket may hold before it counts as too slow (4010).
    max_socket_buffer: int = 1024 * 1024
    #: Unacknowledged messages an ack-mode socket may hold.
    ack_window: int = 1000
    #: Also read the ``<prefix>:inbox`` stream; entries another process read
    #: and did not acknowledge are taken over after ``inbox_claim_after`` s.
    inbox: bool = False
    inbox_claim_after: float = 30.0
    #: How many storer partitions a new cluster has (its first node sets
    #: it): nodes share the storing of offline users' messages by them.
    partitions: int = 1

    @property
    def listen_description(self) -> str | None:
        """``--port 8080`` is short for ``tcp:8080``, with a listen backlog
        for a storm of reconnects (a node's sockets coming back after
        another node died), not Twisted's 50."""
        return _description(self.port)

    @property
    def internal_listen_description(self) -> str | None:
        return _description(self.internal_port)


def _description(port: str | None) -> str | None:
    if port is None or not port.isdigit():
        return port
    return f"tcp:{port}:backlog={LISTEN_BACKLOG}"
