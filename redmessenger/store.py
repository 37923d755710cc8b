"""The users' queues, tokens and the groups' members, in Redis.

Every change to a queue is one Lua script, so each is atomic: a message
stored while a drain is taking the queue is either taken or left for the
next take, never lost between a read and a delete.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable, Sequence
from typing import NamedTuple

from twisted.internet import defer
from twisted.logger import Logger

from . import lua
from .envelope import Envelope
from .keys import Namespace
from .redisconnection import RedisConnection, Script
from .stats import Stats

# The scripts, in redmessenger/lua/: each says what its KEYS and ARGV are.
# The durable ones keep messages (stored, claimed, put back, acknowledged):
# with --redis-replicas-ack they are done once the replicas have them.
STORE = Script(lua.source("store", "push"), durable=True)
REQUEUE = Script(lua.source("requeue"), durable=True)
TAKE = Script(lua.source("take", "recover"), durable=True)
HOLD = Script(lua.source("hold"), durable=True)
TRIM = Script(lua.source("trim"), durable=True)
RELEASE = Script(lua.source("release"))
RECOVER = Script(lua.source("recover", "recover"), durable=True)
DEAD = Script(lua.source("dead"), durable=True)
MEMBERS = Script(lua.source("members", "members"))
INBOX = Script(lua.source("inbox", "members", "push", "deliver"), durable=True)
ACK_THROUGH = Script(lua.source("ack_through", "recover"), durable=True)

SCRIPTS = (STORE, REQUEUE, TAKE, HOLD, TRIM, RELEASE, RECOVER, MEMBERS, DEAD, INBOX, ACK_THROUGH)


def store_arguments(lease: str, messages: Sequence[tuple[Sequence[str], bytes]], ttl: int,
                    max_length: int) -> tuple[list[str], list]:
    """KEYS and ARGV of one ``STORE`` call for ``(queue keys, envelope)`` pairs,
    refused unless the node's ``lease`` lives."""
    keys: list[str] = [lease]
    args: list = [ttl, max_length]
    for queues, envelope in messages:
        keys.extend(queues)
        args += [len(queues), envelope]
    return keys, args


#: A dead letter's envelope longer than this is kept in parts of this size
#: in a list of its own: Redis takes no value over ``proto-max-bulk-len``
#: (1 MB at the least), which may be why the message is dead.
DEAD_PART = 256 * 1024

#: Lua's unpack() takes at most about 8,000 values.
MAX_TAKE = 5000


#: Stores gathered into one Redis call: at most this many queue keys.
MAX_BATCH_KEYS = 5000


log = Logger()


class Taken(NamedTuple):
    """What one take of a drain brought: the raw entries, how many are left
    in the queue, and the claim to release once the entries are handled."""

    items: list[bytes]
    left: int
    claim: str
    uid: str


class RedisStore:
    """``MessageStore`` on one ordered Redis connection, plus the lookups
    (tokens, group members) that decide who gets what.

    Stores made in one reactor turn go to Redis as one script call: a burst
    for offline users costs a round trip per turn, not per message. Every
    other command sends the gathered stores first, so Redis sees everything
    in the order it was asked."""


    def __init__(self, connection: RedisConnection, namespace: Namespace, owner: str, *,
                 queue_ttl: int = 0, queue_max: int = 0, dead_max: int = 100_000,
                 stats: Stats | None = None, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._redis = connection
        self._dead_max = dead_max
        self._stats = stats or Stats()
        #: Stores not settled yet (in Redis, or dead-lettered).
        self._unsettled: set[defer.Deferred] = set()
        self._ns = namespace
        self._owner = owner
        self._ttl = queue_ttl
        self._max = queue_max
        self._reactor = reactor
        self._batch: list[tuple[Sequence[str], Envelope]] = []
        self._batch_keys = 0
        self._timer = None
        self._claims = itertools.count(1)
        #: Called when Redis refuses a store because this node's lease is
        #: gone; fires with whether the node may go on (its lease renewed).
        self.fenced: Callable[[], defer.Deferred] = lambda: defer.succeed(False)
        #: Claims to trim this turn: claim key -> how many it keeps.
        self._trims: dict[str, int] = {}

    def store(self, uids: Sequence[str], envelope: Envelope) -> None:
        self._batch.append((uids, envelope))
        self._batch_keys += len(uids)
        if self._batch_keys >= MAX_BATCH_KEYS:
            self._flush()
        elif self._timer is None:
            self._timer = self._reactor.callLater(0, self._flush)

    def trim(self, taken: Taken, keep: int) -> None:
        """Gathered per reactor turn: an ack often settles many messages."""
        self._trims[taken.claim] = keep
        if self._timer is None:
            self._timer = self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._trims:
            trims, self._trims = self._trims, {}
            self._redis.eval(TRIM, list(trims), list(trims.values())).addErrback(
                lambda f: log.failure("Could not trim {count} drain claims (what they hold "
                                      "that was settled may come back after a crash)", f,
                                      count=len(trims)))
        if not self._batch:
            return
        batch, self._batch, self._batch_keys = self._batch, [], 0
        queues = [([self._ns.queue(uid) for uid in uids], envelope) for uids, envelope in batch]
        self._settling(self._send(queues))

    def _send(self, queues: list[tuple[list[str], Envelope]]) -> defer.Deferred:
        """Refusals that pass (out of memory) are retried by the connection;
        what is refused for good goes to the dead letters."""
        keys, args = store_arguments(self._ns.process(self._owner),
                                     [(q, e.stored()) for q, e in queues], self._ttl, self._max)
        d = self._redis.eval(STORE, keys, args)
        return d.addCallbacks(self._stored, self._not_stored, callbackArgs=(queues,),
                              errbackArgs=(queues,))

    def _settling(self, d: defer.Deferred) -> None:
        """``flushed()`` waits for ``d`` too."""
        self._unsettled.add(d)
        d.addBoth(lambda result: (self._unsettled.discard(d), result)[1])

    def _stored(self, reply: list, queues: list[tuple[list[str], Envelope]]):
        cuts, failed = reply
        # Counted once Redis has them: a counter that went back down for
        # what Redis refused would read as a restart to Prometheus.
        self._stats.stored += sum(len(keys) for keys, _ in queues) - len(failed) // 2
        if not cuts and not failed:
            return None
        # Key indexes count from 1, and the first key is the lease.
        owners = [(key, envelope) for keys, envelope in queues for key in keys]
        for index, count in zip(cuts[::2], cuts[1::2], strict=True):
            log.warn("Queue {key} is over --queue-max {max}: discarded its {count} "
                     "oldest messages", key=owners[index - 2][0], max=self._max,
                     count=count)
        return self._refused([(*owners[index - 2], _text(why))
                              for index, why in zip(failed[::2], failed[1::2], strict=True)])

    def _not_stored(self, failure, queues: list[tuple[list[str], Envelope]]):
        """A whole call refused (one message bigger than Redis takes closes
        the connection): message by message, so only that one is dead.
        A node whose lease is gone is refused every store: another node may
        have decided for these messages, and they are not kept twice."""
        why = failure.getErrorMessage()
        if why.startswith("FENCED"):
            return self.fenced().addCallback(self._after_fence_check, queues)
        if len(queues) > 1:
            return defer.gatherResults([self._send([q]) for q in queues], consumeErrors=True)
        return self._refused([(key, envelope, why) for keys, envelope in queues
                              for key in keys])

    def _after_fence_check(self, ours: bool, queues: list[tuple[list[str], Envelope]]):
        """The lease is this node's again (it had only stalled): send them
        again. Else another node decides for these users now."""
        if ours:
            return self._send(queues)
        log.critical("Redis refused {count} stores: this node's lease expired, so "
                     "another node decides for their users now", count=len(queues))
        self._stats.fenced += sum(len(keys) for keys, _ in queues)
        return None

    def _refused(self, refused: list[tuple[str, Envelope, str]]) -> defer.Deferred:
        """Stores or requeues Redis refused for good: to the dead letters,
        counted there. Fires once every one is there."""
        self._stats.dead_letters += len(refused)
        return defer.gatherResults([self._dead_letter(*r) for r in refused], consumeErrors=True)

    def _dead_letter(self, key: str, envelope: Envelope, why: str) -> defer.Deferred:
        """One dead letter per command, so that one Redis cannot take does
        not take others with it."""
        stored = envelope.stored()
        log.error("Redis refused message {id} ({size} bytes) for {key}: {why}; it is kept in "
                  "{dead}", id=envelope.id, size=len(stored), key=key, why=_short(why),
                  dead=self._ns.dead)
        entry: dict = {"key": key, "error": why, "time": self._reactor.seconds()}
        parts = [stored[i:i + DEAD_PART] for i in range(0, len(stored), DEAD_PART)]
        if len(parts) > 1:
            entry["parts"] = parts_key = self._ns.dead_parts(uuid.uuid4().hex)
        else:
            entry["envelope"], parts, parts_key = stored.decode(), [], self._ns.dead_parts("")
        d = self._redis.eval(DEAD, [self._ns.dead, self._ns.dead_dropped, parts_key],
                             [self._dead_max, json.dumps(entry, ensure_ascii=False).encode(),
                              *parts])

        def dropped(count: int) -> None:
            if count:
                log.warn("{dead} is over --dead-max {max}: dropped its {count} oldest",
                         dead=self._ns.dead, max=self._dead_max, count=count)

        def lost(failure) -> None:
            log.critical("Could not keep message {id} ({size} bytes) in {dead} either "
                         "({why}): it is lost", id=envelope.id, size=len(stored),
                         dead=self._ns.dead, why=_short(failure.getErrorMessage()))

        return d.addCallbacks(dropped, lost)

    def inbox(self, key: str, group: bytes,
              entries: Sequence[tuple[str, str, str, Envelope | None]]) -> defer.Deferred:
        """Store inbox entries (``(entry id, "users" or "groups", id,
        envelope)``; ``"-"``: acknowledge only) for their recipients, wake
        the nodes of those online, and acknowledge the entries, in one
        script (lua/inbox.lua). What Redis refuses for good goes to the
        dead letters; fires once it is there."""
        self._flush()
        ns = self._ns
        args: list = [group, self._ttl, self._max, *ns.delivery_affixes,
                      *ns.inbox_mark_affixes, *ns.members_affixes]
        for entry_id, kind, target, envelope in entries:
            args += [entry_id, kind, target, b"" if envelope is None else envelope.stored()]
        d = self._redis.eval(INBOX, [key], args)
        return d.addCallback(self._inbox_stored, entries)

    def _inbox_stored(self, reply: list, entries) -> defer.Deferred | None:
        stored, failed = reply
        self._stats.stored += stored
        refused = []
        for index, uid, why in zip(failed[::3], failed[1::3], failed[2::3], strict=True):
            _, _, target, envelope = entries[int(index) - 1]
            uid = _text(uid)
            refused.append((self._ns.queue(uid) if uid else self._ns.members(target),
                            envelope, _text(why)))
        return self._refused(refused) if refused else None

    def requeue(self, uid: str, envelopes: Sequence[Envelope]) -> defer.Deferred:
        """Fires once the envelopes are back at the head of the queue, or,
        when Redis refuses that for good, in the dead letters."""
        self._flush()
        key = self._ns.queue(uid)
        d = self._redis.eval(REQUEUE, [key], [self._ttl, *(e.stored() for e in envelopes)])
        d.addErrback(lambda failure: self._refused(
            [(key, e, failure.getErrorMessage()) for e in envelopes]))
        self._settling(d)
        return d

    def take(self, uid: str, count: int) -> defer.Deferred:
        """Each take keeps what it took under a claim of its own, so a drain
        may ask for the next chunk before it has handled this one."""
        self._flush()
        claim = self._new_claim(uid)
        d = self._redis.eval(TAKE, [self._ns.queue(uid), claim, self._ns.claims(uid)],
                             [min(count, MAX_TAKE), self._ns.process_prefix,
                              self._ns.claim_head(uid)])
        return d.addCallback(lambda reply: Taken(reply[0], reply[1], claim, uid))

    def hold(self, uid: str, envelopes: Sequence[Envelope]) -> defer.Deferred:
        self._flush()
        claim = self._new_claim(uid)
        d = self._redis.eval(HOLD, [claim, self._ns.claims(uid)],
                             [e.stored() for e in envelopes])
        return d.addCallback(lambda _: Taken([], 0, claim, uid))

    def _new_claim(self, uid: str) -> str:
        """Numbered in the order they are made, which is the order their
        messages were sent in: recovery puts dead claims back by number."""
        return self._ns.claim(uid, f"{self._owner}:{next(self._claims)}")

    def ack_through(self, uid: str, message_id: str, within: int) -> defer.Deferred:
        """The client has every message through ``message_id``: drop them
        from the head of the queue, looking at its first ``within``
        entries, where what went back unacknowledged is. Fires with how
        many were dropped."""
        self._flush()
        return self._redis.eval(ACK_THROUGH, [self._ns.queue(uid), self._ns.claims(uid)],
                                [min(within, MAX_TAKE), Envelope.stored_start(message_id),
                                 self._ns.process_prefix, self._ns.claim_head(uid)])

    def release(self, taken: Taken) -> defer.Deferred:
        self._trims.pop(taken.claim, None)  # it goes whole
        self._flush()
        return self._redis.eval(RELEASE, [taken.claim, self._ns.claims(taken.uid)])

    def publish_after_stores(self, channel: bytes, message: bytes) -> defer.Deferred:
        """PUBLISH once every store handed over before is in Redis: one
        connection, in order, so whoever hears it may take them."""
        self._flush()
        return self._redis.execute(b"PUBLISH", channel, message)

    def eval_after_stores(self, script: Script, keys: Sequence, args: Sequence
                          ) -> defer.Deferred:
        """A script that publishes something (a socket leaving) run after
        every store and requeue handed over before: whoever hears it finds
        them in Redis."""
        self._flush()
        return self._redis.eval(script, keys, args)

    async def forget_dead(self, is_dead: Callable[[str, str], bool]) -> list[str]:
        """Delete the heartbeats of processes ``is_dead(owner, whereabouts)``
        recognises (a process of this host that no longer runs), so
        that what they held comes back now, not when their heartbeats
        expire. The owners forgotten."""
        forgotten, cursor = [], b"0"
        while True:
            cursor, keys = await self._redis.execute(
                b"SCAN", cursor, b"MATCH", self._ns.all_processes, b"COUNT", 1000)
            for key in keys:
                owner = key.decode()[len(self._ns.process_prefix):]
                if owner == self._owner:
                    continue
                whereabouts = await self._redis.execute(b"GET", key)
                if whereabouts is not None and is_dead(owner, bytes(whereabouts).decode(
                        errors="replace")):
                    await self._redis.execute(b"DEL", key)
                    forgotten.append(owner)
            if cursor in (b"0", 0):
                return forgotten

    async def recover(self) -> int:
        """Put back what processes that died held in their claims: every
        user's, found with SCAN. How many messages came back."""
        recovered, cursor = 0, b"0"
        while True:
            cursor, keys = await self._redis.execute(b"SCAN", cursor, b"MATCH",
                                                     self._ns.all_claims, b"COUNT", 1000)
            for key in keys:
                uid = self._ns.uid_of_claims(key.decode())
                recovered += await self._redis.eval(
                    RECOVER, [self._ns.queue(uid), key],
                    [self._ns.process_prefix, self._ns.claim_head(uid)])
            if cursor in (b"0", 0):
                return recovered

    def flushed(self) -> defer.Deferred:
        """Fires once every store handed over before is settled: in Redis, or
        in the dead letters."""
        self._flush()
        return defer.DeferredList([*self._unsettled, self._redis.flushed()]).addCallback(
            lambda _: None)

    def token(self, uid: str) -> defer.Deferred:
        """The user's stored key, or ``None``. Fails at once with
        ``RedisUnavailable`` when Redis is away: a hello should not wait."""
        d = self._redis.execute_now(b"GET", self._ns.token(uid))
        return d.addCallback(lambda raw: None if raw is None else bytes(raw))

    def members(self, gid: str) -> defer.Deferred:
        """A group's members (a Redis list or set), each once, in order."""
        self._flush()
        return self._redis.eval(MEMBERS, [self._ns.members(gid)]).addCallback(
            self._unique_members, gid)

    def _unique_members(self, raw: list[bytes], gid: str) -> list[str]:
        members: dict[str, None] = {}
        for item in raw:
            try:
                members[item.decode("utf-8")] = None
            except UnicodeDecodeError:
                log.warn("Group {gid} lists a member that is not UTF-8 ({member!r}); "
                         "skipping it", gid=gid, member=item)
        return list(members)


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _short(text: str, limit: int = 300) -> str:
    """At most ``limit`` characters of an error for a log line (an error may
    quote what it refused)."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
