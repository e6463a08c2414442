"""One process's connection to Redis and its registered scripts, shared by the store's parts."""

from __future__ import annotations

import redis
from redis.commands.core import Script

from service.record import scripts

MAX_CONNECTIONS = 64
"""Redis connections per process and pool: above the API's thread pool (40) plus its reaper."""
POOL_WAIT_SECONDS = 5
"""How long a caller waits for a free pooled connection before the request fails (503)."""


class Connection:
    """A Redis client and the store's Lua scripts, each registered once on it."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._scripts: dict[str, Script] = {}

    def script(self, name: str) -> Script:
        """The script `lua/<name>.lua`, registered on first use (redis-py reloads it on NOSCRIPT)."""
        found = self._scripts.get(name)
        if found is None:
            found = self._scripts[name] = self.r.register_script(scripts.source(name))
        return found

    @staticmethod
    def pool(url: str, *, max_connections: int = MAX_CONNECTIONS, name: str | None = None) -> redis.Redis:
        """Short connect timeout: when Redis is down the API answers 503 quickly, not after a hang.

        The pool is bounded: a burst of requests waits up to a few seconds for a free
        connection (then a 503) instead of opening as many connections as there are
        requests. `name` shows in Redis's CLIENT LIST (who holds which connection).
        """
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=POOL_WAIT_SECONDS,
            decode_responses=True,
            socket_connect_timeout=3,
            socket_timeout=15,
            health_check_interval=15,
            client_name=name,
        )
        return redis.Redis(connection_pool=pool)
