"""Limits against abuse: open connections in total and per remote address,
and hellos per second per address (a token bucket). 0 means no limit."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable


def address_of(peer) -> str:
    """What the per-address limits count a peer (a Twisted address) as."""
    return getattr(peer, "host", None) or "local"


class Limits:
    def __init__(self, max_connections: int = 0, max_per_address: int = 0,
                 hello_rate: float = 0, clock: Callable[[], float] | None = None) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.hello_rate = hello_rate
        #: A bucket holds at least one whole hello, or a rate below 1 would
        #: never let one through.
        self.hello_burst = max(1.0, hello_rate)
        self._clock = clock
        self._open: Counter[str] = Counter()
        self._total = 0
        #: address -> (tokens, when they were counted)
        self._buckets: dict[str, tuple[float, float]] = {}

    @property
    def connections(self) -> int:
        """Connections counted in now."""
        return self._total

    def admit(self, address: str) -> str | None:
        """Count a new connection in, or say why it may not stay."""
        if self.max_connections and self._total >= self.max_connections:
            return f"the server has its maximum of {self.max_connections} connections"
        if self.max_per_address and self._open[address] >= self.max_per_address:
            return f"{address} has its maximum of {self.max_per_address} connections"
        self._open[address] += 1
        self._total += 1
        return None

    def release(self, address: str) -> None:
        self._open[address] -= 1
        self._total -= 1
        if not self._open[address]:
            del self._open[address]

    def hello_allowed(self, address: str) -> bool:
        """A burst of up to ``hello_burst`` hellos, refilled at ``hello_rate``
        per second: at 0.2, one hello every 5 s."""
        if not self.hello_rate:
            return True
        now = self._clock()
        burst = self.hello_burst
        tokens, then = self._buckets.get(address, (burst, now))
        tokens = min(burst, tokens + (now - then) * self.hello_rate)
        if len(self._buckets) > 100_000:  # forget addresses that have refilled
            self._buckets = {a: b for a, b in self._buckets.items()
                             if b[0] + (now - b[1]) * self.hello_rate < burst}
        if tokens < 1:
            self._buckets[address] = (tokens, now)
            return False
        self._buckets[address] = (tokens - 1, now)
        return True
