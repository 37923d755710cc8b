"""Redis behind Sentinel (``redis+sentinel://``): every connection asks the
Sentinels where the master is before each attempt, checks that what it
reached is a master, and is dropped when the Sentinels announce a new one
(``+switch-master``), so that it reconnects at once rather than after a
timeout.

txredisapi has a ``Sentinel`` class, which is not used: it keeps a
reconnecting connection to each Sentinel on the global reactor, checks no
certificate for ``rediss+sentinel://``, and takes the first answer it gets,
even from a Sentinel whose view is stale. Here each Sentinel is asked over
a short connection made like any other (TLS and its CA, the Sentinel's own
password), all of them at once, and the master most of those that answered
name is the one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from .compat import txredisapi
from .settings import RedisAddress

log = Logger()

#: Seconds a Sentinel may take to answer where the master is.
ASK_TIMEOUT = 2.0


def sentinel_at(address: RedisAddress, host: str, port: int) -> RedisAddress:
    """How to reach one of ``address``'s Sentinels: TLS as for the data
    nodes, with the Sentinels' own password."""
    return RedisAddress(host=host, port=port, password=address.sentinel_password,
                        tls=address.tls, ca_file=address.ca_file)


async def _ask(reactor, sentinel: RedisAddress, name: str) -> tuple[str, int] | None:
    """The master one Sentinel names, or ``None`` (it does not know it, or
    could not be asked)."""
    from .redisconnection import ProtocolFactory, endpoint  # it imports this module

    try:
        proto = await endpoint(reactor, sentinel, ASK_TIMEOUT).connect(
            ProtocolFactory(sentinel)).addTimeout(ASK_TIMEOUT, reactor)
    except Exception as e:  # down, refused, TLS...: another may answer
        log.debug("Sentinel {sentinel} could not be reached: {why}", sentinel=str(sentinel),
                  why=str(e))
        return None
    try:
        await proto.whenConnected().addTimeout(ASK_TIMEOUT, reactor)
        reply = await proto.execute_command(
            b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME", name.encode()).addTimeout(
            ASK_TIMEOUT, reactor)
    except Exception as e:
        log.warn("Sentinel {sentinel} did not say where master {name} is: {why}",
                 sentinel=str(sentinel), name=name, why=str(e)[:200])
        return None
    finally:
        proto.transport.loseConnection()
    if not reply:
        return None
    host, port = reply
    return bytes(host).decode(), int(port)


async def named_masters(reactor, address: RedisAddress) -> list[tuple[str, int]]:
    """Where the Sentinels that answer say the master is: the most named
    first (the first listed among equals); ``ConnectError`` if none does."""
    answers = await defer.gatherResults([
        defer.ensureDeferred(_ask(reactor, sentinel_at(address, host, port),
                                  address.master_name))
        for host, port in address.sentinels])
    named = Counter(answer for answer in answers if answer is not None)
    if not named:
        raise ConnectError(string=f"no Sentinel of {address} knows master "
                                  f"{address.master_name!r}")
    return sorted(named, key=lambda answer: (-named[answer], answers.index(answer)))


#: Seconds a server named as the master that could not be reached, or was
#: not the master, is tried only after the others named.
DISTRUST_FOR = 10.0


@implementer(IStreamClientEndpoint)
class MasterEndpoint:
    """Connects to the master the Sentinels name, asking before each
    attempt. A Sentinel with a stale view may name a server that is gone or
    no longer the master: such a server is tried last for a while."""

    def __init__(self, reactor, address: RedisAddress, timeout: float | None = None) -> None:
        self._reactor = reactor
        self._address = address
        self._timeout = timeout
        self._distrusted: dict[tuple[str, int], float] = {}

    def distrust(self, host: str, port: int) -> None:
        self._distrusted[(host, port)] = self._reactor.seconds()

    def connect(self, factory) -> defer.Deferred:
        return defer.ensureDeferred(self._connect(factory))

    async def _connect(self, factory):
        from .redisconnection import endpoint

        named = await named_masters(self._reactor, self._address)
        now = self._reactor.seconds()
        named.sort(key=lambda where: now - self._distrusted.get(where, -DISTRUST_FOR)
                   < DISTRUST_FOR)
        for where in named:
            try:
                return await endpoint(self._reactor, self._address.at(*where),
                                      self._timeout).connect(factory)
            except Exception:
                self.distrust(*where)
                if where == named[-1]:
                    raise


def check_master(proto) -> defer.Deferred:
    """Fires with ``None`` if what ``proto`` reached is a master, else with
    why not (a replica, or a master just demoted)."""
    def role(reply) -> str | None:
        kind = bytes(reply[0]).decode() if reply else "nothing"
        return None if kind == "master" else f"it is a {kind}, not the master"

    return proto.execute_command(b"ROLE").addCallback(role)


class SwitchWatch:
    """Listens on every Sentinel for ``+switch-master`` of one master, and
    calls its followers when it hears that the master moved. One per
    address in the process, shared by its connections; it listens while
    someone follows it."""

    def __init__(self, reactor, address: RedisAddress) -> None:
        self._reactor = reactor
        self._address = address
        self._followers: list[Callable[[], object]] = []
        self._services: list[ClientService] = []
        self._last = ""

    def follow(self, moved: Callable[[], object]) -> None:
        if not self._followers:
            self._start()
        self._followers.append(moved)

    def unfollow(self, moved: Callable[[], object]) -> defer.Deferred:
        self._followers.remove(moved)
        if self._followers:
            return defer.succeed(None)
        services, self._services = self._services, []
        return defer.DeferredList([service.stopService() for service in services])

    def _start(self) -> None:
        from .redisconnection import ProtocolFactory, connect_service

        watch = self

        class Listener(txredisapi().SubscriberProtocol):
            def messageReceived(self, pattern, channel, message) -> None:
                watch._heard(bytes(message).decode(errors="replace"))

        def listen(proto) -> None:
            proto.subscribe([b"+switch-master"]).addErrback(
                lambda f: log.warn("A Sentinel refused to say when the master moves: {why}",
                                   why=f.getErrorMessage()[:200]))

        for host, port in self._address.sentinels:
            sentinel = sentinel_at(self._address, host, port)
            service = connect_service(self._reactor, sentinel,
                                      ProtocolFactory(sentinel, protocol=Listener), listen)
            service.startService()
            self._services.append(service)

    def _heard(self, message: str) -> None:
        """Each Sentinel says it: the first one is enough."""
        name, _, where = message.partition(" ")
        if name != self._address.master_name or where == self._last:
            return
        self._last = where
        log.warn("The Sentinels moved master {name} (from, to: {where})", name=name,
                 where=where)
        for moved in list(self._followers):
            moved()


_watches: dict[tuple, SwitchWatch] = {}


def switch_watch(reactor, address: RedisAddress) -> SwitchWatch:
    """The process's watch on ``address``'s master."""
    key = (address.sentinels, address.master_name, address.sentinel_password, address.tls,
           address.ca_file)
    if key not in _watches:
        _watches[key] = SwitchWatch(reactor, address)
    return _watches[key]
