"""A user's own Celery app with the tracker in it, as the README's integration shows.

``python -m bench --worker-app bench.user_app`` starts modes b and c's workers as
``celery -A bench.user_app worker``: the app is the user's (``Celery("shop")``, its broker
from ``REDIS_URL``), and ``init_app`` reads the tracker's settings from the environment.
"""

from __future__ import annotations

import os

from celery import Celery

import smsbat_tracker

app = Celery("shop", broker=os.environ["REDIS_URL"])
smsbat_tracker.init_app(app)
