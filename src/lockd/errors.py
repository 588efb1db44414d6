"""The errors lockd raises.

Every error is a :class:`LockError` and carries the lock's ``name``, ``owner`` and
``token`` where they are known, so callers match on types, never on messages::

    LockError
    ├── AcquireTimeout       not granted within ``wait`` (also a TimeoutError)
    ├── NotHeld              release/extend by someone who does not hold the lock
    │   ├── LockLost         the hold ended: its ttl ran out, or renewal failed
    │   │   └── SessionLost  the session named has ended, and every hold in it
    │   └── Revoked          an administrator force-released the hold
    ├── InvalidRequest       bad input; nothing was changed (also a ValueError)
    ├── SafetyUnavailable    the store cannot give the safety level asked for
    ├── ClientClosed         the client was used after close() (also a RuntimeError)
    └── BackendUnavailable   the store cannot be reached or failed
        ├── StoreBusy        a file store is open in another process
        └── StoreRefused     the store refused us (authentication, permissions): not retried
"""

from __future__ import annotations

__all__ = [
    "AcquireTimeout",
    "BackendUnavailable",
    "ClientClosed",
    "InvalidRequest",
    "LockError",
    "LockLost",
    "NotHeld",
    "Revoked",
    "SafetyUnavailable",
    "SessionLost",
    "StoreBusy",
    "StoreRefused",
]


class LockError(Exception):
    """Root of every lockd error."""

    code = "lock_error"

    def __init__(
        self,
        message: str,
        *,
        name: str | None = None,
        owner: str | None = None,
        token: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.name = name
        self.owner = owner
        self.token = token

    def __reduce__(self) -> tuple[object, ...]:
        # Keep the keyword attributes when an error crosses a process boundary.
        return (_rebuild, (type(self), self.message, self.name, self.owner, self.token))


def _rebuild(
    cls: type[LockError], message: str, name: str | None, owner: str | None, token: int | None
) -> LockError:
    return cls(message, name=name, owner=owner, token=token)


class AcquireTimeout(LockError, TimeoutError):
    """The lock was not granted within the ``wait`` the caller gave."""

    code = "timeout"


class NotHeld(LockError):
    """The caller does not hold the lock it tried to release or extend."""

    code = "not_held"


class LockLost(NotHeld):
    """The caller held the lock, but the hold has ended (ttl ran out or renewal failed)."""

    code = "lost"


class SessionLost(LockLost):
    """The session a call named has ended (expired or revoked), with every hold and
    waiter it had: open a new session and acquire again."""

    code = "session_lost"


class Revoked(NotHeld):
    """The caller's hold was force-released by an administrator."""

    code = "revoked"


class InvalidRequest(LockError, ValueError):
    """The request was malformed or out of range; nothing was changed."""

    code = "invalid"


class SafetyUnavailable(LockError):
    """The store cannot give the safety level the caller demanded."""

    code = "safety_unavailable"


class ClientClosed(LockError, RuntimeError):
    """The client was closed; its locks and calls can no longer be used."""

    code = "client_closed"


class BackendUnavailable(LockError):
    """The store could not be reached or failed to answer."""

    code = "unavailable"


class StoreBusy(BackendUnavailable):
    """An embedded file store is already open in another process."""

    code = "store_busy"


class StoreRefused(BackendUnavailable):
    """The store refused the request: wrong credentials or missing permissions.

    Retrying cannot help, so the SDK raises it at once instead of retrying.
    """

    code = "store_refused"


ERROR_CODES: dict[str, type[LockError]] = {
    cls.code: cls
    for cls in (
        LockError,
        AcquireTimeout,
        NotHeld,
        LockLost,
        SessionLost,
        Revoked,
        InvalidRequest,
        SafetyUnavailable,
        ClientClosed,
        BackendUnavailable,
        StoreBusy,
        StoreRefused,
    )
}
"""Every error class by its wire code, so an error crosses HTTP and comes back typed."""
