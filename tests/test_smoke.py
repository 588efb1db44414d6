from __future__ import annotations

import lockd


def test_lock_round_trip(client: lockd.Client) -> None:
    lock = client.lock("smoke", ttl=5)
    with lock:
        assert lock.state is lockd.LockState.HELD
        assert lock.owned()
    assert lock.state is lockd.LockState.RELEASED
    assert not lock.locked()


async def test_async_lock_round_trip(aclient: lockd.AsyncClient) -> None:
    lock = aclient.lock("smoke", ttl=5)
    async with lock:
        assert await lock.owned()
    assert not await lock.locked()
