"""Several RedMessenger nodes on one real Redis, as deployed: each node is a
real ``twistd redmessenger`` process on a port of its own, and clients are
real WebSocket connections to whichever node a test picks.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from websockets.sync.client import ClientConnection

from deployed import START_TIMEOUT, TwistdProcess, client, hello, recv_json, wait_for
from network import HOST, pick_free_port

#: What a node logs once it is subscribed and has taken the storer
#: partitions it could: a PUBLISH from then on is decided by someone.
READY = "Subscribed to"


class Node:
    """One ``twistd redmessenger`` of the cluster."""

    def __init__(self, cluster: Cluster, name: str, *extra: str) -> None:
        self.name = name
        self.port = pick_free_port()
        args = ["-n", "--pidfile=", "redmessenger", "--port", f"tcp:{self.port}:interface={HOST}",
                "--redis", cluster.redis.url, "--auth", "off", *cluster.extra, *extra]
        self.twistd = TwistdProcess(args, cluster.tmp_path,
                                    cluster.tmp_path / f"{name}-{self.port}.log")
        self.twistd.wait_accepting(self.port)
        wait_for(lambda: READY in self.twistd.log(), f"node {name} to be ready", START_TIMEOUT,
                 self.twistd.alive)

    def log(self) -> str:
        return self.twistd.log()

    def stop(self) -> None:
        """SIGTERM, and wait until it has stopped cleanly."""
        self.twistd.stop()
        self.twistd.assert_stopped_cleanly()

    def kill(self) -> None:
        self.twistd.process.send_signal(signal.SIGKILL)
        self.twistd.process.wait()

    @contextmanager
    def user(self, uid: str, **hello_fields) -> Iterator[ClientConnection]:
        """A socket of ``uid`` on this node, welcomed."""
        with client(self.port) as ws:
            ws.welcome = hello(ws, {"id": uid, **hello_fields})
            yield ws


class Cluster:
    """Nodes on one Redis, each stopped (or killed) when the block ends."""

    def __init__(self, tmp_path: Path, redis, *extra: str) -> None:
        self.tmp_path = tmp_path
        self.redis = redis
        self.extra = extra
        self.nodes: list[Node] = []

    def start(self, count: int = 1, *extra: str) -> list[Node]:
        started = []
        for _ in range(count):
            node = Node(self, f"node{len(self.nodes) + 1}", *extra)
            self.nodes.append(node)
            started.append(node)
        return started

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for node in self.nodes:
            node.twistd.terminate()
        for node in self.nodes:
            node.twistd.__exit__()

    def publish(self, channel: str, payload: str) -> int:
        return self.redis.command("PUBLISH", channel, payload)

    def queue(self, uid: str) -> list[str]:
        """The payloads stored for ``uid``, in order."""
        return self.queue_of(self.redis, uid)

    @staticmethod
    def queue_of(redis, uid: str) -> list[str]:
        return [json.loads(raw)["payload"] for raw in
                redis.command("LRANGE", f"rm:users:{uid}:messages", 0, -1)]


def receive(ws: ClientConnection, count: int) -> list[dict]:
    """The next ``count`` message frames (acknowledging none)."""
    frames = []
    while len(frames) < count:
        frame = recv_json(ws)
        if frame["type"] == "message":
            frames.append(frame)
    return frames


def payloads(frames: list[dict]) -> list[str]:
    return [f["payload"] for f in frames]
