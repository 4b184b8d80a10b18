"""The deployment files: docker-compose.yml, Procfile and the README's commands.

There is no Docker engine where the tests run, so the compose file is parsed and its
services and commands checked against what the package really provides.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def test_compose_has_the_services(compose: dict[str, Any]) -> None:
    """redis, worker, flower and web always; the sandbox only in its profile."""
    services = compose["services"]
    assert {"redis", "worker", "flower", "web", "sandbox"} <= set(services)
    assert services["sandbox"]["profiles"] == ["sandbox"]
    for name in ("redis", "worker", "flower", "web"):
        assert "profiles" not in services[name]


def test_redis_keeps_tasks(compose: dict[str, Any]) -> None:
    """The broker runs with an append-only file and never evicts keys."""
    command = _command(compose["services"]["redis"])
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.endswith(":/data") for v in compose["services"]["redis"]["volumes"])


def test_the_worker_and_the_receiver_have_health_checks(compose: dict[str, Any]) -> None:
    """Compose checks the worker with ``smsbat-tracker health`` (its /healthz on the metrics
    port the service sets) and the receiver with its own /healthz, each within its
    timeout."""
    services = compose["services"]
    worker, web = services["worker"]["healthcheck"], services["web"]["healthcheck"]
    assert worker["test"] == ["CMD", "smsbat-tracker", "health"]
    assert services["worker"]["environment"]["SMSBAT_METRICS_PORT"]
    assert "http://127.0.0.1:8000/healthz" in " ".join(web["test"])
    for check in (worker, web):
        assert int(check["timeout"].rstrip("s")) > 5  # the command answers within 5 s


def test_worker_and_flower_run_the_package_app(compose: dict[str, Any]) -> None:
    """Worker and Flower start the Celery app this package defines, on the compose Redis."""
    services = compose["services"]
    worker, flower = _command(services["worker"]), _command(services["flower"])
    assert worker[:4] == ["celery", "-A", "smsbat_tracker.worker", "worker"]
    assert flower[:4] == ["celery", "-A", "smsbat_tracker.worker", "flower"]
    assert "--port=5555" in flower
    assert "5555:5555" in services["flower"]["ports"]
    for name in ("worker", "flower"):
        assert services[name]["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_web_service_serves_the_webhook_app(compose: dict[str, Any]) -> None:
    """The web service runs uvicorn on the webhook app that the package exports."""
    command = _command(compose["services"]["web"])
    assert command[:2] == ["uvicorn", "smsbat_tracker.webhook:app"]
    assert "8000:8000" in compose["services"]["web"]["ports"]

    from smsbat_tracker.webhook import LazyWebhookApp, app

    assert isinstance(app, LazyWebhookApp)  # an ASGI app that builds itself at start-up


def test_sandbox_service_runs_the_sandbox_module(compose: dict[str, Any]) -> None:
    """The optional sandbox service runs the module that exists and listens on all hosts."""
    command = _command(compose["services"]["sandbox"])
    assert command[:3] == ["python", "-m", "smsbat_tracker.tools.sandbox"]
    assert command[command.index("--host") + 1] == "0.0.0.0"

    from smsbat_tracker.tools.sandbox import main

    assert main(["--help"]) == 0  # the module runs and knows its options


def test_procfile_lines() -> None:
    """The Procfile has worker, flower and web processes running the package's apps."""
    lines = dict(
        line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line
    )
    assert {"worker", "flower", "web"} <= set(lines)
    assert lines["web"].split()[:2] == ["uvicorn", "smsbat_tracker.webhook:app"]
    assert lines["worker"].split()[:4] == ["celery", "-A", "smsbat_tracker.worker", "worker"]
    assert lines["flower"].split()[:4] == ["celery", "-A", "smsbat_tracker.worker", "flower"]


def test_readme_commands_exist() -> None:
    """The README's two commands are Makefile targets, and CI runs the test one."""
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "make demo" in readme
    assert "make test" in readme
    targets = set(re.findall(r"^([a-z-]+):", makefile, flags=re.MULTILINE))
    assert {"demo", "test", "lint", "types", "check"} <= targets
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make check" in ci
    assert re.search(r"^check: .*\btest\b", makefile, flags=re.MULTILINE)


def test_readme_documents_every_setting() -> None:
    """Every settings field has its environment variable in the README's table."""
    from smsbat_tracker.config import Settings

    readme = (ROOT / "README.md").read_text()
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias if isinstance(info.validation_alias, str) else None
        env = alias or f"SMSBAT_{name.upper()}"
        assert f"`{env}`" in readme, env


def test_flower_needs_a_login(compose: dict[str, Any]) -> None:
    """Flower is published with a login from FLOWER_BASIC_AUTH, required (compose's
    ``:?``): never open on :5555, and its API works with the same login."""
    flower = compose["services"]["flower"]
    auth = flower["environment"]["FLOWER_BASIC_AUTH"]
    assert auth.startswith("${FLOWER_BASIC_AUTH:?")
    assert flower["environment"]["REDIS_URL"] == "redis://redis:6379/0"


def test_the_monitoring_profile_scrapes_the_workers_and_the_receiver(
    compose: dict[str, Any],
) -> None:
    """Profile "monitoring": Prometheus scrapes every worker on its SMSBAT_METRICS_PORT and
    the receiver's /metrics; Grafana is provisioned with it and needs an admin password."""
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    port = services["worker"]["environment"]["SMSBAT_METRICS_PORT"]
    web_port = _command(services["web"])[-1]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    [worker_sd] = jobs["smsbat-worker"]["dns_sd_configs"]
    assert worker_sd["names"] == ["worker"]
    assert str(worker_sd["port"]) == port
    assert jobs["smsbat-webhook"]["static_configs"][0]["targets"] == [f"web:{web_port}"]
    assert jobs["smsbat-webhook"]["metrics_path"] == "/metrics"
    mounts = services["prometheus"]["volumes"] + services["grafana"]["volumes"]
    for mount in mounts:
        assert (ROOT / mount.split(":")[0]).exists(), mount
    password = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert password.startswith("${GRAFANA_ADMIN_PASSWORD:?")


def test_the_dashboard_queries_only_metrics_the_tracker_exports() -> None:
    """Every panel's query names metrics from smsbat_tracker.metrics.METRICS, every metric
    is on some panel, and the panels use the provisioned datasource."""
    import json

    from smsbat_tracker.metrics import METRICS

    dashboard = json.loads(
        (ROOT / "deploy" / "grafana" / "dashboards" / "smsbat-tracker.json").read_text()
    )
    datasources = yaml.safe_load(
        (
            ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
        ).read_text()
    )
    [source] = datasources["datasources"]
    used: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"]
        for target in panel["targets"]:
            for name in re.findall(r"\bsmsbat_[a-z_]+", target["expr"]):
                base = re.sub(r"_(total|bucket|sum|count)$", "", name)
                assert base in METRICS, name
                used.add(base)
    assert used == set(METRICS)
