"""The redis backend against a Redis that wants a password, an ACL user, or TLS.

Each test starts its own ``redis-server`` (tests.redisproc); TLS certificates are made
with the ``openssl`` command line in the test's temporary folder.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

import lockd
from lockd.backends import redis_lua
from tests.redisproc import RedisProcess, make_tls_files, running_redis

SECRET = "s3cret-Pw.42"
OPEN_LIMIT = 10.0
"""Seconds within which a refused open must fail (connect timeout is 5 s)."""

SCRIPT_COMMANDS = (
    "time", "get", "set", "del", "hget", "hset", "hsetnx", "hdel", "hgetall", "hlen",
    "lindex", "lpop", "lpush", "lrange", "lrem", "pexpire", "pexpireat", "pttl", "rpush",
    "publish", "zadd", "zrangebyscore", "zrem", "zremrangebyrank", "zscore",
)  # fmt: skip
"""What lockd's Lua scripts call: Redis 7 checks those against the caller's ACL too."""
CLIENT_COMMANDS = ("evalsha", "script|load", "ping", "subscribe", "unsubscribe", "scan", "blpop")
"""What lockd sends itself (CONFIG GET is optional: a refusal is ignored)."""


def acl_user(name: str, password: str, commands: tuple[str, ...]) -> tuple[str, ...]:
    """redis-server options: ``default`` off, ``name`` kept to lockd's keys and commands."""
    rules = ["on", f">{password}", "~lockd:*", "resetchannels", "&lockd:*", "-@all"]
    return ("--user", "default", "off", "--user", name, *rules, *(f"+{c}" for c in commands))


@pytest.fixture
def secured() -> Iterator[RedisProcess]:
    """A Redis that wants ``SECRET``."""
    with running_redis("--requirepass", SECRET) as server:
        yield server


def with_password(server: RedisProcess, password: str, user: str = "") -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


def lock_scenario(url: str) -> None:
    """Lock, inspect, list, a waiter granted on release, unlock: all through ``url``."""
    with lockd.Client(url) as first, lockd.Client(url) as second:
        lock = first.lock("guarded", ttl=10)
        with lock.acquire():
            token = lock.token
            assert token is not None
            info = first.inspect("guarded")
            assert [(h.owner, h.token) for h in info.holders] == [(lock.owner, token)]
            assert [i.name for i in first.list_locks()] == ["guarded"]

            waiter = second.lock("guarded", ttl=10, wait=20, owner="waiter")
            got: list[int | None] = []
            thread = threading.Thread(target=lambda: got.append(waiter.acquire().token))
            thread.start()
            deadline = time.monotonic() + 10
            while not first.inspect("guarded").waiters:
                assert time.monotonic() < deadline, "the waiter never queued"
                time.sleep(0.02)
        thread.join(25)
        assert not thread.is_alive()
        assert got and got[0] is not None and got[0] > token
        waiter.release()
        assert first.list_locks() == []
        assert first.inspect("guarded").last_token == got[0]


def assert_refused_quietly(url: str, password: str, caplog: pytest.LogCaptureFixture) -> str:
    """Opening ``url`` fails soon with BackendUnavailable; ``password`` shows nowhere."""
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    with pytest.raises(lockd.BackendUnavailable) as refused:
        lockd.Client(url)
    assert time.monotonic() - started < OPEN_LIMIT
    shown = "".join(traceback.format_exception(refused.value))  # the driver's cause included
    assert password not in shown
    assert password not in caplog.text
    return str(refused.value)


# --- AUTH ---------------------------------------------------------------------------------------


def test_password_in_the_url_authenticates(secured: RedisProcess) -> None:
    lock_scenario(with_password(secured, SECRET))


def test_a_wrong_password_is_refused_at_open_without_revealing_it(
    secured: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "not-the-Pw.99"
    message = assert_refused_quietly(with_password(secured, wrong), wrong, caplog)
    assert "password" in message
    assert f"redis://:***@127.0.0.1:{secured.port}/0" in message


def test_a_missing_password_is_refused_at_open(
    secured: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    message = assert_refused_quietly(secured.url, SECRET, caplog)
    assert "authenticat" in message.lower()


def test_an_invalid_url_is_refused_without_revealing_its_password(secured: RedisProcess) -> None:
    with pytest.raises(lockd.InvalidRequest) as refused:
        lockd.Client(with_password(secured, SECRET) + "?ssl_ca_cert=/typo")
    assert "ssl_ca_cert" in str(refused.value)
    assert SECRET not in str(refused.value)


def test_a_client_repr_does_not_reveal_the_password(secured: RedisProcess) -> None:
    with lockd.Client(with_password(secured, SECRET)) as client:
        assert f"127.0.0.1:{secured.port}" in repr(client)
        assert SECRET not in repr(client)


# --- ACL ----------------------------------------------------------------------------------------


def test_an_acl_user_with_only_the_commands_lockd_needs_can_lock_wait_inspect_and_list() -> None:
    password = "alice-Pw.7"
    with running_redis(*acl_user("alice", password, SCRIPT_COMMANDS + CLIENT_COMMANDS)) as server:
        lock_scenario(with_password(server, password, user="alice"))


def test_the_readme_lists_the_acl_commands_lockd_needs() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    text = " ".join(readme.split())  # the lists wrap across lines
    scripts = re.search(r"which Redis 7 checks against the user too: `([^`]*)`", text)
    client = re.search(r"the commands `([^`]*)`, and the\s+commands its scripts run", text)
    assert scripts is not None
    assert client is not None
    assert set(scripts.group(1).split()) == set(SCRIPT_COMMANDS)
    assert set(client.group(1).split()) == set(CLIENT_COMMANDS)


def test_the_documented_script_commands_are_the_ones_the_scripts_call() -> None:
    scripts = [getattr(redis_lua, name) for name in redis_lua.__all__ if name.isupper()]
    texts = [text for text in scripts if isinstance(text, str)]
    assert len(texts) >= 6
    called = {c.lower() for t in texts for c in re.findall(r"redis\.p?call\('(\w+)'", t)}
    dynamic = [t for t in texts if re.search(r"redis\.p?call\((?!')", t)]
    assert not dynamic, "a script calls a command named at run time"
    assert called == set(SCRIPT_COMMANDS)


@pytest.mark.parametrize("missing", ["script|load", "time"])
async def test_an_acl_refusal_is_a_prompt_lockd_error_not_an_endless_retry(missing: str) -> None:
    commands = tuple(c for c in SCRIPT_COMMANDS + CLIENT_COMMANDS if c != missing)
    with running_redis(*acl_user("bob", "bob-Pw.3", commands)) as server:
        async with lockd.AsyncClient(with_password(server, "bob-Pw.3", user="bob")) as client:
            lock = client.lock("guarded", ttl=10)  # wait=None: retries while unreachable
            try:
                async with asyncio.timeout(8):
                    await lock.acquire()
            except lockd.LockError as exc:
                message = str(exc)
            except TimeoutError:
                pytest.fail(f"acquire kept retrying for 8 s although Redis refused {missing!r}")
            else:
                pytest.fail(f"acquired although Redis refuses {missing!r}")
            assert "permission" in message or "can't run" in message


# --- TLS ----------------------------------------------------------------------------------------


def test_tls_with_the_ca_in_the_url(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path)
    with running_redis("--requirepass", SECRET, tls=files) as server:
        base = f"rediss://:{SECRET}@127.0.0.1:{server.port}/0?ssl_ca_certs={files.ca}"
        lock_scenario(base)
        lock_scenario(base + "&ssl_check_hostname=true")  # the certificate names 127.0.0.1


def test_tls_refuses_a_server_it_cannot_verify(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = make_tls_files(tmp_path)
    with running_redis("--requirepass", SECRET, tls=files) as server:
        message = assert_refused_quietly(
            f"rediss://:{SECRET}@127.0.0.1:{server.port}/0", SECRET, caplog
        )
        assert "certificate" in message
        # Plain text to a TLS port is refused too, not left hanging.
        assert_refused_quietly(with_password(server, SECRET), SECRET, caplog)


def test_a_refused_release_keeps_the_hold_renewed() -> None:
    # Without HDEL the user can take a free lock and renew it, but not drop it.
    commands = tuple(c for c in SCRIPT_COMMANDS + CLIENT_COMMANDS if c != "hdel")
    with (
        running_redis(*acl_user("carol", "carol-Pw.5", commands)) as server,
        lockd.Client(with_password(server, "carol-Pw.5", user="carol")) as client,
    ):
        lock = client.lock("kept", ttl=0.6)
        lock.acquire()
        with pytest.raises(lockd.StoreRefused):
            lock.release()
        time.sleep(1.5)  # more than twice the ttl: only renewals keep it
        assert lock.state is lockd.LockState.HELD
        holders = client.inspect("kept").holders
        assert [(h.owner, h.token) for h in holders] == [(lock.owner, lock.token)]
