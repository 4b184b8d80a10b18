"""The shop's URLs: a small JSON API."""

from django.urls import include, path

urlpatterns = [
    path("orders/", include("orders.urls")),
    path("login/", include("accounts.urls")),
]
