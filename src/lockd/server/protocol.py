"""uvicorn's httptools protocol, answering malformed HTTP in lockd's JSON error shape.

uvicorn answers a request it cannot parse itself, before any app sees it, with a
plain-text 400; this subclass writes ``{"error": "invalid", "message": ...}`` instead.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["JsonErrorHttpToolsProtocol"]


class JsonErrorHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol whose answer to malformed HTTP is a JSON 400."""

    def send_400_response(self, msg: str) -> None:
        """Write the JSON 400 and close the connection, as uvicorn does with its text."""
        body = json.dumps({"error": "invalid", "message": f"malformed HTTP: {msg}"}).encode()
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head += [
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        ]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
