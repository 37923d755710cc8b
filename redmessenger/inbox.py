"""The inbox: a Redis stream that keeps what applications send until it is
delivered or stored, so a message survives RedMessenger being down or
crashing, and a pub/sub disconnect::

    XADD rm:inbox * to users.user1 payload "Hello!"
    XADD rm:inbox * to groups.cats payload "Meow!"

Entries are read with a consumer group and acknowledged (``XACK``) only once
every store they caused is in Redis. Entries a crashed process had read and
not acknowledged are taken over at start, before any new entry, when that
process' heartbeat is gone (see ``RedisStore.forget_dead``), and by any
process after ``--inbox-claim-after`` seconds otherwise. A message read
twice keeps its id (``inbox-<entry id>``), so clients can tell.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from .keys import Namespace
from .redisconnection import RedisConnection, RedisUnavailable, txredisapi
from .routing import Router
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
    def __init__(self, address: RedisAddress, namespace: Namespace, router: Router, store,
                 consumer: str, reactor, *, claim_after: float = 30.0) -> None:
        # A connection of its own: XREADGROUP blocks it while it waits.
        self._redis = RedisConnection(address, reactor, role="inbox")
        self._ns = namespace
        self._key = namespace.inbox
        self._router = router
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
        """Route the entries, then acknowledge ``ids`` (by default theirs)."""
        if ids is None:
            ids = [entry_id for entry_id, _ in entries]
        for entry_id, fields in entries:
            if fields is None:  # trimmed from the stream while pending
                continue
            message = dict(zip(fields[::2], fields[1::2], strict=True))
            to, payload = message.get(b"to"), message.get(b"payload")
            channel = f"{self._ns.prefix}.{to.decode(errors='replace')}" if to else ""
            if payload is None or self._ns.parse_channel(channel) is None:
                log.error("Inbox entry {id} is not to users.<uid> or groups.<gid> with a "
                          "payload; dropping it from the inbox (to: {to!r}; field sizes: "
                          "{sizes})", id=entry_id.decode(), to=(to or b"")[:100],
                          sizes={bytes(k)[:50].decode(errors="replace"): len(v)
                                 for k, v in message.items()})
                continue
            self._router.received_message(channel.encode(), payload,
                                          message_id=f"inbox-{entry_id.decode()}")
        await self._router.settled()
        await self._store.flushed()  # every store these caused is in Redis
        await self._redis.execute(b"XACK", self._key, GROUP, *ids)
