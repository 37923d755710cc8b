"""A client that reads slower than its messages come, whatever the
transport (a WebSocket, an event stream): its connection holds at most a
high-water mark of unsent bytes before nothing more is written to it, and
one that falls further behind than ``--max-socket-buffer`` is closed
(4010) so that it reconnects and drains. Nothing is lost meanwhile: what
it was not handed waits in Redis, in order."""

from __future__ import annotations

from twisted.logger import Logger

from .frames import Close

log = Logger()

#: Unsent bytes a connection holds before nothing more is written to it
#: until it has written them out. Drains follow it, so a client that reads
#: takes a backlog of any size; live messages meanwhile wait in Redis, in
#: order. 1 MiB, the bound on a socket's unsent bytes before back-pressure:
#: at 256 KiB, a client that reads as fast as it can but is handed a burst
#: of live messages in one reactor turn sent most of them through Redis
#: (bench live-1: 19-25 µs per message instead of 12-15). --max-socket-buffer
#: is how far behind that a client may fall before it counts as too slow.
HIGH_WATER = 1024 * 1024


class Paced:
    """Mixed into a ``delivery.Socket`` with a ``factory`` (the
    ``RedMessengerFactory``: its dispatcher, reactor and
    ``max_socket_buffer``), ``uid``, ``peer`` and ``close()``."""

    #: Below the high-water mark: the dispatcher may write to it.
    writable = True
    #: Bytes handed to it (or kept in Redis for it) while it was not
    #: writable; past --max-socket-buffer it is too slow.
    _behind = 0
    #: Too far behind: nothing more is written, and it is being closed.
    _too_slow = False

    def paused(self) -> None:
        """The transport holds more than its high-water mark: write no more
        until it has written that out (``resumed``)."""
        self.writable = False

    def resumed(self) -> None:
        self.writable = True
        self._behind = 0
        if self.uid is not None:
            self.factory.dispatcher.writable(self)

    def missed(self, size: int) -> None:
        self._fall_behind(size)

    def _fall_behind(self, size: int) -> bool:
        """Count ``size`` more bytes that wait for this client: false (and
        it is closed with 4010) if more than --max-socket-buffer already
        did. So it may always take one more message, whatever its size."""
        if self._behind >= self.factory.max_socket_buffer:
            self.too_slow()
            return False
        self._behind += size
        return True

    def too_slow(self, why: str | None = None) -> None:
        """The client does not read fast enough (``why``: how it shows, for
        the log). What it holds unacked goes to the user's other sockets or
        back to Redis, later messages too, and it is closed (4010) so that
        it reconnects and drains."""
        if self._too_slow:
            return
        self._too_slow = True
        why = why or f"more than {self.factory.max_socket_buffer} bytes unsent"
        # Called in the middle of a delivery: step out of it first.
        self.factory.reactor.callLater(0, self._leave_too_slow, why)

    def _leave_too_slow(self, why: str) -> None:
        log.warn("{peer} ({uid}) is too slow: {why}", peer=self.peer, uid=self.uid, why=why)
        if self.uid is not None:
            self.factory.dispatcher.detach(self)
        self.close(Close.TOO_SLOW, "too_slow",
                   "the connection does not keep up; reconnect to get the rest")
