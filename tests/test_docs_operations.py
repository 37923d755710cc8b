"""Every code sample in docs/operations.rst, run for real (as
:mod:`docsamples` says) or checked against what the real thing does: the
curl and redis-cli transcripts run, log lines against a real run's log, the
nginx site in a real nginx in front of a real RedMessenger, the systemd unit
by running its ``ExecStart`` with its environment and stopping it with its
``KillSignal`` within its ``TimeoutStopSec``; and the claims its text makes.

nginx and curl: without them the nginx and curl samples are skipped, unless
``REDMESSENGER_REQUIRE_NGINX=1`` (CI, which installs both) makes that a
failure.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import re
import shlex
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import websockets
from sentinels import MASTER, Sentinels

from certificates import certificate_chain
from deployed import (
    REPO,
    START_TIMEOUT,
    STOPPED,
    SUBSCRIBED,
    TWISTD,
    TwistdProcess,
    closed,
    deployed_env,
    hello,
    recv_json,
    wait_for,
    ws,
)
from docsamples import (
    COMMAND_TIMEOUT,
    ShapeMatch,
    claims,
    http_get,
    replay,
    require,
    run_shell,
    sample,
    stop_cleanly,
    substitute,
    transcript,
    twistd_args,
    twistd_run,
)
from harness import aiotest, eventually, start_service
from network import HOST, accepting, free_ports, pick_free_port


def operations() -> str:
    return (REPO / "docs" / "operations.rst").read_text()


def list_table(text: str, header: str) -> list[list[str]]:
    """The rows of the list-table whose first header cell is ``header``,
    each cell's lines joined, ``literal`` markup removed."""
    start = text.index(f"   * - {header}\n")
    rows: list[list[str]] = []
    for line in text[start:].splitlines():
        if line.startswith("   * - "):
            rows.append([line[7:]])
        elif line.startswith("     - "):
            rows[-1].append(line[7:])
        elif line.strip() == "-":
            rows[-1].append("")
        elif line.startswith("       ") and rows:
            rows[-1][-1] += " " + line.strip()
        elif line.strip():
            break
    return [[cell.replace("``", "").strip() for cell in row] for row in rows[1:]]


def scrape(text: str) -> list[tuple[str, str, str, set[str]]]:
    """/metrics: each family's name, type, help and label names, in order."""
    families: dict[str, list] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, doc = line[7:].split(" ", 1)
            families[name] = [name, None, doc, set()]
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            families[name][1] = kind
        elif line:
            sample_name = re.match(r"[\w:]+", line).group()
            family = families[max((n for n in families if sample_name.startswith(n)), key=len)]
            family[3].update(re.findall(r"(\w+)=\"", line))
    return [tuple(f) for f in families.values()]


@claims("ops-health", "ops-health-503", "ops-metrics")
def test_operations_health_and_metrics(tmp_path: Path, private_redis) -> None:
    require("curl", "curl")
    port = pick_free_port()
    local = {"8080": str(port)}
    args = [
        "-n",
        "--pidfile=",
        "redmessenger",
        "--port",
        f"tcp:{port}:interface={HOST}",
        "--redis",
        private_redis.url,
        "--auth",
        "off",
    ]
    from redmessenger import __version__

    with twistd_run(args, tmp_path, "health", port) as twistd:
        twistd.wait_subscribed(private_redis.client())

        # 200, with the headers and the body shown.
        [(command, shown)] = transcript(sample("ops-health"))
        output = run_shell(substitute(command, local))
        head, _, body = output.partition("\n\n")  # curl's CRLFs, read as text
        real_headers = [line.lower() for line in head.splitlines()]
        blank = shown.index("")
        assert shown[0] == head.splitlines()[0]
        for line in shown[1:blank]:
            assert line == "..." or line.lower() in real_headers, (line, head)
        [shown_body] = shown[blank + 1 :]
        real = json.loads(body)
        assert real.pop("version") == __version__
        node = real.pop("node")
        assert re.fullmatch("[0-9a-f]{12}", node)
        documented = json.loads(shown_body)
        assert isinstance(documented.pop("version"), str)
        assert re.fullmatch("[0-9a-f]{12}", documented.pop("node"))
        assert real == documented

        # The metrics shown, after two sockets of one user got three messages;
        # and a refused hello, so that sockets_closed has its label.
        with ws(f"ws://{HOST}:{port}/") as bad:
            bad.send("{oops")
            assert closed(bad)[1] == 4000
        with ws(f"ws://{HOST}:{port}/") as one, ws(f"ws://{HOST}:{port}/") as two:
            hello(one, {"id": "user1"})
            hello(two, {"id": "user1"})
            for n in range(3):
                private_redis.command("PUBLISH", "rm.users.user1", str(n))
            for client in (one, two):
                assert [recv_json(client)["payload"] for _ in range(3)] == ["0", "1", "2"]
            [(command, shown)] = transcript(sample("ops-metrics"))
            command = substitute(command, local)
            last: list[str] = []

            def metrics_as_shown() -> bool:
                last[:] = run_shell(command).splitlines()
                return last == shown

            wait_for(metrics_as_shown, f"/metrics to show {shown} (last: {last})")

            # The table lists every metric, with its type, labels and help.
            status, _, text = http_get(f"http://{HOST}:{port}/metrics")
            assert status == 200
            table = list_table(operations(), "Metric")
            exposed = scrape(text.decode())
            assert [row[:2] for row in table] == [[n, t] for n, t, _, _ in exposed], "\n".join(
                f"{n} {t} {h} {sorted(labels)}" for n, t, h, labels in exposed
            )
            for (name, _, labels, meaning), (_, _, doc, real_labels) in zip(
                table, exposed, strict=True
            ):
                assert set(labels.replace(",", " ").split()) == real_labels, name
                assert meaning.startswith(doc), f"{name}: {meaning!r} does not start {doc!r}"

        # 503 while Redis is away, with the body shown; 200 again by itself.
        [(command, [shown_body])] = transcript(sample("ops-health-503"))
        command = substitute(command, local)
        wait_for(
            lambda: json.loads(run_shell(command))["connections"] == 0, "the sockets to be gone"
        )
        private_redis.stop()
        wait_for(
            lambda: not any(json.loads(run_shell(command))["redis"].values()),
            "/health to see Redis gone",
        )
        assert http_get(f"http://{HOST}:{port}/health")[0] == 503
        with ws(f"ws://{HOST}:{port}/") as client:  # "new hellos are refused with 1013"
            client.send(json.dumps({"id": "user1"}))
            frames, code = closed(client)
            assert code == 1013 and frames[-1]["code"] == "redis_unavailable", frames
        real = json.loads(run_shell(command))
        documented = json.loads(shown_body)
        assert isinstance(real.pop("version"), str) and isinstance(documented.pop("version"), str)
        assert real.pop("node") == node and re.fullmatch("[0-9a-f]{12}", documented.pop("node"))
        assert real == documented
        private_redis.start()
        wait_for(
            lambda: http_get(f"http://{HOST}:{port}/health")[0] == 200,
            "/health to be 200 again",
            timeout=20,
        )
        stop_cleanly(twistd)


NGINX_CONF = """\
worker_processes 1;
events {{ worker_connections 256; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

{site}
}}
"""


@contextmanager
def nginx(executable: str, directory: Path, site: str, port: int) -> Iterator[None]:
    """nginx in the foreground, as one process of ours with every file in
    ``directory``: the sample ``site`` inside an ``http {}`` block."""
    directory.mkdir()
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=directory, site=site))
    log = directory / "nginx.out"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                executable,
                "-p",
                str(directory),
                "-e",
                str(directory / "error.log"),
                "-c",
                str(conf),
                "-g",
                f"daemon off; master_process off; "
                f"pid {directory}/nginx.pid; error_log {directory}/error.log info;",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def alive() -> None:
        if process.poll() is not None:
            raise AssertionError(
                f"nginx exited with {process.returncode}:\n{log.read_text()}"
                f"\n{(directory / 'error.log').read_text()}"
            )

    try:
        wait_for(lambda: accepting(port), "nginx to accept", alive=alive)
        yield
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@claims("ops-nginx")
def test_operations_nginx_site_proxies_websockets_and_http(
    tmp_path: Path, redis, certificate
) -> None:
    executable = require("nginx", "nginx")
    key, cert = certificate
    port, proxy = free_ports(2)
    site = substitute(
        sample("ops-nginx"),
        {
            "listen 443": f"listen {HOST}:{proxy}",
            "8080": str(port),
            "/etc/ssl/messages.example.com/fullchain.pem": str(cert),
            "/etc/ssl/messages.example.com/privkey.pem": str(key),
        },
    )
    trust = ssl.create_default_context(cafile=str(cert))
    args = [
        "-n",
        "--pidfile=",
        "redmessenger",
        "--port",
        f"tcp:{port}:interface={HOST}",
        "--redis",
        redis.url,
    ]
    redis.command("SET", "rm:users:user1:key", "s3cret")
    with (
        twistd_run(args, tmp_path, "backend", port) as twistd,
        nginx(executable, tmp_path / "nginx", site, proxy),
    ):
        twistd.wait_subscribed()
        redis.command("PUBLISH", "rm.users.user1", "stored")
        wait_for(lambda: redis.command("LLEN", "rm:users:user1:messages"), "a stored message")
        with ws(f"wss://{HOST}:{proxy}/", ssl=trust) as client:
            assert hello(client, {"id": "user1", "key": "s3cret"})["queued"] == 1
            assert recv_json(client)["payload"] == "stored"
            redis.command("PUBLISH", "rm.users.user1", "through nginx")
            frame = recv_json(client)
            assert frame["payload"] == "through nginx" and frame["queued"] is False
        # An event stream through nginx, its events passed on as they come.
        redis.command("PUBLISH", "rm.users.user1", "stored for the stream")
        wait_for(lambda: redis.command("LLEN", "rm:users:user1:messages"), "a stored message")
        connection = http.client.HTTPSConnection(HOST, proxy, context=trust, timeout=10)
        connection.request("GET", "/events?id=user1",
                           headers={"Authorization": "Bearer s3cret",
                                    "Accept": "text/event-stream"})
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/event-stream; charset=utf-8"

        def data() -> dict:
            while not (line := response.readline()).startswith(b"data:"):
                assert line, "the stream ended"
            return json.loads(line[5:])

        assert data()["queued"] == 1 and data()["payload"] == "stored for the stream"
        redis.command("PUBLISH", "rm.users.user1", "live through nginx")
        assert data()["payload"] == "live through nginx"
        connection.close()
        status, headers, body = http_get(f"https://{HOST}:{proxy}/health", trust)
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, headers, body = http_get(f"https://{HOST}:{proxy}/client.js", trust)
        assert status == 200 and headers["Content-Type"].startswith("text/javascript")
        assert http_get(f"https://{HOST}:{proxy}/metrics", trust)[0] == 403
        assert http_get(f"http://{HOST}:{port}/metrics")[0] == 200
        access = (tmp_path / "nginx" / "access.log").read_text()
        assert '"GET / HTTP/1.1" 101' in access, access

        # What the text says of the Upgrade and Connection lines: without
        # them, the demo page instead of a WebSocket.
        bare = "\n".join(
            line
            for line in site.splitlines()
            if "proxy_set_header Upgrade" not in line and "proxy_set_header Connection" not in line
        )
        assert bare != site
        other = pick_free_port()
        with nginx(
            executable, tmp_path / "bare-nginx", bare.replace(str(proxy), str(other)), other
        ):
            with pytest.raises(websockets.InvalidStatus) as refused:
                with ws(f"wss://{HOST}:{other}/", ssl=trust):
                    pass
            assert refused.value.response.status_code == 200
        stop_cleanly(twistd)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: section -> key -> every value it is given."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), "continuation lines are not parsed here"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert current is not None and sep, raw
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_environment_file(text: str) -> dict[str, str]:
    env = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and line[0] not in "#;":
            name, sep, value = line.partition("=")
            assert sep, raw
            env[name.strip()] = shlex.split(value)[0] if value.strip() else ""
    return env


@claims("ops-systemd", "ops-envfile")
def test_operations_systemd_unit_runs_and_stops_as_systemd_would(tmp_path: Path, redis) -> None:
    import jwt

    unit = parse_unit(sample("ops-systemd"))
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert service["Type"] == "simple"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"

    # Its environment: Environment= lines, then the file (which wins).
    envfile_text = sample("ops-envfile")
    assert envfile_text.splitlines()[0] == f"# {service['EnvironmentFile'].lstrip('-')}"
    env = {n: v for n, v in deployed_env().items() if not n.startswith("REDMESSENGER_")}
    for line in unit["Service"].get("Environment", []):
        env.update(assignment.split("=", 1) for assignment in shlex.split(line))
    from_file = parse_environment_file(envfile_text)
    env.update(from_file)

    port = pick_free_port()
    argv = shlex.split(
        substitute(
            service["ExecStart"],
            {
                "/opt/redmessenger/.venv/bin/twistd": str(TWISTD),
                "8080": str(port),
                "6379": str(redis.port),
            },
        )
    )
    assert argv[0] == str(TWISTD) and argv[1] == "-n" and "--pidfile=" in argv
    shutdown_timeout = float(env.get("REDMESSENGER_SHUTDOWN_TIMEOUT", 10))
    stop_timeout = float(service["TimeoutStopSec"])
    # Redis' confirmation, then up to 6 s for clients to answer the close.
    assert stop_timeout > shutdown_timeout + 6, "TimeoutStopSec too short"

    workdir = tmp_path / "var-lib-redmessenger"  # WorkingDirectory, StateDirectory
    workdir.mkdir()
    with TwistdProcess(argv[1:], workdir, tmp_path / "journal.log", env=env) as twistd:
        twistd.wait_accepting(port)
        twistd.wait_subscribed()
        # Environment=REDMESSENGER_LOG_FORMAT=json: the journal gets JSON.
        for line in twistd.log().splitlines():
            assert {"time", "level", "namespace", "message"} <= set(json.loads(line)), line
        assert not (workdir / "twistd.pid").exists(), "--pidfile= writes none"

        url = f"ws://{HOST}:{port}/"
        secret = from_file["REDMESSENGER_JWT_SECRET"]
        token = jwt.encode({"sub": "user1", "exp": int(time.time()) + 60}, secret, "HS256")
        # REDMESSENGER_ALLOWED_ORIGINS: another origin's page is refused.
        with pytest.raises(websockets.InvalidStatus) as refused:
            with ws(url, origin="https://evil.example.com"):
                pass
        assert refused.value.response.status_code == 403
        with ws(url, origin=from_file["REDMESSENGER_ALLOWED_ORIGINS"]) as client:
            # REDMESSENGER_AUTH=jwt: a stored key is no key; the JWT is.
            client.send(json.dumps({"id": "user1", "key": "s3cret"}))
            assert closed(client)[1] == 4001
        # REDMESSENGER_QUEUE_TTL: a stored queue expires.
        redis.command("PUBLISH", "rm.users.user2", "later")
        wait_for(lambda: redis.command("LLEN", "rm:users:user2:messages"), "a stored message")
        ttl = int(from_file["REDMESSENGER_QUEUE_TTL"])
        assert ttl - 60 < redis.command("TTL", "rm:users:user2:messages") <= ttl

        # `systemctl stop` with a client holding an unacknowledged message:
        # KillSignal, then the exit within TimeoutStopSec, with the message
        # back in Redis and a status systemd counts as a clean stop.
        with ws(url, origin=from_file["REDMESSENGER_ALLOWED_ORIGINS"]) as client:
            hello(client, {"id": "user1", "key": token, "ack": True})
            redis.command("PUBLISH", "rm.users.user1", "unacked")
            assert recv_json(client)["tag"] == 1
            started = time.monotonic()
            twistd.process.send_signal(signal.Signals[service["KillSignal"]])
            frames, code = closed(client)
            assert code == 1001
        try:
            status = twistd.process.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"not stopped within TimeoutStopSec:\n{twistd.log()}") from None
        assert time.monotonic() - started < stop_timeout
        assert status == -signal.SIGTERM, twistd.log()
        assert STOPPED in twistd.log()
    assert redis.command("LLEN", "rm:users:user1:messages") == 1


@claims("ops-tls")
def test_operations_tls_on_both_sides(tmp_path: Path, tls_redis, certificate) -> None:
    # WebSockets: a certificate from an intermediate CA, which clients that
    # only trust the root accept thanks to extraCertChain.
    (tmp_path / "chain").mkdir()
    chain = certificate_chain(tmp_path / "chain")
    redis_ca = certificate[1]  # tls_redis' certificate is its own CA
    port = pick_free_port()
    args = twistd_args(
        sample("ops-tls"),
        {
            "8443": str(port),
            "/etc/redmessenger/tls/privkey.pem": str(chain["key"]),
            "/etc/redmessenger/tls/cert.pem": str(chain["cert"]),
            "/etc/redmessenger/tls/chain.pem": str(chain["chain"]),
            "redis.example.com:6380": f"127.0.0.1:{tls_redis.port}",
            "/etc/redmessenger/redis-ca.pem": str(redis_ca),
        },
        port,
    )
    tls_redis.command("SET", "rm:users:user1:key", "s3cret")
    trust = ssl.create_default_context(cafile=str(chain["root"]))
    with twistd_run(args, tmp_path, "tls", port) as twistd:
        twistd.wait_subscribed()
        assert "Redis at rediss://127.0.0.1:" in twistd.log()
        tls_redis.command("PUBLISH", "rm.users.user1", "stored over TLS")
        wait_for(lambda: tls_redis.command("LLEN", "rm:users:user1:messages"), "stored")
        with ws(f"wss://{HOST}:{port}/", ssl=trust) as client:
            assert hello(client, {"id": "user1", "key": "s3cret"})["queued"] == 1
            assert recv_json(client)["payload"] == "stored over TLS"
            tls_redis.command("PUBLISH", "rm.users.user1", "live over TLS")
            assert recv_json(client)["payload"] == "live over TLS"
        stop_cleanly(twistd)

    # What the text says of certKey: a full chain there is not enough.
    fullchain = tmp_path / "fullchain.pem"
    fullchain.write_bytes(chain["cert"].read_bytes() + chain["chain"].read_bytes())
    at = next(i for i, a in enumerate(args) if a.startswith("ssl:"))
    args[at] = f"ssl:{port}:interface={HOST}:privateKey={chain['key']}:certKey={fullchain}"
    with twistd_run(args, tmp_path, "fullchain", port) as twistd:
        with pytest.raises(ssl.SSLCertVerificationError):
            with ws(f"wss://{HOST}:{port}/", ssl=trust):
                pass
        stop_cleanly(twistd)


@claims("ops-json-log")
def test_operations_json_log_lines_are_what_twistd_writes(tmp_path: Path, redis) -> None:
    [(command, shown)] = transcript(sample("ops-json-log"))
    port = pick_free_port()
    args = twistd_args(command, {"6379": str(redis.port)}, port)
    redis.command("SET", "rm:users:user1:key", "s3cret")
    with twistd_run(args, tmp_path, "json", port) as twistd:
        twistd.wait_subscribed()
        with ws(f"ws://{HOST}:{port}/") as client:
            hello(client, {"id": "user1", "key": "s3cret"})
        wait_for(lambda: "closed (code 1000)" in twistd.log(), "the close to be logged")
        stop_cleanly(twistd)
        real = [json.loads(line) for line in twistd.log().splitlines() if line.startswith("{")]
    assert shown[0] == "...", shown
    shape = ShapeMatch()
    for line in shown[1:]:
        documented = json.loads(line)
        candidates = [
            r
            for r in real
            if r["namespace"] == documented["namespace"]
            and shape.regex(documented["message"]).fullmatch(r["message"])
        ]
        assert candidates, f"not logged: {line}"
        found = candidates[0]
        assert shape.match(documented["message"], found["message"])
        assert list(found) == list(documented), (found, documented)
        for name, value in documented.items():
            assert type(value) is type(found[name]), (name, found)
            if name == "peer":
                assert shape.match(value, found[name])
            elif name not in ("time", "message"):  # the message: matched above
                assert value == found[name], (name, found)


@claims("ops-acl", "ops-acl-twistd")
def test_operations_redis_acl_user_is_enough(tmp_path: Path, private_redis) -> None:
    replay(sample("ops-acl"), private_redis.port)
    port = pick_free_port()
    args = twistd_args(sample("ops-acl-twistd"), {"6379": str(private_redis.port)}, port)
    private_redis.command("SET", "rm:users:user1:key", "s3cret")
    with twistd_run(args, tmp_path, "acl", port) as twistd:
        twistd.wait_subscribed(private_redis.client())
        assert http_get(f"http://{HOST}:{port}/health")[0] == 200
        clients = private_redis.command("CLIENT", "LIST", decode=True)
        assert clients.count("user=messenger") == 3, clients  # commands, lease, subscriber
        with ws(f"ws://{HOST}:{port}/") as client:
            hello(client, {"id": "user1", "key": "s3cret"})
            private_redis.command("PUBLISH", "rm.users.user1", "as messenger")
            assert recv_json(client)["payload"] == "as messenger"
        private_redis.command("PUBLISH", "rm.users.user2", "stored as messenger")
        wait_for(lambda: private_redis.command("LLEN", "rm:users:user2:messages"), "stored")
        stop_cleanly(twistd)


def directives(conf: str) -> dict[str, str]:
    """A Redis configuration file's directives (one of each here)."""
    pairs = [line.split(None, 1) for line in conf.splitlines()
             if line.strip() and not line.startswith("#")]
    return {name: value for name, value in pairs}


@claims("ops-sentinel-twistd", "ops-sentinel-redis-conf", "ops-sentinel-conf")
def test_operations_sentinel_setup_through_a_failover(tmp_path: Path) -> None:
    """The documented redis.conf (on the master and the replica) and
    sentinel.conf (three Sentinels), as they are but for hosts and ports,
    and the command: a message live; the master killed; live again, while a
    store, on the new master, waits for a replica (--redis-replicas-ack 1)
    until the old master is back as one, and is then drained."""
    data = directives(sample("ops-sentinel-redis-conf"))
    assert data.pop("port") == "6379"
    password = data.pop("requirepass")
    assert data.pop("masterauth") == password
    sentinel_conf = sample("ops-sentinel-conf")

    def sentinel_config(port: int, master_port: int) -> str:
        return substitute(sentinel_conf, {"port 26379": f"port {port}",
                                          "10.0.0.1 6379": f"{HOST} {master_port}",
                                          "mymaster": MASTER})

    def replicas() -> dict:
        return json.loads(http_get(f"http://{HOST}:{port}/health")[2])["redis"]["replicas"]

    with Sentinels(tmp_path, password=password,
                   sentinel_password=directives(sentinel_conf)["requirepass"],
                   data_config=data, sentinel_config=sentinel_config) as setup:
        hosts = {f"10.0.0.{i + 1}:26379": f"{HOST}:{port}" for i, port in enumerate(setup.ports)}
        port = pick_free_port()
        args = twistd_args(sample("ops-sentinel-twistd"), {**hosts, "mymaster": MASTER}, port)
        with twistd_run(args, tmp_path, "sentinel", port) as twistd:
            twistd.wait_subscribed()
            master = setup.data(setup.master.port)
            for uid in ("user1", "user2"):
                master.command("SET", f"rm:users:{uid}:key", "s3cret")
            setup.wait_replicated()
            with ws(f"ws://{HOST}:{port}/") as client:
                hello(client, {"id": "user1", "key": "s3cret"})
                master.command("PUBLISH", "rm.users.user1", "before")
                assert recv_json(client)["payload"] == "before"
                promoted = setup.data(setup.kill_master())
                wait_for(lambda: twistd.log().count(SUBSCRIBED) == 2, "a new subscription",
                         START_TIMEOUT, twistd.alive)
                promoted.command("PUBLISH", "rm.users.user1", "after")
                assert recv_json(client)["payload"] == "after"
            promoted.command("PUBLISH", "rm.users.user2", "stored")
            wait_for(lambda: promoted.command("LLEN", "rm:users:user2:messages") == 1,
                     "the store on the new master")
            wait_for(lambda: replicas()["late"], "the node to wait for a replica")
            setup.bring_back(setup.master)  # made the new master's replica by the Sentinels
            wait_for(lambda: not replicas()["late"], "a replica again", 4 * START_TIMEOUT,
                     twistd.alive)
            with ws(f"ws://{HOST}:{port}/") as client:
                assert hello(client, {"id": "user2", "key": "s3cret"})["queued"] == 1
                assert recv_json(client)["payload"] == "stored"
            stop_cleanly(twistd)


@claims("ops-redis-inspect")
@aiotest
async def test_operations_redis_inspection_transcript(private_redis):
    rm = await start_service(private_redis)
    try:
        rm.publish("rm.users.user2", "for later")
        await eventually(lambda: rm.queue("user2"))
        replay(sample("ops-redis-inspect"), private_redis.port)
    finally:
        await rm.stop()


@aiotest
async def test_operations_claim_that_a_database_does_not_separate_two(private_redis):
    """docs/operations.rst: "Redis pub/sub ignores database numbers, so a
    different /db does not separate two RedMessengers"."""
    redis = private_redis

    class OtherDatabase:
        address = dataclasses.replace(redis.address, db=1)

    first = await start_service(redis)
    second = await start_service(OtherDatabase())
    try:
        clients = redis.command("CLIENT", "LIST", decode=True)
        assert clients.count("name=redmessenger:subscriber") == 2, clients
        redis.command("PUBLISH", "rm.users.user1", "heard twice")

        def stored() -> list[int]:
            return [
                reply
                for reply in redis.client().pipeline(
                    [
                        ("LLEN", "rm:users:user1:messages"),
                        ("SELECT", 1),
                        ("LLEN", "rm:users:user1:messages"),
                    ]
                )
                if isinstance(reply, int)
            ]

        await eventually(lambda: stored() == [1, 1])
    finally:
        await first.stop()
        await second.stop()


def test_operations_lists_every_environment_variable() -> None:
    from redmessenger import environment
    from redmessenger.tap import Options

    section = operations().split("\nEnvironment variables\n", 1)[1]
    listed = set(re.findall(r"``(REDMESSENGER_[A-Z_]+)``", section))
    names = {environment.variable(o[0]) for o in Options.optParameters + Options.optFlags}
    assert listed == names
