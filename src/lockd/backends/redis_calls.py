"""How the scripts are called and what their replies mean: a name's keys, the ACQUIRE
arguments, and the grants, holders and refusals the replies stand for."""

from __future__ import annotations

import functools
from typing import Any

from lockd.backends import redis_lua
from lockd.backends.base import AcquireRequest
from lockd.backends.redis_wait import WAITER_LEASE
from lockd.errors import AcquireTimeout, InvalidRequest, LockError, LockLost, NotHeld, Revoked
from lockd.model import Grant, HolderInfo


@functools.lru_cache(maxsize=4096)  # the same few names are locked over and over
def name_keys(namespace: str, name: str) -> tuple[str, ...]:
    """The keys of one name, all with one hash tag."""
    base = f"lockd:{{{namespace}:{name}}}"
    return tuple(f"{base}:{suffix}" for suffix in redis_lua.KEY_SUFFIXES)


def acquire_args(req: AcquireRequest, rid: str, attempt: str, mode: str) -> tuple[Any, ...]:
    """ARGV[5:] of the ACQUIRE script."""
    ttl_ms = max(1, round(req.ttl * 1000))
    return (req.owner, rid, attempt, ttl_ms, req.limit, mode, round(WAITER_LEASE * 1000))


def granted(reply: list[Any], req: AcquireRequest) -> Grant:
    """The grant in an acquire's reply, or the error it stands for."""
    name, owner, limit = req.name, req.owner, req.limit
    status = reply[0]
    if status == "granted":
        return Grant(
            name=name,
            owner=owner,
            token=int(reply[1]),
            count=int(reply[2]),
            ttl=max(0.0, int(reply[3]) / 1000),
            waited=int(reply[4]) / 1_000_000,
        )
    if status == "lost":
        raise LockLost("this request was granted before, and that hold has ended",
                       name=name, owner=owner, token=int(reply[1]))  # fmt: skip
    if status == "invalid":
        raise InvalidRequest(
            f"{name!r} is held with limit {int(reply[1])}; this request asks for limit {limit}",
            name=name, owner=owner,
        )  # fmt: skip
    if status in ("denied", "gone"):
        message = f"{name!r} was not granted in time; held by {reply[1]}"
    elif status == "abandoned":
        message = f"{name!r} was not granted: this request was abandoned by its caller"
    else:
        message = f"{name!r} was not granted: replaced by a retry"
    raise AcquireTimeout(message, name=name, owner=owner)


def holder_info(row: list[Any]) -> HolderInfo:
    """A holder in an INSPECT or FORCE_RELEASE reply."""
    owner, token, count, ttl_left, held_for, acquired_at = row
    return HolderInfo(
        owner=str(owner),
        token=int(token),
        count=int(count),
        ttl_left=max(0.0, int(ttl_left) / 1000),
        held_for=max(0.0, int(held_for) / 1000),
        acquired_at=int(acquired_at) / 1000,
    )


def not_held(status: str, name: str, owner: str, token: int | None) -> LockError:
    """The error that a refused RELEASE or EXTEND reply's ``status`` stands for."""
    if status == "revoked":
        return Revoked("the hold was force-released", name=name, owner=owner, token=token)
    if status == "lost":
        return LockLost("the hold has ended", name=name, owner=owner, token=token)
    if status == "not_yours":
        return NotHeld(f"token {token} of {name!r} is another owner's hold, not {owner!r}'s",
                       name=name, owner=owner, token=token)  # fmt: skip
    return NotHeld(f"{owner!r} does not hold {name!r}", name=name, owner=owner, token=token)
