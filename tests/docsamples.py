"""The code samples of README.rst and docs/*.rst: found, named, claimed by
the test that runs them, rewritten to run here, and run.

Each literal block (``::`` and ``.. code-block::``) is found by
:func:`literal_blocks` and must be claimed, through :data:`SAMPLES` and the
``@claims`` decorator, by a test of its document (tests/test_docs_*.py): a
new sample that no test claims fails tests/test_docs.py's
``test_every_sample_is_claimed_by_a_test``.

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

What cannot be equal from run to run (message ids, timestamps, the client's
port) is compared by its shape (:class:`ShapeMatch`), and kept consistent
within a sample.
"""

from __future__ import annotations

import dataclasses
import functools
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
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from deployed import RECV_TIMEOUT, REPO, STOPPED, TwistdProcess, deployed_env
from network import HOST, pick_free_port

DOCS = ("README.rst", "docs/protocol.rst", "docs/operations.rst", "docs/guarantees.rst")


#: The test venv's bin directory, standing for the samples' ``.venv/bin``.
VENV_BIN = Path(sys.executable).parent


#: How long any one command of a sample may take.
COMMAND_TIMEOUT = 20.0


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
            while (
                i < len(lines) and lines[i].strip().startswith(":") and _indent(lines[i]) > indent
            ):
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
            raise ValueError(
                f"{path}:{start + 1}: a literal block that is not indented "
                "(quoted literal blocks are not supported here)"
            )
        cut = min(_indent(b) for b in body if b.strip())
        blocks.append(Block(path, start + 1, language, "\n".join(b[cut:] for b in body)))
    return blocks


@functools.cache
def all_blocks() -> tuple[Block, ...]:
    return tuple(
        block for path in DOCS for block in literal_blocks((REPO / path).read_text(), path)
    )


#: Every sample, by name: its file and how its text starts.
SAMPLES: dict[str, tuple[str, str]] = {
    "readme-run": ("README.rst", "python3 -m venv .venv && .venv/bin/pip install '.[embedded]'"),
    "readme-tests": ("README.rst", "python3 -m venv .venv && .venv/bin/pip install -q '.[test]'"),
    "readme-key": ("README.rst", "$ export REDISCLI_AUTH=$(cat redmessenger-data/"),
    "readme-publish": ("README.rst", "$ .venv/bin/redis-cli PUBLISH rm.users.user1"),
    "readme-websocket": ("README.rst", "$ .venv/bin/pip install -q websockets"),
    "readme-embedding": ("README.rst", "import os\n"),
    "readme-mounted": ("README.rst", "root = Resource()\n"),
    "readme-klein": ("README.rst", "@app.route(\"/rm/\", branch=True)"),
    "readme-web-page": ("README.rst", '<script type="module">'),
    "readme-event-source": ("README.rst", '<script>\n  let last = "";'),
    "readme-python": ("README.rst", "from twisted.internet import task\n"),
    "readme-cli": ("README.rst", "$ .venv/bin/redmessenger token set"),
    "readme-listen": ("README.rst", "$ .venv/bin/redmessenger listen"),
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
    "protocol-events-request": ("docs/protocol.rst", "GET /events?id=user1 HTTP/1.1"),
    "protocol-events-stream": ("docs/protocol.rst", "retry: 1000"),
    "ops-health": ("docs/operations.rst", "$ curl -si http://127.0.0.1:8080/health"),
    "ops-health-503": ("docs/operations.rst", "$ curl -s http://127.0.0.1:8080/health"),
    "ops-metrics": ("docs/operations.rst", "$ curl -s http://127.0.0.1:8080/metrics"),
    "ops-nginx": ("docs/operations.rst", "# WebSocket upgrades pass"),
    "ops-systemd": ("docs/operations.rst", "# /etc/systemd/system/redmessenger.service"),
    "ops-envfile": ("docs/operations.rst", "# /etc/redmessenger/redmessenger.env"),
    "ops-tls": ("docs/operations.rst", "twistd -n --pidfile= redmessenger --port ssl:"),
    "ops-json-log": (
        "docs/operations.rst",
        "$ twistd -n --pidfile= redmessenger --log-format json",
    ),
    "ops-acl": ("docs/operations.rst", "$ redis-cli ACL SETUSER messenger"),
    "ops-acl-twistd": (
        "docs/operations.rst",
        "twistd -n --pidfile= redmessenger --redis 'redis://messenger:",
    ),
    "ops-redis-inspect": ("docs/operations.rst", "$ redis-cli CONFIG GET maxmemory-policy"),
    "ops-sentinel-twistd": (
        "docs/operations.rst",
        "twistd -n --pidfile= redmessenger --redis-replicas-ack 1 --redis 'redis+sentinel://",
    ),
    "ops-sentinel-redis-conf": ("docs/operations.rst", "# redis.conf"),
    "ops-sentinel-conf": ("docs/operations.rst", "# sentinel.conf"),
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


def matching(name: str) -> list[Block]:
    """The blocks that sample ``name`` names (one, unless something is amiss)."""
    path, start = SAMPLES[name]
    return [b for b in all_blocks() if b.path == path and b.text.startswith(start)]


def sample(name: str) -> str:
    """The text of one sample (dedented)."""
    found = matching(name)
    assert len(found) == 1, f"sample {name} matches {len(found)} blocks: {found}"
    return found[0].text


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


def run_in_terminal(
    argv: list[str], timeout: float = COMMAND_TIMEOUT, env: dict[str, str] | None = None
) -> str:
    """Run a command on a pseudo-terminal (where redis-cli formats replies as
    the transcripts show them); what it printed, with ``\\n`` line ends."""
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True, env=env
        )
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
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=deployed_env(),
    )
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
def twistd_run(
    args: list[str], tmp_path: Path, name: str, port: int, env: dict[str, str] | None = None
) -> Iterator[TwistdProcess]:
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
        (str(p) for p in (Path("/usr/sbin") / tool, Path("/sbin") / tool) if p.exists()), None
    )
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


class ShapeMatch:
    """Sample text against real text where ids and the client's port vary:
    each sample token stands for one real value, the same wherever it is."""

    TOKENS = re.compile(rf"{MESSAGE_ID}|{PEER}")

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def regex(self, shown: str) -> re.Pattern:
        parts, end = [], 0
        for token in self.TOKENS.finditer(shown):
            parts.append(re.escape(shown[end : token.start()]))
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
