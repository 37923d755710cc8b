"""A Redis that wants a password, or an ACL user: ``redis://:pw@host`` and
``redis://user:pw@host``; a wrong password is said loudly and /health fails."""

from __future__ import annotations

from twisted.logger import formatEvent, globalLogPublisher

from redmessenger.settings import RedisAddress

from harness import aiotest, eventually, start_service


def with_auth(redis, *auth):
    """A view of ``redis`` whose address carries credentials and whose
    commands authenticate first."""

    class Authenticated:
        address = RedisAddress(host="127.0.0.1", port=redis.port,
                               username=auth[0] if len(auth) == 2 else None,
                               password=auth[-1])

        def command(self, *args):
            return redis.client().pipeline([("AUTH", *auth), args])[1]

    return Authenticated()


async def deliver_through(redis) -> None:
    rm = await start_service(redis)
    try:
        redis.command("PUBLISH", "rm.users.user1", "stored")
        await eventually(lambda: rm.queue("user1"))
        user1 = await rm.user("user1")
        redis.command("PUBLISH", "rm.users.user1", "live")
        assert [m["payload"] for m in await user1.messages(2)] == ["stored", "live"]
    finally:
        await rm.stop()


@aiotest
async def test_a_redis_with_a_password(private_redis):
    private_redis.command("CONFIG", "SET", "requirepass", "s3cret-pass")
    await deliver_through(with_auth(private_redis, "s3cret-pass"))


@aiotest
async def test_a_redis_acl_user(private_redis):
    # Just what RedMessenger needs: its keys, its patterns and channels
    # (PSUBSCRIBE patterns must be granted literally), as operations.rst says.
    private_redis.command("ACL", "SETUSER", "messenger", "on", ">app-pass", "~rm:*",
                          "resetchannels", "&rm.users.*", "&rm.groups.*", "&rm.presence.*",
                          "&rm.cluster", "&rm.node.*", "+@all")
    private_redis.command("CONFIG", "SET", "requirepass", "admin-pass")
    await deliver_through(with_auth(private_redis, "messenger", "app-pass"))


@aiotest
async def test_a_wrong_password_is_logged_and_health_fails(private_redis):
    private_redis.command("CONFIG", "SET", "requirepass", "s3cret-pass")
    lines: list[str] = []
    observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    from redmessenger import RedMessengerService, Settings

    service = RedMessengerService(Settings(
        port="tcp:0:interface=127.0.0.1",
        redis=RedisAddress(host="127.0.0.1", port=private_redis.port, password="wrong"),
        shutdown_timeout=0.5))  # a stop waits that long for the Redis it never reached
    service.startService()
    try:
        await eventually(lambda: len([x for x in lines if "refused us" in x]) >= 4,
                         what="a few refused attempts")
        assert not service.redis.connected and not service.subscriber.subscribed
        assert not [x for x in lines if "NoTransition" in x or "Traceback" in x]
    finally:
        globalLogPublisher.removeObserver(observer)
        from harness import tw

        await tw(service.stopService())
