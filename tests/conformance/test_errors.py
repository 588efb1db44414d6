"""Errors are typed and carry the lock's name, owner and token, so callers match on
types, never on messages; they keep those attributes when pickled (to cross a process).
"""

from __future__ import annotations

import pickle

import pytest

import lockd
from lockd import AcquireTimeout, InvalidRequest, LockError, LockLost, NotHeld, Revoked
from tests.conformance.helpers import NS


def test_errors_carry_name_owner_and_token(
    client: lockd.Client, other_client: lockd.Client
) -> None:
    lock = client.lock("err", ttl=5, renew=False)
    lock.acquire()
    token = lock.token
    other = other_client.lock("err", ttl=5)

    with pytest.raises(AcquireTimeout) as timed_out:
        other.acquire(wait=0)
    assert isinstance(timed_out.value, TimeoutError)
    assert (timed_out.value.name, timed_out.value.owner) == ("err", other.owner)
    assert lock.owner in str(timed_out.value)  # the message says who holds it

    with pytest.raises(NotHeld) as not_held:
        other.release()
    assert (not_held.value.name, not_held.value.owner) == ("err", other.owner)

    other_client.force_release("err")
    with pytest.raises(Revoked) as revoked:
        lock.extend()
    assert (revoked.value.name, revoked.value.owner, revoked.value.token) == (
        "err",
        lock.owner,
        token,
    )
    assert isinstance(revoked.value, NotHeld)

    with pytest.raises(InvalidRequest) as invalid:
        client.lock("err", ttl=-1)
    assert isinstance(invalid.value, ValueError)
    assert isinstance(invalid.value, LockError)


async def test_backend_errors_survive_pickling(backend: lockd.Backend) -> None:
    grant = await backend.acquire(NS, "err", "a", ttl=0.2, wait=0)
    errors: list[LockError] = []
    try:
        await backend.acquire(NS, "err", "b", ttl=5, wait=0)
    except AcquireTimeout as exc:
        errors.append(exc)
    try:
        await backend.release(NS, "err", "b", None)
    except NotHeld as exc:
        errors.append(exc)
    try:
        await backend.acquire(NS, "err", "b", ttl=5, wait=0, limit=0)
    except InvalidRequest as exc:
        errors.append(exc)
    await backend.acquire(NS, "err", "a", ttl=5, wait=0)  # re-entry
    await backend.force_release(NS, "err")
    try:
        await backend.extend(NS, "err", "a", grant.token, 5)
    except Revoked as exc:
        errors.append(exc)
    later = await backend.acquire(NS, "err", "c", ttl=0.2, wait=0)
    await backend.release(NS, "err", "c", later.token)
    try:
        await backend.release(NS, "err", "c", later.token)
    except LockLost as exc:
        errors.append(exc)
    assert [type(e) for e in errors] == [AcquireTimeout, NotHeld, InvalidRequest, Revoked, LockLost]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert (copy.name, copy.owner, copy.token, str(copy)) == (
            error.name,
            error.owner,
            error.token,
            str(error),
        )
    assert errors[3].token == grant.token
    assert errors[4].token == later.token
