"""Training noise levels: how a flow-matching trainer draws them and weights their losses.

Every draw returns the noise level ``t`` in [0, 1] (0 = clean latent, 1 = pure noise), with
``x_t = (1 - t) * x0 + t * noise``. The option names and formulas are musubi-tuner's
(``--timestep_sampling``, ``--discrete_flow_shift``, ``--min_timestep`` ...), so a recipe written
for musubi-tuner means the same here. Where musubi-tuner misbehaves we differ on purpose:

* No "+1": musubi hands the model ``1000 * t + 1`` for the continuous methods, 1/1000 more noise
  than the latent really has. Here the model timestep is exactly ``1000 * t``.
* ``--preserve_distribution_shape`` never lets a value outside [min, max] through. musubi returns
  the last unconstrained batch when rejection sampling fails; we draw vectorised rounds and, if the
  range is too narrow to fill the batch within the budget, squeeze the remaining draws affinely into
  the range and warn once.
* ``sigma`` (the default method) behaves like the others: ``--discrete_flow_shift`` is applied
  (musubi ignores it), ``--min_timestep/--max_timestep`` bound the noise level to
  [min/1000, max/1000] (musubi inverts them), a positive ``--logit_mean`` with the ``logit_normal``
  scheme means *more* noise (as the logistic-normal draw of the ``sigmoid`` method does; musubi
  means less), an index of 1000 can never be produced, and the bucketed ``u`` and
  ``--preserve_distribution_shape`` are honoured (musubi ignores both). The draw stays on musubi's
  grid of noise levels {0.001, ..., 1.000} before the shift.
* Loss weights are computed from ``t`` directly (no nearest match through a discrete schedule, no
  warnings), in float32, with σ clamped to at least 1e-3 for ``sigma_sqrt`` so they are finite
  everywhere, and they are applied per sample (musubi's ``[B,1,1,1,1]`` weight mis-broadcasts
  against 4-D predictions).

The continuous methods keep musubi's formulas exactly, including the deterministic map from a
supplied uniform ``u`` to ``t`` (used with ``--num_timestep_buckets``). ``logit_mean`` of the
``logsnr`` method is a mean log-SNR, so there a positive value means *less* noise, as in musubi.
The ``logit_normal`` and ``mode`` schemes only shape the ``sigma`` method's draw, as in musubi.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ..errors import MusubiError

METHODS = ("uniform", "sigmoid", "shift", "flux_shift", "qwen_shift", "logsnr", "qinglong_flux", "qinglong_qwen", "sigma")
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")

# Methods whose shift grows with the latent size: (latent tokens at y1, y1, latent tokens at y2, y2).
_RESOLUTION_LINES = {
    "flux_shift": (256, 0.5, 4096, 1.15),
    "qinglong_flux": (256, 0.5, 4096, 1.15),
    "qwen_shift": (256, 0.5, 8192, 0.9),
    "qinglong_qwen": (256, 0.5, 8192, 0.9),
}

# The fixed log-SNR normal of the Qinglong recipes' "mostly clean" branch.
_QINGLONG_CLEAN_LOGSNR = (5.36, 1.0)

# The mode scheme's map is monotonic (so a density) only for scales in this range (SD3 paper).
_MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))

# Rejection sampling may draw this many values per requested one before giving up (musubi's
# budget: 1000 rounds of one batch); one round never draws more than _MAX_ROUND_DRAWS values.
_MAX_DRAWS_PER_SAMPLE = 1000
_MAX_ROUND_DRAWS = 1 << 20

# sigma_sqrt weights 1/σ²; below this σ the weight would explode (1e6 at the clamp already).
SIGMA_SQRT_MIN_SIGMA = 1e-3

_UNIFORM_CLAMP = 1e-7  # keeps Φ⁻¹(u) finite for u = 0 or 1


@dataclass(frozen=True)
class TimestepSettings:
    """The timestep options of one training run, with musubi-tuner's names and defaults.

    ``min_timestep``/``max_timestep`` are in 1/1000 of the noise level (None = 0 and 1000);
    ``num_timestep_buckets`` None means no stratification.
    """

    timestep_sampling: str = "sigma"
    discrete_flow_shift: float = 1.0
    sigmoid_scale: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    weighting_scheme: str = "none"
    mode_scale: float = 1.29
    min_timestep: int | None = None
    max_timestep: int | None = None
    preserve_distribution_shape: bool = False
    num_timestep_buckets: int | None = None

    def __post_init__(self):
        # Integers given for the float options (TOML ``shift = 3``) are stored as floats.
        for name, kind in _FIELD_KINDS.items():
            value = getattr(self, name)
            if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))

    def validate(self) -> "TimestepSettings":
        """Raise MusubiError naming the first bad option and what it accepts; return self."""
        for field in dataclasses.fields(self):
            _check_type(field.name, getattr(self, field.name))
        if self.timestep_sampling not in METHODS:
            raise MusubiError(f"timestep_sampling: unknown method {self.timestep_sampling!r}; choose one of {', '.join(METHODS)}.")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise MusubiError(f"weighting_scheme: unknown scheme {self.weighting_scheme!r}; choose one of {', '.join(WEIGHTING_SCHEMES)}.")
        for name in ("discrete_flow_shift", "sigmoid_scale", "logit_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise MusubiError(f"{name} must be a finite number > 0, got {value}.")
        for name in ("logit_mean", "mode_scale"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise MusubiError(f"{name} must be a finite number, got {value}.")
        low, high = _MODE_SCALE_RANGE
        if self.weighting_scheme == "mode" and not low <= self.mode_scale <= high:
            raise MusubiError(
                f"mode_scale must be between {low:g} and {high:.4f} for weighting_scheme 'mode' "
                f"(outside, the mode map is not monotonic), got {self.mode_scale}."
            )
        minimum = 0 if self.min_timestep is None else self.min_timestep
        maximum = 1000 if self.max_timestep is None else self.max_timestep
        if not 0 <= minimum < maximum <= 1000:
            raise MusubiError(
                f"min_timestep/max_timestep must satisfy 0 <= min_timestep < max_timestep <= 1000 "
                f"(noise level in 1/1000), got min_timestep={self.min_timestep}, max_timestep={self.max_timestep}."
            )
        if self.num_timestep_buckets is not None and self.num_timestep_buckets < 2:
            raise MusubiError(
                f"num_timestep_buckets must be at least 2 (or unset for no stratification), got {self.num_timestep_buckets}."
            )
        return self

    @property
    def noise_level_range(self) -> tuple[float, float]:
        """(a, b): the noise levels allowed by min_timestep/max_timestep."""
        minimum = 0 if self.min_timestep is None else self.min_timestep
        maximum = 1000 if self.max_timestep is None else self.max_timestep
        return minimum / 1000.0, maximum / 1000.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> "TimestepSettings":
        """Settings from a mapping (TOML table, node widgets); missing keys keep their defaults."""
        if not isinstance(values, Mapping):
            raise MusubiError(f"timestep settings must be a table of options, got {type(values).__name__}.")
        known = [field.name for field in dataclasses.fields(cls)]
        for key, value in values.items():
            if key not in known:
                raise MusubiError(f"unknown timestep option {key!r}; known options: {', '.join(known)}.")
            _check_type(key, value)
        return cls(**values).validate()


_FIELD_KINDS = {
    "timestep_sampling": "str",
    "discrete_flow_shift": "float",
    "sigmoid_scale": "float",
    "logit_mean": "float",
    "logit_std": "float",
    "weighting_scheme": "str",
    "mode_scale": "float",
    "min_timestep": "optional int",
    "max_timestep": "optional int",
    "preserve_distribution_shape": "bool",
    "num_timestep_buckets": "optional int",
}

_KIND_DESCRIPTIONS = {
    "str": "a string",
    "float": "a number",
    "bool": "true or false",
    "optional int": "an integer (or leave it unset)",
}


def _check_type(name: str, value) -> None:
    kind = _FIELD_KINDS[name]
    is_bool = isinstance(value, bool)
    ok = {
        "str": isinstance(value, str),
        "float": isinstance(value, (int, float)) and not is_bool,
        "bool": is_bool,
        "optional int": value is None or (isinstance(value, int) and not is_bool),
    }[kind]
    if not ok:
        raise MusubiError(f"{name} must be {_KIND_DESCRIPTIONS[kind]}, got {value!r} ({type(value).__name__}).")


# --- resolution-dependent shift ----------------------------------------------------------------


def resolution_shift(method: str, latent_height: int, latent_width: int) -> float:
    """S = exp(μ) of flux_shift/qwen_shift (and their qinglong mixtures) for a cached latent size.

    μ is the straight line through musubi's two anchor points, evaluated at the number of 2×2
    packed tokens ``(h//2)·(w//2)`` and not clamped, so it extrapolates for small or large latents.
    """
    if method not in _RESOLUTION_LINES:
        raise MusubiError(
            f"timestep_sampling {method!r} has no resolution-dependent shift; "
            f"use one of {', '.join(_RESOLUTION_LINES)}."
        )
    if latent_height < 1 or latent_width < 1:
        raise MusubiError(f"latent size must be positive, got {latent_height}x{latent_width}.")
    x1, y1, x2, y2 = _RESOLUTION_LINES[method]
    tokens = (latent_height // 2) * (latent_width // 2)
    mu = y1 + (y2 - y1) * (tokens - x1) / (x2 - x1)
    return math.exp(mu)


# --- drawing -----------------------------------------------------------------------------------


def stratified_uniforms(num_buckets: int, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One epoch's uniforms with every one of ``num_buckets`` equal intervals equally represented.

    Each interval [k/K, (k+1)/K) gets ceil(count/K) values; the list is shuffled and cut to
    ``count``, so a short epoch still covers the intervals evenly.
    """
    if num_buckets < 1:
        raise MusubiError(f"num_timestep_buckets must be at least 1, got {num_buckets}.")
    if count < 0:
        raise MusubiError(f"count must be >= 0, got {count}.")
    per_bucket = -(-count // num_buckets)
    bucket = torch.arange(num_buckets, dtype=torch.float32).repeat_interleave(per_bucket)
    values = (bucket + torch.rand(bucket.numel(), generator=generator)) / num_buckets
    return values[torch.randperm(values.numel(), generator=generator)][:count].contiguous()


def sample_noise_levels(
    settings: TimestepSettings,
    batch_size: int,
    latent_hw: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """Noise levels t ∈ [min/1000, max/1000] for one batch, float32 ``[batch_size]`` on the CPU.

    ``latent_hw`` is the cached latent's (height, width); flux_shift/qwen_shift need it. ``u``
    optionally gives each sample's uniform (from :func:`stratified_uniforms`), which replaces the
    random source: t then follows from u deterministically (except qinglong's branch choice).
    The model timestep is exactly ``1000 * t``.
    """
    settings.validate()
    if batch_size < 0:
        raise MusubiError(f"batch_size must be >= 0, got {batch_size}.")
    if u is not None:
        u = torch.as_tensor(u, dtype=torch.float32).reshape(-1).cpu()
        if u.numel() != batch_size:
            raise MusubiError(f"u must hold one uniform per sample: expected {batch_size}, got {u.numel()}.")
        if not bool(((u >= 0) & (u <= 1)).all()):
            raise MusubiError("u must hold uniforms in [0, 1].")
    draw = _base_sampler(settings, latent_hw, generator)
    low, high = settings.noise_level_range
    if not settings.preserve_distribution_shape:
        return low + (high - low) * draw(batch_size, u)
    return _sample_within(draw, batch_size, low, high, u, settings.num_timestep_buckets, generator)


def _base_sampler(settings: TimestepSettings, latent_hw, generator) -> Callable[[int, torch.Tensor | None], torch.Tensor]:
    """The method's draw over the whole [0, 1] range: (count, optional uniforms) -> t̃."""
    method = settings.timestep_sampling
    shift = settings.discrete_flow_shift
    if method in _RESOLUTION_LINES:
        if latent_hw is None:
            raise MusubiError(f"timestep_sampling {method!r} depends on the latent size: pass latent_hw=(height, width).")
        shift = resolution_shift(method, int(latent_hw[0]), int(latent_hw[1]))

    def normal(count: int, u: torch.Tensor | None) -> torch.Tensor:
        if u is None:
            return torch.randn(count, generator=generator)
        return _standard_normal_quantile(u)

    def shifted_sigmoid(count: int, u: torch.Tensor | None) -> torch.Tensor:
        return _flow_shift(torch.sigmoid(settings.sigmoid_scale * normal(count, u)), shift)

    def logsnr(count: int, u: torch.Tensor | None, mean: float = settings.logit_mean,
               std: float = settings.logit_std) -> torch.Tensor:
        return torch.sigmoid(-(mean + std * normal(count, u)) / 2)

    def clean_logsnr(count: int, u: torch.Tensor | None) -> torch.Tensor:
        return logsnr(count, u, *_QINGLONG_CLEAN_LOGSNR)

    def qinglong(count: int, u: torch.Tensor | None) -> torch.Tensor:
        # Each sample picks its branch with a fresh uniform (never from u), then uses its own u.
        choice = torch.rand(count, generator=generator)
        if method == "qinglong_flux":
            branches = [(choice < 0.79, shifted_sigmoid), ((choice >= 0.79) & (choice < 0.9), logsnr),
                        (choice >= 0.9, clean_logsnr)]
        else:
            branches = [(choice < 0.95, shifted_sigmoid), (choice >= 0.95, clean_logsnr)]
        t = torch.zeros(count)
        for mask, branch in branches:
            selected = int(mask.sum())
            if selected:
                t[mask] = branch(selected, None if u is None else u[mask])
        return t

    def draw(count: int, u: torch.Tensor | None) -> torch.Tensor:
        if method == "uniform":
            return torch.rand(count, generator=generator) if u is None else u.clone()
        if method == "sigmoid":
            return torch.sigmoid(settings.sigmoid_scale * normal(count, u))
        if method in ("shift", "flux_shift", "qwen_shift"):
            return shifted_sigmoid(count, u)
        if method == "logsnr":
            return logsnr(count, u)
        if method == "sigma":
            return _flow_shift(_sigma_grid_draw(settings, count, u, generator), shift)
        return qinglong(count, u)

    return draw


def _sigma_grid_draw(settings: TimestepSettings, count: int, u, generator) -> torch.Tensor:
    """The ``sigma`` method before its shift: a noise level on the grid {0.001, ..., 1.000}.

    The weighting scheme shapes a variable v ∈ [0, 1] that grows with the noise level (musubi's
    index counts down, which inverts the min/max range and the sign of logit_mean).
    """
    uniform = torch.rand(count, generator=generator) if u is None else u
    if settings.weighting_scheme == "logit_normal":
        v = torch.sigmoid(settings.logit_mean + settings.logit_std * _standard_normal_quantile(uniform))
    elif settings.weighting_scheme == "mode":
        v = 1 - uniform - settings.mode_scale * (torch.cos(math.pi * uniform / 2) ** 2 - 1 + uniform)
    else:
        v = uniform
    steps = torch.floor(v.clamp(0, 1) * 1000).clamp(max=999) + 1
    return steps / 1000


def _standard_normal_quantile(u: torch.Tensor) -> torch.Tensor:
    """Φ⁻¹(u) in float32, as musubi computes it (√2·erfinv(2u−1) with u clamped off 0 and 1)."""
    u = u.clamp(_UNIFORM_CLAMP, 1 - _UNIFORM_CLAMP)
    return math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)


def _flow_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = S·t / (1 + (S−1)·t): S > 1 moves mass towards high noise, keeps 0 and 1 fixed."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def _sample_within(draw, batch_size, low, high, u, buckets, generator) -> torch.Tensor:
    """Rejection sampling: keep the method's shape inside [low, high], never leave the range.

    The first round uses the supplied ``u`` (if any) slot by slot; later rounds draw fresh,
    stratified uniforms when buckets are set, and grow with the observed acceptance rate.
    """
    if u is None and buckets:
        u = stratified_uniforms(buckets, batch_size, generator)
    result = draw(batch_size, u)
    missing = torch.nonzero((result < low) | (result > high)).reshape(-1)
    drawn, accepted_total = batch_size, batch_size - missing.numel()
    budget = _MAX_DRAWS_PER_SAMPLE * batch_size
    round_size = max(64, batch_size)
    while missing.numel() and drawn < budget:
        if accepted_total:
            round_size = math.ceil(1.25 * missing.numel() * drawn / accepted_total) + 16
        else:
            round_size *= 2
        round_size = min(round_size, _MAX_ROUND_DRAWS, budget - drawn)
        round_u = stratified_uniforms(buckets, round_size, generator) if buckets else None
        candidates = draw(round_size, round_u)
        drawn += round_size
        accepted = candidates[(candidates >= low) & (candidates <= high)]
        accepted_total += accepted.numel()
        filled = min(accepted.numel(), missing.numel())
        result[missing[:filled]] = accepted[:filled]
        missing = missing[filled:]
    if missing.numel():
        warnings.warn(
            f"preserve_distribution_shape: only {batch_size - missing.numel()} of {batch_size} noise levels fell "
            f"inside [{low:g}, {high:g}] after {drawn} draws; the other {missing.numel()} were squeezed into the "
            f"range instead. Widen min_timestep/max_timestep or turn preserve_distribution_shape off.",
            RuntimeWarning,
            stacklevel=3,
        )
        fallback_u = stratified_uniforms(buckets, missing.numel(), generator) if buckets else None
        result[missing] = low + (high - low) * draw(missing.numel(), fallback_u)
    return result.clamp(low, high)


# --- loss weighting ----------------------------------------------------------------------------


def loss_weights(settings: TimestepSettings, t: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights for noise levels ``t`` (float32, same length as t, finite).

    sigma_sqrt: σ⁻² with σ = max(t, 1e-3) (at most 1e6); cosmap: 2 / (π(1 − 2σ + 2σ²));
    every other scheme: ones. Multiply per sample, e.g. with :func:`apply_loss_weights`.
    """
    settings.validate()
    sigma = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    if settings.weighting_scheme == "sigma_sqrt":
        return sigma.clamp(min=SIGMA_SQRT_MIN_SIGMA) ** -2
    if settings.weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    return torch.ones_like(sigma)


def apply_loss_weights(loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply a per-element loss ``[B, ...]`` by one weight per sample ``[B]``, whatever its rank."""
    weights = weights.reshape(-1)
    if loss.ndim == 0 or loss.shape[0] != weights.numel():
        raise MusubiError(f"loss weights: expected one weight per sample of a loss shaped {tuple(loss.shape)}, got {weights.numel()}.")
    return loss * weights.to(loss.dtype).reshape(-1, *([1] * (loss.ndim - 1)))


# --- command-line options ----------------------------------------------------------------------


def add_timestep_arguments(parser: argparse.ArgumentParser) -> None:
    """musubi-tuner's timestep options, with their names and defaults."""
    defaults = TimestepSettings()
    group = parser.add_argument_group("timestep sampling")
    group.add_argument("--timestep_sampling", choices=METHODS, default=defaults.timestep_sampling,
                       help="how noise levels are drawn (default: %(default)s)")
    group.add_argument("--discrete_flow_shift", type=float, default=defaults.discrete_flow_shift,
                       help="flow shift S of 'shift' and 'sigma': t' = S·t/(1+(S−1)·t) (default: %(default)s)")
    group.add_argument("--sigmoid_scale", type=float, default=defaults.sigmoid_scale,
                       help="scale of the normal inside the sigmoid of sigmoid/*shift/qinglong (default: %(default)s)")
    group.add_argument("--logit_mean", type=float, default=defaults.logit_mean,
                       help="mean of the normal of logsnr (log-SNR) and of the logit_normal scheme (default: %(default)s)")
    group.add_argument("--logit_std", type=float, default=defaults.logit_std,
                       help="standard deviation of that normal (default: %(default)s)")
    group.add_argument("--weighting_scheme", choices=WEIGHTING_SCHEMES, default=defaults.weighting_scheme,
                       help="loss weights (sigma_sqrt, cosmap) or the shape of the 'sigma' draw (logit_normal, mode) (default: %(default)s)")
    group.add_argument("--mode_scale", type=float, default=defaults.mode_scale,
                       help="scale of the 'mode' scheme (default: %(default)s)")
    group.add_argument("--min_timestep", type=int, default=None,
                       help="lowest noise level in 1/1000, 0..999 (default: 0)")
    group.add_argument("--max_timestep", type=int, default=None,
                       help="highest noise level in 1/1000, 1..1000 (default: 1000)")
    group.add_argument("--preserve_distribution_shape", action="store_true",
                       help="with min/max: keep the method's shape inside the range instead of squeezing it")
    group.add_argument("--num_timestep_buckets", type=int, default=None,
                       help="stratify each epoch's uniforms into this many buckets (>= 2; default: off)")


def settings_from_args(args: argparse.Namespace) -> TimestepSettings:
    """The validated settings from options added by :func:`add_timestep_arguments`."""
    names = [field.name for field in dataclasses.fields(TimestepSettings)]
    return TimestepSettings(**{name: getattr(args, name) for name in names}).validate()
