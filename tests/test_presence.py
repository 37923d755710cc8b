"""The cluster as one node sees it at each point of its stream
(redmessenger/presence.py): pure logic, fed the events the Lua scripts
publish. The real thing runs in tests/test_cluster.py."""

from __future__ import annotations

from redmessenger.presence import ClusterView, partition_of


def view(owner: str = "me", held: bool = False, storer: str | None = "other") -> tuple:
    calls: list = []
    v = ClusterView(owner, 1)
    if held:
        v.held.add(0)
        v.storers[0] = owner
    else:
        v.storers[0] = storer
    v.outbid = lambda uid, elsewhere: calls.append(("outbid", uid, elsewhere))
    v.evicted = lambda socket: calls.append(("evicted", socket))
    v.left = lambda uid, socket: calls.append(("left", uid, socket))
    v.fence = lambda uid, socket: calls.append(("fence", uid, socket))
    v.taken_from_us = lambda k: calls.append(("taken", k))
    return v, calls


def join(sock: str, seq: int, evicted: str = "-", *after: tuple[str, int]) -> bytes:
    flat = " ".join(f"{s} {q}" for s, q in after)
    return f"J {sock} {seq} {evicted} {flat}".encode()


def test_a_join_elsewhere_waits_for_the_storers_fence() -> None:
    v, _ = view()
    ready = v.joining("u", "me:1")
    v.recorded("me:1", [])
    assert "u" not in v.mine
    v.heard_presence("u", join("me:1", 5, "-", ("me:1", 5)))
    assert ("u" in v.mine) and not ready.called  # delivers, drains later
    v.heard_presence("u", b"F me:1")
    assert ready.called


def test_a_join_waits_for_the_nodes_of_sockets_that_just_left() -> None:
    """What another node heard for the user before its socket left may not
    be stored yet: the drain waits until that node says it is (``G``)."""
    v, _ = view(held=True, storer="me")
    ready = v.joining("u", "me:2", local=True)
    other = v.joining("w", "me:3", local=True)
    v.recorded("me:3", ["x:2"])
    v.heard_presence("u", b"G x:1")  # before the join's reply: remembered
    v.recorded("me:2", ["x:1", "x:2", "me:1"])  # its own need no waiting
    assert not ready.called
    v.heard_presence("u", b"G x:2")
    assert ready.called
    assert not other.called  # another user's socket of that name is not this one's
    v.heard_presence("w", b"G x:2")
    assert other.called


def test_a_join_says_which_nodes_it_still_waits_for() -> None:
    """Membership checks their leases: it gives up only on dead ones."""
    v, _ = view()
    v.joining("u", "me:1")
    assert v.awaited("me:1") == {("me", None), ("other", None)}  # its reply, the fence
    v.recorded("me:1", ["x:1", "y:1"])
    v.heard_presence("u", join("me:1", 5, "-", ("me:1", 5)))
    assert v.awaited("me:1") == {("other", None), ("x", "x:1"), ("y", "y:1")}
    v.heard_presence("u", b"F me:1")
    v.heard_presence("u", b"G x:1")
    assert v.awaited("me:1") == {("y", "y:1")}
    v.give_up("me:1")
    assert v.awaited("me:1") is None


def test_a_socket_gone_elsewhere_wakes_the_users_sockets_here() -> None:
    """What it held is back in the queue: drained here now."""
    v, _ = view(held=True, storer="me")
    woken: list[str] = []
    v.woken = woken.append
    v.joining("u", "me:1", local=True)
    v.recorded("me:1", [])
    v.heard_presence("u", join("me:1", 5, "-", ("x:1", 4), ("me:1", 5)))
    v.heard_presence("u", b"L x:1")
    v.heard_presence("u", b"G x:1")
    v.heard_presence("w", b"G x:2")  # no socket of w here
    assert woken == ["u"]


def test_a_join_is_ready_when_heard_if_this_node_stores_or_nobody_does() -> None:
    for held, storer in ((True, "me"), (False, None)):
        v, _ = view(held=held, storer=storer)
        ready = v.joining("u", "me:1")
        v.recorded("me:1", [])
        v.heard_presence("u", join("me:1", 1, "-", ("me:1", 1)))
        assert ready.called


def test_a_new_storer_releases_joins_it_has_in_its_snapshot() -> None:
    v, _ = view()
    ready = v.joining("u", "me:1")
    v.recorded("me:1", [])
    v.heard_presence("u", join("me:1", 1, "-", ("me:1", 1)))
    v.heard_cluster(b"E 0 third")
    assert ready.called


def test_other_nodes_sockets_are_tracked_and_the_newest_bubbles() -> None:
    v, calls = view()
    v.joining("u", "me:1")
    v.heard_presence("u", join("me:1", 3, "-", ("x:1", 2), ("me:1", 3)))
    assert ("u" in v.others) and calls == []  # ours is the newest
    v.heard_presence("u", join("x:2", 4, "-", ("x:1", 2), ("me:1", 3), ("x:2", 4)))
    assert calls == [("outbid", "u", True)]
    v.heard_presence("u", b"L x:2")
    assert calls[-1] == ("outbid", "u", False)
    v.heard_presence("u", b"L x:1")
    assert "u" not in v.others


def test_a_socket_pushed_out_by_a_join_elsewhere_is_evicted_here() -> None:
    v, calls = view()
    v.joining("u", "me:1")
    v.heard_presence("u", join("me:1", 1, "-", ("me:1", 1)))
    v.heard_presence("u", join("x:1", 2, "me:1", ("x:1", 2)))
    assert ("evicted", "me:1") in calls and ("left", "u", "me:1") in calls
    assert "u" not in v.mine


def test_a_storer_fences_each_join_from_another_node_and_follows_its_users() -> None:
    v, calls = view(held=True, storer="me")
    v.heard_presence("u", join("x:1", 1, "-", ("x:1", 1)))
    assert calls == [("fence", "u", "x:1")]
    assert ("u" in v.others)
    v.heard_presence("u", b"L x:1")
    assert "u" not in v.others


def test_a_taken_partition_starts_from_its_snapshot() -> None:
    v, _ = view()
    k, handed = v.took(b'0 2 {"u": ["x:1", "7"], "stale": {}}')
    assert (k, handed) == (0, True) and v.holds("anyone")
    assert v.others == {"u": {"x:1": 7}}


def test_a_partition_taken_from_this_node_is_said_so() -> None:
    """Offered, it is the others' from that point; not offered, the node
    checks in Redis whether it was taken (see membership)."""
    v, calls = view(held=True, storer="me")
    v.heard_cluster(b"E 0 other")
    assert calls == [("taken", 0)] and v.held == {0}
    v.offered.add(0)
    v.heard_cluster(b"E 0 other")
    assert not v.held


def test_partitions_split_user_ids_by_their_last_byte() -> None:
    assert [partition_of(uid, 4) for uid in ("a0", "a1", "a2", "a3", "a4")] == [0, 1, 2, 3, 0]


class _Deliveries:
    """The dispatcher, as the router sees it: what it is handed."""

    def __init__(self) -> None:
        from redmessenger.envelope import MessageIds
        from redmessenger.stats import Stats

        self.stats, self.ids, self.handed = Stats(), MessageIds(), []

    def deliver(self, uids, envelope) -> None:
        self.handed.append((list(uids), envelope.payload))

    def has_sockets(self, uid: str) -> bool:
        return False


def test_a_partition_handed_over_is_decided_only_once_its_giver_is_done() -> None:
    """What the giver decided before the taker's point must be in Redis
    before the taker's first store (or a user's queue loses its order): the
    taker holds its stream from that point until the giver says ``D``."""
    from redmessenger.keys import Namespace
    from redmessenger.routing import Router

    v, _ = view()
    deliveries = _Deliveries()
    router = Router(deliveries, None, Namespace(), view=v)
    router.received_message(b"rm.node.me", b'S 0 2 {}')
    router.received_message(b"rm.users.u", b"after", b"rm.users.*")
    assert deliveries.handed == []  # held
    router.received_message(b"rm.cluster", b"D 0 giver")
    assert deliveries.handed == [(["u"], b"after")]


def test_a_partition_taken_from_a_dead_node_is_decided_at_once() -> None:
    from redmessenger.keys import Namespace
    from redmessenger.routing import Router

    v, _ = view()
    deliveries = _Deliveries()
    router = Router(deliveries, None, Namespace(), view=v)
    router.received_message(b"rm.node.me", b'S 0 1 {}')
    router.received_message(b"rm.users.u", b"after", b"rm.users.*")
    assert deliveries.handed == [(["u"], b"after")]
