"""The orders app."""

from django.apps import AppConfig


class OrdersConfig(AppConfig):
    """Orders and their confirmation SMS."""

    name = "orders"
