"""The ``http://`` backend: a lockd server seen as just another store.

Every call is one HTTP/JSON request with keep-alive (httpx). Errors come back typed
through ``lockd.errors.ERROR_CODES``. Waits longer than the server's long-poll cap are
split into several polls with the same request id. A request that fails in transport or
gets 503 is retried with the same request id until its deadline, which the server's
request-id memory makes safe: a retried acquire or release applies once. An extend is
sent once: the SDK retries it, and a renewal must fail at once so the hold turns at_risk.

Each poll tells the server the whole wait left (``wait_total``), so the server keeps the
waiter's FIFO place between polls for its waiter lease (a few seconds), and a grant made
between two polls is kept for the next. A client that comes back after the lease has
lost its request: its acquire ends with AcquireTimeout. A cancelled acquire closes its
poll and *abandons* its request id, so a grant in flight is given back rather than
lost.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any
from urllib.parse import quote

import httpx

from lockd.backends.base import AcquireRequest, Backend, undo_on_cancel
from lockd.errors import (
    ERROR_CODES,
    AcquireTimeout,
    BackendUnavailable,
    ClientClosed,
    LockError,
    StoreRefused,
)
from lockd.model import (
    Capabilities,
    EndedHold,
    Grant,
    HolderInfo,
    KeepaliveAnswer,
    ResourceInfo,
    SafetyLevel,
    WaiterInfo,
)

__all__ = ["HttpBackend"]

RETRY_FIRST = 0.05
RETRY_MAX = 1.0
TRANSIENT_STATUS = {502, 503, 504}

# A connection reset before the HTTP client reads its details (TLS or not) leaves the
# stream without a socket, and the client library raises AttributeError instead of a
# transport error (seen on uvloop). It is a failed connection like any other.
_ResetOnArrival = AttributeError


class HttpBackend(Backend):
    """Talks to ``lockd serve`` at ``url`` (``http://host:port`` or ``https://...``)."""

    def __init__(self, url: str, *, timeout: float = 10.0, retry_for: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._retry_for = retry_for
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout)
        self.max_poll = 60.0
        self._background: set[asyncio.Future[None]] = set()
        self._closed = False
        self.capabilities = Capabilities(
            safety=SafetyLevel.TIMING_DEPENDENT, fencing=False, fair=False, durable=False,
            shared_across_processes=True,
        )  # fmt: skip

    async def open(self) -> None:
        """Learn the server's store capabilities and long-poll cap."""
        try:
            info = await self._call("GET", "/v1/info", deadline=time.monotonic() + self._retry_for)
        except BaseException:
            self._closed = True
            await self._http.aclose()
            raise
        caps = info["capabilities"]
        self.capabilities = Capabilities(
            safety=SafetyLevel.parse(caps["safety"]), fencing=bool(caps["fencing"]),
            fair=bool(caps["fair"]), durable=bool(caps["durable"]), shared_across_processes=True,
            sessions=bool(caps.get("sessions", False)),
        )  # fmt: skip
        self.max_poll = float(info["max_poll"])

    async def _acquire(self, req: AcquireRequest) -> Grant:
        rid = req.request_id or uuid.uuid4().hex
        # Whether the server queued, granted or has not yet seen the request, abandon
        # undoes it; the cancelled poll closes its connection, so the server drops it.
        return await undo_on_cancel(
            self._poll_acquire(
                req.namespace, req.name, req.owner, req.ttl, req.wait, req.limit, rid, req.session
            ),
            lambda: self._abandon(req.namespace, req.name, req.owner, rid),
            self._background,
        )

    async def _abandon(self, namespace: str, name: str, owner: str, request_id: str) -> None:
        body = {"owner": owner, "request_id": request_id}
        await self._call("POST", f"/v1/locks/{_path(name)}/abandon", namespace, json=body,
                         name=name, owner=owner)  # fmt: skip

    async def _poll_acquire(
        self,
        namespace: str,
        name: str,
        owner: str,
        ttl: float,
        wait: float | None,
        limit: int,
        request_id: str,
        session: str | None,
    ) -> Grant:
        start = time.monotonic()
        end = None if wait is None else start + wait
        while True:
            poll_sent = time.monotonic()
            left = None if end is None else max(0.0, end - poll_sent)
            poll = self.max_poll if left is None else min(left, self.max_poll)
            # wait_total tells the server whether another poll follows: then it keeps our
            # place in the queue (and a grant made meanwhile) until that poll arrives.
            body = {"owner": owner, "ttl": ttl, "wait": poll, "wait_total": left,
                    "limit": limit, "request_id": request_id}  # fmt: skip
            if session is not None:
                body["session"] = session
            try:
                data = await self._call(
                    "POST", f"/v1/locks/{_path(name)}/acquire", namespace, json=body,
                    deadline=(end or time.monotonic() + self._retry_for), read_timeout=poll,
                    name=name, owner=owner,
                )  # fmt: skip
            except AcquireTimeout:
                now = time.monotonic()
                if (end is not None and now >= end) or now - poll_sent < poll * 0.9:
                    raise  # our wait is over, or the server ended the poll early
                continue
            # The server's acquire began no earlier than our first poll was sent (at
            # start), and its store counts the queue time from then, across polls.
            return _grant(data)

    async def _release(
        self,
        namespace: str,
        name: str,
        owner: str,
        token: int | None,
        request_id: str | None,
        session: str | None,
    ) -> int:
        body: dict[str, Any] = {"owner": owner, "token": token,
                                "request_id": request_id or uuid.uuid4().hex}  # fmt: skip
        if session is not None:
            body["session"] = session
        data = await self._call("POST", f"/v1/locks/{_path(name)}/release", namespace, json=body,
                                name=name, owner=owner, token=token)  # fmt: skip
        return int(data["count"])

    async def _extend(
        self,
        namespace: str,
        name: str,
        owner: str,
        token: int | None,
        ttl: float,
        session: str | None,
    ) -> Grant:
        body: dict[str, Any] = {"owner": owner, "token": token, "ttl": ttl}
        if session is not None:
            body["session"] = session
        # One attempt: the SDK retries extends itself, and a renewal that fails must say so
        # at once (the hold turns at_risk), not after seconds of retrying in here.
        data = await self._call("POST", f"/v1/locks/{_path(name)}/extend", namespace, json=body,
                                deadline=time.monotonic(), name=name, owner=owner,
                                token=token)  # fmt: skip
        return _grant(data)

    async def _open_session(self, ttl: float) -> str:
        # A retry after a lost answer opens another session; the unused one just expires.
        data = await self._call("POST", "/v1/sessions", json={"ttl": ttl})
        return str(data["session"])

    async def _keepalive(self, session_ids: list[str]) -> list[KeepaliveAnswer | None]:
        # One attempt, as for an extend: the caller renews again, and must hear at once.
        data = await self._call("POST", "/v1/sessions/keepalive", json={"sessions": session_ids},
                                deadline=time.monotonic())  # fmt: skip
        return [None if item is None else _keepalive_answer(item) for item in data["sessions"]]

    async def _revoke_session(self, session_id: str) -> None:
        await self._call("DELETE", f"/v1/sessions/{_path(session_id)}")

    async def _inspect(self, namespace: str, name: str) -> ResourceInfo:
        return _info(await self._call("GET", f"/v1/locks/{_path(name)}", namespace))

    async def _list_locks(self, namespace: str, prefix: str) -> list[ResourceInfo]:
        data = await self._call("GET", "/v1/locks", namespace, params={"prefix": prefix})
        return [_info(item) for item in data["locks"]]

    async def _force_release(
        self, namespace: str, name: str, owner: str | None
    ) -> list[HolderInfo]:
        params = {} if owner is None else {"owner": owner}
        data = await self._call("DELETE", f"/v1/locks/{_path(name)}", namespace, params=params)
        return [_holder(h) for h in data["revoked"]]

    async def ping(self) -> None:
        """Ask the server whether its store answers."""
        await self._call("GET", "/readyz", deadline=time.monotonic())

    async def aclose(self) -> None:
        """Finish abandoning cancelled acquires, then close the connection pool; later
        calls raise ClientClosed."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self._closed = True
        await self._http.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        namespace: str | None = None,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        deadline: float | None = None,
        read_timeout: float = 0.0,
        name: str | None = None,
        owner: str | None = None,
        token: int | None = None,
    ) -> dict[str, Any]:
        """One request, retried while the server is unreachable or draining, until deadline."""
        query = dict(params or {})
        if namespace is not None:
            query["namespace"] = namespace
        deadline = time.monotonic() + self._retry_for if deadline is None else deadline
        timeout = httpx.Timeout(self._timeout, read=self._timeout + read_timeout)
        backoff = RETRY_FIRST
        error: LockError
        while True:
            if self._closed:
                raise ClientClosed(f"http backend for {self.url} is closed", name=name,
                                   owner=owner, token=token)  # fmt: skip
            try:
                response = await self._http.request(
                    method, path, json=json, params=query, timeout=timeout
                )
            except (httpx.TransportError, _ResetOnArrival) as exc:
                error = BackendUnavailable(
                    f"lockd server {self.url} unreachable: {exc!r}", name=name, owner=owner
                )
            else:
                if response.is_success:
                    data: dict[str, Any] = response.json()
                    return data
                error = _error(response, name, owner, token)
                if not isinstance(error, BackendUnavailable) or isinstance(error, StoreRefused):
                    raise error
            if time.monotonic() + backoff > deadline:
                raise error
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX)


def _keepalive_answer(item: dict[str, Any]) -> KeepaliveAnswer:
    ended = tuple(
        EndedHold(
            str(e["namespace"]), str(e["name"]), str(e["owner"]), int(e["token"]), str(e["reason"])
        )
        for e in item["ended"]
    )
    return KeepaliveAnswer(float(item["ttl"]), ended)


def _path(name: str) -> str:
    return quote(name, safe="")


def _error(
    response: httpx.Response, name: str | None, owner: str | None, token: int | None
) -> LockError:
    try:
        data = response.json()
        cls = ERROR_CODES.get(str(data.get("error")), LockError)
        message = str(data.get("message", response.text))
        name = data.get("name", name)
        owner = data.get("owner", owner)
        token = data.get("token", token)
    except (ValueError, AttributeError):
        cls, message = LockError, response.text
    if response.status_code in TRANSIENT_STATUS and not issubclass(cls, BackendUnavailable):
        cls = BackendUnavailable
    return cls(message, name=name, owner=owner, token=token)


def _grant(data: dict[str, Any]) -> Grant:
    return Grant(
        name=data["name"], owner=data["owner"], token=int(data["token"]), count=int(data["count"]),
        ttl=float(data["ttl"]), waited=float(data.get("waited", 0.0)),
    )  # fmt: skip


def _holder(h: dict[str, Any]) -> HolderInfo:
    return HolderInfo(
        owner=h["owner"], token=int(h["token"]), count=int(h["count"]),
        ttl_left=float(h["ttl_left"]), held_for=float(h["held_for"]),
        acquired_at=float(h["acquired_at"]),
    )  # fmt: skip


def _info(data: dict[str, Any]) -> ResourceInfo:
    return ResourceInfo(
        name=data["name"], namespace=data["namespace"], limit=int(data["limit"]),
        holders=tuple(_holder(h) for h in data["holders"]),
        waiters=tuple(WaiterInfo(owner=w["owner"], waited=float(w["waited"]))
                      for w in data["waiters"]),
        last_token=int(data["last_token"]),
    )  # fmt: skip
