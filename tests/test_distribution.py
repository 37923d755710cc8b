"""What is distributed, not the checkout: the sdist and the wheel that
``python -m build`` makes, and the wheel installed in fresh venvs of the
oldest and the newest Python that setup.cfg supports, running RedMessenger
there.

The suite itself runs on CI's Python. What each supported Python needs
shown is that the product installs and runs on it: the plugin found, the
service started, a client served. (tox runs the whole suite on each.)"""

from __future__ import annotations

import configparser
import glob
import http.client
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import pytest

from deployed import REPO, START_TIMEOUT, TwistdProcess, client, hello, recv_json, wait_for
from network import HOST, pick_free_port

#: The oldest and the newest Python of setup.cfg's classifiers (checked below).
OLDEST, NEWEST = "3.10", "3.13"
#: Seconds a build, or an install of the wheel and its dependencies, may take.
INSTALL_TIMEOUT = 600


def python(version: str) -> str | None:
    """That Python's interpreter, one that runs: pyenv's, or on PATH (where
    pyenv's shims may name versions it does not select)."""
    pattern = os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")
    for candidate in [*sorted(glob.glob(pattern), reverse=True),
                      shutil.which(f"python{version}")]:
        if candidate and subprocess.run([candidate, "-c", ""], capture_output=True,
                                        timeout=60).returncode == 0:
            return candidate
    return None


def test_the_pythons_tried_are_the_oldest_and_newest_supported() -> None:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    versions = [line.rsplit(":: ", 1)[1] for line in
                config["metadata"]["classifiers"].splitlines()
                if line.startswith("Programming Language :: Python :: 3.")]
    assert (versions[0], versions[-1]) == (OLDEST, NEWEST)
    assert config["options"]["python_requires"] == f">={OLDEST}"


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """sdist and wheel, built from a copy of the checkout (whose own tree
    the build would otherwise write into)."""
    source = tmp_path_factory.mktemp("source") / "redmessenger"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".tox",
        ".hypothesis", ".ruff_cache"))
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(source)],
                           capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out


def test_the_sdist_has_the_docs_and_the_tests_and_the_wheel_what_runs(dist: Path) -> None:
    [sdist] = dist.glob("redmessenger-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for wanted in ("LICENSE", "NEWS.rst", "README.rst", "tox.ini", "docs/operations.rst",
                   "docs/example.tac", "tests/conftest.py", "tests/test_distribution.py",
                   "bench/proc.py", "redmessenger/lua/store.lua", "redmessenger/static/index.html",
                   "twisted/plugins/redmessenger_plugin.py"):
        assert wanted in names, f"the sdist lacks {wanted}"
    [wheel] = dist.glob("redmessenger-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for wanted in ("redmessenger/lua/store.lua", "redmessenger/lua/shared/recover.lua",
                   "redmessenger/static/redmessenger.js", "redmessenger/static/index.html",
                   "twisted/plugins/redmessenger_plugin.py"):
        assert wanted in names, f"the wheel lacks {wanted}"
    assert not [n for n in names if n.startswith(("tests/", "docs/", "twisted/__init__",
                                                   "twisted/plugins/__init__"))], names


@pytest.fixture(scope="module")
def venvs(dist: Path, tmp_path_factory) -> dict[str, Path | str]:
    """A fresh venv per Python tried, with the wheel installed: both made at
    once (most of the time is pip's, waiting on downloads and unpacking).
    A Python that is not here maps to why."""
    [wheel] = dist.glob("redmessenger-*.whl")
    made: dict[str, Path | str] = {}
    installs = []
    for version in (OLDEST, NEWEST):
        interpreter = python(version)
        if interpreter is None:
            made[version] = f"no Python {version} here (pyenv install {version})"
            continue
        venv = made[version] = tmp_path_factory.mktemp(f"venv{version}")
        script = '"$1" -m venv "$2" && "$2/bin/pip" install -q "$3"'
        installs.append((version, subprocess.Popen(
            ["sh", "-c", script, "sh", interpreter, str(venv), str(wheel)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    try:
        outputs = [(version, install, install.communicate(timeout=INSTALL_TIMEOUT)[0])
                   for version, install in installs]
    finally:
        for _, install in installs:
            if install.poll() is None:
                install.kill()
                install.wait()
    for version, install, output in outputs:
        assert install.returncode == 0, f"Python {version}: {output[-3000:]}"
    return made


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_the_wheel_installed_in_a_fresh_venv_runs_redmessenger(
        version: str, venvs: dict[str, Path | str], tmp_path: Path, redis) -> None:
    venv = venvs[version]
    if isinstance(venv, str):
        if os.environ.get("REDMESSENGER_REQUIRE_PYTHONS") == "1":
            pytest.fail(venv)
        pytest.skip(venv)
    twistd = str(venv / "bin" / "twistd")
    away = {"cwd": tmp_path, "capture_output": True, "text": True, "timeout": START_TIMEOUT}
    listed = subprocess.run([twistd, "--help"], **away)
    assert "redmessenger" in listed.stdout, listed.stdout  # the plugin, discovered
    helped = subprocess.run([twistd, "redmessenger", "--help"], **away)
    assert helped.returncode == 0 and "--internal-port" in helped.stdout, helped.stdout

    port = pick_free_port()
    args = ["-n", "--pidfile=", "redmessenger", "--port", f"tcp:{port}:interface={HOST}",
            "--redis", redis.url, "--auth", "off"]
    with TwistdProcess(args, tmp_path, tmp_path / "twistd.log", twistd=twistd) as process:
        process.wait_accepting(port)
        assert f" {version}." in process.log().splitlines()[0]  # the venv's Python runs it
        for path, kind in (("/client.js", "text/javascript"), ("/", "text/html")):
            with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=10) as answer:
                assert answer.status == 200 and answer.headers["content-type"].startswith(kind)
        wait_for(lambda: "Subscribed to" in process.log(), "the subscriber", START_TIMEOUT,
                 process.alive)
        with client(port) as ws:
            hello(ws, {"id": "user1"})
            redis.command("PUBLISH", "rm.users.user1", f"from Python {version}")
            assert recv_json(ws)["payload"] == f"from Python {version}"
        # And an event stream.
        connection = http.client.HTTPConnection(HOST, port, timeout=10)
        connection.request("GET", "/events?id=user2")
        events = connection.getresponse()
        assert events.status == 200

        def data() -> dict:
            while not (line := events.readline()).startswith(b"data:"):
                assert line, "the stream ended"
            return json.loads(line[5:])

        assert data()["type"] == "welcome"
        redis.command("PUBLISH", "rm.users.user2", f"streamed by Python {version}")
        assert data()["payload"] == f"streamed by Python {version}"
        connection.close()
        process.stop()
        process.assert_stopped_cleanly()
