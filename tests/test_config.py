"""Tests of smsbat_tracker.config: settings from the environment and ConfigError messages."""

from __future__ import annotations

import os
import re
import traceback
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from smsbat_tracker.config import Settings, load_settings
from smsbat_tracker.errors import ConfigError
from smsbat_tracker.rules.schedule import Schedule

SECRET_KEY = "sk_live_MARKER_c0ffee"
SECRET_PASSWORD = "pw_MARKER_hunter2"
SECRET_TOKEN = "tok_MARKER_webhook"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No SMSBAT_* or REDIS_URL variable and no .env file leak in from outside."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("SMSBAT_") or name == "REDIS_URL":
            monkeypatch.delenv(name)


def config_error(**overrides: object) -> str:
    """The message of the ConfigError that load_settings raises."""
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    assert str(info.value).startswith("invalid settings: ")
    return str(info.value)


README = Path(__file__).resolve().parent.parent / "README.md"
_ROW = re.compile(r"^\| `((?:SMSBAT_[A-Z_]+)|REDIS_URL)` \| `([^`]*)` \|", re.MULTILINE)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """With only an API key set, the provider-driven defaults hold and nothing else is set."""
    monkeypatch.setenv("SMSBAT_API_KEY", "k")
    settings = load_settings()
    assert settings.base_url == "https://restapi.smsbat.com"
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.auth == "header"
    assert settings.auth_method == "header"
    assert settings.username is None
    assert settings.password is None
    assert settings.webhook_token is None
    assert settings.webhook_open is False
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == "k"
    # The provider's advice: stop after 60-120 s, at most one check per second per message,
    # first check after 5-10 s, cache statuses about 30 s.
    assert settings.deadline == 120.0
    assert settings.min_interval == 1.0
    assert 5.0 <= settings.first_delay <= settings.max_delay
    assert settings.cache_ttl == 30.0
    # The schedule defaults are tuned in bench/; they must match the backoff module's.
    assert Schedule.from_settings(settings) == Schedule()


def test_defaults_match_the_readme_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every default in the README's configuration table is the default load_settings gives."""
    monkeypatch.setenv("SMSBAT_API_KEY", "k")
    env = load_settings().to_env()
    rows = dict(_ROW.findall(README.read_text(encoding="utf-8")))
    assert len(rows) >= 20
    mismatched = {}
    for variable, documented in rows.items():
        actual = env.get(variable)
        try:
            same = actual is not None and float(documented) == float(actual)
        except ValueError:
            same = documented == actual
        if not same:
            mismatched[variable] = (documented, actual)
    assert mismatched == {}


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """SMSBAT_* variables and REDIS_URL are read, typed, and the base URL loses its slash."""
    monkeypatch.setenv("SMSBAT_API_KEY", "k")
    monkeypatch.setenv("SMSBAT_AUTH", "basic-key")
    monkeypatch.setenv("SMSBAT_BASE_URL", "https://api.smsbat.com/")
    monkeypatch.setenv("REDIS_URL", "redis://cache.internal:6380/2")
    monkeypatch.setenv("SMSBAT_DEADLINE", "60")
    monkeypatch.setenv("SMSBAT_HISTORY_LENGTH", "5")
    monkeypatch.setenv("SMSBAT_WEBHOOK_OPEN", "true")
    settings = load_settings()
    assert settings.base_url == "https://api.smsbat.com"
    assert settings.redis_url == "redis://cache.internal:6380/2"
    assert settings.deadline == 60.0
    assert settings.history_length == 5
    assert settings.webhook_open is True
    assert settings.auth_method == "basic-key"


def test_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keyword overrides of load_settings take precedence over environment variables."""
    monkeypatch.setenv("SMSBAT_API_KEY", "k")
    monkeypatch.setenv("SMSBAT_DEADLINE", "60")
    assert load_settings(deadline=30).deadline == 30.0


def test_dotenv_file_in_working_directory_is_read(tmp_path: Path) -> None:
    """A .env file in the working directory supplies settings."""
    (tmp_path / ".env").write_text("SMSBAT_API_KEY=from-dotenv\nSMSBAT_DEADLINE=42\n")
    settings = load_settings()
    assert settings.deadline == 42.0
    assert settings.api_key == SecretStr("from-dotenv")


def test_login_credentials_select_basic_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    """Username and password without an API key select Basic login on the wire."""
    monkeypatch.setenv("SMSBAT_USERNAME", "user")
    monkeypatch.setenv("SMSBAT_PASSWORD", "pw")
    settings = load_settings()
    assert settings.auth_method == "basic"
    assert settings.api_key is None


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SMSBAT_BASE_URL", "ftp://x"),
        ("SMSBAT_BASE_URL", "not a url"),
        ("SMSBAT_BASE_URL", "https://api.smsbat.com/?region=eu"),
        ("SMSBAT_BASE_URL", "https://api.smsbat.com/#frag"),
        ("REDIS_URL", "http://x"),
        ("REDIS_URL", "redis://:bad port"),
        ("REDIS_URL", "redis://localhost:notaport/0"),
        ("REDIS_URL", "sentinel://s1"),
        ("REDIS_URL", "sentinel://s1:26379;redis://s2:6379"),
        ("SMSBAT_SENTINEL_MASTER", "has space"),
        ("SMSBAT_SENTINEL_MASTER", ""),
        ("SMSBAT_DEADLINE", "-1"),
        ("SMSBAT_DEADLINE", "abc"),
        ("SMSBAT_DEADLINE", "0"),
        ("SMSBAT_MIN_INTERVAL", "0.5"),
        ("SMSBAT_JITTER", "1"),
        ("SMSBAT_HISTORY_LENGTH", "0"),
        ("SMSBAT_KEY_PREFIX", "has space"),
        ("SMSBAT_AUTH", "bogus"),
        ("SMSBAT_RATE_LIMIT", "-1"),
        ("SMSBAT_WEBHOOK_OPEN", "maybe"),
        ("SMSBAT_READ_TIMEOUT", "0"),
    ],
)
def test_bad_variable_is_named(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    """Each invalid variable raises ConfigError (a ValueError) whose message names it."""
    monkeypatch.setenv("SMSBAT_API_KEY", "k")
    monkeypatch.setenv(variable, value)
    message = config_error()
    assert f"{variable}: " in message
    assert issubclass(ConfigError, ValueError)


def test_a_sentinel_url_and_its_master_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """REDIS_URL takes kombu's Sentinel form (sentinels separated by ';', the master's
    password and database on each); SMSBAT_SENTINEL_MASTER names the master ("mymaster")."""
    monkeypatch.setenv("SMSBAT_API_KEY", "k")
    url = "sentinel://:pw@s1:26379/1;sentinel://:pw@s2:26380/1;sentinel://:pw@s3:26381/1"
    monkeypatch.setenv("REDIS_URL", url)
    assert load_settings().sentinel_master == "mymaster"
    monkeypatch.setenv("SMSBAT_SENTINEL_MASTER", "billing-redis")
    settings = load_settings()
    assert settings.redis_url == url
    assert settings.sentinel_master == "billing-redis"
    assert settings.to_env()["SMSBAT_SENTINEL_MASTER"] == "billing-redis"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("sentinel://s1:26379;sentinel://s2", "must name its port"),
        ("sentinel://s1:26379;sentinel://s2:0x1", "invalid sentinel port"),
        ("sentinel://s1:26379;;sentinel://s2:26379", "empty ';'-separated part"),
        ("sentinel://:pw@s1:26379;sentinel://s2:26379", "same user, password and database"),
        ("sentinel://s1:26379/1;sentinel://s2:26379", "same user, password and database"),
    ],
)
def test_a_bad_sentinel_url_is_named_with_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, value: str, reason: str
) -> None:
    """Each sentinel must name a host and its port, and every part the same password and
    database (kombu reads the part it switched to): REDIS_URL is named with the reason."""
    monkeypatch.setenv("SMSBAT_API_KEY", "k")
    monkeypatch.setenv("REDIS_URL", value)
    message = config_error()
    assert "REDIS_URL: " in message
    assert reason in message


def test_base_url_with_invalid_port_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A base URL whose port is out of range is refused at start-up, like REDIS_URL's."""
    monkeypatch.setenv("SMSBAT_API_KEY", "k")
    monkeypatch.setenv("SMSBAT_BASE_URL", "https://api.smsbat.com:99999")
    assert "SMSBAT_BASE_URL: " in config_error()


def test_first_delay_above_max_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    """SMSBAT_FIRST_DELAY > SMSBAT_MAX_DELAY is refused naming both."""
    monkeypatch.setenv("SMSBAT_API_KEY", "k")
    monkeypatch.setenv("SMSBAT_FIRST_DELAY", "30")
    monkeypatch.setenv("SMSBAT_MAX_DELAY", "20")
    message = config_error()
    assert "SMSBAT_FIRST_DELAY: " in message
    assert "SMSBAT_MAX_DELAY" in message


def test_visibility_timeout_too_small_for_max_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    """A visibility timeout under 4 x SMSBAT_MAX_DELAY is refused; exactly 4 x is accepted."""
    monkeypatch.setenv("SMSBAT_API_KEY", "k")
    monkeypatch.setenv("SMSBAT_MAX_DELAY", "1000")
    monkeypatch.setenv("SMSBAT_VISIBILITY_TIMEOUT", "3999")
    message = config_error()
    assert "SMSBAT_VISIBILITY_TIMEOUT: " in message
    assert "SMSBAT_MAX_DELAY" in message
    monkeypatch.setenv("SMSBAT_VISIBILITY_TIMEOUT", "4000")
    assert load_settings().visibility_timeout == 4000.0


def test_no_credentials_names_the_api_key() -> None:
    """Without any credentials the message names SMSBAT_API_KEY."""
    assert "SMSBAT_API_KEY: " in config_error()


def test_empty_api_key_counts_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """SMSBAT_API_KEY set to the empty string is no credential."""
    monkeypatch.setenv("SMSBAT_API_KEY", "")
    assert "SMSBAT_API_KEY: no credentials" in config_error()


def test_username_without_password_names_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half a login (username only) names the missing SMSBAT_PASSWORD."""
    monkeypatch.setenv("SMSBAT_USERNAME", "user")
    assert "SMSBAT_PASSWORD: " in config_error()


def test_password_without_username_names_the_username(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half a login (password only) names the missing SMSBAT_USERNAME."""
    monkeypatch.setenv("SMSBAT_PASSWORD", SECRET_PASSWORD)
    message = config_error()
    assert "SMSBAT_USERNAME: " in message
    assert SECRET_PASSWORD not in message


def test_key_and_login_together_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """An API key and a login at once are ambiguous and refused naming both ways."""
    monkeypatch.setenv("SMSBAT_API_KEY", SECRET_KEY)
    monkeypatch.setenv("SMSBAT_USERNAME", "user")
    monkeypatch.setenv("SMSBAT_PASSWORD", SECRET_PASSWORD)
    message = config_error()
    assert "SMSBAT_API_KEY" in message
    assert "SMSBAT_USERNAME" in message


def test_every_bad_variable_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several bad field values are all reported in one ConfigError."""
    monkeypatch.setenv("SMSBAT_API_KEY", "k")
    monkeypatch.setenv("SMSBAT_DEADLINE", "abc")
    monkeypatch.setenv("REDIS_URL", "http://x")
    monkeypatch.setenv("SMSBAT_AUTH", "bogus")
    message = config_error()
    for name in ("SMSBAT_DEADLINE: ", "REDIS_URL: ", "SMSBAT_AUTH: "):
        assert name in message


@pytest.mark.parametrize(
    "env",
    [
        {"SMSBAT_API_KEY": SECRET_KEY, "SMSBAT_DEADLINE": "abc"},
        {"SMSBAT_API_KEY": SECRET_KEY, "SMSBAT_BASE_URL": f"ftp://{SECRET_KEY}"},
        {"SMSBAT_API_KEY": SECRET_KEY, "SMSBAT_USERNAME": "u", "SMSBAT_PASSWORD": SECRET_PASSWORD},
        {"SMSBAT_PASSWORD": SECRET_PASSWORD},
        {"SMSBAT_API_KEY": SECRET_KEY, "SMSBAT_WEBHOOK_TOKEN": SECRET_TOKEN, "SMSBAT_JITTER": "2"},
        {"SMSBAT_API_KEY": SECRET_KEY, "REDIS_URL": f"http://:{SECRET_PASSWORD}@x"},
        {"REDIS_URL": f"sentinel://:{SECRET_PASSWORD}@s1:26379;sentinel://s2:26379"},
        {"REDIS_URL": f"sentinel://:{SECRET_PASSWORD}@s1:26379/x"},
    ],
)
def test_secret_values_never_appear_in_config_errors(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    """Neither str, repr nor the printed traceback of ConfigError carries a secret value."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    printed = "".join(traceback.format_exception(info.value))
    for text in (str(info.value), repr(info.value), printed):
        for secret in (SECRET_KEY, SECRET_PASSWORD, SECRET_TOKEN):
            assert secret not in text
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_secret_fields_are_hidden_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    """repr() and str() of Settings mask the API key, password and webhook token."""
    monkeypatch.setenv("SMSBAT_USERNAME", "user")
    monkeypatch.setenv("SMSBAT_PASSWORD", SECRET_PASSWORD)
    monkeypatch.setenv("SMSBAT_WEBHOOK_TOKEN", SECRET_TOKEN)
    login = load_settings()
    keyed = load_settings(username=None, password=None, api_key=SECRET_KEY)
    for settings in (login, keyed):
        for text in (repr(settings), str(settings)):
            assert "base_url=" in text
            for secret in (SECRET_KEY, SECRET_PASSWORD, SECRET_TOKEN):
                assert secret not in text
    assert isinstance(keyed.api_key, SecretStr)
    assert keyed.api_key.get_secret_value() == SECRET_KEY


def test_settings_are_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings cannot be changed after loading."""
    monkeypatch.setenv("SMSBAT_API_KEY", "k")
    settings = load_settings()
    with pytest.raises(ValidationError):
        settings.deadline = 1.0  # type: ignore[misc]


def test_to_env_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings.to_env() yields variables that load back into equal settings."""
    original = load_settings(
        api_key=SECRET_KEY,
        auth="basic-key",
        redis_url="redis://h:6380/3",
        deadline=33.5,
        webhook_token=SECRET_TOKEN,
        webhook_open=True,
        history_length=7,
    )
    env = original.to_env()
    assert env["REDIS_URL"] == "redis://h:6380/3"
    assert env["SMSBAT_API_KEY"] == SECRET_KEY
    assert env["SMSBAT_WEBHOOK_OPEN"] == "true"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert load_settings() == original
    assert isinstance(load_settings(), Settings)
