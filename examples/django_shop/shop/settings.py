"""Settings of the example shop, read from the environment.

For local use: the defaults need only ``python manage.py migrate``, Redis on localhost and
the simulated SMSBAT API (see README.md). The SMSBAT_* variables (API key, base URL,
polling schedule) are read by smsbat-tracker itself, not here.
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-example-shop-only")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]

INSTALLED_APPS = ["orders", "accounts"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
]
ROOT_URLCONF = "shop.urls"
WSGI_APPLICATION = "shop.wsgi.application"

# A file, so that the web process and the worker share it. WAL lets readers run beside
# the one writer; IMMEDIATE transactions wait for the write lock up front instead of
# failing with "database is locked" when two processes write at once.
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("SHOP_DATABASE", BASE_DIR / "db.sqlite3"),
        "OPTIONS": {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"

# Celery (namespace CELERY_): Redis is the broker, as smsbat-tracker requires.
CELERY_BROKER_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_IGNORE_RESULT = True

# E-mail goes out through an SMTP server (the login code's fallback).
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.smtp.EmailBackend")
EMAIL_HOST = os.environ.get("EMAIL_HOST", "localhost")
EMAIL_PORT = int(os.environ.get("EMAIL_PORT", "25"))
EMAIL_TIMEOUT = 10
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "shop@example.com")

# The shop's own settings.
SHOP_NAME = "Example Shop"
# The sender name of the shop's SMS (SMSBAT's "from").
SHOP_SMS_SENDER = os.environ.get("SHOP_SMS_SENDER", "ExampleShop")
# An undeliverable order confirmation is sent again after this many seconds, doubling
# each time, until it has been sent SHOP_CONFIRMATION_ATTEMPTS times.
SHOP_CONFIRMATION_RETRY_DELAY = _env_float("SHOP_CONFIRMATION_RETRY_DELAY", 60.0)
SHOP_CONFIRMATION_ATTEMPTS = int(os.environ.get("SHOP_CONFIRMATION_ATTEMPTS", "3"))
# A login code is valid this long; its SMS is given this long to arrive before the code
# goes out by e-mail.
SHOP_LOGIN_CODE_TTL = _env_float("SHOP_LOGIN_CODE_TTL", 600.0)
SHOP_LOGIN_CODE_SMS_DEADLINE = _env_float("SHOP_LOGIN_CODE_SMS_DEADLINE", 60.0)

# The shop's log lines (INFO and up) on the console; a worker logs them through Celery's.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "INFO"},
}
