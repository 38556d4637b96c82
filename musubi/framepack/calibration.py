"""FramePack's MagCache calibrations: which one a sampling run uses, and the one a calibration run records.

A run uses the MagCache authors' published curve for its direction, another published FramePack
curve, a saved calibration or pasted ratios (:func:`magcache_plan`); the choice is checked before
any section is sampled.

Every section of a FramePack run is a fresh sampling run of ``steps`` steps, so a calibration run
records one curve per section (musubi-tuner prints one line per section). The saved curve is
their mean per step; the single curves stay in the file's ``extra.section_ratios``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Mapping, Sequence

from ..errors import MusubiError
from ..files import write_text_atomically
from ..magcache.calibration import CALIBRATION_FORMAT, CALIBRATION_VERSION, load_calibration_json
from ..magcache.published import default_calibration
from ..magcache.recorder import CalibrationRecorder
from ..magcache.settings import MagCacheSettings, parse_ratio_string
from ..magcache.state import MagCacheState
from .sampling import MagCachePlan

ARCHITECTURE = "framepack"
MAGCACHE_MODES = ("on", "off", "calibrate")
# Published curves offered by name; "auto" picks the FramePack or F1 one by direction.
PUBLISHED_RATIOS = ("framepack", "framepack_f1", "framepack_musubi_default", "framepack_f1_musubi_doc_example")


def published_key(direction: str) -> str:
    """The MagCache authors' curve for a direction: F1's for ``f1``, vanilla FramePack's otherwise."""
    return "framepack_f1" if direction == "f1" else "framepack"


def magcache_plan(mode: str, direction: str, steps: int, threshold: float, K: int, retention_ratio: float, ratios: str,
                  pasted: str, *, saved_path: str | None, saved_folder: str) -> tuple[MagCachePlan | None, str]:
    """How MagCache takes part in a run, and a line for the report.

    ``mode`` is on, off or calibrate; ``ratios`` is "auto", a name from :data:`PUBLISHED_RATIOS` or
    a saved calibration, found at ``saved_path`` in ``saved_folder`` (None: not found); ``pasted``,
    when not blank, replaces it.
    """
    if mode == "off":
        return None, "MagCache off"
    if mode == "calibrate":
        if steps < 2:
            raise MusubiError("a MagCache calibration needs at least 2 steps (ratios compare consecutive steps).")
        return MagCachePlan(calibrate=True), "MagCache calibration (nothing skipped)"
    settings = MagCacheSettings(threshold=threshold, K=K, retention_ratio=retention_ratio).validate()
    if pasted and pasted.strip():
        values = tuple(parse_ratio_string(pasted, "pasted_ratios"))
        return MagCachePlan(make_state=lambda count: MagCacheState.for_run(replace(settings, ratios=values), count)), \
            f"MagCache pasted ratios ({len(values)} values)"
    key = published_key(direction) if ratios == "auto" else ratios
    if key in PUBLISHED_RATIOS:
        calibration = default_calibration(key)
    else:
        if saved_path is None:
            raise MusubiError(f"ratios {ratios!r} is neither a published FramePack curve nor a file in {saved_folder}.")
        calibration = load_calibration_json(saved_path)
        if calibration.architecture not in (None, "framepack"):
            raise MusubiError(f"{ratios} was measured on a {calibration.architecture} model, not FramePack; calibrate FramePack with magcache = calibrate.")
    if calibration.max_step_deviation is not None:
        settings = replace(settings, max_step_deviation=calibration.max_step_deviation)
    return (MagCachePlan(make_state=lambda count: MagCacheState.for_run(settings, count, calibration)),
            f"MagCache ratios {key}, threshold {threshold:g}, K {K}, retention_ratio {retention_ratio:g}")


def section_calibration(recorders: Sequence[CalibrationRecorder], steps: int, extra: Mapping[str, Any] | None = None) -> dict:
    """The calibration file's content (the layout :func:`musubi.magcache.calibration.load_calibration_json` reads)."""
    curves = [recorder.to_dict(ARCHITECTURE, steps) for recorder in recorders]
    if not curves:
        raise MusubiError("FramePack MagCache calibration: no section was recorded.")

    def mean(name: str) -> list[float]:
        return [round(sum(curve[name][i] for curve in curves) / len(curves), 5) for i in range(steps)]

    payload = dict(curves[0])
    payload.update({
        "format": CALIBRATION_FORMAT,
        "version": CALIBRATION_VERSION,
        "ratios": mean("ratios"),
        "norm_std": mean("norm_std"),
        "cos_dis": mean("cos_dis"),
        "sampler": "unipc_bh1",
        "scheduler": "framepack_shifted",
    })
    payload["extra"] = {**dict(extra or {}), "section_ratios": [curve["ratios"] for curve in curves]}
    return payload


def paste_string(ratios: Sequence[float]) -> str:
    return ",".join(f"{value:.5f}" for value in ratios)


def save_section_calibration(path: str, recorders: Sequence[CalibrationRecorder], steps: int,
                             extra: Mapping[str, Any] | None = None) -> dict:
    """Write the mean calibration to ``path`` atomically; returns what was written."""
    payload = section_calibration(recorders, steps, extra)
    try:
        text = json.dumps(payload, indent=1)
    except TypeError as error:
        raise MusubiError(f"FramePack MagCache calibration: extra must hold JSON values only ({error}).") from None
    write_text_atomically(path, text + "\n")
    return payload
