"""The webhook as an ASGI app: the receiver's handlers wired to their routes.

Mount it in the project's own ASGI app, for the project's Celery app (the one that
called :func:`smsbat_tracker.init_app`)::

    webhook = create_app(celery_app=celery_app)
    app.mount("/smsbat", webhook)  # Starlette, FastAPI: /smsbat/webhook?token=<secret>

A mounted app's lifespan does not run: the receiver connects on its first request, or,
to connect at start-up and close at shutdown, in the host's own lifespan::

    async with webhook.state.receiver.lifespan():
        yield

Any ASGI app works as the host: Django's ``get_asgi_application()`` behind a Starlette
``Router([Mount("/smsbat", webhook), Mount("/", django_app)])``.

Routes:

- ``POST /webhook``: one push, ``{"messageId", "deliverystatus", "timestamp", "cost"}``.
  Authenticated by the shared secret ``SMSBAT_WEBHOOK_TOKEN`` in the query parameter
  ``token`` (the provider only takes a URL) or the header ``X-Webhook-Token``; a wrong
  token in either place is refused, whatever the other holds.
- ``GET /healthz``: 200 when Redis answers PING, else 503.
- ``GET /metrics``: the receiver's metrics, in Prometheus's text format.
- ``GET /campaigns/{id}``: a campaign's delivery report page, for people: HTTP Basic
  with ``SMSBAT_REPORT_USER`` (``report``) and ``SMSBAT_REPORT_PASSWORD``; 404 while no
  password is set, 401 without the login whatever the id (:mod:`.pages`).
- ``GET /openapi.json``: an OpenAPI 3.1 description of the above, its schemas generated
  from the models that validate the pushes and shape the answers (:class:`PushBody
  <smsbat_tracker.webhook.schema.PushBody>`).

Answers: 200 ``{"status": "stored"|"ignored", "final": bool}``; 401 ``{"error":
"unauthorized"}``; 400/413/415/422 ``{"error": "...", "field": <name or null>}``; 503 when
Redis is unreachable. No input causes any other 5xx.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.routing import Route

from smsbat_tracker.config import Settings, load_settings
from smsbat_tracker.engine.engine import Engine
from smsbat_tracker.log import get_logger
from smsbat_tracker.webhook.pages import CampaignPages
from smsbat_tracker.webhook.receiver import WebhookReceiver

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["create_app"]

log = get_logger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    celery_app: Celery | None = None,
    engine: Engine | None = None,
    settle: Callable[[str], None] | None = None,
) -> Starlette:
    """Build the webhook ASGI app; ``app.state.receiver`` is its :class:`WebhookReceiver`.

    ``celery_app``: a Celery app that called :func:`smsbat_tracker.init_app` (the
    project's own); the receiver uses its tracker's settings (unless ``settings`` are
    given) and engine, and the callbacks go out through it. Without it, the package's own
    app (:mod:`smsbat_tracker.worker`) is used and ``settings`` default to
    :func:`~smsbat_tracker.config.load_settings`.

    Raises :class:`ConfigError` naming ``SMSBAT_WEBHOOK_TOKEN`` when no token is set and
    ``SMSBAT_WEBHOOK_OPEN`` is not true, and :class:`~smsbat_tracker.errors.NotInitialised`
    for a ``celery_app`` without the tracker. ``settle`` is called with the id of each
    newly stored final status; by default it ends that message's tracking in this process
    (:func:`smsbat_tracker.celery.track.settle_from_cache`).

    Its routes are relative: mounted at ``/smsbat`` (Starlette's or FastAPI's
    ``app.mount("/smsbat", webhook)``) they answer at ``/smsbat/webhook``. A mounted app's
    lifespan does not run: the receiver then connects on its first request, or in the
    host's lifespan through ``webhook.state.receiver.lifespan()``.
    """
    if settings is None and celery_app is None:
        settings = load_settings(credentials=False)
    receiver = WebhookReceiver(settings, celery_app=celery_app, engine=engine, settle=settle)
    if receiver.open:
        log.warning(
            "webhook.open",
            detail="SMSBAT_WEBHOOK_OPEN is set and no SMSBAT_WEBHOOK_TOKEN: every push is "
            "accepted without authentication; use only for local tests",
        )

    pages = CampaignPages(
        receiver.settings,
        receiver.engine,
        receiver.unavailable_errors,
        runner=receiver.shared_campaigns,
    )
    application = Starlette(
        routes=[
            Route("/campaigns/{campaign_id}", pages.campaign, methods=["GET"]),
            Route("/webhook", receiver.webhook, methods=["POST"]),
            Route("/healthz", receiver.healthz, methods=["GET"]),
            Route("/metrics", receiver.serve_metrics, methods=["GET"]),
            Route("/openapi.json", receiver.openapi, methods=["GET"]),
        ],
        lifespan=receiver.lifespan,
    )
    application.state.receiver = receiver
    application.state.pages = pages
    return application
