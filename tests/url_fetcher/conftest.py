"""Fixtures shared by the url-fetcher tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.url_fetcher.support import base_url, start_target


@pytest.fixture
async def site() -> AsyncIterator[str]:
    """Base URL of the local target server (see `support`), stopped after the test."""
    runner = await start_target()
    yield base_url(runner)
    await runner.cleanup()
