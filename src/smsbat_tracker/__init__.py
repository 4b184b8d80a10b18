"""smsbat-tracker: track SMSBAT message delivery with Celery and act on each final state.

The Celery side lives in :mod:`smsbat_tracker.tasks` (``track_message``, ``get_status``);
importing it builds the Celery app from the environment. This top level holds what needs
no app: settings, the HTTP clients, the models, the errors and the schedule.
"""

__version__ = "0.1.0"

from smsbat_tracker.backoff import Schedule, compute_backoff
from smsbat_tracker.client import AsyncSmsbatClient, SmsbatClient
from smsbat_tracker.config import Settings, load_settings
from smsbat_tracker.errors import (
    AuthenticationError,
    ClientError,
    ConfigError,
    ConnectionFailed,
    InvalidMessageId,
    MalformedResponse,
    MessageNotFound,
    PermanentError,
    RateLimited,
    RequestTimeout,
    ServerError,
    SmsbatError,
    TransientError,
)
from smsbat_tracker.models import (
    FINAL_STATUSES,
    MessageStatus,
    OutgoingMessage,
    SendResult,
    SentMessage,
    is_delivered,
    is_final,
    validate_message_id,
)

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
    "TransientError",
    "__version__",
    "compute_backoff",
    "is_delivered",
    "is_final",
    "load_settings",
    "validate_message_id",
]
