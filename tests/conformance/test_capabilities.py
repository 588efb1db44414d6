"""Contract item 13: each backend states its safety level and promises in its
capabilities, and callers can demand a minimum level.
"""

from __future__ import annotations

import pytest

import lockd
from lockd import Capabilities, InvalidRequest, SafetyLevel, SafetyUnavailable

DOCUMENTED = {
    "memory": Capabilities(
        safety=SafetyLevel.SINGLE_NODE,
        fencing=True,
        fair=True,
        durable=False,
        shared_across_processes=False,
        sessions=True,
    ),
    "file": Capabilities(
        safety=SafetyLevel.LINEARIZABLE,
        fencing=True,
        fair=True,
        durable=True,
        shared_across_processes=False,
        sessions=True,
    ),
    "redis": Capabilities(
        safety=SafetyLevel.SINGLE_NODE,
        fencing=True,
        fair=True,
        durable=False,
        shared_across_processes=True,
    ),
    "redlock": Capabilities(
        safety=SafetyLevel.TIMING_DEPENDENT,
        fencing=True,
        fair=True,
        durable=False,
        shared_across_processes=True,
    ),
}


def _scheme(url: str) -> str:
    return url.split("://", 1)[0]


def test_capabilities_are_as_documented(client: lockd.Client, store_url: str) -> None:
    caps = client.capabilities
    assert isinstance(caps, Capabilities)
    assert isinstance(caps.safety, SafetyLevel)
    flags = (caps.fencing, caps.fair, caps.durable, caps.shared_across_processes, caps.sessions)
    for flag in flags:
        assert isinstance(flag, bool)
    expected = DOCUMENTED.get(_scheme(store_url))
    if expected is not None:
        assert caps == expected
    else:  # a store not listed above still keeps the documented ordering of promises
        assert caps.safety in SafetyLevel


async def test_backend_states_the_same_capabilities(backend: lockd.Backend, store_url: str) -> None:
    assert isinstance(backend, lockd.Backend)
    expected = DOCUMENTED.get(_scheme(store_url), backend.capabilities)
    assert backend.capabilities == expected
    await backend.ping()


@pytest.mark.parametrize("level", list(SafetyLevel))
def test_client_can_demand_a_safety_level(store_url: str, level: SafetyLevel) -> None:
    with lockd.Client(store_url) as probe:
        have = probe.capabilities.safety
    for spelling in (level, level.label, level.label.upper(), level.name.lower()):
        if have >= level:
            with lockd.Client(store_url, require=spelling) as client, client.lock("x") as lock:
                assert lock.owned()
        else:
            with pytest.raises(SafetyUnavailable) as refused:
                lockd.Client(store_url, require=spelling)
            assert level.label in str(refused.value)
            assert have.label in str(refused.value)


def test_linearizable_is_refused_by_weaker_stores(store_url: str) -> None:
    expected = DOCUMENTED.get(_scheme(store_url))
    if expected is None or expected.safety >= SafetyLevel.LINEARIZABLE:
        with lockd.Client(store_url, require="linearizable") as client:
            assert client.capabilities.safety is SafetyLevel.LINEARIZABLE
    else:
        with pytest.raises(SafetyUnavailable):
            lockd.Client(store_url, require="linearizable")
        with pytest.raises(SafetyUnavailable):
            lockd.AsyncClient(store_url, require="linearizable")
    # A refused client leaves nothing open: the store can be opened directly afterwards.
    with lockd.Client(store_url) as client, client.lock("after", ttl=5) as lock:
        assert lock.owned()


def test_unknown_safety_level_is_invalid(store_url: str) -> None:
    with pytest.raises(InvalidRequest, match="safety level"):
        lockd.Client(store_url, require="bulletproof")


def test_safety_levels_are_ordered(client: lockd.Client) -> None:
    assert SafetyLevel.TIMING_DEPENDENT < SafetyLevel.SINGLE_NODE < SafetyLevel.LINEARIZABLE
    assert SafetyLevel.parse("single-node") is SafetyLevel.SINGLE_NODE
    assert client.capabilities.safety >= SafetyLevel.TIMING_DEPENDENT
