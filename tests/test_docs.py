"""The documents as a whole: every code sample in them is claimed by a test
of its document (tests/test_docs_*.py), the extractor that finds the
samples finds them all and only them, and each document is valid
reStructuredText."""

from __future__ import annotations

import importlib

import pytest

from deployed import REPO
from docsamples import CLAIMED, SAMPLES, all_blocks, literal_blocks, matching


def test_every_sample_is_claimed_by_a_test() -> None:
    # Each document's tests claim its samples as their module is imported.
    for path in sorted((REPO / "tests").glob("test_docs_*.py")):
        importlib.import_module(path.stem)
    unclaimed = []
    for block in all_blocks():
        names = [n for n in SAMPLES if block in matching(n)]
        assert len(names) <= 1, f"{block} is matched by several samples: {names}"
        if not names or names[0] not in CLAIMED:
            unclaimed.append(str(block))
    assert not unclaimed, ("code samples that no test runs (add them to SAMPLES and a "
                           "test in its document's tests/test_docs_*.py):\n" + "\n".join(unclaimed))
    for name in SAMPLES:
        assert len(matching(name)) == 1, f"sample {name} matches {matching(name)}"
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


@pytest.mark.parametrize("name", ["README.rst", "docs/protocol.rst", "docs/operations.rst",
                                  "docs/guarantees.rst", "docs/scaling.rst",
                                  "bench/README.rst", "NEWS.rst"])
def test_the_docs_are_valid_restructuredtext(name: str) -> None:
    import io

    import docutils.core

    warnings = io.StringIO()
    docutils.core.publish_string(
        (REPO / name).read_text(), writer_name="null",
        settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": warnings})
    assert not warnings.getvalue(), warnings.getvalue()
