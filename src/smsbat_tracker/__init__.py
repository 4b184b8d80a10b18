"""smsbat-tracker: track SMSBAT message delivery with Celery and act on each final state.

In a project with its own Celery app, one call where the app is created::

    import smsbat_tracker
    smsbat_tracker.init_app(app)

then ``from smsbat_tracker import track_message`` anywhere: the tasks are Celery shared
tasks, bound to the current app. Projects without a Celery app run the package's own
(``celery -A smsbat_tracker.worker worker``). Importing this package builds no app,
patches nothing and connects no signal; the Celery names load on first use.
"""

from typing import TYPE_CHECKING, Any

from smsbat_tracker._version import __version__
from smsbat_tracker.config import Settings, load_settings
from smsbat_tracker.errors import (
    AuthenticationError,
    ClientError,
    ConfigError,
    ConnectionFailed,
    InvalidMessageId,
    MalformedResponse,
    MessageNotFound,
    NotInitialised,
    PermanentError,
    RateLimited,
    RequestTimeout,
    ServerError,
    SmsbatError,
    TransientError,
)
from smsbat_tracker.provider.client import AsyncSmsbatClient, SmsbatClient
from smsbat_tracker.provider.models import (
    FINAL_STATUSES,
    MessageStatus,
    OutgoingMessage,
    SendResult,
    SentMessage,
    is_delivered,
    is_final,
    validate_message_id,
)
from smsbat_tracker.rules.schedule import Schedule, compute_backoff

if TYPE_CHECKING:
    from smsbat_tracker.celery.campaigns import get_campaign_report, track_campaign
    from smsbat_tracker.celery.integration import init_app
    from smsbat_tracker.celery.track import get_status, track_message
    from smsbat_tracker.celery.tracker import Tracker, tracker_of

# Loaded on first use: importing Celery's side is for the processes that use it.
_LAZY = {
    "init_app": "smsbat_tracker.celery.integration",
    "track_message": "smsbat_tracker.celery.track",
    "track_campaign": "smsbat_tracker.celery.campaigns",
    "get_status": "smsbat_tracker.celery.track",
    "get_campaign_report": "smsbat_tracker.celery.campaigns",
    "Tracker": "smsbat_tracker.celery.tracker",
    "tracker_of": "smsbat_tracker.celery.tracker",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'smsbat_tracker' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "FINAL_STATUSES",
    "AsyncSmsbatClient",
    "AuthenticationError",
    "ClientError",
    "ConfigError",
    "ConnectionFailed",
    "InvalidMessageId",
    "MalformedResponse",
    "MessageNotFound",
    "MessageStatus",
    "NotInitialised",
    "OutgoingMessage",
    "PermanentError",
    "RateLimited",
    "RequestTimeout",
    "Schedule",
    "SendResult",
    "SentMessage",
    "ServerError",
    "Settings",
    "SmsbatClient",
    "SmsbatError",
    "Tracker",
    "TransientError",
    "__version__",
    "compute_backoff",
    "get_campaign_report",
    "get_status",
    "init_app",
    "is_delivered",
    "is_final",
    "load_settings",
    "track_campaign",
    "track_message",
    "tracker_of",
    "validate_message_id",
]
