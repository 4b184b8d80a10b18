"""The web face: the webhook receiver that ends a tracking when the provider pushes.

``uvicorn smsbat_tracker.webhook:app`` serves it from the environment's settings;
:func:`create_app` builds one to mount in a host's ASGI app.
"""

from smsbat_tracker.webhook.receiver import (
    LazyWebhookApp,
    PushBody,
    WebhookReceiver,
    app,
    create_app,
    main,
    openapi_document,
)

__all__ = [
    "LazyWebhookApp",
    "PushBody",
    "WebhookReceiver",
    "app",
    "create_app",
    "main",
    "openapi_document",
]
