# RedMessenger mounted in a Klein application, under /rm.
#
# Run it with
#
#     twistd -ny docs/klein.tac
#
# A Klein route that returns a twisted.web resource hands the rest of the
# path to it: ``branch=True`` gives /rm/ and everything beneath it (the
# WebSocket, /rm/client.js, /rm/health, /rm/metrics) to RedMessenger.
#
#   MY_APP_PORT   where the site listens (default: 8000, every interface)
#   MY_APP_REDIS  redis://[:password@]host[:port][/db]
#                 (default: redis://127.0.0.1:6379/0)

import os

from klein import Klein
from twisted.application import service, strports
from twisted.web import server

from redmessenger import RedisAddress, RedMessengerService, Settings

port = os.environ.get("MY_APP_PORT", "8000")
redis_url = os.environ.get("MY_APP_REDIS", "redis://127.0.0.1:6379/0")

application = service.Application("my-klein-app")

messenger = RedMessengerService(Settings(port=None, redis=RedisAddress.from_url(redis_url)))
messenger.setServiceParent(application)

app = Klein()


@app.route("/app")
def page(request):
    request.setHeader("content-type", "text/html; charset=utf-8")
    return ('<!doctype html><title>My app</title><script type="module">'
            'import { RedMessengerClient } from "/rm/client.js";'
            'new RedMessengerClient({ id: "user1", key: "s3cret" }).connect();</script>')


@app.route("/rm/", branch=True)
def messages(request):
    return messenger.resource()


strports.service(f"tcp:{port}" if port.isdigit() else port,
                 server.Site(app.resource())).setServiceParent(application)
