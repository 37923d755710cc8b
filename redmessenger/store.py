"""The users' queues, tokens and the groups' members, in Redis.

Every change to a queue is one Lua script, so each is atomic: a message
stored while a drain is taking the queue is either taken or left for the
next take, never lost between a read and a delete.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet import defer
from twisted.logger import Logger

from .envelope import Envelope
from .keys import Namespace
from .redisconnection import RedisConnection, Script

STORE = Script("""
local ttl, max = tonumber(ARGV[2]), tonumber(ARGV[3])
local trimmed = {}
for i, key in ipairs(KEYS) do
  local length = redis.call('RPUSH', key, ARGV[1])
  local cut = 0
  if max > 0 and length > max then
    cut = length - max
    redis.call('LTRIM', key, cut, -1)
  end
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
  trimmed[i] = cut
end
return trimmed
""")

REQUEUE = Script("""
for i = #ARGV, 2, -1 do redis.call('LPUSH', KEYS[1], ARGV[i]) end
local ttl = tonumber(ARGV[1])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return redis.call('LLEN', KEYS[1])
""")

# KEYS[2] keeps what was taken until the drain has it, so a take whose
# reply was lost with the connection gives the same messages again.
TAKE = Script("""
local held = redis.call('LRANGE', KEYS[2], 0, -1)
if #held > 0 then return {held, redis.call('LLEN', KEYS[1])} end
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #items > 0 then
  redis.call('LTRIM', KEYS[1], #items, -1)
  redis.call('RPUSH', KEYS[2], unpack(items))
end
return {items, redis.call('LLEN', KEYS[1])}
""")

MEMBERS = Script("""
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'list' then return redis.call('LRANGE', KEYS[1], 0, -1) end
if kind == 'set' then return redis.call('SMEMBERS', KEYS[1]) end
if kind == 'none' then return {} end
return redis.error_reply('WRONGTYPE ' .. KEYS[1] .. ' is a ' .. kind .. ', not a list or a set')
""")

SCRIPTS = (STORE, REQUEUE, TAKE, MEMBERS)

#: Lua's unpack() takes at most about 8,000 values.
MAX_TAKE = 5000


class RedisStore:
    """``MessageStore`` on one ordered Redis connection, plus the lookups
    (tokens, group members) that decide who gets what."""

    log = Logger()

    def __init__(self, connection: RedisConnection, namespace: Namespace, owner: str, *,
                 queue_ttl: int = 0, queue_max: int = 0) -> None:
        self._redis = connection
        self._ns = namespace
        self._owner = owner
        self._ttl = queue_ttl
        self._max = queue_max

    def store(self, uids: Sequence[str], envelope: Envelope) -> defer.Deferred:
        d = self._redis.eval(STORE, [self._ns.queue(uid) for uid in uids],
                             [envelope.stored(), self._ttl, self._max])
        if self._max:
            d.addCallback(self._trimmed, uids)
        return d

    def _trimmed(self, counts: list[int], uids: Sequence[str]) -> None:
        for uid, count in zip(uids, counts, strict=True):
            if count:
                self.log.warn("Queue {key} is over --queue-max {max}: discarded its {count} "
                              "oldest messages", key=self._ns.queue(uid), max=self._max,
                              count=count)

    def requeue(self, uid: str, envelopes: Sequence[Envelope]) -> defer.Deferred:
        return self._redis.eval(REQUEUE, [self._ns.queue(uid)],
                                [self._ttl, *(e.stored() for e in envelopes)])

    def take(self, uid: str, count: int) -> defer.Deferred:
        d = self._redis.eval(TAKE, [self._ns.queue(uid), self._ns.claim(uid, self._owner)],
                             [min(count, MAX_TAKE)])
        return d.addCallback(lambda reply: (reply[0], reply[1]))

    def release(self, uid: str) -> defer.Deferred:
        return self._redis.execute(b"DEL", self._ns.claim(uid, self._owner))

    def flushed(self) -> defer.Deferred:
        return self._redis.flushed()

    def token(self, uid: str) -> defer.Deferred:
        """The user's stored key, or ``None``. Fails at once with
        ``RedisUnavailable`` when Redis is away: a hello should not wait."""
        d = self._redis.execute_now(b"GET", self._ns.token(uid))
        return d.addCallback(lambda raw: None if raw is None else bytes(raw))

    def members(self, gid: str) -> defer.Deferred:
        """A group's members (a Redis list or set), each once, in order."""
        return self._redis.eval(MEMBERS, [self._ns.members(gid)]).addCallback(
            self._unique_members, gid)

    def _unique_members(self, raw: list[bytes], gid: str) -> list[str]:
        members: dict[str, None] = {}
        for item in raw:
            try:
                members[item.decode("utf-8")] = None
            except UnicodeDecodeError:
                self.log.warn("Group {gid} lists a member that is not UTF-8 ({member!r}); "
                              "skipping it", gid=gid, member=item)
        return list(members)
