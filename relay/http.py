"""The HTTP listener (aiohttp): ``/metrics``, ``/healthz``, ``/readyz``, ``/api``.

The admin API (``/api/...``, bearer token) lives in :mod:`relay.admin_api`;
``/unsubscribe/<token>`` comes with the feedback intake.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr

from relay.admin_api import AdminStore, add_admin_routes
from relay.clock import Clock, SystemClock
from relay.metrics import Metrics

log = structlog.get_logger(__name__)


class HttpListener:
    """Serves metrics and health on ``[http] listen``."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        *,
        is_ready: Callable[[], bool],
        refresh: Callable[[], Awaitable[None]],
        store: AdminStore | None = None,
        admin_token: SecretStr | None = None,
        clock: Clock | None = None,
        accounts: frozenset[str] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._metrics = metrics
        self._is_ready = is_ready
        self._refresh = refresh
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_view)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        if store is not None:
            # /api/...: the admin API (503 until [http] admin_token is set).
            add_admin_routes(app, store, admin_token, clock or SystemClock(), accounts)
        self.app = app

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        server = self._site._server if self._site is not None else None
        if isinstance(server, asyncio.Server) and server.sockets:
            return int(server.sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        """Bind and serve."""
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(
            self._runner, self._host, self._port, reuse_address=True
        )
        await self._site.start()
        log.info("http_listening", host=self._host, port=self.port)

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics_view(self, request: web.Request) -> web.Response:
        try:
            await self._refresh()
        except Exception:
            log.warning("metrics_refresh_failed", exc_info=True)
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._is_ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)
