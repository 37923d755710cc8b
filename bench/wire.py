"""What the bench publishes and expects back, shared by every process.

A payload is ``<seq>:<stamp>:`` padded with ``x`` to a fixed size: ``seq``
numbers the message (clients check order and checksums with it) and
``stamp`` is ``time.monotonic_ns()`` when it was published (CLOCK_MONOTONIC
is one clock for every process of the machine), or 0 when unused.
"""

from __future__ import annotations

import json
import sys

PREFIX = "rm"
#: Bytes of every payload, unless the command line says otherwise.
PAYLOAD_SIZE = 64


def payload(seq: int, stamp: int, size: int) -> bytes:
    head = b"%d:%d:" % (seq, stamp)
    return head + b"x" * (size - len(head)) if size > len(head) else head


def seq_of(data: bytes) -> int:
    return int(data[:data.index(b":")])


def user_channel(uid: str) -> str:
    return f"{PREFIX}.users.{uid}"


def group_channel(gid: str) -> str:
    return f"{PREFIX}.groups.{gid}"


def queue_key(uid: str) -> str:
    return f"{PREFIX}:users:{uid}:messages"


def members_key(gid: str) -> str:
    return f"{PREFIX}:groups:{gid}:members"


def partitions_key() -> str:
    """How many storer partitions the cluster has (docs/scaling.rst)."""
    return f"{PREFIX}:cluster:partitions"


def storer_key(partition: int) -> str:
    """The id of the node that stores for a partition's offline users."""
    return f"{PREFIX}:cluster:storers:{partition}"


def lease_key(node: str) -> str:
    """A node's lease, whose value ends with the node's pid."""
    return f"{PREFIX}:procs:{node}"


def envelope(message_id: str, source: str, timestamp: int, data: bytes) -> bytes:
    """A stored message exactly as RedMessenger writes one (docs/protocol.rst)."""
    return json.dumps({"id": message_id, "source": source, "timestamp": timestamp,
                       "payload": data.decode()},
                      separators=(",", ":"), ensure_ascii=False).encode()


def emit(message: dict) -> None:
    """One event for the coordinator, as a JSON line on stdout."""
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


#: A stored envelope, as ``envelope()`` makes it, for ASCII payloads: the
#: fast way to fill a queue with a million of them.
ENVELOPE = b'{"id":"%s-%x","source":"%s","timestamp":%d,"payload":"%s"}'

#: RedMessenger's live message frame (redmessenger/envelope.py), field for field.
FRAME = (b'{"type":"message","id":"%s-%x","source":"%s","timestamp":%d,'
         b'"payload":"%s","bubble":true,"queued":false}')


def product_mismatches() -> list[str]:
    """Where RedMessenger's own envelope and frame have drifted from the
    bench's templates (the raw baseline would then send other frames than
    RedMessenger does, and filled queues would not be its envelopes)."""
    from redmessenger.envelope import Envelope, MessageIds
    from redmessenger.keys import Namespace

    boot, counter, timestamp = b"0123456789abcdef", 0x2A, 1795707550496
    source = user_channel("bench-u-0").encode()
    data = payload(7, 0, PAYLOAD_SIZE)
    envelope = Envelope(f"{boot.decode()}-{counter:x}", source.decode(), timestamp, data)
    found = []
    if envelope.frame(True) != FRAME % (boot, counter, source, timestamp, data):
        found.append("RedMessenger's live message frame differs from bench.wire.FRAME: "
                     "update FRAME so that raw-send-* sends the same frames")
    stored = ENVELOPE % (boot, counter, source, timestamp, data)
    if envelope.stored() != stored:
        found.append("RedMessenger's stored envelope differs from bench.wire.ENVELOPE: "
                     "update ENVELOPE so that drain fills queues with real envelopes")
    ns = Namespace(PREFIX)
    if (ns.partitions, ns.storer(0), ns.process("n")) != (
            partitions_key(), storer_key(0), lease_key("n")):
        found.append("RedMessenger's cluster keys differ from bench.wire's: update them, "
                     "or the cluster scenarios cannot tell which node stores")
    back = Envelope.from_stored(stored, source.decode(), MessageIds(), 0)
    if back.id != envelope.id or back.payload != data:
        found.append("RedMessenger does not read bench.wire.ENVELOPE as an envelope")
    return found
