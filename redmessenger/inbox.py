"""The inbox: a Redis stream that keeps what applications send until it is
delivered or stored, so a message survives RedMessenger being down or
crashing, and a pub/sub disconnect::

    XADD rm:inbox * to users.user1 payload "Hello!"
    XADD rm:inbox * to groups.cats payload "Meow!"

Entries are read with a consumer group and acknowledged (``XACK``) only once
every store they caused is in Redis; entries a crashed process had read and
not acknowledged are claimed by another after ``--inbox-claim-after``
seconds. A message read twice keeps its id (``inbox-<entry id>``), so
clients can tell.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from .keys import Namespace
from .redisconnection import RedisConnection, RedisUnavailable, txredisapi
from .routing import Router
from .settings import RedisAddress

log = Logger()

GROUP = b"redmessenger"
BATCH = 100


class Inbox(Service):
    def __init__(self, address: RedisAddress, namespace: Namespace, router: Router, store,
                 consumer: str, reactor, *, claim_after: float = 30.0) -> None:
        # A connection of its own: XREADGROUP blocks it while it waits.
        self._redis = RedisConnection(address, reactor)
        self._ns = namespace
        self._key = namespace.inbox
        self._router = router
        self._store = store
        self._consumer = consumer.encode()
        self._claim_after = int(claim_after * 1000)
        self._loop: defer.Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._redis.startService()
        self._loop = defer.ensureDeferred(self._run())
        self._loop.addErrback(lambda f: log.failure("The inbox stopped reading", f))

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self._redis.stopService()

    async def _run(self) -> None:
        while self.running:
            try:
                await self._redis.whenConnected()
                await self._ensure_group()
                # Entries whose reader died first, then new ones.
                entries = await self._claim() or await self._read()
                if entries:
                    await self._handle(entries)
            except RedisUnavailable:
                continue  # the connection went: wait for it, then read again

    async def _ensure_group(self) -> None:
        """From the stream's beginning: what was added while no RedMessenger
        had ever run is read too."""
        try:
            await self._redis.execute_now(b"XGROUP", b"CREATE", self._key, GROUP, b"0",
                                          b"MKSTREAM")
        except txredisapi().ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

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

    async def _handle(self, entries: list) -> None:
        ids = []
        for entry_id, fields in entries:
            ids.append(entry_id)
            if fields is None:  # trimmed from the stream while pending
                continue
            message = dict(zip(fields[::2], fields[1::2], strict=True))
            to, payload = message.get(b"to"), message.get(b"payload")
            channel = f"{self._ns.prefix}.{to.decode(errors='replace')}" if to else ""
            if payload is None or self._ns.parse_channel(channel) is None:
                log.error("Inbox entry {id} is not to users.<uid> or groups.<gid> with a "
                          "payload; dropping it from the inbox: {fields!r}",
                          id=entry_id.decode(), fields=message)
                continue
            self._router.received_message(channel.encode(), payload,
                                          message_id=f"inbox-{entry_id.decode()}")
        await self._router.settled()
        await self._store.flushed()  # every store these caused is in Redis
        await self._redis.execute(b"XACK", self._key, GROUP, *ids)
