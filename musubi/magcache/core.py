"""MagCache: skip whole transformer passes whose output change can be predicted from its magnitude.

MagCache (Ma et al., arXiv 2506.09045) rests on one observation: the residual a diffusion
transformer adds to its input, ``r_t = (hidden state leaving the last block) − (hidden state
entering the first block)``, changes slowly and almost only in magnitude from one sampling step to
the next, and the *ratio* of its magnitudes ``‖r_t‖ / ‖r_{t−1}‖`` follows a curve that hardly
depends on the prompt. Measured once per model (a *calibration*), that curve tells at run time how
far a cached residual has drifted; while the accumulated drift stays small the blocks are skipped
and the cached residual is added instead.

This module holds the decisions, state and statistics, free of any model code:

* :class:`MagCacheSettings` — threshold θ, K, retention ratio ρ, optional ratios;
* :class:`Calibration`, :func:`default_calibration`, :func:`default_key_for` — the published
  calibrations shipped in ``defaults.json`` and the settings their authors recommend;
* :func:`per_step_ratios`, :func:`resample_ratios`, :func:`ratios_for_run`,
  :func:`expert_run_ratios` — one ratio per step of the run at hand, whatever the calibration's
  layout and step count, with one curve or one per expert;
* :class:`MagCacheState` — the per-run controller: ``decide(step) -> skip?``;
* :class:`CalibrationRecorder`, :func:`load_calibration_json`, :func:`parse_ratio_string` — measure
  a model's own curve and move it around as text or JSON.

The skip rule (as in musubi-tuner): the first ``max(floor(ρ·n), 1)`` steps and the last step are
always computed. Any other step multiplies the accumulated ratio ``A`` by its ratio, adds
``|1 − A|`` to the accumulated error ``E`` and counts one more step in a row ``J``; it is skipped
when ``E ≤ θ`` and ``J ≤ K``, otherwise ``A, E, J`` return to ``1, 0, 0`` and the step is computed
(which refreshes the cache). ``≤`` is musubi's comparison (and that of the authors' HunyuanVideo,
FLUX and FramePack code); some of their other scripts use ``<``, which only differs when ``E`` lands
exactly on θ.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import MusubiError
from ..files import write_text_atomically

LAYOUTS = ("per_step", "interleaved")
RESAMPLE_METHODS = ("log", "nearest")
BRANCHES = ("mean", "cond", "uncond")
EXPERTS = ("high_noise", "low_noise")

CALIBRATION_FORMAT = "musubi-magcache-calibration"
CALIBRATION_VERSION = 1

_DEFAULTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "defaults.json")
# floor(ρ·n) of a product meant to be whole (0.29·100 = 28.999999999999996) must not lose a step.
_FLOOR_TOLERANCE = 1e-9
# Tokens are processed in slices of this many rows, so a calibration never holds a float32 copy of
# a whole video-sized residual.
_TOKEN_CHUNK = 16384


# ---------------------------------------------------------------------------------------------
# Ratio lists: parsing and checking
# ---------------------------------------------------------------------------------------------


def parse_ratio_string(text: str, option: str = "ratios") -> list[float]:
    """Numbers separated by commas, spaces or new lines (musubi's paste format), as floats.

    Surrounding brackets (a pasted Python or JSON list) are accepted. Every value must be a
    positive finite number; the error names the first bad token and its position.
    """
    if not isinstance(text, str):
        raise MusubiError(f"{option}: expected text with comma-separated numbers, got {type(text).__name__}.")
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    tokens = [token for token in re.split(r"[,;\s]+", body) if token]
    if not tokens:
        raise MusubiError(f"{option}: no numbers found; paste comma-separated ratios such as '1.00000,0.99817,0.99764'.")
    values = []
    for position, token in enumerate(tokens, start=1):
        try:
            value = float(token)
        except ValueError:
            raise MusubiError(
                f"{option}: value {position} {token!r} is not a number; separate the ratios with commas, "
                "spaces or new lines."
            ) from None
        if not math.isfinite(value) or value <= 0:
            raise MusubiError(f"{option}: value {position} {token!r} must be a positive finite number.")
        values.append(value)
    return values


def _checked_ratios(values: Any, option: str) -> list[float]:
    """``values`` as a list of positive finite floats, or a MusubiError naming ``option``."""
    if isinstance(values, str):
        return parse_ratio_string(values, option)
    if isinstance(values, (bytes, Mapping)) or not isinstance(values, Iterable):
        raise MusubiError(f"{option}: expected a list of numbers, got {type(values).__name__}.")
    checked = []
    for position, value in enumerate(values, start=1):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise MusubiError(f"{option}: value {position} ({value!r}) is not a number.")
        if not math.isfinite(value) or value <= 0:
            raise MusubiError(f"{option}: value {position} ({value!r}) must be a positive finite number.")
        checked.append(float(value))
    if not checked:
        raise MusubiError(f"{option}: the list of ratios is empty.")
    return checked


def _check_whole(value: Any, option: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MusubiError(f"{option} must be a whole number ≥ {minimum}, got {value!r}.")
    return value


def _nearest_index(position: int, source_length: int, target_length: int) -> int:
    """round(position·(source_length−1)/(target_length−1)), ties to even, in exact arithmetic.

    This is musubi's (NumPy's) rounding of the same quotient: a true tie k + ½ is exact in floating
    point too, and no other quotient with so small a denominator rounds onto one.
    """
    return round(Fraction(position * (source_length - 1), target_length - 1))


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MagCacheSettings:
    """What the user chooses: how much drift to tolerate and how often.

    ``threshold`` θ bounds the accumulated error (0 turns caching off); ``K`` bounds the steps
    skipped in a row (0 turns caching off); the first ``retention_ratio`` of the steps is always
    computed. ``ratios`` optionally replaces the calibration (one value per step, as printed by a
    calibration run). ``max_step_deviation`` optionally refuses to skip a step whose own ratio
    differs from 1 by more than this (the MagCache authors' FramePack rule, 0.06 there).
    """

    threshold: float = 0.24
    K: int = 6
    retention_ratio: float = 0.2
    ratios: tuple[float, ...] | None = None
    max_step_deviation: float | None = None

    def __post_init__(self) -> None:
        if self.ratios is not None and not isinstance(self.ratios, tuple):
            object.__setattr__(self, "ratios", tuple(_checked_ratios(self.ratios, "MagCache ratios")))

    def validate(self) -> "MagCacheSettings":
        """Raise MusubiError for the first setting out of range; return self for chaining."""
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold) or self.threshold < 0:
            raise MusubiError(
                f"MagCache threshold must be a finite number ≥ 0, got {self.threshold!r} "
                "(0 turns caching off; 0.06–0.3 are usual)."
            )
        _check_whole(self.K, "MagCache K (most steps skipped in a row)", 0)
        ratio = self.retention_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise MusubiError(
                f"MagCache retention_ratio must be in [0, 1), got {ratio!r}: it is the fraction of the first "
                "steps that is always computed (0.2 is usual)."
            )
        if self.ratios is not None:
            _checked_ratios(self.ratios, "MagCache ratios")
        deviation = self.max_step_deviation
        if deviation is not None and (isinstance(deviation, bool) or not isinstance(deviation, (int, float))
                                      or not math.isfinite(deviation) or deviation < 0):
            raise MusubiError(
                f"MagCache max_step_deviation must be a finite number ≥ 0 or None, got {deviation!r}."
            )
        return self

    @property
    def caching_enabled(self) -> bool:
        """False when the settings can never skip a step (θ = 0 or K = 0)."""
        return self.threshold > 0 and self.K > 0


# ---------------------------------------------------------------------------------------------
# Calibrations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """A measured magnitude-ratio curve and the settings recommended with it.

    ``ratios`` is full length with its leading pad: ``calibrated_steps`` values for layout
    ``per_step``, ``2·calibrated_steps`` for ``interleaved`` (cond, uncond per step). Two-expert
    models (Wan 2.2 A14B) have one curve across both experts; ``expert_switch_step`` is the first
    calibrated step of the low-noise expert and ``cache_first_expert`` says whether the authors let
    the high-noise expert skip at all. ``always_compute_steps`` are calibrated step indices the
    authors never skip.
    """

    key: str
    ratios: tuple[float, ...]
    calibrated_steps: int
    layout: str = "per_step"
    threshold: float = 0.24
    K: int = 6
    retention_ratio: float = 0.2
    source: str = ""
    expert_switch_step: int | None = None
    cache_first_expert: bool = True
    max_step_deviation: float | None = None
    always_compute_steps: tuple[int, ...] = ()
    notes: str = ""
    architecture: str | None = None

    def validate(self) -> "Calibration":
        """Raise MusubiError when lengths, layout or settings do not fit together."""
        where = f"MagCache calibration {self.key!r}"
        _checked_ratios(self.ratios, f"{where}: ratios")
        _check_whole(self.calibrated_steps, f"{where}: calibrated_steps", 1)
        if self.layout not in LAYOUTS:
            raise MusubiError(f"{where}: layout {self.layout!r} must be one of {', '.join(LAYOUTS)}.")
        per_call = 2 if self.layout == "interleaved" else 1
        if len(self.ratios) != per_call * self.calibrated_steps:
            raise MusubiError(
                f"{where}: {len(self.ratios)} ratios do not fit {self.calibrated_steps} steps with layout "
                f"{self.layout} (expected {per_call * self.calibrated_steps})."
            )
        if self.expert_switch_step is not None:
            _check_whole(self.expert_switch_step, f"{where}: expert_switch_step", 1)
            if self.expert_switch_step >= self.calibrated_steps:
                raise MusubiError(f"{where}: expert_switch_step must be below calibrated_steps ({self.calibrated_steps}).")
        for step in self.always_compute_steps:
            _check_whole(step, f"{where}: always_compute_steps", 0)
            if step >= self.calibrated_steps:
                raise MusubiError(f"{where}: always_compute_steps entry {step} is past the last calibrated step.")
        self.recommended_settings().validate()
        return self

    def recommended_settings(self) -> MagCacheSettings:
        """The settings published with this curve (ratios left to the calibration)."""
        return MagCacheSettings(
            threshold=self.threshold, K=self.K, retention_ratio=self.retention_ratio,
            max_step_deviation=self.max_step_deviation,
        )


@functools.lru_cache(maxsize=1)
def _default_table() -> dict[str, Calibration]:
    try:
        with open(_DEFAULTS_FILE, encoding="utf-8") as stream:
            data = json.load(stream)
    except (OSError, json.JSONDecodeError) as error:
        raise MusubiError(
            f"{_DEFAULTS_FILE}: the shipped MagCache calibrations cannot be read ({error}); reinstall the package."
        ) from error
    table = {}
    for key, entry in data["models"].items():
        table[key] = Calibration(
            key=key,
            ratios=tuple(float(value) for value in entry["ratios"]),
            calibrated_steps=entry["calibrated_steps"],
            layout=entry["layout"],
            threshold=float(entry["threshold"]),
            K=entry["K"],
            retention_ratio=float(entry["retention_ratio"]),
            source=entry["source"],
            expert_switch_step=entry.get("expert_switch_step"),
            cache_first_expert=entry.get("cache_first_expert", True),
            max_step_deviation=entry.get("max_step_deviation"),
            always_compute_steps=tuple(entry.get("always_compute_calibrated_steps", ())),
            notes=entry.get("notes", ""),
        ).validate()
    return table


def list_default_models() -> list[str]:
    """Keys of the shipped calibrations, in file order."""
    return list(_default_table())


def default_calibration(model_key: str, expert: str | None = None) -> Calibration:
    """A shipped calibration by key; for a two-expert model optionally one expert's part of it.

    ``expert`` (``"high_noise"`` or ``"low_noise"``) is for runs where each Wan 2.2 A14B expert is
    sampled on its own (two samplers, each seeing only its own steps): see :func:`expert_part`.
    """
    table = _default_table()
    if model_key not in table:
        raise MusubiError(
            f"MagCache model {model_key!r} is unknown; choose one of {', '.join(table)}, or calibrate the model "
            "and paste its ratios."
        )
    calibration = table[model_key]
    return calibration if expert is None else expert_part(calibration, expert)


def expert_part(calibration: Calibration, expert: str) -> Calibration:
    """One expert's stretch of a two-expert curve, as a calibration of its own.

    The high-noise part is the calibrated steps before the switch; the low-noise part the steps
    from the switch on, with the hand-over ratio (a dip that measures the change of network, not of
    the residual) replaced by the 1.0 pad a fresh run starts with. Where the authors never skip in
    the high-noise expert, its part recommends threshold 0 (never skip).
    """
    if expert not in EXPERTS:
        raise MusubiError(f"MagCache expert {expert!r} must be one of {', '.join(EXPERTS)}.")
    switch = calibration.expert_switch_step
    if switch is None:
        raise MusubiError(
            f"MagCache calibration {calibration.key!r} covers a single network; an expert can only be chosen for "
            "two-expert models (Wan 2.2 A14B)."
        )
    per_call = 2 if calibration.layout == "interleaved" else 1
    cut = switch * per_call
    if expert == "high_noise":
        ratios = calibration.ratios[:cut]
        steps = switch
        threshold = calibration.threshold if calibration.cache_first_expert else 0.0
    else:
        ratios = (1.0,) * per_call + calibration.ratios[cut + per_call:]
        steps = calibration.calibrated_steps - switch
        threshold = calibration.threshold
    return replace(
        calibration,
        key=f"{calibration.key}:{expert}",
        ratios=ratios,
        calibrated_steps=steps,
        threshold=threshold,
        expert_switch_step=None,
        cache_first_expert=True,
        always_compute_steps=(),
    ).validate()


# (architecture, variant) -> calibration keys, preferred first. Variants are matched without case.
_FAMILY_KEYS: dict[str, dict[str | None, tuple[str, ...]]] = {
    "wan": {
        "t2v_1.3B": ("wan2.1_t2v_1.3B",),
        "t2v_14B": ("wan2.1_t2v_14B",),
        "i2v_480p": ("wan2.1_i2v_480p_14B",),
        "i2v_720p": ("wan2.1_i2v_720p_14B",),
        "vace_1.3B": ("wan2.1_vace_1.3B",),
        "vace_14B": ("wan2.1_vace_14B",),
        "ti2v_5B": ("wan2.2_ti2v_5B",),
        "ti2v_5B_i2v": ("wan2.2_ti2v_5B_i2v",),
        "t2v_A14B": ("wan2.2_t2v_A14B",),
        "i2v_A14B": ("wan2.2_i2v_A14B",),
    },
    "hunyuan_video": {None: ("hunyuan_video",), "720p": ("hunyuan_video",), "544p": ("hunyuan_video_544p",)},
    "flux": {None: ("flux",)},
    # The ComfyUI-measured curves come first: this library runs under ComfyUI's implementations.
    "flux_kontext": {None: ("flux_kontext", "flux_kontext_diffusers_28steps")},
    "qwen_image": {
        None: ("qwen_image", "qwen_image_diffusers_50steps"),
        "edit": ("qwen_image_edit_diffusers_50steps",),
    },
    # The authors' FramePack curves, not musubi's default (a HunyuanVideo curve): variant "musubi".
    "framepack": {None: ("framepack",), "f1": ("framepack_f1",), "musubi": ("framepack_musubi_default",)},
    "framepack_f1": {None: ("framepack_f1",), "musubi_doc": ("framepack_f1_musubi_doc_example",)},
}


def default_key_for(architecture: str, variant: str | None = None, num_steps: int | None = None) -> str:
    """The shipped calibration for a model family (and variant), for ``num_steps`` sampling steps.

    Where a family has several curves, one measured at exactly ``num_steps`` wins (no resampling
    needed); otherwise the first listed, which is the one measured on ComfyUI's implementation.
    FramePack maps to the MagCache authors' FramePack curve; musubi-tuner's own default for
    FramePack is in fact HunyuanVideo's 544p curve, reachable as variant ``"musubi"``.
    """
    variants = _FAMILY_KEYS.get(architecture)
    if variants is None:
        raise MusubiError(
            f"MagCache has no calibration for architecture {architecture!r}; known: {', '.join(_FAMILY_KEYS)}. "
            "Calibrate the model and paste its ratios instead."
        )
    by_lower = {(name.lower() if name else None): keys for name, keys in variants.items()}
    wanted = variant.lower() if isinstance(variant, str) and variant else None
    if wanted not in by_lower:
        named = ", ".join(name for name in variants if name)
        need = "needs a variant" if variant is None else f"has no variant {variant!r}"
        raise MusubiError(f"MagCache: architecture {architecture!r} {need}; choose one of: {named}.")
    candidates = by_lower[wanted]
    if num_steps is not None:
        table = _default_table()
        for key in candidates:
            if table[key].calibrated_steps == num_steps:
                return key
    return candidates[0]


# ---------------------------------------------------------------------------------------------
# One ratio per step of the run
# ---------------------------------------------------------------------------------------------


def per_step_ratios(calibration: Calibration, branch: str = "mean") -> list[float]:
    """One ratio per calibrated step, whatever the calibration's layout.

    Interleaved curves hold a cond and an uncond ratio per step. Here one decision serves both
    passes of a step (under ComfyUI they usually run as one batched call, and skipping one branch
    but not the other would mix a fresh and a stale prediction in the CFG difference), so the two
    are merged into their geometric mean ``√(r_cond·r_uncond)``. Being a mean in log space, it
    makes the product over any span — the accumulated ratio MagCache compares — the geometric mean
    of the two branches' products, and it lies between them; a batched calibration measures nearly
    the same (the mean over both halves' tokens). The published pairs agree to a few 1e−5 except at
    Wan 2.2 A14B's expert hand-over. ``branch="cond"`` or ``"uncond"`` picks one side instead.
    """
    if branch not in BRANCHES:
        raise MusubiError(f"MagCache branch {branch!r} must be one of {', '.join(BRANCHES)}.")
    if calibration.layout == "per_step":
        return list(calibration.ratios)
    cond = calibration.ratios[0::2]
    uncond = calibration.ratios[1::2]
    if branch == "cond":
        return list(cond)
    if branch == "uncond":
        return list(uncond)
    return [math.sqrt(a * b) for a, b in zip(cond, uncond)]


def resample_ratios(ratios: Sequence[float], num_steps: int, method: str = "log") -> list[float]:
    """A per-step ratio curve measured at ``L`` steps, for a run of ``num_steps`` steps.

    ``"nearest"`` is musubi's (and the MagCache authors') rule: step ``j`` takes the calibrated
    ratio at index ``round(j·(L−1)/(n−1))``, ties to even; one step takes the last value.

    ``"log"`` (default) keeps the meaning of a ratio. Calibrated step ``i`` sits at normalised time
    ``i/(L−1)`` and its ratio is ``‖r_i‖/‖r_{i−1}‖``, so the log-magnitude of the residual relative
    to step 0 is ``M_i = Σ_{k=1..i} log r_k``. Taking ``M`` as piecewise linear in normalised time
    and reading it at the run's steps ``j/(n−1)`` gives ``r'_j = exp(M(j/(n−1)) − M((j−1)/(n−1)))``:

    * a coarser step spanning several calibrated steps gets the *product* of their ratios (the
      magnitude really changes by that much between two of its steps — nearest indexing would
      hand it a single fine ratio and under-estimate the drift, so skip too eagerly);
    * a finer step gets the matching root (half a calibrated step: ``√r``);
    * the product over the whole run equals the calibrated one, ``n == L`` returns the input, and a
      monotone curve stays monotone (each ``log r'_j`` is a sliding equal-width average of the
      piecewise-constant ``log r``).

    The leading value (the pad before step 0, which has no predecessor) is kept as is.
    """
    if method not in RESAMPLE_METHODS:
        raise MusubiError(f"MagCache resampling method {method!r} must be one of {', '.join(RESAMPLE_METHODS)}.")
    values = _checked_ratios(ratios, "MagCache ratios")
    _check_whole(num_steps, "number of sampling steps", 1)
    length = len(values)
    if num_steps == length:
        return list(values)
    if method == "nearest":
        if num_steps == 1:
            return [values[-1]]
        return [values[_nearest_index(j, length, num_steps)] for j in range(num_steps)]
    if num_steps == 1:
        return [values[0]]
    if length == 1:
        raise MusubiError("MagCache ratios: one value holds no curve to resample; give one ratio per calibrated step.")
    cumulative = [0.0]
    for value in values[1:]:
        cumulative.append(cumulative[-1] + math.log(value))

    def log_magnitude(position: Fraction) -> float:
        scaled = position * (length - 1)
        left = min(int(scaled), length - 2)
        weight = float(scaled - left)
        return cumulative[left] + weight * (cumulative[left + 1] - cumulative[left])

    resampled = [values[0]]
    previous = log_magnitude(Fraction(0))
    for j in range(1, num_steps):
        current = log_magnitude(Fraction(j, num_steps - 1))
        resampled.append(math.exp(current - previous))
        previous = current
    return resampled


def scaled_switch_step(calibrated_switch: int, calibrated_steps: int, num_steps: int) -> int:
    """Where a run of ``num_steps`` most likely hands over to the low-noise expert.

    With the same sampler and shift, the hand-over happens at the same *fraction* of the run;
    ties round to even. Pass the real step when the sampler knows it.
    """
    return round(Fraction(calibrated_switch * num_steps, calibrated_steps))


def ratios_for_run(
    calibration: Calibration,
    num_steps: int,
    method: str = "log",
    branch: str = "mean",
    expert_switch_step: int | None = None,
) -> list[float]:
    """One ratio per step of a run of ``num_steps``, from any calibration.

    Two-expert curves are resampled expert by expert: the high-noise stretch onto the run's steps
    before ``expert_switch_step`` and the low-noise stretch onto the rest, so the hand-over falls
    on the run's own switch step whatever the step count (see :func:`scaled_switch_step` for the
    default). The switch step's ratio is the 1.0 pad: that step is always computed.
    """
    _check_whole(num_steps, "number of sampling steps", 1)
    if calibration.expert_switch_step is None:
        return resample_ratios(per_step_ratios(calibration, branch), num_steps, method)
    switch = _run_switch_step(calibration, num_steps, expert_switch_step)
    high, low = (per_step_ratios(expert_part(calibration, expert), branch) for expert in EXPERTS)
    return expert_run_ratios(high, low, num_steps, switch, method)


def expert_run_ratios(
    high_noise_ratios: Sequence[float],
    low_noise_ratios: Sequence[float],
    num_steps: int,
    switch_step: int,
    method: str = "log",
) -> list[float]:
    """One ratio per step of a two-expert run from a separate per-step curve for each expert.

    The high-noise curve is resampled onto steps ``[0, switch_step)``, the low-noise one onto
    ``[switch_step, num_steps)``; its first value lands on the switch step, which is always
    computed, so that value never counts. Use with ``MagCacheState(expert_switch_step=…)``.
    """
    _check_whole(num_steps, "number of sampling steps", 1)
    _check_whole(switch_step, "expert_switch_step", 0)
    if switch_step > num_steps:
        raise MusubiError(f"expert_switch_step {switch_step} is past the run's {num_steps} steps.")
    ratios = []
    if switch_step > 0:
        ratios += resample_ratios(high_noise_ratios, switch_step, method)
    if switch_step < num_steps:
        ratios += resample_ratios(low_noise_ratios, num_steps - switch_step, method)
    return ratios


def _run_switch_step(calibration: Calibration, num_steps: int, expert_switch_step: int | None) -> int:
    if expert_switch_step is None:
        return scaled_switch_step(calibration.expert_switch_step, calibration.calibrated_steps, num_steps)
    _check_whole(expert_switch_step, "expert_switch_step", 0)
    if expert_switch_step > num_steps:
        raise MusubiError(f"expert_switch_step {expert_switch_step} is past the run's {num_steps} steps.")
    return expert_switch_step


# ---------------------------------------------------------------------------------------------
# The per-run controller
# ---------------------------------------------------------------------------------------------


class MagCacheState:
    """Decides, step by step, whether a sampling run may skip the transformer blocks.

    Ask :meth:`decide` once per sampling *step* (not per model call): asking again for the same
    step returns the same answer without counting it twice, so a sampler that calls the model
    once for cond and once for uncond shares one decision. A step index lower than the last one
    starts a new run (as does :meth:`reset`). A step that jumps ahead (steps never asked about)
    accumulates the product of the ratios it passes over.

    With ``expert_switch_step`` s, steps ``[0, s)`` and ``[s, n)`` belong to two different networks
    (Wan 2.2 A14B): the accumulators restart at s, step s is always computed (the cached residual
    belongs to the other network), the retention applies to each expert's stretch, and
    ``cache_first_expert=False`` computes every step before s. ``always_compute_steps`` lists run
    steps never skipped.

    ``ratios`` (one per step, resampled with ``resample_method`` when their count differs from
    ``num_steps``) default to ``settings.ratios``; :meth:`for_run` builds them from a calibration.
    """

    def __init__(
        self,
        settings: MagCacheSettings,
        num_steps: int,
        ratios: Sequence[float] | None = None,
        *,
        resample_method: str = "log",
        expert_switch_step: int | None = None,
        cache_first_expert: bool = True,
        always_compute_steps: Iterable[int] = (),
    ) -> None:
        self.settings = settings.validate()
        self.num_steps = _check_whole(num_steps, "number of sampling steps", 1)
        if ratios is None:
            ratios = settings.ratios
        if ratios is None:
            raise MusubiError("MagCache needs ratios: pick a calibration or paste the ratios of one.")
        self.ratios = resample_ratios(ratios, num_steps, resample_method)
        if expert_switch_step is not None:
            _check_whole(expert_switch_step, "expert_switch_step", 0)
            if expert_switch_step > num_steps:
                raise MusubiError(f"expert_switch_step {expert_switch_step} is past the run's {num_steps} steps.")
        self.expert_switch_step = expert_switch_step
        self.cache_first_expert = bool(cache_first_expert)
        self.always_compute_steps = frozenset(
            _check_whole(step, "always_compute_steps entry", 0) for step in always_compute_steps
        )
        self._first_skippable = self._skippable_starts()
        self.reset()

    @classmethod
    def for_run(
        cls,
        settings: MagCacheSettings,
        num_steps: int,
        calibration: Calibration | None = None,
        *,
        resample_method: str = "log",
        branch: str = "mean",
        expert_switch_step: int | None = None,
    ) -> "MagCacheState":
        """A controller for one run: ratios from ``settings.ratios`` when given, else from ``calibration``.

        A two-expert calibration resamples each expert's stretch onto its part of the run (switch
        at ``expert_switch_step``, or at the same fraction of the run as in the calibration) and
        brings its ``cache_first_expert``; a calibration's never-skipped steps are mapped onto the
        run. Pasted ratios bring nothing but the curve.
        """
        if settings.ratios is not None:
            return cls(settings, num_steps, settings.ratios, resample_method=resample_method,
                       expert_switch_step=expert_switch_step)
        if calibration is None:
            raise MusubiError("MagCache needs ratios: pick a calibration or paste the ratios of one.")
        switch = expert_switch_step
        if calibration.expert_switch_step is not None or expert_switch_step is not None:
            switch = _run_switch_step(calibration, num_steps, expert_switch_step)
        forced = {_calibrated_to_run_step(step, calibration.calibrated_steps, num_steps)
                  for step in calibration.always_compute_steps}
        ratios = ratios_for_run(calibration, num_steps, resample_method, branch, switch)
        return cls(settings, num_steps, ratios, resample_method=resample_method, expert_switch_step=switch,
                   cache_first_expert=calibration.cache_first_expert, always_compute_steps=forced)

    # -- run bookkeeping ------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the run: accumulators, cache validity and counters start afresh."""
        self.accumulated_ratio = 1.0
        self.accumulated_error = 0.0
        self.skips_in_a_row = 0
        self._last_step = -1
        self._last_skip = False
        self.computed_step_indices: list[int] = []
        self.skipped_step_indices: list[int] = []

    @property
    def computed_steps(self) -> int:
        return len(self.computed_step_indices)

    @property
    def skipped_steps(self) -> int:
        return len(self.skipped_step_indices)

    def summary(self) -> str:
        """One line for the log: how many steps were skipped, and which."""
        decided = self.computed_steps + self.skipped_steps
        if not self.skipped_step_indices:
            return f"MagCache: no step skipped ({decided} of {self.num_steps} steps computed)."
        listed = ", ".join(str(step) for step in self.skipped_step_indices)
        return (f"MagCache: skipped {self.skipped_steps} of {decided} steps ({listed}); "
                f"{self.computed_steps} full passes.")

    # -- the decision ---------------------------------------------------------------------------

    def decide(self, step_index: int, cache_ready: bool = True) -> bool:
        """True when step ``step_index`` may skip the blocks and reuse the cached residual.

        ``cache_ready=False`` tells that no usable residual is cached (for instance the batch shape
        changed): the step is then computed and the accumulators restart.
        """
        if isinstance(step_index, bool) or not isinstance(step_index, int) or not 0 <= step_index < self.num_steps:
            raise MusubiError(
                f"MagCache step index {step_index!r} is outside the run's {self.num_steps} steps (0–{self.num_steps - 1})."
            )
        if step_index == self._last_step:
            return self._last_skip
        if step_index < self._last_step:
            self.reset()
        skip = self._decide_new_step(step_index, cache_ready)
        (self.skipped_step_indices if skip else self.computed_step_indices).append(step_index)
        self._last_step, self._last_skip = step_index, skip
        return skip

    def _decide_new_step(self, step: int, cache_ready: bool) -> bool:
        previous = self._last_step
        if previous < 0 or not self._is_candidate(step) or self._crosses_switch(previous, step):
            return self._compute()
        step_ratio = math.prod(self.ratios[previous + 1:step + 1])
        self.accumulated_ratio *= step_ratio
        self.accumulated_error += abs(1.0 - self.accumulated_ratio)
        self.skips_in_a_row += 1
        settings = self.settings
        skip = (cache_ready
                and self.accumulated_error <= settings.threshold
                and self.skips_in_a_row <= settings.K)
        if skip and settings.max_step_deviation is not None:
            skip = abs(1.0 - step_ratio) <= settings.max_step_deviation
        return True if skip else self._compute()

    def _compute(self) -> bool:
        self.accumulated_ratio = 1.0
        self.accumulated_error = 0.0
        self.skips_in_a_row = 0
        return False

    def _skippable_starts(self) -> list[tuple[int, int]]:
        """(first skippable step, end of stretch) per expert stretch that may skip at all."""
        switch = self.expert_switch_step
        segments = [(0, self.num_steps)] if switch is None else [(0, switch), (switch, self.num_steps)]
        starts = []
        for index, (start, end) in enumerate(segments):
            if end <= start or (index == 0 and switch is not None and not self.cache_first_expert):
                continue
            retained = max(math.floor(self.settings.retention_ratio * (end - start) + _FLOOR_TOLERANCE), 1)
            starts.append((start + retained, end))
        return starts

    def _is_candidate(self, step: int) -> bool:
        if not self.settings.caching_enabled or step == self.num_steps - 1 or step in self.always_compute_steps:
            return False
        return any(first <= step < end for first, end in self._first_skippable)

    def _crosses_switch(self, previous: int, step: int) -> bool:
        switch = self.expert_switch_step
        return switch is not None and previous < switch <= step


def _calibrated_to_run_step(calibrated_step: int, calibrated_steps: int, num_steps: int) -> int:
    """The run step at the same normalised time as a calibrated step (nearest, ties to even)."""
    if calibrated_steps == 1:
        return 0
    return round(Fraction(calibrated_step * (num_steps - 1), calibrated_steps - 1))


# ---------------------------------------------------------------------------------------------
# Calibration runs
# ---------------------------------------------------------------------------------------------


@dataclass
class _StepStatistics:
    norm_ratio: float
    norm_std: float
    cos_dis: float


class CalibrationRecorder:
    """Measures a model's magnitude-ratio curve from the residuals of a run that skips nothing.

    Feed :meth:`record` the residual of every step (any shape with the hidden dimension last). Per
    step it keeps, over tokens, ``norm_ratio = mean(‖r_t‖/‖r_{t−1}‖)``, ``norm_std`` (the spread
    of that per-token ratio) and ``cos_dis = mean(1 − cos(r_t, r_{t−1}))``, each rounded to 5
    decimals. Statistics are computed in float32 whatever the residual's dtype. Tokens whose
    previous residual is exactly zero (padding) have no ratio and are left out of the ratio.

    When a step runs as several model calls (cond and uncond unbatched), record each call with the
    same ``step_index``, in the same order every step: the calls' tokens pool into one step, as a
    batched call would. The recorder keeps references to the last two steps' residuals; pass
    tensors nothing else writes to.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._finished: list[_StepStatistics] = []
        self._first_step = -1
        self._step = -1
        self._previous_parts: list[torch.Tensor] = []
        self._current_parts: list[torch.Tensor] = []
        self._current_ratios: list[torch.Tensor] = []
        self._current_cosines: list[torch.Tensor] = []

    @property
    def steps_recorded(self) -> int:
        return 0 if self._step < 0 else self._step - self._first_step + 1

    def record(self, residual: torch.Tensor, step_index: int | None = None) -> None:
        """Add the residual of step ``step_index`` (default: the step after the last one).

        A step index below the last one starts a new recording (a new run).
        """
        if not isinstance(residual, torch.Tensor) or residual.dim() < 1 or residual.shape[-1] == 0:
            raise MusubiError("MagCache calibration: the residual must be a tensor with the hidden dimension last.")
        step = self._step + 1 if step_index is None else step_index
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise MusubiError(f"MagCache calibration: step index {step_index!r} must be a whole number ≥ 0.")
        if step < self._step:
            self.reset()
        if self._step < 0:
            self._first_step = step
            self._start_step(step)
        elif step == self._step + 1:
            self._start_step(step)
        elif step != self._step:
            raise MusubiError(
                f"MagCache calibration: step {step} follows step {self._step}; every step must be computed and "
                "recorded (a calibration run skips nothing)."
            )
        self._add_part(residual.detach())

    def _start_step(self, step: int) -> None:
        if self._step >= 0:
            if self._previous_parts and len(self._current_parts) != len(self._previous_parts):
                raise MusubiError(
                    f"MagCache calibration: step {self._step} had {len(self._current_parts)} model calls but step "
                    f"{self._step - 1} had {len(self._previous_parts)}; record the same calls every step."
                )
            if self._current_ratios:
                self._finished.append(self._current_statistics())
        self._previous_parts = self._current_parts
        self._current_parts, self._current_ratios, self._current_cosines = [], [], []
        self._step = step

    def _add_part(self, residual: torch.Tensor) -> None:
        """Compare with the same call of the step before (when there is one), then keep it."""
        index = len(self._current_parts)
        if self._previous_parts:
            if index >= len(self._previous_parts):
                raise MusubiError(
                    f"MagCache calibration: step {self._step} has more model calls than step {self._step - 1} "
                    f"({len(self._previous_parts)}); record the same calls every step."
                )
            previous = self._previous_parts[index]
            if previous.shape != residual.shape:
                raise MusubiError(
                    f"MagCache calibration: the residual of step {self._step} has shape {tuple(residual.shape)} but "
                    f"the one before it {tuple(previous.shape)}; start a new recorder when the latent size changes "
                    "(for instance per FramePack section)."
                )
            ratios, cosines = _token_statistics(residual, previous)
            self._current_ratios.append(ratios)
            self._current_cosines.append(cosines)
        self._current_parts.append(residual)

    def _current_statistics(self) -> _StepStatistics:
        ratios = torch.cat(self._current_ratios)
        cosines = torch.cat(self._current_cosines)
        valid = ratios[torch.isfinite(ratios)]
        if valid.numel() == 0:
            raise MusubiError(
                f"MagCache calibration: the residual of step {self._step - 1} is zero everywhere, so step "
                f"{self._step} has no magnitude ratio; the model's blocks change nothing."
            )
        spread = valid.std().item() if valid.numel() > 1 else 0.0
        return _StepStatistics(
            norm_ratio=round(valid.mean().item(), 5),
            norm_std=round(spread, 5),
            cos_dis=round((1.0 - cosines).mean().item(), 5),
        )

    def _statistics(self) -> list[_StepStatistics]:
        finished = list(self._finished)
        if self._current_ratios:
            finished.append(self._current_statistics())
        return finished

    # -- results --------------------------------------------------------------------------------

    def ratios(self) -> list[float]:
        """One ratio per recorded step, starting with the 1.0 pad of the first step."""
        if self._step < 0:
            return []
        return [1.0] + [entry.norm_ratio for entry in self._statistics()]

    def norm_stds(self) -> list[float]:
        return [entry.norm_std for entry in self._statistics()]

    def cos_distances(self) -> list[float]:
        return [entry.cos_dis for entry in self._statistics()]

    def statistics(self) -> list[dict[str, float]]:
        """Per step from the second on: step, norm_ratio, norm_std, cos_dis."""
        return [
            {"step": step, "norm_ratio": entry.norm_ratio, "norm_std": entry.norm_std, "cos_dis": entry.cos_dis}
            for step, entry in enumerate(self._statistics(), start=self._first_step + 1)
        ]

    def as_paste_string(self) -> str:
        """``1.00000,0.99817,…``: the ratios with 5 decimals, ready to paste as MagCache ratios."""
        return ",".join(f"{value:.5f}" for value in self.ratios())

    def to_dict(self, architecture: str, steps: int | None = None, sampler: str = "", scheduler: str = "",
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The calibration as a JSON-ready dict (see :func:`load_calibration_json`)."""
        ratios = self.ratios()
        if len(ratios) < 2:
            raise MusubiError("MagCache calibration: record at least two steps before saving.")
        if steps is not None and steps != len(ratios):
            raise MusubiError(
                f"MagCache calibration: {len(ratios)} steps were recorded but the run has {steps}; "
                "finish the run (every step computed) before saving."
            )
        if not isinstance(architecture, str) or not architecture:
            raise MusubiError("MagCache calibration: name the model's architecture (for instance 'wan').")
        return {
            "format": CALIBRATION_FORMAT,
            "version": CALIBRATION_VERSION,
            "architecture": architecture,
            "steps": len(ratios),
            "sampler": sampler,
            "scheduler": scheduler,
            "layout": "per_step",
            "ratios": ratios,
            "norm_std": [0.0] + self.norm_stds(),
            "cos_dis": [0.0] + self.cos_distances(),
            "extra": dict(extra or {}),
        }

    def to_json(self, architecture: str, steps: int | None = None, sampler: str = "", scheduler: str = "",
                extra: Mapping[str, Any] | None = None) -> str:
        """The calibration as JSON text; ``norm_std`` and ``cos_dis`` carry a 0.0 pad like ``ratios``."""
        payload = self.to_dict(architecture, steps, sampler, scheduler, extra)
        try:
            return json.dumps(payload, indent=1)
        except TypeError as error:
            raise MusubiError(f"MagCache calibration: extra must hold JSON values only ({error}).") from error

    def save_json(self, path: str, architecture: str, steps: int | None = None, sampler: str = "",
                  scheduler: str = "", extra: Mapping[str, Any] | None = None) -> None:
        """Write :meth:`to_json` to ``path`` atomically (no half-written file on a crash)."""
        text = self.to_json(architecture, steps, sampler, scheduler, extra)
        write_text_atomically(path, text + "\n")


def _token_statistics(current: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ‖current‖/‖previous‖ (inf/nan where previous is zero) and cosine, as float32 on CPU."""
    width = current.shape[-1]
    current = current.reshape(-1, width)
    previous = previous.reshape(-1, width)
    ratios, cosines = [], []
    for start in range(0, current.shape[0], _TOKEN_CHUNK):
        now = current[start:start + _TOKEN_CHUNK].float()
        before = previous[start:start + _TOKEN_CHUNK].float()
        if not (torch.isfinite(now).all() and torch.isfinite(before).all()):
            raise MusubiError("MagCache calibration: a residual holds NaN or infinite values; the model run is broken.")
        norm_now = torch.linalg.vector_norm(now, dim=-1)
        norm_before = torch.linalg.vector_norm(before, dim=-1)
        ratio = torch.where(norm_before > 0, norm_now / norm_before, torch.full_like(norm_now, math.inf))
        ratios.append(ratio.cpu())
        cosines.append(F.cosine_similarity(now, before, dim=-1, eps=1e-8).cpu())
    return torch.cat(ratios), torch.cat(cosines)


def load_calibration_json(path: str) -> Calibration:
    """Read a calibration written by :meth:`CalibrationRecorder.save_json` and check it.

    The file may also name recommended ``threshold``, ``K`` and ``retention_ratio``; missing
    ones take :class:`MagCacheSettings`' defaults.
    """
    try:
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
    except FileNotFoundError:
        raise MusubiError(f"{path}: MagCache calibration file not found.") from None
    except json.JSONDecodeError as error:
        raise MusubiError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}).") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MusubiError(f"{path}: cannot read the MagCache calibration ({error}).") from None
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        raise MusubiError(
            f"{path}: not a MagCache calibration file (expected \"format\": \"{CALIBRATION_FORMAT}\"); "
            "write one with a calibration run."
        )
    version = data.get("version")
    if version != CALIBRATION_VERSION:
        raise MusubiError(f"{path}: calibration format version {version!r} is not supported (expected {CALIBRATION_VERSION}).")
    if not isinstance(data.get("ratios"), list):
        raise MusubiError(f"{path}: \"ratios\" must be a list of numbers, one per step.")
    ratios = _checked_ratios(data["ratios"], f"{path}: ratios")
    steps = data.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps != len(ratios):
        raise MusubiError(f"{path}: \"steps\" is {steps!r} but the file holds {len(ratios)} ratios; they must agree.")
    if data.get("layout", "per_step") != "per_step":
        raise MusubiError(f"{path}: layout {data.get('layout')!r} is not supported; a calibration file holds one ratio per step.")
    for name in ("norm_std", "cos_dis"):
        values = data.get(name)
        if values is None:
            continue
        numbers = isinstance(values, list) and all(
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) for value in values
        )
        if not numbers or len(values) != steps:
            raise MusubiError(f"{path}: \"{name}\" must be a list of {steps} finite numbers.")
    architecture = data.get("architecture")
    if not isinstance(architecture, str) or not architecture:
        raise MusubiError(f"{path}: \"architecture\" must name the model family (for instance \"wan\").")
    defaults = MagCacheSettings()
    calibration = Calibration(
        key=os.path.splitext(os.path.basename(path))[0],
        ratios=tuple(ratios),
        calibrated_steps=steps,
        layout="per_step",
        threshold=data.get("threshold", defaults.threshold),
        K=data.get("K", defaults.K),
        retention_ratio=data.get("retention_ratio", defaults.retention_ratio),
        source=path,
        architecture=architecture,
    )
    try:
        return calibration.validate()
    except MusubiError as error:
        raise MusubiError(f"{path}: {error}") from None
