"""The inbox: a Redis stream that keeps what applications send until it is
delivered or stored, so a message survives RedMessenger being down or
crashing, and a pub/sub disconnect::

    XADD rm:inbox * to users.user1 payload "Hello!"
    XADD rm:inbox * to groups.cats payload "Meow!"

Entries are read with a consumer group, by one node of a cluster at a time
(the one that stores for partition 0, see ``membership``), in order. One
script stores each entry for its recipients, wakes the nodes of those
online (which drain it to them at once), and acknowledges it: no node's
death can lose it. Entries a dead reader had read and not acknowledged are
handled first, when its lease is gone, and by any reader after
``--inbox-claim-after`` seconds otherwise; each user keeps the id of the
last entry stored for it, so an entry read twice is stored once.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from .envelope import Envelope
from .keys import Namespace
from .redisconnection import RedisConnection, RedisUnavailable, txredisapi
from .settings import RedisAddress

log = Logger()

GROUP = b"redmessenger"
BATCH = 100

#: After an error reply the reader waits this long, then twice as long each
#: time it fails again, up to RETRY_MAX_DELAY.
RETRY_FIRST_DELAY = 0.05
RETRY_MAX_DELAY = 3.0


def _gone(why: str) -> bool:
    """The stream or its group was deleted (``NOGROUP``; ``UNBLOCKED`` for a
    read blocked on a stream that was deleted): made again at once."""
    return why.startswith("NOGROUP") or (why.startswith("UNBLOCKED") and "no longer" in why)


class Inbox(Service):
    def __init__(self, address: RedisAddress, namespace: Namespace, store,
                 consumer: str, reactor, *, claim_after: float = 30.0) -> None:
        # A connection of its own: XREADGROUP blocks it while it waits.
        self._redis = RedisConnection(address, reactor, role="inbox")
        self._ns = namespace
        self._key = namespace.inbox
        self._store = store
        self._consumer = consumer.encode()
        self._claim_after = int(claim_after * 1000)
        self._reactor = reactor
        self._loop: defer.Deferred | None = None
        self._pause: defer.Deferred | None = None
        #: Why the reader cannot read right now (an error reply), or ``None``.
        self.failing: str | None = None

    def startService(self) -> None:
        super().startService()
        self._redis.startService()
        self._loop = defer.ensureDeferred(self._run())
        self._loop.addErrback(lambda f: log.failure("The inbox stopped reading", f))

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._pause is not None:
            self._pause.cancel()
        return self._redis.stopService()

    @property
    def reading(self) -> bool:
        """False while error replies keep the reader from reading."""
        return self.failing is None

    async def _run(self) -> None:
        dead_taken_over = mine_handled = False
        delay = RETRY_FIRST_DELAY
        while self.running:
            try:
                await self._redis.whenConnected()
                await self._ensure_group()
                if not dead_taken_over:
                    await self._take_over_the_dead()
                    dead_taken_over = True
                if not mine_handled:
                    await self._handle_mine()
                    mine_handled = True
                # Entries whose reader died first, then new ones.
                entries = await self._claim() or await self._read()
                self._recovered()
                delay = RETRY_FIRST_DELAY
                if entries:
                    await self._handle(entries)
            except RedisUnavailable:
                # The connection went, maybe with the reply to a read: what
                # that read gave this reader is pending here, and older
                # than anything unread. Wait for Redis, then handle it first.
                mine_handled = False
            except Exception as e:  # an error reply, or our own bug: never the end
                # What was read and not acknowledged is read again first.
                mine_handled = False
                why = str(e) if isinstance(e, txredisapi().ResponseError) else repr(e)
                if _gone(why):
                    log.warn("The inbox {key} or its group is gone ({why}); making them "
                             "again", key=self._key, why=why)
                elif self.failing is None:
                    log.warn("The inbox cannot read {key} ({why}); trying again with backoff",
                             key=self._key, why=why)
                    self.failing = why
                try:
                    await self._sleep(delay)
                except defer.CancelledError:
                    return
                delay = min(delay * 2, RETRY_MAX_DELAY)

    def _recovered(self) -> None:
        if self.failing is not None:
            log.info("The inbox reads {key} again", key=self._key)
            self.failing = None

    def _sleep(self, seconds: float) -> defer.Deferred:
        self._pause = task.deferLater(self._reactor, seconds, lambda: None)
        self._pause.addBoth(self._paused)
        return self._pause

    def _paused(self, result):
        self._pause = None
        return result

    async def _ensure_group(self) -> None:
        """From the stream's beginning: what was added while no RedMessenger
        had ever run is read too."""
        try:
            await self._redis.execute_now(b"XGROUP", b"CREATE", self._key, GROUP, b"0",
                                          b"MKSTREAM")
        except txredisapi().ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def _take_over_the_dead(self) -> None:
        """Handle, in order, what readers without a heartbeat had read and
        not acknowledged, then forget them: their entries are older than
        anything still unread."""
        for info in await self._redis.execute_now(b"XINFO", b"CONSUMERS", self._key, GROUP):
            name = bytes(dict(zip(info[::2], info[1::2], strict=True))[b"name"])
            if name == self._consumer or await self._redis.execute_now(
                    b"EXISTS", self._ns.process(name.decode(errors="replace"))):
                continue
            taken = 0
            while pending := await self._redis.execute_now(
                    b"XPENDING", self._key, GROUP, b"-", b"+", BATCH, name):
                ids = [entry_id for entry_id, *_ in pending]
                entries = await self._redis.execute_now(b"XCLAIM", self._key, GROUP,
                                                        self._consumer, 0, *ids)
                taken += len(entries)
                await self._handle(entries, ids)
            await self._redis.execute_now(b"XGROUP", b"DELCONSUMER", self._key, GROUP, name)
            if taken:
                log.warn("Took over {count} inbox entries that {reader}, which died, had "
                         "read and not acknowledged", count=taken,
                         reader=name.decode(errors="replace"))

    async def _handle_mine(self) -> None:
        while True:
            reply = await self._redis.execute_now(b"XREADGROUP", b"GROUP", GROUP,
                                                  self._consumer, b"COUNT", BATCH,
                                                  b"STREAMS", self._key, b"0")
            if not reply or not reply[0][1]:
                return
            await self._handle(reply[0][1])

    async def _claim(self) -> list:
        reply = await self._redis.execute_now(b"XAUTOCLAIM", self._key, GROUP,
                                              self._consumer, self._claim_after, b"0-0",
                                              b"COUNT", BATCH)
        return reply[1]

    async def _read(self) -> list:
        reply = await self._redis.execute_now(b"XREADGROUP", b"GROUP", GROUP, self._consumer,
                                              b"COUNT", BATCH, b"BLOCK", 1000, b"STREAMS",
                                              self._key, b">")
        return reply[0][1] if reply else []

    async def _handle(self, entries: list, ids: list | None = None) -> None:
        """Store, wake and acknowledge the entries (and acknowledge ``ids``
        whose entries are gone: trimmed from the stream while pending)."""
        batch: list[tuple[bytes, str, str, Envelope | None]] = []
        now_ms = int(self._reactor.seconds() * 1000)
        for entry_id, fields in entries:
            target = None if fields is None else self._target(entry_id, fields)
            if target is None:
                batch.append((entry_id, "-", "", None))
                continue
            channel, kind, ident, payload = target
            envelope = Envelope(f"inbox-{entry_id.decode()}", channel, now_ms, payload)
            batch.append((entry_id, kind, ident, envelope))
        read = {entry_id for entry_id, _ in entries}
        batch += [(entry_id, "-", "", None) for entry_id in ids or () if entry_id not in read]
        if batch:
            await self._store.inbox(self._key, GROUP, batch)

    def _target(self, entry_id: bytes, fields: list) -> tuple[str, str, str, bytes] | None:
        """``(channel, kind, id, payload)`` of a valid entry; else logged."""
        message = dict(zip(fields[::2], fields[1::2], strict=True))
        to, payload = message.get(b"to"), message.get(b"payload")
        channel = f"{self._ns.prefix}.{to.decode(errors='replace')}" if to else ""
        target = self._ns.parse_channel(channel)
        if payload is None or target is None:
            log.error("Inbox entry {id} is not to users.<uid> or groups.<gid> with a "
                      "payload; dropping it from the inbox (to: {to!r}; field sizes: "
                      "{sizes})", id=entry_id.decode(), to=(to or b"")[:100],
                      sizes={bytes(k)[:50].decode(errors="replace"): len(v)
                             for k, v in message.items()})
            return None
        return channel, *target, bytes(payload)
