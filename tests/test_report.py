"""A campaign's delivery report page: its figures, its HTML, the CLI's file, the receiver's
authenticated route, and the page in a real browser (Debian's headless Chromium)."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from structlog.testing import capture_logs

from smsbat_tracker.celery.campaigns import get_campaign_report, track_campaign
from smsbat_tracker.cli import main
from smsbat_tracker.config import Settings
from smsbat_tracker.engine.campaign.report import build_report
from smsbat_tracker.errors import InvalidMessageId, MissingExtra
from smsbat_tracker.report import campaign_page, render
from smsbat_tracker.report.figures import OUTCOMES, figures_of
from smsbat_tracker.report.page import CONTENT_SECURITY_POLICY
from smsbat_tracker.tools.recipes import record_outcome
from smsbat_tracker.tools.sandbox import SandboxServer
from smsbat_tracker.tools.serving import BackgroundServer
from smsbat_tracker.webhook import create_app
from tests.conftest import recorded, wait_for

PASSWORD = "report-pw-5f1e"
TOKEN = "hook-token-77a"
LOGIN = ("report", PASSWORD)
ROOT = Path(__file__).resolve().parent.parent
# Where the browser test keeps its screenshots (ignored by git; the README's copy is docs/).
ARTIFACTS = Path(os.environ.get("SMSBAT_TEST_ARTIFACTS", ROOT / "test-artifacts"))


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """The tests' settings with a webhook token and the campaign pages' password."""
    return make_settings(webhook_token=TOKEN, report_password=PASSWORD)


# --- the page from records (no Redis) -------------------------------------------------


def synthetic(n: int, seed: int = 1) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """A finished campaign's report and records: most delivered, a tail of failures."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        roll = rng.random()
        outcome = (
            "delivered"
            if roll < 0.85
            else "undeliverable"
            if roll < 0.92
            else "permanenterror"
            if roll < 0.95
            else "timeout"
        )
        record: dict[str, Any] = {"o": outcome, "t": round(rng.lognormvariate(1.4, 0.8), 2)}
        record["s"] = outcome if outcome != "timeout" else "processing"
        if outcome == "delivered":
            record.update(c=0.05, cur="USD" if i % 3 else "unknown")
            if i % 5 == 0:
                record.update(x=1, fb=int(i % 10 == 0))
        records.append((f"m{i:05d}", json.dumps(record)))
    now = time.time()
    meta = {"total": str(n), "state": "finished", "started_at": str(now - 300)}
    return build_report("spring", meta, records), records


class Values(HTMLParser):
    """Every ``data-value`` of a page by element id; the ``img`` tags; the table rows."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, Any] = {}
        self.images: list[dict[str, str | None]] = []
        self.tags: set[str] = set()
        self.rows: list[str] = []
        self._row: list[str] | None = None
        self._code = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        found = dict(attrs)
        if "data-value" in found and found.get("id"):
            self.values[str(found["id"])] = json.loads(str(found["data-value"]))
        if tag == "img":
            self.images.append(found)
        if tag == "tr" and "data-outcome" in found:
            self._row = []
        self._code = tag == "code" and self._row is not None

    def handle_data(self, data: str) -> None:
        if self._code and self._row is not None:
            self.rows.append(data)
            self._row = None

    def handle_endtag(self, tag: str) -> None:
        self._code = False


def parsed(page: str) -> Values:
    values = Values()
    values.feed(page)
    return values


def expected_values(report: dict[str, Any]) -> dict[str, Any]:
    """What each id on the page must hold: the report's own values."""
    out: dict[str, Any] = {
        "campaign-id": report["campaign_id"],
        "delivery-rate": report["delivery_rate"],
        "delivered": report["outcomes"]["delivered"],
        "total": report["total"],
        "pending": report["pending"],
        "p50": report["time_to_final_p50"],
        "p95": report["time_to_final_p95"],
        "fallback-used": report["fallback"]["used"],
        "fallback-extended": report["fallback"]["extended"],
    }
    out.update({f"count-{o}": report["outcomes"][o] for o in OUTCOMES})
    out.update({f"cost-{c}": amount for c, amount in report["cost"].items()})
    return out


def test_figures_sort_times_and_list_what_was_not_delivered_failed_first() -> None:
    """The curve's times are sorted; the table lists every message not delivered, the
    failed ones before the timed-out ones (the report's order), each with its last status;
    messages with a cost are counted per currency."""
    report, records = synthetic(400)
    figures = figures_of(reversed(records))
    assert figures.delivered_times == sorted(figures.delivered_times)
    assert len(figures.delivered_times) == report["outcomes"]["delivered"]
    ids = [row.message_id for row in figures.not_delivered]
    assert ids == report["failed_ids"] + report["timeout_ids"]
    assert {row.last_status for row in figures.not_delivered if row.outcome == "timeout"} == {
        "processing"
    }
    assert sum(figures.billed.values()) == report["outcomes"]["delivered"]
    assert set(figures.billed) == set(report["cost"])


def test_an_unreadable_record_names_its_message() -> None:
    """A record that is not the compact JSON fails with the message's id, not a KeyError."""
    with pytest.raises(ValueError, match="'m-bad'"):
        figures_of([("m-ok", '{"o":"delivered","t":1}'), ("m-bad", '{"t":1}')])


def test_the_page_holds_the_report_numbers_exactly() -> None:
    """Every figure on the page carries the report's own value (``data-value``), the table
    lists the failed then the timed-out ids, and the three charts are SVG images."""
    report, records = synthetic(1000)
    page = parsed(render(report, records))
    for element_id, value in expected_values(report).items():
        assert page.values[element_id] == value, element_id
    assert page.rows == report["failed_ids"] + report["timeout_ids"]
    charts = {str(img["id"]): str(img["src"]) for img in page.images}
    assert set(charts) == {"chart-outcomes", "chart-delivered", "chart-time-to-final"}
    for src in charts.values():
        prefix = "data:image/svg+xml;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src.removeprefix(prefix)).lstrip().startswith(b"<?xml")


def test_the_page_needs_no_network_and_runs_no_script() -> None:
    """Self-contained: no script, no link, and every image is a data URI; the page's own
    policy forbids loading anything else."""
    report, records = synthetic(50)
    text = render(report, records)
    page = parsed(text)
    assert "script" not in page.tags
    assert "link" not in page.tags
    assert all(str(img["src"]).startswith("data:") for img in page.images)
    assert "default-src 'none'; img-src data:" in text


def test_ids_and_statuses_are_escaped() -> None:
    """Whatever a record holds is shown as text, never as markup."""
    record = json.dumps({"o": "undeliverable", "t": 1, "s": "<b>x</b>"})
    meta = {"total": "1", "state": "finished"}
    report = build_report("esc", meta, [("m<i>1", record)])
    text = render(report, [("m<i>1", record)])
    assert "<b>x</b>" not in text
    assert "&lt;b&gt;x&lt;/b&gt;" in text
    assert "m&lt;i&gt;1" in text


def test_a_report_that_outlived_its_records_still_lists_every_id() -> None:
    """Records expire with the campaign; a report read back later may outlive some: the
    table still lists every failed and timed-out id (the report's), and a line says the
    charts stand on fewer records."""
    report, records = synthetic(300)
    page = parsed(render(report, records[:100]))
    assert page.rows == report["failed_ids"] + report["timeout_ids"]
    assert "records-note" not in page.values
    text = render(report, records[:100])
    assert 'id="records-note"' in text
    assert "100 of the 300 messages" in text
    assert 'id="records-note"' not in render(report, records)


def test_without_matplotlib_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the ``report`` extra the page is refused with the install command."""
    report, records = synthetic(5)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtra, match=r"pip install 'smsbat-tracker\[report\]'"):
        render(report, records)


# --- a real campaign: the CLI's file and the receiver's route ------------------------


def run_campaign(
    sandbox: SandboxServer, client: redis.Redis, campaign_id: str, n: int, *, deadline: float
) -> dict[str, Any]:
    """Track ``n`` sandbox messages (a realistic mix: most delivered within a few seconds,
    some failed, Viber fallbacks with a billed amount, a few never final) as a campaign;
    wait for its report."""
    rng = random.Random(n)
    ids = []
    for i in range(n):
        roll = rng.random()
        at = round(min(rng.lognormvariate(0.3, 0.8), deadline - 1.5), 2)
        if roll < 0.03:
            ids.append(sandbox.state.create_scripted([("processing", 0)]))  # times out
            continue
        final = "delivered" if roll < 0.88 else "undeliverable" if roll < 0.96 else "permanenterror"
        viber = i % 4 == 0
        extended = (
            {"fallback": i % 8 == 0, "billAmount": 0.04, "billCurrency": "EUR"} if viber else None
        )
        ids.append(
            sandbox.state.create_scripted(
                [("processing", at / 2), (final, at)], cost=0.05, extended=extended
            )
        )
    track_campaign.delay(
        campaign_id, ids, deadline=deadline, on_report=record_outcome.s(label=campaign_id)
    )
    wait_for(lambda: recorded(client, campaign_id), timeout=deadline + 60)
    report = get_campaign_report(campaign_id)
    assert report is not None
    assert report["finished"]
    return report


@pytest.fixture
def small_campaign(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> dict[str, Any]:
    """A finished campaign of 40 messages."""
    return run_campaign(sandbox, redis_client, "small", 40, deadline=4)


def test_the_cli_writes_the_page_of_the_report(
    small_campaign: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``campaign report ID --html PATH`` writes the page whole, and its numbers are the
    report's; nothing else is left beside it."""
    target = tmp_path / "report.html"
    assert main(["campaign", "report", "small", "--html", str(target)]) == 0
    assert f"report written to {target}" in capsys.readouterr().out
    page = parsed(target.read_text(encoding="utf-8"))
    for element_id, value in expected_values(small_campaign).items():
        assert page.values[element_id] == value, element_id
    assert sorted(page.rows) == sorted(small_campaign["failed_ids"] + small_campaign["timeout_ids"])
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_campaign_page_gives_the_page_through_an_app(
    small_campaign: dict[str, Any], tracker_app: Any
) -> None:
    """``campaign_page`` (for a project's own views) gives the same figures through the
    app's tracker; None for an unknown campaign; a bad id is refused by name."""
    page = campaign_page("small", app=tracker_app)
    assert page is not None
    values = parsed(page).values
    for element_id, value in expected_values(small_campaign).items():
        assert values[element_id] == value, element_id
    assert campaign_page("nope", app=tracker_app) is None
    with pytest.raises(InvalidMessageId, match="campaign id"):
        campaign_page("../x", app=tracker_app)


def test_the_cli_writes_nothing_for_an_unknown_campaign(
    tracker_app: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No campaign, no file: exit 1 with one line."""
    target = tmp_path / "report.html"
    assert main(["campaign", "report", "nope", "--html", str(target)]) == 1
    assert "no campaign 'nope'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_the_receiver_serves_the_page_only_with_the_login(
    small_campaign: dict[str, Any], settings: Settings
) -> None:
    """Anonymous, a wrong login, a wrong user, another scheme, the webhook's token, or the
    login twice: the same 401 whatever the id, known or not, so nothing says which
    campaigns exist; no route lists them. With the login: the page, with its policy and
    no caching; an unknown campaign is 404, an id that is not one is 400. No log line
    shows the password."""
    with capture_logs() as logs, BackgroundServer(create_app(settings)) as server:
        url = f"{server.url}/campaigns"
        with httpx.Client(timeout=30) as http:
            refused = [
                http.get(f"{url}/{campaign}", headers=headers)
                for campaign in ("small", "nope")
                for headers in (
                    {},
                    basic("report", "wrong"),
                    basic("someone", PASSWORD),
                    {"Authorization": f"Bearer {PASSWORD}"},
                    {"X-Webhook-Token": TOKEN},
                )
            ]
            refused.append(
                http.get(
                    f"{url}/small",
                    headers=[("Authorization", basic(*LOGIN)["Authorization"])] * 2,
                )
            )
            refused.append(http.get(f"{url}/small", params={"token": TOKEN}))
            ok = http.get(f"{url}/small", headers=basic(*LOGIN))
            unknown = http.get(f"{url}/nope", headers=basic(*LOGIN))
            listing = [http.get(path, headers=basic(*LOGIN)) for path in (url, f"{url}/")]
            bad = http.get(f"{url}/a%20b", headers=basic(*LOGIN))
    for answer in refused:
        assert answer.status_code == 401, answer.request.headers
        assert answer.json() == {"error": "unauthorized"}
        assert answer.headers["www-authenticate"].startswith("Basic realm=")
    assert ok.status_code == 200
    assert ok.headers["content-type"].startswith("text/html")
    assert ok.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert ok.headers["cache-control"] == "no-store"
    page = parsed(ok.text)
    for element_id, value in expected_values(small_campaign).items():
        assert page.values[element_id] == value, element_id
    assert unknown.status_code == 404
    assert [answer.status_code for answer in listing] == [404, 404]
    assert bad.status_code == 400
    assert bad.json()["field"] == "campaign_id"
    assert PASSWORD not in json.dumps(logs, default=str)
    assert any(e["event"] == "report.page" and e["campaign_id"] == "small" for e in logs)


def test_the_pages_are_off_without_a_password(
    small_campaign: dict[str, Any], make_settings: Callable[..., Settings]
) -> None:
    """No ``SMSBAT_REPORT_PASSWORD``: 404 for everyone, even with a Basic login or the
    webhook's token (a receiver with its own engine, not the tracker's)."""
    settings = make_settings(webhook_token=TOKEN)
    with BackgroundServer(create_app(settings)) as server, httpx.Client(timeout=10) as http:
        answers = [
            http.get(f"{server.url}/campaigns/small", headers=headers, params=params)
            for headers, params in (({}, {}), (basic("report", ""), {}), ({}, {"token": TOKEN}))
        ]
    assert [a.status_code for a in answers] == [404, 404, 404]


def test_a_receiver_with_its_own_engine_serves_the_same_page(
    small_campaign: dict[str, Any], make_settings: Callable[..., Settings]
) -> None:
    """Settings other than the tracker's: the receiver reads through an engine of its own,
    and the page is the same campaign's."""
    settings = make_settings(webhook_token=TOKEN, report_password=PASSWORD)
    with BackgroundServer(create_app(settings)) as server, httpx.Client(timeout=30) as http:
        answer = http.get(f"{server.url}/campaigns/small", headers=basic(*LOGIN))
    assert answer.status_code == 200
    assert parsed(answer.text).values["total"] == small_campaign["total"]


# --- the page in a real browser ------------------------------------------------------

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # No background connections: the machine's network is closed, and the page needs none.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1100,1900",
)


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Any]:
    """Debian's Chromium, headless, driven through its chromedriver (selenium)."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip(
            "needs Debian's chromium and chromium-driver (apt-get install chromium "
            "chromium-driver; .ci/run installs them)"
        )
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))
    try:
        yield browser
    finally:
        browser.quit()


# Each chart: loaded, decoded, and laid out with a size.
CHART_SIZES = """
return Array.from(document.querySelectorAll('img.chart')).map(img => {
  const box = img.getBoundingClientRect();
  return {id: img.id, complete: img.complete, natural: img.naturalWidth,
          width: box.width, height: box.height};
});
"""
# Every figure's value, and the ids in the table of messages not delivered.
PAGE_FIGURES = """
const values = {};
for (const el of document.querySelectorAll('[data-value]')) {
  values[el.id] = JSON.parse(el.dataset.value);
}
const rows = Array.from(document.querySelectorAll('#not-delivered tbody code'))
  .map(code => code.textContent);
return {values: values, rows: rows};
"""


def check_in_browser(browser: Any, report: dict[str, Any]) -> None:
    """The charts rendered with a size, and the numbers are the report's."""
    charts = browser.execute_script(CHART_SIZES)
    assert {c["id"] for c in charts} == {"chart-outcomes", "chart-delivered", "chart-time-to-final"}
    for chart in charts:
        assert chart["complete"], chart
        assert chart["natural"] > 0, chart
        assert chart["width"] > 100, chart
        assert chart["height"] > 50, chart
    shown = browser.execute_script(PAGE_FIGURES)
    for element_id, value in expected_values(report).items():
        assert shown["values"][element_id] == value, element_id
    assert shown["rows"] == report["failed_ids"] + report["timeout_ids"]


def screenshot(browser: Any, name: str, height: int | None = None) -> Path:
    """The page as a PNG in the artifacts folder: whole, or its top ``height`` pixels."""
    whole = int(browser.execute_script("return document.documentElement.scrollHeight"))
    shot = browser.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {
                "x": 0,
                "y": 0,
                "width": 1100,
                "height": min(height or whole, whole),
                "scale": 1,
            },
        },
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.read_bytes().startswith(b"\x89PNG")
    return path


@pytest.mark.slow
def test_a_1000_message_campaign_page_in_chromium(
    worker: Any,
    sandbox: SandboxServer,
    redis_client: redis.Redis,
    settings: Settings,
    chromium: Any,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """A campaign of 1,000 sandbox messages: the receiver's page, opened in Chromium with
    the login, shows charts that rendered with a size and exactly the numbers of
    ``get_campaign_report``; the CLI's file, opened from disk with no server, the same.
    The screenshots are kept (``test-artifacts/campaign-report.png``, and the top of the
    page that the README shows, ``campaign-report-top.png``)."""
    report = run_campaign(sandbox, redis_client, "launch", 1000, deadline=10)
    assert report["total"] == 1000
    assert 0 < report["outcomes"]["delivered"] < 1000
    assert report["outcomes"]["timeout"] > 0
    assert set(report["cost"]) == {"EUR", "unknown"}
    with BackgroundServer(create_app(settings)) as server:
        chromium.execute_cdp_cmd("Network.enable", {})
        chromium.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": basic(*LOGIN)})
        chromium.get(f"{server.url}/campaigns/launch")
        assert chromium.title == "Campaign launch: delivery report"
        check_in_browser(chromium, report)
        served = screenshot(chromium, "campaign-report.png")
        # The README's picture (docs/campaign-report.png): the figures and the charts.
        screenshot(chromium, "campaign-report-top.png", height=1500)
        chromium.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
    record_property("screenshot", str(served))
    print(f"screenshot: {served}")

    target = tmp_path / "launch.html"
    assert main(["campaign", "report", "launch", "--html", str(target)]) == 0
    chromium.get(target.as_uri())
    check_in_browser(chromium, report)
    assert get_campaign_report("launch") == report
