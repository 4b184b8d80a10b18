"""The ``smsbat-tracker`` command: demo, sandbox, status, config check."""

from __future__ import annotations

import argparse
import json
import sys

from smsbat_tracker import __version__
from smsbat_tracker.errors import ConfigError, SmsbatError

__all__ = ["main"]


def _status(args: argparse.Namespace) -> int:
    from smsbat_tracker.client import SmsbatClient
    from smsbat_tracker.config import load_settings

    settings = load_settings()
    with SmsbatClient.from_settings(settings) as client:
        status = client.get_status(args.message_id)
    print(json.dumps(status.to_json_dict(), indent=2))
    return 0


def _check_config(_args: argparse.Namespace) -> int:
    from smsbat_tracker.config import load_settings

    settings = load_settings()
    # SecretStr fields render as '**********'.
    for name, value in settings.model_dump().items():
        print(f"{name} = {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``smsbat-tracker`` command."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="smsbat-tracker", description="Track SMSBAT message delivery with Celery."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "demo", help="run the demo (embedded Redis, sandbox API, a worker)", add_help=False
    )
    sub.add_parser("sandbox", help="serve the simulated SMSBAT API", add_help=False)
    status = sub.add_parser("status", help="print one message's status from the API")
    status.add_argument("message_id")
    sub.add_parser("check-config", help="validate the settings and print them (secrets hidden)")

    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "demo":
            from smsbat_tracker.demo import main as demo_main

            return demo_main(rest)
        if args.command == "sandbox":
            from smsbat_tracker.sandbox import main as sandbox_main

            return sandbox_main(rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "status":
            return _status(args)
        return _check_config(args)
    except ConfigError as exc:
        print(f"smsbat-tracker: {exc}", file=sys.stderr)
        return 2
    except SmsbatError as exc:
        print(f"smsbat-tracker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
