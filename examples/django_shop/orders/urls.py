"""URLs of the orders API."""

from django.urls import path

from orders import views

urlpatterns = [
    path("", views.create_order, name="create-order"),
    path("<int:pk>/", views.order_detail, name="order-detail"),
]
