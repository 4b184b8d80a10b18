"""URLs of the login API."""

from django.urls import path

from accounts import views

urlpatterns = [
    path("code/", views.request_code, name="request-login-code"),
    path("verify/", views.verify_code, name="verify-login-code"),
]
