"""The HTTP API of a real ``lockd serve`` process: shapes, errors, long-poll, shutdown."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serverproc import ServerProcess, running_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(f"file://{tmp_path / 'store'}") as s:
        yield s


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def acquire(http: httpx.Client, name: str, **body: Any) -> httpx.Response:
    return http.post(f"/v1/locks/{name}/acquire", json={"ttl": 30, **body})


def test_acquire_generates_owner_and_returns_grant(http: httpx.Client) -> None:
    r = acquire(http, "job")
    assert r.status_code == 200
    grant = r.json()
    assert set(grant) >= {"name", "owner", "token", "ttl", "count"}
    assert grant["name"] == "job" and grant["count"] == 1 and grant["token"] >= 1
    assert len(grant["owner"]) >= 16
    assert 29 < grant["ttl"] <= 30


def test_busy_lock_answers_409_with_holders(http: httpx.Client) -> None:
    first = acquire(http, "job", owner="a").json()
    r = acquire(http, "job", owner="b", wait=0.2)
    assert r.status_code == 409
    body = r.json()
    assert body["error"] == "timeout"
    assert [h["owner"] for h in body["holders"]] == ["a"]
    assert body["holders"][0]["token"] == first["token"]


def test_reentrant_acquire_release_extend(http: httpx.Client) -> None:
    t1 = acquire(http, "job", owner="a").json()["token"]
    again = acquire(http, "job", owner="a").json()
    assert again["token"] == t1 and again["count"] == 2
    ext = http.post("/v1/locks/job/extend", json={"owner": "a", "ttl": 5}).json()
    assert ext["token"] == t1 and 4 < ext["ttl"] <= 5
    r = http.post("/v1/locks/job/release", json={"owner": "a", "token": t1})
    assert r.json() == {"name": "job", "owner": "a", "count": 1, "released": False}
    r = http.post("/v1/locks/job/release", json={"owner": "a"})
    assert r.json()["released"] is True
    assert http.get("/v1/locks/job").json()["holders"] == []


def test_release_or_extend_by_stranger_is_409_not_held(http: httpx.Client) -> None:
    acquire(http, "job", owner="a")
    for path, body in (("release", {"owner": "b"}), ("extend", {"owner": "b", "ttl": 5})):
        r = http.post(f"/v1/locks/job/{path}", json=body)
        assert r.status_code == 409
        assert r.json()["error"] == "not_held"
    assert [h["owner"] for h in http.get("/v1/locks/job").json()["holders"]] == ["a"]


def test_inspect_and_list(http: httpx.Client) -> None:
    acquire(http, "jobs/a", owner="x")
    acquire(http, "jobs/b", owner="y")
    acquire(http, "other", owner="z")
    info = http.get("/v1/locks/jobs/a").json()
    assert info["name"] == "jobs/a" and info["limit"] == 1
    holder = info["holders"][0]
    assert set(holder) == {"owner", "token", "count", "ttl_left", "held_for", "acquired_at"}
    assert info["last_token"] >= holder["token"]
    names = [i["name"] for i in http.get("/v1/locks", params={"prefix": "jobs/"}).json()["locks"]]
    assert names == ["jobs/a", "jobs/b"]


def test_names_with_slashes_and_escapes_round_trip(http: httpx.Client) -> None:
    name = "a/b c?d#e%f"
    from urllib.parse import quote

    r = http.post(f"/v1/locks/{quote(name, safe='')}/acquire", json={"ttl": 5, "owner": "o"})
    assert r.status_code == 200 and r.json()["name"] == name
    assert http.get(f"/v1/locks/{quote(name, safe='')}").json()["holders"][0]["owner"] == "o"


def test_force_release_revokes_and_fences(http: httpx.Client) -> None:
    t1 = acquire(http, "job", owner="a").json()["token"]
    r = http.delete("/v1/locks/job")
    assert [h["owner"] for h in r.json()["revoked"]] == ["a"]
    r = http.post("/v1/locks/job/extend", json={"owner": "a", "ttl": 5, "token": t1})
    assert r.status_code == 409 and r.json()["error"] == "revoked"
    t2 = acquire(http, "job", owner="b").json()["token"]
    assert t2 > t1


def test_request_id_retry_applies_once(http: httpx.Client) -> None:
    first = acquire(http, "job", owner="a", request_id="r1").json()
    retry = acquire(http, "job", owner="a", request_id="r1").json()
    assert retry["token"] == first["token"] and retry["count"] == 1
    acquire(http, "job", owner="a")  # count 2
    body = {"owner": "a", "request_id": "rel-1"}
    assert http.post("/v1/locks/job/release", json=body).json()["count"] == 1
    assert http.post("/v1/locks/job/release", json=body).json()["count"] == 1
    assert http.get("/v1/locks/job").json()["holders"][0]["count"] == 1


@pytest.mark.parametrize(
    ("body", "word"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": -1}, "ttl"),
        ({"ttl": 10**9}, "ttl"),
        ({"ttl": "soon"}, "ttl"),
        ({"ttl": 5, "wait": -1}, "wait"),
        ({"ttl": 5, "wait": 61}, "wait"),
        ({"ttl": 5, "limit": 0}, "limit"),
        ({"ttl": 5, "owner": ""}, "owner"),
        ({"ttl": 5, "owner": "x" * 300}, "owner"),
        ({"ttl": 5, "surprise": 1}, "surprise"),
        ({}, "ttl"),
        ([1, 2], "body"),
        ("text", "body"),
    ],
)
def test_bad_input_is_400_and_changes_nothing(http: httpx.Client, body: object, word: str) -> None:
    r = http.post("/v1/locks/job/acquire", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid"
    assert word in r.json()["message"]
    assert http.get("/v1/locks/job").json()["holders"] == []


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"\xff\xfe", b'{"ttl": 1e999}', b'{"ttl": NaN}', b"null",
     b'{"ttl": 5, "owner": "\\u0000"}', b'{"ttl": 5, "owner": "\\ud800"}', b"[" * 5000],
)  # fmt: skip
def test_hostile_bodies_never_5xx(http: httpx.Client, raw: bytes) -> None:
    r = http.post(
        "/v1/locks/job/acquire", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid"


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("op", ["release", "extend", "abandon"])
@pytest.mark.parametrize(
    "raw", [b"", b"{", b"[1]", b"null", b'{"owner": 5}', b'{"owner": "a", "nope": 1}', b"[" * 5000]
)
def test_bad_bodies_to_every_lock_route_are_400(http: httpx.Client, op: str, raw: bytes) -> None:
    acquire(http, "job", owner="a")
    r = http.post(f"/v1/locks/job/{op}", content=raw, headers=JSON)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid"
    assert r.json()["message"].startswith("malformed request: ")
    assert [h["owner"] for h in http.get("/v1/locks/job").json()["holders"]] == ["a"]


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "application/merge-patch+json"]
)
def test_other_json_content_types_are_served(http: httpx.Client, content_type: str) -> None:
    body = b'{"ttl": 5, "owner": "a"}'
    r = http.post("/v1/locks/job/acquire", content=body, headers={"content-type": content_type})
    assert r.status_code == 200 and r.json()["owner"] == "a"
    r = http.post("/v1/locks/job/release", content=b'{"owner": "a"}',
                  headers={"content-type": content_type})  # fmt: skip
    assert r.json()["released"] is True


def test_namespace_query_parameter(http: httpx.Client) -> None:
    r = http.post("/v1/locks/job/acquire", params={"namespace": "team-a"}, json={"ttl": 5})
    assert r.status_code == 200
    assert http.get("/v1/locks/job").json()["holders"] == []
    info = http.get("/v1/locks/job", params={"namespace": "team-a"}).json()
    assert info["namespace"] == "team-a" and len(info["holders"]) == 1
    r = http.post("/v1/locks/job/acquire", params={"namespace": "Bad!"}, json={"ttl": 5})
    assert r.status_code == 400 and "namespace" in r.json()["message"]


def test_wrong_method_on_a_lock_route_is_json_405(http: httpx.Client) -> None:
    r = http.put("/v1/locks/job/acquire", json={"ttl": 5})
    assert r.status_code == 405 and r.json()["error"] == "invalid"


def test_openapi_describes_the_lock_routes_and_their_bodies(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    ops = {"acquire": "AcquireBody", "release": "ReleaseBody", "extend": "ExtendBody",
           "abandon": "AbandonBody"}  # fmt: skip
    for op, model in ops.items():
        post = spec["paths"][f"/v1/locks/{{name}}/{op}"]["post"]
        schema = post["requestBody"]["content"]["application/json"]["schema"]
        assert schema["$ref"] == f"#/components/schemas/{model}"
        assert {p["name"] for p in post["parameters"]} == {"name", "namespace"}
    acquire_body = spec["components"]["schemas"]["AcquireBody"]
    assert acquire_body["required"] == ["ttl"]
    assert set(acquire_body["properties"]) == {
        "owner",
        "ttl",
        "wait",
        "limit",
        "request_id",
        "session",
        "wait_total",
    }


def test_oversized_name_is_400(http: httpx.Client) -> None:
    r = acquire(http, "n" * 600)
    assert r.status_code == 400 and "name" in r.json()["message"]


def test_unknown_route_is_json_404(http: httpx.Client) -> None:
    r = http.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_health_ready_openapi_docs(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"status": "ready"}
    spec = http.get("/openapi.json").json()
    assert "/v1/locks/{name}/acquire" in spec["paths"]
    assert http.get("/docs").status_code == 200
    info = http.get("/v1/info").json()
    assert info["capabilities"]["safety"] == "linearizable" and info["max_poll"] == 60


def test_long_poll_wakes_on_release(http: httpx.Client, server: ServerProcess) -> None:
    acquire(http, "job", owner="a")
    result: dict[str, Any] = {}

    def waiter() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            start = time.monotonic()
            result["grant"] = acquire(c, "job", owner="b", wait=20).json()
            result["took"] = time.monotonic() - start

    thread = threading.Thread(target=waiter)
    thread.start()
    _wait_for(lambda: len(http.get("/v1/locks/job").json()["waiters"]) == 1)
    released_at = time.monotonic()
    http.post("/v1/locks/job/release", json={"owner": "a"})
    thread.join(10)
    assert result["grant"]["owner"] == "b"
    assert result["took"] < 20
    assert time.monotonic() - released_at < 1.0


def test_disconnected_waiter_leaves_queue(http: httpx.Client, server: ServerProcess) -> None:
    acquire(http, "job", owner="a")

    def waiter() -> None:
        with httpx.Client(base_url=server.url, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
            acquire(c, "job", owner="b", wait=30)

    thread = threading.Thread(target=waiter)
    thread.start()
    _wait_for(lambda: len(http.get("/v1/locks/job").json()["waiters"]) == 1)
    thread.join(5)
    _wait_for(lambda: http.get("/v1/locks/job").json()["waiters"] == [], timeout=2)
    http.post("/v1/locks/job/release", json={"owner": "a"})
    assert http.get("/v1/locks/job").json()["holders"] == []  # nobody was granted


def test_sigterm_answers_waiting_requests_and_keeps_holds(tmp_path: Path) -> None:
    store = f"file://{tmp_path / 'store'}"
    with running_server(store) as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            token = acquire(http, "job", owner="a").json()["token"]
            answers: list[httpx.Response] = []
            thread = threading.Thread(
                target=lambda: answers.append(
                    httpx.post(
                        f"{server.url}/v1/locks/job/acquire",
                        timeout=30,
                        json={"ttl": 30, "owner": "b", "wait": 50},
                    )
                )
            )
            thread.start()
            _wait_for(lambda: len(http.get("/v1/locks/job").json()["waiters"]) == 1)
        started = time.monotonic()
        assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # uvicorn re-raises it
        thread.join(5)
        assert time.monotonic() - started < 5
        assert answers[0].status_code == 503
        assert answers[0].json()["error"] == "unavailable"
    with running_server(store) as again, httpx.Client(base_url=again.url) as http:
        holders = http.get("/v1/locks/job").json()["holders"]
        assert [(h["owner"], h["token"]) for h in holders] == [("a", token)]


def _wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_clients_opened_at_once_share_one_backend(server: ServerProcess) -> None:
    """Opening a network store suspends; clients opening it meanwhile must not make a
    second one (it would never be closed)."""
    import lockd

    clients: list[lockd.Client] = []
    barrier = threading.Barrier(6)

    def open_one() -> None:
        barrier.wait()
        clients.append(lockd.Client(server.url))

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    try:
        assert len({id(c._session.backend) for c in clients}) == 1
    finally:
        for client in clients:
            client.close()


DOCUMENTED = {
    ("post", "/v1/locks/{name}/acquire"): {200, 400, 409, 413, 415, 500, 503},
    ("post", "/v1/locks/{name}/release"): {200, 400, 409, 413, 415, 500, 503},
    ("post", "/v1/locks/{name}/extend"): {200, 400, 409, 413, 415, 500, 503},
    ("post", "/v1/locks/{name}/abandon"): {200, 400, 413, 415, 500, 503},
    ("get", "/v1/locks/{name}"): {200, 400, 500, 503},
    ("delete", "/v1/locks/{name}"): {200, 400, 500, 503},
    ("get", "/v1/locks"): {200, 400, 500, 503},
    ("post", "/v1/sessions"): {200, 400, 413, 415, 500, 503},
    ("post", "/v1/sessions/keepalive"): {200, 400, 413, 415, 500, 503},
    ("delete", "/v1/sessions/{session}"): {200, 400, 500, 503},
    ("get", "/v1/info"): {200},
    ("get", "/healthz"): {200},
    ("get", "/readyz"): {200, 503},
}
"""What each route answers (the tests of this folder see each of these statuses)."""


def _schema(spec: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    ref = response["content"]["application/json"]["schema"]["$ref"]
    found: dict[str, Any] = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return found


def test_openapi_documents_the_real_statuses_and_bodies(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    routes = {(m, p): op for p, ops in spec["paths"].items() for m, op in ops.items()}
    assert set(routes) == set(DOCUMENTED)
    for route, statuses in DOCUMENTED.items():
        answers = routes[route]["responses"]
        assert {int(s) for s in answers} == statuses, route
        for status in answers:
            assert _schema(spec, answers[status])["properties"], (route, status)
    assert "422" not in http.get("/openapi.json").text
    # The documented bodies are the bodies the server sends.
    grant = acquire(http, "job", owner="a").json()
    post = routes[("post", "/v1/locks/{name}/acquire")]["responses"]
    assert set(_schema(spec, post["200"])["properties"]) == set(grant)
    busy = acquire(http, "job", owner="b").json()
    assert set(busy) <= set(_schema(spec, post["409"])["properties"])
    got = routes[("get", "/v1/locks/{name}")]["responses"]
    assert set(_schema(spec, got["200"])["properties"]) == set(http.get("/v1/locks/job").json())
    info = routes[("get", "/v1/info")]["responses"]
    assert set(_schema(spec, info["200"])["properties"]) == set(http.get("/v1/info").json())
    release = routes[("post", "/v1/locks/{name}/release")]["responses"]
    body = http.post("/v1/locks/job/release", json={"owner": "a"}).json()
    assert set(_schema(spec, release["200"])["properties"]) == set(body)
    opened = http.post("/v1/sessions", json={"ttl": 30}).json()
    answers = routes[("post", "/v1/sessions")]["responses"]
    assert set(_schema(spec, answers["200"])["properties"]) == set(opened)
    kept = http.post("/v1/sessions/keepalive", json={"sessions": [opened["session"]]}).json()
    answers = routes[("post", "/v1/sessions/keepalive")]["responses"]
    assert set(_schema(spec, answers["200"])["properties"]) == set(kept)
    kept_schema = spec["components"]["schemas"]["KeptSession"]
    assert set(kept_schema["properties"]) == set(kept["sessions"][0])
    ended = http.delete(f"/v1/sessions/{opened['session']}").json()
    answers = routes[("delete", "/v1/sessions/{session}")]["responses"]
    assert set(_schema(spec, answers["200"])["properties"]) == set(ended)


def test_docs_load_without_any_other_host(http: httpx.Client) -> None:
    import re

    page = http.get("/docs")
    assert page.status_code == 200
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page.text), page.text
    assets = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", page.text)
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
    for asset in assets:
        r = http.get(asset)
        assert r.status_code == 200 and len(r.content) > 1000, asset
    assert "/openapi.json" in page.text


def test_sessions_over_http(http: httpx.Client) -> None:
    """One keepalive request keeps every hold of a session; ending it frees them all."""
    assert http.get("/v1/info").json()["capabilities"]["sessions"] is True
    opened = http.post("/v1/sessions", json={"ttl": 1})
    assert opened.status_code == 200
    sid = opened.json()["session"]
    assert opened.json()["ttl"] == 1
    for name in ("s1", "s2"):
        r = acquire(http, name, owner="a", ttl=1, session=sid)
        assert r.status_code == 200, r.text
    for _ in range(4):  # 2 s: twice the ttl, kept by keepalives alone
        kept = http.post("/v1/sessions/keepalive", json={"sessions": [sid, "other"]})
        assert kept.json() == {"sessions": [{"ttl": 1, "ended": []}, None]}
        time.sleep(0.5)
    assert [h["owner"] for h in http.get("/v1/locks/s2").json()["holders"]] == ["a"]
    assert http.delete("/v1/locks/s1").status_code == 200  # force-released: told once
    kept = http.post("/v1/sessions/keepalive", json={"sessions": [sid]}).json()
    ended = [{"namespace": "default", "name": "s1", "owner": "a", "token": 1, "reason": "revoked"}]
    assert kept == {"sessions": [{"ttl": 1, "ended": ended}]}
    assert http.delete(f"/v1/sessions/{sid}").json() == {"session": sid, "revoked": True}
    assert http.get("/v1/locks/s1").json()["holders"] == []
    lost = acquire(http, "s1", owner="a", ttl=1, session=sid)
    assert (lost.status_code, lost.json()["error"]) == (409, "session_lost")
    moved = http.post("/v1/locks/s1/acquire", json={"owner": "b", "ttl": 30})
    extended = http.post("/v1/locks/s1/extend", json={"owner": "b", "ttl": 1, "session": sid})
    assert moved.status_code == 200
    assert (extended.status_code, extended.json()["error"]) == (409, "session_lost")


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/sessions", {"ttl": 0}),
        ("/v1/sessions", {"ttl": "5"}),
        ("/v1/sessions", {"ttl": 5, "extra": 1}),
        ("/v1/sessions/keepalive", {"sessions": []}),
        ("/v1/sessions/keepalive", {"sessions": "abc"}),
        ("/v1/sessions/keepalive", {"sessions": ["a\u0000"]}),
        ("/v1/locks/x/acquire", {"ttl": 5, "session": ""}),
        ("/v1/locks/x/acquire", {"ttl": 5, "session": 7}),
    ],
)
def test_bad_session_input_is_400(http: httpx.Client, route: str, body: object) -> None:
    r = http.post(route, json=body)
    assert (r.status_code, r.json()["error"]) == (400, "invalid"), r.text
    assert http.get("/v1/locks/x").json()["last_token"] == 0
