"""The real `url-fetcher` command, run as a subprocess and driven over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.url_fetcher.support import PAGE, free_port

URL_FETCHER = Path(sys.executable).parent / "url-fetcher"


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    base: str
    log: Path

    def stop(self) -> int:
        """SIGTERM, then the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=10)


def start_service(log: Path, *args: str, env: dict[str, str] | None = None) -> Service:
    """Start url-fetcher on a free port and wait until /healthz answers."""
    port = free_port()
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYMQ_")}
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [str(URL_FETCHER), "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**clean_env, **(env or {})},
        )
    service = Service(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"url-fetcher exited with {process.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(f"{service.base}/healthz", timeout=1) as answer:
                if answer.status == 200:
                    return service
        except OSError:
            time.sleep(0.05)
    process.kill()
    pytest.fail(f"url-fetcher did not become healthy: {log.read_text()}")


@pytest.fixture(scope="module")
def open_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Private targets allowed, small limits; some set by environment, one overridden by flag."""
    service = start_service(
        tmp_path_factory.mktemp("open") / "url-fetcher.log",
        "--allow-private",
        "--max-bytes",
        "10KiB",
        "--fetch-timeout",
        "0.5",
        env={"PROXYMQ_MAX_BATCH": "5", "PROXYMQ_FETCH_TIMEOUT": "30"},
    )
    yield service
    service.stop()


@pytest.fixture(scope="module")
def guarded_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Default settings: private targets refused."""
    service = start_service(tmp_path_factory.mktemp("guarded") / "url-fetcher.log")
    yield service
    service.stop()


async def call(
    service: Service, path: str, payload: object = None, *, data: bytes | None = None
) -> tuple[int, object]:
    """POST JSON (or raw `data`) to the service; GET when there is neither. Status and JSON."""
    async with aiohttp.ClientSession() as session:
        if payload is None and data is None:
            request = session.get(f"{service.base}{path}")
        else:
            body = data if data is not None else json.dumps(payload).encode()
            request = session.post(f"{service.base}{path}", data=body)
        async with request as response:
            assert response.content_type == "application/json"
            return response.status, await response.json()


def _error_code(answer: object) -> str:
    assert isinstance(answer, dict)
    error = answer["error"]
    assert isinstance(error, dict)
    code = error["code"]
    assert isinstance(code, str)
    return code


async def test_healthz(open_service: Service) -> None:
    assert await call(open_service, "/healthz") == (200, {"status": "ok"})


async def test_fetch_a_local_page_with_allow_private(open_service: Service, site: str) -> None:
    status, answer = await call(open_service, "/fetch", {"url": f"{site}/page"})
    assert status == 200
    assert isinstance(answer, dict)
    elapsed = answer.pop("elapsed_ms")
    assert isinstance(elapsed, float)
    assert elapsed > 0
    assert answer == {
        "url": f"{site}/page",
        "final_url": f"{site}/page",
        "status": 200,
        "content_type": "text/html; charset=utf-8",
        "size": len(PAGE),
        "title": "Caf\u00e9 au lait",
        "redirects": 0,
        "truncated": False,
    }


async def test_redirects_are_followed(open_service: Service, site: str) -> None:
    status, answer = await call(open_service, "/fetch", {"url": f"{site}/redirect/1"})
    assert status == 200
    assert isinstance(answer, dict)
    assert (answer["final_url"], answer["redirects"]) == (f"{site}/page", 2)
    status, answer = await call(open_service, "/fetch", {"url": f"{site}/redirect/9"})
    assert (status, _error_code(answer)) == (502, "too_many_redirects")


async def test_large_body_is_truncated_at_max_bytes(open_service: Service, site: str) -> None:
    status, answer = await call(open_service, "/fetch", {"url": f"{site}/big"})
    assert status == 200
    assert isinstance(answer, dict)
    assert (answer["size"], answer["truncated"], answer["title"]) == (10 * 1024, True, "Big")


async def test_slow_target_is_504_and_flag_beats_environment(
    open_service: Service, site: str
) -> None:
    # PROXYMQ_FETCH_TIMEOUT=30 is in the environment; --fetch-timeout 0.5 must win.
    status, answer = await call(open_service, "/fetch", {"url": f"{site}/slow"})
    assert (status, _error_code(answer)) == (504, "fetch_timeout")


async def test_unreachable_target_is_502(open_service: Service) -> None:
    status, answer = await call(open_service, "/fetch", {"url": f"http://127.0.0.1:{free_port()}/"})
    assert (status, _error_code(answer)) == (502, "fetch_failed")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"not json", "not JSON"),
        (b"", "not JSON"),
        (b'["http://x/"]', "expected a JSON object"),
        (b'{"link": "http://x/"}', "expected a JSON object"),
        (b'{"url": 42}', "must be a string"),
        (b'{"url": "ftp://example.com/"}', "not an http:// or https:// URL"),
        (b'{"url": "/relative"}', "not an http:// or https:// URL"),
    ],
)
async def test_malformed_input_is_400(open_service: Service, body: bytes, fragment: str) -> None:
    status, answer = await call(open_service, "/fetch", data=body)
    assert (status, _error_code(answer)) == (400, "bad_request")
    assert fragment in json.dumps(answer)


async def test_unknown_routes_answer_json(open_service: Service) -> None:
    status, answer = await call(open_service, "/nope")
    assert (status, _error_code(answer)) == (404, "not_found")
    status, answer = await call(open_service, "/fetch")
    assert (status, _error_code(answer)) == (405, "method_not_allowed")


async def test_batch_keeps_order_and_reports_errors_per_url(
    open_service: Service, site: str
) -> None:
    urls: list[object] = [
        f"{site}/page",
        "ftp://example.com/",
        {"url": f"{site}/latin1"},
        42,
        f"http://127.0.0.1:{free_port()}/",
    ]
    status, answer = await call(open_service, "/fetch/batch", {"urls": urls})
    assert status == 200
    assert isinstance(answer, dict)
    results = answer["results"]
    assert isinstance(results, list)
    assert [r["url"] for r in results] == [
        f"{site}/page",
        "ftp://example.com/",
        f"{site}/latin1",
        42,
        urls[4],
    ]
    assert results[0]["title"] == "Caf\u00e9 au lait"
    assert results[2]["title"] == "Cr\u00e8me br\u00fbl\u00e9e"
    assert [r.get("error", {}).get("code") for r in results] == [
        None,
        "bad_request",
        None,
        "bad_request",
        "fetch_failed",
    ]


@pytest.mark.parametrize("shape", ["object", "list", "list of objects"])
async def test_batch_accepts_three_shapes(open_service: Service, site: str, shape: str) -> None:
    urls = [f"{site}/page", f"{site}/data"]
    payload: object = {
        "object": {"urls": urls},
        "list": urls,
        "list of objects": [{"url": url} for url in urls],
    }[shape]
    status, answer = await call(open_service, "/fetch/batch", payload)
    assert status == 200
    assert isinstance(answer, dict)
    assert [r["status"] for r in answer["results"]] == [200, 200]


async def test_batch_limits_and_malformed_batches(open_service: Service, site: str) -> None:
    # PROXYMQ_MAX_BATCH=5 came from the environment.
    status, answer = await call(open_service, "/fetch/batch", [f"{site}/page"] * 6)
    assert (status, _error_code(answer)) == (400, "bad_request")
    assert "at most 5" in json.dumps(answer)
    for body in [b"{", b'{"urls": "http://x/"}', b'"http://x/"']:
        status, answer = await call(open_service, "/fetch/batch", data=body)
        assert (status, _error_code(answer)) == (400, "bad_request")
    assert await call(open_service, "/fetch/batch", []) == (200, {"results": []})


async def test_loopback_target_is_403_without_allow_private(
    guarded_service: Service, site: str
) -> None:
    url = f"{site}/page"
    status, answer = await call(guarded_service, "/fetch", {"url": url})
    assert (status, _error_code(answer)) == (403, "forbidden_target")
    assert isinstance(answer, dict)
    assert answer["error"]["message"] == (
        f"refusing to fetch {url}: 127.0.0.1 is a loopback address "
        "(start url-fetcher with --allow-private to allow it)"
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:{port}/page",
        "http://127.1:{port}/page",
        "http://0x7f000001:{port}/page",
        "http://2130706433:{port}/page",
        "http://[::1]:{port}/page",
        "http://[::ffff:127.0.0.1]:{port}/page",
        "http://0.0.0.0:{port}/page",
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
    ],
)
async def test_private_spellings_are_403(guarded_service: Service, site: str, url: str) -> None:
    url = url.format(port=site.rsplit(":", 1)[1])
    status, answer = await call(guarded_service, "/fetch", {"url": url})
    assert (status, _error_code(answer)) == (403, "forbidden_target")


async def test_batch_reports_refused_targets(guarded_service: Service, site: str) -> None:
    status, answer = await call(guarded_service, "/fetch/batch", [f"{site}/page"])
    assert status == 200
    assert isinstance(answer, dict)
    assert _error_code(answer["results"][0]) == "forbidden_target"


def test_sigterm_stops_cleanly_after_logging_each_fetch(tmp_path: Path) -> None:
    """Its lines read like the sidecars' (`12:00:00 INFO    url_fetcher: ...`); they had a
    format of their own, with the date and a comma before the milliseconds."""
    service = start_service(tmp_path / "url-fetcher.log")
    request = urllib.request.Request(
        f"{service.base}/fetch",
        data=json.dumps({"url": "http://10.0.0.1/"}).encode(),
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 403
    assert service.stop() == 0
    log = service.log.read_text()
    assert "url-fetcher starting on http://127.0.0.1:" in log
    assert "fetch url='http://10.0.0.1/' status=403 error=forbidden_target" in log
    assert "Traceback" not in log
    sidecars = re.compile(r"\d\d:\d\d:\d\d (INFO|WARNING|ERROR) +[\w.]+: ")
    assert all(sidecars.match(line) for line in log.splitlines()), log


def test_a_taken_port_is_one_clear_line(tmp_path: Path, open_service: Service) -> None:
    """The address was said twice: `cannot serve on 127.0.0.1:P: [Errno 98] error while
    attempting to bind on address ('127.0.0.1', P): address already in use`."""
    port = open_service.base.rsplit(":", 1)[1]
    done = subprocess.run(
        [str(URL_FETCHER), "--host", "127.0.0.1", "--port", port],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert done.returncode == 1
    assert done.stderr.endswith(f"cannot listen on 127.0.0.1:{port}: address already in use\n")


async def test_sigterm_lets_the_longest_batch_finish(tmp_path: Path, site: str) -> None:
    """A batch may take ceil(--max-batch / --batch-concurrency) x --fetch-timeout: here 50
    fetches cut at 0.05 s, one at a time, 2.5 s and more. SIGTERM used to give requests in flight
    --fetch-timeout + 1 s (which aiohttp waits twice: 2.1 s here), then dropped the connection,
    the last URLs never fetched."""
    service = start_service(
        tmp_path / "url-fetcher.log",
        "--allow-private",
        "--fetch-timeout=0.05",
        "--batch-concurrency=1",
        "--max-batch=50",
    )
    batch = asyncio.create_task(call(service, "/fetch/batch", [f"{site}/slow"] * 50))
    async with asyncio.timeout(5):
        while "fetch url=" not in service.log.read_text():  # the first fetch is done
            await asyncio.sleep(0.02)
    service.process.send_signal(signal.SIGTERM)
    status, answer = await batch
    assert status == 200
    assert isinstance(answer, dict)
    assert [r["error"]["code"] for r in answer["results"]] == ["fetch_timeout"] * 50
    assert await asyncio.to_thread(service.process.wait, 10) == 0


def test_invalid_configuration_exits_2() -> None:
    done = subprocess.run(
        [str(URL_FETCHER), "--port", "not-a-port"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert "url-fetcher: invalid configuration" in done.stderr
