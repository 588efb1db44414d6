"""Run the server on uvicorn, draining waiting requests on SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import socket

import uvicorn
import uvloop

from lockd.backends import Backend, connect, redact_url
from lockd.server.app import create_app
from lockd.server.protocol import JsonErrorHttpToolsProtocol

__all__ = ["serve"]


class _DrainingServer(uvicorn.Server):
    """Tells the app to answer waiting acquires before uvicorn waits for them, and says
    it is serving once it is."""

    def __init__(self, config: uvicorn.Config, banner: str) -> None:
        super().__init__(config)
        self.banner = banner

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.banner, flush=True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = getattr(self.config, "lockd_app", None)
        if app is not None:
            app.state.draining.set()
        await super().shutdown(sockets)


def serve(
    store: str, *, host: str = "127.0.0.1", port: int = 7700, log_level: str = "info"
) -> None:
    """Serve ``store`` on ``host:port`` until SIGTERM or Ctrl-C.

    The address is bound first, then the store opened, and only then is "serving"
    printed: OSError when the address cannot be bound, LockError when the store cannot
    be opened (InvalidRequest for a bad URL), each before anything is served.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    try:
        backend = connect(store)
        app = create_app(backend)
        config = uvicorn.Config(
            app, log_level=log_level, loop="uvloop", http=JsonErrorHttpToolsProtocol,
            access_log=False, lifespan="on",
        )  # fmt: skip
        config.lockd_app = app  # type: ignore[attr-defined]
        bound = sock.getsockname()[1]
        server = _DrainingServer(
            config, f"lockd serving {redact_url(store)} on http://{host}:{bound}"
        )
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(server, backend, sock))
    finally:
        sock.close()


async def _serve(server: uvicorn.Server, backend: Backend, sock: socket.socket) -> None:
    """Open the store in the serving loop, serve, close the store."""
    try:
        await backend.open()
        await server.serve(sockets=[sock])
    finally:
        await backend.aclose()
