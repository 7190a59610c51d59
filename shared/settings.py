"""Settings common to every ProxyMQ command: flags over environment over `*_FILE` over defaults.

Each command declares one `Settings` subclass; its field descriptions become `--help` and the
configuration reference (`docs/configuration.md`), so the two cannot drift.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import math
import os
import re
import ssl
import sys
from collections.abc import Iterable
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar, get_args

from pamqp.constants import DOMAIN_REGEX
from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticUndefined
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from yarl import URL

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i?[bB]?|[bB])?\s*$")
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
}


def parse_size(value: object) -> object:
    """Accept `1MiB`, `512k`, `1048576` for byte sizes, as people write them."""
    if not isinstance(value, str):
        return value
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a size (examples: 1048576, 512KiB, 1MiB, 2MB)")
    number, unit = match.groups()
    size = float(number) * _UNITS[(unit or "").lower().rstrip("b")]
    if not math.isfinite(size):  # int() of it stopped the sidecar with an OverflowError
        raise ValueError("too large a size")
    return int(size)


def split_commas(value: object) -> object:
    """Lists come as `a,b` on the command line and in the environment alike."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return [part.strip() for item in value for part in item.split(",") if part.strip()]
    return value


def folded(value: object) -> object:
    """`INFO` and ` info ` are `info`: a word read in any case, spaces around it ignored."""
    return value.strip().lower() if isinstance(value, str) else value


@dataclass(frozen=True)
class Metavar:
    """What `--help` shows a flag takes (`--timeout SECONDS`): the type it parses to (`float`)
    does not say what to give. Flags that take a count need none: an `int` is shown as `N`."""

    name: str


ByteSize = Annotated[int, BeforeValidator(parse_size), Field(gt=0), Metavar("SIZE")]
# Each list names what it holds (`--services SERVICE[,SERVICE...]`): `A,B` said nothing of it.
CommaList = Annotated[list[str], NoDecode, BeforeValidator(split_commas)]
# The longest duration any setting takes: an asynchronous request may wait a month, and a
# larger one (1e300 s was taken) does not fit the deadline headers it is written into.
MAX_SECONDS = 30 * 86400
Seconds = Annotated[float, Field(le=MAX_SECONDS), Metavar("SECONDS")]
Milliseconds = Annotated[int, Field(le=MAX_SECONDS * 1000), Metavar("MS")]
# A cap of 1e12 was taken, and is none: --max-in-flight let requests pile up until memory ran
# out instead of answering 429. Counts with an upper bound of their own are plain `int`s (a
# Field's `le` beside this one is overridden by it).
MAX_COUNT = 1_000_000
Count = Annotated[int, Field(le=MAX_COUNT)]
Port = Annotated[int, Metavar("PORT")]
Host = Annotated[str, Metavar("HOST")]
Url = Annotated[str, Metavar("URL")]
FilePath = Annotated[str, Metavar("FILE")]
Name = Annotated[str, Metavar("NAME")]
UrlPath = Annotated[str, Metavar("PATH")]  # of an HTTP URL: /ready
# Refused at start: logging's own check of an unknown level stopped a sidecar with a traceback.
LogLevel = Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(folded)]


def read_secret_file(variable: str) -> str | None:
    """The value of the file `{variable}_FILE` names, or None when it is not set. Set beside
    `variable` itself, it is refused rather than ranked: which of two values wins is a guess a
    reader of the pod's environment should not have to make. A ValueError says what is wrong."""
    path = os.environ.get(f"{variable}_FILE")
    if not path:
        return None
    if variable in os.environ:
        raise ValueError(f"{variable} and {variable}_FILE are both set: set one of them")
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        name = variable.removeprefix("PROXYMQ_").lower()
        raise ValueError(f"cannot read {name} from {path}: {exc.strerror or exc}") from None


class FileSecretsSource(PydanticBaseSettingsSource):
    """`PROXYMQ_AMQP_URL_FILE=/run/secrets/amqp` reads the value from a file, so secrets never sit
    on a command line or in `ps` output."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        variable = f"{self.config.get('env_prefix', '')}{field_name}".upper()
        if field_name in self.current_state and variable not in os.environ:
            return None, field_name, False  # a flag gave it and wins: its file is not read
        return read_secret_file(variable), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, name)
            if value is not None:
                values[key] = value
        return values


class CommandSettings(BaseSettings):
    """Base of every command's settings; parse with `load()`, never by calling the class."""

    model_config = SettingsConfigDict(
        env_prefix="PROXYMQ_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        extra="ignore",
        # `inf` is no duration: an infinite --timeout failed every call with a plain 500.
        allow_inf_nan=False,
    )
    prog: ClassVar[str] = "proxymq"
    summary: ClassVar[str] = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, FileSecretsSource(settings_cls))


class SidecarSettings(CommandSettings):
    """What both sidecars share: how to reach RabbitMQ and how to log."""

    amqp_url: Url = Field(
        DEFAULT_AMQP_URL,
        description="RabbitMQ URL (amqp:// or amqps://), or a cluster's node URLs separated by "
        "commas",
    )
    amqp_ca_file: FilePath | None = Field(
        None, description="CA bundle (PEM) to verify an amqps:// broker; default: the system's CAs"
    )
    amqp_cert_file: FilePath | None = Field(
        None,
        description="client certificate (PEM) for amqps://, and its private key unless "
        "--amqp-key-file gives it",
    )
    amqp_key_file: FilePath | None = Field(
        None,
        description="client certificate's private key (PEM, not encrypted); only with "
        "--amqp-cert-file",
    )
    amqp_heartbeat: Annotated[int, Metavar("SECONDS")] = Field(
        15,
        ge=0,
        le=600,
        description="AMQP heartbeat in seconds: a connection cut without a close (a dead "
        "node, a dropped route) is noticed after about 3 heartbeats and reconnected; 0 turns "
        "heartbeats off",
    )
    log_level: LogLevel = Field(
        "info",
        description="what is logged: error and warning, only what went wrong; info, also a line "
        "per request and what the sidecar does (partitions taken, retries); debug, also details "
        "for troubleshooting",
    )
    json_logs: bool = Field(False, description="one JSON object per log line")

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        """Refused at start: a URL aio-pika cannot use failed every reconnect, once a second,
        for ever (`foo://x`: `KeyError: 'foo'`)."""
        return check_amqp_url(value)

    @model_validator(mode="after")
    def _tls_files(self) -> Self:
        """Read as the broker connection will read them, so a file that cannot be used is a
        configuration error like any other, not a traceback as the sidecar starts."""
        TlsFiles.of(self).context_for(self.amqp_url)
        return self


QUEUE_NAME = DOMAIN_REGEX["queue-name"]  # what the AMQP client sends as a queue's name


def check_queue_name_part(value: str) -> str:
    """An instance id names queues: a character the AMQP client refuses in a queue name stopped
    a sidecar with a traceback once it was listening, and one replaced made two ids one."""
    if not QUEUE_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} cannot name a queue: use letters, digits and - _ . : @ # , / + "
            "(a pod's name is one)"
        )
    return value


def split_urls(url: str) -> list[str]:
    """`--amqp-url` takes one URL or a comma-separated list of a cluster's nodes."""
    return [part.strip() for part in url.split(",") if part.strip()]


CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----")
PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")


class _Encrypted(Exception):
    """Raised in place of a passphrase: OpenSSL otherwise asks for one on the terminal."""


def _no_passphrase() -> bytes:
    raise _Encrypted


@dataclass(frozen=True)
class TlsFiles:
    """What an amqps:// connection verifies the broker with (no CA file: the system's CAs) and
    shows it (a client certificate and its key). The fields are the sidecars' settings of the
    same names, and `proxymq` reads them as the same flags and variables (`--amqp-ca-file`,
    PROXYMQ_AMQP_CA_FILE); both check them with `context_for` before they connect."""

    amqp_ca_file: str | None = None
    amqp_cert_file: str | None = None
    amqp_key_file: str | None = None

    @classmethod
    def of(cls, options: object) -> TlsFiles:
        """The files a sidecar's settings or a `proxymq` command's arguments name."""
        return cls(*(getattr(options, field.name) for field in fields(cls)))

    def context_for(self, url: str) -> ssl.SSLContext | None:
        """The TLS context of a connection to `url`, None when no node is amqps://. It goes to
        any amqps:// node, not only to a first one spelt in lower case (`AMQPS://`, a cluster's
        second node or a space before the URL connected with the system's CAs, --amqp-ca-file
        ignored). A file that cannot be used is a ValueError naming the flag, the file and what
        is wrong with it (ssl's own errors name neither, and say `PEM lib` of most)."""
        if self.amqp_key_file and not self.amqp_cert_file:
            raise ValueError(
                f"--amqp-key-file {self.amqp_key_file} needs --amqp-cert-file, the certificate "
                "it is the key of"
            )
        if not any(URL(node).scheme == "amqps" for node in split_urls(url)):
            self._refuse_without_tls()
            return None
        if self.amqp_ca_file:
            _pem("--amqp-ca-file", self.amqp_ca_file, CERTIFICATE, "no PEM certificate")
        try:
            context = ssl.create_default_context(cafile=self.amqp_ca_file)
        except OSError as exc:  # ssl.SSLError is one
            raise ValueError(f"--amqp-ca-file {self.amqp_ca_file}: {exc.strerror or exc}") from None
        if self.amqp_cert_file:
            self._load_client_certificate(context, self.amqp_cert_file)
        return context

    def _refuse_without_tls(self) -> None:
        """Files given for a broker reached without TLS: the operator meant the connection to
        be encrypted and verified, and it would be neither, the password sent in clear."""
        given = [f"--{f.name.replace('_', '-')}" for f in fields(self) if getattr(self, f.name)]
        if given:
            verb, them = ("is", "it") if len(given) == 1 else ("are", "them")
            raise ValueError(
                f"{', '.join(given)} {verb} for amqps:// and --amqp-url names no amqps:// "
                f"broker: the connection would not be encrypted; use amqps://, or leave {them} out"
            )

    def _load_client_certificate(self, context: ssl.SSLContext, cert: str) -> None:
        """The certificate, with its key from --amqp-key-file or, without one, from the
        certificate's own file."""
        text = _pem("--amqp-cert-file", cert, CERTIFICATE, "no PEM certificate")
        if self.amqp_key_file:
            _pem("--amqp-key-file", self.amqp_key_file, PRIVATE_KEY, "no PEM private key")
            key = f"--amqp-key-file {self.amqp_key_file}"
        elif PRIVATE_KEY.search(text):
            key = f"the key in --amqp-cert-file {cert}"
        else:
            raise ValueError(
                f"--amqp-cert-file {cert} holds no private key: give it with --amqp-key-file"
            )
        try:
            context.load_cert_chain(cert, self.amqp_key_file, password=_no_passphrase)
        except _Encrypted:
            raise ValueError(
                f"{key}: the private key is encrypted, and no passphrase can be given: "
                "decrypt it (openssl pkey -in KEY -out DECRYPTED)"
            ) from None
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise ValueError(f"{key} is not the key of --amqp-cert-file {cert}") from None
            raise ValueError(f"--amqp-cert-file {cert}: {exc.strerror or exc}") from None

    def environment(self) -> dict[str, str]:
        """The variables a sidecar this process starts reads the same files from."""
        values = {field.name: getattr(self, field.name) for field in fields(self)}
        return {f"PROXYMQ_{name.upper()}": value for name, value in values.items() if value}


NO_TLS = TlsFiles()


def _pem(flag: str, path: str, marker: re.Pattern[str], holds: str) -> str:
    """The text of the file `flag` names, or a ValueError saying why it cannot be read or that
    it holds no `marker` (a PEM block's first line)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror or exc}") from None
    if not marker.search(text):
        raise ValueError(f"{flag} {path}: holds {holds}")
    return text


def check_amqp_url(value: str) -> str:
    """One broker URL or a cluster's nodes, comma-separated, each amqp:// or amqps:// with a
    host (the port may be left to the default); a ValueError says what is wrong. A list may not
    mix the schemes: its amqp:// nodes were reached without TLS, the password sent in clear,
    where the amqps:// ones say TLS was meant."""
    nodes = split_urls(value)
    if not nodes:
        raise ValueError("the AMQP URL is empty")
    like = "an AMQP URL (amqp://user:password@host:port/vhost)"
    urls = [check_url(node, ("amqp", "amqps"), like) for node in nodes]
    for url in urls:
        _refuse_tls_query(url)
    plain = [masked(str(url)) for url in urls if url.scheme == "amqp"]
    if plain and len(plain) < len(urls):
        raise ValueError(
            f"a list of nodes may not mix amqps:// and amqp://: {', '.join(plain)} would be "
            "reached without TLS, the password sent in clear; give every node amqps://"
        )
    return value


# aio-pika's own TLS options, in a URL's query, and what ProxyMQ takes in their place.
_QUERY_TLS = {
    "cafile": "give it with --amqp-ca-file",
    "capath": "give a CA bundle with --amqp-ca-file",
    "cadata": "give a CA bundle with --amqp-ca-file",
    "certfile": "give it with --amqp-cert-file",
    "keyfile": "give it with --amqp-key-file",
    "no_verify_ssl": "the broker's certificate is always verified: give the CA that signed it "
    "with --amqp-ca-file",
}


def _refuse_tls_query(url: URL) -> None:
    """aiormq reads these only when it is given no TLS context, and ProxyMQ gives it one: they
    were ignored without a word, the broker verified with the system's CAs."""
    for key in url.query:
        if key in _QUERY_TLS:
            raise ValueError(f"the URL's query option {key} is not read: {_QUERY_TLS[key]}")


def check_url(value: str, schemes: tuple[str, ...], like: str) -> URL:
    """`value` as a URL of one of `schemes` with a host, or a ValueError saying it is not
    `like` that, its password hidden."""
    try:
        url = URL(value)
        url.port  # noqa: B018  (an out-of-range port raises only when read)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{masked(value)!r} is not a URL: {exc}") from None
    if url.scheme not in schemes or not url.host:
        raise ValueError(f"{masked(value)!r} is not {like}")
    return url


def masked(url: str) -> str:
    """`url` with its password as `***`, for logs and messages. The password is the one yarl,
    and so every connection, reads: up to the authority's last `@` (hidden up to the first,
    `http://user:s3@cret@host/` showed `cret`). A URL that does not parse is hidden up to its
    last `@`, since a `/`, `?` or `#` written raw in a password is what ends its authority early
    (`amqp://user:pa/ss@host/`)."""
    try:
        parsed = URL(url)
        return str(parsed.with_password("***")) if parsed.password else url
    except (ValueError, TypeError):
        return re.sub(r"(://[^/@:]*:).*@", r"\1***@", url)


SettingsT = TypeVar("SettingsT", bound=CommandSettings)


def load(cls: type[SettingsT], argv: list[str] | None = None) -> SettingsT:
    """Parse flags (winning over `PROXYMQ_*` variables), or exit 2 with a readable message."""
    args = sys.argv[1:] if argv is None else argv
    epilog = epilog_for(cls)
    try:
        return _parse(cls, args, epilog)
    except ValidationError as exc:
        problems = "; ".join(_problem(err) for err in exc.errors())
        print(f"{cls.prog}: invalid configuration: {problems}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as exc:
        print(f"{cls.prog}: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _problem(error: ErrorDetails) -> str:
    """`--flag: what is wrong`; a check of several settings at once names them itself."""
    # A validator's own ValueError reads as its text, not pydantic's "Value error, ..."
    what = str(error.get("ctx", {}).get("error", error["msg"]))
    if not error["loc"]:
        return what
    return f"--{'-'.join(str(p) for p in error['loc']).replace('_', '-')}: {what}"


def epilog_for(cls: type[CommandSettings]) -> str:
    """The environment rule, told with the command's own first flag (url-fetcher has no
    --amqp-url)."""
    name = next(iter(cls.model_fields))
    flag, env = "--" + name.replace("_", "-"), "PROXYMQ_" + name.upper()
    return (
        f"Every flag is also an environment variable: {flag} is {env}, and "
        f"{env}_FILE reads it from a file (not both). Flags win over the environment. "
        "Durations (SECONDS, MS) are at most 30 days."
    )


class HelpFormatter(argparse.HelpFormatter):
    """Wraps each paragraph of the description and epilog to the terminal (argparse ran them
    into one; kept raw, a long one was a single line), and shows the flags a command needs
    without brackets: argparse must not require them, as a variable may give them instead."""

    def __init__(self, prog: str, required: frozenset[str] = frozenset()) -> None:
        super().__init__(prog)
        self.required = required

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text
        return "\n\n".join(fill(part, width, indent) for part in text.split("\n\n"))

    def _format_usage(
        self,
        usage: str | None,
        actions: Iterable[argparse.Action],
        groups: Iterable[argparse._MutuallyExclusiveGroup],
        prefix: str | None,
    ) -> str:
        shown = [
            _required(action) if action.dest in self.required else action for action in actions
        ]
        return super()._format_usage(usage, shown, groups, prefix)


def _required(action: argparse.Action) -> argparse.Action:
    shown = copy.copy(action)
    shown.required = True
    return shown


def _parse(cls: type[SettingsT], args: list[str], epilog: str) -> SettingsT:
    required = frozenset(name for name, field in cls.model_fields.items() if field.is_required())
    parser = argparse.ArgumentParser(
        prog=cls.prog,
        description=inspect.cleandoc(cls.summary or cls.__doc__ or ""),
        epilog=epilog,
        formatter_class=partial(HelpFormatter, required=required),
    )
    source: CliSettingsSource[SettingsT] = CliSettingsSource(
        cls,
        root_parser=parser,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_avoid_json=True,
        cli_hide_none_type=True,
    )
    _name_values(parser, cls)
    return cls(_cli_settings_source=source(args=args))  # type: ignore[call-arg]


def _name_values(parser: argparse.ArgumentParser, cls: type[CommandSettings]) -> None:
    """`--max-body SIZE`, not `--max-body int`: the type a flag parses to is not what it takes
    (`1MiB`). Switches and choices keep theirs (`--json-logs | --no-json-logs`, `{key,none}`).
    Defaults are shown as a flag takes them (`1MiB`, `a,b`, `off`), not as Python prints them
    (`1048576`, `['a', 'b']`, `False`); none at all where the help says what no value means."""
    for action in parser._actions:
        field = cls.model_fields.get(action.dest)
        if field is None:
            continue
        if action.metavar is not None:
            action.metavar = _metavar(field) or ("N" if action.metavar == "int" else action.metavar)
        if action.help and " (default: " in action.help:
            head = action.help.rsplit(" (default: ", 1)[0]
            default = shown_default(field)
            action.help = head if default is None else f"{head} (default: {default})"


def shown_default(field: FieldInfo) -> str | None:
    """A field's default as one would write it on the command line; None when it has none."""
    default = field.default
    if default is None or default == [] or default is PydanticUndefined:
        return None
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, list):
        return ",".join(str(item) for item in default)
    if isinstance(default, float):
        return f"{default:g}"
    if isinstance(default, int) and _metavar(field) == "SIZE":
        for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if default % size == 0:
                return f"{default // size}{unit}"
    return str(default)


def _metavar(field: FieldInfo) -> str | None:
    """The field's `Metavar`, also from inside `X | None` (where the union hides it)."""
    rules = [*field.metadata]
    for member in get_args(field.annotation):
        rules += getattr(member, "__metadata__", ())
    return next((rule.name for rule in rules if isinstance(rule, Metavar)), None)
