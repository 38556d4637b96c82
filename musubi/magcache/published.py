"""The published calibrations shipped in ``defaults.json``, and which one fits a model family.

The MagCache authors (and musubi-tuner) published curves for Wan 2.1/2.2, HunyuanVideo, FLUX.1,
Qwen-Image and FramePack, each with the settings they recommend. The file is read once; callers
pick an entry by key (:func:`default_calibration`) or by architecture, variant and step count
(:func:`default_key_for`).
"""

from __future__ import annotations

import functools
import json
import os

from ..errors import MusubiError
from .calibration import Calibration, expert_part

_DEFAULTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "defaults.json")


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
    sampled on its own (two samplers, each seeing only its own steps): see :func:`.calibration.expert_part`.
    """
    table = _default_table()
    if model_key not in table:
        raise MusubiError(
            f"MagCache model {model_key!r} is unknown; choose one of {', '.join(table)}, or calibrate the model "
            "and paste its ratios."
        )
    calibration = table[model_key]
    return calibration if expert is None else expert_part(calibration, expert)


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
