"""What a user sets for MagCache, and the checks every number list and count goes through.

:class:`MagCacheSettings` (threshold θ, K, retention ratio ρ, optional ratios) is what every node
and the library's runs are configured with; :func:`parse_ratio_string` reads ratios pasted as text.
The checks live here, below everything else in the package, so that calibrations, resampling and
the skip state can share their error messages without importing one another.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..errors import MusubiError


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


def checked_ratios(values: Any, option: str) -> list[float]:
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


def check_whole(value: Any, option: str, minimum: int) -> int:
    """``value`` when it is a whole number ≥ ``minimum``, or a MusubiError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MusubiError(f"{option} must be a whole number ≥ {minimum}, got {value!r}.")
    return value



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
            object.__setattr__(self, "ratios", tuple(checked_ratios(self.ratios, "MagCache ratios")))

    def validate(self) -> "MagCacheSettings":
        """Raise MusubiError for the first setting out of range; return self for chaining."""
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold) or self.threshold < 0:
            raise MusubiError(
                f"MagCache threshold must be a finite number ≥ 0, got {self.threshold!r} "
                "(0 turns caching off; 0.06–0.3 are usual)."
            )
        check_whole(self.K, "MagCache K (most steps skipped in a row)", 0)
        ratio = self.retention_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise MusubiError(
                f"MagCache retention_ratio must be in [0, 1), got {ratio!r}: it is the fraction of the first "
                "steps that is always computed (0.2 is usual)."
            )
        if self.ratios is not None:
            checked_ratios(self.ratios, "MagCache ratios")
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
