"""`proxymq` as an operator runs it: the console script in a subprocess, against the real broker.

Each test works on a service of its own (the `service` fixture: a unique name whose topology is
deleted afterwards), so tests never see each other's queues.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pty
import re
import select
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiohttp import web

from shared import topology
from shared.cli.common import is_setting
from shared.cli.main import build_parser
from shared.processes import script
from tests.conftest import AMQP_URL, closed_port, serving

pytestmark = pytest.mark.rabbit
MANAGEMENT_LAG = 20.0  # the management API's statistics refresh every 5 s


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


async def proxymq(*args: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> Run:
    """Run the console script without blocking the loop (the test's own AMQP connection keeps
    its heartbeats); stdin is not a terminal, as in CI."""
    process = await asyncio.create_subprocess_exec(
        script("proxymq"),
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PROXYMQ_AMQP_URL": AMQP_URL, "COLUMNS": "200", **(env or {})},
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


def subcommands() -> list[list[str]]:
    """Every `proxymq` command and sub-action, found in the parser so new ones are covered."""
    found: list[list[str]] = [[]]

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found.append([*prefix, name])
                    walk(child, [*prefix, name])

    walk(build_parser(), [])
    return found


@pytest.mark.parametrize("command", subcommands(), ids=lambda c: " ".join(c) or "proxymq")
def test_help_of_every_command(command: list[str]) -> None:
    done = subprocess.run(
        [script("proxymq"), *command, "--help"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert "usage: proxymq" in done.stdout


def parsers() -> list[argparse.ArgumentParser]:
    """`proxymq` and every command and action under it."""
    found = [build_parser()]
    for parser in found:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += action.choices.values()
    return found


def options() -> list[tuple[str, argparse.Action]]:
    """Every option of every `proxymq` command, with the command's name."""
    return [
        (parser.prog, action)
        for parser in parsers()
        for action in parser._actions
        if action.option_strings and action.dest != "help"
    ]


def test_help_reads_like_the_sidecars() -> None:
    """`proxymq`'s help took values as `--amqp-url AMQP_URL`, `--partitions PARTITIONS`,
    `--limit LIMIT`, `--base-port BASE_PORT` where the sidecars say `URL`, `N` and `PORT`; wrote
    defaults as `(default 8)`, `(8)` and `(default: 10, ...)`; left `cluster status --json`
    without a word, `cluster start --prefix` without its default, and showed Markdown quotes."""
    shown: dict[str, set[str]] = {}
    for command, action in options():
        flag = action.option_strings[0]
        assert action.help, f"{command} {flag} has no help"
        assert "`" not in action.help, f"{command} {flag}"
        assert not re.search(
            r"\(default [^:]|; default |\([\w.,]+(, [^)]*)?\)( \[env \w+\])?$", action.help
        ), f"{command} {flag}: {action.help}"
        if action.nargs != 0 and not action.choices:
            assert action.metavar, f"{command} {flag} shows argparse's {action.dest.upper()}"
            shown.setdefault(flag, set()).add(str(action.metavar))
    same_as_the_sidecars = {
        "--amqp-url": "URL",
        "--management-url": "URL",
        "--service": "NAME",
        "--partitions": "N",
        "--delivery-limit": "N",
        "--max-length": "N",
        "--limit": "N",
        "--nodes": "N",
        "--base-port": "PORT",
        "--target-port": "PORT",
    }
    for flag, metavar in same_as_the_sidecars.items():
        assert shown[flag] == {metavar}, flag
    prefix = next(a for c, a in options() if c.endswith("cluster start") and a.dest == "prefix")
    assert prefix.help and prefix.help.endswith("(default: rabbit)")
    for parser in parsers():
        text = parser.description or ""
        assert "`" not in text and "shown to a person" not in text, parser.prog
        assert "Debian" not in text, parser.prog


def test_help_names_only_variables_there_are() -> None:
    """`proxymq` reads the broker, the service and its layout from the environment, not every
    option; url-fetcher has no --amqp-url."""
    tool = subprocess.run([script("proxymq"), "--help"], capture_output=True, text=True, timeout=30)
    assert "Every option" not in tool.stdout and "PROXYMQ_AMQP_URL" in tool.stdout
    fetcher = subprocess.run(
        [script("url-fetcher"), "--help"], capture_output=True, text=True, timeout=30
    )
    assert "amqp" not in fetcher.stdout.lower()
    assert "--host is PROXYMQ_HOST" in fetcher.stdout


def test_a_variable_in_an_options_help_is_read_by_it_or_said_to_be_the_dequeuers() -> None:
    """`proxymq inject --ready-path` said `the microservice's readiness path
    (PROXYMQ_READY_PATH)`, as if inject read that variable; it writes it into the dequeuer's
    environment."""
    for command, action in options():
        if is_setting(action):
            continue
        for variable in re.finditer(r"PROXYMQ_\w+", action.help or ""):
            before = (action.help or "")[: variable.start()]
            assert before.endswith("dequeuer's "), f"{command} {action.option_strings[0]}"


@pytest.mark.parametrize(
    "environment",
    [{"PROXYMQ_AMQP_URL": "amqp://[::1"}, {"PROXYMQ_AMQP_URL_FILE": "/nonexistent"}],
    ids=["bad-url", "missing-file"],
)
def test_help_works_whatever_the_environment_holds(environment: dict[str, str]) -> None:
    for command in ([], ["dlq", "list"]):
        done = subprocess.run(
            [script("proxymq"), *command, "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **environment},
        )
        assert done.returncode == 0, done.stderr
        assert "usage: proxymq" in done.stdout


@pytest.mark.parametrize(
    ("command", "read"),
    [
        (["topology", "declare"], {"service": "orders", "partitions": 3, "delivery_limit": 5}),
        (["topology", "show"], {"service": "orders", "partitions": 3}),
        (["dlq", "list"], {"service": "orders"}),
        (["status"], {"service": "orders"}),
        (["keda"], {"service": "orders", "partitions": 3}),
        (["inject"], {"service": "orders", "partitions": 3}),
    ],
)
def test_the_service_and_its_layout_come_from_the_environment_and_flags_win(
    command: list[str], read: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The contract's "every option is a flag and an environment variable", for what the
    sidecars' variables also say: a shell set up for a service's dequeuer needs no --service."""
    monkeypatch.setenv("PROXYMQ_SERVICE", "orders")
    monkeypatch.setenv("PROXYMQ_PARTITIONS", "3")
    monkeypatch.setenv("PROXYMQ_DELIVERY_LIMIT", "5")
    args = build_parser().parse_args(command)
    assert {name: getattr(args, name) for name in read} == read
    flags = ["--service", "billing", *(["--partitions", "4"] if "partitions" in read else [])]
    args = build_parser().parse_args([*command, *flags])
    assert args.service == "billing"
    assert "partitions" not in read or args.partitions == 4


@pytest.mark.parametrize(
    ("command", "variable", "value", "said"),
    [
        (["topology", "declare"], "PROXYMQ_PARTITIONS", "0", "must be between 1 and 1024, not 0"),
        (["topology", "declare"], "PROXYMQ_MAX_LENGTH", "lots", "'lots' is not a whole number"),
        (["keda"], "PROXYMQ_PARTITIONS", "many", "invalid int value 'many'"),
        (["dlq", "list"], "PROXYMQ_SERVICE", "a b", "'a b' is not a service name"),
    ],
)
def test_a_bad_variable_is_a_usage_error_that_names_it(
    command: list[str],
    variable: str,
    value: str,
    said: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PROXYMQ_SERVICE", "orders")
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(command)
    assert exited.value.code == 2
    flag = "--" + variable.removeprefix("PROXYMQ_").lower().replace("_", "-")
    assert f"argument {flag}: {variable}: {said}" in capsys.readouterr().err
    flags = [flag, "billing" if flag == "--service" else "4"]
    assert build_parser().parse_args([*command, *flags])  # a flag wins: the variable is not read


def test_a_service_from_neither_flag_nor_environment_is_asked_for(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PROXYMQ_SERVICE", raising=False)
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["topology", "show"])
    assert exited.value.code == 2
    assert "--service: required: give --service or set PROXYMQ_SERVICE" in capsys.readouterr().err


def test_demo_and_bench_keep_their_own_service_whatever_the_shell_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shell set up for a dequeuer names a real service: the demo, which deletes its
    service's queues at the end, and the bench's own service do not take it."""
    monkeypatch.setenv("PROXYMQ_SERVICE", "orders")
    monkeypatch.setenv("PROXYMQ_PARTITIONS", "0")
    assert build_parser().parse_args(["demo"]).service == "url-fetcher"
    assert build_parser().parse_args(["bench"]).partitions is None


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("notaurl", "'notaurl' is not an AMQP URL"),
        ("", "the AMQP URL is empty"),
        ("http://127.0.0.1/", "is not an AMQP URL"),
        ("amqp://127.0.0.1:99999/", "Port out of range"),
        ("amqp://u:secret@[::1", "'amqp://u:***@[::1' is not a URL"),
    ],
)
@pytest.mark.parametrize("command", [["topology", "show"], ["dlq", "list"], ["status"]])
def test_a_malformed_amqp_url_is_a_usage_error(
    url: str, said: str, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    for how in ("flag", "environment", "file"):
        with pytest.MonkeyPatch.context() as patch:
            argv = [*command, "--service", "s"]
            if how == "flag":
                argv += ["--amqp-url", url]
            elif how == "environment":
                patch.setenv("PROXYMQ_AMQP_URL", url)
            else:
                patch.delenv("PROXYMQ_AMQP_URL", raising=False)
                patch.setenv("PROXYMQ_AMQP_URL_FILE", "/nonexistent")
                said = "cannot read amqp_url from /nonexistent: No such file or directory"
            with pytest.raises(SystemExit) as exited:
                build_parser().parse_args(argv)
        assert exited.value.code == 2
        assert said in capsys.readouterr().err


@pytest.mark.parametrize("readable", [True, False])
def test_an_amqp_url_variable_and_file_both_set_are_refused(
    readable: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`proxymq` took the file and the sidecars the variable: the same environment reached two
    brokers. Both set is a usage error everywhere."""
    secret = tmp_path / "amqp"
    if readable:
        secret.write_text(AMQP_URL)
    monkeypatch.setenv("PROXYMQ_AMQP_URL", AMQP_URL)
    monkeypatch.setenv("PROXYMQ_AMQP_URL_FILE", str(secret))
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["status", "--service", "s"])
    assert exited.value.code == 2
    assert "PROXYMQ_AMQP_URL and PROXYMQ_AMQP_URL_FILE are both set: set one of them" in (
        capsys.readouterr().err
    )


async def test_a_refused_vhost_is_named(service: str) -> None:
    url = AMQP_URL.rstrip("/") + "/no-such-vhost"
    for command in (["topology", "show"], ["dlq", "list"], ["status"]):
        done = await proxymq(*command, "--service", service, "--amqp-url", url)
        assert done.code == 1, done.output
        assert "refused vhost 'no-such-vhost'" in done.stderr
        assert "Connection.OpenOk" not in done.stderr
        assert "no partition queues" not in done.stderr


async def test_a_cluster_node_list_is_tried_in_turn(service: str) -> None:
    declared = await proxymq("topology", "declare", "--service", service, "--partitions", "2")
    assert declared.code == 0, declared.output
    with closed_port() as port:
        nodes = {"PROXYMQ_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{port}/,{AMQP_URL}"}
        for command in (["topology", "show"], ["dlq", "list"], ["status", "--json"]):
            done = await proxymq(*command, "--service", service, env=nodes)
            assert done.code == 0, done.output
        down = await proxymq(
            "status", "--service", service, "--amqp-url", f"amqp://127.0.0.1:{port}/"
        )
    assert done.code == 0 and json.loads(done.stdout)["partitions"], done.output
    # An unusable URL is said to be one, also for a service the management API knows.
    assert down.code == 1
    assert "does not answer" in down.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["topology", "declare", "--service", "s", "--delivery-limit", "99999999999999999999999"],
        ["topology", "declare", "--service", "s", "--max-length", "0"],
        ["topology", "declare", "--service", "s", "--partitions", "1025"],
        ["topology", "show", "--service", "s", "--partitions", "2000"],
        ["dlq", "list", "--service", "s", "--limit", "x"],
        ["cluster", "start", "--nodes", "0"],
        ["cluster", "start", "--nodes", "-1"],
        ["cluster", "start", "--base-port", "70000"],
    ],
    ids=" ".join,
)
def test_numbers_out_of_range_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "must be between" in err or "is not a whole number" in err


@pytest.mark.parametrize("argv", [["--base-port", "5672"], ["--base-port", "5671", "--nodes", "2"]])
def test_cluster_start_refuses_the_shared_ports_before_anything(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["cluster", "start", *argv, "--dir", str(tmp_path / "c")])
    assert args.run(args) == 2
    assert "collide with the shared broker" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("where", ["/nonexistent/dir/x.md", "{tmp}", "/proc/version"])
def test_docs_config_to_an_unwritable_path_is_one_line(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["docs-config", "--output", where.format(tmp=tmp_path)])
    assert args.run(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("proxymq docs-config: cannot write ") and err.count("\n") == 1


async def test_a_refused_declare_leaves_no_half_layout(service: str) -> None:
    args = build_parser().parse_args(
        ["topology", "declare", "--service", service, "--partitions", "1", "--amqp-url", AMQP_URL]
    )
    args.delivery_limit = 2**64  # more than AMQP carries: refused at the first partition
    assert await asyncio.to_thread(args.run, args) == 1
    connection = await aio_pika.connect(AMQP_URL)
    try:
        assert not await topology.exchange_exists(connection, service)
        assert not await topology.queue_exists(connection, topology.dead_letter_queue(service))
    finally:
        await connection.close()


async def test_topology_counts_partitions_past_a_missing_p0(
    service: str, amqp: AbstractRobustConnection
) -> None:
    declared = await proxymq("topology", "declare", "--service", service, "--partitions", "4")
    assert declared.code == 0, declared.output
    channel = await amqp.channel()
    await channel.queue_delete(topology.partition_queue(service, 0))
    again = await proxymq("topology", "declare", "--service", service, "--partitions", "4")
    assert again.code == 1
    assert f"({service}.p0 is missing)" in again.stderr
    deleted = await proxymq("topology", "delete", "--service", service, "--yes")
    assert deleted.code == 0, deleted.output
    assert "5 queues" in deleted.stdout
    assert f"(3 partitions + dead letters + {service}.notify)" in deleted.stdout
    assert not await topology.queue_exists(amqp, topology.partition_queue(service, 3))


async def test_topology_declare_show_delete(service: str) -> None:
    declared = await proxymq("topology", "declare", "--service", service, "--partitions", "4")
    assert declared.code == 0, declared.output
    assert f"{service}.p0..{service}.p3" in declared.stdout
    again = await proxymq("topology", "declare", "--service", service, "--partitions", "4")
    assert again.code == 0, again.output

    shown = await proxymq("topology", "show", "--service", service)
    assert shown.code == 0, shown.output
    assert "declared, 4 partitions" in shown.stdout
    for name in [*topology.Topology(service, 4).queues, f"{service}.dlq"]:
        assert name in shown.stdout
    assert f"{service}.p4" not in shown.stdout
    assert topology.partition_pattern(service) in shown.stdout
    assert "in partition order" in shown.stdout
    for name in [f"{service}.dead", f"{service}.notify", f"{service}.members"]:
        assert name in shown.stdout  # every object of the service's, as architecture.md lists
    assert "(missing)" not in shown.stdout

    refused = await proxymq("topology", "delete", "--service", service)
    assert refused.code == 1
    assert "--yes" in refused.stderr
    assert await exists(service)

    deleted = await proxymq("topology", "delete", "--service", service, "--yes")
    assert deleted.code == 0, deleted.output
    assert not await exists(service)
    assert not await exists(service, topology.ring_marker(service), exchange=True)
    assert not await exists(service, topology.dead_letter_exchange(service), exchange=True)
    assert not await exists(service, topology.notify_queue(service))
    shown = await proxymq("topology", "show", "--service", service)
    assert "not declared" in shown.stdout


async def test_topology_show_of_an_undeclared_service_reads_at_80_columns(service: str) -> None:
    """Its heading was the table's centred title: wrapped, its end sat alone mid-line."""
    shown = await proxymq("topology", "show", "--service", service, env={"COLUMNS": "80"})
    assert shown.code == 0, shown.output
    heading = shown.stdout[: shown.stdout.index("┌")]
    assert heading.startswith(f"service {service}: not declared;"), heading
    assert all(not line.startswith(" ") for line in heading.splitlines()), heading
    assert "what --partitions 8 would declare" in " ".join(heading.split())


async def test_topology_delete_refuses_a_service_with_consumers(
    service: str, amqp: AbstractRobustConnection
) -> None:
    """--yes skips the question, not the check: deleting queues under live dequeuers cancels
    their consumers and drops what they hold. Only --force deletes them anyway."""
    declared = await proxymq("topology", "declare", "--service", service, "--partitions", "2")
    assert declared.code == 0, declared.output
    name = f"proxymq-dequeuer {service} pod-a"
    connection = await aio_pika.connect(AMQP_URL, client_properties={"connection_name": name})
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(topology.partition_queue(service, 1))
        await queue.consume(ack)
        deadline = time.monotonic() + MANAGEMENT_LAG
        while True:  # the consumer is named once the management API lists its connection
            refused = await proxymq("topology", "delete", "--service", service, "--yes")
            assert refused.code == 1, refused.output
            assert f"{service}.p1" in refused.stderr
            assert "--force" in refused.stderr
            assert await exists(service)
            if name in refused.stderr or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert name in refused.stderr
        forced = await proxymq("topology", "delete", "--service", service, "--yes", "--force")
        assert forced.code == 0, forced.output
        assert not await exists(service, topology.partition_queue(service, 1))
    finally:
        await connection.close()


async def test_topology_show_tells_a_ring_not_checked_since_a_restart(
    service: str, amqp: AbstractRobustConnection
) -> None:
    declared = await proxymq("topology", "declare", "--service", service, "--partitions", "2")
    assert declared.code == 0, declared.output
    channel = await amqp.channel()
    await channel.exchange_delete(topology.ring_marker(service))  # as a restart forgets it
    shown = await proxymq("topology", "show", "--service", service)
    assert "in RabbitMQ's own order, maybe" in " ".join(shown.stdout.split())


async def test_topology_show_gives_the_declared_queue_arguments(service: str) -> None:
    """`show` printed the defaults (x-delivery-limit=20, no x-max-length) for a service declared
    with other settings: the very mismatch an operator looks there for was hidden."""
    declared = await proxymq(
        "topology", "declare", "--service", service, "--partitions", "2",
        "--delivery-limit", "5", "--max-length", "10",
    )  # fmt: skip
    assert declared.code == 0, declared.output
    shown = await proxymq("topology", "show", "--service", service)
    assert shown.code == 0, shown.output
    text = " ".join(shown.stdout.split())
    assert "x-delivery-limit=5" in text and "x-max-length=10" in text
    assert "x-delivery-limit=20" not in text
    with closed_port() as port:
        blind = await proxymq(
            "topology", "show", "--service", service,
            env={"PROXYMQ_MANAGEMENT_URL": f"http://127.0.0.1:{port}"},
        )  # fmt: skip
    assert blind.code == 0, blind.output
    assert "ProxyMQ's defaults" in " ".join(blind.stdout.split())


async def test_topology_mismatch_exits_1_with_the_reason(service: str) -> None:
    first = await proxymq("topology", "declare", "--service", service, "--partitions", "4")
    assert first.code == 0, first.output
    second = await proxymq("topology", "declare", "--service", service, "--partitions", "8")
    assert second.code == 1
    assert "fewer than 8 partitions" in second.stderr
    assert "proxymq topology delete" in second.stderr
    limit = await proxymq(
        "topology", "declare", "--service", service, "--partitions", "4", "--delivery-limit", "3"
    )
    assert limit.code == 1
    assert "x-delivery-limit" in limit.stderr


async def test_topology_refuses_a_bad_name() -> None:
    done = await proxymq("topology", "declare", "--service", "a.p0")
    assert done.code == 2
    assert "not a service name" in done.stderr


async def test_status_shows_depth_per_partition(
    service: str, amqp: AbstractRobustConnection
) -> None:
    declared = await proxymq("topology", "declare", "--service", service, "--partitions", "4")
    assert declared.code == 0, declared.output
    channel = await amqp.channel()
    exchange = await channel.get_exchange(service)
    for key in ("alice", "bob"):
        await exchange.publish(aio_pika.Message(b"{}"), routing_key=key)

    status = await wait_for_status(service, lambda s: s["totals"]["ready"] == 2)
    assert status["source"] == "management"
    assert [p["name"] for p in status["partitions"]] == topology.Topology(service, 4).queues
    assert status["dead_letters"] == f"{service}.dlq"
    assert status["dead_letter_messages"] == 0
    assert status["pattern"] == topology.partition_pattern(service)

    table = await proxymq("status", "--service", service)
    assert table.code == 0, table.output
    for name in topology.Topology(service, 4).queues:
        assert name in table.stdout
    assert f"{service}.dlq = 0" in table.stdout

    with closed_port() as port:
        fallback = await proxymq(
            "status", "--service", service, "--json", "--management-url", f"http://127.0.0.1:{port}"
        )
    assert fallback.code == 0, fallback.output
    counted = json.loads(fallback.stdout)
    assert counted["source"] == "amqp"
    assert counted["totals"]["ready"] == 2  # AMQP counts are exact at once
    assert len(counted["partitions"]) == 4


async def test_a_management_url_with_credentials_is_used_and_never_shown(service: str) -> None:
    """Credentials written in the management URL, as KEDA's host has them, are the management
    user's: `status` fell back to AMQP ("Cannot combine AUTHORIZATION header with ...
    credentials encoded in URL") and printed the URL, password included."""
    declared = await proxymq("topology", "declare", "--service", service, "--partitions", "2")
    assert declared.code == 0, declared.output
    status = await proxymq(
        "status",
        "--service",
        service,
        "--json",
        "--management-url",
        "http://guest:guest@127.0.0.1:15672",
    )
    assert status.code == 0, status.output
    assert json.loads(status.stdout)["source"] == "management"
    with closed_port() as port:
        unavailable = await proxymq(
            "status",
            "--service",
            service,
            "--management-url",
            f"http://guest:s3cret-pw@127.0.0.1:{port}",
        )
    assert unavailable.code == 0, unavailable.output
    assert "management API unavailable" in unavailable.output
    assert "s3cret-pw" not in unavailable.output


async def test_status_names_the_active_consumer_and_its_standby(
    service: str, amqp: AbstractRobustConnection
) -> None:
    declared = await proxymq("topology", "declare", "--service", service, "--partitions", "2")
    assert declared.code == 0, declared.output
    connections = []
    try:
        for name in (f"{service} first", f"{service} second"):
            connection = await aio_pika.connect(
                AMQP_URL, client_properties={"connection_name": name}
            )
            connections.append(connection)
            channel = await connection.channel()
            queue = await channel.get_queue(topology.partition_queue(service, 0))
            await queue.consume(ack)

        def settled(status: dict[str, Any]) -> bool:
            p0 = status["partitions"][0]
            # The management API lists a new connection only after its next statistics
            # interval: until then its consumers' names show as "(gone)".
            names = [p0["active"], *p0["standbys"]]
            return (
                p0["consumers"] == 2
                and len(p0["standbys"]) == 1
                and None not in names
                and "(gone)" not in names
            )

        status = await wait_for_status(service, settled)
        p0, p1 = status["partitions"]
        assert p0["active"] == f"{service} first"
        assert p0["standbys"] == [f"{service} second"]
        assert p1["consumers"] == 0
        assert p1["active"] is None
    finally:
        for connection in connections:
            await connection.close()


@pytest.mark.parametrize("url", ["foo", "localhost:15672", "http://", "ftp://rabbit:15672"])
async def test_status_refuses_a_management_url_that_is_none(url: str) -> None:
    """A typo is a usage error at once, from the flag or the environment, not a management API
    reported "unavailable" after a fall-back to AMQP."""
    for given in (["--management-url", url], []):
        env = {} if given else {"PROXYMQ_MANAGEMENT_URL": url}
        run = await proxymq("status", "--service", "s", *given, env=env)
        assert run.code == 2, run.output
        assert "--management-url" in run.stderr
        assert f"{url!r}{'' if given else ' (PROXYMQ_MANAGEMENT_URL)'} is not an http" in run.stderr
        assert not run.stdout


@pytest.mark.parametrize(
    "command",
    [["topology", "show"], ["topology", "delete", "--yes"], ["make broker"]],
)
async def test_every_reader_of_the_management_url_variable_refuses_one_that_is_none(
    command: list[str], service: str
) -> None:
    """`topology show` took a typo for an API that did not answer (and showed the default
    queue arguments), `make broker` said the broker was ready: only `status` checked it."""
    url = "localhost:15672"
    env = {"PROXYMQ_MANAGEMENT_URL": url}
    if command == ["make broker"]:
        process = await asyncio.create_subprocess_exec(
            script("python"),
            "-m",
            "shared.cli.ensure_broker",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PROXYMQ_AMQP_URL": AMQP_URL, **env},
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
        run = Run(process.returncode or 0, stdout.decode(), stderr.decode())
    else:
        run = await proxymq(*command, "--service", service, env=env)
    assert run.code == 2, run.output
    assert f"{url!r} (PROXYMQ_MANAGEMENT_URL) is not an http:// or https:// URL" in run.stderr
    assert not run.stdout


async def test_status_of_an_unknown_service_exits_1() -> None:
    done = await proxymq("status", "--service", f"nothing-{uuid.uuid4().hex[:8]}")
    assert done.code == 1
    assert "has no partition queues" in done.stderr
    assert "proxymq topology declare" in done.stderr


async def test_status_without_a_broker_says_what_to_run() -> None:
    with closed_port() as port:
        done = await proxymq(
            "status",
            "--service",
            "anything",
            "--amqp-url",
            f"amqp://guest:guest@127.0.0.1:{port}/",
            "--management-url",
            f"http://127.0.0.1:{port}",
        )
    assert done.code == 1
    assert "does not answer" in done.stderr
    assert "make broker" in done.stderr


async def test_demo_runs_end_to_end_and_leaves_no_queues() -> None:
    service = f"demo-{uuid.uuid4().hex[:8]}"
    done = await proxymq("demo", "--service", service, timeout=150)
    assert done.code == 0, done.output
    assert "12/12 calls got the expected answer" in done.stdout
    for expected in ("unknown_service", "service_failed", "202 -> 200", "/fetch/batch"):
        assert expected in done.stdout
    assert not await exists(service)
    connection = await aio_pika.connect(AMQP_URL)
    try:
        for exchange in (service, f"{service}.members"):
            assert not await topology.exchange_exists(connection, exchange), exchange
    finally:
        await connection.close()


def in_group(group: int) -> list[str]:
    """The command lines of the processes still running in process group `group`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == group:
                found.append((entry / "cmdline").read_bytes().decode().replace("\0", " "))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.timeout(180)
def test_demo_stopped_by_ctrl_c_again_and_again_ends_as_interrupted() -> None:
    """Ctrl-C pressed on and on (to the whole group, as a terminal does) while the demo runs:
    everything is stopped, the queues deleted, and it ends with 130 and its own message (a
    Ctrl-C after its cleanup killed it: -2, the end of the cleanup's output lost)."""
    service = f"demo-{uuid.uuid4().hex[:8]}"
    demo = subprocess.Popen(
        [script("proxymq"), "demo", "--service", service],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PROXYMQ_AMQP_URL": AMQP_URL, "COLUMNS": "200"},
        preexec_fn=interruptible,
        start_new_session=True,
    )
    try:
        assert demo.stdout is not None
        while "enqueuer" not in demo.stdout.readline():
            assert demo.poll() is None, "the demo ended before its enqueuer started"
        deadline = time.monotonic() + 90
        while demo.poll() is None and time.monotonic() < deadline:
            os.killpg(demo.pid, signal.SIGINT)
            time.sleep(0.1)
        errors = demo.communicate(timeout=30)[1]
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        left = in_group(demo.pid)
        if left:
            os.killpg(demo.pid, signal.SIGKILL)
        kept = asyncio.run(exists(service))
        if kept:
            asyncio.run(delete_service(service))
    assert demo.returncode == 130, errors
    assert "proxymq demo: interrupted, stopping" in errors
    assert "Traceback" not in errors
    assert not left, left
    assert not kept, f"{service} was left on the broker"


async def delete_service(service: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        await topology.delete(connection, topology.Topology(service))
    finally:
        await connection.close()


async def test_demo_refuses_a_service_in_use(service: str, amqp: AbstractRobustConnection) -> None:
    declared = await proxymq("topology", "declare", "--service", service, "--partitions", "2")
    assert declared.code == 0, declared.output
    channel = await amqp.channel()
    queue = await channel.get_queue(topology.partition_queue(service, 0))
    await queue.consume(ack)
    done = await proxymq("demo", "--service", service)
    assert done.code == 1
    assert "in use" in done.stderr
    assert await exists(service), "the demo must not delete a service in use"


async def ack(message: AbstractIncomingMessage) -> None:
    await message.ack()


async def exists(service: str, name: str = "", *, exchange: bool = False) -> bool:
    """Whether `name` (by default the service's first partition) is on the broker."""
    connection = await aio_pika.connect(AMQP_URL)
    name = name or topology.partition_queue(service, 0)
    try:
        if exchange:
            return await topology.exchange_exists(connection, name)
        return await topology.queue_exists(connection, name)
    finally:
        await connection.close()


async def wait_for_status(service: str, done: Any) -> dict[str, Any]:
    """`status --json` until `done(status)`: the management API refreshes every 5 s."""
    deadline = time.monotonic() + MANAGEMENT_LAG
    while True:
        run = await proxymq("status", "--service", service, "--json")
        assert run.code == 0, run.output
        status: dict[str, Any] = json.loads(run.stdout)
        if done(status) or time.monotonic() > deadline:
            assert done(status), status
            return status
        await asyncio.sleep(0.5)


async def test_demo_without_a_broker_says_what_to_run() -> None:
    with closed_port() as port:
        done = await proxymq("demo", "--amqp-url", f"amqp://guest:guest@127.0.0.1:{port}/")
    assert done.code == 1
    assert "does not answer" in done.stderr
    assert "make broker" in done.stderr


def test_an_amqp_url_without_a_port_is_taken() -> None:
    """The port defaults to 5672 (5671 for amqps), in the CLI as in the sidecars."""
    for url in ("amqp://guest:guest@127.0.0.1/", "amqps://broker.example/vhost"):
        args = build_parser().parse_args(["topology", "show", "--service", "s", "--amqp-url", url])
        assert args.amqp_url == url


def interruptible() -> None:
    """A child that hears Ctrl-C, as one started from a terminal does. A suite run in the
    background (`make test &`) ignores SIGINT, its children inherit that, and a program started
    so keeps ignoring it, as it should: these tests then waited for nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted_at_the_question(*args: str) -> tuple[int, str]:
    """Run `proxymq` on a terminal (a pty), wait for its [y/N] question, press Ctrl-C (SIGINT),
    and give back its exit code and what it wrote. Not answering must not keep it running."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the console script, with the pty as its terminal
        os.environ.update({"PROXYMQ_AMQP_URL": AMQP_URL, "COLUMNS": "200"})
        interruptible()
        os.execv(script("proxymq"), ["proxymq", *args])
    said = b""
    try:
        deadline = time.monotonic() + 60
        while b"[y/N]" not in said:
            assert time.monotonic() < deadline, said.decode(errors="replace")
            said += os.read(fd, 65536)
        os.kill(pid, signal.SIGINT)
        while time.monotonic() < deadline:  # until the child closes the terminal (it exited)
            ready, _, _ = select.select([fd], [], [], 0.2)
            try:
                chunk = os.read(fd, 65536) if ready else b""
            except OSError:  # EIO: no process holds the terminal any more
                break
            if ready and not chunk:
                break
            said += chunk
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"still running after Ctrl-C: {said.decode(errors='replace')}")
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), said.decode(errors="replace")
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "command", [["topology", "delete"], ["dlq", "purge"], ["dlq", "replay"]], ids=" ".join
)
async def test_ctrl_c_at_the_question_changes_nothing(
    command: list[str], service: str, amqp: AbstractRobustConnection
) -> None:
    """A Ctrl-C at the confirmation went unnoticed until Enter (the answer was read by a worker
    thread that `asyncio.run` waited for), then the dlq commands said a pass had been aborted
    and `topology delete` printed a traceback."""
    declared = await proxymq("topology", "declare", "--service", service, "--partitions", "1")
    assert declared.code == 0, declared.output
    channel = await amqp.channel(publisher_confirms=True)
    await channel.default_exchange.publish(
        aio_pika.Message(b"x", correlation_id="r1"), routing_key=topology.dead_letter_queue(service)
    )
    code, said = await asyncio.to_thread(
        interrupted_at_the_question, *command, "--service", service
    )
    assert code in (1, 130), said
    assert "Traceback" not in said and "aborted" not in said
    assert "nothing deleted" in said or "nothing was changed" in said
    assert await topology.queue_exists(amqp, topology.partition_queue(service, 0))
    dead = await amqp.channel()
    queue = await dead.declare_queue(topology.dead_letter_queue(service), passive=True)
    assert queue.declaration_result.message_count == 1
    await dead.close()


async def test_status_without_management_finds_partitions_past_a_missing_p0(
    service: str, amqp: AbstractRobustConnection
) -> None:
    """Without the management API, `status` counted partitions from p0 on: with p0 deleted it
    said the service had no partition queues (exit 1), and a gap hid every partition after it."""
    declared = await proxymq("topology", "declare", "--service", service, "--partitions", "4")
    assert declared.code == 0, declared.output
    channel = await amqp.channel()
    for index in (0, 2):
        await channel.queue_delete(topology.partition_queue(service, index))
    with closed_port() as port:
        done = await proxymq(
            "status", "--service", service, "--json", "--management-url", f"http://127.0.0.1:{port}"
        )
    assert done.code == 0, done.output
    counted = json.loads(done.stdout)
    assert counted["source"] == "amqp"
    assert [p["name"] for p in counted["partitions"]] == [f"{service}.p1", f"{service}.p3"]


async def test_ctrl_c_while_waiting_is_one_line(service: str) -> None:
    """SIGINT while `status` waited for a management API that does not answer printed a
    KeyboardInterrupt traceback."""
    declared = await proxymq("topology", "declare", "--service", service, "--partitions", "1")
    assert declared.code == 0, declared.output
    asked = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.set()  # holds the connection open and never answers
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        script("proxymq"),
        *("status", "--service", service, "--management-url", f"http://127.0.0.1:{port}"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PROXYMQ_AMQP_URL": AMQP_URL},
        preexec_fn=interruptible,
    )
    try:
        await asyncio.wait_for(asked.wait(), 30)
        process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        server.close()
    assert process.returncode == 130
    assert stderr.decode() == "proxymq status: interrupted\n"


@pytest.mark.parametrize(
    "body",
    [
        "[1, 2, 3]",
        '"maintenance"',
        '{"items": [{"nam": "SERVICE.p0"}], "page_count": 1}',
        '{"items": [{"name": "SERVICE.p0"}], "page_count": "many"}',
        '{"items": [{"name": "SERVICE.p0"}], "page_count": 1, "messages_ready": "lots"}',
        '{"items": [{"name": "SERVICE.p0"}], "page_count": 1, "consumer_details": [1]}',
    ],
)
async def test_status_falls_back_to_amqp_when_management_answers_garbage(
    service: str, body: str
) -> None:
    """A management URL answering 200 with something that is not RabbitMQ's API (a proxy's
    page, another service) gave a traceback, a usage error (exit 2), or "service has no
    partition queues" (exit 1) for a declared service."""
    declared = await proxymq("topology", "declare", "--service", service, "--partitions", "2")
    assert declared.code == 0, declared.output

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=body.replace("SERVICE", service), content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    async with serving(app) as management:
        done = await proxymq(
            "status", "--service", service, "--json", "--management-url", management
        )
    assert done.code == 0, done.output
    counted = json.loads(done.stdout)
    assert counted["source"] == "amqp"
    assert [p["name"] for p in counted["partitions"]] == [f"{service}.p0", f"{service}.p1"]
    assert "management API unavailable" in counted["note"]
