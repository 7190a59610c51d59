"""The machine set-up `make broker` relies on (`shared.cli.ensure_broker`), run as make runs it.

It must be quiet and idempotent against a running broker, and, where it cannot help (a remote
URL, a port where nothing listens, wrong credentials), fail fast with a message that says what to
run, without trying to start a second broker. The real broker is never stopped here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from yarl import URL

from shared.cli import ensure_broker
from shared.settings import NO_TLS, TlsFiles
from tests.conftest import AMQP_URL, closed_port, serving

ROOT = Path(__file__).resolve().parent.parent
FAST = 15.0  # seconds: a failing check must not sit in a retry loop


def check(*args: str, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
    """Run as make runs it; a variable given as None is unset."""
    merged = {**os.environ, "PROXYMQ_AMQP_URL": AMQP_URL, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "shared.cli.ensure_broker", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={name: value for name, value in merged.items() if value is not None},
    )


def assert_fails_fast_with_advice(url: str, *expected: str) -> str:
    started = time.monotonic()
    done = check("--amqp-url", url, "--connect-timeout", "3")
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    assert elapsed < FAST, f"took {elapsed:.1f} s"
    assert done.stdout == ""
    assert "starting rabbitmq-server" not in done.stderr
    assert "guest:guest" not in done.stderr, "the password must not be printed"
    for text in expected:
        assert text in done.stderr, done.stderr
    return done.stderr


@pytest.mark.rabbit
def test_running_broker_is_ready_quietly_and_idempotently(amqp_url: str) -> None:
    for _ in range(2):
        started = time.monotonic()
        done = check()
        assert done.returncode == 0, done.stderr
        assert done.stdout == "broker ready at amqp://guest:***@127.0.0.1:5672/\n"
        assert done.stderr == ""
        assert time.monotonic() - started < FAST


@pytest.mark.rabbit
def test_url_read_from_a_secret_file(amqp_url: str, tmp_path: Path) -> None:
    secret = tmp_path / "amqp"
    secret.write_text(amqp_url + "\n")
    done = check(env={"PROXYMQ_AMQP_URL": None, "PROXYMQ_AMQP_URL_FILE": str(secret)})
    assert done.returncode == 0, done.stderr


def test_local_port_where_nothing_listens_is_not_started() -> None:
    """A broker started here would listen on 5672, not on the URL's port: say so."""
    with closed_port() as port:
        stderr = assert_fails_fast_with_advice(
            f"amqp://guest:guest@127.0.0.1:{port}/",
            "does not answer",
            "would listen on 5672",
            "make broker",
            "docker compose up -d rabbitmq",
        )
    assert f":{port}/" in stderr


def test_the_compose_broker_advised_comes_with_its_url() -> None:
    """`docker compose up -d rabbitmq` makes user proxymq, not guest: a `make demo` that
    followed the advice with the default URL was refused the credentials."""
    in_compose = (ROOT / "deploy" / "compose" / "amqp-url").read_text().strip()
    from_the_host = in_compose.replace("@rabbitmq:", "@127.0.0.1:")
    with closed_port() as port:
        assert_fails_fast_with_advice(
            f"amqp://guest:guest@127.0.0.1:{port}/",
            "`docker compose up -d rabbitmq` with",
            f"PROXYMQ_AMQP_URL={from_the_host}",
        )


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A port that accepts connections and never answers (listening, never accepting)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("peer", ["http", "silent"])
async def test_a_listener_that_is_not_amqp_is_named_as_such(peer: str) -> None:
    """`make broker` pointed at the management API (15672), or any port that is not AMQP's,
    said "does not answer" and how to get a broker, though something answered there."""
    async with contextlib.AsyncExitStack() as stack:
        if peer == "http":
            port = URL(await stack.enter_async_context(serving(web.Application()))).port
        else:
            port = stack.enter_context(silent_listener())
        url = f"amqp://guest:guest@127.0.0.1:{port}/"
        stderr = await asyncio.to_thread(
            assert_fails_fast_with_advice,
            url,
            f"something listens at amqp://guest:***@127.0.0.1:{port}/ but does not answer AMQP",
            "RabbitMQ takes AMQP on port 5672",
        )
    assert "does not answer at" not in stderr and "to get a broker" not in stderr


def test_remote_url_is_not_started_here() -> None:
    assert_fails_fast_with_advice(
        "amqp://guest:guest@broker.invalid:5672/",
        "does not answer at amqp://guest:***@broker.invalid:5672/",
        "broker.invalid is not this machine",
        "docker compose up -d rabbitmq",
    )


@pytest.mark.rabbit
def test_wrong_credentials_are_reported_not_restarted(amqp_url: str) -> None:
    assert_fails_fast_with_advice(
        "amqp://guest:wrong@127.0.0.1:5672/", "refused the credentials", "PROXYMQ_AMQP_URL"
    )


@pytest.mark.rabbit
def test_a_user_that_may_not_declare_exchanges_is_told_so(amqp_url: str) -> None:
    """The plugin check declares an exchange; a user without the configure permission made
    `make broker` end in aiormq's traceback (`ChannelAccessRefused`)."""
    user, password = f"proxymq-setup-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    subprocess.run(["rabbitmqctl", "-q", "add_user", user, password], check=True)
    try:
        subprocess.run(
            ["rabbitmqctl", "-q", "set_permissions", "-p", "/", user, "^$", ".*", ".*"],
            check=True,
        )
        stderr = assert_fails_fast_with_advice(
            f"amqp://{user}:{password}@127.0.0.1:5672/",
            f"refused user '{user}' the configure permission",
            f"rabbitmqctl set_permissions -p / {user} '.*' '.*' '.*'",
        )
        assert "Traceback" not in stderr and password not in stderr
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", user], check=True)


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("broker.invalid", False),
        ("203.0.113.7", False),
    ],
)
def test_is_local(host: str, local: bool) -> None:
    assert ensure_broker.is_local(host) is local


def test_management_url_follows_the_amqp_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROXYMQ_MANAGEMENT_URL", raising=False)
    assert ensure_broker.management_url("amqp://u:p@rabbit:5672/") == "http://rabbit:15672"
    monkeypatch.setenv("PROXYMQ_MANAGEMENT_URL", "https://mgmt.example/")
    assert ensure_broker.management_url("amqp://u:p@rabbit:5672/") == "https://mgmt.example"


def make_plan(target: str) -> str:
    """What make would run for `target`, without running it."""
    done = subprocess.run(
        ["make", "--dry-run", "--always-make", target],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=True,
    )
    return done.stdout


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("test", ["pip install", "ruff check", "mypy", "ensure_broker", "pytest -q"]),
        ("demo", ["pip install", "ensure_broker", "proxymq demo"]),
        ("bench", ["ensure_broker", "proxymq bench"]),
    ],
)
def test_make_targets_are_self_sufficient(target: str, expected: list[str]) -> None:
    plan = make_plan(target)
    positions = [plan.find(step) for step in expected]
    assert all(position >= 0 for position in positions), plan
    assert positions == sorted(positions), f"steps out of order:\n{plan}"


def test_ci_entry_point_runs_make_test() -> None:
    run = ROOT / ".ci" / "run"
    assert os.access(run, os.X_OK)
    text = run.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in text
    assert "make test" in text


class FakeMachine:
    """A machine without a running broker, for the start and plugin logic: no test may stop
    or start the real broker. Records the commands the checker would run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, installed: bool = True) -> None:
        self.commands: list[list[str]] = []
        self.up = False
        self.plugins: set[str] = set()
        self.installed = installed
        monkeypatch.setattr(ensure_broker, "answers", self.answers)
        monkeypatch.setattr(ensure_broker, "listening", lambda host, port: self.up)
        monkeypatch.setattr(ensure_broker, "has_consistent_hash", self.has_hash)
        monkeypatch.setattr(
            ensure_broker,
            "management_answers",
            lambda url, timeout=3.0: "rabbitmq_management" in self.plugins,
        )
        monkeypatch.setattr("shutil.which", self.which)
        monkeypatch.setattr(ensure_broker.Checker, "run", self.run)
        monkeypatch.setattr("os.geteuid", lambda: 0)

    def which(self, name: str) -> str | None:
        return f"/usr/bin/{name}" if self.installed or name == "apt-get" else None

    async def answers(
        self, url: str, timeout: float = 5.0, tls: TlsFiles = NO_TLS
    ) -> ensure_broker.BrokerProblem | None:
        return None if self.up else ensure_broker.BrokerProblem("RabbitMQ does not answer")

    async def has_hash(self, url: str, tls: TlsFiles = NO_TLS) -> bool:
        return "rabbitmq_consistent_hash_exchange" in self.plugins

    async def run(
        self, command: list[str], *, check: bool = True, env: object = None
    ) -> tuple[int, str]:
        self.commands.append(list(command))
        if command[:2] == ["apt-get", "install"]:
            self.installed = True
        if command[:2] == ["rabbitmq-server", "-detached"]:
            self.up = True
        if command[:2] == ["rabbitmq-plugins", "enable"]:
            self.plugins.update(command[2:])
        if command[:2] == ["rabbitmq-plugins", "list"]:
            return 0, "".join(f"{plugin}\n" for plugin in sorted(self.plugins))
        return 0, ""


def ensure(url: str = "amqp://guest:guest@127.0.0.1:5672/") -> None:
    checker = ensure_broker.Checker(url, connect_timeout=1, start_timeout=5)
    asyncio.run(checker.ensure())


def test_a_stopped_local_broker_is_started_and_its_plugins_enabled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    machine = FakeMachine(monkeypatch)
    machine.plugins = {"rabbitmq_management"}
    ensure()
    assert machine.commands == [
        ["rabbitmq-server", "-detached"],
        ["rabbitmqctl", "await_startup", "--timeout", "5"],
        ["rabbitmq-plugins", "list", "-e", "-m"],
        ["rabbitmq-plugins", "enable", "rabbitmq_consistent_hash_exchange"],
    ]


def test_a_missing_broker_is_installed_with_apt_when_root(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    machine = FakeMachine(monkeypatch, installed=False)
    ensure()
    assert [command[:2] for command in machine.commands] == [
        ["apt-get", "update"],
        ["apt-get", "install"],
        ["rabbitmq-server", "-detached"],
        ["rabbitmqctl", "await_startup"],
        ["rabbitmq-plugins", "list"],
        ["rabbitmq-plugins", "enable"],
    ]
    assert set(machine.commands[-1][2:]) == set(ensure_broker.PLUGINS)


def test_a_ready_broker_runs_no_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    machine = FakeMachine(monkeypatch)
    machine.up, machine.plugins = True, set(ensure_broker.PLUGINS)
    ensure()
    assert machine.commands == []


def test_not_root_gets_told_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    machine = FakeMachine(monkeypatch, installed=False)
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(ensure_broker.BrokerProblem, match="not installed") as caught:
        ensure()
    assert "apt-get install rabbitmq-server" in str(caught.value)
    assert machine.commands == []


def test_a_remote_broker_without_the_plugin_is_not_touched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    machine = FakeMachine(monkeypatch)
    machine.up = True
    with pytest.raises(ensure_broker.BrokerProblem, match="x-consistent-hash") as caught:
        ensure("amqp://guest:guest@broker.invalid:5672/")
    assert "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange" in str(caught.value)
    assert machine.commands == []
