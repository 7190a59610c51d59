"""Command-line and environment configuration of url-fetcher."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from shared.settings import ByteSize, CommandSettings, Count, Host, Port, Seconds
from url_fetcher.fetch import MAX_CONNECTIONS


class UrlFetcherSettings(CommandSettings):
    """Fetch pages on request, report status, size, time and title; refuse private targets."""

    prog: ClassVar[str] = "url-fetcher"
    summary: ClassVar[str] = (
        "Fetch web pages on request and report status, size, timing and title.\n\n"
        'POST /fetch {"url": ...}, POST /fetch/batch {"urls": [...]}, POST /batch (the '
        "dequeuer's batch protocol), GET /healthz.\n\n"
        "Private, loopback and link-local targets are refused unless --allow-private is given."
    )

    host: Host = Field("127.0.0.1", description="address to listen on")
    port: Port = Field(8000, ge=1, le=65535, description="TCP port to listen on")
    allow_private: bool = Field(
        False,
        description="allow fetching loopback, private, link-local and other non-public "
        "addresses (off by default to prevent server-side request forgery)",
    )
    max_bytes: ByteSize = Field(
        5 * 1024 * 1024,
        description="stop reading a response body after this many bytes and report it as "
        "truncated (e.g. 5MiB, 512KiB, 1048576)",
    )
    fetch_timeout: Seconds = Field(
        10.0,
        gt=0,
        description="seconds one fetch may take in total, redirects and body included",
    )
    max_redirects: Count = Field(
        5,
        ge=0,
        description="redirects followed per fetch (at most 1,000,000); each hop is checked again",
    )
    max_connections: Count = Field(
        MAX_CONNECTIONS,
        ge=1,
        description="connections to fetch targets open at once, across all fetches (at most "
        "1,000,000); a fetch past them waits for one, within --fetch-timeout. Each is a file "
        "descriptor: keep it under the open-file limit (ulimit -n), and above the fetches expected "
        "at once (a dequeuer's --concurrency, times --batch-concurrency when it batches)",
    )
    batch_concurrency: Count = Field(
        16,
        ge=1,
        description="fetches (or items) run at the same time within one /fetch/batch or "
        "/batch request (at most 1,000,000)",
    )
    batch_timeout: Seconds = Field(
        30.0,
        gt=0,
        description="seconds one /fetch/batch or /batch request may take; URLs (or items) not "
        "done by then are answered fetch_timeout in their entries. Keep it below the dequeuer's "
        "--call-timeout (60 s by default)",
    )
    max_batch: Count = Field(
        100,
        ge=1,
        description="most URLs (or items) accepted by one /fetch/batch or /batch request (at "
        "most 1,000,000)",
    )
    max_body: ByteSize = Field(
        1024 * 1024,
        description="largest request body of /fetch and /fetch/batch, and of each /batch item; "
        "larger gets 413",
    )
    max_batch_body: ByteSize = Field(
        16 * 1024 * 1024,
        description="largest body of one /batch request; larger gets 413. A batch carries its "
        "requests' bodies in base64 (4/3 of their size) plus a few hundred bytes each: keep it "
        "above the dequeuer's --batch-size times 4/3 of the largest body it may forward",
    )
