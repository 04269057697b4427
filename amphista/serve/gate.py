"""ASGI middleware in front of every route: the API key check and per-status request counts.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, which wraps `receive` and would hide a client's
disconnect from the streaming and waiting handlers that need to see it.
"""

from __future__ import annotations

import hmac
import logging

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from .metrics import Metrics
from .protocol import APIError

log = logging.getLogger("amphista.serve")
CLIENT_CLOSED = 499  # nginx's status for "client closed request"; nobody receives it, metrics count it


class Gate:
    """ASGI middleware: the API key on every endpoint but /health, and request counts by status code."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.expected and scope["path"] != "/health" and not self._authorized(scope):
                err = APIError(
                    401,
                    "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
                await JSONResponse(err.body(), 401)(scope, receive, send_counted)
                return
            await self.app(scope, receive, send_counted)
        except ClientDisconnect:
            # The client left while sending its body: its business, not a server error; no traceback.
            status[0] = CLIENT_CLOSED
            log.info(
                "%s %s: the client disconnected before sending its whole request",
                scope["method"],
                scope["path"],
            )
        finally:
            self.metrics.request(scope["path"], status[0])

    def _authorized(self, scope) -> bool:
        # RFC 7235: the scheme is case-insensitive ("bearer", "BEARER"), one or more spaces follow it.
        scheme, _, key = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        ok_scheme = scheme.lower() == b"bearer"
        return hmac.compare_digest(key.lstrip(b" "), self.expected) and ok_scheme
