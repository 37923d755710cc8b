"""The write barrier: when every message handed to the dispatcher so far has
left this process' memory.

Live messages wait in memory behind a user's drain (``waiting``); everything
else is written to a socket or handed to the store at once. The inbox
acknowledges its entries only once they are out of memory, so it asks for a
barrier: a mark on each queue that holds messages now, which fires once that
many have left it (sent, or handed to the store).
"""

from __future__ import annotations

from collections.abc import Iterable, Sized
from typing import Protocol

from twisted.internet import defer


class Holder(Protocol):
    """A queue of live messages in memory, and how many have left it."""

    waiting: Sized
    #: How many have left ``waiting`` so far.
    let_go: int


class WriteBarrier:
    """Deferreds that fire once every message held at their call has left."""

    __slots__ = ("_barriers",)

    def __init__(self) -> None:
        self._barriers: list[tuple[list[tuple[Holder, int]], defer.Deferred]] = []

    def written(self, holders: Iterable[Holder]) -> defer.Deferred:
        """Fires once what each of ``holders`` holds now has left it."""
        marks = [(h, h.let_go + len(h.waiting)) for h in holders if h.waiting]
        if not marks:
            return defer.succeed(None)
        d = defer.Deferred()
        self._barriers.append((marks, d))
        return d

    def let_go(self, holder: Holder, count: int) -> None:
        """``count`` messages have left ``holder``: fire the barriers passed."""
        holder.let_go += count
        if not self._barriers:
            return
        done = [d for marks, d in self._barriers if all(h.let_go >= mark for h, mark in marks)]
        if done:
            self._barriers = [(m, d) for m, d in self._barriers if d not in done]
            for d in done:
                d.callback(None)
