"""The loss curve of a training run as a picture, for places without a live chart (API runs, logs).

Drawn off-screen with matplotlib's Agg canvas (no pyplot, so no global figure state and no GUI
backend), imported only when a picture is asked for. Unlike core ComfyUI's loss graph it draws a
run of a single step (and an empty one) instead of dividing by zero.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from ..errors import MusubiError

MIN_SIZE = 64
_DPI = 100
_LOSS_COLOR = "#9bb7dc"
_AVERAGE_COLOR = "#1f4e96"
_VALIDATION_COLOR = "#2ca02c"


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values, skipping non-finite ones; the first points
    average what exists so far, so the curve starts at the first loss instead of at zero."""
    if window < 1:
        raise MusubiError(f"moving-average window must be at least 1, got {window}.")
    data = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(data)
    sums = np.cumsum(np.concatenate([[0.0], np.where(finite, data, 0.0)]))
    counts = np.cumsum(np.concatenate([[0], finite.astype(np.int64)]))
    ends = np.arange(1, data.size + 1)
    starts = np.maximum(ends - window, 0)
    present = counts[ends] - counts[starts]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present > 0, (sums[ends] - sums[starts]) / present, np.nan)


def average_window(count: int) -> int:
    """About a tenth of the run, at most 100 steps: smooth enough to show the trend, short enough to follow it."""
    return max(1, min(100, count // 10))


def render_loss_curve(losses: Sequence[float], width: int = 768, height: int = 384, title: str = "Training loss",
                      first_step: int = 1, validation: tuple[Sequence[int], Sequence[float]] | None = None) -> np.ndarray:
    """Loss per step and, from 20 steps on, its moving average, as RGB uint8 ``[height, width, 3]``.

    ``first_step`` numbers the first loss, so a resumed run keeps its real step numbers.
    ``validation``: (steps, losses) of the run's validation, drawn as a green line with dots.
    Non-finite losses leave a gap instead of breaking the axis scale.
    """
    figure, axes = _new_plot(width, height, "the loss curve")
    from matplotlib.ticker import MaxNLocator  # matplotlib is there: _new_plot checked

    values = np.array([float(value) for value in losses], dtype=np.float64)
    values[~np.isfinite(values)] = np.nan
    steps = np.arange(first_step, first_step + values.size)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        axes.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=axes.transAxes, color="#666666")
        axes.set_xticks([])
        axes.set_yticks([])
    else:
        window = average_window(finite.size)
        marker = "o" if values.size <= 30 else None
        if window == 1:  # too few steps to smooth: the losses themselves, drawn strong
            axes.plot(steps, values, color=_AVERAGE_COLOR, linewidth=1.6, marker=marker, markersize=3, label="loss")
        else:
            axes.plot(steps, values, color=_LOSS_COLOR, linewidth=1.0, marker=marker, markersize=3, label="loss")
            axes.plot(steps, moving_average(values, window), color=_AVERAGE_COLOR, linewidth=1.8,
                      label=f"average of {window} steps")
            axes.legend(loc="upper right", frameon=False, fontsize=8)
        if validation is not None and len(validation[0]):
            axes.plot(list(validation[0]), list(validation[1]), color=_VALIDATION_COLOR, linewidth=1.6, marker="o",
                      markersize=4, label="validation")
            axes.legend(loc="upper right", frameon=False, fontsize=8)
        if steps.size == 1:  # one point: give the axes some room instead of a zero-width range
            axes.set_xlim(steps[0] - 1, steps[0] + 1)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        last = finite[-1]
        axes.set_title(f"last {_short(last)}   min {_short(float(finite.min()))}", fontsize=9, loc="right", color="#444444")
        axes.grid(True, color="#e6e6e6", linewidth=0.8)
        axes.set_axisbelow(True)
    return _finish(figure, axes, title, width, height)


def _new_plot(width, height, what: str):
    """A white matplotlib figure of ``width`` × ``height`` pixels and its axes (matplotlib is imported
    only here, when a picture is drawn)."""
    width, height = int(width), int(height)
    if width < MIN_SIZE or height < MIN_SIZE:
        raise MusubiError(f"plot size must be at least {MIN_SIZE}x{MIN_SIZE} pixels, got {width}x{height}.")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MusubiError(f"drawing {what} needs matplotlib; install it with: pip install matplotlib") from error
    # Half a pixel more than asked, because Agg truncates the figure size to whole pixels.
    figure = Figure(figsize=((width + 0.5) / _DPI, (height + 0.5) / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _finish(figure, axes, title: str, width, height) -> np.ndarray:
    """The plot's frame and title, laid out and drawn: RGB uint8 ``[height, width, 3]``."""
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    if title:
        axes.set_title(title, fontsize=10, loc="left")
    with warnings.catch_warnings():  # very small pictures cannot fit every label; draw them anyway
        warnings.simplefilter("ignore", UserWarning)
        figure.tight_layout()
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3]
    return np.ascontiguousarray(pixels[:int(height), :int(width)])


def _short(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def render_candidate_losses(values: Sequence[float], losses: Sequence[float], best: int, parameter: str = "beta",
                            width: int = 640, height: int = 320, title: str = "Validation loss per EMA candidate") -> np.ndarray:
    """Validation loss against each candidate's parameter (post-hoc EMA's beta or sigma_rel), the
    chosen one ringed, as RGB uint8 ``[height, width, 3]``."""
    figure, axes = _new_plot(width, height, "the candidate plot")
    order = np.argsort(np.asarray(values, dtype=np.float64), kind="stable")
    xs = np.asarray(values, dtype=np.float64)[order]
    ys = np.asarray(losses, dtype=np.float64)[order]
    axes.plot(xs, ys, color=_AVERAGE_COLOR, linewidth=1.6, marker="o", markersize=4)
    axes.plot([values[best]], [losses[best]], linestyle="none", marker="o", markersize=11, markerfacecolor="none",
              markeredgecolor="#d62728", markeredgewidth=2, label=f"chosen: {parameter} {values[best]:g}")
    for x, y in zip(xs, ys):
        axes.annotate(_short(float(y)), (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7, color="#444444")
    if xs.size == 1:
        axes.set_xlim(xs[0] - 0.05, xs[0] + 0.05)
    axes.set_xlabel(parameter)
    axes.set_ylabel("validation loss")
    axes.legend(loc="best", frameon=False, fontsize=8)
    axes.grid(True, color="#e6e6e6", linewidth=0.8)
    axes.set_axisbelow(True)
    return _finish(figure, axes, title, width, height)
