"""Settings: one typed object, read from the environment (and an optional ``.env``) once.

Every variable is ``SMSBAT_<FIELD>`` except ``REDIS_URL``. Invalid settings raise
:class:`~smsbat_tracker.errors.ConfigError` naming each bad variable, never its value.
"""

from __future__ import annotations

from typing import Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from smsbat_tracker.errors import ConfigError
from smsbat_tracker.redis_url import is_sentinel_url, parse_sentinel_url

__all__ = ["Settings", "env_name", "load_settings"]

ENV_PREFIX = "SMSBAT_"


# The API clients' defaults too (one place: the settings and every client agree).
DEFAULT_CONNECT_TIMEOUT: Final = 5.0
DEFAULT_READ_TIMEOUT: Final = 3.0


class Settings(BaseSettings):
    """Everything smsbat-tracker can be told; see the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    # --- the SMSBAT API -------------------------------------------------------------
    base_url: str = "https://restapi.smsbat.com"
    api_key: SecretStr | None = None
    # How the API key is sent: "header" (X-Authorization-Key) or "basic-key" (Basic "@:<key>").
    auth: Literal["header", "basic-key"] = "header"
    username: str | None = None
    password: SecretStr | None = None
    connect_timeout: float = Field(default=DEFAULT_CONNECT_TIMEOUT, gt=0, le=120)
    # A status answer slower than this is a failed request, retried in 1 s: a slow answer
    # holds a worker process while it waits, and makes the late tail (bench/RESULTS.md).
    read_timeout: float = Field(default=DEFAULT_READ_TIMEOUT, gt=0, le=300)
    # The longest a check's run waits for the answer in its worker process (less when the
    # provider's recent answers come much sooner: engine/late.py); a later answer is
    # cached when it comes (up to the read timeout) and read by the next run, 1 s later.
    # A slow answer then holds a process this long, not the read timeout: two default
    # prefork processes keep up when some answers are slow. At least the timeouts: off.
    answer_wait: float = Field(default=0.5, gt=0, le=300)

    # --- Redis: the Celery broker, the result backend and the status cache ----------
    redis_url: str = Field(default="redis://localhost:6379/0", validation_alias="REDIS_URL")
    # The master the sentinels watch, for a REDIS_URL of sentinel:// parts (see connections).
    sentinel_master: str = Field(
        default="mymaster", min_length=1, max_length=64, pattern=r"^[\w.:-]+$"
    )
    key_prefix: str = Field(default="smsbat", min_length=1, max_length=64, pattern=r"^[\w.:-]+$")

    # --- tracking schedule (seconds) ------------------------------------------------
    deadline: float = Field(default=120.0, gt=0, le=86_400)
    first_delay: float = Field(default=5.0, ge=0, le=3_600)
    backoff_factor: float = Field(default=1.5, ge=1.0, le=10.0)
    max_delay: float = Field(default=10.0, gt=0, le=3_600)
    jitter: float = Field(default=0.1, ge=0, lt=1)
    # The provider forbids more than one status request per second per message.
    min_interval: float = Field(default=1.0, ge=1.0, le=3_600)
    # A just-sent id may not be visible yet: a 404 within this window is retried.
    not_found_grace: float = Field(default=30.0, ge=0, le=3_600)
    # A poller accepts a cached in-flight status this young instead of calling the API.
    fresh_for: float = Field(default=1.0, ge=0, le=60)
    # The deadline check is retried this long while its requests fail or get no turn: a
    # failed request is no answer, and a wrong "timeout" re-sends an OTP.
    deadline_grace: float = Field(default=10.0, ge=0, le=3_600)

    # --- cache ----------------------------------------------------------------------
    cache_ttl: float = Field(default=30.0, gt=0, le=3_600)
    final_ttl: float = Field(default=86_400.0, gt=0, le=30 * 86_400)
    history_length: int = Field(default=8, ge=1, le=100)

    # --- Celery over Redis ----------------------------------------------------------
    # Unacked tasks are redelivered after this; every countdown must stay far below it.
    visibility_timeout: float = Field(default=3_600.0, ge=1, le=43_200)
    unacked_restore_interval: float = Field(default=10.0, gt=0, le=3_600)
    # A tracking whose next run is this late, and is neither running in a live worker nor
    # waiting in the queue, was lost (a killed worker, a Redis restart): every worker's
    # re-driver publishes a fresh run that takes it over.
    redrive_after: float = Field(default=3.0, ge=1, le=3_600)
    # The queue of the tracker's own tasks (None: Celery's default queue, with everything
    # else). A worker started without -Q consumes both; `-Q <queue>` gives tracking its own
    # workers, so that a burst of checks never delays the application's callbacks.
    queue: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[\w.:-]+$")
    # A prefork child whose RSS passes this (MiB) after a task is replaced by a fresh one
    # (Celery's worker_max_memory_per_child; 0 = never): a safety net well above the
    # plateau a child reaches (bench/RESULTS.md, "Soak"), so that a leak in any library
    # cannot grow a worker without bound.
    worker_max_memory: int = Field(default=400, ge=0, le=1_048_576)

    # --- campaigns --------------------------------------------------------------------
    # Messages one batch task claims and checks concurrently.
    campaign_batch: int = Field(default=500, ge=1, le=10_000)
    # Batch-task chains per campaign running side by side (about one per worker process):
    # a worker that dies stalls only its chains until they are re-driven.
    campaign_ticks: int = Field(default=4, ge=1, le=64)
    # Status requests in flight at once within one batch.
    campaign_concurrency: int = Field(default=64, ge=1, le=1_000)

    # --- webhook --------------------------------------------------------------------
    # Once a push has been seen for a message, rely on pushes: no more checks until the
    # deadline, where one last check is the safety net.
    trust_pushes: bool = True
    webhook_token: SecretStr | None = None
    webhook_open: bool = False
    # --- campaign pages (the receiver's /campaigns/{id}; off while no password is set) --
    # People sign in with HTTP Basic: a login a browser asks for and a password manager
    # keeps, apart from the webhook's token (a machine's secret, in the provider's URL).
    report_user: str = Field(default="report", min_length=1, max_length=200, pattern=r"^[^:]+$")
    report_password: SecretStr | None = None

    # --- global API rate limit (requests per second across every worker; 0 = off) ---
    rate_limit: float = Field(default=50.0, ge=0, le=100_000)

    # --- Prometheus metrics served by a worker (0 = off; the receiver serves /metrics) ---
    metrics_port: int = Field(default=0, ge=0, le=65_535)
    # Loopback by default: a port that answers anyone is a choice (compose makes it).
    metrics_host: str = Field(default="127.0.0.1", min_length=1, max_length=255)
    # Where a worker's processes count (prometheus-client's multiprocess directory); emptied
    # when the worker starts. Default: a new temporary directory per worker.
    metrics_dir: str | None = Field(default=None, min_length=1, max_length=4096)

    # --- logs of the package's own worker -----------------------------------------------
    # Celery's per-task lines (received, succeeded, retry: about 1 KB each, several per
    # tracking) at INFO; off, a tracking logs about 0.7 KB at INFO (its end and callback).
    task_log_lines: bool = False

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        try:
            parts.port  # noqa: B018 - raises on a non-numeric or out-of-range port
        except ValueError:
            raise ValueError("has an invalid port") from None
        return value.rstrip("/")

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if is_sentinel_url(value):
            parse_sentinel_url(value)  # ValueError naming what is wrong, never the value
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss://, unix:// or sentinel://")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("must name a host")
        try:
            parts.port  # noqa: B018 - raises on a non-numeric or out-of-range port
        except ValueError:
            raise ValueError("has an invalid port") from None
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        problems = self.combination_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def combination_problems(self) -> list[str]:
        """What is wrong with how the values go together (each valid alone), all of it."""
        problems = []
        has_key = self.api_key is not None and bool(self.api_key.get_secret_value())
        has_login = bool(self.username) or self.password is not None
        if has_key and has_login:
            problems.append(
                "SMSBAT_API_KEY and SMSBAT_USERNAME/SMSBAT_PASSWORD: set one way to log in, "
                "not both"
            )
        if has_login and (not self.username or self.password is None):
            missing = "SMSBAT_PASSWORD" if self.username else "SMSBAT_USERNAME"
            problems.append(f"{missing}: needed with the other half of the login")
        if self.first_delay > self.max_delay:
            problems.append("SMSBAT_FIRST_DELAY: must not exceed SMSBAT_MAX_DELAY")
        if self.max_delay * 4 > self.visibility_timeout:
            # A countdown task is held unacked while it waits; one that outlives the
            # visibility timeout is redelivered to a second worker.
            problems.append(
                "SMSBAT_VISIBILITY_TIMEOUT: must be at least 4 x SMSBAT_MAX_DELAY "
                f"({self.max_delay * 4:g} s)"
            )
        return problems

    def to_env(self) -> dict[str, str]:
        """These settings as environment variables, secrets included, for child processes.

        For handing to a worker started by the demo or the tests; never log the result.
        """
        env: dict[str, str] = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            key = info.validation_alias if isinstance(info.validation_alias, str) else None
            env[key or f"{ENV_PREFIX}{name.upper()}"] = (
                ("true" if value else "false") if isinstance(value, bool) else str(value)
            )
        return env

    @property
    def secret_values(self) -> list[str]:
        """Every secret these settings hold, as text: what no log line may show."""
        secrets = (self.api_key, self.password, self.webhook_token, self.report_password)
        return [s.get_secret_value() for s in secrets if s is not None and s.get_secret_value()]

    @property
    def has_credentials(self) -> bool:
        """Whether an API key or a login is set (the webhook receiver and code that only
        enqueues need none; whatever calls the API does)."""
        has_key = self.api_key is not None and bool(self.api_key.get_secret_value())
        return has_key or bool(self.username)

    def require_credentials(self) -> Settings:
        """These settings, or :class:`ConfigError` naming ``SMSBAT_API_KEY`` without any."""
        if not self.has_credentials:
            raise ConfigError(f"invalid settings: {NO_CREDENTIALS}")
        return self

    @property
    def auth_method(self) -> Literal["header", "basic-key", "basic"]:
        """The way credentials go on the wire."""
        return "basic" if self.api_key is None else self.auth


def _field_name(loc: str) -> str | None:
    """The field pydantic reported ``loc`` for (it reports an alias by itself)."""
    if loc in Settings.model_fields:
        return loc
    for name, info in Settings.model_fields.items():
        if info.validation_alias == loc:
            return name
    return None


def env_name(loc: str) -> str:
    """The environment variable that sets a field (``queue``: ``SMSBAT_QUEUE``), given its
    name or the alias pydantic reports."""
    name = _field_name(loc)
    if name is None:
        return loc
    info = Settings.model_fields[name]
    if isinstance(info.validation_alias, str):
        return info.validation_alias
    return f"{ENV_PREFIX}{name.upper()}"


# The fields the combination checks read besides the login: put back to their defaults to
# look for what else is wrong.
_SCHEDULE_FIELDS: Final = ("first_delay", "max_delay", "visibility_timeout")


NO_CREDENTIALS: Final = (
    "SMSBAT_API_KEY: no credentials; set SMSBAT_API_KEY, or SMSBAT_USERNAME and SMSBAT_PASSWORD"
)


def load_settings(*, credentials: bool = True, **overrides: Any) -> Settings:
    """Read the settings, or raise :class:`ConfigError` naming each bad variable.

    ``overrides`` (field names) take precedence over the environment; the tests, the demo
    and embedding applications use them instead of mutating ``os.environ``.
    ``credentials=False`` accepts settings without API credentials (the webhook receiver,
    and processes that only enqueue).
    """
    problems: list[str] = []
    values = dict(overrides)
    settings: Settings | None = None
    # Every bad variable at once: a bad value is put back to its default and the rest
    # validated again, so that the combinations and the credentials are checked too.
    for _ in range(3):
        try:
            settings = Settings(**values)
            break
        except ValidationError as exc:
            retry = False
            for error in exc.errors(include_input=False, include_url=False):
                loc = [str(part) for part in error["loc"]]
                message = str(error["msg"]).removeprefix("Value error, ")
                name = _field_name(loc[0]) if loc else None
                if name is not None:
                    problems.append(f"{env_name(loc[0])}: {message}")
                    values[name] = Settings.model_fields[name].get_default()
                    retry = True
                else:  # how values go together: look past the schedule's (not the login's)
                    problems.extend(message.split("; "))
                    values.update(
                        {f: Settings.model_fields[f].get_default() for f in _SCHEDULE_FIELDS}
                    )
                    retry = "SMSBAT_USERNAME" not in message and "SMSBAT_PASSWORD" not in message
            if not retry:
                break
    if settings is not None and credentials and not settings.has_credentials:
        problems.append(NO_CREDENTIALS)
    if problems:
        raise ConfigError("invalid settings: " + "; ".join(dict.fromkeys(problems))) from None
    assert settings is not None
    return settings
