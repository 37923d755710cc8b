"""Where the test run's servers listen: 127.0.0.1 only, on ports the kernel
says are free (never 6379 or 8080, which may be someone else's)."""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


def pick_free_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago (the kernel's pick for
    port 0). Whoever uses it must cope with losing a race for it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """``count`` different free ports."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(pick_free_port())
    return list(ports)


def accepting(port: int) -> bool:
    """Whether something accepts TCP connections on ``port`` of 127.0.0.1."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False
