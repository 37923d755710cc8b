"""RedMessenger mounted in an application's own twisted.web site
(``Settings(port=None)`` and ``RedMessengerService.resource()``): the limits
and origins of a port of its own hold there too. (README.rst's examples run
under a real twistd in tests/test_docs_readme.py.)"""

from __future__ import annotations

import json

import pytest
import websockets
from twisted.internet import endpoints
from twisted.web.resource import Resource
from twisted.web.server import Site

from redmessenger import AuthMode, RedMessengerService, Settings

from harness import Client, aiotest, eventually, get, metric, run, tw
from network import HOST


@pytest.fixture
def mounted(redis):
    """``await mount(**settings)``: a service with no port of its own,
    mounted at /rm of a twisted.web site on a free port: the service and
    the site's URL. Both are stopped after the test."""
    started = []

    async def mount(**overrides) -> tuple[RedMessengerService, str]:
        from twisted.internet import reactor

        service = RedMessengerService(Settings(port=None, redis=redis.address,
                                               auth=AuthMode.OFF, **overrides))
        service.startService()
        started.append(service)
        assert await tw(service.whenListening()) is None  # no port of its own
        # Listening on nothing, it is "listening" before Redis is there:
        # until then it answers 503 (tests/test_events.py), which is not
        # what these tests are about.
        await tw(service.redis.whenConnected())
        await tw(service.subscriber.whenSubscribed())
        await tw(service.whenRecovered())
        root = Resource()
        root.putChild(b"rm", service.resource())
        port = await tw(endpoints.TCP4ServerEndpoint(reactor, 0, interface=HOST).listen(
            Site(root)))
        started.append(port)
        return service, f"{HOST}:{port.getHost().port}"

    yield mount

    async def stop() -> None:
        for started_one in reversed(started):
            if isinstance(started_one, RedMessengerService):
                if started_one.running:
                    await tw(started_one.stopService())
            else:
                await tw(started_one.stopListening())

    run(stop())


@aiotest
async def test_a_mounted_websocket_is_held_to_the_limits_and_origins(mounted) -> None:
    """--allowed-origins and --max-connections-per-address, as on a port of
    its own: 403 for another origin, 503 past the limit, and the WebSocket
    of a user is a socket like any other (/rm/metrics counts it)."""
    service, where = await mounted(max_connections_per_address=1,
                                   allowed_origins=("https://app.example.com",))
    url = f"ws://{where}/rm/"
    with pytest.raises(websockets.InvalidStatus) as refused:
        await Client.connect(url, origin="https://elsewhere.example.com")
    assert refused.value.response.status_code == 403
    client = await Client.connect(url, origin="https://app.example.com")
    assert (await client.hello("user1"))["type"] == "welcome"
    with pytest.raises(websockets.InvalidStatus) as refused:
        await Client.connect(url, origin="https://app.example.com")
    assert refused.value.response.status_code == 503
    status, _, body = await get(f"http://{where}/rm/metrics")
    assert metric(body.decode(), "redmessenger_connections") == 1
    assert metric(body.decode(), "redmessenger_connections_refused_total") == 1
    service.redis.execute(b"PUBLISH", b"rm.users.user1", b"hi")
    assert [m["payload"] for m in await client.messages(1)] == ["hi"]
    await client.close()


@aiotest
async def test_a_mounted_websocket_is_refused_while_the_service_is_stopped(mounted) -> None:
    """The site outlives the service: an upgrade then is told to come back
    (503), not taken by a service whose Redis connections are gone."""
    service, where = await mounted()
    await tw(service.stopService())
    with pytest.raises(websockets.InvalidStatus) as refused:
        await Client.connect(f"ws://{where}/rm/")
    assert refused.value.response.status_code == 503
    assert refused.value.response.headers["Retry-After"] == "1"


@aiotest
async def test_a_mounted_event_stream_is_held_to_the_limits_and_delivers(mounted) -> None:
    """/rm/events in the application's site: the stream counts against
    --max-connections-per-address from its request until it ends (the
    site's own connections are not RedMessenger's to count otherwise)."""
    from sse import EventStreamClient

    service, where = await mounted(max_connections_per_address=1)
    port = int(where.rsplit(":", 1)[1])
    stream = await EventStreamClient.open(port, "/rm/events?id=user1")
    assert stream.status == 200 and (await stream.event()).type == "welcome"
    refused = await EventStreamClient.open(port, "/rm/events?id=user2")
    assert refused.status == 503
    assert json.loads(await refused.body())["code"] == "too_many_connections"
    with pytest.raises(websockets.InvalidStatus) as ws_refused:
        await Client.connect(f"ws://{where}/rm/")
    assert ws_refused.value.response.status_code == 503
    service.redis.execute(b"PUBLISH", b"rm.users.user1", b"to the stream")
    assert (await stream.event()).json()["payload"] == "to the stream"
    stream.abort()
    await eventually(lambda: service.factory.limits.connections == 0,
                     what="the stream's place back")
    again = await EventStreamClient.open(port, "/rm/events?id=user1")
    assert again.status == 200 and (await again.event()).json()["queued"] == 1
    again.abort()


@aiotest
async def test_the_mount_point_without_its_slash_redirects_with_the_query(mounted) -> None:
    """/rm?x=1 is /rm/?x=1 (the demo page's relative links need the slash;
    the query is the page's own)."""
    from sse import EventStreamClient

    _, where = await mounted()
    answer = await EventStreamClient.open(int(where.rsplit(":", 1)[1]), "/rm?x=1&y=%2F")
    assert answer.status in (301, 302, 307, 308)
    assert answer.headers["location"].endswith("/rm/?x=1&y=%2F")
    answer.abort()

