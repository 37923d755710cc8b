# RedMessenger mounted in your own twisted.web site: one port, one TLS setup,
# your pages and RedMessenger side by side.
#
# Run it with
#
#     twistd -ny docs/mounted.tac
#
# then open http://127.0.0.1:8000/app. Settings(port=None) gives RedMessenger
# no port of its own; messenger.resource() is its WebSocket (at /rm), with
# /rm/client.js, /rm/health, /rm/metrics and the demo page at /rm/ beneath
# it. The service still owns its Redis connections: a stop of the
# application puts every undelivered message back into Redis first.
#
#   MY_APP_PORT   where the site listens (default: 8000, every interface)
#   MY_APP_REDIS  redis://[:password@]host[:port][/db]
#                 (default: redis://127.0.0.1:6379/0)

import os

from twisted.application import service, strports
from twisted.web import server, static
from twisted.web.resource import Resource

from redmessenger import RedisAddress, RedMessengerService, Settings

port = os.environ.get("MY_APP_PORT", "8000")
redis_url = os.environ.get("MY_APP_REDIS", "redis://127.0.0.1:6379/0")

application = service.Application("my-app")

messenger = RedMessengerService(Settings(port=None, redis=RedisAddress.from_url(redis_url)))
messenger.setServiceParent(application)

page = b"""<!doctype html>
<title>My app</title>
<pre id="log"></pre>
<script type="module">
  import { RedMessengerClient } from "/rm/client.js";  // connects to /rm/
  const client = new RedMessengerClient({ id: "user1", key: "s3cret" });
  client.addEventListener("message", ({ detail }) => {
    document.getElementById("log").append(detail.payload + "\\n");
  });
  client.connect();
</script>
"""

root = Resource()
root.putChild(b"app", static.Data(page, "text/html; charset=utf-8"))
root.putChild(b"rm", messenger.resource())
strports.service(f"tcp:{port}" if port.isdigit() else port,
                 server.Site(root)).setServiceParent(application)
