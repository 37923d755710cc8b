"""Durable publish, for applications: a ``PUBLISH`` that reaches no
subscriber (no RedMessenger is running, or the one holding the user's
socket dies that moment) is lost, so this stores the message for its
recipients, in the envelope format RedMessenger itself stores, and in the
same atomic Redis script wakes the RedMessenger nodes of those online,
which drain it to them at once. Those offline get it when they connect.

It takes any Redis client with redis-py's ``eval(script, numkeys, *keys_and
_args)``, so it works from the application's own (synchronous) code::

    import redis
    from redmessenger.publish import durable_publish

    durable_publish(redis.Redis(), "Hello!", user="user1")

With an asyncio client (``redis.asyncio``), whose ``eval`` is a coroutine,
it returns an awaitable: ``await durable_publish(redis.asyncio.Redis(), ...)``.

:func:`redis_client` makes a redis-py client from a URL as RedMessenger's
``--redis`` takes it, Sentinel ones included, so that the application finds
the master where RedMessenger does.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from . import lua
from .envelope import Envelope, MessageIds
from .frames import MAX_ID_LENGTH, valid_id
from .keys import Namespace
from .settings import RedisAddress

#: Store for the recipients and wake those online, atomically:
#: redmessenger/lua/durable_publish.lua says how.
DURABLE_PUBLISH = lua.source("durable_publish", "members", "push", "deliver")

_ids = MessageIds()


@dataclass(frozen=True)
class Published:
    #: How many RedMessenger subscribers heard the wake that makes the
    #: nodes of online recipients drain it (0: nobody it is for is online).
    subscribers: int
    #: How many queues the message was stored in: one per recipient.
    stored: int
    #: The id the stored envelope carries.
    id: str


def durable_publish(redis, payload: bytes | str, *, user: str | None = None,
                    group: str | None = None, prefix: str = "rm", queue_ttl: int = 0,
                    queue_max: int = 0) -> Published | Awaitable[Published]:
    """Send ``payload`` to a user or a group: stored for each recipient, and
    drained at once to those online. ``queue_ttl`` and ``queue_max`` should
    match RedMessenger's settings.

    A Redis error (a queue or members key of the wrong type) raises
    redis-py's ``ResponseError`` naming the key, and nothing was stored.
    With a client whose ``eval`` returns an awaitable (``redis.asyncio``),
    the result is an awaitable of the same ``Published``."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    envelope, script_args = durable_publish_arguments(payload, user=user, group=group,
                                                      prefix=prefix, queue_ttl=queue_ttl,
                                                      queue_max=queue_max)
    reply = redis.eval(DURABLE_PUBLISH, 1, *script_args)
    if inspect.isawaitable(reply):
        return _published_later(reply, envelope.id)
    return _published(reply, envelope.id)


def redis_client(url: str) -> Any:
    """A redis-py client (redis-py is the application's, not a dependency of
    RedMessenger) for ``url`` as ``--redis`` takes it: ``redis[s]://`` and
    ``unix://``, or ``redis[s]+sentinel://``, whose client asks the Sentinels
    for the master and asks again after a failover."""
    import redis

    address = RedisAddress.from_url(url)
    common: dict[str, Any] = {"username": address.username, "password": address.password,
                              "db": address.db}
    if address.tls:
        common.update(ssl=True, ssl_ca_certs=address.ca_file)
    if not address.sentinels:
        if address.path is not None:
            return redis.Redis(unix_socket_path=address.path, **common)
        return redis.Redis(host=address.host, port=address.port, **common)
    sentinel_auth: dict[str, Any] = {"password": address.sentinel_password}
    if address.tls:
        sentinel_auth.update(ssl=True, ssl_ca_certs=address.ca_file)
    sentinels = redis.Sentinel(list(address.sentinels), sentinel_kwargs=sentinel_auth)
    return sentinels.master_for(address.master_name, **common)


def _published(reply: Any, message_id: str) -> Published:
    heard, queues, _ = reply
    return Published(int(heard), len(queues), message_id)


async def _published_later(reply: Awaitable[Any], message_id: str) -> Published:
    return _published(await reply, message_id)


def check_id(kind: str, name: object) -> str:
    """``name`` if it is a valid user or group id (as a hello's ``id``: 1 to
    ``MAX_ID_LENGTH`` printable characters, no whitespace), else
    ``ValueError``: a message for an id nobody can have would be published
    on a channel RedMessenger ignores, or stored for nobody."""
    if not valid_id(name):
        raise ValueError(f"{name!r}: a {kind} id is 1 to {MAX_ID_LENGTH} printable "
                         "characters, no spaces")
    return name


def durable_publish_arguments(payload: bytes, *, user: str | None, group: str | None,
                              prefix: str, queue_ttl: int, queue_max: int
                              ) -> tuple[Envelope, list]:
    """The envelope, and the KEYS and ARGV of one ``DURABLE_PUBLISH`` call:
    shared by durable_publish() and ``redmessenger send``."""
    if (user is None) == (group is None):
        raise ValueError("give exactly one of user= and group=")
    if user is not None:
        check_id("user", user)
    else:
        check_id("group", group)
    ns = Namespace(prefix)
    channel = ns.user_channel(user) if user is not None else ns.group_channel(group)
    key = ns.queue(user) if user is not None else ns.members(group)
    envelope = Envelope(_ids(), channel, int(time.time() * 1000), payload)
    return envelope, [key, channel, payload, envelope.stored(),
                      "users" if user is not None else "groups", *ns.queue_affixes,
                      queue_ttl, queue_max, user if user is not None else group,
                      *ns.presence_affixes, *ns.presence_channel_affixes]
