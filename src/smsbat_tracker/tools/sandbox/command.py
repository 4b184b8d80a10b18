"""The sandbox as a foreground command: ``smsbat-tracker sandbox`` or ``python -m`` this package.

It serves until interrupted; its usage line names the way it was started (``prog``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from smsbat_tracker.tools.sandbox.app import create_app
from smsbat_tracker.tools.sandbox.config import SandboxConfig
from smsbat_tracker.tools.serving import ReadyServer, bind_socket, serve_on, uvicorn_config

__all__ = ["MODULE_PROG", "main"]

MODULE_PROG = "python -m smsbat_tracker.tools.sandbox"
"""The usage line's program when run as a module (``smsbat-tracker`` passes its own)."""


def _build_parser(prog: str) -> argparse.ArgumentParser:
    defaults = SandboxConfig()
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Simulated SMSBAT API (GET /bat/message/{id}, POST /bat/messagelist) with "
            "unauthenticated /sandbox/ admin endpoints: for local use only."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: %(default)s)")
    parser.add_argument("--api-key", default=defaults.api_key, help="API key to accept")
    parser.add_argument("--username", default=defaults.username, help="Basic auth user name")
    parser.add_argument("--password", default=defaults.password, help="Basic auth password")
    parser.add_argument(
        "--processing-after",
        type=float,
        default=defaults.processing_after,
        help="seconds until processing (default: %(default)s)",
    )
    parser.add_argument(
        "--median",
        type=float,
        default=defaults.median_final,
        help="median seconds until the final status (default: %(default)s)",
    )
    parser.add_argument(
        "--p95",
        type=float,
        default=defaults.p95_final,
        help="95th percentile seconds until the final status (default: %(default)s)",
    )
    parser.add_argument("--undeliverable", type=float, default=defaults.undeliverable_rate)
    parser.add_argument("--permanenterror", type=float, default=defaults.permanenterror_rate)
    parser.add_argument("--never-final", type=float, default=defaults.never_final_rate)
    parser.add_argument("--fallback", type=float, default=defaults.fallback_rate)
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible outcomes")
    parser.add_argument("--push-url", default=None, help="POST every status change here")
    return parser


def main(argv: list[str] | None = None, *, prog: str = MODULE_PROG) -> int:
    """Run the sandbox in the foreground until interrupted; returns the exit code.

    ``prog`` is the program named in usage and help (``smsbat-tracker sandbox`` from the CLI).
    """
    parser = _build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: hand back argparse's exit code
        return exc.code if isinstance(exc.code, int) else 2
    try:
        config = SandboxConfig(
            api_key=args.api_key,
            username=args.username,
            password=args.password,
            processing_after=args.processing_after,
            median_final=args.median,
            p95_final=args.p95,
            undeliverable_rate=args.undeliverable,
            permanenterror_rate=args.permanenterror,
            never_final_rate=args.never_final,
            fallback_rate=args.fallback,
            seed=args.seed,
            push_url=args.push_url,
        )
        sock = bind_socket(args.host, args.port)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_app(config)
    uv_config = uvicorn_config(app, log_config=True)
    server = ReadyServer(uv_config)
    host = f"[{args.host}]" if ":" in args.host else args.host
    port = sock.getsockname()[1]
    # The credentials are deliberately not printed: terminals and CI logs are kept.
    print(f"SMSBAT sandbox listening on http://{host}:{port} (local use only)", flush=True)
    try:
        with asyncio.Runner(loop_factory=uv_config.get_loop_factory()) as runner:
            runner.run(serve_on(server, sock, app.state._attach_loop, app.state._aclose))
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0
