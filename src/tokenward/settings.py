"""All configuration: one class, every option with a default, an env var and a line of docs.

Options come from, highest priority first: the arguments of :meth:`Settings.load` (command-line
flags), ``TOKENWARD_*`` environment variables (``TOKENWARD_DATABASE_URL``…), for a secret
setting ``TOKENWARD_<NAME>_FILE`` naming a file that holds its value (Docker and Kubernetes
secrets; :class:`SecretFilesSource`), and a TOML file named by ``TOKENWARD_CONFIG_FILE``
(keys as below, without the prefix). Each is a pydantic-settings source
(:meth:`Settings.settings_customise_sources`). README.md's configuration reference lists every
option; a test keeps the two in step.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tokenward.tokens.hashing import MIN_KEY_BYTES, ServerKey, TokenHasher

KEY_FILE_NAME = "secret.key"
DB_FILE_NAME = "tokenward.db"
MAX_WORKERS = 64


class FromFile:
    """Marks a secret setting: ``TOKENWARD_<NAME>_FILE`` may name a file holding its value."""


#: ``Annotated[str | None, SECRET]``: the setting is a secret (see :class:`SecretFilesSource`)
SECRET = FromFile()


class SecretFilesSource(PydanticBaseSettingsSource):
    """Secret settings from files: ``TOKENWARD_DATABASE_URL_FILE=/run/secrets/db`` reads the
    database URL from that file, as Docker and Kubernetes secrets are mounted.

    The rules: the file's whole text is the value, less its trailing line break (``echo``
    and editors add one; no secret ends in one); an empty file, one that cannot be read and a
    variable set together with its ``_FILE`` variant are errors naming the variable (never
    the value). The ``_FILE`` variant ranks as the variable itself: above the TOML file,
    below command-line flags. ``TOKENWARD_SECRET_KEY_FILE`` is the key file setting of its
    own (one key per line, read by :func:`load_hasher`), so ``secret_key`` is not marked.
    """

    def __init__(
        self, settings_cls: type[BaseSettings], environ: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(settings_cls)
        environ = os.environ if environ is None else environ
        self.case_sensitive = bool(self.config.get("case_sensitive", False))
        self.prefix = str(self.config.get("env_prefix", ""))
        self.environ = {self._key(k): v for k, v in environ.items()}

    def _key(self, name: str) -> str:
        return name if self.case_sensitive else name.lower()

    def variable(self, field_name: str) -> str:
        return f"{self.prefix}{field_name}_FILE".upper()

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """(the file's text or None, the variable's name, False): raises ``ValueError``
        with a message naming no value when the file cannot give one."""
        variable = self.variable(field_name)
        path = self.environ.get(self._key(variable))
        if path is None or not any(isinstance(m, FromFile) for m in field.metadata):
            return None, variable, False
        direct = f"{self.prefix}{field_name}".upper()
        if self._key(direct) in self.environ:
            raise ValueError(f"give {direct} or {variable}, not both")
        if not path:
            raise ValueError("is empty: give the path of a file holding the value")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text") from None
        value = text.rstrip("\r\n")
        if not value:
            raise ValueError(f"{path} is empty")
        return value, variable, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        problems: list[InitErrorDetails] = []
        for name, field in self.settings_cls.model_fields.items():
            try:
                value, _, _ = self.get_field_value(field, name)
            except ValueError as exc:
                error = PydanticCustomError("secret_file", "{problem}", {"problem": str(exc)})
                problems.append({"type": error, "loc": (f"{name}_file",), "input": None})
                continue
            if value is not None:
                values[name] = value
        if problems:
            raise ValidationError.from_exception_data(self.settings_cls.__name__, problems)
        return values


def _toml_source(settings_cls: type[BaseSettings]) -> PydanticBaseSettingsSource | None:
    """The TOML file named by ``TOKENWARD_CONFIG_FILE``: one that is missing or unreadable is
    an error (pydantic-settings would skip it quietly), as is one that is not TOML."""
    path = os.environ.get("TOKENWARD_CONFIG_FILE")
    if not path:
        return None
    Path(path).open("rb").close()  # the OSError names the file
    try:
        return TomlConfigSettingsSource(settings_cls, toml_file=Path(path))
    except tomllib.TOMLDecodeError as exc:
        context = {"path": path, "problem": str(exc)}
        error = PydanticCustomError("toml", "{path} is not valid TOML: {problem}", context)
        raise ValidationError.from_exception_data(
            settings_cls.__name__, [{"type": error, "loc": ("config_file",), "input": None}]
        ) from None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENWARD_", extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags, then the environment and secret files, then the TOML file (no .env file,
        no secrets directory: ``_FILE`` variables name each file)."""
        toml = _toml_source(settings_cls)
        sources = (init_settings, env_settings, SecretFilesSource(settings_cls))
        return sources if toml is None else (*sources, toml)

    data_dir: Path = Field(
        Path(".tokenward"), description="Folder for the SQLite database and the server key file."
    )
    database_url: Annotated[str | None, SECRET] = Field(
        None,
        description="SQLAlchemy async URL; default: SQLite in the data dir. PostgreSQL: postgresql+asyncpg://user@host/db.",
    )
    secret_key: SecretStr | None = Field(
        None,
        description="Server key(s) for hashing tokens: hex, 32+ bytes, comma-separated, "
        "current first; default: the key file.",
    )
    secret_key_file: Path | None = Field(
        None,
        description="File with the server key(s), one hex key per line, current first; "
        "default: DATA_DIR/secret.key.",
    )
    migrate_on_start: bool = Field(
        True,
        description="Apply pending database migrations when the server starts; false "
        "(serve --no-migrate): refuse to start on a schema that is behind (run tokenward "
        "migrate first).",
    )
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, ge=0, le=65535, description="Port to listen on.")
    cache_ttl: float = Field(
        5.0,
        ge=0,
        le=300,
        description="Seconds a verified token's state may be served from the per-replica cache.",
    )
    redis_url: Annotated[str | None, SECRET] = Field(
        None,
        description="Redis URL (redis://host:6379/0) for shared rate limits; default: in-process.",
    )
    redis_prefix: str = Field(
        "tokenward:", max_length=64, description="Prefix of every key tokenward keeps in Redis."
    )
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body the API accepts, in bytes."
    )
    max_json_depth: int = Field(
        32,
        ge=2,
        le=256,
        description="Deepest nesting of arrays and objects a JSON request body may have.",
    )
    usage_flush_seconds: float = Field(
        5.0, gt=0, description="How often last-used times and IPs are written."
    )
    log_level: str = Field("info", description="Log level: debug, info, warning or error.")
    allow_insecure_http: bool = Field(
        False, description="Serve plain HTTP on a non-loopback address (only behind a TLS proxy)."
    )
    public_url: str | None = Field(
        None,
        description="The URL clients use to reach this server (https://tokens.example.com), "
        "for DPoP htu checks behind a proxy; default: the request's own URL.",
    )
    access_token_ttl: int = Field(
        900,
        ge=10,
        le=86400,
        description="Default lifetime of an access token from /v1/token, in seconds.",
    )
    access_token_max_ttl: int = Field(
        3600,
        ge=10,
        le=86400,
        description="Longest lifetime a client may request for an access token, in seconds.",
    )
    refresh_token_ttl: int = Field(
        86400,
        ge=60,
        le=31_536_000,
        description="Absolute lifetime of a refresh-token family, in seconds.",
    )
    refresh_reuse_grace: int = Field(
        10,
        ge=0,
        le=300,
        description="Seconds a used refresh token may be presented again by a concurrent "
        "refresh before reuse is declared.",
    )
    dpop_max_age: int = Field(
        60, ge=1, le=3600, description="Seconds a DPoP proof stays acceptable after its iat."
    )
    dpop_clock_skew: int = Field(
        5,
        ge=0,
        le=300,
        description="Seconds of clock skew allowed between clients and this server for DPoP.",
    )
    jwks_cache_ttl: float = Field(
        600.0,
        ge=0,
        le=86400,
        description="Seconds an OIDC issuer's keys are cached (an unknown key id refetches).",
    )
    rotation_interval: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Seconds between rounds of the rotation scheduler (one runner at a time).",
    )
    expiry_warning_days: int = Field(
        7,
        ge=0,
        le=365,
        description="Warn this many days before a long-lived token expires (project policy "
        "may override).",
    )
    webhook_attempts: int = Field(
        3, ge=1, le=10, description="Delivery attempts of a webhook before it counts as failed."
    )

    gateway_config: Path | None = Field(
        None,
        description="Route policy file (TOML) for the gateway and /authz; see docs/gateway.md.",
    )
    gateway_port: int = Field(
        8081, ge=0, le=65535, description="Port of the built-in gateway (with a route policy file)."
    )
    workers: int | Literal["auto"] = Field(
        1,
        description="Server processes on the same ports: a number or auto (one per core); "
        "more than 1 needs PostgreSQL and Redis.",
    )
    trusted_proxies: str = Field(
        "",
        description="Comma-separated CIDRs of proxies whose X-Forwarded-For is believed; "
        "default: none (the socket peer is the client).",
    )
    auth_failure_limit: str = Field(
        "20/minute",
        description="Failed authentications per client IP before it gets 429 (several windows: "
        "10/second;100/hour); empty to disable.",
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_in_range(cls, value: object) -> int | str:
        if value == "auto":
            return "auto"
        text = str(value).strip()
        if isinstance(value, int | str) and text.isdigit() and 1 <= int(text) <= MAX_WORKERS:
            return int(text)
        raise ValueError(f"must be auto or a number from 1 to {MAX_WORKERS}")

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: str) -> str:
        from tokenward.clientip import parse_cidrs

        parse_cidrs(value)
        return value

    @field_validator("auth_failure_limit")
    @classmethod
    def _failure_limit(cls, value: str) -> str:
        from tokenward.tokens.durations import parse_rates

        if value.strip():
            parse_rates(value)
        return value

    dashboard_idle_minutes: float = Field(
        30.0, gt=0, le=1440, description="Dashboard sessions end after this many idle minutes."
    )
    dashboard_session_hours: float = Field(
        12.0, gt=0, le=720, description="Dashboard sessions end this many hours after sign-in."
    )
    dashboard_step_up_seconds: int = Field(
        300,
        ge=0,
        le=86400,
        description="Sensitive dashboard actions want a TOTP code entered this recently "
        "(0: every time).",
    )
    dashboard_login_rate: str = Field(
        "5/minute;30/hour", description="Dashboard sign-in attempts allowed per account."
    )
    dashboard_login_rate_ip: str = Field(
        "20/minute;200/hour", description="Dashboard sign-in attempts allowed per client IP."
    )

    audit_mode: Literal["sync", "async"] = Field(
        "sync",
        description="sync: a request is answered only once its audit event is durable; "
        "async: answered once queued (faster; a crash can lose queued events).",
    )
    audit_queue_size: int = Field(
        10_000, ge=1, description="Audit events that may wait to be written before requests wait."
    )
    audit_batch_size: int = Field(
        500, ge=1, le=10_000, description="Most audit events written in one transaction."
    )
    audit_retention_days: float = Field(
        0, ge=0, description="Prune audit events older than this many days (0: keep all)."
    )
    audit_checkpoint_seconds: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="Seconds between two checkpoints of a writer's audit chain (each writer "
        "records its chain's head; verify proves everything up to it).",
    )
    audit_sqlite_synchronous: Literal["NORMAL", "FULL"] = Field(
        "NORMAL",
        description="SQLite: NORMAL, an acknowledged audit event survives a crash of the "
        "process; FULL, a power loss too (an fsync per commit).",
    )

    anomaly_enabled: bool = Field(
        True, description="Run the anomaly detectors on every decision (alerts, responses)."
    )
    anomaly_never_block: str = Field(
        "127.0.0.0/8,::1/128",
        description="Comma-separated CIDRs that anomaly handling never blocks (e.g. your gateway).",
    )
    ip_block_refresh_seconds: float = Field(
        5.0, gt=0, description="How often each replica reloads the temporary IP blocks."
    )
    webhook_max_attempts: int = Field(
        6, ge=1, le=20, description="Attempts per alert webhook before giving up."
    )
    webhook_backoff_seconds: float = Field(
        1.0, gt=0, description="Wait before the first webhook retry; doubles each time."
    )
    webhook_timeout_seconds: float = Field(
        5.0, gt=0, le=60, description="Timeout of one webhook attempt, in seconds."
    )
    leak_report_keys_url: str | None = Field(
        None,
        description="Where a secret-scanning partner's public keys are served (GitHub: "
        "https://api.github.com/meta/public_keys/secret_scanning); enables POST /v1/leaks. "
        "https (plain http to loopback only).",
    )
    leak_report_keys: str | None = Field(
        None,
        description="The partner's public keys inline: PEM block(s), or the JSON document "
        "the keys URL serves; enables POST /v1/leaks.",
    )
    leak_report_keys_file: Path | None = Field(
        None, description="A file holding the partner's public keys (PEM or the JSON document)."
    )
    leak_report_keys_ttl: float = Field(
        3600.0, gt=0, description="Seconds the fetched public keys are cached."
    )
    leak_report_max_tokens: int = Field(
        100, ge=1, le=1000, description="Most tokens one leak report may hold."
    )
    leak_report_max_bytes: int = Field(
        262_144, ge=1024, description="Largest leak report body, in bytes."
    )
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics at /metrics.")
    access_log: bool = Field(
        True, description="Log one JSON line per HTTP request (method, path, status, duration)."
    )

    @field_validator("dashboard_login_rate", "dashboard_login_rate_ip")
    @classmethod
    def _login_rate(cls, value: str) -> str:
        from tokenward.tokens.durations import parse_rates

        parse_rates(value)  # raises with a message naming the expected form
        return value

    @field_validator("leak_report_keys_url")
    @classmethod
    def _keys_url(cls, value: str | None) -> str | None:
        from tokenward.leaks.partner import check_keys_url

        return check_keys_url(value) if value else None

    @field_validator("leak_report_keys")
    @classmethod
    def _keys_inline(cls, value: str | None) -> str | None:
        from tokenward.leaks.partner import parse_keys

        if value:
            parse_keys(value)  # raises with a message saying what is expected
        return value or None

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("log_level must be debug, info, warning or error")
        return value.lower()

    @field_validator("secret_key_file")
    @classmethod
    def _one_key_source(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # a field validator (not a model one): its error quotes the path, not the key
        if value is not None and info.data.get("secret_key") is not None:
            raise ValueError("give TOKENWARD_SECRET_KEY or TOKENWARD_SECRET_KEY_FILE, not both")
        return value

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Settings from every source (see the module's docstring); ``overrides`` that are
        not ``None`` (command-line flags) win."""
        return cls(**{k: v for k, v in overrides.items() if v is not None})

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / DB_FILE_NAME}"

    @property
    def worker_count(self) -> int:
        """``workers`` as a number: ``auto`` is the cores this process may run on."""
        if self.workers == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        return self.workers

    def workers_problem(self) -> str | None:
        """Why ``worker_count`` processes cannot share this configuration, or ``None``.

        Workers are replicas on one machine: they share rate limits and revocations through
        Redis and their state through a database every process can write at once.
        """
        if self.worker_count <= 1:
            return None
        missing = []
        if not self.resolved_database_url.startswith("postgresql"):
            missing.append("PostgreSQL (TOKENWARD_DATABASE_URL)")
        if not self.redis_url:
            missing.append("Redis (TOKENWARD_REDIS_URL)")
        if not missing:
            return None
        return (
            f"--workers {self.worker_count} needs {' and '.join(missing)}: on the embedded "
            "default each process would keep its own rate-limit counters and revocation "
            "cache, so limits would multiply and a revocation would not reach the others; "
            "use one process, or PostgreSQL and Redis"
        )

    @property
    def key_file(self) -> Path:
        return self.secret_key_file or self.data_dir / KEY_FILE_NAME


def _decode_key(text: str) -> bytes:
    text = text.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError("a server key must be hex-encoded") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"a server key must be at least {MIN_KEY_BYTES} bytes")
    return key


def write_new_key_file(path: Path) -> None:
    """Create the key file with a fresh random key, readable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")


def load_hasher(settings: Settings) -> TokenHasher:
    """The token hasher from ``TOKENWARD_SECRET_KEY`` or the key file (current key first)."""
    if settings.secret_key is not None:
        keys = [_decode_key(k) for k in settings.secret_key.get_secret_value().split(",")]
    else:
        path = settings.key_file
        if not path.exists():
            raise FileNotFoundError(
                f"no server key at {path}: run 'tokenward init' or set TOKENWARD_SECRET_KEY"
            )
        lines = [
            ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")
        ]
        if not lines:
            raise ValueError(f"the key file {path} holds no key")
        keys = [_decode_key(k) for k in lines]
    server_keys = [ServerKey.from_bytes(k) for k in keys]
    return TokenHasher(server_keys[0], server_keys[1:])
