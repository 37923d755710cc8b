"""A Redis master, its replica and three Sentinels, all real redis-server
processes (a Sentinel is the same binary, ``redis-server conf --sentinel``)
on free ports of 127.0.0.1, each stopped when the test ends."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from network import HOST, pick_free_port
from redisservers import START_TIMEOUT, RedisServerProcess, spawned_redis
from resp import RedisReplyError, RespClient, decoded

MASTER = "themaster"
#: How long a master may be silent before the Sentinels count it as down.
DOWN_AFTER_MS = 1000


class Sentinels:
    """Start with ``with``: the master, its replica and three Sentinels,
    ready once the Sentinels know each other and the replica."""

    def __init__(self, tmp_path: Path, sentinels: int = 3, password: str | None = None,
                 sentinel_password: str | None = None, *,
                 data_config: dict[str, str] | None = None,
                 sentinel_config: Callable[[int, int], str] | None = None) -> None:
        """``data_config``: directives for the master and the replica (set
        with CONFIG SET once they run); ``sentinel_config``: a Sentinel's
        configuration file for its port and the master's, in place of this
        class's own."""
        self.tmp_path = tmp_path
        self.data_config = data_config or {}
        self.sentinel_config = sentinel_config
        #: The master's and replica's password, and the Sentinels' own.
        self.password = password
        self.sentinel_password = sentinel_password
        self.master = RedisServerProcess(tmp_path / "master", appendonly=True)
        self.replica = RedisServerProcess(tmp_path / "replica", appendonly=True)
        self.count = sentinels
        self.ports: list[int] = []
        self._processes: list = []

    def url(self, *ports: int) -> str:
        """``redis+sentinel://`` to these Sentinels (default: all)."""
        where = ",".join(f"{HOST}:{port}" for port in ports or self.ports)
        auth = f":{self.password}@" if self.password else ""
        query = f"?sentinel_password={self.sentinel_password}" if self.sentinel_password else ""
        return f"redis+sentinel://{auth}{where}/{MASTER}/0{query}"

    def __enter__(self) -> Sentinels:
        # Not the 5 s a master waits by default for more replicas before a
        # diskless full sync: the replica has the data at once.
        for server in (self.master, self.replica):
            server.extra_args = ["--repl-diskless-sync-delay", "0"]
            server.start()  # without a password: the fixture's readiness check has none
            for directive, value in self.data_config.items():
                server.command("CONFIG", "SET", directive, value)
            if self.password:
                server.command("CONFIG", "SET", "masterauth", self.password)
        self.replica.command("REPLICAOF", HOST, self.master.port)
        if self.password:
            for server in (self.master, self.replica):
                server.command("CONFIG", "SET", "requirepass", self.password)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while "master_link_status:up" not in self.data(self.replica.port).command(
                    "INFO", "replication", decode=True):
                assert time.monotonic() < deadline, "the replica did not sync"
                time.sleep(0.05)
            for _ in range(self.count):
                self.ports.append(self.start_sentinel(self.master.port))
            self.wait_settled()
        except BaseException:
            self.__exit__()
            raise
        return self

    def bring_back(self, server: RedisServerProcess) -> None:
        """Start ``server`` again (the old master, after ``kill_master``: the
        Sentinels make it the new master's replica), configured as at first
        (what CONFIG SET set is gone with the process)."""
        server.start()
        for directive, value in self.data_config.items():
            server.command("CONFIG", "SET", directive, value)
        if self.password:
            server.command("CONFIG", "SET", "masterauth", self.password)
            server.command("CONFIG", "SET", "requirepass", self.password)

    def start_sentinel(self, master_port: int) -> int:
        """One more Sentinel watching a master at ``master_port``: its port."""
        port = pick_free_port()
        conf = self.tmp_path / f"sentinel-{port}.conf"
        if self.sentinel_config is not None:
            conf.write_text(self.sentinel_config(port, master_port)
                            + f"\nbind {HOST}\ndaemonize no\ndir {self.tmp_path}\n")
        else:
            conf.write_text(
                f"port {port}\nbind {HOST}\ndaemonize no\ndir {self.tmp_path}\n"
                f"sentinel monitor {MASTER} {HOST} {master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
                + (f"sentinel auth-pass {MASTER} {self.password}\n" if self.password else "")
                + (f"requirepass {self.sentinel_password}\n" if self.sentinel_password
                   else ""))
        client = self._client(port, timeout=1.0)
        spawned = spawned_redis([self.master.executable, str(conf), "--sentinel"],
                                lambda: client.command("PING"))
        spawned.__enter__()
        self._processes.append(spawned)
        return port

    def _client(self, port: int, timeout: float) -> RespClient:
        return _Authenticated(port, self.sentinel_password, timeout) \
            if self.sentinel_password else RespClient(port, timeout=timeout)

    def sentinel(self, index: int = 0) -> RespClient:
        return self._client(self.ports[index], timeout=2.0)

    def data(self, port: int) -> RespClient:
        """A client of the master or replica at ``port``."""
        return _Authenticated(port, self.password, 5.0) if self.password else RespClient(port)

    def where_master(self) -> int:
        """The master's port as the first Sentinel says."""
        host, port = self.sentinel().command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER,
                                             decode=True)
        return int(port)

    def wait_settled(self) -> None:
        """Until every Sentinel knows the others and the replica, so that
        a failover can happen."""
        deadline = time.monotonic() + 4 * START_TIMEOUT
        while True:
            ready = 0
            for index in range(len(self.ports)):
                master = _fields(self.sentinel(index).command("SENTINEL", "MASTER", MASTER,
                                                              decode=True))
                if int(master["num-other-sentinels"]) == len(self.ports) - 1 and \
                        int(master["num-slaves"]) == 1:
                    ready += 1
            if ready == len(self.ports):
                return
            assert time.monotonic() < deadline, "the Sentinels did not settle"
            time.sleep(0.1)

    def wait_replicated(self) -> None:
        """Until the replica has every write the master took."""
        assert self.data(self.master.port).command("WAIT", 1, 5000) == 1

    def kill_master(self) -> int:
        """SIGKILL the master; once the Sentinels have promoted the replica,
        its port."""
        self.master.stop(kill=True)
        return self.wait_promoted()

    def wait_promoted(self) -> int:
        """Until the Sentinels name another master than ``self.master``: its
        port."""
        deadline = time.monotonic() + 6 * START_TIMEOUT
        while self.where_master() == self.master.port:
            assert time.monotonic() < deadline, "the Sentinels did not fail over"
            time.sleep(0.1)
        return self.where_master()

    def __exit__(self, *exc_info: object) -> None:
        for spawned in reversed(self._processes):
            try:
                spawned.__exit__(None, None, None)
            except subprocess.SubprocessError:
                pass
        self._processes.clear()
        self.replica.stop()
        self.master.stop()


class TheMaster:
    """Whichever server the Sentinels name as master, with a fixture
    server's ``url``, ``client()`` and ``command()``: what a test that
    lives through a failover publishes to and checks."""

    def __init__(self, setup: Sentinels) -> None:
        self.setup = setup
        self.url = setup.url()

    def client(self) -> RespClient:
        return self.setup.data(self.setup.where_master())

    def command(self, *args, decode: bool = False):
        return self.client().command(*args, decode=decode)


def _fields(flat: list) -> dict:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class _Authenticated(RespClient):
    """A RespClient that sends AUTH first (in the same connection)."""

    def __init__(self, port: int, password: str, timeout: float) -> None:
        super().__init__(port, timeout=timeout)
        self.password = password

    def command(self, *args, decode: bool = False):
        auth, reply = self.pipeline([("AUTH", self.password), args])
        if isinstance(reply, RedisReplyError):
            raise reply
        return decoded(reply) if decode else reply
