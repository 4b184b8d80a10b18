"""``smsbat-tracker webhook`` and ``python -m smsbat_tracker.webhook``: serve the receiver.

Give the provider ``https://<host>/webhook?token=<secret>``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from smsbat_tracker.config import load_settings
from smsbat_tracker.errors import ConfigError
from smsbat_tracker.log import configure_logging
from smsbat_tracker.webhook.application import create_app
from smsbat_tracker.webhook.asgi import protect_access_log

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``smsbat-tracker webhook [--host H] [--port P]``: serve in the foreground.

    Prints one line and returns 2 on a configuration error.
    """
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="smsbat-tracker webhook",
        description="Serve the SMSBAT webhook receiver.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    parser.add_argument("--log-level", default="INFO", help="log level (default %(default)s)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        settings = load_settings(credentials=False)
        configure_logging(
            level=args.log_level.upper(),
            secrets=[settings.webhook_token.get_secret_value() if settings.webhook_token else None],
        )
        application = create_app(settings)
    except ConfigError as exc:
        print(f"smsbat-tracker webhook: {exc}", file=sys.stderr)
        return 2
    protect_access_log()
    # log_config=None: uvicorn's own lines go through the project's (redacting) handler.
    config = uvicorn.Config(
        application,
        host=args.host,
        port=args.port,
        lifespan="on",
        log_config=None,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    raise SystemExit(main())
