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

    # Keys (colons).
    def queue(self, uid: str) -> str:
        return f"{self.prefix}:users:{uid}:messages"

    @property
    def queue_affixes(self) -> tuple[str, str]:
        """What comes before and after a uid in its queue's key, for a script
        that makes the keys of the uids it reads (a group's members). Cut
        from ``queue()`` itself (at the last ``*``: none follows the uid),
        so the layout is written once."""
        head, _, tail = self.queue("*").rpartition("*")
        return head, tail

    def token(self, uid: str) -> str:
        return f"{self.prefix}:users:{uid}:key"

    def members(self, gid: str) -> str:
        return f"{self.prefix}:groups:{gid}:members"

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

    def process(self, owner: str) -> str:
        """A process' heartbeat: while it exists, the process' claims are
        its own business."""
        return self.process_prefix + owner

    @property
    def process_prefix(self) -> str:
        return f"{self.prefix}:procs:"

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
