"""The example shop: a Django project whose Celery app runs smsbat-tracker."""

# The Celery app is created with Django, so that shared tasks (the tracker's and the
# shop's) bind to it in the web process and in ``celery -A shop worker`` alike.
from shop.celery import app as celery_app

__all__ = ["celery_app"]
