"""What a scenario checks (every message came, once, in order; nothing left
in Redis; a clean log) and measures (CPU, memory, rate), as its result."""

from __future__ import annotations

from . import wire
from .resp import Redis
from .stage import Stage


def spread(n: int, users: int) -> list[tuple[int, int]]:
    """(count, sum of seqs) of each user when message ``seq`` of ``n`` goes
    to user ``seq % users``."""
    result = []
    for index in range(users):
        count = (n - index + users - 1) // users if index < n else 0
        # index, index + users, ..., index + (count - 1) * users
        result.append((count, count * index + users * count * (count - 1) // 2))
    return result


def check_clients(checks: list[str], waited: dict, expected: dict[str, tuple[int, int]]) -> int:
    """Every user got exactly its messages, in order; the total received."""
    per_user = waited["per_user"]
    wrong = [uid for uid, want in expected.items() if tuple(per_user.get(uid, (0, 0))) != want]
    if wrong:
        uid = wrong[0]
        checks.append(
            f"{len(wrong)} users got other messages than were sent to them "
            f"(e.g. {uid}: count, seqsum {per_user.get(uid)} instead of "
            f"{list(expected[uid])})"
        )
    for key, what in (
        ("order_errors", "messages out of order or twice"),
        ("other_frames", "unexpected frames"),
        ("lost", "connections lost"),
    ):
        if waited.get(key):
            checks.append(f"{waited[key]} {what}")
    if waited.get("errors"):
        checks.append("client: " + "; ".join(waited["errors"][:3]))
    if not waited.get("reached"):
        checks.append("not everything arrived before the deadline")
    return sum(count for count, _ in per_user.values())


def check_published(checks: list[str], published: dict) -> None:
    if published["zero"]:
        checks.append(f"{published['zero']} PUBLISHes reached no subscriber")
    if published["errors"]:
        checks.append("PUBLISH errors: " + "; ".join(published["errors"]))


def check_rm_log(checks: list[str], stage: Stage) -> None:
    """No node of the stage logged an error or a traceback."""
    for node in stage.nodes:
        bad = [
            line
            for line in node.process.log().decode(errors="replace").splitlines()
            if "Traceback" in line or "#critical]" in line or "#error]" in line
        ]
        if bad:
            checks.append(
                f"{node.process.name} logged {len(bad)} errors, first: {bad[0][:200]}"
            )


def queue_contents(redis: Redis, uids: list[str]) -> dict[str, list[int]]:
    """The payload sequence numbers stored in each user's queue, in order."""
    import json

    found = {}
    for start in range(0, len(uids), 50):
        batch = uids[start : start + 50]
        replies = redis.pipeline([("LRANGE", wire.queue_key(uid), 0, -1) for uid in batch])
        for uid, entries in zip(batch, replies, strict=True):
            found[uid] = [wire.seq_of(json.loads(entry)["payload"].encode()) for entry in entries]
    return found


def leftovers(redis: Redis, uids: list[str]) -> int:
    """Entries still in these users' queues or drain claims."""
    total = sum(redis.pipeline([("LLEN", wire.queue_key(uid)) for uid in uids]))
    cursor = b"0"
    while True:
        cursor, keys = redis.command(
            "SCAN", cursor, "MATCH", f"{wire.PREFIX}:users:*:taking:*", "COUNT", 1000
        )
        for key in keys:
            total += redis.command("LLEN", key)
        if cursor == b"0":
            return total


def measure(snap0: dict, snap1: dict, seconds: float, subject: str) -> dict:
    """CPU, utilisation and run-queue wait of every process over the
    interval; those of ``subject`` (``node-a+node-b``: summed) apart."""
    cpu = {
        name: round(snap1["cpu"][name] - value, 3)
        for name, value in snap0["cpu"].items()
        if name in snap1["cpu"]
    }
    busy = {name: round(value / seconds, 3) if seconds > 0 else None for name, value in cpu.items()}
    waited = {
        name: round(snap1["waited"][name] - value, 3)
        for name, value in snap0["waited"].items()
        if name in snap1["waited"]
    }
    names = subject.split("+")
    subject_cpu = sum(cpu[name] for name in names) if all(n in cpu for n in names) else None
    subject_waited = (
        sum(waited[name] for name in names) if all(n in waited for n in names) else None
    )
    return {
        "cpu": cpu,
        "util": busy,
        "runqueue_wait": waited,
        "subject": subject,
        "subject_cpu": subject_cpu,
        "subject_util": (
            round(subject_cpu / seconds, 3) if subject_cpu is not None and seconds > 0 else None
        ),
        # The share of the interval the measured process was runnable
        # but another process had its CPU: a busy machine, not a slow
        # program.
        "subject_stolen": (
            round(subject_waited / seconds, 3)
            if subject_waited is not None and seconds > 0
            else None
        ),
    }


def result(
    name: str,
    *,
    sent: int,
    received: int,
    checks: list[str],
    seconds: float,
    count: int,
    unit: str,
    snap0: dict,
    snap1: dict,
    subject: str = "redmessenger",
    **extra,
) -> dict:
    rate = count / seconds if seconds > 0 else None
    found = {
        "name": name,
        "sent": sent,
        "received": received,
        "ok": sent == received and not checks,
        "checks": checks,
        "seconds": round(seconds, 4),
        "count": count,
        "rate": rate,
        "unit": unit,
        **measure(snap0, snap1, seconds, subject),
        **extra,
    }
    subject_cpu = found["subject_cpu"]
    found["subject_us_per_item"] = (
        subject_cpu / count * 1e6 if subject_cpu is not None and count else None
    )
    return found


def deadline(n: int, least_rate: float = 2000.0) -> float:
    """Seconds a scenario of n items may take before it is called failed:
    it must move at least ``least_rate`` of them a second."""
    return 30.0 + n / least_rate
