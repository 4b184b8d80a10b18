"""The accounts app."""

from django.apps import AppConfig


class AccountsConfig(AppConfig):
    """Customers and one-time login codes."""

    name = "accounts"
