"""RedMessenger's benchmark suite: ``python -m bench`` (see bench/README.rst).

Every process it measures or uses for load runs on its own (a private
redis-server, RedMessenger under ``twistd -n redmessenger`` exactly as
deployed, and the load generators and clients of this package), on
127.0.0.1 only, each bounded in size and time, and stopped at the end.
"""
