"""``RedMessengerService``: every part wired together, started and stopped in
the order that loses nothing. Embed it in any Twisted application with
``setServiceParent``; ``twistd redmessenger`` only wraps it."""

from __future__ import annotations

import os
import socket
import sys
import uuid

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import compat, web
from ._version import __version__
from .auth import Authenticator
from .delivery import Dispatcher
from .embedded import EmbeddedRedis, EmbeddedRedisError
from .events import Streams
from .frames import Close
from .inbox import Inbox
from .keys import Namespace
from .membership import SCRIPTS as CLUSTER_SCRIPTS
from .membership import Membership
from .presence import ClusterView
from .redisconnection import RedisConnection, RedisUnavailable
from .routing import Router
from .settings import ACCEPTS_PER_TURN, AuthMode, RedisAddress, Settings
from .stats import Stats
from .store import SCRIPTS, RedisStore
from .subscriber import Subscriber
from .websocket import CLOSE_TIMEOUT, RedMessengerFactory

log = Logger()

#: The owners of the services running in this process.
_running_here: set[str] = set()


class RedMessengerService(MultiService):
    """The WebSocket server, the Redis subscriber and command connection,
    and (with no Redis given) the embedded ``redis-server``.

    Its parts are its named child services (``embedded-redis``, ``redis``,
    ``subscriber``), but it starts and stops them itself: each step waits
    for the one before (Redis ready before clients, writes flushed before
    Redis stops), which ``MultiService``'s all-at-once order cannot do.
    """

    def __init__(self, settings: Settings, reactor=None, *,
                 fatal_start: bool | None = None, endpoint=None,
                 worker: int | None = None) -> None:
        """``fatal_start``: whether a failed start stops the reactor (and
        the process, with status 1). By default it does under ``twistd``,
        where nothing else would notice, and does not in an application
        that runs its own reactor (it has ``whenListening()``).
        ``endpoint`` and ``worker``: where a worker of ``--workers`` listens
        instead of ``settings.port``, and which worker it is."""
        super().__init__()
        self.endpoint, self.worker = endpoint, worker
        if reactor is None:
            from twisted.internet import reactor
        self.settings = settings
        self.reactor = reactor
        self._fatal_start = _under_twistd() if fatal_start is None else fatal_start
        namespace = Namespace(settings.prefix)
        if settings.redis is None:
            self.embedded: EmbeddedRedis | None = EmbeddedRedis(
                settings.embedded_port, settings.data_dir, reactor)
            try:
                password = self.embedded.password
            except EmbeddedRedisError:
                password = None  # its start fails, for the same reason, and says why
            address = RedisAddress(port=settings.embedded_port, password=password)
        else:
            self.embedded = None
            address = settings.redis
        self.redis = RedisConnection(address, reactor, (*SCRIPTS, *CLUSTER_SCRIPTS),
                                     max_pending_bytes=settings.max_pending_bytes,
                                     replicas=settings.redis_replicas_ack)
        stats = Stats()
        #: This process, in Redis: its lease, its claims, its inbox reads,
        #: its sockets' ids.
        self.owner = uuid.uuid4().hex[:12]
        #: Where this process runs, in its lease (see ``_died_here``).
        self.whereabouts = f"{socket.gethostname()} {os.getpid()}"
        self.store = RedisStore(self.redis, namespace, self.owner,
                                queue_ttl=settings.queue_ttl, queue_max=settings.queue_max,
                                dead_max=settings.dead_max, stats=stats, reactor=reactor)
        view = ClusterView(self.owner, settings.partitions)
        self.subscriber = Subscriber(address, namespace, reactor, channels=(
            namespace.cluster_channel.encode(), namespace.node_channel(self.owner).encode()))
        #: The node's lease is renewed on a connection of its own (membership).
        self.lease_redis = RedisConnection(address, reactor, role="lease")
        self.membership = Membership(self.redis, self.lease_redis, self.store,
                                     self.subscriber, view, namespace,
                                     self.whereabouts, reactor,
                                     max_sockets=settings.max_sockets_per_user,
                                     partitions=settings.partitions, lost=self._lost)
        self.dispatcher = Dispatcher(self.store, namespace,
                                     max_sockets_per_user=settings.max_sockets_per_user,
                                     drain_chunk=settings.drain_chunk,
                                     ack_window=settings.ack_window, trace=settings.verbose,
                                     stats=stats, presence=self.membership)
        view.outbid = self.dispatcher.outbid
        view.evicted = self.dispatcher.evict
        self.router = Router(self.dispatcher, self.store, namespace, view=view,
                             trace=settings.verbose, wait_on=self.membership.wait_on)
        self.membership.handed_over = self.router.handed_over
        self.subscriber.on_message = self.router.received_message
        self.redis.pressure_observers.append(self.subscriber.pause)
        self.inbox = (Inbox(address, namespace, self.store, self.owner, reactor,
                            claim_after=settings.inbox_claim_after)
                      if settings.inbox else None)
        view.woken = self.dispatcher.wake
        self.membership.describe = self.describe
        self.membership.partitions_changed.append(self._read_the_inbox_or_not)
        self.factory = RedMessengerFactory(
            self.dispatcher, Authenticator(settings, self.store),
            settings, reactor, server=f"RedMessenger/{__version__}",
            redis_connected=lambda: self.redis.connected, recovered=self.whenRecovered,
            redis_overloaded=lambda: self.redis.overloaded)
        #: Server-Sent Events streams (``/events``), sockets like WebSockets.
        self.streams = Streams(self.factory, self.store, settings.ack_window)
        for name, child in (("embedded-redis", self.embedded), ("redis", self.redis),
                            ("lease", self.lease_redis), ("subscriber", self.subscriber),
                            ("inbox", self.inbox)):
            if child is not None:
                child.setName(name)
                self.addService(child)
        #: Fires once start-up recovery of dead processes' claims is done.
        self.recovery: defer.Deferred | None = None
        self._recovery_waiters: list[defer.Deferred] = []
        self.port = None
        #: The listener of ``--internal-port``, if any.
        self.internal_port = None
        #: What admits connections: one per listener, and one for
        #: ``resource()``'s WebSockets.
        self.admissions: list = []
        self._resource = None
        self.listening: str | None = None
        self._starting: defer.Deferred | None = None
        self._start_outcome = None
        self._start_waiters: list[defer.Deferred] = []
        #: A failed start and stopService may both let go of the parts:
        #: one after the other, never interleaved.
        self._letting_go = defer.DeferredLock()

    def describe(self) -> dict:
        """This node, as ``redmessenger status`` shows it from Redis."""
        host, _, pid = self.whereabouts.partition(" ")
        return {"node": self.owner, "host": host, "pid": int(pid), "version": __version__,
                "listening": self.listening,
                "worker": self.worker, "connections": len(self.factory.connections),
                "users_online": self.dispatcher.users}

    @property
    def handshaking(self) -> int:
        """Connections accepted that are not WebSockets (yet)."""
        return sum(admission.handshaking for admission in self.admissions)

    def resource(self):
        """RedMessenger's HTTP side, for an application that serves its own
        twisted.web site: ``putChild`` it anywhere. The WebSocket is at its
        root, ``/client.js`` beneath it, and (unless ``--internal-port``
        serves them) the demo page, ``/health`` and ``/metrics``. Its
        WebSockets count against the same limits as on a port. With
        ``Settings(port=None)`` the service listens on nothing of its own;
        it still owns its Redis connections and stops as gracefully."""
        if self._resource is None:
            self._resource = web.mounted(self, internal=self.settings.internal_port is None)
        return self._resource

    def whenListening(self) -> defer.Deferred:
        """Fires with the listening port (``None`` with no port of its own)
        once clients can connect, or fails with the reason the service
        could not start."""
        outcome = self._start_outcome
        if outcome is not None:
            return defer.fail(outcome) if isinstance(outcome, Failure) \
                else defer.succeed(self.port)
        d = defer.Deferred()
        self._start_waiters.append(d)
        return d

    def _start_settled(self, outcome) -> None:
        """Hand the outcome to whoever waits in ``whenListening``; a failure
        was logged by ``_could_not_start`` and ends here."""
        self._start_outcome = outcome if isinstance(outcome, Failure) else True
        waiters, self._start_waiters = self._start_waiters, []
        for d in waiters:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(self.port)

    def startService(self) -> None:
        Service.startService(self)
        compat.defer_autobahn_debug_formatting()
        _running_here.add(self.owner)
        if self.settings.auth is AuthMode.OFF:
            log.warn("--auth off: any client may claim any user id. Development only!")
            if self.settings.allowed_origins == ("*",):
                log.warn("--auth off and any origin allowed: any web page a user visits "
                         "can open a socket as any user. Set --allowed-origins.")
        if self.embedded is not None:
            self.embedded.startService()
            started = self.embedded.whenReady()
        else:
            started = defer.succeed(None)
        started.addCallback(self._connect_and_listen)
        started.addErrback(self._could_not_start)
        started.addBoth(self._start_settled)
        self._starting = started

    def _connect_and_listen(self, _):
        self.redis.startService()
        self.lease_redis.startService()
        joined = defer.ensureDeferred(self._join())
        joined.addCallbacks(self._recover, self._could_not_join)
        settings = self.settings
        listening = []
        if settings.internal_port is not None:
            endpoint = serverFromString(self.reactor, settings.internal_listen_description)
            listening.append(endpoint.listen(web.admission(self, internal=True)).addCallback(
                self._listening_internally))
        if self.endpoint is not None or settings.port is not None:
            endpoint = self.endpoint or serverFromString(self.reactor,
                                                         settings.listen_description)
            listening.append(endpoint.listen(web.admission(
                self, internal=settings.internal_port is None)).addCallback(self._listening))
        return defer.gatherResults(listening, consumeErrors=True).addErrback(
            lambda failure: failure.value.subFailure)

    async def _join(self) -> None:
        """Forget the processes of this host that died (their leases, so that
        what they held is taken over now), take this node's lease and its
        storer partitions, and subscribe."""
        for owner in await self.store.forget_dead(_died_here):
            log.warn("Process {owner} of this host is gone: what it held comes back now",
                     owner=owner)
        await self.membership.start()
        if self._letting_go.locked or not self.running:
            return  # stopping meanwhile (or a start that failed)
        self.subscriber.startService()
        await self.subscriber.whenSubscribed()

    def _could_not_join(self, failure) -> None:
        if not failure.check(defer.CancelledError):
            log.failure("Could not join the cluster", failure)

    def _lost(self) -> None:
        """This node counted as dead and what it held was taken over: it
        must not go on as if it had not (docs/scaling.rst). Its sockets
        reconnect, to any node."""
        if not self.running:
            return
        log.critical("Stopping: this node lost its place in the cluster; its clients "
                     "reconnect to the others")
        if self._fatal_start:
            _exit_after_shutdown(self.reactor, 1)
        else:
            self.stopService()

    def _recover(self, _) -> None:
        """What processes that died held goes back now, before any hello is
        taken or the inbox is read, so that it comes before newer messages:
        not only when each user next connects."""
        d = self.recovery = defer.ensureDeferred(self._put_back_what_the_dead_held())
        d.addErrback(lambda f: log.failure("Could not recover dead processes' claims", f))
        d.addCallback(self._recovered)

    async def _put_back_what_the_dead_held(self) -> None:
        count = await self.store.recover()
        if count:
            log.warn("Put back {count} messages that processes which died were draining",
                     count=count)

    def _recovered(self, _) -> None:
        waiters, self._recovery_waiters = self._recovery_waiters, None
        for d in waiters:
            d.callback(None)
        self._read_the_inbox_or_not()

    def _read_the_inbox_or_not(self) -> None:
        """One node reads the inbox, in order: the one that stores for
        partition 0 (and was started with --inbox), once recovery is done."""
        if self.inbox is None or self._recovery_waiters is not None:
            return
        reads = (0 in self.membership.view.held and self.running and self.redis.running
                 and not self._letting_go.locked)
        if reads and not self.inbox.running:
            self.inbox.startService()
        elif not reads and self.inbox.running:
            self.inbox.stopService()

    def whenRecovered(self) -> defer.Deferred:
        """Fires once what dead processes held is back in the queues (or
        could not be put back, which is logged): hellos wait for it."""
        if self._recovery_waiters is None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._recovery_waiters.append(d)
        return d

    def _listening(self, port):
        self.port = port
        compat.cap_accepts_per_turn(port, ACCEPTS_PER_TURN)
        #: Where it listens, as ``redmessenger status`` shows it.
        self.listening = _where(port.getHost())
        log.info("RedMessenger {version} listening on {where} for WebSocket clients; "
                 "Redis at {redis}", version=__version__, where=str(port.getHost()),
                 redis=str(self.redis.address))
        return port

    def _listening_internally(self, port):
        self.internal_port = port
        log.info("Demo page, /health and /metrics on {where}", where=str(port.getHost()))
        return port

    def _could_not_start(self, failure):
        """Log why, then let go of everything started so far (a service
        that does not listen must not stay subscribed, storing copies of
        what another RedMessenger delivers), and only then hand the failure
        on: to ``whenListening``, and to the reactor when ``fatal_start``."""
        if failure.check(defer.CancelledError):
            return failure  # stopService is stopping it
        log.critical("RedMessenger could not start: {why}", why=failure.getErrorMessage())
        for port in (self.port, self.internal_port):  # the other listener may have started
            if port is not None:
                port.stopListening()
        self.port = self.internal_port = None
        undoing = self._letting_go.run(self._let_go)
        undoing.addErrback(lambda f: log.failure("Could not stop what started", f))

        def undone(_):
            if self._fatal_start:
                _exit_after_shutdown(self.reactor, 1)
            return failure

        return undoing.addCallback(undone)

    @defer.inlineCallbacks
    def stopService(self):
        """Stop accepting, give every undelivered message back to Redis, wait
        until Redis has it all, say goodbye (1001), then stop Redis."""
        Service.stopService(self)
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        for port in (self.port, self.internal_port):
            if port is not None:
                yield port.stopListening()
        yield self._letting_go.run(self._let_go)
        _running_here.discard(self.owner)
        log.info("RedMessenger stopped")

    @defer.inlineCallbacks
    def _let_go(self):
        """Stop the inbox, the sockets, the node's part in the cluster, the
        subscriber, command connection and embedded Redis, each if it runs,
        giving back what is undelivered."""
        if self.inbox is not None and self.inbox.running:
            yield self.inbox.stopService()  # what it read and did not ack is read again
        if self.redis.running:
            recommitted = self.dispatcher.stop()
            try:
                yield recommitted.addTimeout(self.settings.shutdown_timeout, self.reactor)
            except defer.TimeoutError:
                log.critical("Redis did not take every pending write within {timeout} s",
                             timeout=self.settings.shutdown_timeout)
            if self.membership.started:  # hand the storer partitions over, and leave
                try:
                    yield defer.ensureDeferred(self.membership.stop()).addTimeout(
                        self.settings.shutdown_timeout, self.reactor)
                except (RedisUnavailable, defer.TimeoutError):
                    pass
            if self.subscriber.running:
                yield self.subscriber.stopService()
            closing = [c.is_closed for c in self.factory.connections]
            self.factory.close_all(Close.GOING_AWAY, "shutting_down",
                                   "the server is shutting down")
            yield defer.DeferredList(closing).addTimeout(CLOSE_TIMEOUT + 1, self.reactor,
                                                         lambda *a: None)
            yield self.redis.stopService()
        if self.lease_redis.running:
            yield self.lease_redis.stopService()
        if self.embedded is not None and self.embedded.running:
            yield self.embedded.stopService()


def _died_here(owner: str, whereabouts: str) -> bool:
    """Whether a heartbeat's ``"<host> <pid>"`` is a process of this host
    that no longer runs. Our own pid with an owner not running here is an
    earlier run of ours (pid 1 in a restarted container); a pid reused by
    another program only means waiting for the heartbeat to expire."""
    host, _, pid = whereabouts.partition(" ")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return owner not in _running_here
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def _under_twistd() -> bool:
    """Whether this process is twistd (or twist) running an application."""
    return any(name in sys.modules for name in ("twisted.scripts.twistd",
                                                "twisted.application.twist._twist"))


def _exit_after_shutdown(reactor, code: int) -> None:
    """Stop the reactor and make the process exit with ``code``: twistd has
    no way to return a status, and a service that could not start must not
    look like a clean stop to whoever supervises it."""

    def exit_now():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    reactor.addSystemEventTrigger("after", "shutdown", exit_now)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)


def _where(address) -> str:
    """``host:port`` (``[::1]:port``), or a UNIX socket's path: short
    enough for a column of ``redmessenger status``."""
    if not hasattr(address, "port"):
        return os.fsdecode(address.name or "")
    host = address.host
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"
