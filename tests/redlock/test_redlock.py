"""What the RedLock backend promises beyond the shared contract: its quorum rule, the
validity it reports, and its URL."""

from __future__ import annotations

import pytest

import lockd
from lockd import BackendUnavailable, InvalidRequest
from lockd.backends.redis import RedisBackend
from lockd.backends.redlock import DRIFT_FACTOR, DRIFT_MIN, quorum
from tests.conformance.helpers import NS
from tests.redisproc import RedisProcess
from tests.redlock import redlock_url


@pytest.mark.parametrize("nodes", range(3, 10))
@pytest.mark.parametrize("limit", range(1, 6))
def test_quorum_is_the_least_that_keeps_the_limit(nodes: int, limit: int) -> None:
    need = quorum(nodes, limit)
    assert need <= nodes
    # limit + 1 owners cannot each hold `need` nodes when a node holds `limit` at most...
    assert (limit + 1) * need > limit * nodes
    # ...and with one node fewer they could.
    assert (limit + 1) * (need - 1) <= limit * nodes


def test_a_lock_needs_a_majority() -> None:
    assert [quorum(n, 1) for n in (3, 4, 5, 7)] == [2, 3, 3, 4]


@pytest.mark.parametrize(
    "url",
    [
        "redlock://127.0.0.1:1,127.0.0.1:2",
        "redlock://127.0.0.1:1,127.0.0.1:1,127.0.0.1:2",
        "redlock://127.0.0.1,127.0.0.1:2,127.0.0.1:3",
        "redlock://127.0.0.1:1,,127.0.0.1:3",
        "redlock://127.0.0.1:1,127.0.0.1:2,127.0.0.1:3?bogus=1",
    ],
)
def test_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidRequest):
        lockd.connect(url)


def test_the_password_is_not_shown() -> None:
    backend = lockd.connect("redlock://user:secret@h1:1,h2:2,h3:3/0")
    assert "secret" not in backend.url
    assert backend.url == "redlock://user:***@h1:1,h2:2,h3:3/0"


async def test_a_grant_reports_its_validity(redlock_nodes: list[RedisProcess]) -> None:
    backend = lockd.connect(redlock_url(redlock_nodes))
    await backend.open()
    try:
        grant = await backend.acquire(NS, "valid", "a", ttl=2, wait=0)
        drift = DRIFT_FACTOR * 2 + DRIFT_MIN
        assert 1.0 < grant.ttl <= 2 - drift
        extended = await backend.extend(NS, "valid", "a", grant.token, 3)
        assert 2.0 < extended.ttl <= 3 - (DRIFT_FACTOR * 3 + DRIFT_MIN)
    finally:
        await backend.aclose()


def test_a_semaphore_needs_more_nodes_than_a_lock(redlock_nodes: list[RedisProcess]) -> None:
    """Limit 2 on 3 nodes needs all three (else three owners could each hold two)."""
    with lockd.Client(redlock_url(redlock_nodes)) as client:
        redlock_nodes[0].kill()
        with client.lock("one", ttl=2) as lock:
            assert lock.owned()
        with pytest.raises(BackendUnavailable, match="3 are needed"):
            client.semaphore("two", 2, ttl=2).acquire(wait=0)


async def test_a_stale_hold_of_the_owner_on_one_node_does_not_stop_its_acquires(
    redlock_nodes: list[RedisProcess],
) -> None:
    """A hold the owner no longer has, left on a minority of nodes (its undo failed), is
    re-entered by each new request there; counting it as a re-entry would make every
    round fail. It is left out instead, and the majority's fresh grant stands."""
    stale = RedisBackend(redlock_nodes[0].url)
    await stale.open()
    backend = lockd.connect(redlock_url(redlock_nodes))
    await backend.open()
    try:
        for _ in range(2):  # the stale hold's token differs from the fresh nodes' ones
            passed = await stale.acquire(NS, "stale", "p", ttl=30, wait=0)
            await stale.release(NS, "stale", "p", passed.token)
        left = await stale.acquire(NS, "stale", "o", ttl=30, wait=0)
        grant = await backend.acquire(NS, "stale", "o", ttl=10, wait=2)
        assert grant.count == 1  # a fresh grant, not a re-entry of the stale hold
        assert grant.token != left.token
        await backend.release(NS, "stale", "o", grant.token)
        await backend.aclose()  # waits for the undo work in the background
        (holder,) = (await stale.inspect(NS, "stale")).holders
        assert (holder.token, holder.count) == (left.token, 1)  # this round's entry undone
    finally:
        await backend.aclose()
        await stale.aclose()
