"""Contract item 11: bad input (empty, oversized or unprintable names and owners, ttl or
wait out of range, limit < 1, unknown namespace, malformed requests, unknown store URLs)
is refused with ``InvalidRequest`` (also a ``ValueError``), with a message that names
what was wrong, and changes nothing. Out-of-range durations are never reinterpreted.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import pytest

import lockd
from lockd import InvalidRequest, LockError
from lockd.model import MAX_LIMIT, MAX_NAME_BYTES, MAX_TTL, MAX_WAIT, MIN_TTL
from tests.conformance.helpers import NS, open_backend, snapshot

NAN = math.nan
INF = math.inf

BAD_ACQUIRES: list[tuple[str, dict[str, Any]]] = [
    ("name", {"name": ""}),
    ("name", {"name": "x" * (MAX_NAME_BYTES + 1)}),
    ("name", {"name": "é" * (MAX_NAME_BYTES // 2 + 1)}),  # few characters, too many bytes
    ("name", {"name": "line\nbreak"}),
    ("name", {"name": "nul\x00"}),
    ("name", {"name": "tab\there"}),
    ("name", {"name": "del\x7f"}),
    ("name", {"name": "surrogate\ud800"}),
    ("name", {"name": 42}),
    ("name", {"name": None}),
    ("owner", {"owner": ""}),
    ("owner", {"owner": "o" * 257}),
    ("owner", {"owner": "bell\x07"}),
    ("owner", {"owner": 7}),
    ("ttl", {"ttl": 0}),
    ("ttl", {"ttl": -1}),
    ("ttl", {"ttl": MIN_TTL / 2}),
    ("ttl", {"ttl": NAN}),
    ("ttl", {"ttl": INF}),
    ("ttl", {"ttl": MAX_TTL * 2}),
    ("ttl", {"ttl": True}),
    ("ttl", {"ttl": "5"}),
    ("ttl", {"ttl": None}),
    ("ttl", {"ttl": timedelta(0)}),
    ("wait", {"wait": -1}),
    ("wait", {"wait": -0.001}),
    ("wait", {"wait": NAN}),
    ("wait", {"wait": INF}),
    ("wait", {"wait": MAX_WAIT * 2}),
    ("wait", {"wait": True}),
    ("wait", {"wait": "1"}),
    ("wait", {"wait": timedelta(seconds=-1)}),
    ("limit", {"limit": 0}),
    ("limit", {"limit": -1}),
    ("limit", {"limit": True}),
    ("limit", {"limit": 1.5}),
    ("limit", {"limit": "2"}),
    ("limit", {"limit": MAX_LIMIT + 1}),
    ("namespace", {"namespace": ""}),
    ("namespace", {"namespace": "Upper"}),
    ("namespace", {"namespace": "has space"}),
    ("namespace", {"namespace": "-leading"}),
    ("namespace", {"namespace": "n" * 65}),
    ("namespace", {"namespace": "a/b"}),
    ("namespace", {"namespace": 3}),
    ("request_id", {"request_id": ""}),
    ("request_id", {"request_id": "r" * 129}),
    ("request_id", {"request_id": "new\nline"}),
]


def _ids(cases: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [f"{field}={next(iter(kw.values()))!r}"[:40] for field, kw in cases]


async def _state(backend: lockd.Backend) -> tuple[object, ...]:
    held = snapshot(await backend.inspect(NS, "held"))
    names = tuple(i.name for i in await backend.list_locks(NS))
    return held, names


@pytest.mark.parametrize(("field", "bad"), BAD_ACQUIRES, ids=_ids(BAD_ACQUIRES))
async def test_backend_refuses_bad_acquires(
    backend: lockd.Backend, field: str, bad: dict[str, Any]
) -> None:
    await backend.acquire(NS, "held", "holder", ttl=5, wait=0)
    before = await _state(backend)
    # Valid, this request would be refused for another reason (AcquireTimeout: "held"
    # is taken), so only validation can make it raise InvalidRequest.
    call: dict[str, Any] = {
        "namespace": NS, "name": "held", "owner": "intruder", "ttl": 5, "wait": 0, "limit": 1,
        "request_id": None,
    }  # fmt: skip
    call.update(bad)
    with pytest.raises(InvalidRequest, match=field) as refused:
        await backend.acquire(call.pop("namespace"), call.pop("name"), call.pop("owner"), **call)
    assert isinstance(refused.value, ValueError)
    assert isinstance(refused.value, LockError)
    assert await _state(backend) == before


async def test_backend_accepts_the_boundaries(backend: lockd.Backend) -> None:
    longest = "n" * MAX_NAME_BYTES
    grant = await backend.acquire(NS, longest, "o" * 256, ttl=MIN_TTL, wait=0)
    assert grant.count == 1
    grant = await backend.acquire(NS, "edge", "a", ttl=timedelta(seconds=2), wait=0)  # type: ignore[arg-type]
    assert 1.5 < grant.ttl <= 2
    grant = await backend.acquire(NS, "wide", "a", ttl=MAX_TTL, wait=0, limit=MAX_LIMIT)
    assert (await backend.inspect(NS, "wide")).limit == MAX_LIMIT
    ns = "a" + "b" * 63
    await backend.acquire(ns, "x", "a", ttl=5, wait=0)
    assert [i.name for i in await backend.list_locks(ns)] == ["x"]


async def test_backend_refuses_a_limit_other_than_the_held_one(backend: lockd.Backend) -> None:
    await backend.acquire(NS, "held", "holder", ttl=5, wait=0)
    before = await _state(backend)
    with pytest.raises(InvalidRequest, match="limit") as refused:
        await backend.acquire(NS, "held", "intruder", ttl=5, wait=0, limit=2)
    assert refused.value.name == "held"
    assert await _state(backend) == before


BAD_RELEASES: list[tuple[str, dict[str, Any]]] = [
    ("name", {"name": ""}),
    ("owner", {"owner": ""}),
    ("namespace", {"namespace": "NS"}),
    ("token", {"token": 0}),
    ("token", {"token": -1}),
    ("token", {"token": True}),
    ("token", {"token": "1"}),
    ("token", {"token": 1.0}),
    ("request_id", {"request_id": "r" * 129}),
]


@pytest.mark.parametrize(("field", "bad"), BAD_RELEASES, ids=_ids(BAD_RELEASES))
async def test_backend_refuses_bad_releases(
    backend: lockd.Backend, field: str, bad: dict[str, Any]
) -> None:
    grant = await backend.acquire(NS, "held", "holder", ttl=5, wait=0)
    before = await _state(backend)
    call: dict[str, Any] = {
        "namespace": NS, "name": "held", "owner": "holder", "token": grant.token,
        "request_id": None,
    }  # fmt: skip
    call.update(bad)
    with pytest.raises(InvalidRequest, match=field):
        await backend.release(**call)
    assert await _state(backend) == before


BAD_EXTENDS: list[tuple[str, dict[str, Any]]] = [
    ("ttl", {"ttl": 0}),  # never "expire now"
    ("ttl", {"ttl": -5}),
    ("ttl", {"ttl": NAN}),
    ("ttl", {"ttl": MAX_TTL + 1}),
    ("ttl", {"ttl": False}),
    ("name", {"name": "\n"}),
    ("owner", {"owner": None}),
    ("token", {"token": -3}),
]


@pytest.mark.parametrize(("field", "bad"), BAD_EXTENDS, ids=_ids(BAD_EXTENDS))
async def test_backend_refuses_bad_extends(
    backend: lockd.Backend, field: str, bad: dict[str, Any]
) -> None:
    grant = await backend.acquire(NS, "held", "holder", ttl=5, wait=0)
    before = await _state(backend)
    call: dict[str, Any] = {
        "namespace": NS, "name": "held", "owner": "holder", "token": grant.token, "ttl": 3,
    }  # fmt: skip
    call.update(bad)
    with pytest.raises(InvalidRequest, match=field):
        await backend.extend(**call)
    assert await _state(backend) == before
    # The hold keeps its 5 s lease: an extend, had it applied, would leave at most 3 s.
    assert (await backend.inspect(NS, "held")).holders[0].ttl_left > 3


async def test_backend_refuses_bad_reads_and_admin_calls(backend: lockd.Backend) -> None:
    await backend.acquire(NS, "held", "holder", ttl=5, wait=0)
    before = await _state(backend)
    bad: Any = None
    with pytest.raises(InvalidRequest, match="name"):
        await backend.inspect(NS, "")
    with pytest.raises(InvalidRequest, match="namespace"):
        await backend.inspect("Bad!", "held")
    with pytest.raises(InvalidRequest, match="prefix"):
        await backend.list_locks(NS, "\x00")
    with pytest.raises(InvalidRequest, match="prefix"):
        await backend.list_locks(NS, bad)
    with pytest.raises(InvalidRequest, match="name"):
        await backend.force_release(NS, "")
    # An empty owner is not "every owner".
    with pytest.raises(InvalidRequest, match="owner"):
        await backend.force_release(NS, "held", "")
    with pytest.raises(InvalidRequest, match="namespace"):
        await backend.force_release("", "held")
    assert await _state(backend) == before


SDK_BAD_LOCKS: list[tuple[str, dict[str, Any]]] = [
    ("name", {"name": ""}),
    ("name", {"name": "x" * (MAX_NAME_BYTES + 1)}),
    ("name", {"name": "a\nb"}),
    ("ttl", {"ttl": 0}),
    ("ttl", {"ttl": -1}),
    ("ttl", {"ttl": NAN}),
    ("ttl", {"ttl": MAX_TTL * 2}),
    ("ttl", {"ttl": True}),
    ("wait", {"wait": -1}),
    ("wait", {"wait": NAN}),
    ("limit", {"limit": 0}),
    ("limit", {"limit": -2}),
    ("owner", {"owner": ""}),
    ("owner", {"owner": "a\rb"}),
    ("owner", {"owner": "o" * 257}),
]


def _client_state(client: lockd.Client) -> tuple[object, ...]:
    return snapshot(client.inspect("held")), tuple(i.name for i in client.list_locks())


@pytest.mark.parametrize(("field", "bad"), SDK_BAD_LOCKS, ids=_ids(SDK_BAD_LOCKS))
def test_client_refuses_bad_lock_options(
    client: lockd.Client, field: str, bad: dict[str, Any]
) -> None:
    held = client.lock("held", ttl=5)
    held.acquire()
    before = _client_state(client)
    options: dict[str, Any] = {"name": "held", "ttl": 5, **bad}

    def use() -> None:  # refused when the lock is made, or at the latest when used
        client.lock(options.pop("name"), **options).acquire()

    with pytest.raises(InvalidRequest, match=field):
        use()
    assert _client_state(client) == before


@pytest.mark.parametrize(("field", "bad"), SDK_BAD_LOCKS, ids=_ids(SDK_BAD_LOCKS))
async def test_async_client_refuses_bad_lock_options(
    aclient: lockd.AsyncClient, field: str, bad: dict[str, Any]
) -> None:
    options: dict[str, Any] = {"name": "held", "ttl": 5, **bad}

    async def use() -> None:
        await aclient.lock(options.pop("name"), **options).acquire()

    with pytest.raises(InvalidRequest, match=field):
        await use()
    info = await aclient.inspect("held")
    assert info.holders == ()
    assert await aclient.list_locks() == []


def test_client_refuses_bad_calls_on_a_held_lock(client: lockd.Client) -> None:
    lock = client.lock("held", ttl=5)
    lock.acquire()
    before = _client_state(client)
    with pytest.raises(InvalidRequest, match="wait"):
        lock.acquire(wait=-1)
    with pytest.raises(InvalidRequest, match="ttl"):
        lock.extend(0)  # refused, not "expire now"
    with pytest.raises(InvalidRequest, match="ttl"):
        lock.extend(timedelta(seconds=-1))
    with pytest.raises(InvalidRequest, match="limit"):
        client.semaphore("held", 0)
    with pytest.raises(InvalidRequest, match="name"):
        client.inspect("")
    with pytest.raises(InvalidRequest, match="prefix"):
        client.list_locks("\t")
    with pytest.raises(InvalidRequest, match="name"):
        client.force_release("bad\nname")
    with pytest.raises(InvalidRequest, match="owner"):
        client.force_release("held", owner="")
    assert _client_state(client) == before
    assert client.inspect("held").holders[0].ttl_left > 2  # not cut short by a bad extend
    assert lock.state is lockd.LockState.HELD
    lock.release()


@pytest.mark.parametrize("namespace", ["", "Caps", "white space", "x" * 65, "ünï"])
def test_clients_refuse_a_bad_namespace(store_url: str, namespace: str) -> None:
    with pytest.raises(InvalidRequest, match="namespace"):
        lockd.Client(store_url, namespace=namespace)
    with pytest.raises(InvalidRequest, match="namespace"):
        lockd.AsyncClient(store_url, namespace=namespace)


def _bad_urls(store_url: str) -> list[str]:
    _, rest = store_url.split("://", 1)
    return [
        f"nope://{rest}",
        rest,  # no scheme at all
        f"{store_url}?bogus=1",
        "",
    ]


def test_clients_refuse_a_bad_store_url(store_url: str) -> None:
    for url in _bad_urls(store_url):
        with pytest.raises(InvalidRequest):
            lockd.Client(url)
        with pytest.raises(InvalidRequest):
            lockd.AsyncClient(url)
    with pytest.raises(InvalidRequest, match="scheme"):
        lockd.Client(_bad_urls(store_url)[0])
    # Nothing was left open: the real store opens and works.
    with lockd.Client(store_url) as client, client.lock("ok", ttl=5) as lock:
        assert lock.owned()


async def test_connect_refuses_a_bad_store_url(store_url: str) -> None:
    for url in _bad_urls(store_url):
        with pytest.raises(InvalidRequest):
            await open_backend(url)
    backend = await open_backend(store_url)
    try:
        grant = await backend.acquire(NS, "ok", "a", ttl=5, wait=0)
        assert grant.count == 1
    finally:
        await backend.aclose()
