"""bench.cpu_parts: the least ratio to Celery's floor that a tracker's parts allow."""

from __future__ import annotations

import pytest
from bench.cpu_parts import bounds

PARTS = {"redis_round_trip": 100.0, "status_request": 300.0, "follow_up_publish": 1000.0}
RUN = {"floor_cpu_ms_per_message": 10.0, "checks_per_message": 2.0}


def test_the_bounds_add_each_part_as_often_as_a_tracking_pays_it() -> None:
    """Against a floor of 10 ms a message at two checks a message: the follow-up once
    (1 ms: 1.1), plus a request a check (0.6 ms: 1.16), plus two round trips a check
    (0.4 ms: 1.2)."""
    got = bounds(PARTS, RUN)
    assert got["follow_up_alone"] == pytest.approx(1.1)
    assert got["least_ratio_request_and_follow_up"] == pytest.approx(1.16)
    assert got["least_ratio_with_two_round_trips"] == pytest.approx(1.2)
    assert got["floor_us_per_message"] == 10_000.0
