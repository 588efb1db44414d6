"""Sessions: a lease that many holds and waiters share, kept by the store's clock.

A store either keeps sessions (``capabilities.sessions``) or refuses every session call
with ``InvalidRequest``, changing nothing; each test checks whichever its store does.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import lockd
from lockd.model import MAX_KEEPALIVE
from tests.conformance.helpers import NS, SLACK, bqueued, ttls

TTL = 0.5


async def refuses_sessions(backend: lockd.Backend) -> bool:
    """True (after checking the refusal) when the store keeps no sessions."""
    if backend.capabilities.sessions:
        return False
    with pytest.raises(lockd.InvalidRequest, match="keeps no sessions"):
        await backend.open_session(TTL)
    with pytest.raises(lockd.InvalidRequest, match="keeps no sessions"):
        await backend.acquire(NS, "s-refused", "me", ttl=TTL, wait=0, session="abc")
    with pytest.raises(lockd.InvalidRequest, match="keeps no sessions"):
        await backend.keepalive(["abc"])
    assert (await backend.inspect(NS, "s-refused")).last_token == 0
    return True


async def test_one_keepalive_keeps_every_hold_of_its_session(backend: lockd.Backend) -> None:
    if await refuses_sessions(backend):
        return
    sid = await backend.open_session(TTL)
    names = [f"s-many-{i}" for i in range(3)]
    for name in names:
        await backend.acquire(NS, name, "me", ttl=TTL, wait=0, session=sid)
    until = time.monotonic() + 3 * TTL
    while time.monotonic() < until:  # held well past the ttl by keepalives alone
        assert ttls(await backend.keepalive([sid])) == [TTL]
        await asyncio.sleep(TTL / 3)
    for name in names:
        assert [h.owner for h in (await backend.inspect(NS, name)).holders] == ["me"]
    started = time.monotonic()
    grants = [await backend.acquire(NS, name, "other", ttl=5, wait=TTL + SLACK) for name in names]
    assert time.monotonic() - started < TTL + SLACK  # all freed by the one lapse
    assert all(g.token > 0 for g in grants)
    assert ttls(await backend.keepalive([sid])) == [None]  # ended, and not revived


async def test_a_revoked_session_frees_its_holds_and_ends_its_waiters(
    backend: lockd.Backend,
) -> None:
    if await refuses_sessions(backend):
        return
    sid = await backend.open_session(30)
    held = await backend.acquire(NS, "s-revoke", "me", ttl=30, wait=0, session=sid)
    await backend.acquire(NS, "s-revoke-2", "them", ttl=30, wait=0)
    mine = asyncio.ensure_future(
        backend.acquire(NS, "s-revoke-2", "me", ttl=30, wait=None, session=sid)
    )
    theirs = asyncio.ensure_future(backend.acquire(NS, "s-revoke", "them", ttl=30, wait=10))
    await bqueued(backend, "s-revoke-2", 1)
    await bqueued(backend, "s-revoke", 1)
    await backend.revoke_session(sid)
    with pytest.raises(lockd.SessionLost):
        await asyncio.wait_for(mine, 2)
    grant = await asyncio.wait_for(theirs, 2)
    assert grant.token > held.token
    assert (await backend.inspect(NS, "s-revoke-2")).waiters == ()
    with pytest.raises(lockd.LockLost):  # released with its session, not revoked by an admin
        await backend.release(NS, "s-revoke", "me", held.token)
    await backend.revoke_session(sid)  # twice: nothing more


async def test_a_keepalive_reports_once_the_holds_that_ended_while_it_lived(
    backend: lockd.Backend,
) -> None:
    """A hold force-released, or released by another client's handle, is told to the
    session that kept it by its next keepalive (so its holder hears without asking per
    hold); a release naming the session is the holder's own, and is not told."""
    if await refuses_sessions(backend):
        return
    sid = await backend.open_session(30)
    grants = {
        name: await backend.acquire(NS, name, "me", ttl=30, wait=0, session=sid)
        for name in ("s-told-1", "s-told-2", "s-told-3")
    }
    await backend.force_release(NS, "s-told-1")
    await backend.release(NS, "s-told-2", "me", grants["s-told-2"].token)  # by the handle
    await backend.release(NS, "s-told-3", "me", grants["s-told-3"].token, session=sid)
    (answer,) = await backend.keepalive([sid])
    assert answer is not None
    told = sorted((e.namespace, e.name, e.owner, e.token, e.reason) for e in answer.ended)
    assert told == [
        (NS, "s-told-1", "me", grants["s-told-1"].token, "revoked"),
        (NS, "s-told-2", "me", grants["s-told-2"].token, "released"),
    ]
    (again,) = await backend.keepalive([sid])
    assert again is not None
    assert again.ended == ()  # told once


async def test_a_waiter_ends_with_its_session(backend: lockd.Backend) -> None:
    if await refuses_sessions(backend):
        return
    await backend.acquire(NS, "s-wait", "them", ttl=30, wait=0)
    sid = await backend.open_session(TTL)
    started = time.monotonic()
    with pytest.raises(lockd.SessionLost):
        await backend.acquire(NS, "s-wait", "me", ttl=TTL, wait=None, session=sid)
    assert TTL - 0.01 <= time.monotonic() - started < TTL + 1.5  # a sweep is at most 1 s late
    assert (await backend.inspect(NS, "s-wait")).waiters == ()


async def test_a_call_naming_an_ended_session_changes_nothing(backend: lockd.Backend) -> None:
    if await refuses_sessions(backend):
        return
    sid = await backend.open_session(30)
    await backend.revoke_session(sid)
    with pytest.raises(lockd.SessionLost):
        await backend.acquire(NS, "s-ended", "me", ttl=30, wait=0, session=sid)
    with pytest.raises(lockd.SessionLost):
        await backend.acquire(NS, "s-ended", "me", ttl=30, wait=0, session="never-opened")
    assert (await backend.inspect(NS, "s-ended")).last_token == 0
    grant = await backend.acquire(NS, "s-ended", "me", ttl=30, wait=0)
    with pytest.raises(lockd.SessionLost):
        await backend.extend(NS, "s-ended", "me", grant.token, 30, session=sid)
    assert (await backend.inspect(NS, "s-ended")).holders[0].ttl_left > 29


async def test_extend_adds_a_session_to_the_leases_that_keep_a_hold(
    backend: lockd.Backend,
) -> None:
    if await refuses_sessions(backend):
        return
    sid = await backend.open_session(30)
    grant = await backend.acquire(NS, "s-extend", "me", ttl=TTL, wait=0)
    moved = await backend.extend(NS, "s-extend", "me", grant.token, 30, session=sid)
    assert moved.ttl > 29
    await asyncio.sleep(TTL + 0.1)  # its own lease is over: the session keeps it
    assert [h.token for h in (await backend.inspect(NS, "s-extend")).holders] == [grant.token]
    await backend.revoke_session(sid)
    assert (await backend.inspect(NS, "s-extend")).holders == ()


async def test_a_shared_owner_is_kept_by_each_clients_session(backend: lockd.Backend) -> None:
    """Two clients hold one owner (a handle) by sessions of their own: the hold lasts
    while either keeps its session, and a release naming a session lets that one go."""
    if await refuses_sessions(backend):
        return
    mine, theirs = await backend.open_session(30), await backend.open_session(30)
    grant = await backend.acquire(NS, "s-shared", "job", ttl=30, wait=0, session=mine)
    again = await backend.acquire(NS, "s-shared", "job", ttl=30, wait=0, session=theirs)
    assert (again.token, again.count) == (grant.token, 2)
    await backend.revoke_session(mine)  # one client goes: the other still holds
    assert [h.count for h in (await backend.inspect(NS, "s-shared")).holders] == [2]
    assert await backend.release(NS, "s-shared", "job", grant.token, session=theirs) == 1
    # The count left was the gone client's, and no lease keeps it any more.
    assert (await backend.inspect(NS, "s-shared")).holders == ()


async def test_bad_session_input_is_refused_and_changes_nothing(backend: lockd.Backend) -> None:
    if await refuses_sessions(backend):
        return
    sid = await backend.open_session(30)
    for bad in ("", "a\nb", "x" * 129, 7):
        with pytest.raises(lockd.InvalidRequest):
            await backend.acquire(NS, "s-bad", "me", ttl=30, wait=0, session=bad)  # type: ignore[arg-type]
    with pytest.raises(lockd.InvalidRequest, match="does not match"):
        await backend.acquire(NS, "s-bad", "me", ttl=10, wait=0, session=sid)
    for ids in ([], "abc", [sid] * (MAX_KEEPALIVE + 1), [sid, "a\x00"]):
        with pytest.raises(lockd.InvalidRequest):
            await backend.keepalive(ids)
    with pytest.raises(lockd.InvalidRequest):
        await backend.open_session(0)
    assert (await backend.inspect(NS, "s-bad")).last_token == 0
    assert ttls(await backend.keepalive([sid])) == [30]
