"""The shop's Celery app, in Celery's "First steps with Django" layout, with the tracker on it."""

import os

from celery import Celery

import smsbat_tracker

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")

app = Celery("shop")
# CELERY_* Django settings: the broker is Redis (REDIS_URL), which the tracker requires.
app.config_from_object("django.conf:settings", namespace="CELERY")
# The tasks modules of the installed apps (orders.tasks, accounts.tasks).
app.autodiscover_tasks()
# The tracker's tasks, worker hooks and re-driver on this app; settings from SMSBAT_*.
smsbat_tracker.init_app(app)
