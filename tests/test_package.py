"""What the package says of itself: its license, the Pythons it runs on,
its version (in one place) and its changelog (fragments that build)."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

import redmessenger

from deployed import REPO


def metadata() -> configparser.SectionProxy:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    return config["metadata"]


def classifiers() -> list[str]:
    return [line.strip() for line in metadata()["classifiers"].splitlines() if line.strip()]


def test_the_license_is_mit_in_the_file_and_the_metadata() -> None:
    assert (REPO / "LICENSE").read_text().startswith("MIT License\n")
    assert metadata()["license"] == "MIT"
    assert metadata()["license_files"] == "LICENSE"
    assert "License :: OSI Approved :: MIT License" in classifiers()


def test_every_python_tox_runs_is_one_the_metadata_names() -> None:
    """tox's pyXY environments, the ``3.X`` classifiers and the lowest
    ``python_requires`` agree."""
    tox = configparser.ConfigParser()
    tox.read(REPO / "tox.ini")
    envs = {f"3.{env[3:]}" for env in tox["tox"]["envlist"].replace(",", " ").split()
            if re.fullmatch(r"py3\d+", env)}
    named = {c.rsplit(" :: ", 1)[1] for c in classifiers()
             if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert envs == named, (envs, named)
    options = configparser.ConfigParser()
    options.read(REPO / "setup.cfg")
    lowest = min(named, key=lambda v: int(v.split(".")[1]))
    assert options["options"]["python_requires"] == f">={lowest}"


def test_the_version_is_written_in_one_place() -> None:
    """Only _version.py says it; setup.cfg reads it from there."""
    version = redmessenger.__version__
    assert metadata()["version"] == "attr: redmessenger._version.__version__"
    saying = [path.relative_to(REPO) for path in (REPO / "redmessenger").rglob("*")
              if path.is_file() and path.suffix in (".py", ".js", ".html", ".lua")
              and version in path.read_text(errors="replace")]
    assert saying == [Path("redmessenger/_version.py")], saying


def test_the_changelog_fragments_build() -> None:
    """Each fragment is named <issue>.<type>.rst with a type the changelog
    knows, and ``towncrier build`` (as at a release, a draft here) takes
    every one."""
    fragments = sorted((REPO / "newsfragments").glob("*"))
    types = re.findall(r'directory = "(\w+)"', (REPO / "pyproject.toml").read_text())
    for fragment in fragments:
        assert re.fullmatch(rf"\d+\.({'|'.join(types)})\.rst", fragment.name), fragment.name
    towncrier = Path(sys.executable).with_name("towncrier")
    draft = subprocess.run([str(towncrier), "build", "--draft", "--version", "99.0"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert draft.returncode == 0, draft.stderr
    flat = " ".join(draft.stdout.split())
    for fragment in fragments:
        first_words = " ".join(fragment.read_text().split()[:6])
        assert first_words in flat, (fragment.name, draft.stdout)
