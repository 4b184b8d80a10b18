"""Validation of the order API's input."""

from decimal import Decimal

from django import forms
from django.core.validators import RegexValidator

# What SMSBAT accepts: an E.164 number.
phone_validator = RegexValidator(
    r"^\+[1-9][0-9]{6,14}$", "Enter an E.164 number, e.g. +380501234567."
)


class OrderForm(forms.Form):
    """A new order: who gets the confirmation, and the total."""

    phone = forms.CharField(max_length=16, validators=[phone_validator])
    total = forms.DecimalField(max_digits=10, decimal_places=2, min_value=Decimal("0.01"))
