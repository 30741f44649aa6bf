"""Running the apps: bind the listeners, serve until a signal, drain, stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from aiohttp import web

from proxy.app import Lifecycle, Phase, create_admin_app, create_proxy_app
from proxy.config import ListenAddress, Settings
from proxy.errors import ListenError
from proxy.metrics import Metrics
from proxy.tokens import Clock

logger = logging.getLogger("skill_engine_proxy")

# In-flight requests get this long to finish once the proxy stops accepting.
SHUTDOWN_GRACE = 30.0


class ProxyServer:
    """The proxy and admin listeners of one process, with their shared metrics and phase."""

    def __init__(self, settings: Settings, *, clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.lifecycle = Lifecycle()
        self._proxy = web.AppRunner(
            create_proxy_app(settings, self.metrics, clock=clock),
            access_log=None,
            shutdown_timeout=SHUTDOWN_GRACE,
            # A client that hangs up cancels its request, and with it the upstream exchange.
            handler_cancellation=True,
        )
        self._admin = web.AppRunner(create_admin_app(self.metrics, self.lifecycle), access_log=None)
        self.proxy_url = ""
        self.admin_url: str | None = None

    async def start(self) -> None:
        """Bind the listeners and start serving; log where, without anything secret."""
        try:
            await self._proxy.setup()
            self.proxy_url = await _bind(self._proxy, self.settings.listen)
            if self.settings.admin_listen is not None:
                await self._admin.setup()
                self.admin_url = await _bind(self._admin, self.settings.admin_listen)
        except ListenError:
            await self.stop()
            raise
        self.lifecycle.phase = Phase.SERVING

        auth = self.settings.auth
        logger.info(
            "Listening on %s (admin: %s), forwarding to %s with tokens from %s "
            "for tenant %s, client_id %s",
            self.proxy_url,
            self.admin_url or "disabled",
            self.settings.upstream.url,
            auth.resolved_token_url,
            auth.tenant,
            auth.client_id,
        )

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, close."""
        self.lifecycle.phase = Phase.DRAINING
        logger.info("Stopping: no new connections; in-flight requests get %.0f s.", SHUTDOWN_GRACE)
        for runner in (self._proxy, self._admin):
            if runner.server is not None:
                await runner.cleanup()
        logger.info("Stopped.")


async def _bind(runner: web.AppRunner, address: ListenAddress) -> str:
    """Start a site for `address` on `runner` and return the URL it really listens on."""
    site: web.BaseSite
    if address.path is not None:
        site = web.UnixSite(runner, address.path)
    else:
        site = web.TCPSite(runner, address.host, address.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        raise ListenError(f"Cannot listen on {address}: {exc.strerror or exc}.") from exc
    if address.path is not None:
        return f"unix:{address.path}"
    host, port = runner.addresses[0][:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class StopSignals:
    """SIGTERM or SIGINT asks for a graceful stop; a second one ends the process at once."""

    def __init__(self) -> None:
        self._received = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(signum, self._on_signal, signum)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._loop.remove_signal_handler(signum)

    async def wait(self) -> None:
        await self._received.wait()

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._received.is_set():
            logger.warning("Received %s again: exiting without draining.", name)
            os._exit(1)
        logger.info("Received %s.", name)
        self._received.set()


async def serve(settings: Settings) -> None:
    """`run`: serve until SIGTERM or SIGINT, then drain and return."""
    server = ProxyServer(settings)
    with StopSignals() as signals:
        await server.start()
        await signals.wait()
        await server.stop()
