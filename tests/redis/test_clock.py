"""The documented limit of one Redis: leases run on the Redis host's wall clock.

A forward step of that clock ends every lease early, so two owners can each believe they
hold a lock; tokens still rise, so a resource that checks them refuses the stale one.
The scripts' clock offset (ARGV[4]) stands in for the step.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import redis
from tests.redis.test_differential import LEASE_MS, Scripts
from tests.redisproc import running_redis


@pytest.fixture
def scripts() -> Iterator[Scripts]:
    with running_redis() as server, redis.Redis(port=server.port, decode_responses=True) as c:
        yield Scripts(c)


def acquire(scripts: Scripts, owner: str, attempt: str) -> list[object]:
    return scripts.run("ACQUIRE", "step", owner, "", attempt, 30_000, 1, "try", LEASE_MS)


def test_a_forward_clock_step_ends_a_lease_early_and_tokens_still_rise(
    scripts: Scripts,
) -> None:
    first = acquire(scripts, "a", "t.1")
    assert first[0] == "granted"
    assert acquire(scripts, "b", "t.2")[0] != "granted"  # a 30 s lease, a moment old
    scripts.offset_ms = 31_000  # the host's clock jumps 31 s ahead
    second = acquire(scripts, "b", "t.3")
    assert second[0] == "granted", "the lease ended by the step, not by time passing"
    assert int(str(second[1])) > int(str(first[1]))  # [status, token, count, ...]
