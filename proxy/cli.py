"""The `skill-engine-proxy` command: run, check, demo.

Exit status: 0 done, 1 failed (check failed, a listener could not be bound), 2 the command
line or the config file is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TextIO

import aiohttp

from proxy import __version__
from proxy.config import (
    ListenAddress,
    LogSettings,
    Settings,
    Tenant,
    load_settings,
    parse_listen_address,
)
from proxy.demo import run_demo
from proxy.errors import ConfigError, ListenError, TokenUnavailable, describe_client_error
from proxy.forwarder import new_upstream_session
from proxy.logs import configure_logging
from proxy.metrics import Metrics
from proxy.network import Outbound
from proxy.reload import ConfigSource
from proxy.server import EVENT_LOOPS, has_uvloop, run_event_loop, serve
from proxy.store import TokenStoreError
from proxy.token_endpoint import TokenEndpoint, new_token_session, token_key
from proxy.workers import run_workers

logger = logging.getLogger("skill_engine_proxy")

CONFIG_VARIABLE = "SKILL_ENGINE_PROXY_CONFIG"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# How much of the upstream's /version answer `check` reads, and how much of it it prints.
_READ_BYTES = 64 * 1024
_SHOWN_CHARACTERS = 200


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    arguments = parser.parse_args(argv)
    if arguments.command == "run":
        # Until `run` handles SIGHUP as a reload, it waits; the console script held it
        # already, before the imports, and this covers whoever calls `main` directly.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    if arguments.command == "run" and arguments.loop == "uvloop" and not has_uvloop():
        parser.error("--loop uvloop: uvloop is not installed; install skill-engine-proxy[speed]")
    # Until the config says how to log: text, for the person who started the command.
    configure_logging(
        LogSettings(level="warning" if arguments.command == "check" else "info", format="text")
    )
    try:
        if arguments.command == "demo":
            asyncio.run(run_demo(arguments.listen, arguments.admin_listen))
            return EXIT_OK
        path = _config_path(arguments.config)
        settings = load_settings(path)
        if arguments.command == "check":
            return asyncio.run(check(settings, sys.stdout))
        configure_logging(settings.log)
        source = ConfigSource(path, settings)
        if arguments.workers > 1:
            # Each worker chooses its proxies too; an unusable proxy variable stops this
            # process here rather than every worker in turn.
            Outbound.for_settings(settings)
            return run_workers(source, arguments.workers, loop=arguments.loop)
        run_event_loop(serve(settings, source=source), arguments.loop)
        return EXIT_OK
    except ConfigError as exc:
        print(f"skill-engine-proxy: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ListenError, TokenStoreError) as exc:
        # The config has been read: this goes out as the log's format says.
        hint = ""
        if arguments.command == "demo" and isinstance(exc, ListenError):
            hint = " Choose other addresses with --listen and --admin-listen."
        logger.error("%s%s", exc, hint)
        return EXIT_FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skill-engine-proxy",
        description="Forward requests to TechWolf's Skill Engine API with a cached OAuth2 token.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config_help = f"the YAML config file (default: ${CONFIG_VARIABLE})"
    run = commands.add_parser("run", help="serve until SIGTERM or SIGINT")
    run.add_argument("--config", help=config_help)
    run.add_argument(
        "--workers",
        type=_worker_count,
        default=1,
        help="serve with N processes on the same addresses, sharing tokens (default: 1)",
    )
    run.add_argument(
        "--loop",
        choices=EVENT_LOOPS,
        default="auto",
        help="the event loop: uvloop when installed (auto, the default), or asyncio's own",
    )
    check = commands.add_parser("check", help="fetch a token and call GET /version upstream")
    check.add_argument("--config", help=config_help)

    demo = commands.add_parser(
        "demo", help="the proxy in front of stand-in services, no credentials needed"
    )
    demo.add_argument(
        "--listen",
        type=_listen_address,
        default=ListenAddress("127.0.0.1", 8080),
        help="proxy address (default: 127.0.0.1:8080)",
    )
    demo.add_argument(
        "--admin-listen",
        type=_listen_address,
        default=ListenAddress("127.0.0.1", 9090),
        help="metrics and health address (default: 127.0.0.1:9090)",
    )
    return parser


def _worker_count(value: str) -> int:
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= 64:
        raise argparse.ArgumentTypeError(
            f"expected a number of processes from 1 to 64, got {value!r}"
        )
    return int(value)


def _listen_address(value: str) -> ListenAddress:
    try:
        return parse_listen_address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _config_path(given: str | None) -> str:
    path = given or os.environ.get(CONFIG_VARIABLE)
    if not path:
        raise ConfigError(
            "(no config file)", [(None, f"pass --config FILE or set {CONFIG_VARIABLE}")]
        )
    return path


async def check(settings: Settings, out: TextIO) -> int:
    """For each tenant, fetch a token and call `GET /version` with it, the documented way
    to test a token."""
    failed = False
    outbound = Outbound.for_settings(settings)
    async with (
        new_token_session(outbound) as token_session,
        new_upstream_session(outbound) as session,
    ):
        for tenant in settings.all_tenants().values():
            failed |= not await _check_tenant(tenant, token_session, session, outbound, out)
    return EXIT_FAILED if failed else EXIT_OK


async def _check_tenant(
    tenant: Tenant,
    token_session: aiohttp.ClientSession,
    session: aiohttp.ClientSession,
    outbound: Outbound,
    out: TextIO,
) -> bool:
    auth = tenant.auth
    endpoint = TokenEndpoint(token_session, auth, Metrics(), outbound=outbound)
    try:
        token = await endpoint.fetch(token_key(auth))
    except TokenUnavailable as exc:
        out.write(f"FAILED: no token for tenant {auth.tenant}. {exc}\n")
        return False
    scopes = " ".join(auth.scopes) if auth.scopes else "all"
    out.write(
        f"ok: token for tenant {auth.tenant} (scopes: {scopes}) from {auth.resolved_token_url}, "
        f"valid for {token.lifetime:.0f} s\n"
    )

    url = f"{tenant.upstream.url}/version"
    upstream = tenant.upstream
    proxy = outbound.proxy_for(upstream.url)
    try:
        async with session.get(
            url,
            headers={"Authorization": token.authorization.get_secret_value()},
            allow_redirects=False,  # as `run` does: a redirect is the upstream's answer
            timeout=aiohttp.ClientTimeout(
                total=None, connect=upstream.connect_timeout, sock_read=upstream.read_timeout
            ),
            proxy=proxy.url,
            proxy_headers=proxy.headers,
        ) as response:
            status = response.status
            location = response.headers.get("Location")
            answer = b""
            while len(answer) < _READ_BYTES and (chunk := await response.content.read(_READ_BYTES)):
                answer += chunk
    except (aiohttp.ClientError, TimeoutError) as exc:
        out.write(f"FAILED: GET {url}: {describe_client_error(exc)}\n")
        return False

    # An upstream that echoes the request would print the token: show its fingerprint.
    bearer = token.authorization.get_secret_value().removeprefix("Bearer ")
    shown = " ".join(answer.decode("utf-8", "replace").split())
    if location is not None:
        shown = f"redirect to {location!r}"
    shown = shown.replace(bearer, f"<token {token.fingerprint}>")[:_SHOWN_CHARACTERS]
    if status != 200:
        out.write(f"FAILED: GET {url} answered {status}: {shown}\n")
        return False
    out.write(f"ok: GET {url} answered 200: {shown}\n")
    return True
