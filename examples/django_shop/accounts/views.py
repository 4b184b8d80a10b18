"""The login API: ask for a code, log in with it."""

import json
from typing import Any

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_POST

from accounts.models import Customer
from accounts.services import request_login_code, verify_login_code


def _json(request: HttpRequest) -> dict[str, Any]:
    try:
        data = json.loads(request.body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


@require_POST
def request_code(request: HttpRequest) -> JsonResponse:
    """``POST /login/code/`` ``{"email": ...}``: 202, whether or not the customer exists."""
    email = _json(request).get("email")
    customer = Customer.objects.filter(email=email).first() if isinstance(email, str) else None
    if customer is not None:
        request_login_code(customer)
    return JsonResponse({"sent": True}, status=202)


@require_POST
def verify_code(request: HttpRequest) -> JsonResponse:
    """``POST /login/verify/`` ``{"email": ..., "code": ...}``: 200, or 400 for a bad code."""
    data = _json(request)
    email, code = data.get("email"), data.get("code")
    if not isinstance(email, str) or not isinstance(code, str):
        return JsonResponse({"error": "email and code are required"}, status=400)
    customer = verify_login_code(email, code)
    if customer is None:
        return JsonResponse({"error": "invalid or expired code"}, status=400)
    return JsonResponse({"customer": customer.pk})
