"""Redis URLs: lockd's own ``cluster`` option is checked when the store is named."""

from __future__ import annotations

import pytest

import lockd
from lockd.backends.redis_conn import cluster_option


def test_the_cluster_option_is_taken_out_of_the_url_for_the_driver() -> None:
    url = "redis://:pw@127.0.0.1:7000/0?cluster=true&socket_timeout=2"
    assert cluster_option(url) == ("redis://:pw@127.0.0.1:7000/0?socket_timeout=2", True)
    assert cluster_option("redis://h:1/0?cluster=false") == ("redis://h:1/0", False)
    assert cluster_option("redis://h:1/0") == ("redis://h:1/0", False)


def test_a_bad_cluster_value_is_refused_when_the_store_is_named() -> None:
    with pytest.raises(lockd.InvalidRequest, match="cluster"):
        lockd.connect("redis://127.0.0.1:7000/0?cluster=maybe")
