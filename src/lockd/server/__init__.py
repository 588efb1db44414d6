"""``lockd serve``: the lock contract over HTTP/JSON."""

from __future__ import annotations

from lockd.server.app import create_app

__all__ = ["create_app"]
