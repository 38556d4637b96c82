"""Preview of training timesteps: a histogram of the sampled noise levels and the loss-weight curve.

Answers "which noise levels will my run train on, and how much does each count?" before any
training starts, as text (musubi-tuner's ``--show_timesteps console`` layout) or as a PNG image.
Unlike musubi-tuner it never crashes when a draw is exactly 1.0 (it lands in the last bin), and it
shows the true ``sigma_sqrt`` weights near σ = 0 (musubi computes them in float16, where they
overflow and are replaced by 1).
"""

from __future__ import annotations

import argparse
import io
import os
import textwrap
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import MusubiError
from ..files import write_bytes_atomically
from .timesteps import (
    TimestepSettings,
    add_timestep_arguments,
    loss_weights,
    sample_noise_levels,
    settings_from_args,
    stratified_uniforms,
)

NUM_BINS = 1000
_DRAWS_PER_CALL = 1000  # musubi draws its preview in batches of 1000
_BINS_PER_LINE = 25
_CONSOLE_WIDTH = 64
# Draws within 1e-6 below a bin edge count in the upper bin, so the 1/1000 grid of the
# 'sigma' method lands in its own bins despite float32 rounding of k/1000.
_BIN_EDGE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class TimestepPreview:
    """counts[k]: draws with k ≤ 1000·t < k+1 (t = 1 in the last bin); weights[k]: loss weight at σ = (k+1)/1000."""

    counts: np.ndarray
    weights: np.ndarray
    settings: TimestepSettings
    latent_hw: tuple[int, int]


def compute_preview(settings: TimestepSettings, latent_hw: tuple[int, int] = (128, 128),
                    num_samples: int = 100_000, seed: int = 0) -> TimestepPreview:
    """Draw ``num_samples`` noise levels (in batches of 1000, bucketed u when buckets are set) and bin them."""
    settings.validate()
    if num_samples < 1:
        raise MusubiError(f"num_samples must be at least 1, got {num_samples}.")
    height, width = int(latent_hw[0]), int(latent_hw[1])
    if height < 1 or width < 1:
        raise MusubiError(f"latent size must be positive, got {height}x{width}.")
    generator = torch.Generator().manual_seed(int(seed))
    counts = torch.zeros(NUM_BINS, dtype=torch.int64)
    for start in range(0, num_samples, _DRAWS_PER_CALL):
        batch = min(_DRAWS_PER_CALL, num_samples - start)
        u = None
        if settings.num_timestep_buckets is not None:
            u = stratified_uniforms(settings.num_timestep_buckets, batch, generator)
        t = sample_noise_levels(settings, batch, latent_hw=(height, width), generator=generator, u=u)
        bins = torch.floor(t.double() * NUM_BINS + _BIN_EDGE_TOLERANCE).long().clamp(0, NUM_BINS - 1)
        counts += torch.bincount(bins, minlength=NUM_BINS)
    sigmas = torch.arange(1, NUM_BINS + 1, dtype=torch.float64) / NUM_BINS
    weights = loss_weights(settings, sigmas.float()).double()
    weights = torch.where(torch.isfinite(weights), weights, torch.ones_like(weights))
    return TimestepPreview(counts=counts.numpy(), weights=weights.numpy(), settings=settings, latent_hw=(height, width))


# --- text --------------------------------------------------------------------------------------


def console_text(preview: TimestepPreview) -> str:
    """musubi-tuner's console layout: 40 lines of 25-timestep averages for counts, then weights."""
    counts = np.asarray(preview.counts, dtype=np.float64).reshape(-1, _BINS_PER_LINE).mean(axis=1)
    weights = np.asarray(preview.weights, dtype=np.float64).reshape(-1, _BINS_PER_LINE).mean(axis=1)
    max_count = float(counts.max())
    lines = [f"Sampled timesteps: max count={max_count}"]
    for index, count in enumerate(counts):
        lines.append(_line_label(index) + "#" * _bar_length(count, max_count))
    max_weight = float(weights.max())
    lines.append(f"Sampled loss weighting: max weighting={max_weight}")
    for index, weight in enumerate(weights):
        lines.append(_line_label(index) + f"{weight:8.2f} " + "#" * _bar_length(weight, max_weight))
    return "\n".join(lines)


def _line_label(index: int) -> str:
    return f"{index * _BINS_PER_LINE:4d}-{(index + 1) * _BINS_PER_LINE - 1:4d}: "


def _bar_length(value: float, maximum: float) -> int:
    return int(value / maximum * _CONSOLE_WIDTH) if maximum > 0 else 0


# --- image -------------------------------------------------------------------------------------

_COUNT_COLOR = "#3b6fb6"
_WEIGHT_COLOR = "#d9682b"
_DPI = 100


def render_image(preview: TimestepPreview, width: int = 1024, height: int = 768) -> np.ndarray:
    """The preview as an RGB picture, uint8 ``[height, width, 3]``, drawn off-screen."""
    if width < 64 or height < 64:
        raise MusubiError(f"image size must be at least 64x64, got {width}x{height}.")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    counts_axes, weights_axes = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    _draw_counts(counts_axes, preview)
    _draw_weights(weights_axes, preview)
    figure.suptitle(_title(preview, width // 9), fontsize=11)
    figure.tight_layout()
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3]
    return _fit(pixels, height, width)


def _draw_counts(axes, preview: TimestepPreview) -> None:
    counts = np.asarray(preview.counts, dtype=np.float64)
    edges = np.arange(NUM_BINS + 1)
    axes.stairs(counts, edges, fill=True, color=_COUNT_COLOR, alpha=0.55, linewidth=0)
    # A 25-timestep average on top shows the shape through the sampling noise.
    smooth = counts.reshape(-1, _BINS_PER_LINE).mean(axis=1)
    axes.stairs(smooth, edges[::_BINS_PER_LINE], color=_COUNT_COLOR, linewidth=1.8, label="average per 25")
    low, high = preview.settings.noise_level_range
    for start, stop in ((0, low * NUM_BINS), (high * NUM_BINS, NUM_BINS)):
        if stop > start:
            axes.axvspan(start, stop, color="#9a9a9a", alpha=0.15, linewidth=0)
    total = counts.sum()
    if total > 0:
        centres = edges[:-1] + 0.5
        mean = float((centres * counts).sum() / total)
        median = float(np.searchsorted(np.cumsum(counts), total / 2) + 0.5)
        axes.axvline(mean, color="#222222", linestyle="--", linewidth=1, label=f"mean {mean:.0f}")
        axes.axvline(median, color="#666666", linestyle=":", linewidth=1.3, label=f"median {median:.0f}")
    axes.legend(loc="upper left", frameon=False, fontsize=9)
    axes.set_ylim(0, max(float(counts.max()), 1.0) * 1.08)
    axes.set_title(f"Sampled timesteps ({int(total):,} draws)", fontsize=10, loc="left")
    axes.set_ylabel("count per timestep")
    _style(axes)


def _draw_weights(axes, preview: TimestepPreview) -> None:
    weights = np.asarray(preview.weights, dtype=np.float64)
    timesteps = np.arange(1, NUM_BINS + 1)
    scheme = preview.settings.weighting_scheme
    logarithmic = scheme == "sigma_sqrt"  # σ⁻² spans six decades
    axes.plot(timesteps, weights, color=_WEIGHT_COLOR, linewidth=1.6)
    axes.fill_between(timesteps, weights, float(weights.min()) if logarithmic else 0.0,
                      color=_WEIGHT_COLOR, alpha=0.18, linewidth=0)
    if logarithmic:
        axes.set_yscale("log")
    else:
        top = float(weights.max())
        axes.set_ylim(0, top * 1.15 if top > 0 else 1)
    note = "every sample weighs the same" if np.allclose(weights, weights[0]) else f"max {weights.max():.4g}"
    axes.set_title(f"Loss weighting ({scheme}: {note})", fontsize=10, loc="left")
    axes.set_ylabel("loss weight")
    axes.set_xlabel("timestep = 1000 · noise level  (0 clean → 1000 pure noise)")
    axes.set_xlim(0, NUM_BINS)
    _style(axes)


def _style(axes) -> None:
    axes.grid(True, color="#e3e3e3", linewidth=0.8)
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)


def _title(preview: TimestepPreview, width_chars: int) -> str:
    settings = preview.settings
    defaults = TimestepSettings()
    height, width = preview.latent_hw
    changed = [
        f"{name}={value}"
        for name, value in settings.to_dict().items()
        if name != "timestep_sampling" and value != getattr(defaults, name)
    ]
    lines = [f"{settings.timestep_sampling} — latent {height}×{width}"]
    lines += textwrap.wrap(", ".join(changed), width=max(20, width_chars))
    return "\n".join(lines)


def _fit(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop or pad (white) to exactly height×width, in case the canvas rounded its size."""
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    rows, cols = min(height, pixels.shape[0]), min(width, pixels.shape[1])
    out[:rows, :cols] = pixels[:rows, :cols]
    return out


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode an RGB uint8 picture as PNG."""
    from matplotlib.image import imsave

    buffer = io.BytesIO()
    imsave(buffer, pixels, format="png")
    return buffer.getvalue()


# --- command line ------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add_timestep_arguments(parser)
    parser.add_argument("--latent_height", type=int, default=128, help="cached latent height (image height / 8; default: %(default)s)")
    parser.add_argument("--latent_width", type=int, default=128, help="cached latent width (image width / 8; default: %(default)s)")
    parser.add_argument("--num_samples", type=int, default=100_000, help="how many noise levels to draw (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--show", choices=("console", "image"), default="console",
                        help="print musubi's text histogram, or write a PNG to --out (default: %(default)s)")
    parser.add_argument("--out", default=None, help="file to write: the PNG for --show image (required), the text for console")


def run_cli(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.show == "image" and not args.out:
        raise MusubiError("--show image writes a PNG file: add --out FILE.png.")
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            raise MusubiError(f"--out: folder {folder} does not exist; create it or choose another path.")
    preview = compute_preview(settings, latent_hw=(args.latent_height, args.latent_width),
                              num_samples=args.num_samples, seed=args.seed)
    if args.show == "image":
        write_bytes_atomically(args.out, png_bytes(render_image(preview)))
        print(f"wrote {args.out}")
        return 0
    text = console_text(preview)
    print(text)
    if args.out:
        write_bytes_atomically(args.out, (text + "\n").encode("utf-8"))
    return 0


