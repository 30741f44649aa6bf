"""Running the apps: bind the listeners, serve until a signal, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import resource
import signal
import socket
import stat
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.app import Lifecycle, Phase, ProxyHandler, create_admin_app
from proxy.config import ListenAddress, Settings
from proxy.errors import ListenError
from proxy.logs import access_log, configure_logging
from proxy.metrics import Metrics
from proxy.reload import ConfigSource, Reloader
from proxy.tokens import Clock, TokenKeeper

logger = logging.getLogger("skill_engine_proxy")

T = TypeVar("T")
EVENT_LOOPS = ("auto", "asyncio", "uvloop")

# What is left of the shutdown once no request is in flight: closing idle connections.
_CLOSE_TIMEOUT = 1.0
# Connections the kernel queues for a listener before the proxy accepts them (aiohttp's).
LISTEN_BACKLOG = 128


class _QuietMalformedRequests(logging.Filter):
    """aiohttp logs a request its parser refuses at ERROR, with a traceback that quotes the
    offending bytes: a query, an Authorization value. It is the client's mistake, so the
    proxy keeps one line at DEBUG, without the quote."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        logger.debug("Refused a malformed request: %s.", error.message.partition(":")[0][:100])
        return False


_QUIET_MALFORMED_REQUESTS = _QuietMalformedRequests()

# What accept() fails with when no descriptor (or no kernel memory) is left for a connection.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# How often the proxy says, at most, that it cannot accept connections.
_ACCEPT_FAILURES_INTERVAL = 60.0


class _AcceptFailures:
    """The event loop's exception handler: it says at most once a minute, in one line, that
    the listeners cannot accept connections for want of descriptors, and hands every other
    report to the loop's default handler.

    asyncio reports every accept() that fails so, with a traceback, and tries again many
    times a second: a few hundred idle clients under a low descriptor limit made megabytes
    of log a second. (uvloop reports none: libuv closes such connections at once itself.)
    Each failure also leaves a retry behind, due a second later, which fails again with a
    traceback of its own when the listener has closed by then: those are dropped too.
    """

    def __init__(self) -> None:
        self._said_at: float | None = None
        self._unsaid = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        message = str(context.get("message"))
        if isinstance(error, ValueError | OSError) and "_start_serving" in message:
            logger.debug("A retry to accept on a closed listener failed: %s", error)
            return
        if not (
            isinstance(error, OSError) and error.errno in _OUT_OF_RESOURCES and "accept" in message
        ):
            loop.default_exception_handler(context)
            return
        now = loop.time()
        if self._said_at is not None and now - self._said_at < _ACCEPT_FAILURES_INTERVAL:
            self._unsaid += 1
            return
        since = f" ({self._unsaid} more since it was last said)" if self._unsaid else ""
        logger.error(
            "Cannot accept new connections: %s, with an open file limit of %d%s. They wait "
            "in the listen queue until some close; this is said at most once a minute.",
            error.strerror,
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            since,
        )
        self._said_at, self._unsaid = now, 0


def raise_open_file_limit() -> None:
    """Raise the soft limit on open files to the hard limit, as nginx and Go's runtime do
    at start: each client connection takes a descriptor (and a forwarded request one more
    upstream), and the usual soft default of 1024 runs out long before the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        logger.debug("Open file limit: %d.", soft)
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # macOS refuses its unlimited hard limit as a soft one
        logger.debug("Open file limit: %d; raising it to the hard limit failed: %s", soft, exc)
        return
    logger.debug("Open file limit raised from %d to %d, the hard limit.", soft, hard)


# The collector's youngest generation is collected once this many more container objects
# have been made than freed. CPython's default, 700, is passed every few requests under
# concurrent load by the objects of the requests in flight alone: the collector ran about
# 140 times a second at 64 connections (bench/), scanning objects still in use, for 5-9% of
# the process's CPU time. The proxy makes almost no cyclic garbage, so a rarer
# collection costs little memory: at most this many objects wait for it.
YOUNG_COLLECTION_THRESHOLD = 10_000


def settle_garbage_collector() -> None:
    """Once started, and after each reload: collect what start-up (or the config it
    replaced) left, move every object that remains (modules, config, clients) out of the
    collector's sight (`gc.freeze`, as servers that fork do), and collect the young
    generation less often. The full collection pauses the process for about 20 ms."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_COLLECTION_THRESHOLD), middle, old)


class ProxyServer:
    """The proxy and admin listeners of one process, with their shared metrics and phase."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        sockets: Mapping[ListenAddress, Sequence[socket.socket]] | None = None,
    ) -> None:
        """`sockets` are for workers: the listening sockets of each address, bound once by
        the supervisor and accepted on by every worker."""
        self.settings = settings
        self._sockets = dict(sockets or {})
        server_logger = logging.getLogger("aiohttp.server")
        if _QUIET_MALFORMED_REQUESTS not in server_logger.filters:
            server_logger.addFilter(_QUIET_MALFORMED_REQUESTS)
        self.metrics = Metrics()
        self.lifecycle = Lifecycle()
        self._handler = ProxyHandler(settings, self.metrics, self.lifecycle, clock=clock)
        # Made in `start`: aiohttp's low-level server takes the running event loop.
        self._proxy: web.ServerRunner | None = None
        self._admin = web.AppRunner(
            create_admin_app(self.metrics, self.lifecycle),
            access_log=None,
            keepalive_timeout=settings.client_header_timeout,
            shutdown_timeout=_CLOSE_TIMEOUT,
        )
        # Socket files this process created, with their inode: a successor started during
        # the drain may have bound the same path since, and its socket must stay.
        self._unix_sockets: list[tuple[str, tuple[int, int]]] = []
        self.proxy_url = ""
        self.route_urls: dict[ListenAddress, str] = {}
        self.admin_url: str | None = None

    async def start(self) -> None:
        """Bind the listeners and start serving; log where, without anything secret."""
        try:
            await self._handler.start()
            proxy = self._proxy = self._proxy_runner()
            await proxy.setup()
            self.proxy_url = await self._bind(proxy, self.settings.listen)
            for address in self._route_listeners():
                url = await self._bind(proxy, address, route_listener=True)
                self.route_urls[address] = url
            if self.settings.admin_listen is not None:
                await self._admin.setup()
                self.admin_url = await self._bind(self._admin, self.settings.admin_listen)
        except BaseException:
            await self._close()
            raise
        self.lifecycle.phase = Phase.SERVING

        extra = "".join(f", {url}" for url in self.route_urls.values())
        tenants = self.settings.all_tenants().values()
        loop = asyncio.get_running_loop()
        logger.info(
            "Listening on %s%s (admin: %s, event loop: %s) for %s",
            self.proxy_url,
            extra,
            self.admin_url or "disabled",
            type(loop).__module__.partition(".")[0],
            "; ".join(
                f"tenant {tenant.auth.tenant} (client_id {tenant.auth.client_id}): forwarding "
                f"to {tenant.upstream.url} with tokens from {tenant.auth.resolved_token_url}"
                for tenant in tenants
            ),
        )

    @property
    def tokens(self) -> TokenKeeper:
        """The token keeper of the proxy handler (once started)."""
        return self._handler.wiring.tokens

    async def reconfigure(self, settings: Settings) -> None:
        """Serve under `settings` (a reload); the listeners stay as they are."""
        await self._handler.wiring.reconfigure(settings)
        self.settings = settings

    async def drain(self) -> None:
        """Answer `/readyz` with 503 and keep serving for `shutdown.drain_delay`, so that
        load balancers and Kubernetes endpoints stop sending before the listeners close."""
        self.lifecycle.phase = Phase.DRAINING
        delay = self.settings.shutdown.drain_delay
        logger.info(
            "Draining: /readyz answers 503; still serving for %g s (shutdown.drain_delay).",
            delay,
        )
        await asyncio.sleep(delay)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within `shutdown.timeout`, close."""
        self.lifecycle.phase = Phase.DRAINING
        logger.info(
            "Stopping: no new connections; requests in flight get %g s (shutdown.timeout).",
            self.settings.shutdown.timeout,
        )
        proxy = self._proxy
        if proxy is not None and proxy.server is not None:
            for site in list(proxy.sites):
                await site.stop()
            # Connections idle now close now, as nginx and Go's servers do (a client sending
            # a request just then sees the connection close before any answer, and may send
            # it again elsewhere); the others after their answer, which says so. aiohttp's
            # pre_shutdown would stop reading every connection at once, the rest of an upload
            # in flight included, and close none before the end of the drain.
            # Known gap: a request whose head aiohttp has read but whose handler has not yet
            # begun (the same event-loop turn) looks idle, and is dropped unanswered with
            # its connection.
            self._handler.closing = True
            busy = set(self._handler.in_flight.values())
            for connection in proxy.server.connections:
                if connection not in busy:
                    connection.force_close()
            await self._drain()
        await self._close()
        logger.info("Stopped.")

    async def _drain(self) -> None:
        in_flight = self._handler.in_flight
        timeout = self.settings.shutdown.timeout
        deadline = asyncio.get_running_loop().time() + timeout
        while in_flight and (left := deadline - asyncio.get_running_loop().time()) > 0:
            await asyncio.wait(set(in_flight), timeout=left)
        if in_flight:
            logger.warning(
                "%d requests still in flight after %g s; cutting them off.",
                len(in_flight),
                timeout,
            )
            for task in in_flight:
                task.cancel()
            await asyncio.wait(set(in_flight), timeout=_CLOSE_TIMEOUT)

    async def _close(self) -> None:
        for runner in (self._proxy, self._admin):
            if runner is not None and runner.server is not None:
                await runner.cleanup()
        await self._handler.close()
        for path, identity in self._unix_sockets:
            with contextlib.suppress(FileNotFoundError):
                if _identity(path) == identity:
                    os.unlink(path)
        self._unix_sockets.clear()

    def _proxy_runner(self) -> web.ServerRunner:
        """The proxy listeners' runner: aiohttp's low-level server, with `ProxyHandler`."""
        return web.ServerRunner(
            web.Server(
                self._handler,
                access_log=None,
                # aiohttp's keep-alive timer runs from when a connection opens and from the
                # end of each answer, until a complete request head has arrived: it bounds
                # a client that sends its head slowly, or stops halfway (slowloris), as
                # well as an idle one.
                keepalive_timeout=self.settings.client_header_timeout,
                # A client that hangs up cancels its request, and with it the upstream
                # exchange.
                handler_cancellation=True,
                # Request bodies pass through as sent: a gzip upload stays gzip (and its
                # length).
                auto_decompress=False,
            ),
            # The drain is the proxy's own (`stop`); aiohttp's would wait twice as long.
            shutdown_timeout=_CLOSE_TIMEOUT,
        )

    def _route_listeners(self) -> list[ListenAddress]:
        addresses: list[ListenAddress] = []
        for route in self.settings.all_routes():
            if route.listen is not None and route.listen not in addresses:
                addresses.append(route.listen)
        return addresses

    async def _bind(
        self, runner: web.BaseRunner, address: ListenAddress, *, route_listener: bool = False
    ) -> str:
        """Start a site for `address` on `runner`; return the URL it really listens on.

        For a route's own listener, tell the router which sockets are that listener's.
        """
        inherited = self._sockets.get(address)
        if inherited is not None:
            sockets = list(inherited)
        elif address.path is not None:
            sockets = [bind_unix_socket(address, self.settings.unix_socket_mode)]
        else:
            sockets = bind_tcp_sockets(address)
        before = set(runner.addresses)
        try:
            for sock in sockets:
                await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()
        except OSError as exc:
            raise ListenError(f"Cannot listen on {address}: {exc.strerror or exc}.") from exc
        bound = [name for name in runner.addresses if name not in before]
        if route_listener:
            router = self._handler.wiring.router
            for name in bound:
                router.bind(name[:2] if isinstance(name, tuple) else name, address)
        if address.path is not None:
            if inherited is None:  # an inherited socket's file is the supervisor's to remove
                self._unix_sockets.append((address.path, _identity(address.path)))
            return f"unix:{address.path}"
        host, port = bound[0][:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def bind_tcp_sockets(address: ListenAddress) -> list[socket.socket]:
    """Sockets bound to each address `address.host` stands for, all on one port (the one
    the OS chose, for port 0), not yet listening.

    SO_REUSEADDR lets a restart bind while connections of the last run linger in TIME_WAIT.
    SO_REUSEPORT is never set: with it, a second proxy could bind the same address and the
    kernel would hand it a share of the connections, with its own tenant's token. An IPv6
    socket takes only IPv6 (`::` does not also take IPv4), as asyncio's own servers do.
    """
    try:
        found = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise ListenError(f"Cannot listen on {address}: {exc.strerror or exc}.") from exc
    sockets: list[socket.socket] = []
    port = address.port
    try:
        for family, kind, protocol, _, where in dict.fromkeys(found):
            sock = socket.socket(family, kind, protocol)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((where[0], port, *where[2:]))
            port = sock.getsockname()[1]
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ListenError(f"Cannot listen on {address}: {exc.strerror or exc}.") from exc
    return sockets


def bind_unix_socket(address: ListenAddress, mode: int) -> socket.socket:
    """A unix socket bound at `address` with permissions `mode`, not yet listening.

    The mode is set between bind and listen: no client can connect before it holds.
    """
    assert address.path is not None
    claim_unix_path(address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address.path)
        os.chmod(address.path, mode)
    except OSError as exc:
        sock.close()
        raise ListenError(f"Cannot listen on {address}: {exc.strerror or exc}.") from exc
    return sock


def _identity(path: str) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def claim_unix_path(address: ListenAddress) -> None:
    """Refuse a socket path another process serves; clear one a dead process left behind.

    asyncio would silently replace any socket file, cutting off a proxy still running there.
    """
    assert address.path is not None
    try:
        mode = os.stat(address.path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenError(f"Cannot listen on {address}: {exc.strerror}.") from exc
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"Cannot listen on {address}: the path exists and is not a socket.")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(address.path)
        except OSError:
            os.unlink(address.path)  # nobody answers: a leftover
            return
    raise ListenError(f"Cannot listen on {address}: another process is serving on it.")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """SIGTERM or SIGINT asks for a graceful stop; a second one ends the process at once,
    unless `escalate` is False."""

    def __init__(
        self,
        signals: tuple[signal.Signals, ...] = STOP_SIGNALS,
        parent: int | None = None,
        *,
        escalate: bool = True,
    ) -> None:
        """`parent`: a file descriptor that turns readable when the process that started
        this one is gone (a worker's supervisor); that stops this one too.

        `escalate` False is for a worker: a stop signal sent to the whole process group
        (systemd, `timeout`, `kill -TERM -PGID`) reaches it twice, directly and passed on
        by the supervisor, and the second is no sign of impatience. Its supervisor is the
        one that ends the workers at once, on a second signal of its own.
        """
        self._signals = signals
        self._parent = parent
        self._escalate = escalate
        self._received = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def __enter__(self) -> StopSignals:
        for signum in self._signals:
            self._loop.add_signal_handler(signum, self._on_signal, signum)
        # A process may start with them blocked (a worker does): one sent meanwhile is
        # delivered now, to the handler, rather than killing it before it could drain.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(self._signals))
        if self._parent is not None:
            self._loop.add_reader(self._parent, self._on_parent_gone)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum in self._signals:
            self._loop.remove_signal_handler(signum)
            if not self._escalate:
                # Stopped, and still exiting: a late one must not kill it with a status
                # that tells the supervisor it failed.
                signal.signal(signum, signal.SIG_IGN)
        if self._parent is not None:
            self._loop.remove_reader(self._parent)

    def _on_parent_gone(self) -> None:
        if self._parent is not None:
            self._loop.remove_reader(self._parent)
        logger.warning("The supervisor is gone; stopping.")
        self._received.set()

    async def wait(self) -> None:
        await self._received.wait()

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._received.is_set():
            if not self._escalate:
                logger.debug("Received %s again; still draining.", name)
                return
            logger.warning("Received %s again: exiting without draining.", name)
            access_log.flush()  # os._exit skips the flush at exit
            os._exit(1)
        logger.info("Received %s.", name)
        self._received.set()


async def serve(
    settings: Settings,
    stop_signals: tuple[signal.Signals, ...] = STOP_SIGNALS,
    parent: int | None = None,
    *,
    source: ConfigSource | None = None,
    worker: int | None = None,
    **options: Any,
) -> None:
    """`run`: log as `settings.log` says, serve until one of `stop_signals` (or, for a
    worker, until its supervisor is gone), then drain and return. With `source`, reload
    on SIGHUP and when its files change. `options` go to `ProxyServer`."""
    configure_logging(settings.log, worker=worker)
    raise_open_file_limit()
    asyncio.get_running_loop().set_exception_handler(_AcceptFailures())
    server = ProxyServer(settings, **options)

    async def reconfigure(new: Settings) -> None:
        configure_logging(new.log, worker=worker)
        await server.reconfigure(new)
        settle_garbage_collector()

    with StopSignals(stop_signals, parent, escalate=worker is None) as signals:
        await server.start()
        settle_garbage_collector()
        reloader = None
        if source is not None:
            reloader = Reloader(source, settings, reconfigure, outcome=server.metrics.reloaded)
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, reloader.request, "SIGHUP")
            # `run` starts with SIGHUP blocked, so that it does not die of one before now;
            # one sent meanwhile is delivered now, and reloads.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
            reloader.start()
        try:
            await signals.wait()
        finally:
            if reloader is not None:
                loop.remove_signal_handler(signal.SIGHUP)
                # Stopping: a reload would be pointless, and SIGHUP's default would kill.
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                await reloader.close()
        await server.drain()
        await server.stop()


def run_event_loop(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """Run `main` to its end on the event loop `loop` names (one of `EVENT_LOOPS`).

    "auto" is uvloop when it is installed (the `speed` extra; the container image has it),
    else asyncio's own loop. uvloop takes about a tenth off the instructions the proxy spends
    on a small request (bench/).
    """
    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        return runner.run(main)


def _loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if loop == "asyncio" or (loop == "auto" and not has_uvloop()):
        return None
    import uvloop

    return uvloop.new_event_loop


def has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True
