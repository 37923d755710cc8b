"""Ack bookkeeping: what each ack-mode socket holds unacknowledged, and the
Redis claims that keep drained and held messages safe until each of them is
settled.

An ack-mode socket gets at most --ack-window messages it has not
acknowledged (its window); the dispatcher sends it no more until an ack
opens the window again. A message sent to several sockets of one user is
one ``Outstanding``: the first ack settles it, and only when every socket
holding it has left unacknowledged does it go to another socket or back to
the queue. A message that came from Redis (a drain's take, or live messages
held for an ack-mode user) is in a ``Claim`` there until it is settled.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from twisted.logger import Logger

from .envelope import Envelope
from .stats import Stats

if TYPE_CHECKING:
    from .delivery import MessageStore, Socket

log = Logger()


class Claim:
    """A drain's take, kept in Redis until each of its messages is settled:
    acknowledged, taken by a plain socket, or back in the queue. So a
    process killed meanwhile loses none of them (its claims come back).
    Its settled head is trimmed as it grows, so that after a crash only
    what was not settled comes back."""

    __slots__ = ("taken", "pending", "settled", "head")

    def __init__(self, taken, count: int) -> None:
        self.taken = taken
        self.pending = count
        #: Which of its messages are settled, by their place in the claim.
        self.settled = bytearray(count)
        #: How many at its head are settled.
        self.head = 0

    def settle(self, index: int) -> bool:
        """Mark one settled; true if the settled head grew."""
        self.pending -= 1
        self.settled[index] = 1
        if index != self.head:
            return False
        settled, head, size = self.settled, self.head + 1, len(self.settled)
        while head < size and settled[head]:
            head += 1
        self.head = head
        return True


#: A message's place in a claim (``None``: it is in no claim).
Ref = tuple[Claim, int] | None


class Outstanding:
    """One message sent to one user's ack-mode sockets, until one acks it."""

    __slots__ = ("envelope", "seq", "holders", "done", "claim")

    def __init__(self, envelope: Envelope, seq: int, claim: Ref) -> None:
        self.envelope = envelope
        #: The order in which the user's messages were sent.
        self.seq = seq
        #: How many sockets have it unacknowledged.
        self.holders = 0
        #: Acknowledged, or taken by a plain socket: never sent again.
        self.done = False
        #: Where it is in the take it came from, settled with it.
        self.claim = claim


class Seat:
    """A socket as the dispatcher sees it: its ack bookkeeping. Tags count
    up from 1; ``unacked`` holds its window, oldest tag first."""

    __slots__ = ("socket", "id", "next_tag", "unacked", "started")

    def __init__(self, socket: Socket, id: str = "") -> None:
        self.socket = socket
        #: Its id in the cluster's presence (``<owner>:<n>``).
        self.id = id
        self.next_tag = 1
        self.unacked: OrderedDict[int, Outstanding] = OrderedDict()
        #: Welcomed (told how many stored messages follow).
        self.started = False

    def leave(self) -> list[Outstanding]:
        """The socket is gone: what it alone held unacknowledged (and nobody
        acknowledged) must go to another socket or back to the queue."""
        orphans = []
        for outstanding in self.unacked.values():
            outstanding.holders -= 1
            if not outstanding.done and outstanding.holders == 0:
                orphans.append(outstanding)
        self.unacked.clear()
        return orphans


class Acks:
    """Settles what acks release: counts them, and trims or releases the
    Redis claims their messages came from."""

    __slots__ = ("_store", "_stats")

    def __init__(self, store: MessageStore, stats: Stats) -> None:
        self._store = store
        self._stats = stats

    def ack(self, seat: Seat, tag: int) -> None:
        """The seat's client has every message up to ``tag``."""
        unacked = seat.unacked
        while unacked:
            first = next(iter(unacked))
            if first > tag:
                break
            outstanding = unacked.pop(first)
            outstanding.holders -= 1
            if not outstanding.done:
                outstanding.done = True
                self._stats.acked += 1
                self.settled(outstanding.claim)

    def settled(self, ref: Ref) -> None:
        """One message of a claim is done with: the claim's settled head is
        trimmed, and the last one releases it."""
        if ref is None:
            return
        claim, index = ref
        if not claim.settle(index):
            return
        if claim.pending == 0:
            self._store.release(claim.taken).addErrback(
                lambda f: log.failure("Could not release a drain claim", f)
            )
        elif claim.head < len(claim.settled):
            self._store.trim(claim.taken, len(claim.settled) - claim.head)
