"""Connections to Redis that survive Redis going away.

txredisapi speaks the protocol; Twisted's ``ClientService`` reconnects with
backoff. On top of that, ``RedisConnection`` keeps every command until Redis
has answered it: commands a lost connection left unanswered are sent again,
in their original order, as soon as Redis is back. So a store is never
dropped and never overtaken by a later one.

Redis may also answer "not now" (``OOM`` when ``maxmemory`` is reached,
``LOADING``, ``READONLY``...). Such a command is held, not failed: nothing
new is sent while it is tried again with backoff, and once it passes, it
and everything after it go out in their order.

With ``replicas`` (``--redis-replicas-ack``), a durable write counts as done
only once ``WAIT`` says that many replicas have it: until then it stays
pending, so a connection lost meanwhile (the master died before its replicas
had it) sends it again, to whichever master the Sentinels name.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import deque
from collections.abc import Callable, Sequence

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from .compat import bytes_protocol, txredisapi
from .sentinel import MasterEndpoint, SwitchWatch, check_master, switch_watch
from .settings import RedisAddress
from .tls import trust_root


class RedisUnavailable(Exception):
    """Redis cannot be reached right now."""


#: Error replies that say "not now" rather than "never": the first word of
#: the reply, or of the error a script's ``redis.call`` met (Redis 6.2 puts
#: that after ``: -``). ``BUSY`` is a running script, not ``BUSYGROUP``.
_TRANSIENT = re.compile(r"(?:^|: -)(OOM|LOADING|READONLY|MASTERDOWN|BUSY|TRYAGAIN|NOREPLICAS"
                        r"|CLUSTERDOWN|MISCONF)\b")


def transient(error: str) -> bool:
    """Whether an error reply will likely go away by itself (memory freed, a
    replica promoted, a load finished), so the command is worth retrying."""
    return _TRANSIENT.search(error) is not None


log = Logger()


#: Reconnect quickly at first, then every few seconds at most; a little
#: jitter so that many processes do not all come back at once.
RETRY_MAX_DELAY = 3.0
RETRY_POLICY = backoffPolicy(initialDelay=0.05, maxDelay=RETRY_MAX_DELAY, factor=2.0,
                             jitter=lambda: random.uniform(0, 0.1))


class ProtocolFactory(Factory):
    """Builds txredisapi protocols speaking bytes (payloads need not be text)."""

    isLazy = True
    noisy = False

    def __init__(self, address: RedisAddress, protocol: Callable[..., object] | None = None,
                 **attributes) -> None:
        self.address = address
        self.protocol = bytes_protocol(protocol or txredisapi().RedisProtocol)
        self._attributes = attributes

    def buildProtocol(self, addr):
        proto = self.protocol(charset=None, password=self.address.password,
                              username=self.address.username, dbid=self.address.db or None,
                              convertNumbers=False)
        proto.factory = self
        proto.__dict__.update(self._attributes)
        return proto

    # txredisapi calls these when Redis refuses the password or the db.
    def stopTrying(self) -> None:
        pass

    def connectionError(self, why: str) -> None:
        log.error("Redis at {address} refused us: {why}", address=str(self.address), why=why)


def connect_service(reactor, address: RedisAddress, factory: ProtocolFactory,
                    on_ready: Callable[[object], object]) -> ClientService:
    """A ClientService that calls ``on_ready`` with each new connection once
    it is authenticated and on the right database.

    ``prepareConnection`` does not wait for that: a connection lost during
    its setup would then reach ClientService twice (as a failed setup and as
    a disconnection), which its state machine does not allow."""

    # ClientService forgets failed attempts once TCP connects; connections
    # that Redis then refuses (a wrong password, a TLS certificate we do not
    # trust) must still back off. A connection counts once Redis has
    # answered a PING on it.
    refused = [0]

    def prepare(proto) -> None:
        def lost(_):
            service.current = None  # (one connection at a time)
            if not proto.answered:
                refused[0] += 1
                log.warn("Could not set up a connection to Redis at {address}: {why}",
                         address=str(address), why=lost_reason(proto))

        def ping(protocol):
            d = protocol.execute_command(b"PING")
            if address.sentinels:
                d.addCallback(lambda _: check_master(protocol)).addCallback(master, protocol)
            d.addCallbacks(ready, not_ready, callbackArgs=(protocol,), errbackArgs=(protocol,))

        def master(not_one: str | None, protocol) -> None:
            if not_one is not None:
                raise NotTheMaster(not_one)

        def not_ready(failure, protocol):
            # Redis answered, but cannot serve yet (-LOADING while it reads
            # its files back after a restart): hang up and try again later,
            # rather than wait on a connection nothing will make ready.
            if failure.check(NotTheMaster):
                peer = protocol.transport.getPeer()
                reaching.distrust(peer.host, peer.port)
            if not failure.check(txredisapi().ConnectionError):
                proto.lost_reason = failure
                protocol.transport.loseConnection()

        def ready(_, protocol):
            proto.answered = True
            refused[0] = 0
            service.current = protocol
            on_ready(protocol)  # the protocol itself, not ClientService's proxy of it

        proto.answered = False
        proto.whenConnected().addCallback(ping)
        proto.whenDisconnected().addCallback(lost)

    kind = _FollowingMaster if address.sentinels else ClientService
    reaching = endpoint(reactor, address)
    service = kind(reaching, factory, prepareConnection=prepare,
                   clock=reactor,
                   retryPolicy=lambda attempt: RETRY_POLICY(max(attempt, refused[0])))
    if address.sentinels:
        service.watch = switch_watch(reactor, address)
    return service


class NotTheMaster(Exception):
    """A Sentinel named a server that is not (or no longer) the master."""


class _FollowingMaster(ClientService):
    """A connection to the master the Sentinels name, dropped (to be made
    again, where they say) when they announce that it moved."""

    current = None
    watch: SwitchWatch
    _stopped = False

    def startService(self) -> None:
        super().startService()
        self.watch.follow(self._moved)

    def stopService(self) -> defer.Deferred:
        self._stopped = True
        stopped = super().stopService()
        return defer.DeferredList([stopped, self.watch.unfollow(self._moved)])

    def _moved(self) -> None:
        """Connected: drop it, to be made again where the Sentinels say now.
        Not connected (the old master died first, and the attempts since
        failed): try now, not after the backoff those attempts built up."""
        if self.current is not None:
            if self.current.transport is not None:
                self.current.transport.loseConnection()
        elif self.running:
            log.info("Connecting to the new master now")
            ClientService.stopService(self).addCallback(self._start_again)

    def _start_again(self, _) -> None:
        if not self._stopped:
            ClientService.startService(self)


def name_connection(proto, role: str) -> None:
    """``CLIENT SETNAME``, so an operator's ``CLIENT LIST`` shows who is who."""
    proto.execute_command(b"CLIENT", b"SETNAME", f"redmessenger:{role}".encode()).addErrback(
        _unless_lost, "Could not name the Redis connection: {why}")


def _unless_lost(failure: Failure, message: str) -> None:
    """Log a setup command's failure, unless the connection went (which is
    logged once, with its reason)."""
    if not failure.check(txredisapi().ConnectionError):
        log.warn(message, why=failure.getErrorMessage())


def lost_reason(proto) -> str:
    why = proto.lost_reason
    return why.getErrorMessage() if why is not None else "closed"


def endpoint(reactor, address: RedisAddress, timeout: float | None = None):
    """How to reach ``address``: TCP or a Unix socket, in TLS for
    ``rediss://``; ``timeout``: seconds a connection attempt may take."""
    if address.sentinels:
        return MasterEndpoint(reactor, address, timeout)
    description = address.client_endpoint()
    if timeout is not None:
        description += f":timeout={timeout:g}"
    reaching = clientFromString(reactor, description)
    return wrapClientTLS(_tls_options(address), reaching) if address.tls else reaching


def _tls_options(address: RedisAddress):
    from twisted.internet.ssl import optionsForClientTLS

    return optionsForClientTLS(address.host, trustRoot=trust_root(address.ca_file))


class Script:
    """A Lua script, sent by its SHA1 once Redis knows it. ``durable``: it
    writes what must survive a failover (a store, a claim, an ack), so with
    ``--redis-replicas-ack`` it is done once the replicas have it."""

    def __init__(self, source: str, *, durable: bool = False) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()
        self.durable = durable


#: A held command is tried again after this long at first, then twice as
#: long each time, up to HOLD_MAX_DELAY.
HOLD_FIRST_DELAY = 0.05
HOLD_MAX_DELAY = 3.0

#: How long one ``WAIT`` for replicas may take (ms); one that times out
#: short of them is sent again, for as long as it takes. Short, for a WAIT
#: holds up every command sent after it on its connection.
REPLICA_WAIT_MS = 100
#: The replicas count as late once WAITs have come back short for this
#: long (seconds).
REPLICAS_LATE_AFTER = 1.0


class _Command:
    __slots__ = ("args", "durable", "replied", "result", "retry", "script", "sent_on", "seq",
                 "size")

    def __init__(self, args: tuple, retry: bool, script: Script | None = None,
                 durable: bool = False) -> None:
        self.args = args
        self.result: defer.Deferred = defer.Deferred()
        self.retry = retry
        self.script = script
        #: Done once the replicas have it (``--redis-replicas-ack``).
        self.durable = durable
        #: Its reply, kept while the replicas do not have it yet.
        self.replied: tuple | None = None
        self.sent_on = None
        #: The order it was written in, so a ``WAIT`` knows what it covers.
        self.seq = 0
        self.size = sum(len(a) for a in args if isinstance(a, (bytes, str)))


class RedisConnection(Service):
    """One ordered command connection that loses no command."""

    def __init__(self, address: RedisAddress, reactor, scripts: Sequence[Script] = (), *,
                 role: str = "commands", max_pending_bytes: int = 0,
                 replicas: int = 0) -> None:
        self.address = address
        self._reactor = reactor
        self._scripts = list(scripts)
        self._role = role
        self._pending: deque[_Command] = deque()
        self._protocol = None
        self._client: ClientService | None = None
        self._was_connected = False
        self._waiters: list[defer.Deferred] = []
        #: How many times the connection came back after being lost.
        self.reconnects = 0
        #: Why Redis refuses commands right now (``OOM ...``), or ``None``.
        self.refusal: str | None = None
        self._holding = False
        self._probe: _Command | None = None
        self._retry_timer = None
        self._retry_delay = HOLD_FIRST_DELAY
        self._held_since = 0.0
        self._overtook = 0
        #: Bytes of arguments held in unanswered commands; past
        #: ``max_pending_bytes`` (0: no bound) the connection is
        #: ``overloaded`` until it is back under three quarters of it.
        self.pending_bytes = 0
        self.max_pending_bytes = max_pending_bytes
        self.overloaded = False
        #: Called with ``True`` when the connection becomes overloaded and
        #: with ``False`` when it no longer is.
        self.pressure_observers: list[Callable[[bool], object]] = []
        #: Durable writes are done once this many replicas have them.
        self.replicas = replicas
        self._written = 0
        self._wait_timer = None
        #: True while ``WAIT`` has said for ``REPLICAS_LATE_AFTER`` that
        #: fewer replicas than wanted have our writes (they are kept, and
        #: waited for again).
        self.replicas_late = False
        #: When WAITs began to come back short, or ``None``.
        self._short_since: float | None = None
        #: ``WAIT`` calls that timed out short of ``replicas``.
        self.replica_timeouts = 0

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def unreplicated(self) -> int:
        """Durable writes Redis took that its replicas do not have yet."""
        return sum(1 for command in self._pending if command.replied is not None)

    @property
    def writable(self) -> bool:
        """False while Redis is away or refuses writes (out of memory, a
        replica...)."""
        return self._protocol is not None and self.refusal is None

    def startService(self) -> None:
        super().startService()
        self._client = connect_service(self._reactor, self.address,
                                       ProtocolFactory(self.address), self._ready)
        self._client.startService()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        for timer in (self._retry_timer, self._wait_timer):
            if timer is not None and timer.active():
                timer.cancel()
        if self._pending:
            log.critical("Stopping with {count} Redis commands ({bytes} bytes) unanswered: "
                         "{names}", count=len(self._pending), bytes=self.pending_bytes,
                         names=sorted({c.args[0].decode() for c in self._pending}))
        return self._client.stopService()

    def whenConnected(self) -> defer.Deferred:
        """Fires once a connection is ready for commands."""
        if self._protocol is not None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def execute(self, *args) -> defer.Deferred:
        """Run a command; if Redis is away, wait for it and try again."""
        return self._submit(_Command(args, retry=True))

    def execute_now(self, *args) -> defer.Deferred:
        """Run a command that is pointless later: fails with ``RedisUnavailable``
        at once if Redis is away, or if the connection is lost meanwhile."""
        if self._protocol is None:
            return defer.fail(RedisUnavailable(f"no connection to Redis at {self.address}"))
        return self._submit(_Command(args, retry=False))

    def eval(self, script: Script, keys: Sequence, args: Sequence = ()) -> defer.Deferred:
        return self._submit(_Command((b"EVALSHA", script.sha, len(keys), *keys, *args),
                                     retry=True, script=script, durable=script.durable))

    def flushed(self) -> defer.Deferred:
        """Fires once every command handed over before it has been answered
        (and its writes are on the replicas, with ``replicas``)."""
        if not self._pending:
            return defer.succeed(None)
        return self._submit(_Command((b"PING",), retry=True, durable=True)).addCallback(
            lambda _: None)

    # -- the ordered, retried pipeline -----------------------------------

    def _submit(self, command: _Command) -> defer.Deferred:
        self._pending.append(command)
        self.pending_bytes += command.size
        self._check_pressure()
        # While a refused command is held, what comes after it waits behind
        # it; a command that is pointless later goes now or never.
        if self._protocol is not None and not (self._holding and command.retry):
            self._write(command)
        return command.result

    def _write(self, command: _Command) -> None:
        proto = command.sent_on = self._protocol
        command.replied = None
        self._written += 1
        command.seq = self._written
        try:
            d = proto.execute_command(*command.args)
        except txredisapi().ConnectionError:
            return  # connectionLost is on its way and will resend it
        d.addCallbacks(self._answered, self._failed,
                       callbackArgs=(command, proto), errbackArgs=(command, proto))
        if command.durable and self.replicas and self._wait_timer is None:
            # One WAIT per reactor turn covers every write of the turn.
            self._wait_timer = self._reactor.callLater(0, self._wait_for_replicas)

    def _forget(self, command: _Command) -> None:
        if self._pending and self._pending[0] is command:
            self._pending.popleft()
        else:
            self._pending.remove(command)
        self.pending_bytes -= command.size
        self._check_pressure()
        if command is self._probe:
            self._release()

    def _check_pressure(self) -> None:
        bound = self.max_pending_bytes
        if not bound:
            return
        if not self.overloaded and self.pending_bytes > bound:
            self.overloaded = True
            log.warn("{bytes} bytes of Redis commands are unanswered, over "
                     "--max-pending-bytes {bound}: refusing hellos and pausing the "
                     "subscriber until Redis catches up", bytes=self.pending_bytes,
                     bound=bound)
        elif self.overloaded and self.pending_bytes <= bound * 3 // 4:
            self.overloaded = False
            log.info("Redis caught up ({bytes} bytes of commands unanswered): taking "
                     "hellos and reading the subscriber again", bytes=self.pending_bytes)
        else:
            return
        for observer in list(self.pressure_observers):
            observer(self.overloaded)

    def _answered(self, reply, command: _Command, proto) -> None:
        if command.sent_on is not proto:
            return
        if self._holding and command.retry and command is not self._probe \
                and command.args[0] in (b"EVALSHA", b"EVAL"):
            # A script sent before the refusal came back, and taken (one that
            # writes nothing new, or memory was freed in between): it is
            # done; say so when the spell ends.
            self._overtook += 1
        if command.durable and self.replicas:
            # Done once a WAIT says the replicas have it (_replicated).
            command.replied = (reply,)
            if command is self._probe:
                self._release()
        else:
            self._forget(command)
        if self.refusal is not None and not self._holding:
            self._release()  # held commands went again on a new connection, and passed
        if command.replied is None:
            command.result.callback(reply)

    # -- waiting for the replicas (--redis-replicas-ack) -------------------

    def _wait_for_replicas(self) -> None:
        self._wait_timer = None
        proto = self._protocol
        if proto is None:
            return  # _ready sends the writes again, and then waits for them
        covers = self._written
        try:
            d = proto.execute_command(b"WAIT", self.replicas, REPLICA_WAIT_MS)
        except txredisapi().ConnectionError:
            return  # connectionLost is on its way; _ready waits anew
        d.addCallbacks(self._replicated, self._not_replicated,
                       callbackArgs=(proto, covers), errbackArgs=(proto,))

    def _replicated(self, count, proto, covers: int) -> None:
        """What the replicas have is done, in order; short of them, wait
        again: the writes are on the master, and are not given up."""
        if proto is not self._protocol:
            return
        now = self._reactor.seconds()
        if int(count) < self.replicas:
            self.replica_timeouts += 1
            if self._short_since is None:
                self._short_since = now
            if not self.replicas_late and now - self._short_since >= REPLICAS_LATE_AFTER:
                self.replicas_late = True
                log.warn("Only {count} of the {wanted} Redis replicas wanted took our writes "
                         "for {seconds:g} s; {waiting} writes wait for them, not given up",
                         count=int(count), wanted=self.replicas, seconds=REPLICAS_LATE_AFTER,
                         waiting=self.unreplicated)
            self._wait_again(0)
            return
        if self.replicas_late:
            self.replicas_late = False
            log.info("The Redis replicas caught up after {seconds:.1f} s",
                     seconds=now - self._short_since)
        self._short_since = None
        done = [c for c in self._pending
                if c.replied is not None and c.sent_on is proto and c.seq <= covers]
        for command in done:
            self._forget(command)
        for command in done:
            command.result.callback(command.replied[0])

    def _not_replicated(self, failure: Failure, proto) -> None:
        """WAIT refused (a master demoted to a replica answers so): the writes
        stay, to be waited for again, or sent again on a new connection."""
        if failure.check(txredisapi().ConnectionError) or proto is not self._protocol:
            return
        log.warn("Redis refused WAIT ({why}); asking again in {delay} s",
                 why=failure.getErrorMessage(), delay=HOLD_MAX_DELAY)
        self._wait_again(HOLD_MAX_DELAY)

    def _wait_again(self, delay: float) -> None:
        if self._wait_timer is None:
            self._wait_timer = self._reactor.callLater(delay, self._wait_for_replicas)

    def _failed(self, failure: Failure, command: _Command, proto) -> None:
        if command.sent_on is not proto:
            return
        if failure.check(txredisapi().ConnectionError):
            if not command.retry:
                self._forget(command)
                command.result.errback(RedisUnavailable(f"lost the connection to {self.address}"))
            # else: stays pending; _ready sends it again on the next connection
            return
        why = str(failure.value)
        if self.address.sentinels and why.startswith("READONLY") and \
                proto.transport is not None:
            # A master demoted under us: the Sentinels know the new one.
            proto.transport.loseConnection()
        if command.retry and failure.check(txredisapi().ResponseError):
            if command.script is not None and why.startswith("NOSCRIPT"):
                log.warn("Redis forgot a script (SCRIPT FLUSH?); sending its source instead")
                command.args = (b"EVAL", command.script.source, *command.args[2:])
                command.script = None
                self._hold(command, None)
                return
            if transient(why):
                self._hold(command, why)
                return
        self._forget(command)
        command.result.errback(failure)

    # -- holding the pipeline behind a refused command ---------------------

    def _hold(self, command: _Command, why: str | None) -> None:
        """Keep ``command`` where it is in the pipeline, to be sent again; the
        first one held stops new commands until it passes. Commands already
        sent after it are answered meanwhile: those refused too are held in
        their place, and go out again after it, in order."""
        command.sent_on = None
        if why is not None and self.refusal is None:
            self.refusal = why
            log.warn("Redis at {address} refuses commands for now ({why}); holding "
                     "{count} commands, in order, and trying again",
                     address=str(self.address), why=why, count=len(self._pending))
        if command is self._probe:
            self._probe = None
            self._retry_delay = min(max(self._retry_delay * 2, HOLD_FIRST_DELAY),
                                    HOLD_MAX_DELAY)
        elif self._holding:
            return  # sent before the hold began: waits in its place
        else:
            self._holding = True
            self._held_since = self._reactor.seconds()
            self._retry_delay = HOLD_FIRST_DELAY if why is not None else 0
        self._retry_timer = self._reactor.callLater(self._retry_delay, self._try_again)

    def _try_again(self) -> None:
        """Send the oldest held command alone: the pipeline opens again once
        Redis takes it."""
        self._retry_timer = None
        if self._protocol is None:
            return  # _ready sends everything again, in order
        self._probe = next((c for c in self._pending if c.sent_on is None), None)
        if self._probe is None:
            self._release()
        else:
            self._write(self._probe)

    def _release(self) -> None:
        self._probe = None
        self._holding = False
        if self.refusal is not None:
            log.info("Redis at {address} takes commands again after {seconds:.1f} s; "
                     "sending the {count} held", address=str(self.address),
                     seconds=self._reactor.seconds() - self._held_since,
                     count=len(self._pending))
            self.refusal = None
        if self._overtook:
            log.info("{count} scripts sent just after a refused one were taken before "
                     "it", count=self._overtook)
            self._overtook = 0
        if self._protocol is not None:
            for command in list(self._pending):
                if command.sent_on is None:
                    self._write(command)

    def _stop_holding(self) -> None:
        """A new connection sends everything again: nothing is held."""
        if self._retry_timer is not None and self._retry_timer.active():
            self._retry_timer.cancel()
        self._retry_timer = self._probe = None
        self._holding = False

    def _ready(self, proto) -> None:
        self._protocol = proto
        proto.whenDisconnected().addCallback(lambda _: self._lost(proto))
        if self._was_connected:
            self.reconnects += 1
        self._was_connected = True
        log.info("Connected to Redis at {address}; {count} commands to (re)send",
                 address=str(self.address), count=len(self._pending))
        name_connection(proto, self._role)
        self._stop_holding()
        if self._wait_timer is not None and self._wait_timer.active():
            self._wait_timer.cancel()  # the writes sent again below wait anew
        self._wait_timer = None
        for script in self._scripts:
            proto.execute_command(b"SCRIPT", b"LOAD", script.source).addErrback(
                _unless_lost, "Could not load a Lua script: {why}")
        for command in list(self._pending):
            self._write(command)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def _lost(self, proto) -> None:
        if self._protocol is not proto:
            return
        self._protocol = None
        if self.running:
            log.warn("Lost the connection to Redis at {address} ({why}); {count} "
                     "commands will be sent again once it is back",
                     address=str(self.address), why=lost_reason(proto),
                     count=len(self._pending))
