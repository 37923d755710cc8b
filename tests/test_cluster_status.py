"""Watching a cluster: ``redmessenger status`` lists the live nodes from
Redis, and each node's ``/health`` and ``/metrics`` say which node answers.
Real ``twistd`` nodes (tests/cluster.py), users on several of them, and the
command line run as a user runs it."""

from __future__ import annotations

import json
import re
import signal
import time
from contextlib import ExitStack

from redmessenger.membership import LEASE_EVERY, LEASE_TTL, TICK_EVERY

from cluster import Cluster, Node
from commandline import cli, ok
from deployed import START_TIMEOUT, TwistdProcess, wait_for
from docsamples import http_get
from network import HOST, pick_free_port

#: Seconds one ``redmessenger status`` may take, on top of what it waits
#: for: it starts a Python with Twisted.
RUN = 3.0


def health(node: Node) -> dict:
    status, _, body = http_get(f"http://{HOST}:{node.port}/health")
    assert status == 200, body
    return json.loads(body)


def metrics(node: Node) -> str:
    status, _, body = http_get(f"http://{HOST}:{node.port}/metrics")
    assert status == 200, body
    return body.decode()


def status(redis) -> dict:
    """``redmessenger status --json``: the live nodes, by id."""
    result = cli(redis.url, "status", "--json")
    assert result.returncode in (0, 1), result
    doc = json.loads(result.stdout)
    doc["nodes"] = {n["node"]: n for n in doc["nodes"]}
    return doc


def counts(doc: dict) -> dict[str, tuple[int, int]]:
    return {node: (n["connections"], n["users_online"]) for node, n in doc["nodes"].items()}


def test_status_lists_each_live_node_with_its_sockets_users_and_partitions(
        tmp_path, redis) -> None:
    with Cluster(tmp_path, redis, "--partitions", "3") as cluster:
        nodes = cluster.start(3)
        ids = [health(node)["node"] for node in nodes]
        assert len(set(ids)) == 3 and all(re.fullmatch("[0-9a-f]{12}", i) for i in ids)
        for node, node_id in zip(nodes, ids, strict=True):
            info = re.search(r"^redmessenger_node_info\{(.*)\} 1\.0$", metrics(node),
                             re.MULTILINE)
            assert f'node="{node_id}"' in info.group(1)

        with ExitStack() as first_node_users:
            first_node_users.enter_context(nodes[0].user("a"))
            first_node_users.enter_context(nodes[0].user("b"))
            with nodes[1].user("c"), nodes[1].user("c"):
                expected = {ids[0]: (2, 2), ids[1]: (2, 1), ids[2]: (0, 0)}

                def settled() -> dict | None:
                    """Each node says its counts every second, and the first
                    one, which took every partition, hands the others their
                    share, one a second."""
                    doc = status(redis)
                    shares = [len(n["partitions"]) for n in doc["nodes"].values()]
                    return counts(doc) == expected and shares == [1, 1, 1] and doc

                doc = wait_for(settled, f"status to show {expected}, a partition each")
                held = [doc["nodes"][i]["partitions"] for i in ids]
                assert sorted(k for p in held for k in p) == [0, 1, 2], held
                assert (doc["partitions"], doc["unheld"]) == (3, [])
                assert (doc["connections"], doc["users_online"]) == (4, 3)
                for node, node_id, partitions in zip(nodes, ids, held, strict=True):
                    n = doc["nodes"][node_id]
                    assert n["listening"] == f"{HOST}:{node.port}"
                    assert n["pid"] == node.twistd.pid and n["worker"] is None
                    held_here = rf"^redmessenger_storer_partitions_held {len(partitions)}\.0$"
                    assert re.search(held_here, metrics(node), re.MULTILINE)

                table = ok(cli(redis.url, "status")).splitlines()
                assert table[0].split() == ["NODE", "HOST", "PID", "WORKER", "LISTENING",
                                            "SOCKETS", "USERS", "PARTITIONS", "VERSION"]
                rows = {line.split()[0]: line.split() for line in table[1:4]}
                for node, node_id in zip(nodes, ids, strict=True):
                    assert rows[node_id][2:7] == [str(node.twistd.pid), "-",
                                                  f"{HOST}:{node.port}",
                                                  *map(str, expected[node_id])]
                assert table[4:] == ["3 nodes live: 4 sockets, 3 users online; "
                                     "3 storer partitions, each held by a live node."]

                # The first node dies with its users and its partition: it is
                # gone from the list once its lease has expired, and its
                # partition is taken over by another within a tick more.
                nodes[0].kill()
                wait_for(lambda: ids[0] not in status(redis)["nodes"],
                         "the killed node to leave the list", LEASE_TTL + RUN)
                doc = wait_for(lambda: (d := status(redis))["unheld"] == [] and d,
                               "its partitions to be taken over", LEASE_TTL + TICK_EVERY + RUN)
                assert counts(doc) == {ids[1]: (2, 1), ids[2]: (0, 0)}
                assert sorted(k for n in doc["nodes"].values() for k in n["partitions"]) == [
                    0, 1, 2]


def test_a_node_says_how_close_a_stall_brought_it_to_losing_its_lease(
        tmp_path, redis) -> None:
    """A node stalled (SIGSTOP) for most of its lease warns once it runs
    again, and its metrics show the longest gap between renewals. Alone, it
    keeps (or takes back) its lease: nothing was taken from it."""
    stall = LEASE_TTL - LEASE_EVERY + 0.2
    with Cluster(tmp_path, redis) as cluster:
        [node] = cluster.start(1)
        gap = re.compile(r"^redmessenger_lease_renewal_gap_max_seconds (\S+)$", re.MULTILINE)

        def longest() -> float:
            return float(gap.search(metrics(node)).group(1))

        wait_for(lambda: longest() > 0, "a second renewal")
        assert longest() < stall
        node.twistd.process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(stall)  # the stall itself, not a wait for an event
        finally:
            node.twistd.process.send_signal(signal.SIGCONT)
        wait_for(lambda: longest() >= stall, "the renewal after the stall", START_TIMEOUT,
                 node.twistd.alive)
        assert "This node's lease was renewed" in node.log()
        node.twistd.alive()


def test_status_exits_1_once_the_last_node_is_gone(tmp_path, redis) -> None:
    with Cluster(tmp_path, redis) as cluster:
        [node] = cluster.start(1)
        node_id = health(node)["node"]
        wait_for(lambda: node_id in status(redis)["nodes"], "the node to be listed")
        node.stop()
        result = cli(redis.url, "status")
        assert result.returncode == 1, result
        assert "no RedMessenger node is live" in result.stderr


def test_status_lists_each_worker_of_one_command(tmp_path, redis) -> None:
    """``--workers 2``: two nodes on one port, told apart by their worker."""
    port = pick_free_port()
    args = ["-n", "--pidfile=", "redmessenger", "--workers", "2", "--port",
            f"tcp:{port}:interface={HOST}", "--redis", redis.url, "--auth", "off"]
    with TwistdProcess(args, tmp_path, tmp_path / "workers.log") as twistd:
        def described() -> dict | None:
            """Both listed, each once it has said what it is (a second after
            its start; until then, only its lease says where it runs)."""
            doc = status(redis)
            nodes = doc["nodes"].values()
            return len(nodes) == 2 and all(n["version"] for n in nodes) and doc

        doc = wait_for(described, "both workers to be listed", START_TIMEOUT, twistd.alive)
        nodes = doc["nodes"].values()
        assert sorted(n["worker"] for n in nodes) == [1, 2]
        assert {n["listening"] for n in nodes} == {f"{HOST}:{port}"}
        assert len({n["pid"] for n in nodes} | {twistd.pid}) == 3  # not the supervisor's
