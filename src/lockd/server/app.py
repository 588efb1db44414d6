"""The HTTP/JSON API: a thin shell over one Backend.

Handlers parse the request, call the backend, and turn lockd errors into responses
through one table (``STATUS``). The backend validates every value (``lockd.model``), so
bad input gets the same clear error over HTTP as in Python. Every error is
``{"error": code, "message": text}``; malformed bodies are 400, never 5xx; bodies that
are not JSON are 415, larger than ``MAX_BODY`` 413.

A waiting acquire is a bounded long-poll (``wait`` up to ``max_poll`` seconds; the SDK
polls again for longer, and ``lockd.server.waiters`` keeps its place in the queue
between polls). It races three things: the grant, the client disconnecting (it then
leaves the queue, at once or after the waiter lease when another poll is to follow, and
a grant made meanwhile is given back), and the server draining for shutdown (answered
503 at once so the client retries elsewhere).

The lock operations (acquire, release, extend, abandon) carry nearly all the traffic, so
requests to them skip FastAPI's request handling: ``_DirectRoute`` parses the body
with its model and calls the same endpoint function. FastAPI still routes the rest, and
documents every route in OpenAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict
from typing import Any, get_type_hints
from urllib.parse import unquote_to_bytes

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from lockd.backends import Backend, connect
from lockd.errors import AcquireTimeout, BackendUnavailable, InvalidRequest, LockError
from lockd.model import CONTROL_CHARACTERS, DEFAULT_NAMESPACE, Grant, check_wait
from lockd.server.schema import (
    LOCK_ERRORS,
    STORE_ERRORS,
    AbandonOut,
    GrantOut,
    InfoOut,
    KeepaliveOut,
    ListOut,
    ReleaseOut,
    ResourceOut,
    RevokedOut,
    SessionOut,
    SessionRevokedOut,
    StatusOut,
    drop_422,
    responses,
)
from lockd.server.waiters import Waiters

__all__ = ["MAX_POLL", "STATUS", "WAITER_LEASE", "create_app"]

MAX_POLL = 60.0
"""Longest ``wait`` one acquire request may long-poll, in seconds, unless set otherwise
(``create_app(max_poll=...)`` or the ``LOCKD_MAX_POLL`` environment variable)."""
WAITER_LEASE = 5.0
"""Seconds a waiter's place is kept after its poll ends, for its next poll (``create_app(
waiter_lease=...)`` or ``LOCKD_WAITER_LEASE``)."""

STATUS: dict[str, int] = {
    "invalid": 400,
    "safety_unavailable": 400,
    "not_found": 404,
    "timeout": 409,
    "not_held": 409,
    "lost": 409,
    "revoked": 409,
    "session_lost": 409,
    "unavailable": 503,
    "store_busy": 503,
    # The store refused the server's own credentials or permissions: the server is
    # misconfigured and retrying cannot help, so not one of the statuses (502-504)
    # that clients and proxies retry.
    "store_refused": 500,
    "lock_error": 500,
}
"""HTTP status of each error code: the one place errors meet HTTP."""

_OWNER_IDS = uuid.UUID("6f1c3a52-52d3-4c47-9a55-1a3c1f0e7d21")
"""The uuid5 namespace of owners derived from request ids."""


MAX_BODY = 64 * 1024
"""Largest request body accepted, in bytes; the largest valid one is a few KiB."""


class _Body(BaseModel):
    # Strict: JSON values are never coerced ("5" is not a number, true is not 1, 1.0 is
    # not an integer); an integer is a number.
    model_config = ConfigDict(extra="forbid", strict=True)


class AcquireBody(_Body):
    """Acquire ``name``: granted at once, or after waiting up to ``wait`` seconds."""

    owner: str | None = Field(
        None,
        description="Who holds. When omitted, one is made and returned: derived from "
        "request_id when given (so a retry is the same owner), random otherwise.",
    )
    ttl: float = Field(description="Seconds the hold lasts unless extended (0.1 to 604800).")
    wait: float = Field(
        0.0,
        description="Seconds this poll waits in the FIFO queue (0 to max_poll, see /v1/info).",
    )
    limit: int = Field(1, description="Holders allowed at once: 1 for a lock, N for a semaphore.")
    request_id: str | None = Field(None, description="Retries with the same id apply once.")
    session: str | None = Field(
        None,
        description="A session (POST /v1/sessions) of this ttl: the wait lives by it, and it "
        "keeps the hold (which lasts while any of its leases does); omitted: the hold has "
        "a lease of its own of ttl.",
    )
    wait_total: float | None = Field(
        None,
        description="The whole wait left, of which this poll is the first `wait` seconds; "
        "null: without end; omitted: equal to `wait`. When longer than `wait` (and "
        "request_id is given), the place in the queue is kept for `waiter_lease` seconds "
        "(see /v1/info) after this poll ends, for the next poll with the same request_id; "
        "a grant made meanwhile is kept for it. No poll within the lease: the request is "
        "abandoned.",
    )


class ReleaseBody(_Body):
    """Release one count of ``owner``'s hold."""

    owner: str
    token: int | None = Field(None, description="The grant's token; checked when given.")
    request_id: str | None = None
    session: str | None = Field(
        None, description="This session stops keeping the hold (no count left in it)."
    )


class AbandonBody(_Body):
    """Undo acquire ``request_id`` of ``owner``, whatever it reached."""

    owner: str
    request_id: str


class ExtendBody(_Body):
    """Make ``owner``'s hold last ``ttl`` seconds from now."""

    owner: str
    ttl: float
    token: int | None = None
    session: str | None = Field(
        None,
        description="Add this session (of this ttl) to the leases that keep the hold, "
        "instead of setting the hold's own lease.",
    )


class SessionBody(_Body):
    """Open a session of ``ttl`` seconds."""

    ttl: float = Field(description="Seconds it lasts after its last keepalive (0.1 to 604800).")


class KeepaliveBody(_Body):
    """Renew every session named, in one request."""

    sessions: list[str] = Field(description="Session ids (1 to 10,000).")


def _plain(record: object) -> dict[str, Any]:
    """A flat slotted dataclass (Grant, HolderInfo) as a dict: cheaper than ``asdict``."""
    return {field: getattr(record, field) for field in record.__slots__}  # type: ignore[attr-defined]


def error_response(code: str, message: str, **extra: Any) -> JSONResponse:
    """The one error shape: ``{"error": code, "message": text, ...}``."""
    return JSONResponse(
        {"error": code, "message": message, **extra}, status_code=STATUS.get(code, 500)
    )


router = APIRouter()


def _backend(request: Request) -> Backend:
    result: Backend = request.app.state.backend
    return result


@router.post(
    "/v1/locks/{name:path}/acquire",
    summary="Acquire a lock or semaphore slot",
    responses=responses(GrantOut, *LOCK_ERRORS, 409),
)
async def acquire(
    name: str, body: AcquireBody, request: Request, namespace: str = DEFAULT_NAMESPACE
) -> JSONResponse:
    """Grant at once or after a bounded wait; 409 with the holders when not granted."""
    max_poll: float = request.app.state.max_poll
    poll = check_wait(body.wait)
    assert poll is not None  # a number: the body's model says so
    if poll > max_poll:
        raise InvalidRequest(
            f"wait must be at most {max_poll:g} seconds per request; loop for longer waits",
            name=name,
        )
    total = check_wait(body.wait_total) if "wait_total" in body.model_fields_set else poll
    if total is not None and total < poll:
        raise InvalidRequest(f"wait_total must be at least wait, not {total}", name=name)
    owner = body.owner if body.owner is not None else _new_owner(body.request_id)
    # A poll that another poll will follow waits in the store for the whole wait left.
    keep = body.request_id is not None and (total is None or total > poll)
    backend = _backend(request)
    waiters: Waiters = request.app.state.waiters
    key = (namespace, name, owner, body.request_id or "")

    def start() -> Coroutine[Any, Any, Grant]:
        return backend.acquire(namespace, name, owner, ttl=body.ttl, wait=total if keep else poll,
                               limit=body.limit, request_id=body.request_id,
                               session=body.session)  # fmt: skip

    try:
        # With no wait and nothing to take up, there is nothing to race: answer directly.
        if poll == 0 and not keep and key not in waiters:
            grant = await start()
        else:
            grant = await waiters.poll(
                key, body.request_id, start, wait=poll if keep else None, keep=keep,
                gone=_disconnected(request), draining=request.app.state.draining.wait(),
            )  # fmt: skip
    except AcquireTimeout as exc:
        info = await backend.inspect(namespace, name)
        holders = [_plain(h) for h in info.holders]
        return error_response(exc.code, exc.message, owner=owner, holders=holders)
    return JSONResponse(_plain(grant))


def _new_owner(request_id: str | None) -> str:
    """An owner for an acquire that named none: derived from its request id, so that a
    retry is the same owner and applies once; random without one."""
    if request_id is None:
        return uuid.uuid4().hex
    return uuid.uuid5(_OWNER_IDS, request_id).hex


@router.post(
    "/v1/locks/{name:path}/release",
    summary="Release one count of a hold",
    responses=responses(ReleaseOut, *LOCK_ERRORS, 409),
)
async def release(
    name: str, body: ReleaseBody, request: Request, namespace: str = DEFAULT_NAMESPACE
) -> JSONResponse:
    """Only the holder may release; 409 otherwise."""
    backend = _backend(request)
    left = await backend.release(
        namespace, name, body.owner, body.token, body.request_id, body.session
    )
    return JSONResponse({"name": name, "owner": body.owner, "count": left, "released": left == 0})


@router.post(
    "/v1/locks/{name:path}/abandon",
    summary="Undo an acquire whose caller has gone",
    responses=responses(AbandonOut, *LOCK_ERRORS),
)
async def abandon(
    name: str, body: AbandonBody, request: Request, namespace: str = DEFAULT_NAMESPACE
) -> JSONResponse:
    """Queued: leaves the queue; granted: released once; not arrived yet: refused later."""
    waiters: Waiters = request.app.state.waiters
    await waiters.abandon((namespace, name, body.owner, body.request_id))
    await _backend(request).abandon(namespace, name, body.owner, body.request_id)
    return JSONResponse({"name": name, "owner": body.owner, "abandoned": True})


@router.post(
    "/v1/locks/{name:path}/extend",
    summary="Extend a hold",
    responses=responses(GrantOut, *LOCK_ERRORS, 409),
)
async def extend(
    name: str, body: ExtendBody, request: Request, namespace: str = DEFAULT_NAMESPACE
) -> JSONResponse:
    """Only the holder may extend; 409 otherwise."""
    grant = await _backend(request).extend(
        namespace, name, body.owner, body.token, body.ttl, body.session
    )
    return JSONResponse(_plain(grant))


@router.post(
    "/v1/sessions",
    summary="Open a session",
    responses=responses(SessionOut, *LOCK_ERRORS),
)
async def open_session(body: SessionBody, request: Request) -> JSONResponse:
    """A lease that many holds and waiters share, renewed for all by one keepalive."""
    session = await _backend(request).open_session(body.ttl)
    return JSONResponse({"session": session, "ttl": body.ttl})


@router.post(
    "/v1/sessions/keepalive",
    summary="Renew sessions",
    responses=responses(KeepaliveOut, *LOCK_ERRORS),
)
async def keepalive(body: KeepaliveBody, request: Request) -> JSONResponse:
    """Each session's ttl from now and the holds it kept that ended since, or null for
    one that has ended (with all it had)."""
    answers = await _backend(request).keepalive(body.sessions)
    return JSONResponse({"sessions": [None if a is None else asdict(a) for a in answers]})


@router.delete(
    "/v1/sessions/{session:path}",
    summary="End a session",
    response_model=None,
    responses=responses(SessionRevokedOut, *STORE_ERRORS),
)
async def revoke_session(session: str, request: Request) -> dict[str, Any]:
    """End a session now: its holds are released and its waiters told session_lost."""
    await _backend(request).revoke_session(session)
    return {"session": session, "revoked": True}


@router.get(
    "/v1/locks/{name:path}",
    summary="Holders, waiters and last token of a name",
    response_model=None,
    responses=responses(ResourceOut, *STORE_ERRORS),
)
async def inspect(
    name: str, request: Request, namespace: str = DEFAULT_NAMESPACE
) -> dict[str, Any]:
    """Holders (owner, token, count, ttl left), waiters in order, last token."""
    return asdict(await _backend(request).inspect(namespace, name))


@router.get(
    "/v1/locks",
    summary="Names with holders or waiters, by prefix",
    response_model=None,
    responses=responses(ListOut, *STORE_ERRORS),
)
async def list_locks(
    request: Request, prefix: str = "", namespace: str = DEFAULT_NAMESPACE
) -> dict[str, Any]:
    """Every held or awaited name starting with ``prefix``."""
    infos = await _backend(request).list_locks(namespace, prefix)
    return {"locks": [asdict(info) for info in infos]}


@router.delete(
    "/v1/locks/{name:path}",
    summary="Force-release a name (admin)",
    response_model=None,
    responses=responses(RevokedOut, *STORE_ERRORS),
)
async def force_release(
    name: str, request: Request, owner: str | None = None, namespace: str = DEFAULT_NAMESPACE
) -> dict[str, Any]:
    """Evict the holders (or one owner); their next extend or release gets 409 revoked."""
    evicted = await _backend(request).force_release(namespace, name, owner)
    return {"name": name, "revoked": [asdict(h) for h in evicted]}


@router.get(
    "/v1/info",
    summary="The store's capabilities and this server's limits",
    response_model=None,
    responses=responses(InfoOut),
)
async def info(request: Request) -> dict[str, Any]:
    """Safety level, fencing, fairness, durability of the store; the long-poll cap."""
    caps = _backend(request).capabilities
    return {
        "capabilities": {
            "safety": caps.safety.label,
            "fencing": caps.fencing,
            "fair": caps.fair,
            "durable": caps.durable,
            "sessions": caps.sessions,
        },
        "max_poll": request.app.state.max_poll,
        "waiter_lease": request.app.state.waiter_lease,
    }


@router.get(
    "/healthz",
    summary="The server process is up",
    response_model=None,
    responses=responses(StatusOut),
)
async def healthz() -> dict[str, str]:
    """Always ok while the process serves."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The store answers",
    response_model=None,
    responses=responses(StatusOut, 503),
)
async def readyz(request: Request) -> dict[str, str]:
    """503 while the store is unreachable or the server drains."""
    if request.app.state.draining.is_set():
        raise BackendUnavailable("server is shutting down")
    await _backend(request).ping()
    return {"status": "ready"}


async def _lock_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LockError)
    context = {k: v for k in ("name", "owner", "token") if (v := getattr(exc, k)) is not None}
    return error_response(exc.code, exc.message, **context)


def _malformed(errors: Sequence[Any]) -> JSONResponse:
    """400 naming each problem's field (``body`` when it is the body as a whole)."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
        for e in errors
    )
    return error_response("invalid", f"malformed request: {problems}")


async def _bad_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _malformed(exc.errors())


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    response = error_response("not_found" if exc.status_code == 404 else "invalid", str(exc.detail))
    response.status_code = exc.status_code
    if exc.status_code == 405:
        response.headers["allow"] = ", ".join(sorted(_allowed(request)))
    return response


def _allowed(request: Request) -> set[str]:
    """Every method some route serves at the request's path (routes share paths)."""
    methods: set[str] = set()
    for route in (*request.app.router.routes, *router.routes):
        matched = isinstance(route, Route) and route.matches(request.scope)[0] is not Match.NONE
        if matched and route.methods:
            methods |= route.methods
    return methods


def _refusal(status: int, message: str) -> JSONResponse:
    response = error_response("invalid", message)
    response.status_code = status
    return response


def _is_json(content_type: str) -> bool:
    """``application/json`` or ``application/*+json``, with or without parameters."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def _json_body(request: Request) -> bytes | JSONResponse:
    """The request's JSON body, or the 415/413 answer refusing it."""
    content_type = request.headers.get("content-type")
    if content_type is None:
        return _refusal(415, "the request body must be application/json; it has no content type")
    if not _is_json(content_type):
        return _refusal(415, f"the request body must be application/json, not {content_type!r}")
    too_big = _refusal(413, f"the request body is larger than {MAX_BODY} bytes")
    with contextlib.suppress(ValueError):
        if int(request.headers.get("content-length", "0")) > MAX_BODY:
            return too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            return too_big
    return bytes(body)


_LockEndpoint = Callable[[str, Any, Request, str], Awaitable[JSONResponse]]

_DIRECT: tuple[_LockEndpoint, ...] = (acquire, release, abandon, extend)
"""The endpoints ``_DirectRoute`` serves; each takes ``(name, body, request, namespace)``."""


class _DirectRoute(Route):
    """Serves requests to a lock endpoint without FastAPI's request handling.

    The body must be JSON (else 415) of at most MAX_BODY bytes (else 413); it goes
    through the endpoint's own model; the response and the errors (via the app's
    exception handlers) are the endpoint's.
    """

    def __init__(self, declared: APIRoute) -> None:
        endpoint: _LockEndpoint = declared.endpoint
        model: type[BaseModel] = get_type_hints(endpoint)["body"]

        async def handle(request: Request) -> Response:
            raw = await _json_body(request)
            if isinstance(raw, Response):
                return raw
            try:
                body = model.model_validate_json(raw)
            except ValidationError as exc:
                return _malformed(exc.errors())
            namespace = request.query_params.get("namespace", DEFAULT_NAMESPACE)
            return await endpoint(request.path_params["name"], body, request, namespace)

        super().__init__(declared.path, handle, methods=declared.methods, include_in_schema=False)


class _CheckedPath:
    """Refuses, before routing, a path or query that is not UTF-8 once percent-decoded
    (decoding it with replacement would make ``a%FF`` and ``a%FE`` one name), and a
    path with control characters (a newline would otherwise not match the routes)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = _path_problem(scope)
            if problem is not None:
                await _refusal(400, problem)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _path_problem(scope: Scope) -> str | None:
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
    try:
        path = unquote_to_bytes(raw_path).decode("utf-8")
        unquote_to_bytes(scope.get("query_string", b"")).decode("utf-8")
    except UnicodeDecodeError:
        return "the request path or query is not valid UTF-8 once percent-decoded"
    if CONTROL_CHARACTERS.search(path):
        return f"the request path must not contain control characters: {path!r}"
    return None


def create_app(
    store: str | Backend = "file://./lockd-data",
    *,
    max_poll: float | None = None,
    waiter_lease: float | None = None,
) -> FastAPI:
    """The ASGI app serving ``store`` (a URL, or an open Backend the caller closes).

    ``max_poll`` and ``waiter_lease`` default to the ``LOCKD_MAX_POLL`` and
    ``LOCKD_WAITER_LEASE`` environment variables, else ``MAX_POLL`` and ``WAITER_LEASE``.
    """
    poll = _seconds_setting("max_poll", max_poll, "LOCKD_MAX_POLL", MAX_POLL)
    lease = _seconds_setting("waiter_lease", waiter_lease, "LOCKD_WAITER_LEASE", WAITER_LEASE)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if isinstance(store, str):
            app.state.backend = connect(store)
            await app.state.backend.open()
        else:
            app.state.backend = store
        app.state.waiters = Waiters(app.state.backend, lease)
        try:
            yield
        finally:
            app.state.draining.set()
            await app.state.waiters.aclose()
            if isinstance(store, str):
                await app.state.backend.aclose()

    # The documentation pages load their scripts and styles from this server, not a CDN.
    app = FastAPIOffline(
        title="lockd",
        version="1",
        summary="Distributed locks with leases, fencing tokens and fair queues.",
        lifespan=lifespan,
    )
    document = app.openapi
    app.openapi = lambda: drop_422(document())  # type: ignore[method-assign]
    app.state.draining = asyncio.Event()
    app.state.max_poll = poll
    app.state.waiter_lease = lease
    app.include_router(router)
    # First in line, so lock requests also skip the documentation routes and FastAPI's
    # routing through the included router.
    app.router.routes[:0] = [
        _DirectRoute(route)
        for route in router.routes
        if isinstance(route, APIRoute) and route.endpoint in _DIRECT
    ]
    app.add_exception_handler(LockError, _lock_error)
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(_CheckedPath)
    return app


def _seconds_setting(what: str, given: float | None, variable: str, default: float) -> float:
    """A positive, finite number of seconds: given, else from the environment, else default."""
    value: object = given
    if value is None:
        value = os.environ.get(variable, default)
        with contextlib.suppress(ValueError):
            value = float(value)  # type: ignore[arg-type]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise InvalidRequest(
            f"{what} ({variable}) must be a positive number of seconds, not {value!r}"
        )
    return float(value)


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
