"""RedMessenger: a Redis PUBLISH to a user nobody is listening for is stored,
and delivered, in order, when the user connects."""

__version__ = "0.1.0"

from .service import RedMessengerService  # noqa: E402
from .settings import AuthMode, RedisAddress, Settings  # noqa: E402

__all__ = ["AuthMode", "RedMessengerService", "RedisAddress", "Settings", "__version__"]
