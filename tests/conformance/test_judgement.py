"""Contract item 8: a release or extend that finds no hold of its owner is judged per name.

The first rule that matches gives the error, and nothing changes:

1. a token of another owner's live hold on this name: ``NotHeld``;
2. a token this name's administrator force-released, or no token from an owner whose
   latest hold on this name was force-released: ``Revoked``;
3. a token this name issued (``0 < token <= last``): ``LockLost``;
4. anything else (a name that never issued the token, a token above its last):
   ``NotHeld``.

Other names' tokens, revocations and evictions never count.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

import lockd
from lockd import LockLost, NotHeld, Revoked
from tests.conformance.helpers import NS, snapshot

Call = Callable[[], Awaitable[object]]


async def judged(backend: lockd.Backend, name: str, owner: str, token: int | None) -> list[type]:
    """The error classes of a release and of an extend, checking that neither changed
    anything about ``name``."""
    before = snapshot(await backend.inspect(NS, name))
    kinds: list[type] = []
    calls: list[Call] = [
        lambda: backend.release(NS, name, owner, token),
        lambda: backend.extend(NS, name, owner, token, 30),
    ]
    for call in calls:
        with pytest.raises(NotHeld) as refused:
            await call()
        kinds.append(type(refused.value))
    assert snapshot(await backend.inspect(NS, name)) == before, "a refused call changed state"
    return kinds


async def grant(backend: lockd.Backend, name: str, owner: str, limit: int = 1) -> int:
    g = await backend.acquire(NS, name, owner, ttl=30, wait=0, limit=limit)
    return g.token


async def test_another_owners_live_token_is_not_held(backend: lockd.Backend) -> None:
    theirs = await grant(backend, "j-live", "alice")
    assert await judged(backend, "j-live", "bob", theirs) == [NotHeld, NotHeld]
    # Even when bob himself once held this name with a token that ended.
    await backend.release(NS, "j-live", "alice", theirs)
    mine = await grant(backend, "j-live", "bob")
    await backend.release(NS, "j-live", "bob", mine)
    again = await grant(backend, "j-live", "alice")
    assert await judged(backend, "j-live", "bob", again) == [NotHeld, NotHeld]
    assert await judged(backend, "j-live", "bob", mine) == [LockLost, LockLost]


async def test_a_token_of_another_name_is_not_held(backend: lockd.Backend) -> None:
    token = await grant(backend, "j-other-a", "alice")
    assert await judged(backend, "j-never", "alice", token) == [NotHeld, NotHeld]
    await backend.release(NS, "j-other-a", "alice", token)
    assert await judged(backend, "j-never", "alice", token) == [NotHeld, NotHeld]


async def test_a_token_above_the_names_last_is_not_held(backend: lockd.Backend) -> None:
    first = await grant(backend, "j-above", "alice")
    await backend.release(NS, "j-above", "alice", first)
    later = await grant(backend, "j-above-other", "alice")  # the store's counter moves on
    assert later > first
    assert await judged(backend, "j-above", "alice", later) == [NotHeld, NotHeld]
    assert await judged(backend, "j-above", "alice", first) == [LockLost, LockLost]


async def test_an_ended_token_of_this_name_is_lost(backend: lockd.Backend) -> None:
    token = await grant(backend, "j-ended", "alice")
    assert await backend.release(NS, "j-ended", "alice", token) == 0
    assert await judged(backend, "j-ended", "alice", token) == [LockLost, LockLost]
    assert await judged(backend, "j-ended", "bob", token) == [LockLost, LockLost]
    # Without a token an ended hold is simply not held.
    assert await judged(backend, "j-ended", "alice", None) == [NotHeld, NotHeld]


async def test_a_revoked_token_is_revoked_on_its_name_only(backend: lockd.Backend) -> None:
    token = await grant(backend, "j-revoked", "alice")
    evicted = await backend.force_release(NS, "j-revoked")
    assert [(h.owner, h.token) for h in evicted] == [("alice", token)]
    assert await judged(backend, "j-revoked", "alice", token) == [Revoked, Revoked]
    # Another name never issued that token: its revocation is not that name's business.
    assert await judged(backend, "j-unrelated", "alice", token) == [NotHeld, NotHeld]
    # On a name whose last token is higher, an old token counts as that name's ended one.
    other = await grant(backend, "j-unrelated-held", "carol")
    assert other > token
    assert await judged(backend, "j-unrelated-held", "alice", token) == [LockLost, LockLost]


async def test_an_evicted_owner_without_a_token_hears_revoked(backend: lockd.Backend) -> None:
    token = await grant(backend, "j-evicted", "alice")
    await backend.force_release(NS, "j-evicted", "alice")
    assert await judged(backend, "j-evicted", "alice", None) == [Revoked, Revoked]
    # Per name: alice was not evicted from another name, and bob was not evicted at all.
    assert await judged(backend, "j-evicted-elsewhere", "alice", None) == [NotHeld, NotHeld]
    assert await judged(backend, "j-evicted", "bob", None) == [NotHeld, NotHeld]
    # A new grant of this name to alice clears her eviction.
    again = await grant(backend, "j-evicted", "alice")
    assert again > token
    assert await backend.release(NS, "j-evicted", "alice", None) == 0
    assert await judged(backend, "j-evicted", "alice", None) == [NotHeld, NotHeld]
    assert await judged(backend, "j-evicted", "alice", token) == [Revoked, Revoked]
    assert await judged(backend, "j-evicted", "alice", again) == [LockLost, LockLost]


async def test_a_held_owner_with_a_wrong_token(backend: lockd.Backend) -> None:
    old = await grant(backend, "j-wrong", "alice")
    await backend.force_release(NS, "j-wrong")
    mine = await grant(backend, "j-wrong", "alice")
    # alice holds (token ``mine``); a call naming her revoked token is refused as revoked.
    assert await judged(backend, "j-wrong", "alice", old) == [Revoked, Revoked]
    assert await judged(backend, "j-wrong", "alice", mine + 1000) == [NotHeld, NotHeld]
    assert await backend.release(NS, "j-wrong", "alice", mine) == 0


async def test_a_semaphore_judges_each_evicted_owner(backend: lockd.Backend) -> None:
    t1 = await grant(backend, "j-sem", "o1", limit=2)
    t2 = await grant(backend, "j-sem", "o2", limit=2)
    await backend.force_release(NS, "j-sem", "o1")
    assert await judged(backend, "j-sem", "o1", t1) == [Revoked, Revoked]
    assert await judged(backend, "j-sem", "o1", None) == [Revoked, Revoked]
    assert await judged(backend, "j-sem", "o1", t2) == [NotHeld, NotHeld]  # o2's live hold
    assert await judged(backend, "j-sem", "o3", None) == [NotHeld, NotHeld]
    assert await backend.release(NS, "j-sem", "o2", t2) == 0
