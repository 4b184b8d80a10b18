"""``python -m smsbat_tracker.tools.sandbox``: serve the simulated API in the foreground."""

from smsbat_tracker.tools.sandbox.command import main

if __name__ == "__main__":
    raise SystemExit(main())
