"""Make sure a RabbitMQ broker that ProxyMQ can use answers at the AMQP URL (`make broker`).

A fresh development machine has no broker, or a stopped one, or one without the two plugins
ProxyMQ needs (the consistent-hash exchange for partitioning, the management API for
`proxymq status`). This fixes what it safely can, on this machine only:

- the broker answers: nothing to start;
- the URL points at this machine, at RabbitMQ's default port, and `rabbitmq-server` is installed:
  start it (`rabbitmq-server -detached`) and wait, bounded, until it answers;
- it is not installed and we are root on a Debian-like system: `apt-get install rabbitmq-server`
  first;
- anything else (a remote broker, another port, wrong credentials): say what to run, exit 1.

Then the plugins: checked by using them (cheap, and also right for a remote broker), enabled with
`rabbitmq-plugins` only when missing and only on a local broker. Quiet when all is well: one line.

The same module gives the other `proxymq` commands their broker connection (`connect`), so every
command says the same thing when RabbitMQ is down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
import uuid
from base64 import b64encode
from collections.abc import Sequence

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection
from yarl import URL

from shared.broker import TLS_PORT, scheme_mismatch
from shared.cli.common import add_amqp_url, check_tls_files, configured_management_url
from shared.connect_failures import failure_reason, redact, refusal
from shared.settings import NO_TLS, TlsFiles, split_urls

PLUGINS = ("rabbitmq_consistent_hash_exchange", "rabbitmq_management")
NODE_PORT = 5672  # where `rabbitmq-server -detached` listens unless configured otherwise
MANAGEMENT_PORT = 15672
START_TIMEOUT = 60.0
CONNECT_TIMEOUT = 5.0
# The compose broker's user is deploy/compose/amqp-url's, not guest.
HOW_TO_START = (
    "to get a broker: `make broker` (starts, or installs, RabbitMQ for a local URL), or\n"
    "  `apt-get install rabbitmq-server && rabbitmq-server -detached`, or\n"
    "  `docker compose up -d rabbitmq` with\n"
    "  PROXYMQ_AMQP_URL=amqp://proxymq:proxymq-demo@127.0.0.1:5672/,\n"
    "  or set PROXYMQ_AMQP_URL to a running broker"
)


class BrokerProblem(Exception):
    """A state this tool cannot fix by itself; the message says what the person should run.

    `advice` is kept apart so a caller can add what it learned (the host is remote, say) between
    the diagnosis and the advice."""

    def __init__(self, message: str, advice: str | None = HOW_TO_START) -> None:
        super().__init__(message)
        self.message = message
        self.advice = advice

    def __str__(self) -> str:
        return self.message if self.advice is None else f"{self.message}\n  {self.advice}"

    def but(self, detail: str) -> BrokerProblem:
        return BrokerProblem(f"{self.message}\n  {detail}", self.advice)


class CredentialsRefused(BrokerProblem):
    """The broker is up and said no: starting another one would not help."""


def quiet_amqp_logs() -> None:
    """aiormq logs every failed connect attempt with a traceback; our own message says it
    better, once."""
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def management_url(amqp_url: str) -> str:
    """Default management API base: PROXYMQ_MANAGEMENT_URL, else the broker's host on 15672."""
    configured = configured_management_url()
    if configured is not None:
        return configured
    host = URL(amqp_url).host or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{MANAGEMENT_PORT}"


def basic_auth(amqp_url: str) -> str:
    """The management API takes the AMQP user's credentials (guest/guest by default)."""
    parsed = URL(amqp_url)
    token = f"{parsed.user or 'guest'}:{parsed.password or 'guest'}".encode()
    return "Basic " + b64encode(token).decode()


def management_access(base: str, amqp_url: str) -> tuple[str, str]:
    """The management API's base URL without credentials, and its Authorization header: the
    credentials written in the URL (as KEDA's host has them), else the AMQP user's. aiohttp
    refuses a URL with credentials beside the header, and messages show the URL."""
    parsed = URL(base.rstrip("/"))
    return str(parsed.with_user(None)), basic_auth(base if parsed.user else amqp_url)


def is_local(host: str) -> bool:
    """True when `host` is this machine: loopback, or an address one of our interfaces has
    (binding to it succeeds). Only then may we start or install a broker for the URL."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, address in infos:
        ip = ipaddress.ip_address(address[0])
        if ip.is_loopback:
            return True
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((address[0], 0))
            except OSError:
                continue
            return True
    return False


async def connect(
    url: str, name: str, timeout: float = CONNECT_TIMEOUT, tls: TlsFiles = NO_TLS
) -> aio_pika.abc.AbstractConnection:
    """A plain (not robust) connection for a command that runs once, or `BrokerProblem`
    saying why the broker did not answer and what to run. A cluster's nodes (`a,b,c`) are tried
    in turn, as the sidecars do."""
    quiet_amqp_logs()
    try:
        context = tls.context_for(url)
    except ValueError as exc:
        raise BrokerProblem(str(exc), advice=None) from None
    problems: list[BrokerProblem] = []
    for node in split_urls(url):
        try:
            return await aio_pika.connect(
                node,
                timeout=timeout,
                ssl_context=context,
                client_properties={"connection_name": name},
            )
        except Exception as exc:  # whatever the cause, it becomes the one-line reason
            problems.append(await _problem(node, exc, timeout, context))
    if len(problems) == 1:
        raise problems[0]
    refused = [p for p in problems if isinstance(p, CredentialsRefused)]
    if refused:
        raise refused[0]
    raise BrokerProblem("no node answers: " + "; ".join(p.message for p in problems))


async def _problem(
    url: str, exc: BaseException, timeout: float, context: ssl.SSLContext | None
) -> BrokerProblem:
    """Why `url` gave no connection: refused by a broker that answered, something that is no
    broker, or nothing at all."""
    refused = refusal(url, exc)
    if refused is not None:
        return CredentialsRefused(*refused)
    mismatch = await scheme_mismatch(url, min(timeout, 2.0))
    if mismatch is not None:
        return BrokerProblem(mismatch, advice=None)
    tls_refused = await _tls_refusal(url, context, min(timeout, 2.0))
    if tls_refused is not None:
        return tls_refused
    greeting = await _greeting(url, min(timeout, 2.0))
    if greeting is not None and not greeting.startswith((b"\x01", b"AMQP")):
        said = f"it said {greeting.splitlines()[0][:40]!r}" if greeting else "it said nothing"
        return BrokerProblem(
            f"something listens at {redact(url)} but does not answer AMQP ({said})",
            f"is the port right? RabbitMQ takes AMQP on port {NODE_PORT} (amqps:// on 5671); "
            f"{MANAGEMENT_PORT} is its management API, over HTTP",
        )
    return BrokerProblem(f"RabbitMQ does not answer at {redact(url)} ({failure_reason(exc)})")


async def _tls_refusal(
    url: str, context: ssl.SSLContext | None, timeout: float
) -> CredentialsRefused | None:
    """Why a TLS handshake with `url` fails, from a probe connection of its own: aiormq reports
    it as a connection error, mostly a reset (a TLS 1.3 broker refuses a client certificate
    after the handshake, and its alert is lost to the AMQP header written meanwhile), which
    read as a broker that does not answer. The probe writes nothing and waits for that alert."""
    parsed = URL(url)
    if context is None or parsed.scheme != "amqps":
        return None
    try:
        connecting = asyncio.open_connection(
            parsed.host, parsed.explicit_port or TLS_PORT, ssl=context
        )
        reader, writer = await asyncio.wait_for(connecting, timeout)
    except ssl.SSLError as exc:
        return _refused(url, exc)
    except (OSError, TimeoutError):
        return None
    try:
        await asyncio.wait_for(reader.read(1), timeout)
    except ssl.SSLError as exc:
        return _refused(url, exc)
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
    return None


def _refused(url: str, exc: ssl.SSLError) -> CredentialsRefused | None:
    """What the broker's certificate or its alert says; None for another failure."""
    where = f"RabbitMQ at {redact(url)}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return CredentialsRefused(
            f"the certificate of {where} cannot be verified ({exc.verify_message})",
            "give the CA that signed it: --amqp-ca-file / PROXYMQ_AMQP_CA_FILE (and connect by "
            "a name the certificate has)",
        )
    if str(exc.reason).endswith("CERTIFICATE_REQUIRED"):
        return CredentialsRefused(
            f"{where} wants a client certificate",
            "give one: --amqp-cert-file and --amqp-key-file / PROXYMQ_AMQP_CERT_FILE and "
            "PROXYMQ_AMQP_KEY_FILE",
        )
    if "_ALERT_" not in str(exc.reason):
        return None
    return CredentialsRefused(
        f"{where} refused the TLS handshake ({exc.reason})",
        "a client certificate must come from a CA the broker trusts: --amqp-cert-file / "
        "PROXYMQ_AMQP_CERT_FILE",
    )


async def _greeting(url: str, timeout: float) -> bytes | None:
    """The first bytes the peer at an amqp:// URL answers AMQP's protocol header with, b"" when
    it says nothing in `timeout`; None when nothing takes the connection (or the URL is
    amqps://). A broker answers with Connection.Start (a method frame: its first byte is 1),
    or with the protocol header of the version it wants instead."""
    parsed = URL(url)
    if parsed.scheme != "amqp":
        return None
    try:
        connecting = asyncio.open_connection(parsed.host, parsed.port or NODE_PORT)
        reader, writer = await asyncio.wait_for(connecting, timeout)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(b"AMQP\x00\x00\x09\x01")
        return await asyncio.wait_for(reader.read(64), timeout)
    except (OSError, TimeoutError):
        return b""
    finally:
        writer.close()


async def answers(
    url: str, timeout: float = CONNECT_TIMEOUT, tls: TlsFiles = NO_TLS
) -> BrokerProblem | None:
    """None when an AMQP session opens at `url`, else why not."""
    try:
        connection = await connect(url, "proxymq broker check", timeout, tls)
    except BrokerProblem as exc:
        return exc
    await connection.close()
    return None


def listening(host: str, port: int) -> bool:
    """Something accepts TCP there: a broker that is up but refuses us (vhost, TLS), or not a
    broker at all. Either way, starting rabbitmq-server would not help."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


async def has_consistent_hash(url: str, tls: TlsFiles = NO_TLS) -> bool:
    """Declare (and drop) a throwaway x-consistent-hash exchange: works on any broker we can
    reach, where `rabbitmq-plugins` only works on this machine. An unknown exchange type
    closes the whole connection, so the check has a connection of its own. A user that may
    not declare it is `CredentialsRefused`."""
    connection = await connect(url, "proxymq plugin check", tls=tls)
    name = f"proxymq.check-{uuid.uuid4().hex[:8]}"
    try:
        channel = await connection.channel()
        await channel.declare_exchange(
            name, aio_pika.ExchangeType.X_CONSISTENT_HASH, auto_delete=True
        )
        await channel.exchange_delete(name)
        return True
    except aiormq.exceptions.ConnectionCommandInvalid:
        return False
    except aiormq.exceptions.ChannelAccessRefused as exc:
        first = URL(split_urls(url)[0])
        user, vhost = first.user or "guest", first.path[1:] or "/"
        raise CredentialsRefused(
            f"RabbitMQ at {redact(url)} refused user {user!r} the configure permission the "
            f"plugin check needs ({failure_reason(exc)})",
            "the demo, the benchmarks and the tests declare services' exchanges and queues: "
            f"rabbitmqctl set_permissions -p {vhost} {user} '.*' '.*' '.*', or use another user",
        ) from None
    finally:
        await _close_quietly(connection)


def management_answers(amqp_url: str, timeout: float = 3.0) -> bool:
    base, authorization = management_access(management_url(amqp_url), amqp_url)
    request = urllib.request.Request(
        base + "/api/overview", headers={"Authorization": authorization}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class Checker:
    """One run of the check; `say` reports progress (stderr) so stdout stays one line."""

    def __init__(
        self, url: str, connect_timeout: float, start_timeout: float, tls: TlsFiles = NO_TLS
    ) -> None:
        self.url = url
        self.tls = tls
        self.parsed = URL(url)
        self.connect_timeout = connect_timeout
        self.start_timeout = start_timeout

    def say(self, text: str) -> None:
        print(f"broker: {text}", file=sys.stderr, flush=True)

    async def ensure(self) -> None:
        problem = await answers(self.url, self.connect_timeout, self.tls)
        if problem is not None:
            await self.start_local(problem)
        await self.ensure_plugins()

    async def start_local(self, problem: BrokerProblem) -> None:
        """Start (or install, then start) a broker, only where that can fix `problem`."""
        host = self.parsed.host or "127.0.0.1"
        port = self.parsed.port or NODE_PORT
        if isinstance(problem, CredentialsRefused) or listening(host, port):
            raise problem
        if not is_local(host):
            raise problem.but(f"{host} is not this machine: nothing was started")
        if port != NODE_PORT:
            raise problem.but(
                f"a broker started here would listen on {NODE_PORT}, not {port}: "
                "start yours on that port, or fix the URL"
            )
        if shutil.which("rabbitmq-server") is None:
            await self.install()
        self.say("starting rabbitmq-server")
        code, output = await self.run(["rabbitmq-server", "-detached"], check=False)
        if code != 0 and "already running" not in output:
            raise BrokerProblem(
                f"`rabbitmq-server -detached` exited with {code}:\n{output}",
                "start it as root or as the rabbitmq user, or see /var/log/rabbitmq/",
            )
        # The AMQP check below decides; this only spares polling while the node boots.
        await self.run(
            ["rabbitmqctl", "await_startup", "--timeout", str(int(self.start_timeout))],
            check=False,
        )
        deadline = time.monotonic() + self.start_timeout
        while await answers(self.url, self.connect_timeout, self.tls) is not None:
            if time.monotonic() > deadline:
                raise BrokerProblem(
                    f"rabbitmq-server was started but {redact(self.url)} still does not answer "
                    f"after {self.start_timeout:g} s",
                    "see /var/log/rabbitmq/ for why",
                )
            await asyncio.sleep(0.5)

    async def install(self) -> None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise BrokerProblem("RabbitMQ is not installed, and this is not root on Debian/Ubuntu")
        self.say("installing rabbitmq-server with apt-get (a minute or two)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        await self.run(["apt-get", "update", "-qq"], env=env)
        await self.run(["apt-get", "install", "-y", "-qq", "rabbitmq-server"], env=env)

    async def ensure_plugins(self) -> None:
        hash_ok = await has_consistent_hash(self.url, self.tls)
        management_ok = await asyncio.to_thread(management_answers, self.url)
        if hash_ok and management_ok:
            return
        if (
            not is_local(self.parsed.host or "127.0.0.1")
            or shutil.which("rabbitmq-plugins") is None
        ):
            if not hash_ok:
                raise BrokerProblem(
                    f"the broker at {redact(self.url)} has no x-consistent-hash exchange type",
                    f"on the broker run `rabbitmq-plugins enable {' '.join(PLUGINS)}`",
                )
            self.say(
                f"the management API does not answer at {redact(management_url(self.url))}; "
                "`proxymq status` will show AMQP counts only (on the broker: "
                "`rabbitmq-plugins enable rabbitmq_management`)"
            )
            return
        _, listed = await self.run(["rabbitmq-plugins", "list", "-e", "-m"])
        enabled = {line.strip() for line in listed.splitlines()}
        missing = [plugin for plugin in PLUGINS if plugin not in enabled]
        if missing:
            self.say(f"enabling {' '.join(missing)}")
            await self.run(["rabbitmq-plugins", "enable", *missing])
        if not await has_consistent_hash(self.url, self.tls):
            raise BrokerProblem(
                "x-consistent-hash is still unknown to the broker after enabling the plugin",
                "check `rabbitmq-plugins list` and the broker log (/var/log/rabbitmq/)",
            )
        if "rabbitmq_management" in missing:
            await self.wait_for_management()

    async def wait_for_management(self) -> None:
        """The management listener comes up a moment after the plugin is enabled."""
        deadline = time.monotonic() + 20
        while not await asyncio.to_thread(management_answers, self.url):
            if time.monotonic() > deadline:
                self.say(
                    f"the management API does not answer yet at {redact(management_url(self.url))}"
                )
                return
            await asyncio.sleep(0.5)

    async def run(
        self,
        command: Sequence[str],
        *,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> tuple[int, str]:
        """Run a RabbitMQ or apt tool, bounded; (exit code, output). The output is shown only
        when the tool fails."""
        timeout = 900.0 if command[0] == "apt-get" else self.start_timeout + 30
        shown = " ".join(command)
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
            )
        except OSError as exc:
            raise BrokerProblem(f"`{shown}` failed: {exc}") from None
        try:
            raw, _ = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise BrokerProblem(f"`{shown}` took longer than {timeout:g} s") from None
        output = raw.decode(errors="replace")
        code = process.returncode if process.returncode is not None else -1
        if check and code != 0:
            raise BrokerProblem(f"`{shown}` exited with {code}:\n{output.strip()[-2000:]}")
        return code, output


async def _close_quietly(connection: AbstractConnection) -> None:
    if not connection.is_closed:
        with contextlib.suppress(aiormq.exceptions.AMQPError, OSError):
            await connection.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shared.cli.ensure_broker",
        description="Make sure RabbitMQ answers at the AMQP URL with the plugins ProxyMQ needs; "
        "start (or install) it when the URL is this machine.",
    )
    add_amqp_url(parser)
    parser.add_argument(
        "--connect-timeout", type=float, default=CONNECT_TIMEOUT, help="seconds per attempt"
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=START_TIMEOUT,
        help="seconds a started broker may take to answer",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_tls_files(args)
    url = args.amqp_url
    try:
        configured_management_url()
    except ValueError as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 2
    checker = Checker(url, args.connect_timeout, args.start_timeout, TlsFiles.of(args))
    try:
        asyncio.run(checker.ensure())
    except BrokerProblem as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 1
    print(f"broker ready at {redact(url)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
