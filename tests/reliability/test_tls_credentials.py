"""`amqps://` against RabbitMQ TLS listeners configured with certificates this session made (a CA,
a server certificate for 127.0.0.1, a client certificate, and a client certificate from a CA
nobody trusts), and credentials that never show.

Two listeners: the shared single node verifies a client certificate when one is sent
(`verify_peer`), a node of this module's own also requires one (`fail_if_no_peer_cert`). The
password of a user made for the test is read from `PROXYMQ_AMQP_URL_FILE` or the environment, and
must not appear in any sidecar log line, in /metrics or in an error answer, also when the broker
refuses it. `proxymq` takes the same TLS options, and says which one is wrong.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from shared.cli.cluster import LocalCluster
from shared.processes import Process, free_port
from tests.conftest import Stack
from tests.reliability.conftest import Certs, start_nodes, tls_config
from tests.reliability.support import TimedTarget
from tests.test_cli import proxymq

pytestmark = [pytest.mark.rabbit, pytest.mark.reliability]
USER = "proxymq-tls"
REFUSED_FOR = 2.5  # seconds of refused connection attempts before looking at the logs


@pytest.fixture(scope="module")
def password() -> str:
    """Distinctive, with characters a URL must escape; the hex part is searched for in logs."""
    return f"pw-{uuid.uuid4().hex}/+@%"


def hex_part(password: str) -> str:
    """The distinctive part of a password: found in its raw and its URL-escaped form alike."""
    return password.split("-")[1][:32]


def add_user(cluster: LocalCluster, password: str) -> None:
    node = cluster.nodes[0]
    existing = cluster.ctl(node, "list_users", "--silent")
    if USER not in existing:
        cluster.ctl(node, "add_user", USER, password)
    cluster.ctl(node, "set_permissions", "-p", "/", USER, ".*", ".*", ".*")


@pytest.fixture(scope="module")
def strict_node(state_dir: Path, certs: Certs, password: str) -> Iterator[LocalCluster]:
    """A node whose TLS listener refuses clients without a certificate from our CA."""
    cluster = start_nodes(
        state_dir / "strict-tls",
        1,
        "t",
        tls=True,
        config=tls_config(certs, require_client_cert=True),
    )
    try:
        add_user(cluster, password)
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def optional_node(node: LocalCluster, password: str) -> LocalCluster:
    add_user(node, password)
    return node


async def start_sidecar(
    stack: Stack, name: str, *args: str, env: dict[str, str], ready: bool
) -> Process:
    """Like `Stack.start`, but without PROXYMQ_AMQP_URL in the environment, so the URL comes
    from where the test says (a file, or the variable it sets)."""
    port = free_port()
    log = (stack.logs / f"{name}-{len(stack.processes)}.log").open("ab")
    process = Process(
        name,
        [*args, "--admin-port", str(port), "--amqp-heartbeat", "2"],
        ready_url=f"http://127.0.0.1:{port}/{'readyz' if ready else 'healthz'}",
        log=log,
        env=env,
    )
    process.admin_port = port  # type: ignore[attr-defined]
    stack.processes.append(process.start())
    await asyncio.to_thread(process.wait_ready, 30)
    return process


def tls_args(
    certs: Certs, *, client: bool, rogue: bool = False, ca: Path | None = None
) -> list[str]:
    args = ["--amqp-ca-file", str(ca or certs.ca)]
    if client:
        cert, key = (
            (certs.rogue_cert, certs.rogue_key) if rogue else (certs.client_cert, certs.client_key)
        )
        args += ["--amqp-cert-file", str(cert), "--amqp-key-file", str(key)]
    return args


async def admin_text(http: aiohttp.ClientSession, process: Process, path: str) -> tuple[int, str]:
    port = process.admin_port  # type: ignore[attr-defined]
    async with http.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


async def assert_secret_kept(
    http: aiohttp.ClientSession, stack: Stack, processes: list[Process], password: str
) -> None:
    secret = hex_part(password)
    assert secret not in stack.log_text(), "the password is in a sidecar's log"
    for process in processes:
        _, metrics = await admin_text(http, process, "/metrics")
        _, ready = await admin_text(http, process, "/readyz")
        assert secret not in metrics + ready, f"the password is in {process.name}'s admin port"


async def round_trip(http: aiohttp.ClientSession, url: str, service: str) -> None:
    async with http.post(
        f"{url}/{service}/echo/tls", data=b"over tls", headers={"X-Request-Timeout": "10"}
    ) as response:
        assert response.status == 200, await response.text()


async def test_client_certificate_and_password_file(
    strict_node: LocalCluster,
    certs: Certs,
    password: str,
    stacks: Callable[[str], Stack],
    service: str,
    timed_target: TimedTarget,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """verify_peer + fail_if_no_peer_cert: CA file, client certificate and key (the dequeuer's
    in the certificate's own file, without --amqp-key-file); the URL with the password comes
    from PROXYMQ_AMQP_URL_FILE, so it is on no command line."""
    secret_file = tmp_path / "amqp-url"
    secret_file.write_text(strict_node.nodes[0].amqps_url(USER, password) + "\n")
    secret_file.chmod(0o600)
    stack = stacks("unused")
    env = {"PROXYMQ_AMQP_URL_FILE": str(secret_file)}
    tls = tls_args(certs, client=True)
    both = tmp_path / "client-and-key.pem"
    both.write_text(certs.client_cert.read_text() + certs.client_key.read_text())
    target_url = timed_target.url
    dequeuer = await start_sidecar(
        stack, "proxymq-dequeuer", "--service", service, "--target", target_url,
        "--amqp-ca-file", str(certs.ca), "--amqp-cert-file", str(both), env=env, ready=True,
    )  # fmt: skip
    api = free_port()
    enqueuer = await start_sidecar(
        stack, "proxymq-enqueuer", "--port", str(api), *tls, env=env, ready=True
    )
    await round_trip(http, f"http://127.0.0.1:{api}", service)
    for process in (dequeuer, enqueuer):
        assert password not in " ".join(process.args)
    await assert_secret_kept(http, stack, [dequeuer, enqueuer], password)


async def test_ca_only_when_client_certificate_is_optional(
    optional_node: LocalCluster,
    certs: Certs,
    password: str,
    stacks: Callable[[str], Stack],
    service: str,
    timed_target: TimedTarget,
    http: aiohttp.ClientSession,
) -> None:
    """verify_peer without fail_if_no_peer_cert: the CA file alone is enough; the URL comes from
    the environment this time."""
    stack = stacks("unused")
    env = {"PROXYMQ_AMQP_URL": optional_node.nodes[0].amqps_url(USER, password)}
    tls = tls_args(certs, client=False)
    target_url = timed_target.url
    dequeuer = await start_sidecar(
        stack, "proxymq-dequeuer", "--service", service, "--target", target_url, *tls,
        env=env, ready=True,
    )  # fmt: skip
    api = free_port()
    enqueuer = await start_sidecar(
        stack, "proxymq-enqueuer", "--port", str(api), *tls, env=env, ready=True
    )
    await round_trip(http, f"http://127.0.0.1:{api}", service)
    await assert_secret_kept(http, stack, [dequeuer, enqueuer], password)


@pytest.mark.parametrize(
    "case",
    ["wrong password", "no client certificate", "untrusted client certificate", "untrusted server"],
)
async def test_refused_connections_answer_503_and_keep_the_secret(
    case: str,
    strict_node: LocalCluster,
    certs: Certs,
    password: str,
    stacks: Callable[[str], Stack],
    service: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Each refusal: the sidecars stay up but not ready, callers get 503 broker_unavailable at
    once, and the password (the right one, or the wrong one tried) shows nowhere."""
    node = strict_node.nodes[0]
    tried = f"bad-{uuid.uuid4().hex}/+@%" if case == "wrong password" else password
    secret_file = tmp_path / "amqp-url"
    secret_file.write_text(node.amqps_url(USER, tried))
    tls = {
        "wrong password": tls_args(certs, client=True),
        "no client certificate": tls_args(certs, client=False),
        "untrusted client certificate": tls_args(certs, client=True, rogue=True),
        "untrusted server": tls_args(certs, client=True, ca=certs.ca.with_name("rogue-ca.pem")),
    }[case]
    stack = stacks("unused")
    env = {"PROXYMQ_AMQP_URL_FILE": str(secret_file)}
    api = free_port()
    enqueuer = await start_sidecar(
        stack, "proxymq-enqueuer", "--port", str(api), *tls, env=env, ready=False
    )
    dequeuer = await start_sidecar(
        stack, "proxymq-dequeuer", "--service", service, "--target", "http://127.0.0.1:9", *tls,
        env=env, ready=False,
    )  # fmt: skip
    await asyncio.sleep(REFUSED_FOR)
    for process in (enqueuer, dequeuer):
        status, ready = await admin_text(http, process, "/readyz")
        assert status == 503 and '"broker_connected": false' in ready, ready
    started = time.monotonic()
    async with http.post(
        f"http://127.0.0.1:{api}/{service}/x", headers={"X-Request-Timeout": "10"}
    ) as response:
        body = await response.text()
        assert response.status == 503, body
        assert response.headers["X-ProxyMQ-Error"] == "broker_unavailable"
    assert time.monotonic() - started < 1.0
    assert hex_part(tried) not in body
    reason = {  # the refusal is the one the case is about, and the log says it
        "wrong password": "ACCESS_REFUSED",
        "no client certificate": "CERTIFICATE_REQUIRED",
        "untrusted client certificate": "UNKNOWN_CA",
        "untrusted server": "CERTIFICATE_VERIFY_FAILED",
    }[case]
    assert reason in stack.log_text()
    await assert_secret_kept(http, stack, [enqueuer, dequeuer], tried)


def tls_environment(certs: Certs) -> dict[str, str]:
    """The sidecars' TLS variables, with a client certificate."""
    return {
        "PROXYMQ_AMQP_CA_FILE": str(certs.ca),
        "PROXYMQ_AMQP_CERT_FILE": str(certs.client_cert),
        "PROXYMQ_AMQP_KEY_FILE": str(certs.client_key),
    }


async def test_proxymq_takes_the_sidecars_tls_options(
    strict_node: LocalCluster, certs: Certs, service: str
) -> None:
    """`proxymq` on a broker with a CA of its own that requires a client certificate, with the
    sidecars' flags and variables; `demo` hands them on to the sidecars it starts. It had no
    such options, so an operator could not look at, fix or try out such a broker at all. The
    management API is the node's own (`topology show` and `delete` had no --management-url)."""
    node = strict_node.nodes[0]
    env = {"PROXYMQ_AMQP_URL": node.amqps_url()}  # guest: from the loopback, also an admin
    flags, management = tls_args(certs, client=True), ["--management-url", node.management_url]
    steps = [
        (["topology", "declare", "--partitions", "2", *flags], env),
        (["status", "--json", *management, *flags], env),
        (["topology", "show", *management], {**env, **tls_environment(certs)}),
        (["dlq", "list", *flags], env),
        (["topology", "delete", "--yes", "--force", *management, *flags], env),
    ]
    runs = [await proxymq(*command, "--service", service, env=given) for command, given in steps]
    for run in runs:
        assert run.code == 0, run.output
    status, shown = json.loads(runs[1].stdout), " ".join(runs[2].stdout.split())
    assert status["source"] == "management" and len(status["partitions"]) == 2, status
    assert "x-delivery-limit=20" in shown and "ProxyMQ's defaults" not in shown, shown
    demo = await proxymq(
        "demo", "--service", f"{service}-demo", env={**env, **tls_environment(certs)}, timeout=120
    )
    assert demo.code == 0, demo.output
    assert "12/12 calls got the expected answer" in " ".join(demo.stdout.split())


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("no CA file", "cannot be verified (self-signed certificate in certificate chain)"),
        ("no client certificate", "wants a client certificate"),
        ("untrusted client certificate", "refused the TLS handshake (TLSV1_ALERT_UNKNOWN_CA)"),
    ],
)
@pytest.mark.parametrize("command", [["status"], ["topology", "show"]])
async def test_proxymq_says_which_tls_option_is_wrong(
    case: str, says: str, command: list[str], strict_node: LocalCluster, certs: Certs
) -> None:
    """One line naming what is wrong and the option that fixes it, exit 1: a refused handshake
    was "RabbitMQ does not answer ... (Connection reset by peer)" with the advice to start a
    broker."""
    tls = {
        "no CA file": [],
        "no client certificate": tls_args(certs, client=False),
        "untrusted client certificate": tls_args(certs, client=True, rogue=True),
    }[case]
    node = strict_node.nodes[0]
    run = await proxymq(
        *command, "--service", "unused", "--management-url", node.management_url, *tls,
        env={"PROXYMQ_AMQP_URL": node.amqps_url()},
    )  # fmt: skip
    assert run.code == 1, run.output
    assert says in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert "make broker" not in run.stderr and not run.stdout


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("missing CA file", "--amqp-ca-file /nonexistent/ca.pem: No such file or directory"),
        ("certificate not PEM", "--amqp-cert-file {text}: holds no PEM certificate"),
        ("missing key", "--amqp-key-file /nonexistent/client.key: No such file or directory"),
        ("key without certificate", "--amqp-key-file {key} needs --amqp-cert-file"),
        ("amqp:// URL", "--amqp-ca-file, --amqp-cert-file, --amqp-key-file are for amqps://"),
    ],
)
async def test_unusable_tls_files_stop_sidecars_and_proxymq_before_they_connect(
    case: str, says: str, certs: Certs, stacks: Callable[[str], Stack], tmp_path: Path
) -> None:
    """The sidecars stopped with a traceback (ValueError, ssl.SSLError `PEM lib`), exit 1, where
    every other bad setting is one line and exit 2; `proxymq` said so only once it connected,
    exit 1; a key file without a certificate file, and any of them beside an amqp:// URL, were
    ignored by all three. Now all three say the same line, exit 2, before anything is
    contacted."""
    text = tmp_path / "text"
    text.write_text("not a certificate\n")
    cert, key = {
        "missing CA file": (certs.client_cert, certs.client_key),
        "certificate not PEM": (text, certs.client_key),
        "missing key": (certs.client_cert, Path("/nonexistent/client.key")),
        "key without certificate": (None, certs.client_key),
        "amqp:// URL": (certs.client_cert, certs.client_key),
    }[case]
    ca = Path("/nonexistent/ca.pem") if case == "missing CA file" else certs.ca
    tls = ["--amqp-ca-file", str(ca), "--amqp-key-file", str(key)]
    tls += ["--amqp-cert-file", str(cert)] if cert else []
    says = says.format(text=text, key=key)
    # Nothing listens: the files are refused before any connection.
    url = "amqp://127.0.0.1:1/" if case == "amqp:// URL" else "amqps://127.0.0.1:1/"
    stack = stacks(url)
    enqueuer, _ = await stack.enqueuer(*tls, wait=False)
    dequeuer = await stack.dequeuer("unused", "http://127.0.0.1:9", *tls, wait=False)
    cli = await proxymq("status", "--service", "unused", *tls, env={"PROXYMQ_AMQP_URL": url})
    for process in (enqueuer, dequeuer):
        assert process.popen is not None
        assert await asyncio.to_thread(process.popen.wait, 20) == 2, stack.log_text()
        assert f"{process.name}: invalid configuration: {says}" in stack.log_text()
    assert "Traceback" not in stack.log_text(), stack.log_text()
    assert cli.code == 2, cli.output
    assert f"proxymq status: error: {says}" in cli.stderr and "Traceback" not in cli.stderr
