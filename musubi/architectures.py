"""The model families this library knows, and the checkpoint-key facts every part shares.

Every per-family table (fp8 quantization rules, LoRA presets, text-embedding layouts, cache file
codes, ComfyUI model classes) is keyed by :data:`FAMILY_NAMES`; tests check that none lacks a
family. ``generic`` stands for any other DiT where a table has a fallback (fp8, LoRA presets).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import MusubiError


@dataclass(frozen=True)
class Family:
    """One model family and the names other tools give it."""

    name: str  # this library's name, used as the key of every per-family table
    title: str  # for people
    cache_code: str  # musubi-tuner's short code in cache file names (``*_<code>.safetensors``)
    cache_architecture: str  # musubi-tuner's ``architecture`` value in cache metadata
    video: bool  # trains on videos as well as images
    comfyui_classes: tuple[str, ...]  # ComfyUI model classes (``comfy.model_base``) of this family


FAMILIES: tuple[Family, ...] = (
    Family("wan", "Wan 2.1/2.2", "wan", "wan", True, ("WAN21", "WAN22")),
    Family("hunyuan_video", "HunyuanVideo", "hv", "hunyuan_video", True, ("HunyuanVideo",)),
    Family("framepack", "FramePack", "fp", "framepack", True, ()),
    Family("flux", "FLUX.1 Kontext", "fk", "flux_kontext", False, ("Flux",)),
    Family("qwen_image", "Qwen-Image", "qi", "qwen_image", False, ("QwenImage",)),
)
FAMILY_NAMES: tuple[str, ...] = tuple(family.name for family in FAMILIES)
GENERIC = "generic"
WITH_GENERIC: tuple[str, ...] = FAMILY_NAMES + (GENERIC,)
VIDEO_FAMILIES: tuple[str, ...] = tuple(family.name for family in FAMILIES if family.video)
# Families ComfyUI itself loads (FramePack needs this pack's own loader).
COMFYUI_NATIVE: tuple[str, ...] = tuple(family.name for family in FAMILIES if family.comfyui_classes)
# ComfyUI model class name -> family name.
COMFYUI_CLASSES: dict[str, str] = {cls: family.name for family in FAMILIES for cls in family.comfyui_classes}


def family(name: str, where: str = "architecture") -> Family:
    """The family called ``name``, or an error naming the choices."""
    for candidate in FAMILIES:
        if candidate.name == name:
            return candidate
    raise MusubiError(f"{where}: {name!r} is not a known architecture; choose one of {', '.join(FAMILY_NAMES)}.")


# --- checkpoint keys ------------------------------------------------------------------------

WEIGHT_SUFFIX = ".weight"
SCALE_SUFFIX = ".scale_weight"  # the block-scaled fp8 layout's scale beside each quantized weight

# Key prefixes under which single-file checkpoints store the diffusion model.
MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def strip_model_prefix(key: str) -> str:
    """Drop a leading ``model.diffusion_model.`` or ``diffusion_model.``."""
    for prefix in MODEL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


_QWEN_MOD = re.compile(r"^transformer_blocks\.\d+\.(img|txt)_mod\.")
_DIFFUSERS_ATTENTION = re.compile(r"^transformer_blocks\.\d+\.attn\.to_q\.weight$")


def detect_architecture(keys: Iterable[str]) -> str:
    """Name the family from key names alone (any ``diffusion_model.`` prefix is ignored).

    What tells the layouts apart (ComfyUI's detection uses the same marks):
    Wan has ``head.modulation``; HunyuanVideo and FLUX both have ``double_blocks``, ``txt_in`` and
    ``vector_in``, but only HunyuanVideo has the token refiner ``txt_in.individual_token_refiner``
    (and a Conv3d ``img_in.proj``) while FLUX has a plain Linear ``img_in``; Qwen-Image and
    FramePack both use diffusers names (``transformer_blocks.N.attn.to_q``), but only Qwen-Image
    has ``img_mod``/``txt_norm`` and only FramePack (the diffusers HunyuanVideo layout) has the
    Conv3d ``x_embedder.proj`` and the ``context_embedder.token_refiner``. Anything else is
    "generic".
    """
    names = {strip_model_prefix(key) for key in keys}

    def starts(prefix: str) -> bool:
        return any(name.startswith(prefix) for name in names)

    if "head.modulation" in names:
        return "wan"
    if starts("double_blocks.") and (starts("txt_in.individual_token_refiner.") or "img_in.proj.weight" in names):
        return "hunyuan_video"
    if starts("double_blocks.") and "img_in.weight" in names:
        return "flux"
    if "txt_norm.weight" in names or any(_QWEN_MOD.match(name) for name in names):
        return "qwen_image"
    if any(_DIFFUSERS_ATTENTION.match(name) for name in names) and (
        "x_embedder.proj.weight" in names or starts("clean_x_embedder.") or starts("context_embedder.token_refiner.")
    ):
        return "framepack"
    return GENERIC


def resolve_architecture(architecture: str, keys: Iterable[str]) -> str:
    """``architecture`` itself, or the detected one for "auto"."""
    if architecture == "auto":
        return detect_architecture(keys)
    if architecture not in WITH_GENERIC:
        raise MusubiError(f"architecture={architecture!r} is unknown; choose auto or one of: {', '.join(WITH_GENERIC)}.")
    return architecture
