"""What the server refuses, and how: paths, JSON types, content types, sizes, methods."""

from __future__ import annotations

import json
import socket
import unicodedata
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from lockd.errors import InvalidRequest
from lockd.model import check_name
from tests.serverproc import ServerProcess, running_server

JSON = {"content-type": "application/json"}

NEWER_UNICODE = "\U0001f6dc"
"""WIRELESS, assigned in Unicode 15.0: unassigned in the tables of Python 3.11."""
newer_unicode = pytest.mark.skipif(
    unicodedata.category(NEWER_UNICODE) != "Cn",
    reason=f"this Python's Unicode {unicodedata.unidata_version} has U+1F6DC: "
    "no newer character to try (the server runs on the same Python)",
)
"""Only this case depends on the Unicode version of the running Python."""
NONCHARACTER = "\ufdd0"
"""Unassigned in every Unicode version (a noncharacter), as a newer character is to an
older server."""
UNPRINTABLE_NAMES = [
    "\u00a0nbsp",  # NO-BREAK SPACE
    "zero\u200bwidth",  # ZERO WIDTH SPACE
    "a\u2028b",  # LINE SEPARATOR
    "\ue000",  # private use
    "\U0010fffd",  # private use, plane 16
    f"sale-{NONCHARACTER}",
]
"""Names ``str.isprintable()`` calls unprintable in every Python, and lockd accepts."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(f"file://{tmp_path_factory.mktemp('input') / 'store'}") as s:
        yield s


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c
        for info in c.get("/v1/locks").json()["locks"]:  # the next test starts empty
            c.delete(f"/v1/locks/{info['name']}")


def nothing_held(http: httpx.Client) -> bool:
    locks: list[object] = http.get("/v1/locks").json()["locks"]
    return locks == []


def assert_invalid(r: httpx.Response, word: str, status: int = 400) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == "invalid"
    assert word in body["message"], body["message"]


@pytest.mark.parametrize("path", ["a%FF", "a%FE", "%C3", "a%ED%A0%80"])
def test_invalid_utf8_in_the_path_is_400(http: httpx.Client, path: str) -> None:
    r = http.post(f"/v1/locks/{path}/acquire", json={"ttl": 5, "owner": "o"})
    assert_invalid(r, "UTF-8")
    assert_invalid(http.get(f"/v1/locks/{path}"), "UTF-8")
    assert nothing_held(http)


def test_invalid_utf8_in_the_query_is_400(http: httpx.Client) -> None:
    r = http.post("/v1/locks/job/acquire?namespace=a%FF", json={"ttl": 5, "owner": "o"})
    assert_invalid(r, "UTF-8")
    assert_invalid(http.get("/v1/locks?prefix=j%FF"), "UTF-8")


@pytest.mark.parametrize("char", ["%0A", "%0D", "%00", "%09", "%7F", "%C2%85"])
def test_control_characters_in_a_name_are_400(http: httpx.Client, char: str) -> None:
    r = http.post(f"/v1/locks/a{char}b/acquire", json={"ttl": 5, "owner": "o"})
    assert_invalid(r, "control characters")
    assert_invalid(http.get(f"/v1/locks/a{char}b"), "control characters")
    assert nothing_held(http)


@pytest.mark.parametrize("char", [NONCHARACTER, pytest.param(NEWER_UNICODE, marks=newer_unicode)])
def test_a_character_newer_than_the_servers_unicode_is_a_name(
    http: httpx.Client, char: str
) -> None:
    from urllib.parse import quote

    name = f"sale-{char}"
    r = http.post(f"/v1/locks/{quote(name)}/acquire", json={"ttl": 5, "owner": "o"})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == name


@pytest.mark.parametrize("name", UNPRINTABLE_NAMES)
def test_name_rule_accepts_what_isprintable_refuses(name: str) -> None:
    """Only control characters are refused, whatever Python's Unicode tables say."""
    assert not name.isprintable()
    assert check_name(name) == name


@newer_unicode
def test_name_rule_accepts_a_character_newer_than_pythons_unicode() -> None:
    assert not NEWER_UNICODE.isprintable()
    assert check_name(NEWER_UNICODE) == NEWER_UNICODE


@pytest.mark.parametrize("name", ["a\nb", "\x00", "\x1f", "\x7f", "\x85", "\x9f"])
def test_name_rule_refuses_control_characters(name: str) -> None:
    """C0, DEL and C1."""
    with pytest.raises(InvalidRequest, match="control characters"):
        check_name(name)


def test_name_rule_refuses_a_lone_surrogate() -> None:
    """A lone surrogate is not text and has no UTF-8 form."""
    with pytest.raises(InvalidRequest, match="unicode"):
        check_name("\ud800")


@pytest.mark.parametrize(
    ("op", "body", "word"),
    [
        ("acquire", {"ttl": True}, "ttl"),
        ("acquire", {"ttl": "5"}, "ttl"),
        ("acquire", {"ttl": 5, "wait": "1"}, "wait"),
        ("acquire", {"ttl": 5, "wait": False}, "wait"),
        ("acquire", {"ttl": 5, "limit": 1.0}, "limit"),
        ("acquire", {"ttl": 5, "limit": True}, "limit"),
        ("acquire", {"ttl": 5, "limit": "2"}, "limit"),
        ("acquire", {"ttl": 5, "owner": 7}, "owner"),
        ("acquire", {"ttl": 5, "request_id": 7}, "request_id"),
        ("release", {"owner": "a", "token": "1"}, "token"),
        ("release", {"owner": "a", "token": 1.0}, "token"),
        ("release", {"owner": "a", "token": True}, "token"),
        ("extend", {"owner": "a", "ttl": "5"}, "ttl"),
        ("extend", {"owner": "a", "ttl": 5, "token": "1"}, "token"),
    ],
)
def test_json_values_are_not_coerced(
    http: httpx.Client, op: str, body: dict[str, Any], word: str
) -> None:
    token = http.post("/v1/locks/job/acquire", json={"ttl": 30, "owner": "a"}).json()["token"]
    assert_invalid(http.post(f"/v1/locks/job/{op}", json=body), word)
    holders = http.get("/v1/locks/job").json()["holders"]
    assert [(h["owner"], h["token"], h["count"]) for h in holders] == [("a", token, 1)]
    assert 25 < holders[0]["ttl_left"] <= 30  # the refused extend did not apply


def test_integer_durations_are_numbers(http: httpx.Client) -> None:
    r = http.post("/v1/locks/job/acquire", json={"ttl": 5, "wait": 0, "owner": "a"})
    assert r.status_code == 200 and 4 < r.json()["ttl"] <= 5
    r = http.post("/v1/locks/job/extend", json={"owner": "a", "ttl": 7})
    assert r.status_code == 200 and 6 < r.json()["ttl"] <= 7


@pytest.mark.parametrize("op", ["acquire", "release", "extend", "abandon"])
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_a_body_that_is_not_json_is_415(
    http: httpx.Client, op: str, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    raw = b'{"ttl": 5, "owner": "a", "request_id": "r"}'
    r = http.post(f"/v1/locks/job/{op}", content=raw, headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"] == "invalid"
    assert "application/json" in r.json()["message"]
    assert (
        repr(content_type or "") in r.json()["message"] or "no content type" in r.json()["message"]
    )
    assert nothing_held(http)


def test_oversized_body_is_413(http: httpx.Client) -> None:
    big = b'{"ttl": 5, "owner": "' + b"x" * 100_000 + b'"}'
    r = http.post("/v1/locks/job/acquire", content=big, headers=JSON)
    assert_invalid(r, "bytes", status=413)

    def chunks() -> Iterator[bytes]:  # no content-length: the limit holds while reading
        yield b'{"ttl": 5, "owner": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    r = http.post("/v1/locks/job/acquire", content=chunks(), headers=JSON)
    assert_invalid(r, "bytes", status=413)
    assert nothing_held(http)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        # GET and DELETE also serve these paths: they name the lock "job/acquire".
        ("PUT", "/v1/locks/job/acquire", "DELETE, GET, POST"),
        ("PATCH", "/v1/locks/job/release", "DELETE, GET, POST"),
        ("DELETE", "/v1/info", "GET"),
        ("POST", "/healthz", "GET"),
        ("POST", "/v1/locks/job", "DELETE, GET"),
    ],
)
def test_405_names_the_allowed_methods(
    http: httpx.Client, method: str, path: str, allow: str
) -> None:
    r = http.request(method, path, json={"ttl": 5})
    assert r.status_code == 405
    assert r.json()["error"] == "invalid"
    assert sorted(m.strip() for m in r.headers["allow"].split(",")) == allow.split(", ")


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"POST /v1/locks/a/acquire HTTP/1.1\r\nHost: x\r\ncontent-length: zz\r\n\r\n",
    ],
)
def test_malformed_http_gets_the_json_error_shape(server: ServerProcess, raw: bytes) -> None:
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=5) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)
    assert error["error"] == "invalid" and "malformed HTTP" in error["message"]
