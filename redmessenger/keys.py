"""The Redis names RedMessenger reads and writes, in one place, so that the
prefix (``rm`` by default) is applied the same way everywhere."""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class Namespace:
    prefix: str = "rm"

    # Channels (dots): the names applications PUBLISH to (docs/protocol.rst).
    def user_channel(self, uid: str) -> str:
        return f"{self.prefix}.users.{uid}"

    def group_channel(self, gid: str) -> str:
        return f"{self.prefix}.groups.{gid}"

    @property
    def patterns(self) -> tuple[bytes, bytes]:
        """What the subscriber ``PSUBSCRIBE``s to."""
        return (self._escape(self.prefix).encode() + b".users.*",
                self._escape(self.prefix).encode() + b".groups.*")

    def presence_channel(self, uid: str) -> str:
        """Where a user's sockets joining and leaving are heard, cluster-wide."""
        return f"{self.prefix}.presence.{uid}"

    @property
    def cluster_channel(self) -> str:
        """Where nodes hear which node decides for which storer partition."""
        return f"{self.prefix}.cluster"

    def node_channel(self, owner: str) -> str:
        """What one node alone hears (the presence it takes over)."""
        return f"{self.prefix}.node.{owner}"

    def partition_patterns(self, partition: int, partitions: int) -> tuple[bytes, bytes]:
        """What the storer of one partition ``PSUBSCRIBE``s to: the user and
        presence channels whose last byte is ``partition`` modulo
        ``partitions`` (the partition of a user id, see ``partition``)."""
        if partitions == 1:
            tail = b"*"
        else:
            tail = b"*[" + b"".join(b"\\" + bytes([b]) for b in range(256)
                                    if b % partitions == partition) + b"]"
        head = self._escape(self.prefix).encode()
        return head + b".users." + tail, head + b".presence." + tail

    @property
    def groups_pattern(self) -> bytes:
        return self._escape(self.prefix).encode() + b".groups.*"

    def parse_channel(self, channel: str) -> tuple[str, str] | None:
        """``("users", uid)`` or ``("groups", gid)``; ``None`` for a channel
        that is not ours. Everything after the kind is the id, dots included."""
        for kind, head in self._heads:
            if channel.startswith(head) and len(channel) > len(head):
                return kind, channel[len(head):]
        return None

    @functools.cached_property
    def _heads(self) -> tuple[tuple[str, str], ...]:
        return tuple((kind, f"{self.prefix}.{kind}.") for kind in ("users", "groups"))

    def parse_control(self, channel: str) -> tuple[str, str] | None:
        """``("presence", uid)``, ``("cluster", "")`` or ``("node", owner)``
        for RedMessenger's own channels; ``None`` for any other."""
        if channel.startswith(self._presence_head) and len(channel) > len(self._presence_head):
            return "presence", channel[len(self._presence_head):]
        if channel == self.cluster_channel:
            return "cluster", ""
        if channel.startswith(self._node_head):
            return "node", channel[len(self._node_head):]
        return None

    @functools.cached_property
    def _presence_head(self) -> str:
        return f"{self.prefix}.presence."

    @functools.cached_property
    def _node_head(self) -> str:
        return f"{self.prefix}.node."

    # Keys (colons).
    def queue(self, uid: str) -> str:
        return f"{self.prefix}:users:{uid}:messages"

    @property
    def queue_affixes(self) -> tuple[str, str]:
        """What comes before and after a uid in its queue's key, for a script
        that makes the keys of the uids it reads (a group's members). Cut
        from ``queue()`` itself (at the last ``*``: none follows the uid),
        so the layout is written once."""
        return _affixes(self.queue("*"))

    def token(self, uid: str) -> str:
        return f"{self.prefix}:users:{uid}:key"

    def members(self, gid: str) -> str:
        return f"{self.prefix}:groups:{gid}:members"

    @property
    def members_affixes(self) -> tuple[str, str]:
        return _affixes(self.members("*"))

    def inbox_mark(self, uid: str) -> str:
        """The id of the last inbox entry stored for the user: an entry read
        twice is stored once."""
        return f"{self.prefix}:users:{uid}:inbox"

    @property
    def inbox_mark_affixes(self) -> tuple[str, str]:
        return _affixes(self.inbox_mark("*"))

    @property
    def delivery_affixes(self) -> tuple[str, ...]:
        """What a script that stores and wakes (lua/shared/deliver.lua) makes
        a user's keys and channel from: before and after a uid in its
        queue's key, its presence key and its presence channel."""
        return (*self.queue_affixes, *self.presence_affixes, *self.presence_channel_affixes)

    def claim(self, uid: str, owner: str) -> str:
        """Where a drain keeps what it took until its reply has arrived, so a
        reply lost with the connection can be asked for again."""
        return self.claim_head(uid) + owner

    def claim_head(self, uid: str) -> str:
        """What every claim key of the user starts with: scripts read the
        owner from what follows."""
        return f"{self.prefix}:users:{uid}:taking:"

    def claims(self, uid: str) -> str:
        """The set of a user's claims, so those of a dead process are found."""
        return f"{self.prefix}:users:{uid}:claims"

    @property
    def claims_affixes(self) -> tuple[str, str]:
        return _affixes(self.claims("*"))

    @property
    def claim_head_affixes(self) -> tuple[str, str]:
        return _affixes(self.claim_head("*"))

    def process(self, owner: str) -> str:
        """A process' heartbeat: while it exists, the process' claims are
        its own business."""
        return self.process_prefix + owner

    @property
    def process_prefix(self) -> str:
        return f"{self.prefix}:procs:"

    # The cluster: which sockets every user has, on which node, and who
    # stores for whom (docs/scaling.rst).
    def presence(self, uid: str) -> str:
        """The user's sockets, cluster-wide: a zset of socket ids
        (``<owner>:<n>``) scored by join order."""
        return f"{self.prefix}:presence:{uid}"

    def leaving(self, uid: str) -> str:
        """The user's sockets that left, while their nodes may still store
        what they heard for it before (lua/leave.lua, lua/gone.lua)."""
        return f"{self.prefix}:leaving:{uid}"

    @property
    def presence_affixes(self) -> tuple[str, str]:
        """What comes before and after a uid in its presence key."""
        return _affixes(self.presence("*"))

    @property
    def presence_channel_affixes(self) -> tuple[str, str]:
        return _affixes(self.presence_channel("*"))

    @property
    def present(self) -> str:
        """The users with at least one socket somewhere."""
        return f"{self.prefix}:cluster:present"

    @property
    def joins(self) -> str:
        """The join counter: a socket's place in join order, cluster-wide."""
        return f"{self.prefix}:cluster:joins"

    @property
    def nodes(self) -> str:
        """The nodes that have had sockets and were not reaped yet."""
        return f"{self.prefix}:cluster:nodes"

    def node_info(self, owner: str) -> str:
        """What a live node says of itself (JSON: its sockets, users,
        partitions...), for ``redmessenger status``; it expires with its
        lease."""
        return f"{self.prefix}:cluster:nodes:{owner}:info"

    def node_users(self, owner: str) -> str:
        """The users a node has had sockets of: what its reaper looks at."""
        return f"{self.prefix}:cluster:nodes:{owner}:users"

    def storer(self, partition: int) -> str:
        """Which node stores for a partition's absent users: its id."""
        return f"{self.prefix}:cluster:storers:{partition}"

    @property
    def partitions(self) -> str:
        """How many storer partitions the cluster has: set by its first node."""
        return f"{self.prefix}:cluster:partitions"

    @property
    def inbox(self) -> str:
        """The stream applications XADD to (``--inbox``)."""
        return f"{self.prefix}:inbox"

    @property
    def dead(self) -> str:
        """Messages Redis refused for good, as JSON entries (``redmessenger
        dead``)."""
        return f"{self.prefix}:dead"

    def dead_parts(self, name: str) -> str:
        """A list holding the envelope of a big dead letter, in parts."""
        return f"{self.prefix}:dead:parts:{name}"

    @property
    def dead_dropped(self) -> str:
        """How many dead letters ``--dead-max`` has dropped."""
        return f"{self.prefix}:dead:dropped"

    def uid_of_claims(self, key: str) -> str:
        return key[len(f"{self.prefix}:users:"):-len(":claims")]

    @property
    def all_processes(self) -> str:
        """A SCAN pattern for every process' heartbeat."""
        return f"{self._escape(self.prefix)}:procs:*"

    @property
    def all_claims(self) -> str:
        """A SCAN pattern for every user's set of claims."""
        return f"{self._escape(self.prefix)}:users:*:claims"

    @staticmethod
    def _escape(text: str) -> str:
        """Glob-escape the prefix so ``PSUBSCRIBE`` matches it literally."""
        return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _affixes(key: str) -> tuple[str, str]:
    """What comes before and after the ``*`` a key was made with: a script
    given them makes the key of any id, and the layout is written once."""
    head, _, tail = key.rpartition("*")
    return head, tail
