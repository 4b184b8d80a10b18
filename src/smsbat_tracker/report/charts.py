"""The page's charts, drawn by matplotlib as SVG (the ``report`` extra).

matplotlib's object API only (a :class:`~matplotlib.figure.Figure` of its own per chart,
never pyplot's global state): the receiver draws pages in several threads at once.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Final

from smsbat_tracker.errors import MissingExtra
from smsbat_tracker.report.figures import FINALS, OUTCOMES, Figures

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "COLOURS",
    "delivered_over_time",
    "outcome_counts",
    "require_matplotlib",
    "time_to_final",
]

# One colour per outcome, the same in every chart and in the page's table.
COLOURS: Final = {
    "delivered": "#2e7d32",
    "undeliverable": "#ef6c00",
    "permanenterror": "#c62828",
    "timeout": "#6d6d6d",
    "error": "#6a1b9a",
}

_SIZE: Final = (7.0, 3.0)  # inches: about 670 x 290 CSS pixels


def require_matplotlib() -> None:
    """Raise :class:`~smsbat_tracker.errors.MissingExtra` when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingExtra(
            "the HTML report draws its charts with matplotlib, which is not installed: "
            "pip install 'smsbat-tracker[report]'"
        ) from None


def _figure() -> tuple[Figure, Axes]:
    require_matplotlib()
    from matplotlib.figure import Figure

    figure = Figure(figsize=_SIZE, layout="constrained")
    axes = figure.add_subplot()
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    return figure, axes


def _svg(figure: Figure) -> bytes:
    out = io.BytesIO()
    # No date in the file: the same campaign gives the same page.
    figure.savefig(out, format="svg", metadata={"Date": None})
    return out.getvalue()


def _seconds_axis(axes: Axes, longest: float) -> float:
    """Seconds, or minutes past three of them: the divisor; the axis is labelled."""
    if longest > 180:
        axes.set_xlabel("minutes after the send")
        return 60.0
    axes.set_xlabel("seconds after the send")
    return 1.0


def outcome_counts(counts: dict[str, int]) -> bytes:
    """A horizontal bar per outcome, with its count."""
    figure, axes = _figure()
    labels = list(reversed(OUTCOMES))
    values = [counts.get(o, 0) for o in labels]
    bars = axes.barh(labels, values, color=[COLOURS[o] for o in labels])
    axes.bar_label(bars, padding=3)
    axes.set_xlabel("messages")
    axes.margins(x=0.12)
    return _svg(figure)


def delivered_over_time(figures: Figures, total: int) -> bytes:
    """Messages delivered so far against time from the send, with the share of ``total``
    on the right-hand axis."""
    figure, axes = _figure()
    times = figures.delivered_times
    unit = _seconds_axis(axes, times[-1] if times else 0.0)
    if times:
        xs = [0.0] + [t / unit for t in times]
        axes.step(xs, list(range(len(xs))), where="post", color=COLOURS["delivered"])
    else:
        axes.text(0.5, 0.5, "nothing delivered yet", ha="center", transform=axes.transAxes)
    if total:
        axes.axhline(total, color="#9e9e9e", linestyle="--", linewidth=1)
        share: Any = (lambda n: n * 100.0 / total, lambda p: p * total / 100.0)
        right = axes.secondary_yaxis("right", functions=share)
        right.set_ylabel("% of the campaign")
        axes.set_ylim(0, total * 1.05)
    axes.set_xlim(left=0)
    axes.set_ylabel("delivered")
    return _svg(figure)


def time_to_final(figures: Figures) -> bytes:
    """How long messages took to reach their final status: a histogram stacked by outcome."""
    figure, axes = _figure()
    present = [o for o in FINALS if figures.times[o]]
    longest = max((figures.times[o][-1] for o in present), default=0.0)
    unit = _seconds_axis(axes, longest)
    if present:
        axes.hist(
            [[t / unit for t in figures.times[o]] for o in present],
            bins=30,
            stacked=True,
            label=present,
            color=[COLOURS[o] for o in present],
        )
        axes.legend(frameon=False)
    else:
        axes.text(0.5, 0.5, "no final status yet", ha="center", transform=axes.transAxes)
    axes.set_xlim(left=0)
    axes.set_ylabel("messages")
    return _svg(figure)
