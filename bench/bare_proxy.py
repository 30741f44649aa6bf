"""The yardstick: the least a correct aiohttp reverse proxy does, and nothing more.

aiohttp.web in front, one ClientSession behind, bodies streamed both ways, a fixed bearer
token, hop-by-hop headers dropped; no metrics, no logging, no token cache, no routing.

    python bench/bare_proxy.py LISTEN_PORT UPSTREAM_URL [uvloop]

With `uvloop`, it runs on uvloop, so that the product on uvloop meets a yardstick on the
same loop.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "authorization",
    }
)
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def kept(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


async def forward(request: web.Request) -> web.StreamResponse:
    headers = kept(request.headers)
    headers["Authorization"] = "Bearer bench-fixed-token"
    async with request.app[SESSION].request(
        request.method,
        URL(request.app[UPSTREAM] + request.raw_path, encoded=True),
        headers=headers,
        data=request.content if request.body_exists else None,
        allow_redirects=False,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, headers=kept(upstream.headers))
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        app[SESSION] = client
        yield


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2]
    app = web.Application()
    app[UPSTREAM] = upstream
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{path:.*}", forward)
    loop = None
    if sys.argv[3:] == ["uvloop"]:
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
