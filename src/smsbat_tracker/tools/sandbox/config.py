"""How the simulated API behaves: credentials and the statistics of sent messages' outcomes."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SandboxConfig", "is_number"]

_Z_95 = 1.645  # standard normal quantile of 0.95


def is_number(value: object) -> bool:
    """An int or float, not a bool (which Python counts as an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class SandboxConfig:
    """Credentials and the statistical behaviour of the simulated API.

    Times are seconds after the send. The time to the final status is log-normal with
    median ``median_final`` and 95th percentile ``p95_final``. Each accepted message ends
    ``undeliverable``, ``permanenterror``, never final (stuck in ``processing``) or
    ``delivered`` with the given rates (delivered takes the rest). ``fallback_rate`` is the
    share of viber-type messages delivered by their SMS fallback after the Viber leg failed.
    When ``push_url`` is set, every status change is POSTed there as a webhook.
    """

    api_key: str = "sandbox-key"
    username: str = "sandbox"
    password: str = "sandbox-password"  # noqa: S105 - public sandbox default, not a secret
    processing_after: float = 0.5
    median_final: float = 4.0
    p95_final: float = 40.0
    undeliverable_rate: float = 0.05
    permanenterror_rate: float = 0.0
    never_final_rate: float = 0.02
    fallback_rate: float = 0.1
    seed: int | None = None
    push_url: str | None = None
    push_timeout: float = 5.0

    def __post_init__(self) -> None:
        for name in ("api_key", "username", "password"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        rate_names = ("undeliverable_rate", "permanenterror_rate", "never_final_rate")
        for name in (*rate_names, "fallback_rate"):
            value = getattr(self, name)
            if not is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        total = sum(getattr(self, name) for name in rate_names)
        if total > 1.0 + 1e-9:
            raise ValueError(
                "undeliverable_rate + permanenterror_rate + never_final_rate must be <= 1, "
                f"got {total:g}"
            )
        # 0 is allowed for processing_after: "processing as soon as accepted".
        if not is_number(self.processing_after) or not 0.0 <= self.processing_after < math.inf:
            raise ValueError(f"processing_after must be >= 0, got {self.processing_after!r}")
        for name in ("median_final", "p95_final", "push_timeout"):
            value = getattr(self, name)
            if not is_number(value) or not 0.0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.p95_final < self.median_final:
            raise ValueError(
                f"p95_final must be >= median_final, got {self.p95_final!r} < {self.median_final!r}"
            )
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
        ):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.push_url is not None and not (
            isinstance(self.push_url, str) and self.push_url.startswith(("http://", "https://"))
        ):
            raise ValueError("push_url must be an http:// or https:// URL")

    @property
    def sigma(self) -> float:
        """Log-normal shape parameter derived from the median and the 95th percentile."""
        return math.log(self.p95_final / self.median_final) / _Z_95
