"""RedMessengerService inside someone else's Twisted application: the
docs/example.tac run by twistd, the service under a parent in this process,
and an import that leaves the choice of reactor to the application."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.application.service import IService, MultiService
from twisted.internet import defer
from twisted.internet.error import CannotListenError

from redmessenger import AuthMode, RedMessengerService, Settings

from deployed import (
    FAIL_TIMEOUT,
    GIVE_UP_TIMEOUT,
    TwistdProcess,
    client,
    deployed_env,
    hello,
    numpat,
    recv_json,
)
from harness import Client, aiotest, eventually, loop, tw
from network import HOST, accepting, pick_free_port
from resp import RespClient

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "docs" / "example.tac"


def aio(coroutine) -> defer.Deferred:
    """A coroutine on the reactor's asyncio loop, as a Deferred to yield."""
    return defer.Deferred.fromFuture(asyncio.ensure_future(coroutine, loop=loop()))


def test_example_tac_runs_under_twistd(tmp_path: Path, redis) -> None:
    workdir = tmp_path / "run"
    workdir.mkdir()
    port = pick_free_port()
    fixture = RespClient(redis.port)
    env = deployed_env(REDMESSENGER_EXAMPLE_PORT=f"tcp:{port}:interface={HOST}",
                       REDMESSENGER_EXAMPLE_REDIS=redis.url)
    fixture.command("SET", "rm:users:user1:key", "s3cret")
    with TwistdProcess(["-ny", str(EXAMPLE)], workdir, tmp_path / "twistd.log",
                       env=env) as twistd:
        twistd.wait_accepting(port)
        twistd.wait_subscribed()
        with client(port) as ws:
            assert hello(ws, {"id": "user1", "key": "s3cret"})["queued"] == 0
            assert fixture.command("PUBLISH", "rm.users.user1", "from my-app") >= 1
            frame = recv_json(ws)
            assert frame["type"] == "message"
            assert frame["payload"] == "from my-app"
        twistd.stop()
        twistd.assert_stopped_cleanly()
    assert not accepting(port)
    assert not (workdir / "redmessenger-data").exists()


def taken_port() -> socket.socket:
    """A listening socket on a port of 127.0.0.1, so that nothing else can
    listen there while it is open."""
    taken = socket.socket()
    taken.bind((HOST, 0))
    taken.listen()
    return taken


def test_example_tac_that_cannot_listen_exits_and_lets_go_of_redis(
        tmp_path: Path, private_redis) -> None:
    """Its port taken, the example's twistd must neither stay up subscribed
    (storing a second copy of what another RedMessenger delivers) nor exit
    0: it stops, with status 1, having let go of Redis."""
    with taken_port() as taken:
        port = taken.getsockname()[1]
        env = deployed_env(REDMESSENGER_EXAMPLE_PORT=f"tcp:{port}:interface={HOST}",
                           REDMESSENGER_EXAMPLE_REDIS=private_redis.url)
        with TwistdProcess(["-ny", str(EXAMPLE)], tmp_path, tmp_path / "twistd.log",
                           env=env) as twistd:
            try:
                code = twistd.process.wait(timeout=GIVE_UP_TIMEOUT)
            except subprocess.TimeoutExpired:
                patterns = numpat(private_redis.client())
                twistd.stop()
                raise AssertionError(f"twistd kept running without its port, with "
                                     f"{patterns} patterns subscribed:\n{twistd.log()}") from None
            assert code == 1, twistd.log()
            assert "could not start" in twistd.log()
            assert "Traceback" not in twistd.log(), twistd.log()
    assert numpat(private_redis.client()) == 0


@aiotest
async def test_service_that_cannot_listen_fails_and_lets_go_of_redis(private_redis) -> None:
    """Embedded, the failure reaches the application through
    ``whenListening()``, after every part that had started was stopped:
    no subscription, no command connection, no lease left. The reactor
    is the application's, and keeps running."""
    with taken_port() as taken:
        settings = Settings(port=f"tcp:{taken.getsockname()[1]}:interface={HOST}",
                            redis=private_redis.address, auth=AuthMode.OFF)
        service = RedMessengerService(settings)
        service.startService()
        try:
            with pytest.raises(CannotListenError):
                await tw(service.whenListening())
            assert not service.subscriber.running
            assert not service.redis.running
            assert not private_redis.command("KEYS", "rm:procs:*")  # its lease let go
            await eventually(lambda: numpat(private_redis.client()) == 0, what="no subscriber")
            clients = private_redis.command("CLIENT", "LIST", decode=True).splitlines()
            assert len(clients) == 1, clients  # only the one asking
        finally:
            await tw(service.stopService())
        from twisted.internet import reactor
        assert reactor.running


def test_example_tac_defaults(tmp_path: Path) -> None:
    """Without the environment variables: port 8080 and the local Redis,
    the key required. Read from the built application; nothing is started."""
    code = f"""if True:
        import json
        from twisted.application.service import IServiceCollection
        namespace = {{"__file__": {str(EXAMPLE)!r}}}
        exec(compile(open({str(EXAMPLE)!r}).read(), {str(EXAMPLE)!r}, "exec"), namespace)
        services = list(IServiceCollection(namespace["application"]))
        settings = services[0].settings
        print(json.dumps({{"count": len(services), "port": settings.listen_description,
                          "redis": str(settings.redis), "auth": settings.auth.value}}))
    """
    env = deployed_env()
    for name in ("REDMESSENGER_EXAMPLE_PORT", "REDMESSENGER_EXAMPLE_REDIS"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=FAIL_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"count": 1, "port": "tcp:8080:backlog=1024",
                                         "redis": "redis://127.0.0.1:6379/0",
                                         "auth": "required"}


@pytest_twisted.inlineCallbacks
def test_service_starts_and_stops_through_its_parent(redis):
    settings = Settings(port="tcp:0:interface=127.0.0.1", redis=redis.address,
                        auth=AuthMode.OFF)
    service = RedMessengerService(settings)
    assert IService.providedBy(service)
    parent = MultiService()
    service.setServiceParent(parent)
    assert service.parent is parent
    assert list(parent) == [service]
    assert not service.running

    parent.startService()
    try:
        assert service.running
        port = yield service.whenListening()
        assert port is service.port
        number = port.getHost().port
        yield service.subscriber.whenSubscribed()
        url = f"ws://{HOST}:{number}/"
        user = yield aio(Client.connect(url))
        try:
            welcome = yield aio(user.hello("user1"))
            assert welcome["queued"] == 0
            assert redis.command("PUBLISH", "rm.users.user1", "through the parent") >= 1
            [message] = yield aio(user.messages(1))
            assert message["payload"] == "through the parent"
        finally:
            yield aio(user.close())
    finally:
        yield parent.stopService()
    assert not service.running
    assert not accepting(number)
    # Stopped through the parent, it let go of Redis as well.
    assert not service.subscriber.subscribed
    assert not service.redis.connected


def test_importing_redmessenger_leaves_the_reactor_alone(tmp_path: Path) -> None:
    """An application picks its reactor after its imports (twistd --reactor,
    asyncioreactor.install()): no module of the package may install one."""
    code = """if True:
        import importlib, pkgutil, sys
        import redmessenger, redmessenger.tap
        assert "twisted.internet.reactor" not in sys.modules, "redmessenger.tap"
        for module in pkgutil.iter_modules(redmessenger.__path__):
            importlib.import_module("redmessenger." + module.name)
            assert "twisted.internet.reactor" not in sys.modules, module.name
    """
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=deployed_env(),
                            capture_output=True, text=True, timeout=FAIL_TIMEOUT)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("module", "absent"), [
    # An application that only publishes may not have Twisted at all.
    ("redmessenger.publish", ("redmessenger.service", "autobahn", "twisted")),
    # The client is Autobahn's WebSocket client, but none of the server.
    ("redmessenger.client", ("redmessenger.service", "redmessenger.websocket", "txredisapi")),
])
def test_an_application_s_imports_leave_the_server_out(tmp_path: Path, module: str,
                                                        absent: tuple[str, ...]) -> None:
    """What an application imports to publish, or to be a client, loads
    neither the server nor what only the server needs; the package's own
    names (``from redmessenger import Settings``) are loaded when used."""
    code = f"""if True:
        import json, sys
        import {module}
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("redmessenger",
            "autobahn", "twisted", "txredisapi"))
        from redmessenger import RedMessengerService, Settings, __version__
        print(json.dumps(loaded))
    """
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=deployed_env(),
                            capture_output=True, text=True, timeout=FAIL_TIMEOUT)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert module in loaded, loaded
    assert not [m for m in loaded if m.split(".")[0] in absent or m in absent], loaded


def test_readme_shows_the_example_and_the_ci_command() -> None:
    readme = (REPO / "README.rst").read_text()
    example = EXAMPLE.read_text()
    blocks = re.findall(r"^\.\. code-block:: python\n\n((?:    .*\n|\n)+)", readme, re.MULTILINE)
    [shown] = [block for block in blocks if "setServiceParent" in block]
    for line in shown.splitlines():
        assert line.strip() in example, f"README.rst shows {line.strip()!r}, not in {EXAMPLE}"
    ci = (REPO / ".ci" / "run").read_text()
    tests = ("python3 -m venv .venv && .venv/bin/pip install -q '.[test]' && "
             ".venv/bin/python -m pytest")
    assert f"\n    {tests}\n" in readme
    assert f"\n{tests}\n" in ci
