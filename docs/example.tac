# RedMessenger inside your own Twisted application.
#
# Run it with
#
#     twistd -ny docs/example.tac
#
# ``twistd redmessenger`` does nothing more than this: RedMessengerService is
# an ordinary Twisted service, so it can sit next to your own services under
# one Application (or any MultiService), and it is started and stopped with
# them. On a stop it puts every undelivered message back into Redis before it
# lets go.
#
# The WebSocket port and the Redis URL come from the environment, so the
# same file serves in a test and in development:
#
#   REDMESSENGER_EXAMPLE_PORT   a port number or a Twisted endpoint
#                               description (default: 8080, every interface)
#   REDMESSENGER_EXAMPLE_REDIS  redis://[:password@]host[:port][/db] or
#                               unix:///path/to/socket[?db=N]
#                               (default: redis://127.0.0.1:6379/0)
#
# Every other setting is a field of Settings (redmessenger/settings.py), with
# the same defaults as the twistd options. Leave ``redis`` out (None) to have
# the service run its own embedded redis-server, as ``twistd redmessenger``
# does without --redis.

import os

from twisted.application import service

from redmessenger import AuthMode, RedisAddress, RedMessengerService, Settings

port = os.environ.get("REDMESSENGER_EXAMPLE_PORT", "8080")
redis_url = os.environ.get("REDMESSENGER_EXAMPLE_REDIS", "redis://127.0.0.1:6379/0")

application = service.Application("my-app")

messenger = RedMessengerService(Settings(
    port=port,
    redis=RedisAddress.from_url(redis_url),
    # A hello must carry the key stored at rm:users:<uid>:key.
    auth=AuthMode.REQUIRED,
))
messenger.setServiceParent(application)

# Your own services join the same application, e.g.:
#
#     from twisted.application import strports
#     from twisted.web import server, static
#     site = server.Site(static.File("public"))
#     strports.service("tcp:8000", site).setServiceParent(application)
