"""The ``smsbat-tracker`` command, run in-process against a real worker and the sandbox."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from smsbat_tracker.cli import main
from smsbat_tracker.config import load_settings
from smsbat_tracker.redis_url import safe_redis_url
from smsbat_tracker.tools.sandbox import SandboxServer


def test_campaign_start_shows_progress_and_prints_the_report(
    worker: Any, sandbox: SandboxServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`campaign start` tracks ids from a file, shows a progress bar, prints the report."""
    ids = [
        sandbox.state.create_scripted([("processing", 0), (final, 0.3)])
        for final in ("delivered", "delivered", "undeliverable")
    ]
    path = tmp_path / "ids.txt"
    path.write_text("# campaign ids\n" + "\n".join(ids) + "\n")
    assert main(["campaign", "start", "cli-run", str(path), "--deadline", "5"]) == 0
    out, err = capsys.readouterr()
    assert "campaign cli-run" in out
    assert "delivered" in out
    assert "66.7 %" in out
    assert "3/3" in err  # tqdm's bar reached the total

    assert main(["campaign", "report", "cli-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outcomes"]["delivered"] == 2
    assert report["outcomes"]["undeliverable"] == 1
    assert report["failed_ids"] == [ids[2]]
    assert report["timeout_ids"] == []

    assert main(["campaign", "report", "cli-run", "--failed"]) == 0
    out = capsys.readouterr().out
    assert f"failed (1):\n  {ids[2]}\n" in out
    assert "timed out (0):" in out


def test_progress_off_a_terminal_is_a_line_every_tenth(
    worker: Any, sandbox: SandboxServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With stderr not a terminal (a log file), `campaign start` writes no bar redraws:
    one line each time another tenth of the messages has its outcome."""
    ids = [sandbox.state.create_scripted([("delivered", 0.2)]) for _ in range(20)]
    path = tmp_path / "ids.txt"
    path.write_text("\n".join(ids) + "\n")
    assert main(["campaign", "start", "cli-lines", str(path), "--deadline", "5"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("final: ")]
    assert lines[-1] == "final: 20/20 (100 %)"
    assert 1 <= len(lines) <= 10


def test_redis_out_of_reach_is_one_line(
    settings: Any,
    sandbox: SandboxServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With Redis down, `campaign report` prints one line naming where Redis was looked
    for (without its password), never a traceback; `status` says so in one line and asks
    the API itself."""
    from bench.workload import free_port

    monkeypatch.chdir(tmp_path)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("REDIS_URL", f"redis://:pw-cli-secret@127.0.0.1:{free_port()}/0")
    from smsbat_tracker.worker import app

    mid = sandbox.state.create_scripted([("delivered", 0)])
    app.reconfigure(load_settings())
    try:
        assert main(["campaign", "report", "abc"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert "cannot reach Redis at redis://127.0.0.1:" in err
        assert "pw-cli-secret" not in err
        assert main(["status", mid]) == 0
        out, err = capsys.readouterr()
        assert err.count("\n") == 1, err
        assert "cannot reach Redis at redis://127.0.0.1:" in err
        assert "asked the API directly" in err
        assert "pw-cli-secret" not in err
        assert json.loads(out)["deliverystatus"] == "delivered"
        assert sandbox.state.truth(mid)["polls"] == 1
    finally:
        app.close_engine()


def test_starting_a_campaign_again_says_it_was_not_started_again(
    worker: Any, sandbox: SandboxServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A campaign id is tracked once: `campaign start` on a finished one says so, with its
    own count, enqueues nothing and prints the report it has."""
    ids = [sandbox.state.create_scripted([("delivered", 0)]) for _ in range(3)]
    path = tmp_path / "ids.txt"
    path.write_text("\n".join(ids) + "\n")
    assert main(["campaign", "start", "cli-again", str(path), "--deadline", "5"]) == 0
    capsys.readouterr()
    path.write_text("\n".join([*ids, sandbox.state.create_scripted([("delivered", 0)])]) + "\n")
    assert main(["campaign", "start", "cli-again", str(path), "--deadline", "5"]) == 0
    out, err = capsys.readouterr()
    assert (
        "campaign cli-again: started before, with 3 messages (finished); not started again" in err
    )
    assert "tracking 4" not in err
    assert "campaign cli-again" in out
    assert "100.0 %" in out


def test_check_config_names_every_bad_variable_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad value, a bad combination and, for a worker, missing credentials: all in one
    line."""
    monkeypatch.chdir(tmp_path)
    for name in ("SMSBAT_API_KEY", "SMSBAT_USERNAME", "SMSBAT_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SMSBAT_DEADLINE", "soon")
    monkeypatch.setenv("SMSBAT_FIRST_DELAY", "30")
    assert main(["check-config", "--worker"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    for name in ("SMSBAT_DEADLINE:", "SMSBAT_FIRST_DELAY:", "SMSBAT_API_KEY:"):
        assert name in err


def test_check_config_without_credentials_is_enough_to_enqueue(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Code that only enqueues needs no API key: check-config exits 0 and notes what a
    worker would need; --worker refuses the same settings, naming the variable."""
    monkeypatch.chdir(tmp_path)
    for name in ("SMSBAT_API_KEY", "SMSBAT_USERNAME", "SMSBAT_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    assert main(["check-config"]) == 0
    assert "a worker needs SMSBAT_API_KEY" in capsys.readouterr().err
    assert main(["check-config", "--worker"]) == 2
    assert "SMSBAT_API_KEY" in capsys.readouterr().err


def test_a_sentinel_url_is_named_without_any_password() -> None:
    """Every sentinel of a ';'-separated REDIS_URL is named, none with its password; a
    ';' inside a redis:// password splits nothing."""
    url = "sentinel://:pw-a@s1:26379/0;sentinel://user:pw-b@s2:26380/0;sentinel://s3:26381/0"
    assert safe_redis_url(url) == (
        "sentinel://s1:26379/0;sentinel://s2:26380/0;sentinel://s3:26381/0"
    )
    assert safe_redis_url("redis://:p;w@h:6379/0") == "redis://h:6379/0"


def test_check_config_ping_reaches_redis_and_the_api(
    settings: Any,
    sandbox: SandboxServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--ping reaches Redis and asks the API with the credentials: ok with the right
    key; a refused key (or Redis out of reach) says so and exits 1."""
    monkeypatch.chdir(tmp_path)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    assert main(["check-config", "--ping"]) == 0
    out = capsys.readouterr().out
    assert "redis: ok" in out
    assert "api: ok, credentials accepted" in out
    monkeypatch.setenv("SMSBAT_API_KEY", "wrong-key-cli")
    assert main(["check-config", "--ping"]) == 1
    err = capsys.readouterr().err
    assert "api: credentials refused" in err
    assert "wrong-key-cli" not in err


def test_webhook_usage_names_the_command_and_port_8000(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`smsbat-tracker webhook --help` shows how it is run here, on the README's port."""
    with pytest.raises(SystemExit) as exc:
        main(["webhook", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: smsbat-tracker webhook")
    assert "(default 8000)" in out


def test_sandbox_usage_names_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`smsbat-tracker sandbox --help` shows the command it was run as, not the module."""
    assert main(["sandbox", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: smsbat-tracker sandbox")


def test_campaign_refuses_a_hostile_id_in_the_file(
    tracker_app: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad id in the file stops the command before anything is enqueued."""
    path = tmp_path / "ids.txt"
    path.write_text("abc123\n../etc/passwd\n")
    assert main(["campaign", "start", "bad", str(path), "--no-wait"]) == 1
    assert "InvalidMessageId" in capsys.readouterr().err
    assert tracker_app.engine.redis.llen("celery") == 0


def test_unknown_campaign_report(tracker_app: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Asking for a campaign nobody started says so and exits 1."""
    assert main(["campaign", "report", "nope"]) == 1
    assert "no campaign" in capsys.readouterr().err


def test_status_reads_through_the_cache(
    tracker_app: Any, sandbox: SandboxServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status <id>` prints the body and history; a second call makes no request."""
    mid = sandbox.state.create_scripted([("delivered", 0)])
    assert main(["status", mid]) == 0
    assert main(["status", mid]) == 0
    out = capsys.readouterr().out
    assert '"deliverystatus": "delivered"' in out
    assert sandbox.state.truth(mid)["polls"] == 1


def test_check_config_hides_secrets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config prints every setting, by the variable that sets it, but never the API
    key or the Redis password."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SMSBAT_API_KEY", "sk_live_cli_marker")
    monkeypatch.setenv("REDIS_URL", "redis://:redis_pw_marker@cache:6379/1")
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert "SMSBAT_BASE_URL = https://restapi.smsbat.com" in out
    assert "REDIS_URL = redis://cache:6379/1" in out
    assert "sk_live_cli_marker" not in out
    assert "redis_pw_marker" not in out


def test_bad_settings_exit_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invalid settings stop the command with one line naming the variable."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SMSBAT_DEADLINE", "soon")
    assert main(["check-config"]) == 2
    err = capsys.readouterr().err
    assert "SMSBAT_DEADLINE" in err
    assert "Traceback" not in err


def test_subcommand_help_exits_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    """--help of the command and of the demo exit 0 with usage text."""
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert "--count" in capsys.readouterr().out


def test_campaign_start_gives_up_past_the_deadline_and_the_redrive_bound(
    tracker_app: Any,
    sandbox: SandboxServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no worker running, `campaign start` never waits forever: it says what is
    missing and exits 1 once the deadline and the re-drive bound have passed."""
    import time

    from smsbat_tracker import cli

    bounds: list[float] = []
    original = cli.campaign_give_up

    def give_up(settings: Any, meta: dict[str, str]) -> float:
        bounds.append(original(settings, meta))  # the real bound, checked below
        return time.time() + 0.5  # but not waited for

    monkeypatch.setattr(cli, "campaign_give_up", give_up)
    ids = [sandbox.state.create_scripted([("processing", 0)]) for _ in range(2)]
    path = tmp_path / "ids.txt"
    path.write_text("\n".join(ids) + "\n")
    assert main(["campaign", "start", "cli-stuck", str(path), "--deadline", "5"]) == 1
    err = capsys.readouterr().err
    assert "2 of 2 messages have no outcome" in err
    assert "workers running" in err
    settings = tracker_app.settings
    meta_deadline = float(tracker_app.campaigns.meta("cli-stuck")["deadline_at"])
    assert bounds[0] == pytest.approx(
        meta_deadline
        + settings.max_delay
        + settings.min_interval
        + settings.redrive_after
        + 1.0
        + 15.0
    )


def test_a_cost_without_a_currency_is_shown_as_such() -> None:
    """The basic status body has a cost but no currency: the report prints the amount as
    plain "cost" and says the API gave no currency, instead of a "(unknown)" currency."""
    import io

    from smsbat_tracker.cli import print_report

    report = {
        "campaign_id": "c1",
        "outcomes": {"delivered": 2},
        "total": 2,
        "pending": 0,
        "delivery_rate": 1.0,
        "time_to_final_p50": 1.0,
        "time_to_final_p95": 2.0,
        "fallback": {"extended": 0, "used": 0},
        "cost": {"unknown": 1.45, "USD": 0.1},
    }
    out = io.StringIO()
    print_report(report, out)
    lines = out.getvalue().splitlines()
    assert any(line.split() == ["cost", "1.4500"] for line in lines)
    assert any(line.split() == ["cost", "(USD)", "0.1000"] for line in lines)
    assert any("cost currency" in line and "not given by the API" in line for line in lines)
    assert "unknown" not in out.getvalue()
