"""HTTP beside the WebSocket, on the same port: ``/`` shows a small demo
page (a WebSocket upgrade of ``/`` is Autobahn's, see admission.py),
``/health`` says whether this process can deliver, ``/metrics`` speaks
Prometheus, and ``/client.js`` serves the browser client."""

from __future__ import annotations

import json
from importlib import resources

from twisted.web import pages
from twisted.web.resource import Resource
from twisted.web.server import Site

from ._version import __version__
from .admission import Admission, upgrade


class Health(Resource):
    """200 when Redis is connected, subscribed and takes writes, 503
    otherwise, so a load balancer sends users only where messages can reach
    them."""

    isLeaf = True

    def __init__(self, service, admission: Admission) -> None:
        super().__init__()
        self._service = service
        self._admission = admission

    def render_GET(self, request) -> bytes:
        service = self._service
        redis = service.redis
        connected = redis.connected
        subscribed = service.subscriber.subscribed
        inbox = service.inbox
        ok = subscribed and redis.writable and (inbox is None or inbox.reading)
        request.setResponseCode(200 if ok else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        report = {
            "status": "ok" if ok else "unavailable",
            "node": service.owner,  # which node of a cluster answers
            "redis": {"connected": connected, "subscribed": subscribed,
                      "writable": redis.writable, "refusal": redis.refusal},
            "connections": len(service.factory.connections),
            "handshaking": self._admission.handshaking,
            "users_online": service.dispatcher.users,
            "version": __version__,
        }
        if service.worker is not None:  # which of twistd --workers' processes answers
            report["worker"] = service.worker
        if redis.replicas:  # --redis-replicas-ack: late replicas slow stores, lose none
            report["redis"]["replicas"] = {"wanted": redis.replicas, "late": redis.replicas_late,
                                           "waiting": redis.unreplicated}
        if inbox is not None:
            report["inbox"] = {"reading": inbox.reading, "error": inbox.failing}
        return json.dumps(report).encode()


class Root(Resource):
    """``/``: the demo page; a WebSocket upgrade that reaches twisted.web
    (after other requests on its connection) still goes to RedMessenger."""

    def __init__(self, page: Resource) -> None:
        super().__init__()
        self._page = page

    def getChild(self, path: bytes, request):
        return self if path == b"" else pages.notFound()

    def render(self, request):
        if (request.getHeader(b"upgrade") or b"").lower() == b"websocket":
            return upgrade(request)
        return self._page.render(request)


class Static(Resource):
    """One file shipped in the package, read once."""

    isLeaf = True

    def __init__(self, name: str, content_type: str) -> None:
        super().__init__()
        self._data = resources.files(__package__).joinpath("static", name).read_bytes()
        self._type = content_type.encode()

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", self._type)
        return self._data


def make_site(service) -> Admission:
    """What listens: the site and the WebSockets, behind the limits and the
    handshake deadline."""
    from .metrics import metrics_resource

    root = Root(Static("index.html", "text/html; charset=utf-8"))
    root.putChild(b"client.js", Static("redmessenger.js", "text/javascript; charset=utf-8"))
    site = Site(root)
    site.noisy = False
    admission = Admission(site, service.factory, service.factory.limits,
                          service.dispatcher.stats, service.settings.handshake_timeout,
                          service.reactor)
    root.putChild(b"health", Health(service, admission))
    root.putChild(b"metrics", metrics_resource(service, admission))
    return admission
