"""Sidecar configuration: flags over `PROXYMQ_*` variables over `*_FILE` over defaults."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import get_args

import pytest

from dequeuer.readiness import Readiness
from dequeuer.settings import DequeuerSettings
from enqueuer.settings import EnqueuerSettings
from shared.broker import for_sidecar
from shared.cli.main import build_parser
from shared.connect_failures import redact
from shared.settings import DEFAULT_AMQP_URL, CommandSettings, _metavar, load
from tests.reliability.conftest import Certs, make_certs
from url_fetcher.settings import UrlFetcherSettings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's own PROXYMQ_* variables must not leak into what is being tested."""
    for name in list(os.environ):
        if name.startswith("PROXYMQ_"):
            monkeypatch.delenv(name)


def exit_code(cls: type[CommandSettings], argv: list[str]) -> int:
    with pytest.raises(SystemExit) as caught:
        load(cls, argv)
    assert isinstance(caught.value.code, int)
    return caught.value.code


def test_defaults() -> None:
    settings = load(EnqueuerSettings, [])
    assert settings.amqp_url == DEFAULT_AMQP_URL
    assert (settings.host, settings.port, settings.admin_port) == ("127.0.0.1", 8080, 9080)
    assert settings.partition_key == ["header:X-Partition-Key"]
    assert settings.timeout == 30.0
    assert settings.max_body == 1024 * 1024
    assert settings.services == []


def test_the_contracts_defaults_of_the_dequeuer_and_the_url_fetcher() -> None:
    """The bracketed values of the contract's command lines, and its default ports."""
    settings = load(DequeuerSettings, ["--service", "orders"])
    assert settings.amqp_url == DEFAULT_AMQP_URL
    assert settings.admin_port == 9081
    assert (settings.partitions, settings.concurrency, settings.ordering) == (8, 64, "key")
    assert (settings.batch_size, settings.batch_wait_ms, settings.batch_path) == (1, 20, "/batch")
    fetcher = load(UrlFetcherSettings, [])
    assert (fetcher.host, fetcher.port, fetcher.allow_private) == ("127.0.0.1", 8000, False)


def test_environment_wins_over_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXYMQ_PORT", "8181")
    monkeypatch.setenv("PROXYMQ_AMQP_URL", "amqp://env-host/")
    settings = load(EnqueuerSettings, [])
    assert settings.port == 8181
    assert settings.amqp_url == "amqp://env-host/"


def test_flags_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXYMQ_PORT", "8181")
    monkeypatch.setenv("PROXYMQ_AMQP_URL", "amqp://env-host/")
    settings = load(EnqueuerSettings, ["--port", "8282", "--amqp-url", "amqp://flag-host/"])
    assert settings.port == 8282
    assert settings.amqp_url == "amqp://flag-host/"


def test_amqp_url_file_is_read_and_stripped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "amqp"
    secret.write_text("amqp://user:s3cret@broker:5672/\n")
    monkeypatch.setenv("PROXYMQ_AMQP_URL_FILE", str(secret))
    assert load(EnqueuerSettings, []).amqp_url == "amqp://user:s3cret@broker:5672/"


@pytest.mark.parametrize("readable", [True, False])
def test_a_flag_wins_over_the_file_which_is_then_not_read(
    readable: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An unreadable file behind a flag stopped the sidecar, though the flag would have won."""
    secret = tmp_path / "amqp"
    if readable:
        secret.write_text("amqp://from-file/\n")
    monkeypatch.setenv("PROXYMQ_AMQP_URL_FILE", str(secret))
    assert load(EnqueuerSettings, ["--amqp-url", "amqp://flag/"]).amqp_url == "amqp://flag/"


@pytest.mark.parametrize("readable", [True, False])
@pytest.mark.parametrize("flag", [[], ["--amqp-url", "amqp://flag/"]])
def test_a_variable_and_its_file_both_set_are_refused(
    readable: bool,
    flag: list[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The sidecars took the variable and the `proxymq` commands the file; and the sidecars
    read the file all the same, so an unreadable one stopped them. Neither is picked now."""
    secret = tmp_path / "amqp"
    if readable:
        secret.write_text("amqp://from-file/\n")
    monkeypatch.setenv("PROXYMQ_AMQP_URL_FILE", str(secret))
    monkeypatch.setenv("PROXYMQ_AMQP_URL", "amqp://env/")
    assert exit_code(EnqueuerSettings, flag) == 2
    assert capsys.readouterr().err == (
        "proxymq-enqueuer: invalid configuration: PROXYMQ_AMQP_URL and PROXYMQ_AMQP_URL_FILE "
        "are both set: set one of them\n"
    )


def test_unreadable_file_exits_2_with_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-secret"
    monkeypatch.setenv("PROXYMQ_AMQP_URL_FILE", str(missing))
    assert exit_code(EnqueuerSettings, []) == 2
    err = capsys.readouterr().err
    assert "proxymq-enqueuer" in err
    assert str(missing) in err
    assert "amqp_url" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1MiB", 1024 * 1024),
        ("512KiB", 512 * 1024),
        ("2MB", 2_000_000),
        ("1048576", 1_048_576),
        ("64k", 64_000),
        ("1 GiB", 1024**3),
    ],
)
def test_sizes(text: str, expected: int) -> None:
    assert load(EnqueuerSettings, ["--max-body", text]).max_body == expected


def test_size_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXYMQ_MAX_BODY", "512KiB")
    assert load(EnqueuerSettings, []).max_body == 512 * 1024


@pytest.mark.parametrize("text", ["lots", "1XB", "-1", "0", "1.5.2MiB", "", "9" * 400])
def test_bad_size_exits_2_naming_the_flag(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(EnqueuerSettings, ["--max-body", text]) == 2
    assert "--max-body" in capsys.readouterr().err


def test_comma_list_from_flag() -> None:
    settings = load(EnqueuerSettings, ["--services", "a, b,c"])
    assert settings.services == ["a", "b", "c"]


def test_repeated_flag_accumulates_in_order() -> None:
    settings = load(
        EnqueuerSettings,
        ["--partition-key", "json:/user/id", "--partition-key", "header:X-Key,query:k"],
    )
    assert settings.partition_key == ["json:/user/id", "header:X-Key", "query:k"]


def test_comma_list_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXYMQ_SERVICES", "orders, billing")
    assert load(EnqueuerSettings, []).services == ["orders", "billing"]


def test_help_exits_0_and_mentions_environment(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(EnqueuerSettings, ["--help"]) == 0
    out = capsys.readouterr().out
    assert "--amqp-url" in out
    assert "PROXYMQ_" in out


def test_help_exits_0_and_lists_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(DequeuerSettings, ["--help"]) == 0
    out = capsys.readouterr().out
    assert "proxymq-dequeuer" in out
    assert "--service" in out
    assert "--retry-on" in out


def test_dequeuer_settings() -> None:
    settings = load(
        DequeuerSettings,
        ["--service", "orders", "--partitions", "4", "--ordering", "partition"],
    )
    assert (settings.service, settings.partitions, settings.ordering) == ("orders", 4, "partition")
    assert settings.retry_on == ["connect", "timeout", "502", "503", "504"]


def test_dequeuer_service_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXYMQ_SERVICE", "billing")
    monkeypatch.setenv("PROXYMQ_RETRY_ON", "connect,500")
    settings = load(DequeuerSettings, [])
    assert settings.service == "billing"
    assert settings.retry_on == ["connect", "500"]


@pytest.mark.parametrize("service", ["a.b", "orders.p0", "", "-x", "a b"])
def test_dequeuer_bad_service_exits_2(service: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(DequeuerSettings, ["--service", service]) == 2
    assert "--service" in capsys.readouterr().err


def test_dequeuer_requires_service(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(DequeuerSettings, []) == 2
    assert "--service" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["404", "200", "retry", "600"])
def test_dequeuer_retry_on_refuses_non_5xx(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(DequeuerSettings, ["--service", "s", "--retry-on", value]) == 2
    assert "--retry-on" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "0"],
        ["--port", "70000"],
        ["--timeout", "0"],
        ["--port", "http"],
        ["--shutdown-grace", "-1"],
    ],
)
def test_out_of_range_numbers_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(EnqueuerSettings, argv) == 2
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--timeout", "inf"], "--timeout: Input should be a finite number"),
        (["--timeout", "1e300"], "--timeout: Input should be less than or equal to 2592000"),
        (["--breaker-reset", "inf"], "--breaker-reset: Input should be a finite number"),
        (["--instance-id", "x" * 234], "--instance-id: at most 233 bytes"),
        (["--instance-id", "api~1"], "--instance-id: 'api~1' cannot name a queue"),
        (["--instance-id", "api-ü"], "--instance-id: 'api-ü' cannot name a queue"),
        (["--instance-id", "api\t1"], "--instance-id: 'api\\t1' cannot name a queue"),
    ],
)
def test_values_that_fail_the_enqueuer_later_are_refused_at_start(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--timeout inf` or `1e300` was taken, and every call without X-Request-Timeout got
    aiohttp's plain 500 (its deadline did not fit the message's header); an infinite
    `--breaker-reset` made the 503 of an open breaker a 500 (its Retry-After); an
    `--instance-id` too long for a queue name, or with a character the AMQP client refuses in
    one (`Invalid value for queue`), stopped the enqueuer with a traceback."""
    assert exit_code(EnqueuerSettings, argv) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--target", "127.0.0.1:9"], "--target: '127.0.0.1:9' is not a URL like"),
        (["--target", "ftp://127.0.0.1:9"], "is not a URL like http://HOST or https://HOST"),
        (["--target", "http://"], "--target"),
        (["--ready-path", "ready"], "--ready-path: 'ready' must start with '/'"),
        (["--amqp-url", "foo://x"], "'foo://x' is not an AMQP URL"),
        (["--amqp-url", "amqp://u:secret@a/,nodes"], "'nodes' is not an AMQP URL"),
        (
            ["--heartbeat-interval", "3", "--member-expiry", "1"],
            "less than two --heartbeat-interval (3 s); set it to at least 6",
        ),
        (
            ["--delivery-limit", str(2**63)],
            "--delivery-limit: Input should be less than or equal to 9223372036854775807",
        ),
        (
            ["--max-length", str(2**63)],
            "--max-length: Input should be less than or equal to 9223372036854775807",
        ),
    ],
)
def test_values_that_could_never_work_are_refused_at_start(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each was accepted and then failed silently for ever: a target or ready path that was
    never ready, a broker URL retried every second, dequeuers that took each other for gone
    between heartbeats and handed partitions back and forth; a queue argument over 2^63-1,
    which AMQP cannot carry, failed the declaration with exit 1 once S.dlq was declared."""
    assert exit_code(DequeuerSettings, ["--service", "s", *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and "secret" not in err
    assert load(EnqueuerSettings, ["--amqp-url", "amqps://a:1/,amqps://b/"]).amqp_url


@pytest.mark.parametrize(
    ("instance_id", "says"),
    [
        ("api~1", "--instance-id: 'api~1' cannot name a queue: use letters, digits and"),
        ("api-ü", "--instance-id: 'api-ü' cannot name a queue"),
        ("x" * 254, "--instance-id: at most 253 bytes"),
    ],
)
def test_dequeuer_ids_it_would_have_to_alter_are_refused(
    instance_id: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dequeuer replaced such characters with '-' and cut ids to 100 characters, so that
    `a/b` and `a~b`, or two long pod names alike in their first 100, were one id: the second
    dequeuer stopped with "give each dequeuer its own --instance-id" though the ids differed."""
    assert exit_code(DequeuerSettings, ["--service", "s", "--instance-id", instance_id]) == 2
    assert says in capsys.readouterr().err


def test_any_pod_name_is_a_dequeuer_id() -> None:
    """The Kubernetes manifests pass the pod's name: at most 253 of a-z, 0-9, '-' and '.'."""
    pod = ("a" * 62 + ".") * 4 + "b"
    settings = load(DequeuerSettings, ["--service", "s" * 100, "--instance-id", pod])
    assert settings.instance_id == pod


@pytest.mark.parametrize("password", ["s3c/ret", "s3c/r@et9", "s3c/ret:x7y"])
@pytest.mark.parametrize(
    ("flag", "url"),
    [("--amqp-url", "amqp://proxymq:{}@rabbitmq:5672/"), ("--target", "http://probe:{}@svc:80")],
)
def test_a_password_not_percent_encoded_is_hidden_in_the_refusal(
    flag: str, url: str, password: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `/` written raw in a URL's password (the Secret's comment warns against it) ends the
    authority early, and the URL does not parse: the refusal, written to the pod's log, showed
    the password whole, `'amqp://proxymq:s3c/ret@rabbitmq:5672/' is not a URL`."""
    assert exit_code(DequeuerSettings, ["--service", "s", flag, url.format(password)]) == 2
    err = capsys.readouterr().err
    assert "is not a" in err
    assert not any(part in err for part in re.split("[/@:]", password) if len(part) > 2), err


@pytest.mark.parametrize("password", ["s3@cret", "s3cr@t@x7y"])
def test_a_target_password_holding_an_at_sign_is_not_logged(password: str) -> None:
    """yarl, and so the dequeuer's calls, read a target's password up to the authority's last
    `@`; the readiness lines hid it up to its first, and wrote the rest out (`microservice ready
    at http://probe:***@cret@svc:80/`)."""
    url = f"http://probe:{password}@svc:80"
    assert load(DequeuerSettings, ["--service", "s", "--target", url]).target == url
    shown = Readiness(url, None, timeout=1, interval=1).shown
    assert shown.startswith("http://probe:***@svc") and "cr" not in shown, shown
    broker = redact(f"amqp://proxymq:{password}@rabbitmq:5672/")
    assert broker == "amqp://proxymq:***@rabbitmq:5672/"


@pytest.mark.parametrize(
    "url",
    [
        "AMQPS://broker.example/",
        "amqps://a.example/,AMQPS://b.example/",
        " amqps://broker.example/",
    ],
)
def test_the_tls_options_go_to_every_amqps_url(url: str, tmp_path: Path) -> None:
    """Only a URL spelt `amqps://` at its very start got --amqp-ca-file: these connected with
    the system's CAs, and a broker with a certificate of a private CA was never trusted."""
    ca = make_certs(tmp_path).ca
    settings = load(EnqueuerSettings, ["--amqp-url", url, "--amqp-ca-file", str(ca)])
    context = for_sidecar(settings, "test").ssl_context
    assert context is not None and context.get_ca_certs()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA and a client certificate it signed, with files around them that cannot be used:
    one holding no PEM at all, the key of another certificate, an encrypted key."""
    directory = tmp_path_factory.mktemp("certs")
    made = make_certs(directory)
    (directory / "text").write_text("not a certificate\n")
    encrypt = ["openssl", "pkey", "-in", str(made.client_key), "-aes256", "-passout", "pass:s"]
    subprocess.run([*encrypt, "-out", str(directory / "encrypted.key")], check=True, timeout=30)
    return made


TLS_FILES = "amqps://127.0.0.1:1/"
UNUSABLE = {  # flags given beside an amqps:// URL: what the refusal says of them
    "missing CA file": (
        ["--amqp-ca-file", "/nonexistent/ca.pem"],
        "--amqp-ca-file /nonexistent/ca.pem: No such file or directory",
    ),
    "CA file is a directory": (["--amqp-ca-file", "{dir}"], "--amqp-ca-file {dir}: Is a directory"),
    "CA file not PEM": (
        ["--amqp-ca-file", "{dir}/text"],
        "--amqp-ca-file {dir}/text: holds no PEM certificate",
    ),
    "missing certificate": (
        ["--amqp-cert-file", "/nonexistent/client.pem", "--amqp-key-file", "{dir}/client.key"],
        "--amqp-cert-file /nonexistent/client.pem: No such file or directory",
    ),
    "certificate not PEM": (
        ["--amqp-cert-file", "{dir}/text", "--amqp-key-file", "{dir}/client.key"],
        "--amqp-cert-file {dir}/text: holds no PEM certificate",
    ),
    "missing key": (
        ["--amqp-cert-file", "{dir}/client.pem", "--amqp-key-file", "/nonexistent/client.key"],
        "--amqp-key-file /nonexistent/client.key: No such file or directory",
    ),
    "key not PEM": (
        ["--amqp-cert-file", "{dir}/client.pem", "--amqp-key-file", "{dir}/text"],
        "--amqp-key-file {dir}/text: holds no PEM private key",
    ),
    "certificate without its key": (
        ["--amqp-cert-file", "{dir}/client.pem"],
        "--amqp-cert-file {dir}/client.pem holds no private key: give it with --amqp-key-file",
    ),
    "key of another certificate": (
        ["--amqp-cert-file", "{dir}/client.pem", "--amqp-key-file", "{dir}/rogue.key"],
        "--amqp-key-file {dir}/rogue.key is not the key of --amqp-cert-file {dir}/client.pem",
    ),
    "encrypted key": (
        ["--amqp-cert-file", "{dir}/client.pem", "--amqp-key-file", "{dir}/encrypted.key"],
        "--amqp-key-file {dir}/encrypted.key: the private key is encrypted",
    ),
}


def unusable(case: str, certs: Certs) -> tuple[list[str], str]:
    """The flags of an UNUSABLE case, with its files in `certs`' directory, and what is said."""
    flags, says = UNUSABLE[case]
    directory = str(certs.ca.parent)
    return [flag.format(dir=directory) for flag in flags], says.format(dir=directory)


@pytest.mark.parametrize("case", UNUSABLE)
@pytest.mark.parametrize("cls", [EnqueuerSettings, DequeuerSettings])
def test_unusable_tls_files_are_a_configuration_error(
    case: str,
    cls: type[EnqueuerSettings] | type[DequeuerSettings],
    certs: Certs,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A TLS file that cannot be used stopped the sidecar with a traceback (ValueError,
    ssl.SSLError: `PEM lib`) once it was starting, exit 1, not as a configuration error (exit 2)
    naming the flag, the file and what is wrong with it. An encrypted key asked for its
    passphrase on the terminal."""
    monkeypatch.setenv("PROXYMQ_SERVICE", "s")
    flags, says = unusable(case, certs)
    assert exit_code(cls, ["--amqp-url", TLS_FILES, *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"{cls.prog}: invalid configuration: {err.split(': ', 2)[2]}", err
    assert says in err, err


@pytest.mark.parametrize("url", [TLS_FILES, DEFAULT_AMQP_URL])
@pytest.mark.parametrize("cls", [EnqueuerSettings, DequeuerSettings])
def test_a_key_file_without_a_certificate_file_is_refused(
    url: str,
    cls: type[EnqueuerSettings] | type[DequeuerSettings],
    certs: Certs,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The key was ignored without a word, and the broker saw no client certificate."""
    monkeypatch.setenv("PROXYMQ_SERVICE", "s")
    monkeypatch.setenv("PROXYMQ_AMQP_KEY_FILE", str(certs.client_key))
    assert exit_code(cls, ["--amqp-url", url]) == 2
    says = f"--amqp-key-file {certs.client_key} needs --amqp-cert-file, the certificate it is"
    assert says in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--amqp-ca-file", "{ca}"], "--amqp-ca-file is"),
        (["--amqp-cert-file", "{cert}", "--amqp-key-file", "{key}"], "--amqp-key-file are"),
    ],
)
@pytest.mark.parametrize("cls", [EnqueuerSettings, DequeuerSettings])
def test_tls_files_without_an_amqps_url_are_refused(
    flags: list[str],
    named: str,
    cls: type[EnqueuerSettings] | type[DequeuerSettings],
    certs: Certs,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """They were ignored without a word: the connection went unencrypted, the password in
    clear, to a broker the operator meant to verify (and be verified by)."""
    monkeypatch.setenv("PROXYMQ_SERVICE", "s")
    files = {"ca": certs.ca, "cert": certs.client_cert, "key": certs.client_key}
    argv = [flag.format(**files) for flag in flags]
    assert exit_code(cls, ["--amqp-url", "amqp://a.example/,AMQP://b.example/", *argv]) == 2
    says = f"{named} for amqps:// and --amqp-url names no amqps:// broker"
    assert says in capsys.readouterr().err


def test_a_certificate_file_holding_its_key_needs_no_key_file(certs: Certs, tmp_path: Path) -> None:
    both = tmp_path / "client-and-key.pem"
    both.write_text(certs.client_cert.read_text() + certs.client_key.read_text())
    flags = ["--amqp-ca-file", str(certs.ca), "--amqp-cert-file", str(both)]
    settings = load(EnqueuerSettings, ["--amqp-url", TLS_FILES, *flags])
    assert for_sidecar(settings, "test").ssl_context is not None


def test_amqp_urls_without_a_port_are_taken() -> None:
    for url in ("amqp://guest:guest@127.0.0.1/,amqp://other.example/vhost", "amqps://a.example/"):
        assert load(EnqueuerSettings, ["--amqp-url", url]).amqp_url == url


def test_help_names_what_size_and_list_flags_take(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(EnqueuerSettings, ["--help"]) == 0
    out = capsys.readouterr().out
    assert "--max-body SIZE" in out and "--services SERVICE[,SERVICE...]" in out
    assert "--partition-key SOURCE[,SOURCE...]" in out and "A,B" not in out
    assert "--max-body int" not in out and "list[str]" not in out


@pytest.mark.parametrize(
    ("cls", "shown"),
    [
        (
            EnqueuerSettings,
            [
                "--amqp-url URL",
                "--amqp-ca-file FILE",
                "--amqp-heartbeat SECONDS",
                "--host HOST",
                "--port PORT",
                "--auth-token-file FILE",
                "--max-headers N",
                "--timeout SECONDS",
                "--instance-id NAME",
            ],
        ),
        (
            DequeuerSettings,
            [
                "--service NAME",
                "--target URL",
                "--admin-port PORT",
                "--batch-wait-ms MS",
                "--batch-path PATH",
                "--call-timeout SECONDS",
                "--max-length N",
                "--ready-path PATH",
            ],
        ),
        (UrlFetcherSettings, ["--host HOST", "--port PORT", "--fetch-timeout SECONDS"]),
    ],
)
def test_help_names_what_every_flag_takes(
    cls: type[CommandSettings], shown: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`--timeout float`, `--target str`: the type a value parses to says nothing of what to
    give (seconds? a URL? a name?)."""
    with pytest.raises(SystemExit):
        load(cls, ["--help"])
    out = capsys.readouterr().out
    assert {"int", "float", "str"}.isdisjoint(re.findall(r"--[\w-]+ (\w+)", out)), out
    for flag in shown:
        assert flag in out


DURATIONS = [
    (cls, "--" + name.replace("_", "-"))
    for cls in (EnqueuerSettings, DequeuerSettings, UrlFetcherSettings)
    for name, field in cls.model_fields.items()
    if field.annotation is float or name.endswith("_ms")
]


@pytest.mark.parametrize(("cls", "flag"), DURATIONS)
def test_durations_are_at_most_30_days(
    cls: type[CommandSettings],
    flag: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--call-timeout 1e300` was taken, and every call told the microservice an
    `X-Request-Timeout` of 300 digits; `--batch-wait-ms` of 400 digits stopped the dequeuer
    with an OverflowError's traceback; the other durations had no bound either."""
    monkeypatch.setenv("PROXYMQ_SERVICE", "s")
    in_ms = flag.endswith("-ms")
    huge = str(10**400) if in_ms else "1e300"
    assert exit_code(cls, [flag, huge, "--batch-size", "2"] if in_ms else [flag, huge]) == 2
    bound = "2592000000" if in_ms else "2592000"
    assert f"{flag}: Input should be less than or equal to {bound}" in capsys.readouterr().err


def test_every_class_has_durations() -> None:
    assert {cls for cls, _ in DURATIONS} == {
        EnqueuerSettings,
        DequeuerSettings,
        UrlFetcherSettings,
    }


@pytest.mark.parametrize("cls", [EnqueuerSettings, DequeuerSettings])
@pytest.mark.parametrize("level", ["verbose", "", "trace", "1"])
def test_unknown_log_level_exits_2(
    cls: type[EnqueuerSettings] | type[DequeuerSettings],
    level: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--log-level verbose` was taken, and the sidecar stopped with logging's traceback
    (`ValueError: Unknown level: 'VERBOSE'`) as it set its logs up."""
    monkeypatch.setenv("PROXYMQ_SERVICE", "s")
    assert exit_code(cls, ["--log-level", level]) == 2
    assert "--log-level: Input should be 'debug', 'info', 'warning' or 'error'" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(("level", "read"), [("DEBUG", "debug"), (" Warning ", "warning")])
def test_log_level_is_read_in_any_case(level: str, read: str) -> None:
    assert load(EnqueuerSettings, ["--log-level", level]).log_level == read


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--partition-key", "cookie:x"], "--partition-key: partition key source"),
        (["--partition-key", "json:user"], "must start with '/'"),
        (["--auth-token-file", "/no/such/token"], "--auth-token-file: cannot read"),
        (["--auth-token-file", "/dev/null"], "the auth token file /dev/null is empty"),
    ],
)
def test_enqueuer_key_sources_and_token_file_are_checked_with_the_rest(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """They were checked apart, after the settings, and a mistake exited 1 where every other
    configuration mistake exits 2."""
    assert exit_code(EnqueuerSettings, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("proxymq-enqueuer: invalid configuration: ") and says in err


@pytest.mark.parametrize("token", ["s3c\nret", "s3c\x00ret", "s3c\tret"])
def test_a_token_no_header_can_carry_is_refused(
    token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line break or another control character inside the token: no caller could ever send
    it, and the enqueuer started to answer every call 401."""
    path = tmp_path / "token"
    path.write_text(token + "\n")
    assert exit_code(EnqueuerSettings, ["--auth-token-file", str(path)]) == 2
    assert "holds a line break or another control character" in capsys.readouterr().err


def test_a_readable_token_file_is_taken(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    assert load(EnqueuerSettings, ["--auth-token-file", str(token)]).auth_token_file == str(token)


COUNTS = [
    (cls, "--" + name.replace("_", "-"))
    for cls in (EnqueuerSettings, DequeuerSettings, UrlFetcherSettings)
    for name, field in cls.model_fields.items()
    if int in (field.annotation, *get_args(field.annotation)) and _metavar(field) is None
]


@pytest.mark.parametrize(("cls", "flag"), COUNTS)
def test_counts_have_an_upper_bound(
    cls: type[CommandSettings],
    flag: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--max-in-flight 1e12` (or `--max-results`, `--max-headers`, ...) was taken: a cap that
    high is none, and requests, results or a caller's header lines piled up until memory ran
    out instead of being refused."""
    monkeypatch.setenv("PROXYMQ_SERVICE", "s")
    assert exit_code(cls, [flag, str(10**30)]) == 2
    assert f"{flag}: Input should be less than or equal to" in capsys.readouterr().err


def test_every_class_has_counts() -> None:
    assert {cls for cls, _ in COUNTS} == {EnqueuerSettings, DequeuerSettings, UrlFetcherSettings}


@pytest.mark.parametrize(
    ("args", "share"),
    [
        ([], 5000),
        (["--max-in-flight", "1"], 1),
        (["--services", "a,b", "--max-in-flight", "9"], 4),
        (["--services", "a", "--max-in-flight", "9"], 9),
        (["--max-in-flight-per-service", "300"], 300),
        (["--max-in-flight", "9", "--max-in-flight-per-service", "300"], 9),
    ],
)
def test_one_service_holds_a_share_of_the_in_flight_slots(args: list[str], share: int) -> None:
    """By default a service may hold half of the slots, so that one that does not answer
    leaves the rest to the others; an enqueuer for one service alone gives it all."""
    assert load(EnqueuerSettings, args).in_flight_share() == share


def test_help_shows_defaults_as_they_are_written(capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` showed Python: `(default: ['header:X-Partition-Key'])`, `(default: None)`
    after a help that says what no value means, `(default: False)`, sizes in bytes beside an
    example in MiB (`(default: 1048576)`), `30.0` seconds."""
    shown = {}
    for cls in (EnqueuerSettings, DequeuerSettings):
        assert exit_code(cls, ["--help"]) == 0
        shown[cls] = " ".join(capsys.readouterr().out.split())
    enqueuer, dequeuer = shown[EnqueuerSettings], shown[DequeuerSettings]
    for out in (enqueuer, dequeuer):
        assert "(default: None)" not in out and "(default: [" not in out
        assert "(default: False)" not in out and "(default: off)" in out
    assert "(default: header:X-Partition-Key)" in enqueuer
    assert "--max-body SIZE largest request body (e.g. 1MiB)" in enqueuer
    assert "(default: 1MiB)" in enqueuer and "(default: 64KiB)" in enqueuer
    assert "in seconds (at most 30 days); X-Request-Timeout may ask for less (default: 30)" in (
        enqueuer
    )
    assert "(default: connect,timeout,502,503,504)" in dequeuer
    assert "(default: 16MiB)" in dequeuer and "(default: 0.5)" in dequeuer


def test_help_texts_read_alike() -> None:
    """url-fetcher's help was sentences (`Address to listen on.`) beside the sidecars' phrases
    (`address to listen on`), and its caps `up to 1,000,000` beside `at most 1,000,000`."""
    for cls in (EnqueuerSettings, DequeuerSettings, UrlFetcherSettings):
        for name, field in cls.model_fields.items():
            text = field.description or ""
            assert not re.match(r"[A-Z][a-z]+\b", text), (cls.prog, name)
            assert not text.endswith(".") and "up to 1,000,000" not in text, (cls.prog, name)


def test_help_fits_the_terminal_and_shows_what_is_required(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment note at the end of `--help` was one line of 200 characters, and so was
    url-fetcher's list of endpoints; the dequeuer's usage showed `[--service NAME]`, optional,
    though it does not start without it; `--log-level` said only its choices again."""
    monkeypatch.setenv("COLUMNS", "80")
    shown = {}
    for cls in (EnqueuerSettings, DequeuerSettings, UrlFetcherSettings):
        assert exit_code(cls, ["--help"]) == 0
        shown[cls] = capsys.readouterr().out
        assert max(map(len, shown[cls].splitlines())) <= 80, shown[cls]
    usage = " ".join(shown[DequeuerSettings].split("\n\n")[0].split())
    assert " --service NAME " in usage and "[--service NAME]" not in usage
    assert "[--target URL]" in usage
    assert "info, also a line per request" in " ".join(shown[EnqueuerSettings].split())


def test_amqp_url_help_says_it_takes_a_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    """The sidecars' --amqp-url said only `RabbitMQ URL (amqp:// or amqps://)`, though it takes
    a cluster's node URLs too, as `proxymq`'s said."""
    for cls in (EnqueuerSettings, DequeuerSettings):
        assert exit_code(cls, ["--help"]) == 0
        assert "node URLs separated by commas" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["status", "--help"])
    assert "(amqp:// or amqps://), or a cluster's node URLs" in " ".join(
        capsys.readouterr().out.split()
    )


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("cafile=/etc/ca.pem", "cafile is not read: give it with --amqp-ca-file"),
        ("certfile=/c.pem&keyfile=/k.pem", "certfile is not read: give it with --amqp-cert-file"),
        ("keyfile=/k.pem", "keyfile is not read: give it with --amqp-key-file"),
        ("capath=/etc/ssl/certs", "capath is not read: give a CA bundle with --amqp-ca-file"),
        ("no_verify_ssl=1", "no_verify_ssl is not read: the broker's certificate is always"),
    ],
)
def test_tls_options_in_the_url_query_are_refused(
    query: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """aio-pika's own TLS options in the URL (`amqps://host/?cafile=...`) were ignored without a
    word: ProxyMQ hands aiormq a TLS context of its own, made from --amqp-ca-file and the
    client certificate options, so the broker was verified with the system's CAs."""
    url = f"amqps://guest:s3cret@broker.example/?heartbeat=5&{query}"
    assert exit_code(EnqueuerSettings, ["--amqp-url", url]) == 2
    assert says in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["status", "--service", "s", "--amqp-url", f"amqps://a/,{url}"])
    err = capsys.readouterr().err
    assert says in err and "s3cret" not in err
