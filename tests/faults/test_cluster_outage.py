"""A Redis Cluster that stops answering: every master paused (SIGSTOP) by the PIDs the
shared cluster fixture started, then resumed.

A proxy cannot stand in front of a cluster (its nodes announce their own ports, and the
client follows them), so this is the cluster's outage: requests hang, for the client
under test and any observer alike. The cluster client has retry and re-discovery
layers of its own; the SDK must still turn a hold at_risk and lost in time, and its
next acquire after the cluster is back must be live.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import lockd
from lockd import LockState
from tests.conftest import STORES, cluster_nodes
from tests.faults import OUTAGE, TTL, assert_live, at_risk_bound, background, wait_until


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    """The shared cluster, emptied."""
    with STORES["redis-cluster"](tmp_path) as u:
        yield u


def pause_cluster() -> None:
    """SIGSTOP every node of the shared cluster."""
    for node in cluster_nodes():
        node.pause()


def resume_cluster() -> None:
    """SIGCONT every node (a node not paused ignores it)."""
    for node in cluster_nodes():
        node.resume()


@pytest.fixture
def paused() -> Iterator[None]:
    """Resumes the cluster after the test, whatever happened in it."""
    yield
    resume_cluster()


def test_a_hold_turns_at_risk_then_lost_in_time(url: str, paused: None) -> None:
    name = f"cluster-{uuid.uuid4().hex[:8]}"
    with lockd.Client(url) as client:
        lock = client.lock(name, ttl=TTL)
        lock.acquire()
        old = lock.token
        granted = time.monotonic()
        pause_cluster()
        wait_until(lambda: lock.state is not LockState.HELD, TTL, step=0.005)
        assert lock.state is LockState.AT_RISK, lock.state
        at_risk = time.monotonic() - granted
        assert at_risk <= at_risk_bound(TTL, 0.1), at_risk
        wait_until(lambda: lock.state is LockState.LOST, TTL, step=0.005)
        assert time.monotonic() - granted < TTL  # before the store could let a rival in
        resume_cluster()
        rival = client.lock(name, ttl=TTL, owner="rival")
        rival.acquire(wait=TTL + 5)
        assert rival.token is not None and old is not None and rival.token > old
        assert_live(rival, client)
        rival.release()


def test_an_acquire_that_waits_out_a_paused_cluster_is_live(url: str, paused: None) -> None:
    name = f"cluster-{uuid.uuid4().hex[:8]}"
    with lockd.Client(url) as client:
        lock = client.lock(name, ttl=TTL, wait=15, owner="me")
        pause_cluster()
        with background(lock.acquire) as acquired:
            time.sleep(OUTAGE)  # the acquire keeps trying for longer than the ttl
            resume_cluster()
            acquired.result(15)
        assert_live(lock, client)
        lock.release()
        assert not client.inspect(name).holders
        assert client.lock(name, ttl=TTL, owner="other").try_acquire()
