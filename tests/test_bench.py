"""`proxymq bench` end to end: the real command against the real broker, as an operator runs it.

No timing assertions: the machine is shared and noisy. What must hold is that every mode ran,
answered every request, and that the figures and the plot were written.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from shared import topology
from shared.cli import ensure_broker
from shared.cli.main import build_parser
from shared.processes import http_ok, script
from shared.settings import TlsFiles
from tests.conftest import AMQP_URL, closed_port
from tests.test_cli import interruptible

pytestmark = pytest.mark.rabbit
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(90)
def test_bench_runs_the_three_modes(tmp_path: Path) -> None:
    figures, picture = tmp_path / "out.json", tmp_path / "out.png"
    args = ["bench", "--requests", "200", "--concurrency", "4", "--rounds", "1"]
    args += ["--warmup", "50", "--json", str(figures), "--plot", str(picture)]
    done = subprocess.run(
        [script("proxymq"), *args], capture_output=True, text=True, timeout=80, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr

    summary = json.loads(figures.read_text())["summary"]
    by_mode = {row["mode"]: row for row in summary}
    assert set(by_mode) == {"http", "rpc", "proxymq"}
    for row in by_mode.values():
        assert row["concurrency"] == 4
        assert row["rps"] > 0
        assert row["errors"] == 0
    assert picture.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.timeout(90)
def test_the_operators_sidecar_variables_do_not_reach_the_bench_sidecars(tmp_path: Path) -> None:
    """A shell set up for a sidecar (its URL as a file, a body cap, an allow-list, a token,
    an instance id) runs the bench as any other: those variables configure the operator's
    sidecars, not the bench's, which got both the URL and its file and refused to start."""
    secret, figures = tmp_path / "amqp", tmp_path / "out.json"
    secret.write_text(AMQP_URL)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PROXYMQ_")}
    environment |= {
        "PROXYMQ_AMQP_URL_FILE": str(secret),
        "PROXYMQ_MAX_BODY": "1",
        "PROXYMQ_SERVICES": "orders",
        "PROXYMQ_AUTH_TOKEN_FILE": str(tmp_path / "no-token"),
        "PROXYMQ_INSTANCE_ID": "enqueuer-1",
    }
    args = ["bench", "--requests", "50", "--concurrency", "4", "--rounds", "1", "--warmup", "10"]
    done = subprocess.run(
        [script("proxymq"), *args, "--json", str(figures)],
        capture_output=True,
        text=True,
        timeout=80,
        env=environment,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(figures.read_text())["summary"]
    assert {row["mode"]: row["errors"] for row in summary} == {"http": 0, "rpc": 0, "proxymq": 0}


def test_bench_help_names_every_option() -> None:
    done = subprocess.run(
        [script("proxymq"), "bench", "--help"], capture_output=True, text=True, check=True
    )
    for flag in ("--requests", "--concurrency", "--rounds", "--body-size", "--plot", "--json"):
        assert flag in done.stdout
    assert "--amqp-url" in done.stdout
    assert "--partitions" in done.stdout


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--concurrency", "1,,64"], "--concurrency: '1,,64' is not a comma list of integers"),
        (["--timeout", "0"], "--timeout: '0' is not a number of seconds > 0"),
        (["--timeout", "-1"], "--timeout: '-1' is not a number of seconds > 0"),
        (["--timeout", "nan"], "--timeout: 'nan' is not a number of seconds > 0"),
        (["--timeout", "soon"], "--timeout: 'soon' is not a number of seconds > 0"),
        (["--json", "/nonexistent/out.json"], "--json: no directory /nonexistent"),
        (["--plot", "/nonexistent/out.png"], "--plot: no directory /nonexistent"),
        (["--plot", "out.svg"], "--plot: 'out.svg' is not a .png file"),
        (["--json", "."], "--json: '.' is a directory"),
        (["--concurrency", "1,1000000"], "--concurrency: 1000000 is not between 1 and 256"),
        (["--concurrency", "0"], "--concurrency: 0 is not between 1 and 256"),
        (["--partitions", "100000"], "--partitions: 100000 is not between 1 and 1024"),
        (["--body-size", "1048577"], "--body-size: 1048577 is not between 0 and 1048576"),
        (["--body-size", "1000000000000"], "is not between 0 and 1048576"),
    ],
)
def test_bench_refuses_a_bad_value_before_starting(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused by the parser (exit 2), not after minutes of measuring with a traceback."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["bench", *argv])
    assert exited.value.code == 2
    assert said in capsys.readouterr().err


def children(pid: int) -> dict[int, str]:
    """The processes `pid` started, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == pid:
                found[int(entry.name)] = (
                    (entry / "cmdline").read_bytes().decode().replace("\0", " ")
                )
        except (OSError, ValueError, IndexError):
            continue
    return found


def alive(pid: int) -> bool:
    """Running: neither gone nor a zombie nobody reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


async def partitions_exist(service: str) -> bool:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        return await topology.queue_exists(connection, topology.partition_queue(service, 0))
    finally:
        await connection.close()


async def delete_topology(service: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        await topology.delete(connection, topology.Topology(service))
    finally:
        await connection.close()


def left_behind(started: dict[int, str], service: str) -> tuple[list[str], bool]:
    """What a stopped bench left: the processes it started that still run (killed now), and
    whether its service's queues are still on the broker (deleted now)."""
    left = [line for pid, line in started.items() if alive(pid)]
    for pid in started:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    kept = bool(service) and asyncio.run(partitions_exist(service))
    if kept:
        asyncio.run(delete_topology(service))
    return left, kept


def long_bench(**popen: Any) -> tuple[subprocess.Popen[str], str, str, dict[int, str]]:
    """A bench of a million requests, one at a time (it runs until stopped), once it has started
    its processes: the bench, its first line, its service and those processes (a dequeuer among
    them, so that what a test finds left of them is never nothing to look at)."""
    args = ["bench", "--requests", "1000000", "--concurrency", "1", "--rounds", "1"]
    bench = subprocess.Popen(
        [script("proxymq"), *args, "--warmup", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PROXYMQ_AMQP_URL": AMQP_URL, "COLUMNS": "200"},
        **popen,
    )
    try:
        assert bench.stdout is not None
        first = bench.stdout.readline()
        found = re.search(r"bench service (\S+);", first)
        assert found, first + bench.communicate(timeout=60)[0]
        started = children(bench.pid)
        assert any("proxymq-dequeuer" in line for line in started.values()), started
    except BaseException:
        bench.kill()
        bench.wait()
        raise
    return bench, first, found.group(1), started


@pytest.mark.timeout(180)
def test_bench_stops_when_one_of_its_processes_dies() -> None:
    """A dequeuer killed mid-run: the bench says which process exited and stops, with exit 1
    and nothing left behind, instead of timing out every request that is left."""
    bench, first, service, started = long_bench()
    output = first
    try:
        (dequeuer,) = (pid for pid, line in started.items() if "proxymq-dequeuer" in line)
        os.kill(dequeuer, signal.SIGKILL)
        output += bench.communicate(timeout=90)[0]
    finally:
        if bench.poll() is None:
            bench.send_signal(signal.SIGTERM)  # the bench's own cleanup
            bench.wait(60)
        left, kept = left_behind(started, service)
    assert bench.returncode == 1, output
    assert "proxymq-dequeuer exited with code -9" in output
    log = re.search(r"last lines of (\S+) ---", output)
    assert log, output
    assert Path(log.group(1)).exists(), "the log it names is kept"
    shutil.rmtree(Path(log.group(1)).parent)
    assert not left, left
    assert not kept, f"{service} was left on the broker"


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "scenario", [["failover", "--trials", "1000"], ["batching", "--requests", "3000"]]
)
def test_a_bench_scenario_stopped_by_sigterm_leaves_nothing_behind(scenario: list[str]) -> None:
    """SIGTERM (a `kill`, a CI job's timeout) while the dequeuers run: the bench stops them and
    deletes its service, as it does on Ctrl-C."""
    bench = subprocess.Popen(
        [script("proxymq"), "bench", "--scenario", *scenario],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PROXYMQ_AMQP_URL": AMQP_URL, "COLUMNS": "200"},
    )
    seen: dict[int, str] = {}
    service, output = "", ""
    try:
        deadline = time.monotonic() + 120
        while not service:
            assert bench.poll() is None, "the bench ended before its dequeuer started"
            assert time.monotonic() < deadline, "no dequeuer started within 120 s"
            seen.update(children(bench.pid))
            found = [re.search(r"--service (\S+)", line) for line in seen.values()]
            service = next((match.group(1) for match in found if match), "")
            time.sleep(0.1)
        seen.update(children(bench.pid))
        bench.send_signal(signal.SIGTERM)
        output = bench.communicate(timeout=90)[0]
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        left, kept = left_behind(seen, service)
    assert bench.returncode == 130, output
    assert "interrupted" in output
    assert not left
    assert not kept, f"{service} was left on the broker"


@pytest.mark.parametrize("scenario", ["anchors", "ordering", "batching"])
def test_bench_without_a_broker_says_what_to_run(scenario: str) -> None:
    with closed_port() as port:
        done = subprocess.run(
            [script("proxymq"), "bench", "--scenario", scenario],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PROXYMQ_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{port}/"},
        )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "does not answer" in output
    assert "make broker" in output
    assert "Traceback" not in output


def test_bench_on_a_broker_without_the_hash_exchange_says_what_to_enable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def unknown(url: str, tls: TlsFiles) -> bool:
        return False

    monkeypatch.setattr(ensure_broker, "has_consistent_hash", unknown)
    args = build_parser().parse_args(["bench", "--amqp-url", AMQP_URL])
    assert args.run(args) == 1
    err = capsys.readouterr().err
    assert "has no x-consistent-hash exchange type" in err
    assert "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange" in err


def test_bench_ordering_with_too_few_requests_is_refused_before_starting() -> None:
    """A quarter of them is the --ordering partition drain: with fewer than 8 it had no
    interval to time (an IndexError traceback after the key drain, at 3)."""
    done = subprocess.run(
        [script("proxymq"), "bench", "--scenario", "ordering", "--requests", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PROXYMQ_AMQP_URL": AMQP_URL},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--scenario ordering needs --requests 8 or more, not 3" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.timeout(180)
def test_a_bench_scenario_stops_when_its_dequeuer_dies() -> None:
    """A dequeuer killed while it drains: the scenario says so and stops, exit 1, nothing left
    behind (it waited out its 300 s drain timeout). The error goes to stderr, in whole lines
    (it went to stdout, wrapped at 80 columns when that was no terminal)."""
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    bench = subprocess.Popen(
        [script("proxymq"), "bench", "--scenario", "scaling", "--requests", "20000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "PROXYMQ_AMQP_URL": AMQP_URL},
    )
    seen: dict[int, str] = {}
    service = ""
    try:
        deadline = time.monotonic() + 120
        while True:
            assert bench.poll() is None, "the bench ended before its dequeuer started"
            assert time.monotonic() < deadline, "no dequeuer was ready within 120 s"
            seen.update(children(bench.pid))
            dequeuers = {pid: line for pid, line in seen.items() if "proxymq-dequeuer" in line}
            if dequeuers:
                (pid, line), *_ = dequeuers.items()
                admin = re.search(r"--admin-port (\d+)", line)
                assert admin, line
                if http_ok(f"http://127.0.0.1:{admin.group(1)}/readyz"):
                    service = re.search(r"--service (\S+)", line).group(1)  # type: ignore[union-attr]
                    time.sleep(2)  # the bench saw it ready too, and drains (for 20 s)
                    os.kill(pid, signal.SIGKILL)
                    break
            time.sleep(0.1)
        output, errors = bench.communicate(timeout=90)
    finally:
        if bench.poll() is None:
            bench.send_signal(signal.SIGTERM)
            bench.wait(60)
        left, kept = left_behind(seen, service)
    assert bench.returncode == 1, output + errors
    lines = errors.splitlines()
    said = (
        "proxymq bench: the benchmark stopped: proxymq-dequeuer exited with code -9 during the run"
    )
    assert said in lines, errors
    kept_logs = next(
        (line for line in lines if line.startswith("proxymq bench: process logs kept in ")), ""
    )
    assert kept_logs, errors
    shutil.rmtree(kept_logs.rsplit(" ", 1)[1])
    assert "Traceback" not in output + errors
    assert not left
    assert not kept, f"{service} was left on the broker"


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["--scenario", "ordering", "--rounds", "5"],
            "--rounds does not apply to --scenario ordering",
        ),
        (
            ["--scenario", "scaling", "--concurrency", "8", "--timeout", "5"],
            "--concurrency, --timeout do not apply to --scenario scaling",
        ),
        (
            ["--scenario", "failover", "--requests", "100"],
            "--requests does not apply to --scenario failover",
        ),
        (
            ["--scenario", "batching", "--warmup", "0"],
            "--warmup does not apply to --scenario batching",
        ),
        (["--trials", "3"], "--trials does not apply to --scenario anchors"),
    ],
)
def test_bench_refuses_a_flag_its_scenario_ignores(argv: list[str], said: str) -> None:
    """Before anything starts, even the broker check (taken and silently ignored, it left the
    user believing the run used it)."""
    with closed_port() as port:
        done = subprocess.run(
            [script("proxymq"), "bench", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PROXYMQ_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{port}/"},
        )
    assert done.returncode == 2, done.stdout + done.stderr
    assert said in done.stderr
    assert "--scenario" in done.stderr and "--json" in done.stderr  # what it does take


def test_bench_help_says_which_flags_each_scenario_takes() -> None:
    done = subprocess.run(
        [script("proxymq"), "bench", "--help"], capture_output=True, text=True, check=True
    )
    assert re.search(r"ordering +--requests --json", done.stdout), done.stdout
    assert re.search(r"failover +--trials --json", done.stdout), done.stdout


@pytest.mark.timeout(180)
def test_ctrl_c_again_during_the_cleanup_does_not_cut_it_short() -> None:
    """An impatient user presses Ctrl-C again while the bench stops its processes: they are
    stopped all the same and the service deleted (the second one broke off the cleanup)."""
    bench, first, service, started = long_bench(preexec_fn=interruptible)
    output = first
    try:
        deadline = time.monotonic() + 90
        while bench.poll() is None and time.monotonic() < deadline:
            bench.send_signal(signal.SIGINT)
            time.sleep(0.05)
        output += bench.communicate(timeout=30)[0]
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        left, kept = left_behind(started, service)
    assert bench.returncode == 130, output
    assert not left, left
    assert not kept, f"{service} was left on the broker"
    assert "Traceback" not in output
