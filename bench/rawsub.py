"""Baseline: the raw Redis pub/sub receive rate of a hiredis subscriber.

The same subscriber RedMessenger runs (txredisapi's ``SubscriberProtocol``,
hiredis parsing, bytes in, no decoding), ``PSUBSCRIBE``\\ d to the same
patterns, on Twisted's default reactor, doing nothing with each message but
count it and check its sequence number.

Commands (JSON lines on stdin)::

    {"cmd": "subscribe", "port": P, "patterns": [...]}    -> {"event": "subscribed"}
    {"cmd": "wait", "total": N, "timeout": 60}            -> {"event": "waited", ...}
"""

from __future__ import annotations

import resource
import time

import txredisapi
from twisted.internet import protocol, reactor

from .control import Commands, serve
from .wire import emit


class Counter(txredisapi.SubscriberProtocol):
    received = 0
    seqsum = 0
    order_errors = 0
    last = -1
    t_first = 0.0
    t_last = 0.0
    target = 0
    on_target = None

    def messageReceived(self, pattern, channel, message):
        seq = int(message[:message.index(b":")])
        if seq <= self.last:
            self.order_errors += 1
        self.last = seq
        self.seqsum += seq
        self.received += 1
        now = time.monotonic()
        if self.received == 1:
            self.t_first = now
        self.t_last = now
        if self.received == self.target and self.on_target is not None:
            self.on_target()


class Control(Commands):
    subscriber: Counter | None = None

    def do_subscribe(self, port: int, patterns: list[str]) -> None:
        creator = protocol.ClientCreator(reactor, Counter, charset=None, convertNumbers=False)
        d = creator.connectTCP("127.0.0.1", port)

        def connected(subscriber):
            self.subscriber = subscriber
            return subscriber.psubscribe([p.encode() for p in patterns])

        d.addCallback(connected)
        d.addCallbacks(lambda _: emit({"event": "subscribed"}),
                       lambda f: emit({"event": "error", "error": f.getErrorMessage()}))

    def do_wait(self, total: int, timeout: float) -> None:
        sub = self.subscriber
        timer = None

        def report() -> None:
            sub.on_target = None
            if timer is not None and timer.active():
                timer.cancel()
            usage = resource.getrusage(resource.RUSAGE_SELF)
            emit({"event": "waited", "received": sub.received, "seqsum": sub.seqsum,
                  "order_errors": sub.order_errors, "t_first_message": sub.t_first,
                  "t_target": sub.t_last if sub.received >= total else 0.0,
                  "reached": sub.received >= total, "cpu": usage.ru_utime + usage.ru_stime})

        if sub.received >= total:
            report()
            return
        sub.target = total
        sub.on_target = report
        timer = reactor.callLater(timeout, report)


def main() -> None:
    serve(Control())


if __name__ == "__main__":
    main()
