"""A MagCache calibration: a model's measured magnitude-ratio curve and the settings that go with it.

MagCache (Ma et al., arXiv 2506.09045) rests on one observation: the residual a diffusion
transformer adds to its input, ``r_t = (hidden state leaving the last block) − (hidden state
entering the first block)``, changes slowly and almost only in magnitude from one sampling step to
the next, and the *ratio* of its magnitudes ``‖r_t‖ / ‖r_{t−1}‖`` follows a curve that hardly
depends on the prompt. That curve, measured once per model, is a :class:`Calibration`; it comes
from the published table (:mod:`.published`), from a file a calibration run wrote
(:func:`load_calibration_json`, written by :mod:`.recorder`), or from pasted numbers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace

from ..errors import MusubiError
from .settings import MagCacheSettings, check_whole, checked_ratios

LAYOUTS = ("per_step", "interleaved")
EXPERTS = ("high_noise", "low_noise")

CALIBRATION_FORMAT = "musubi-magcache-calibration"
CALIBRATION_VERSION = 1


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
        checked_ratios(self.ratios, f"{where}: ratios")
        check_whole(self.calibrated_steps, f"{where}: calibrated_steps", 1)
        if self.layout not in LAYOUTS:
            raise MusubiError(f"{where}: layout {self.layout!r} must be one of {', '.join(LAYOUTS)}.")
        per_call = 2 if self.layout == "interleaved" else 1
        if len(self.ratios) != per_call * self.calibrated_steps:
            raise MusubiError(
                f"{where}: {len(self.ratios)} ratios do not fit {self.calibrated_steps} steps with layout "
                f"{self.layout} (expected {per_call * self.calibrated_steps})."
            )
        if self.expert_switch_step is not None:
            check_whole(self.expert_switch_step, f"{where}: expert_switch_step", 1)
            if self.expert_switch_step >= self.calibrated_steps:
                raise MusubiError(f"{where}: expert_switch_step must be below calibrated_steps ({self.calibrated_steps}).")
        for step in self.always_compute_steps:
            check_whole(step, f"{where}: always_compute_steps", 0)
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


def load_calibration_json(path: str) -> Calibration:
    """Read a calibration written by :meth:`.recorder.CalibrationRecorder.save_json` and check it.

    The file may also name recommended ``threshold``, ``K`` and ``retention_ratio``; missing
    ones take :class:`.settings.MagCacheSettings`' defaults.
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
    ratios = checked_ratios(data["ratios"], f"{path}: ratios")
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
