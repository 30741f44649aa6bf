"""`run --workers N`: N processes serving one set of listeners, sharing tokens and metrics.

The supervisor (this process) prepares what the workers share, starts them, restarts one
that dies, and on SIGTERM or SIGINT passes the signal on and waits for them to drain:

- Listeners: every address (TCP or unix socket) is bound once, here, and the listening
  sockets are handed to the workers, which all accept on them. Binding once is what makes
  a taken address fail: workers that each bound with SO_REUSEPORT would share the address
  with any process of the same user that did the same, a second proxy for another tenant
  included, and the kernel would split the connections between them. On a shared socket a
  new connection wakes every waiting worker and the first to accept takes it (not a hash
  of the client's address, as with SO_REUSEPORT), and connections queued while a worker
  restarts wait for the others instead of being reset.
- Tokens: through the configured token store; with the default `memory` store, through a
  file store in a private directory, so that one worker fetches and the others read.
- Metrics: prometheus-client's multiprocess mode, in a private directory: every worker's
  `/metrics` reports the sum over all workers.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from proxy.config import ListenAddress, Settings, TokenStoreSettings
from proxy.logs import configure_logging
from proxy.metrics import MULTIPROCESS_DIRECTORY
from proxy.reload import ConfigSource
from proxy.server import (
    LISTEN_BACKLOG,
    bind_tcp_sockets,
    bind_unix_socket,
    run_event_loop,
    serve,
)
from proxy.store import check_store

logger = logging.getLogger("skill_engine_proxy")

# A worker that dies more often than this is not restarted: something is wrong for good.
_RESTARTS = 5
_RESTART_WINDOW = 60.0
_EXIT_FAILED = 1


def run_workers(source: ConfigSource, count: int, *, loop: str = "auto") -> int:
    """Serve with `count` worker processes until SIGTERM or SIGINT; the exit status.

    SIGHUP is passed on: each worker reloads the config itself.
    """
    settings = source.loaded
    configure_logging(settings.log)
    with _shared_directories() as (tokens, metrics):
        os.environ[MULTIPROCESS_DIRECTORY] = str(metrics)
        if settings.token_store.backend == "memory":
            settings = settings.model_copy(
                update={"token_store": TokenStoreSettings(backend="file", path=tokens)}
            )
        check_store(settings.token_store)
        with contextlib.ExitStack() as stack:
            settings, sockets = _listeners(settings, stack)
            logger.info(
                "Starting %d workers; they share tokens through the %s token store and "
                "metrics through %s.",
                count,
                settings.token_store.backend,
                metrics,
            )
            return _Supervisor(settings, count, sockets, source, loop).run()


@contextlib.contextmanager
def _shared_directories() -> Iterator[tuple[Path, Path]]:
    tokens = Path(tempfile.mkdtemp(prefix="skill-engine-proxy-tokens-"))
    metrics = Path(tempfile.mkdtemp(prefix="skill-engine-proxy-metrics-"))
    try:
        yield tokens, metrics
    finally:
        shutil.rmtree(tokens, ignore_errors=True)
        shutil.rmtree(metrics, ignore_errors=True)


Sockets = dict[ListenAddress, list[socket.socket]]


def _listeners(settings: Settings, stack: contextlib.ExitStack) -> tuple[Settings, Sockets]:
    """Bind and listen on every listener of `settings`; the sockets are closed (and socket
    files removed) when the supervisor ends.

    Returns `settings` with each port 0 replaced by the port the OS chose, so that the
    workers log and route by the real address; the main and admin listeners get a port
    each even when both say 0, and routes that name the same listener share it.
    """
    sockets: Sockets = {}

    def bound(address: ListenAddress | None) -> ListenAddress | None:
        if address is None:
            return None
        if address.path is not None:
            sock = bind_unix_socket(address, settings.unix_socket_mode)
            stack.callback(_remove_unix_socket, sock, address.path)
            listening = [sock]
        else:
            listening = bind_tcp_sockets(address)
            for sock in listening:
                stack.callback(sock.close)
            address = ListenAddress(address.host, listening[0].getsockname()[1])
        for sock in listening:
            sock.listen(LISTEN_BACKLOG)
        sockets[address] = listening
        return address

    update: dict[str, Any] = {
        "listen": bound(settings.listen),
        "admin_listen": bound(settings.admin_listen),
    }
    configured = dict.fromkeys(route.listen for route in settings.routes)
    route_listeners = {address: bound(address) for address in configured}
    update["routes"] = tuple(
        route.model_copy(update={"listen": route_listeners[route.listen]})
        for route in settings.routes
    )
    return settings.model_copy(update=update), sockets


def _remove_unix_socket(sock: socket.socket, path: str) -> None:
    sock.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class _Supervisor:
    def __init__(
        self,
        settings: Settings,
        count: int,
        sockets: Sockets,
        source: ConfigSource,
        loop: str,
    ) -> None:
        self._settings = settings
        self._loop = loop
        self._count = count
        self._sockets = sockets
        self._source = source
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, Any] = {}
        self._restarts: list[float] = []
        self._stopping = False
        self._signals = 0

    def run(self) -> int:
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_reload_signal)
        # `run` blocked SIGHUP until now: one sent meanwhile is delivered here (and reaches
        # no worker yet, which is no loss: they start with the config just read).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        try:
            for index in range(self._count):
                self._start(index)
            status = self._watch()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._kill_all()
        logger.info("All workers stopped.")
        return status

    def _start(self, index: int) -> None:
        process = self._context.Process(
            target=_worker,
            args=(self._settings, index, self._sockets, self._source, self._loop),
            name=f"skill-engine-proxy worker {index}",
        )
        # A new process dies of SIGHUP or SIGTERM until it can handle them: it starts with
        # both blocked (the mask is inherited), and unblocks each once its handler is in
        # place. One sent meanwhile waits until then.
        held = {signal.SIGHUP, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
        self._workers[index] = process
        logger.info("Worker %d started (pid %d).", index, process.pid)

    def _watch(self) -> int:
        status = 0
        while self._workers:
            sentinels = {process.sentinel: index for index, process in self._workers.items()}
            for ready in multiprocessing.connection.wait(list(sentinels), timeout=0.5):
                index = sentinels[ready]
                process = self._workers.pop(index)
                process.join()
                _forget_metrics(process.pid)
                if self._stopping:
                    if process.exitcode != 0:
                        status = _EXIT_FAILED
                    continue
                logger.error("Worker %d exited with status %s.", index, process.exitcode)
                if not self._may_restart():
                    logger.error("Workers keep dying; stopping them all.")
                    self._stop_all()
                    status = _EXIT_FAILED
                    continue
                self._start(index)
        return status

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self._restarts = [moment for moment in self._restarts if now - moment < _RESTART_WINDOW]
        self._restarts.append(now)
        return len(self._restarts) <= _RESTARTS

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            name = signal.Signals(signum).name
            logger.warning("Received %s again: stopping the workers at once.", name)
            self._kill_all()
            # Unwinds, rather than os._exit: the shared directories, which hold the token,
            # are still removed on the way out.
            raise SystemExit(_EXIT_FAILED)
        logger.info("Received %s: the workers drain and stop.", signal.Signals(signum).name)
        self._stop_all()

    def _on_reload_signal(self, _signum: int, _frame: FrameType | None) -> None:
        if self._stopping:
            logger.info("Received SIGHUP while stopping; no reload.")
            return
        logger.info("Received SIGHUP: the workers reload the config.")
        for process in self._workers.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGHUP)

    def _stop_all(self) -> None:
        self._stopping = True
        # Each worker holds a copy of every listening socket. Once the workers have closed
        # theirs, connecting must be refused at once, not left waiting in a queue that
        # this process holds open and nobody accepts from any more.
        for sockets in self._sockets.values():
            for sock in sockets:
                sock.close()
        for process in self._workers.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    def _kill_all(self) -> None:
        for process in self._workers.values():
            if process.is_alive():
                process.kill()
                process.join()


def _forget_metrics(pid: int | None) -> None:
    """Drop a dead worker's live gauges (in-flight requests) from the sum."""
    from prometheus_client import multiprocess

    if pid is not None:
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def _worker(
    settings: Settings,
    index: int,
    sockets: Sockets,
    source: ConfigSource,
    loop: str,
) -> None:
    """A worker process: the proxy, on listeners it shares with the other workers."""
    # Ctrl-C reaches the whole process group; the supervisor answers it by sending each
    # worker SIGTERM, which a worker must not take for a second, impatient signal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    supervisor = multiprocessing.parent_process()
    run_event_loop(
        serve(
            settings,
            stop_signals=(signal.SIGTERM,),
            # A supervisor killed outright must not leave its workers serving on.
            parent=None if supervisor is None else supervisor.sentinel,
            source=source,
            worker=index,
            sockets=sockets,
        ),
        loop,
    )
