"""Login codes end to end: sent by SMS, tracked with a short deadline, and e-mailed through
Django's SMTP backend to a real SMTP server when the SMS does not arrive."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone

from accounts.models import Customer, LoginCode

if TYPE_CHECKING:
    from conftest import Mailbox, Worker
    from smsbat_tracker.testing import FakeSmsbat, Outcome


@pytest.fixture
def customer(phone: str) -> Customer:
    return Customer.objects.create(email=f"{uuid.uuid4().hex[:12]}@example.com", phone=phone)


def request_code(customer: Customer) -> LoginCode:
    response = Client().post(
        "/login/code/", {"email": customer.email}, content_type="application/json"
    )
    assert response.status_code == 202
    return LoginCode.objects.get(customer=customer)


def appears(code: str, text: str) -> bool:
    """Whether ``code`` is in ``text`` as a number of its own (not inside a longer one)."""
    return re.search(rf"(?<![\d.]){code}(?!\d)", text) is not None


@pytest.mark.parametrize(
    ("sms", "outcome"),
    [("never", "timeout"), ("undeliverable", "undeliverable")],
    ids=["sms-not-final-by-deadline", "sms-undeliverable"],
)
def test_login_code_whose_sms_does_not_arrive_is_emailed(
    smsbat_api: FakeSmsbat,
    mailbox: Mailbox,
    shop: Worker,
    customer: Customer,
    eventually: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    sms: Outcome,
    outcome: str,
) -> None:
    """A login code whose SMS is not delivered by SHOP_LOGIN_CODE_SMS_DEADLINE
    (``on_timeout``), or is undeliverable (``on_failed``), arrives by e-mail at the SMTP
    server; the mail has the code, which logs the customer in. The code is in no log
    line, of the web process or of the worker."""
    caplog.set_level(logging.DEBUG)
    smsbat_api.set_send_outcome(sms, after=0.3)

    login_code = request_code(customer)

    assert login_code.message_id  # the SMS went out first
    # The mail is at the SMTP server before email_code records it (``emailed_at``, its last
    # write): wait for that record, not for the mail, then look at both.
    eventually(lambda: LoginCode.objects.get(pk=login_code.pk).emailed_at, what="the code e-mailed")
    mails = mailbox.to(customer.email)
    code = login_code.code()
    assert len(mails) == 1
    assert mails[0]["From"] == settings.DEFAULT_FROM_EMAIL
    assert f"Your login code is {code}" in mails[0].get_content()
    login_code.refresh_from_db()
    assert login_code.sms_outcome == outcome
    assert login_code.emailed_at is not None
    response = Client().post(
        "/login/verify/", {"email": customer.email, "code": code}, content_type="application/json"
    )
    assert response.status_code == 200
    assert response.json() == {"customer": customer.pk}
    # The test's SMTP server logs what it receives ("mail.log"): it is the mailbox.
    sent_side = [r.getMessage() for r in caplog.records if not r.name.startswith("mail.log")]
    assert sent_side  # the shop, httpx and the tracker did log
    assert not appears(code, "\n".join(sent_side))
    assert not appears(code, shop.log())


def test_delivered_login_code_is_not_emailed(
    smsbat_api: FakeSmsbat,
    mailbox: Mailbox,
    customer: Customer,
    eventually: Callable[..., Any],
) -> None:
    """A login code whose SMS is delivered (``on_delivered``) is not e-mailed."""
    smsbat_api.set_send_outcome("delivered", after=0.3)

    login_code = request_code(customer)

    eventually(
        lambda: LoginCode.objects.get(pk=login_code.pk).sms_outcome == "delivered",
        what="the SMS delivered",
    )
    login_code.refresh_from_db()
    assert login_code.emailed_at is None
    assert mailbox.to(customer.email) == []


def test_wrong_or_reused_login_code_is_refused(customer: Customer) -> None:
    """A wrong code does not log in, and a right one logs in once."""
    # Created directly (nothing is sent): this test is about checking codes.
    login_code = LoginCode.objects.create(
        customer=customer, expires_at=timezone.now() + timedelta(minutes=5)
    )
    code = login_code.code()
    wrong = f"{(int(code) + 1) % 10**6:06d}"

    def verify(candidate: str) -> int:
        return (
            Client()
            .post(
                "/login/verify/",
                {"email": customer.email, "code": candidate},
                content_type="application/json",
            )
            .status_code
        )

    assert verify(wrong) == 400
    assert verify(code) == 200
    assert verify(code) == 400
