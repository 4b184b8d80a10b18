"""The web face: the webhook receiver that ends a tracking when the provider pushes.

``uvicorn smsbat_tracker.webhook:app`` (or ``smsbat-tracker webhook --host 0.0.0.0 --port
8000``) serves it from the environment's settings; :func:`create_app` builds one to mount
in a host's ASGI app. Give the provider ``https://<host>/webhook?token=<secret>``.

Modules, one concept each: :mod:`~smsbat_tracker.webhook.schema` (what a push is and the
answers' shapes), :mod:`~smsbat_tracker.webhook.auth` (the token),
:mod:`~smsbat_tracker.webhook.limiter` (how many pushes apply at once),
:mod:`~smsbat_tracker.webhook.receiver` (the handlers), :mod:`~smsbat_tracker.webhook.openapi`
(the document), :mod:`~smsbat_tracker.webhook.application` (the routes),
:mod:`~smsbat_tracker.webhook.asgi` (the app built at start-up) and
:mod:`~smsbat_tracker.webhook.serve` (the command).
"""

from smsbat_tracker.webhook.application import create_app
from smsbat_tracker.webhook.asgi import LazyWebhookApp, app
from smsbat_tracker.webhook.openapi import openapi_document
from smsbat_tracker.webhook.receiver import WebhookReceiver
from smsbat_tracker.webhook.schema import PushBody
from smsbat_tracker.webhook.serve import main

__all__ = [
    "LazyWebhookApp",
    "PushBody",
    "WebhookReceiver",
    "app",
    "create_app",
    "main",
    "openapi_document",
]
