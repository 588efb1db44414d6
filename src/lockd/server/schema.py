"""The response bodies and statuses that ``/openapi.json`` documents.

Handlers build their answers directly (a model here is documentation only, never run
on a request), so these models must say what the handlers send: the API tests compare
the document with what the server answers.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = ["LOCK_ERRORS", "STORE_ERRORS", "drop_422", "responses"]


class Holder(BaseModel):
    """One holder of a name."""

    owner: str
    token: int = Field(description="The grant's fencing token.")
    count: int = Field(description="Reentrant count.")
    ttl_left: float = Field(description="Seconds until the hold ends unless extended.")
    held_for: float = Field(description="Seconds since the grant.")
    acquired_at: float = Field(description="Wall-clock time of the grant (Unix seconds).")


class Waiter(BaseModel):
    """One queued acquirer, in queue order."""

    owner: str
    waited: float


class GrantOut(BaseModel):
    """A grant (acquire) or an extended hold (extend)."""

    name: str
    owner: str
    token: int = Field(description="Fencing token: higher than every earlier grant of the name.")
    count: int = Field(description="The owner's reentrant count after this call.")
    ttl: float = Field(description="Seconds the hold lasts from the grant unless extended.")
    waited: float = Field(description="Seconds the request waited in the queue.")


class ReleaseOut(BaseModel):
    """What a release left."""

    name: str
    owner: str
    count: int = Field(description="The count left; 0: released.")
    released: bool


class AbandonOut(BaseModel):
    """An acquire undone."""

    name: str
    owner: str
    abandoned: bool


class SessionOut(BaseModel):
    """A session opened: holds and waiters that name it live as long as it does."""

    session: str = Field(description="The session's id, for acquire, extend and keepalive.")
    ttl: float = Field(description="Seconds it lasts after its last keepalive.")


class EndedHoldOut(BaseModel):
    """A hold the session kept that ended while the session lived."""

    namespace: str
    name: str
    owner: str
    token: int
    reason: str = Field(description="revoked (force-released) or released (by another client).")


class KeptSession(BaseModel):
    """One live session after the keepalive."""

    ttl: float = Field(description="Seconds it lasts from now unless kept alive again.")
    ended: list[EndedHoldOut] = Field(
        description="Holds it kept that ended since its last keepalive (each reported once)."
    )


class KeepaliveOut(BaseModel):
    """Each session named, in order: kept, or null once it has ended (with all it had)."""

    sessions: list[KeptSession | None]


class SessionRevokedOut(BaseModel):
    """A session ended, with its holds and waiters."""

    session: str
    revoked: bool


class ResourceOut(BaseModel):
    """A name's holders, waiters and last token."""

    name: str
    limit: int
    holders: list[Holder]
    waiters: list[Waiter]
    last_token: int
    namespace: str


class ListOut(BaseModel):
    """Names with holders or waiters."""

    locks: list[ResourceOut]


class RevokedOut(BaseModel):
    """The holds a force-release ended."""

    name: str
    revoked: list[Holder]


class CapabilitiesOut(BaseModel):
    """What the store promises."""

    safety: str = Field(description="linearizable, single-node or timing-dependent.")
    fencing: bool
    fair: bool
    durable: bool
    sessions: bool = Field(description="The store keeps sessions (/v1/sessions).")


class InfoOut(BaseModel):
    """The store's capabilities and this server's long-poll settings."""

    capabilities: CapabilitiesOut
    max_poll: float = Field(description="Longest wait of one acquire request, in seconds.")
    waiter_lease: float = Field(
        description="Seconds a waiter's place is kept between two polls of one request."
    )


class StatusOut(BaseModel):
    """Health or readiness."""

    status: str


class ErrorOut(BaseModel):
    """Every error: a code to match on and a message to show."""

    error: str = Field(
        description="invalid, not_found, timeout, not_held, lost, session_lost, revoked, "
        "unavailable, store_busy, store_refused or lock_error."
    )
    message: str
    name: str | None = None
    owner: str | None = None
    token: int | None = None
    holders: list[Holder] | None = Field(None, description="With timeout: who holds now.")


_ERRORS: dict[int, str] = {
    400: "Bad input (invalid): nothing was changed.",
    404: "No such route (not_found).",
    409: "Not granted in time (timeout, with the holders), or not the holder "
    "(not_held, lost, revoked), or the session named has ended (session_lost).",
    413: "The request body is too large (invalid).",
    415: "The request body is not JSON (invalid).",
    500: "The store refused the server's credentials or permissions (store_refused), "
    "or an unexpected error (lock_error). Not worth retrying.",
    503: "The store cannot be reached or the server is shutting down (unavailable, "
    "store_busy): retry with the same request_id.",
}

STORE_ERRORS = (400, 500, 503)
"""What any route that reaches the store may answer besides 200."""
LOCK_ERRORS = (*STORE_ERRORS, 413, 415)
"""What a lock operation with a JSON body may answer besides 200 (and 409)."""


def responses(ok: type[BaseModel], *errors: int) -> dict[int | str, dict[str, Any]]:
    """A route's documented answers: 200 with ``ok``, each error status with ErrorOut."""
    documented: dict[int | str, dict[str, Any]] = {200: {"model": ok}}
    for status in sorted(errors):
        documented[status] = {"model": ErrorOut, "description": _ERRORS[status]}
    return documented


def drop_422(document: dict[str, Any]) -> dict[str, Any]:
    """Remove the 422 answers FastAPI documents by default: this server answers 400."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    schemas = document.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return document
