"""Fixtures shared by every test: one store URL per backend, and clients on it.

A backend joins the conformance suite by adding one entry to ``STORES``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

import lockd

StoreFactory = Callable[[Path], str]

STORES: dict[str, StoreFactory] = {
    "memory": lambda tmp: f"memory://test-{uuid.uuid4().hex}",
    "file": lambda tmp: f"file://{tmp / 'store'}",
}


@pytest.fixture(params=sorted(STORES))
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store of each kind."""
    return STORES[request.param](tmp_path)


@pytest.fixture
def client(store_url: str) -> Iterator[lockd.Client]:
    """A sync client on a fresh store."""
    with lockd.Client(store_url) as c:
        yield c


@pytest.fixture
def other_client(client: lockd.Client, store_url: str) -> Iterator[lockd.Client]:
    """A second client (another identity) on the same store as ``client``."""
    with lockd.Client(store_url) as c:
        yield c


@pytest.fixture
async def aclient(store_url: str) -> AsyncIterator[lockd.AsyncClient]:
    """An async client on a fresh store."""
    async with lockd.AsyncClient(store_url) as c:
        yield c
