"""Contract item 4: each new grant of a name gets a token strictly greater than every
earlier grant of that name, across release, expiry, force-release and (for a durable
store) restart; a re-entrant grant keeps its token.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

import lockd
from lockd import LockLost
from tests.conformance.helpers import NS, open_backend


def test_tokens_increase_across_release(client: lockd.Client, other_client: lockd.Client) -> None:
    tokens: list[int] = []
    for i in range(6):
        lock = (client if i % 2 else other_client).lock("fence", ttl=5)
        with lock:
            assert lock.token is not None
            tokens.append(lock.token)
            assert client.inspect("fence").last_token == lock.token
    assert all(a < b for a, b in itertools.pairwise(tokens))


async def test_tokens_increase_across_expiry(backend: lockd.Backend) -> None:
    first = await backend.acquire(NS, "fence", "a", ttl=0.2, wait=0)
    await asyncio.sleep(0.25)
    second = await backend.acquire(NS, "fence", "b", ttl=0.2, wait=0)
    assert second.token > first.token
    # The same owner again, after its own hold expired: a new grant, a new token.
    await asyncio.sleep(0.25)
    third = await backend.acquire(NS, "fence", "b", ttl=5, wait=0)
    assert third.token > second.token
    assert third.count == 1


def test_tokens_increase_across_force_release(
    client: lockd.Client, other_client: lockd.Client
) -> None:
    lock = client.lock("fence", ttl=5, renew=False)
    lock.acquire()
    evicted = other_client.force_release("fence")
    assert [h.token for h in evicted] == [lock.token]
    with other_client.lock("fence", ttl=5) as other:
        assert lock.token is not None and other.token is not None
        assert other.token > lock.token
        assert other_client.inspect("fence").last_token == other.token


async def test_tokens_increase_per_name_when_interleaved(backend: lockd.Backend) -> None:
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for i in range(8):
        name = "ab"[i % 2] if i < 4 else "ab"[(i // 2) % 2]
        grant = await backend.acquire(NS, name, f"owner-{i}", ttl=5, wait=0)
        seen[name].append(grant.token)
        assert await backend.release(NS, name, f"owner-{i}", grant.token) == 0
    for tokens in seen.values():
        assert all(x < y for x, y in itertools.pairwise(tokens))


async def test_reentrant_grant_keeps_its_token(backend: lockd.Backend) -> None:
    first = await backend.acquire(NS, "fence", "a", ttl=5, wait=0)
    again = await backend.acquire(NS, "fence", "a", ttl=5, wait=0)
    assert again.token == first.token
    assert (await backend.inspect(NS, "fence")).last_token == first.token


async def test_tokens_never_go_back_after_restart(store_url: str) -> None:
    first = await open_backend(store_url)
    try:
        # A store shared across processes lives outside this backend: reopening the
        # backend does not restart it, so it keeps what it holds, like a durable one.
        durable = first.capabilities.durable or first.capabilities.shared_across_processes
        grant = await first.acquire(NS, "fence", "a", ttl=5, wait=0)
        await first.release(NS, "fence", "a", grant.token)
        held = await first.acquire(NS, "fence", "b", ttl=5, wait=0)  # still held at the stop
    finally:
        await first.aclose()
    second = await open_backend(store_url)
    try:
        info = await second.inspect(NS, "fence")
        if durable:
            assert info.last_token >= held.token
            await second.force_release(NS, "fence")
            after = await second.acquire(NS, "fence", "c", ttl=5, wait=0)
            assert after.token > held.token
        else:
            # A store that keeps nothing starts over, and says so in its capabilities.
            assert info.last_token == 0
            assert info.holders == ()
    finally:
        await second.aclose()


class FencedResource:
    """A protected resource that refuses writes carrying a token older than one it saw."""

    def __init__(self) -> None:
        self.highest = 0
        self.value = ""

    def write(self, token: int, value: str) -> None:
        if token < self.highest:
            raise PermissionError(f"stale token {token} < {self.highest}")
        self.highest = token
        self.value = value


def test_stale_holder_is_fenced_out(client: lockd.Client, other_client: lockd.Client) -> None:
    resource = FencedResource()
    slow = client.lock("fenced", ttl=0.2, renew=False)
    slow.acquire()
    slow_token = slow.token
    assert slow_token is not None
    # The slow holder pauses past its ttl; the next holder writes meanwhile.
    with other_client.lock("fenced", ttl=5) as fast:
        assert fast.token is not None
        resource.write(fast.token, "fast")
    with pytest.raises(PermissionError):
        resource.write(slow_token, "slow")
    assert resource.value == "fast"
    with pytest.raises(LockLost):
        slow.release()
