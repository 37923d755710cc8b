"""The package's version, alone in its module: setup.cfg reads it without
importing anything, and the light modules (the client, durable publish)
import it without loading the server."""

__version__ = "0.1.0"
