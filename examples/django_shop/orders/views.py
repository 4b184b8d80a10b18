"""The orders' JSON API: place an order, read it back."""

import json

from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.http import require_GET, require_POST

from orders.forms import OrderForm
from orders.models import Order
from orders.services import place_order


@require_POST
def create_order(request: HttpRequest) -> JsonResponse:
    """``POST /orders/`` ``{"phone": "+380...", "total": "12.50"}``: 201 with the order."""
    try:
        data = json.loads(request.body)
    except ValueError:
        return JsonResponse({"error": "the body must be JSON"}, status=400)
    form = OrderForm(data if isinstance(data, dict) else {})
    if not form.is_valid():
        return JsonResponse({"errors": form.errors}, status=400)
    order = place_order(form.cleaned_data["phone"], form.cleaned_data["total"])
    order.refresh_from_db()  # with what sending the confirmation wrote
    return JsonResponse(order.as_dict(), status=201)


@require_GET
def order_detail(request: HttpRequest, pk: int) -> JsonResponse:
    """``GET /orders/<id>/``: the order and where its confirmation is."""
    order = get_object_or_404(Order, pk=pk)
    return JsonResponse(order.as_dict())
