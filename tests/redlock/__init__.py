"""RedLock tests against real redis-server nodes."""

from __future__ import annotations

from tests.redisproc import RedisProcess


def redlock_url(nodes: list[RedisProcess]) -> str:
    """The ``redlock://`` URL of running test nodes."""
    return "redlock://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes) + "/0"
