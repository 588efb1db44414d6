"""The Backend contract: the few atomic operations every store provides.

Public methods validate input (through :mod:`lockd.model`, the one place input rules
live) and then call the store's own ``_``-prefixed method, so a backend implements
only the store-specific part and bad input never reaches a store.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from lockd.errors import InvalidRequest, SafetyUnavailable
from lockd.model import (
    Capabilities,
    Grant,
    HolderInfo,
    KeepaliveAnswer,
    ResourceInfo,
    SafetyLevel,
    check_limit,
    check_name,
    check_namespace,
    check_owner,
    check_prefix,
    check_request_id,
    check_session_id,
    check_session_ids,
    check_ttl,
    check_wait,
)

__all__ = [
    "AcquireRequest",
    "Backend",
    "ContinueOnLoop",
    "DirectPath",
    "require_safety",
    "undo_on_cancel",
]


@dataclass(frozen=True, slots=True)
class AcquireRequest:
    """One validated acquire, as a backend's ``_acquire`` receives it."""

    namespace: str
    name: str
    owner: str
    ttl: float
    wait: float | None
    """Seconds to queue; None: without end; 0: try once."""
    limit: int
    request_id: str | None
    session: str | None = None
    """The session the hold (or the waiter) lives by; None: a lease of its own of ttl."""


class ContinueOnLoop(Exception):
    """Raised by a direct acquire whose request must go on through the I/O loop.

    Not a failure: the request has begun (it may be queued in the store), and what it
    waits for next arrives on the loop. The SDK calls ``Backend.acquire`` at once with
    the same request id, and the backend takes the request up where the direct path
    left it.
    """


class DirectPath(abc.ABC):
    """Blocking acquire and release made in the caller's own thread, for sync clients.

    Optional: a backend offers one (as ``Backend.direct``) when a round trip from the
    caller's thread costs less than a hand-off to the I/O loop and back. Its input comes
    from the SDK, already validated. When a call fails in a way that leaves unknown
    whether the store applied it, it raises BackendUnavailable and the SDK makes the
    call again through the backend's coroutines with the same request id. An acquire
    that must wait for something only the I/O loop hears raises ContinueOnLoop, and the
    SDK goes on the same way.
    """

    @abc.abstractmethod
    def acquire(self, req: AcquireRequest) -> Grant:
        """As :meth:`Backend.acquire`, waiting in the caller's thread."""

    @abc.abstractmethod
    def release(
        self, namespace: str, name: str, owner: str, token: int | None, request_id: str | None
    ) -> int:
        """As :meth:`Backend.release`."""


class Backend(abc.ABC):
    """What the SDK and the server need from a store. All methods are coroutines.

    Public methods validate every call once, then hand it to the store's own
    ``_``-prefixed method, which is all a backend implements.
    """

    url: str
    capabilities: Capabilities
    direct: DirectPath | None = None
    """Set by a backend that can serve sync callers in their own thread (once open)."""

    async def acquire(
        self,
        namespace: str,
        name: str,
        owner: str,
        *,
        ttl: float,
        wait: float | None,
        limit: int = 1,
        request_id: str | None = None,
        session: str | None = None,
    ) -> Grant:
        """Grant a hold, waiting up to ``wait`` seconds (None: no end) in FIFO order.

        Raises AcquireTimeout when not granted in time. Reentrant for the same owner.
        Cancelling the call leaves the queue, and gives back a grant made meanwhile.
        With ``session`` (whose ttl ``ttl`` must be) the wait lives by that session, and
        the session keeps the hold (ending with it unless another lease keeps the hold);
        else the hold has a lease of its own of ``ttl``.
        """
        return await self._acquire(
            AcquireRequest(
                check_namespace(namespace),
                check_name(name),
                check_owner(owner),
                ttl=check_ttl(ttl),
                wait=check_wait(wait),
                limit=check_limit(limit),
                request_id=check_request_id(request_id),
                session=self._check_session(session),
            )
        )

    async def release(
        self,
        namespace: str,
        name: str,
        owner: str,
        token: int | None,
        request_id: str | None = None,
        session: str | None = None,
    ) -> int:
        """Drop one count of the owner's hold; returns the count left (0: released).

        With ``session``, that session also stops keeping the hold (the caller has no
        count left in it); the hold ends when no count, or no live lease, is left.
        """
        args = (check_namespace(namespace), check_name(name), check_owner(owner),
                _check_token(token), check_request_id(request_id))  # fmt: skip
        return await self._release(*args, self._check_session(session))

    async def abandon(self, namespace: str, name: str, owner: str, request_id: str) -> None:
        """Undo the acquire ``request_id`` whose caller has gone, whatever it reached.

        A queued request leaves the queue, a granted one is released once, and one that
        has not arrived yet is refused when it does. For callers that cannot know
        whether their acquire was applied (a cancelled request over a network).
        """
        rid = check_request_id(request_id)
        if rid is None:
            raise InvalidRequest("abandon needs the request_id of the acquire")
        await self._abandon(check_namespace(namespace), check_name(name), check_owner(owner), rid)

    async def extend(
        self,
        namespace: str,
        name: str,
        owner: str,
        token: int | None,
        ttl: float,
        session: str | None = None,
    ) -> Grant:
        """Make the owner's hold last ``ttl`` seconds from now, by a lease of its own, or
        add ``session`` (whose ttl ``ttl`` must be) to the leases that keep it.

        A hold lasts until the last of its leases ends: its own and its sessions."""
        args = (check_namespace(namespace), check_name(name), check_owner(owner),
                _check_token(token), check_ttl(ttl))  # fmt: skip
        return await self._extend(*args, self._check_session(session))

    async def open_session(self, ttl: float) -> str:
        """Open a session of ``ttl`` seconds and return its id.

        Holds and waiters that name the session live as long as it does: it ends (with
        all of them at once) ``ttl`` seconds after its last keepalive, measured by the
        store's clock, or when revoked. Raises InvalidRequest on a store without sessions.
        """
        self._need_sessions()
        return await self._open_session(check_ttl(ttl))

    async def keepalive(self, session_ids: Sequence[str]) -> list[KeepaliveAnswer | None]:
        """Renew every session named for its ttl from now, in one call.

        Answers, in order, each live session's ttl and the holds it kept that ended
        since its last keepalive (force-released, or released by another client), each
        reported once; or None for a session that has ended (its holds and waiters
        ended with it).
        """
        self._need_sessions()
        return await self._keepalive(check_session_ids(session_ids))

    async def revoke_session(self, session_id: str) -> None:
        """End a session now, with its holds (released) and waiters (told SessionLost)."""
        rid = self._check_session(session_id)
        if rid is None:
            raise InvalidRequest("revoke_session needs a session id")
        await self._revoke_session(rid)

    async def inspect(self, namespace: str, name: str) -> ResourceInfo:
        """Holders, waiters and last token of one name."""
        return await self._inspect(check_namespace(namespace), check_name(name))

    async def list_locks(self, namespace: str, prefix: str = "") -> list[ResourceInfo]:
        """See :meth:`Backend.list`."""
        return await self._list_locks(check_namespace(namespace), check_prefix(prefix))

    async def force_release(
        self, namespace: str, name: str, owner: str | None = None
    ) -> list[HolderInfo]:
        """Evict all holders (or one owner); evicted tokens are revoked. Admin only."""
        return await self._force_release(
            check_namespace(namespace),
            check_name(name),
            None if owner is None else check_owner(owner),
        )

    async def open(self) -> None:
        """Connect (called once, in the event loop that will use the backend)."""
        return

    async def ping(self) -> None:
        """Raise BackendUnavailable when the store cannot be reached."""
        return

    async def aclose(self) -> None:
        """Release the store's connections and files."""
        return

    def _check_session(self, session: str | None) -> str | None:
        """Validate an optional session id (refused by a store that keeps no sessions)."""
        if session is None:
            return None
        self._need_sessions()
        return check_session_id(session)

    def _need_sessions(self) -> None:
        if not self.capabilities.sessions:
            raise InvalidRequest(f"{self.url} keeps no sessions")

    async def _open_session(self, ttl: float) -> str:
        raise NotImplementedError

    async def _keepalive(self, session_ids: list[str]) -> list[KeepaliveAnswer | None]:
        raise NotImplementedError

    async def _revoke_session(self, session_id: str) -> None:
        raise NotImplementedError

    @abc.abstractmethod
    async def _acquire(self, req: AcquireRequest) -> Grant: ...

    @abc.abstractmethod
    async def _release(
        self,
        namespace: str,
        name: str,
        owner: str,
        token: int | None,
        request_id: str | None,
        session: str | None,
    ) -> int: ...

    @abc.abstractmethod
    async def _abandon(self, namespace: str, name: str, owner: str, request_id: str) -> None: ...

    @abc.abstractmethod
    async def _extend(
        self,
        namespace: str,
        name: str,
        owner: str,
        token: int | None,
        ttl: float,
        session: str | None,
    ) -> Grant: ...

    @abc.abstractmethod
    async def _inspect(self, namespace: str, name: str) -> ResourceInfo: ...

    @abc.abstractmethod
    async def _list_locks(self, namespace: str, prefix: str) -> list[ResourceInfo]: ...

    @abc.abstractmethod
    async def _force_release(
        self, namespace: str, name: str, owner: str | None
    ) -> list[HolderInfo]: ...


async def undo_on_cancel(
    work: Coroutine[Any, Any, Grant],
    undo: Callable[[], Awaitable[Any] | None],
    background: set[asyncio.Future[Any]],
) -> Grant:
    """Await an acquire; if the caller is cancelled, run ``undo`` (an abandon) before
    passing the cancellation on: the request may be queued, granted or still on its way,
    and abandoning its request id undoes whichever it reached."""
    try:
        return await work  # cancelled in place: it sends nothing more once this raises
    except asyncio.CancelledError:
        undoing = undo()
        if undoing is not None:
            future = asyncio.ensure_future(undoing)
            background.add(future)
            future.add_done_callback(background.discard)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(future)
        raise


def _check_token(token: object) -> int | None:
    if token is None:
        return None
    if isinstance(token, bool) or not isinstance(token, int) or token < 1:
        raise InvalidRequest(f"token must be a positive integer, not {token!r}")
    return token


def require_safety(backend: Backend, minimum: SafetyLevel | str | None) -> None:
    """Raise SafetyUnavailable when ``backend`` is weaker than ``minimum``."""
    if minimum is None:
        return
    wanted = SafetyLevel.parse(minimum)
    have = backend.capabilities.safety
    if have < wanted:
        raise SafetyUnavailable(
            f"{backend.url} gives {have.label} safety; {wanted.label} was required"
        )
