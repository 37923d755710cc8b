"""The limits' arithmetic, on a fake clock (pure logic): the token bucket of
--hello-rate, and the connection counts."""

from __future__ import annotations

import itertools

import pytest

from redmessenger.limits import Limits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def allowed_at(rate: float, step: float, seconds: float) -> list[float]:
    """When a client asking every ``step`` seconds gets a hello through."""
    clock = Clock()
    limits = Limits(hello_rate=rate, clock=clock)
    times = []
    for i in range(int(seconds / step)):
        clock.now = 1000.0 + i * step
        if limits.hello_allowed("10.0.0.1"):
            times.append(i * step)
    return times


@pytest.mark.parametrize("rate", [0.5, 0.2])
def test_a_rate_below_one_lets_one_hello_through_every_1_over_rate_seconds(rate):
    times = allowed_at(rate, 0.25, 60)
    assert times and times[0] == 0, "the bucket must hold one whole hello from the start"
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(1 / rate <= gap <= 1 / rate + 0.25 for gap in gaps), gaps
    assert len(times) == pytest.approx(1 + 60 * rate, abs=1)


def test_a_rate_of_one_or_more_allows_bursts_of_as_many():
    clock = Clock()
    limits = Limits(hello_rate=3, clock=clock)
    assert [limits.hello_allowed("a") for _ in range(4)] == [True, True, True, False]
    assert limits.hello_allowed("b")  # per address
    clock.now += 1 / 3
    assert limits.hello_allowed("a") and not limits.hello_allowed("a")


def test_no_rate_is_no_limit():
    limits = Limits(clock=Clock())
    assert all(limits.hello_allowed("a") for _ in range(1000))


def test_connections_in_total_and_per_address():
    limits = Limits(max_connections=3, max_per_address=2)
    assert limits.admit("a") is None and limits.admit("a") is None
    assert limits.admit("a") == "a has its maximum of 2 connections"
    assert limits.admit("b") is None
    assert limits.admit("c") == "the server has its maximum of 3 connections"
    limits.release("a")
    assert limits.admit("c") is None
