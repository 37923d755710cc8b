"""docs/guarantees.rst: the tests it cites exist."""

from __future__ import annotations

import re

from deployed import REPO


def test_the_guarantees_cite_tests_that_exist() -> None:
    """docs/guarantees.rst names, for each cell, the test that shows it."""
    cited = set(re.findall(r"``(test_\w+)``", (REPO / "docs/guarantees.rst").read_text()))
    defined = set()
    for path in (REPO / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
    assert cited and not cited - defined, cited - defined
