"""From a calibration's curve to one ratio per step of the run at hand.

A curve is measured at one step count, with one or two model calls per step (cond and uncond
interleaved) and, for Wan 2.2 A14B, across two networks. A run may have any step count and sample
one expert at a time. :func:`ratios_for_run` bridges the two: one value per step
(:func:`per_step_ratios`), resampled to the run's length (:func:`resample_ratios`), expert by
expert around the run's own hand-over step (:func:`expert_run_ratios`).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

from ..errors import MusubiError
from .calibration import EXPERTS, Calibration, expert_part
from .settings import check_whole, checked_ratios

RESAMPLE_METHODS = ("log", "nearest")
BRANCHES = ("mean", "cond", "uncond")


def _nearest_index(position: int, source_length: int, target_length: int) -> int:
    """round(position·(source_length−1)/(target_length−1)), ties to even, in exact arithmetic.

    This is musubi's (NumPy's) rounding of the same quotient: a true tie k + ½ is exact in floating
    point too, and no other quotient with so small a denominator rounds onto one.
    """
    return round(Fraction(position * (source_length - 1), target_length - 1))


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
    values = checked_ratios(ratios, "MagCache ratios")
    check_whole(num_steps, "number of sampling steps", 1)
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


def calibrated_to_run_step(calibrated_step: int, calibrated_steps: int, num_steps: int) -> int:
    """The run step at the same normalised time as a calibrated step (nearest, ties to even)."""
    if calibrated_steps == 1:
        return 0
    return round(Fraction(calibrated_step * (num_steps - 1), calibrated_steps - 1))


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
    check_whole(num_steps, "number of sampling steps", 1)
    if calibration.expert_switch_step is None:
        return resample_ratios(per_step_ratios(calibration, branch), num_steps, method)
    switch = run_switch_step(calibration, num_steps, expert_switch_step)
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
    check_whole(num_steps, "number of sampling steps", 1)
    check_whole(switch_step, "expert_switch_step", 0)
    if switch_step > num_steps:
        raise MusubiError(f"expert_switch_step {switch_step} is past the run's {num_steps} steps.")
    ratios = []
    if switch_step > 0:
        ratios += resample_ratios(high_noise_ratios, switch_step, method)
    if switch_step < num_steps:
        ratios += resample_ratios(low_noise_ratios, num_steps - switch_step, method)
    return ratios


def run_switch_step(calibration: Calibration, num_steps: int, expert_switch_step: int | None) -> int:
    if expert_switch_step is None:
        return scaled_switch_step(calibration.expert_switch_step, calibration.calibrated_steps, num_steps)
    check_whole(expert_switch_step, "expert_switch_step", 0)
    if expert_switch_step > num_steps:
        raise MusubiError(f"expert_switch_step {expert_switch_step} is past the run's {num_steps} steps.")
    return expert_switch_step
