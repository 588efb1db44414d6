"""Run the server on uvicorn, draining waiting requests on SIGTERM or Ctrl-C."""

from __future__ import annotations

import socket

import uvicorn

from lockd.server.app import create_app

__all__ = ["serve"]


class _DrainingServer(uvicorn.Server):
    """Tells the app to answer waiting acquires before uvicorn waits for them."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = getattr(self.config, "lockd_app", None)
        if app is not None:
            app.state.draining.set()
        await super().shutdown(sockets)


def serve(
    store: str, *, host: str = "127.0.0.1", port: int = 7700, log_level: str = "info"
) -> None:
    """Serve ``store`` on ``host:port`` until SIGTERM or Ctrl-C."""
    app = create_app(store)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, loop="uvloop", http="httptools",
        access_log=False, lifespan="on",
    )  # fmt: skip
    config.lockd_app = app  # type: ignore[attr-defined]
    print(f"lockd serving {store} on http://{host}:{port}", flush=True)
    _DrainingServer(config).run()
