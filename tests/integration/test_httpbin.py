"""Against httpbin, a microservice nobody here wrote: through the pair, each answer is the same
as the direct call's (status, end-to-end headers, body), for the cases the contract lists."""

from __future__ import annotations

import asyncio
import gzip
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from shared.processes import free_port, http_ok
from tests.conftest import Stack

pytestmark = pytest.mark.rabbit
# Headers that differ between any two calls, or that ProxyMQ adds by design.
VOLATILE = {"date", "server", "connection", "keep-alive", "x-correlation-id", "content-length"}
ADDED = {"X-Correlation-Id", "X-Request-Timeout", "X-Proxymq-Attempt", "Host"}


@pytest.fixture
async def httpbin(tmp_path: Path) -> AsyncIterator[str]:
    port = free_port()
    gunicorn = Path(sys.executable).parent / "gunicorn"
    process = await asyncio.create_subprocess_exec(
        str(gunicorn),
        "-k",
        "gthread",
        "--threads",
        "16",
        "-b",
        f"127.0.0.1:{port}",
        "--control-socket",
        str(tmp_path / "gunicorn.ctl"),
        "httpbin:app",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        if await asyncio.to_thread(http_ok, f"{url}/status/200"):
            break
        await asyncio.sleep(0.1)
    else:
        process.kill()
        pytest.fail("httpbin did not start")
    yield url
    process.terminate()
    await process.wait()


CASES = [
    ("GET", "/get?a=1&a=2&b=%20x", None, {"X-Test": "1"}),
    ("POST", "/post?q=1", b'{"hello": "world"}', {"Content-Type": "application/json"}),
    ("PUT", "/put", bytes(range(256)), {"Content-Type": "application/octet-stream"}),
    ("PATCH", "/patch", b"a=1&b=2", {"Content-Type": "application/x-www-form-urlencoded"}),
    ("DELETE", "/delete", None, {}),
    ("GET", "/status/418", None, {}),
    ("GET", "/status/500", None, {}),
    ("GET", "/response-headers?X-A=b&X-A=c&Content-Type=text/x-odd", None, {}),
    ("GET", "/redirect-to?url=/get&status_code=307", None, {}),
    ("GET", "/bytes/1024?seed=7", None, {}),
    ("GET", "/gzip", None, {"Accept-Encoding": "gzip"}),
    ("GET", "/cookies/set?c1=v1&c2=v2", None, {}),
    ("HEAD", "/get", None, {}),
    ("OPTIONS", "/get", None, {}),
    ("GET", "/headers", None, {"X-Multi": "one", "Accept": "text/plain"}),
]


def comparable(headers: aiohttp.typedefs.LooseHeaders) -> list[tuple[str, str]]:
    return sorted(
        (k.lower(), v)
        for k, v in headers.items()  # type: ignore[union-attr]
        if k.lower() not in VOLATILE
    )


def comparable_body(body: bytes, content_type: str, encoding: str) -> object:
    """httpbin echoes the request: drop what differs by design (the Host it was called by, and
    the headers ProxyMQ adds for the microservice)."""
    if "json" not in content_type or not body:
        return body
    if encoding == "gzip":
        body = gzip.decompress(body)
    data = json.loads(body)
    if isinstance(data, dict):
        data.pop("origin", None)
        data.pop("url", None)
        if isinstance(data.get("headers"), dict):
            data["headers"] = {k: v for k, v in data["headers"].items() if k not in ADDED}
    return data


async def test_same_as_direct(
    stack: Stack, service: str, httpbin: str, http: aiohttp.ClientSession
) -> None:
    await stack.dequeuer(service, httpbin)
    _, url = await stack.enqueuer()
    for method, path, body, headers in CASES:
        direct = await http.request(
            method,
            httpbin + path,
            data=body,
            headers=headers,
            allow_redirects=False,
            skip_auto_headers=["User-Agent"],
        )
        via = await http.request(
            method,
            f"{url}/{service}{path}",
            data=body,
            headers=headers,
            allow_redirects=False,
            skip_auto_headers=["User-Agent"],
        )
        direct_body, via_body = await direct.read(), await via.read()
        label = f"{method} {path}"
        assert via.status == direct.status, label
        assert comparable(via.headers) == comparable(direct.headers), label
        kind = direct.headers.get("Content-Type", ""), direct.headers.get("Content-Encoding", "")
        assert comparable_body(via_body, *kind) == comparable_body(direct_body, *kind), label
