"""What RedMessenger counts as it works: plain integers bumped on the hot
path, read only when someone asks (``/metrics``, ``/health``), so counting
costs next to nothing per message."""

from __future__ import annotations

import bisect
from collections import Counter

#: Seconds, from a PUBLISH reaching RedMessenger to its frame being written
#: (sampled: the first live delivery and every 16th after it).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)


class Stats:
    def __init__(self) -> None:
        self.received = 0
        self.delivered_live = 0
        #: Less those Redis then refused for good (``dead_letters``).
        self.stored = 0
        #: Stores and recommits Redis refused for good, kept in ``rm:dead``.
        self.dead_letters = 0
        #: Stores refused because this node's lease had expired (another
        #: node decided for those users meanwhile).
        self.fenced = 0
        #: Messages this node left to another node or its storer: for
        #: users whose sockets are elsewhere.
        self.elsewhere = 0
        self.drained = 0
        self.recommitted = 0
        self.acked = 0
        self.redelivered = 0
        self.ping_timeouts = 0
        #: Connections closed at their accept by a connection limit, and
        #: for not becoming a WebSocket in time (slowloris).
        self.connections_refused = 0
        self.handshake_timeouts = 0
        #: Sockets we closed, by close code.
        self.closed_by_code: Counter[int] = Counter()
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def observe_latency(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
