"""``/metrics`` in Prometheus' text format, read from ``Stats`` at scrape
time (one registry per service, so several can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .stats import LATENCY_BUCKETS

_COUNTERS = (
    ("messages_received", "received", "Messages received from Redis pub/sub"),
    ("messages_delivered_live", "delivered_live", "Message deliveries to online users"),
    ("messages_stored", "stored", "Messages stored for offline users (one per user)"),
    ("messages_drained", "drained", "Stored messages sent to users who connected"),
    ("messages_recommitted", "recommitted", "Undelivered messages put back into a queue"),
    ("messages_acked", "acked", "Messages acknowledged by ack-mode clients"),
    ("messages_redelivered", "redelivered",
     "Unacknowledged messages sent again to another socket of the user"),
    ("ping_timeouts", "ping_timeouts", "Sockets dropped for not answering a ping in time"),
    ("connections_refused", "connections_refused",
     "Connections closed at their accept: --max-connections or "
     "--max-connections-per-address reached"),
    ("handshake_timeouts", "handshake_timeouts",
     "Connections closed for not becoming a WebSocket within --handshake-timeout"),
    ("dead_letters", "dead_letters",
     "Messages Redis refused for good, kept in <prefix>:dead instead of stored"),
)


class _Collector:
    def __init__(self, service) -> None:
        self._service = service

    def collect(self):
        service = self._service
        stats = service.dispatcher.stats
        yield _node_info(service)
        yield _gauge("connections", "Open client connections: WebSockets and event streams",
                     len(service.factory.connections))
        yield _gauge("event_streams", "Open Server-Sent Events streams (/events)",
                     len(service.streams))
        yield _gauge("connections_handshaking",
                     "Connections accepted that are not WebSockets (yet)",
                     service.handshaking)
        yield _gauge("users_online", "Users with at least one identified socket",
                     service.dispatcher.users)
        for name, attribute, doc in _COUNTERS:
            yield CounterMetricFamily(f"redmessenger_{name}", doc, value=getattr(stats, attribute))
        closed = CounterMetricFamily("redmessenger_sockets_closed",
                                     "Sockets closed by RedMessenger, by close code",
                                     labels=["code"])
        for code, count in sorted(stats.closed_by_code.items()):
            closed.add_metric([str(code)], count)
        yield closed
        reconnects = CounterMetricFamily("redmessenger_redis_reconnects",
                                         "Redis connections re-established",
                                         labels=["connection"])
        reconnects.add_metric(["commands"], service.redis.reconnects)
        reconnects.add_metric(["subscriber"], service.subscriber.reconnects)
        yield reconnects
        yield _gauge("redis_connected", "1 while the command connection is up",
                     int(service.redis.connected))
        yield _gauge("redis_subscribed", "1 while the pub/sub subscription is up",
                     int(service.subscriber.subscribed))
        yield _gauge("redis_pending_commands", "Redis commands not answered yet",
                     service.redis.pending)
        yield _gauge("redis_pending_bytes", "Bytes held in Redis commands not answered yet",
                     service.redis.pending_bytes)
        yield _gauge("redis_writable", "1 while Redis takes writes; 0 while it is away or "
                     "refuses them (OOM, READONLY...) and they are held and retried",
                     int(service.redis.writable))
        yield _gauge("redis_overloaded", "1 while --max-pending-bytes is exceeded: hellos get "
                     "1013 and the subscriber is paused", int(service.redis.overloaded))
        yield _gauge("redis_replicas_late", "1 once fewer replicas than "
                     "--redis-replicas-ack have had our writes for 1 s (they are waited "
                     "for again, not given up)", int(service.redis.replicas_late))
        yield _gauge("redis_unreplicated_commands", "Stores, claims and acks Redis took "
                     "that wait for --redis-replicas-ack replicas", service.redis.unreplicated)
        yield CounterMetricFamily("redmessenger_redis_replica_wait_timeouts",
                                  "WAIT calls that timed out short of --redis-replicas-ack "
                                  "replicas", value=service.redis.replica_timeouts)
        yield _gauge("inbox_reading", "0 while error replies keep the inbox reader from "
                     "reading", int(service.inbox is None or service.inbox.reading))
        view = service.membership.view
        yield _gauge("storer_partitions_held", "Storer partitions this node stores for: it "
                     "hears their users' messages and stores those for users with no socket",
                     len(view.held))
        yield _gauge("storer_partitions", "Storer partitions of the cluster (set by its "
                     "first node)", view.partitions)
        yield _gauge("lease_renewal_gap_max_seconds", "The longest time between two "
                     "renewals of this node's lease; at 3 s the others count it as dead",
                     service.membership.longest_renewal_gap)
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), stats.latency_counts,
                                strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "redmessenger_delivery_latency_seconds",
            "From a PUBLISH reaching RedMessenger to its frame being written to a socket",
            buckets=buckets, sum_value=stats.latency_sum)


def _node_info(service) -> GaugeMetricFamily:
    """Which node this is: its labels tell the nodes of a cluster (and the
    workers of ``--workers``) apart, as ``redmessenger status`` lists them."""
    about = service.describe()
    info = GaugeMetricFamily("redmessenger_node_info",
                             "Always 1; the labels say which node answers",
                             labels=["node", "host", "pid", "version"])
    info.add_metric([about["node"], about["host"], str(about["pid"]), about["version"]], 1)
    return info


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"redmessenger_{name}", doc, value=value)


def metrics_resource(service):
    # prometheus_client.twisted imports the global reactor: only once serving.
    from prometheus_client.twisted import MetricsResource

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(service))
    return MetricsResource(registry=registry)
