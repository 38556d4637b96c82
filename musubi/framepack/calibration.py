"""A MagCache calibration of FramePack from the per-section recordings of one sampling run.

Every section of a FramePack run is a fresh sampling run of ``steps`` steps, so a calibration run
records one curve per section (musubi-tuner prints one line per section). The saved curve is
their mean per step; the single curves stay in the file's ``extra.section_ratios``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..errors import MusubiError
from ..files import write_text_atomically
from ..magcache.core import CALIBRATION_FORMAT, CALIBRATION_VERSION, CalibrationRecorder

ARCHITECTURE = "framepack"


def section_calibration(recorders: Sequence[CalibrationRecorder], steps: int, extra: Mapping[str, Any] | None = None) -> dict:
    """The calibration file's content (the layout :func:`musubi.magcache.core.load_calibration_json` reads)."""
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
    import json

    payload = section_calibration(recorders, steps, extra)
    try:
        text = json.dumps(payload, indent=1)
    except TypeError as error:
        raise MusubiError(f"FramePack MagCache calibration: extra must hold JSON values only ({error}).") from None
    write_text_atomically(path, text + "\n")
    return payload
