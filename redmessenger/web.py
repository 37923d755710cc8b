"""HTTP beside the WebSocket: ``/`` shows a small demo page (a WebSocket
upgrade of ``/`` is Autobahn's, see admission.py), ``/health`` says whether
this process can deliver, ``/metrics`` speaks Prometheus, ``/client.js``
serves the browser client, and ``/events`` streams Server-Sent Events
(events.py).

The same tree listens on RedMessenger's own port, or is mounted in an
application's twisted.web site (``RedMessengerService.resource()``). With
``--internal-port``, the demo page, ``/health`` and ``/metrics`` leave the
public tree for a listener of their own."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from importlib import resources

from autobahn.twisted.resource import WebSocketResource
from twisted.web import pages
from twisted.web.http import combinedLogFormatter
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.util import redirectTo

from ._version import __version__
from .admission import Admission, Mounted, upgrade
from .events import Events


class Health(Resource):
    """200 when Redis is connected, subscribed and takes writes, 503
    otherwise, so a load balancer sends users only where messages can reach
    them."""

    isLeaf = True

    def __init__(self, service) -> None:
        super().__init__()
        self._service = service

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
            "handshaking": service.handshaking,
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
    """The WebSocket, and the demo page (if this tree has it) for a plain
    ``GET``. On RedMessenger's own port, an upgrade that reaches twisted.web
    (after other requests on its connection) still goes to RedMessenger."""

    def __init__(self, page: Resource | None, websocket: Callable) -> None:
        super().__init__()
        self._page = page
        self._websocket = websocket

    def getChild(self, path: bytes, request):
        return self if path == b"" else pages.notFound()

    def render(self, request):
        if (request.getHeader(b"upgrade") or b"").lower() == b"websocket":
            return self._websocket(request)
        if self._page is None:
            return pages.notFound().render(request)
        if not request.path.endswith(b"/"):
            # Mounted at /rm: the page's relative links need /rm/.
            _, mark, query = request.uri.partition(b"?")
            return redirectTo(request.path + b"/" + mark + query, request)
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


#: A key in a query string (``/events?id=u&key=...``: an EventSource cannot
#: send headers) is not the access log's to keep.
_KEY = re.compile(rb"([?&]key=)[^&]*")


def access_line(timestamp: str, request) -> str:
    """twisted.web's combined log format, with any key hidden."""
    return combinedLogFormatter(timestamp, _Hidden(request))


class _Hidden:
    """A request as the access log sees it: its URI without the key."""

    def __init__(self, request) -> None:
        self._request = request
        self.uri = _KEY.sub(rb"\1-", request.uri)

    def __getattr__(self, name: str):
        return getattr(self._request, name)


def tree(service, websocket: Callable, *, internal: bool) -> Resource:
    """The WebSocket at the root, ``/client.js`` and ``/events`` beneath it; the demo
    page, ``/health`` and ``/metrics`` too if ``internal``."""
    from .metrics import metrics_resource

    root = Root(Static("index.html", "text/html; charset=utf-8") if internal else None,
                websocket)
    root.putChild(b"client.js", Static("redmessenger.js", "text/javascript; charset=utf-8"))
    root.putChild(b"events", Events(service.streams))
    if internal:
        root.putChild(b"health", Health(service))
        root.putChild(b"metrics", metrics_resource(service))
    return root


def admission(service, *, internal: bool) -> Admission:
    """What listens on a port of RedMessenger's own: the site and the
    WebSockets, behind the limits and the handshake deadline."""
    site = Site(tree(service, upgrade, internal=internal), logFormatter=access_line)
    site.noisy = False
    return _admission(service, site)


def mounted(service, *, internal: bool) -> Resource:
    """The tree to mount in another twisted.web site: its WebSockets come
    through the same limits and handshake deadline."""
    websocket = WebSocketResource(Mounted(_admission(service, None)))

    def upgrade_while_running(request):
        if not service.running:  # its Redis connections are its own: none then
            request.setResponseCode(503)
            request.setHeader(b"retry-after", b"1")
            return b"RedMessenger is not running\n"
        return websocket.render(request)

    return tree(service, upgrade_while_running, internal=internal)


def _admission(service, site: Site | None) -> Admission:
    found = Admission(site, service.factory, service.factory.limits, service.dispatcher.stats,
                      service.settings.handshake_timeout, service.reactor)
    service.admissions.append(found)
    return found
