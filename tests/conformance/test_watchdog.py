"""Contract item 9: while a holder lives the SDK renews at about ttl/3; when renewal
finds the hold gone or keeps failing, the lock is marked lost (or revoked) at once: the
``lost`` event is set, ``on_lost`` is called, and the next operation raises.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import lockd
from lockd import BackendUnavailable, LockLost, LockState, NotHeld, Revoked

TTL = 0.3
NOTICE = TTL / 3 + 0.15
"""A revocation must be noticed within one renewal interval, plus some slack for a busy
machine (still well below the ttl)."""
RECOVERY_TTL = 0.6
"""Room for an outage of a few renewal attempts inside one lease."""


class Calls:
    def __init__(self) -> None:
        self.errors: list[NotHeld] = []
        self.event = threading.Event()

    def __call__(self, error: NotHeld) -> None:
        self.errors.append(error)
        self.event.set()


def test_watchdog_reports_a_revocation_while_held(
    client: lockd.Client, other_client: lockd.Client
) -> None:
    calls = Calls()
    lock = client.lock("wd", ttl=TTL, on_lost=calls)
    seen: dict[str, Any] = {}

    def hold_while_revoked() -> None:
        with lock:
            seen["token"] = lock.token
            lost = lock.lost
            revoked_at = time.monotonic()
            other_client.force_release("wd")
            assert lost.wait(2)
            seen["noticed_after"] = time.monotonic() - revoked_at
            seen["state"] = lock.state
            seen["called"] = calls.event.wait(2)
            seen["body_done"] = True

    with pytest.raises(Revoked) as exited:
        hold_while_revoked()
    assert seen["body_done"]
    assert seen["noticed_after"] < NOTICE
    assert seen["state"] is LockState.REVOKED
    assert seen["called"]
    assert isinstance(calls.errors[0], Revoked)
    assert exited.value.token == seen["token"]
    assert exited.value.name == "wd"


async def test_async_watchdog_reports_a_revocation_while_held(
    aclient: lockd.AsyncClient,
) -> None:
    calls = Calls()
    lock = aclient.lock("wd", ttl=TTL, on_lost=calls)
    seen: dict[str, Any] = {}

    async def hold_while_revoked() -> None:
        async with lock:
            lost = lock.lost
            revoked_at = time.monotonic()
            await aclient.force_release("wd")
            await asyncio.wait_for(lost.wait(), 2)
            seen["noticed_after"] = time.monotonic() - revoked_at
            seen["state"] = lock.state
            seen["body_done"] = True

    with pytest.raises(Revoked):
        await hold_while_revoked()
    assert seen["body_done"]
    assert seen["noticed_after"] < NOTICE
    assert seen["state"] is LockState.REVOKED
    assert isinstance(calls.errors[0], Revoked)


def test_on_lost_is_called_once_for_a_reentrant_hold(
    client: lockd.Client, other_client: lockd.Client
) -> None:
    calls = Calls()
    lock = client.lock("wd", ttl=TTL, on_lost=calls)

    def nested() -> None:
        with lock, lock:
            assert lock.count == 2
            other_client.force_release("wd")
            assert lock.lost.wait(2)
            time.sleep(0.1)  # room for a second (wrong) call to arrive

    with pytest.raises(Revoked):
        nested()
    assert calls.event.is_set()
    assert len(calls.errors) == 1


def test_watchdog_stops_at_release(client: lockd.Client, other_client: lockd.Client) -> None:
    calls = Calls()
    # RECOVERY_TTL: a renewal slowed by load must not end this hold before its release.
    lock = client.lock("wd", ttl=RECOVERY_TTL, on_lost=calls)
    with lock:
        time.sleep(RECOVERY_TTL)  # a renewal or two happen
    # Someone else takes the lock: a renewal that went on would now fail and cry "lost".
    with other_client.lock("wd", ttl=5):
        time.sleep(RECOVERY_TTL / 2)
    assert not calls.event.is_set()
    assert lock.state is LockState.RELEASED
    assert not lock.lost.is_set()


def test_failing_renewal_goes_at_risk_then_lost(
    client: lockd.Client, other_client: lockd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = Calls()
    lock = client.lock("wd", ttl=TTL, on_lost=calls)
    lock.acquire()
    acquired = time.monotonic()
    backend = client._session.backend

    async def unreachable(*args: object, **kwargs: object) -> lockd.Grant:
        raise BackendUnavailable("injected: the store cannot be reached")

    monkeypatch.setattr(backend, "extend", unreachable)
    deadline = acquired + 2
    while lock.state is LockState.HELD and time.monotonic() < deadline:
        time.sleep(0.005)
    assert lock.state is LockState.AT_RISK
    assert not lock.lost.is_set()
    assert lock.lost.wait(2)
    lost_after = time.monotonic() - acquired
    # Lost no later than the store's lease ends (the ttl), and not long before it.
    assert TTL * 0.8 <= lost_after <= TTL + 0.1
    assert lock.state is LockState.LOST
    assert calls.event.wait(2)
    assert isinstance(calls.errors[0], LockLost)
    monkeypatch.undo()
    with pytest.raises(LockLost):
        lock.release()
    # The store ended the hold at its ttl: someone else can have the lock.
    with other_client.lock("wd", ttl=5).acquire(wait=1) as other:
        assert other.owned()


def test_renewal_recovers_from_a_short_outage(
    client: lockd.Client, other_client: lockd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = client.lock("wd", ttl=RECOVERY_TTL)
    lock.acquire()
    token = lock.token
    backend = client._session.backend

    async def unreachable(*args: object, **kwargs: object) -> lockd.Grant:
        raise BackendUnavailable("injected: the store cannot be reached")

    monkeypatch.setattr(backend, "extend", unreachable)
    deadline = time.monotonic() + 2
    while lock.state is LockState.HELD and time.monotonic() < deadline:
        time.sleep(0.005)
    assert lock.state is LockState.AT_RISK
    monkeypatch.undo()
    deadline = time.monotonic() + RECOVERY_TTL
    while lock.state is LockState.AT_RISK and time.monotonic() < deadline:
        time.sleep(0.005)
    assert lock.state is LockState.HELD
    time.sleep(RECOVERY_TTL)  # renewal goes on as before
    assert lock.state is LockState.HELD
    assert not lock.lost.is_set()
    assert [h.token for h in other_client.inspect("wd").holders] == [token]
    lock.release()
