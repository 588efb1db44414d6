"""Backends, chosen by URL scheme. Each lives in its own module, imported only when used,
so a store's driver is needed only by those who use that store.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit, urlunsplit

from lockd.backends.base import Backend, require_safety
from lockd.errors import InvalidRequest

__all__ = ["Backend", "connect", "redact_url", "register_scheme", "require_safety", "store_key"]

REDIS_OPTIONS = {
    # What redis-py reads from a URL's query (the rest of the URL: user, password, db).
    "db", "health_check_interval", "max_connections", "protocol", "socket_connect_timeout",
    "socket_keepalive", "socket_timeout", "ssl_check_hostname", "ssl_min_version", "timeout",
    "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile",
    "ssl_password", "client_name",
    "cluster",  # lockd's own: connect with redis-py's RedisCluster
}  # fmt: skip

SCHEMES = ("memory", "file", "http", "https", "redis", "rediss", "redlock")
_OPENERS: dict[str, Callable[[str], Backend]] = {}
"""Schemes added by register_scheme, each with the function that makes its backend."""


def register_scheme(scheme: str, opener: Callable[[str], Backend]) -> None:
    """Open URLs of ``scheme`` with ``opener(url)`` (a store kept outside lockd, or a
    test's wrapper around a real one). Each such URL is its own store key."""
    if scheme.lower() in SCHEMES:
        raise InvalidRequest(f"{scheme!r} is a built-in store scheme")
    _OPENERS[scheme.lower()] = opener


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _split(url: str) -> tuple[str, str, dict[str, str]]:
    """Return (scheme, location, options) of a store URL."""
    if not isinstance(url, str) or "://" not in url:
        shown = url if not isinstance(url, str) else url.rpartition("@")[2]
        raise InvalidRequest(f"store URL must look like scheme://..., not {shown!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES and scheme not in _OPENERS:
        raise InvalidRequest(
            f"unknown store scheme {scheme!r} in {redact_url(url)!r}; known: {', '.join(SCHEMES)}"
        )
    options = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    return scheme, parts.netloc + parts.path, options


def store_key(url: str) -> str:
    """A canonical name for the store a URL points at: equal URLs share one store."""
    scheme, location, options = _split(url)
    if scheme in _OPENERS:
        return url
    if scheme in ("http", "https"):
        return url.rstrip("/")
    if scheme in ("redis", "rediss", "redlock"):
        return url
    if scheme == "file":
        from pathlib import Path

        if not location:
            raise InvalidRequest(f"file store URL needs a path: {redact_url(url)!r}")
        location = str(Path(location).resolve())
    suffix = "?" + "&".join(f"{k}={v}" for k, v in sorted(options.items())) if options else ""
    return f"{scheme}://{location}{suffix}"


def connect(url: str) -> Backend:
    """Open a new backend for ``url``; call it from the event loop that will use it.

    ``memory://[name]``, ``file://PATH[?sync=full|normal]``, ``http(s)://host:port``,
    ``redis(s)://[[user]:password@]host:port[/db][?redis-py options][&cluster=true]``,
    ``redlock://[[user]:password@]host1:port,host2:port,host3:port[/db][?options]``.
    Call ``await backend.open()`` before use.
    """
    scheme, location, options = _split(url)
    if scheme in _OPENERS:
        return _OPENERS[scheme](url)
    if scheme in ("redis", "rediss"):
        from lockd.backends.redis import RedisBackend

        _no_options(url, options, REDIS_OPTIONS)
        if not urlsplit(url).hostname:
            raise InvalidRequest(f"a Redis URL is redis://host:port[/db], not {redact_url(url)!r}")
        return RedisBackend(url)
    if scheme == "redlock":
        from lockd.backends.redlock import RedlockBackend, parse_nodes

        _no_options(url, options, REDIS_OPTIONS)
        return RedlockBackend(*parse_nodes(url))
    if scheme in ("http", "https"):
        from lockd.backends.http import HttpBackend

        _no_options(url, options, set())
        if location.count("/") > 1 or not location.strip("/"):
            shown = redact_url(url)
            raise InvalidRequest(f"a lockd server URL is http(s)://host:port, not {shown!r}")
        return HttpBackend(url)
    if scheme == "memory":
        _no_options(url, options, set())
        from lockd.backends.memory import MemoryBackend

        return MemoryBackend(store_key(url))
    from lockd.backends.file import FileBackend

    _no_options(url, options, {"sync"})
    if not location:
        raise InvalidRequest(f"file store URL needs a path: {redact_url(url)!r}")
    return FileBackend(location, sync=options.get("sync", "full"))


def _no_options(url: str, options: dict[str, str], known: set[str]) -> None:
    unknown = set(options) - known
    if unknown:
        names = ", ".join(sorted(unknown))
        raise InvalidRequest(f"unknown option(s) {names} in {redact_url(url)!r}")
