"""What ``POST /bat/messagelist`` makes of each message: its check, its price, its drawn fate.

:class:`Planner` draws a sent message's timeline from :class:`SandboxConfig`'s statistics,
from one seeded generator, so a seed replays the same outcomes.
"""

from __future__ import annotations

import math
import random
import re

from smsbat_tracker.tools.sandbox.config import SandboxConfig

__all__ = ["MESSAGE_TYPES", "Planner", "parts", "rejection"]

MESSAGE_TYPES: frozenset[str] = frozenset(
    {
        "sms",
        "viber_promo",
        "viber_trans",
        "viber_carousel",
        "viber_survey",
        "viber_otp",
        "rcs",
        "flashcall",
    }
)
"""Message types accepted by ``POST /bat/messagelist``."""

# ASCII digits only, and fullmatch() so a trailing newline is not accepted.
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
# Price per part in USD; a Viber message delivered by its SMS fallback is billed as SMS.
_RATES: dict[str, float] = {"sms": 0.05, "rcs": 0.04, "flashcall": 0.01}
_VIBER_RATE = 0.03


def parts(text: str) -> int:
    """Number of SMS parts: 160 characters fit one part, longer texts use 153 per part."""
    length = len(text)
    if length <= 160:
        return 1
    return math.ceil(length / 153)


def rejection(to: object, kind: object, text: object) -> str | None:
    """Why the API refuses a message with these fields, or None when it accepts it."""
    if not isinstance(to, str) or not _E164.fullmatch(to):
        return "to must be an E.164 number"
    if kind not in MESSAGE_TYPES:
        return "unknown type"
    if text is not None and not isinstance(text, str):
        return "text must be a string"
    return None


class Planner:
    """Draws the fate of sent messages from one configuration; not locked itself."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self._sigma = config.sigma
        self._mu = math.log(config.median_final)
        self._rng = random.Random(config.seed)

    def plan(self, kind: str, parts: int) -> tuple[list[tuple[str, float]], float, bool]:
        """Draw the timeline, delivered cost and fallback flag of a sent message."""
        config = self.config
        rng = self._rng
        final_after = rng.lognormvariate(self._mu, self._sigma)
        draw = rng.random()
        final: str | None
        if draw < config.undeliverable_rate:
            final = "undeliverable"
        elif draw < config.undeliverable_rate + config.permanenterror_rate:
            final = "permanenterror"
        elif (
            draw < config.undeliverable_rate + config.permanenterror_rate + config.never_final_rate
        ):
            final = None
        else:
            final = "delivered"
        fallback = False
        if kind.startswith("viber_") and final == "delivered":
            # Drawn among delivered messages, scaled so the share of all viber-type messages
            # delivered by fallback equals fallback_rate (when that many are delivered at all).
            delivered_rate = 1.0 - (
                config.undeliverable_rate + config.permanenterror_rate + config.never_final_rate
            )
            if delivered_rate > 0.0:
                fallback = rng.random() < min(1.0, config.fallback_rate / delivered_rate)
        rate = _RATES["sms"] if fallback else _RATES.get(kind, _VIBER_RATE)
        cost = round(rate * parts, 6)
        if final is None:
            return [("scheduled", 0.0), ("processing", config.processing_after)], cost, fallback
        # Processing starts after processing_after but always before the final status.
        processing_at = min(config.processing_after, final_after / 2.0)
        timeline = [("scheduled", 0.0), ("processing", processing_at), (final, final_after)]
        return timeline, cost, fallback
