"""A sidecar whose broker is down or refuses it keeps trying, and says so in one line (again
once a minute), with what to fix, instead of two lines a second."""

from __future__ import annotations

import asyncio

import pytest
from yarl import URL

from shared.processes import free_port
from tests.conftest import AMQP_URL, Stack

pytestmark = pytest.mark.rabbit


async def test_a_sidecar_says_once_why_it_cannot_connect(stack: Stack, service: str) -> None:
    wrong_password = str(URL(AMQP_URL).with_password("not-the-password"))
    nobody = str(URL(AMQP_URL).with_port(free_port()))
    await stack.dequeuer(
        service, "http://127.0.0.1:9", wait=False, env={"PROXYMQ_AMQP_URL": wrong_password}
    )
    await stack.enqueuer(wait=False, env={"PROXYMQ_AMQP_URL": nobody})
    await asyncio.sleep(4)  # attempts every second: a few of them
    log = stack.log_text()
    assert log.count("refused the credentials") == 1, log
    assert "fix the user and password in --amqp-url / PROXYMQ_AMQP_URL" in log
    assert log.count(f"cannot connect to {URL(nobody).with_password('***')}") == 1, log
    assert "error when creating transport" not in log and "fail_fast" not in log, log
    assert "not-the-password" not in log
