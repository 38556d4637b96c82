"""Train LoRA's engine from a shell: ``python -m musubi train --model comfyui`` (or ``wan``, …).

A checkpoint is loaded with ComfyUI's own model code used as a library — no server — exactly as
core *Load Diffusion Model* loads it (``weight_dtype`` as that node's), or block-scaled to FP8 as
*Load DiT (fp8 scaled)* does with ``fp8_scaled``. The cache items (the Training Dataset node's
caches or musubi-tuner's) become CONDITIONING the way the Training Dataset node hands them to
Train LoRA (:class:`..dataset.ComfyTrainingData`), and :func:`.prepare_training`, the function
Train LoRA calls, makes the model adapter, the Wan 2.2 A14B expert pair included: the node and the
command line train with the same code, and the same model, data, settings and seed give the same
LoRA.
"""

from __future__ import annotations

import os

import comfy.sd
import torch

from ...musubi import files
from ...musubi.architectures import COMFYUI_NATIVE, detect_architecture, family
from ...musubi.errors import MusubiError
from ...musubi.fp8 import FP8_FORMATS, is_scaled_fp8_state_dict
from ...musubi.training.expert_pair import DEFAULT_BOUNDARIES
from ...musubi.training.validation import ValidationSet
from ..dataset import ComfyTrainingData
from ..load_dit_fp8 import load_scaled_model, memory_summary, scaled_state_dict
from . import prepare_training_with_validation
from .comfy_model import architecture_of

WHERE = "model 'comfyui'"
# Core Load Diffusion Model's weight_dtype choices, plus plain casts; with fp8_scaled the compute dtype.
WEIGHT_DTYPES = {
    "default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
}


def from_checkpoint(dit: str | None = None, data=None, dit_high_noise: str | None = None,
                    timestep_boundary: float | None = None, fp8_scaled: bool = False, architecture: str = "auto",
                    weight_dtype: str = "default", fp8_format: str = "e4m3fn", validation_data=None):
    """The model adapter for ``dit`` (a ComfyUI-loadable single-file checkpoint) trained on ``data``
    (a cache folder dataset in musubi-tuner's layout), with its ``training_dataset``.

    ``dit_high_noise``: Wan 2.2 A14B's high-noise expert (``dit`` is then the low-noise one), split at
    ``timestep_boundary`` (default 0.875, or 0.9 for image-to-video experts). ``architecture``:
    ``auto`` (from the file) or the family the file must be. ``weight_dtype``: the frozen weights'
    dtype (default: what ComfyUI picks for the device); with ``fp8_scaled``, the compute dtype.
    ``validation_data``: a second cache folder dataset, offered as ``validation_dataset``.
    """
    if not dit:
        raise MusubiError(f"{WHERE}: name the checkpoint with dit = '<file>.safetensors' (Wan 2.2 A14B: the low-noise expert).")
    if weight_dtype not in WEIGHT_DTYPES:
        raise MusubiError(f"{WHERE}: weight_dtype {weight_dtype!r} is unknown; choose one of {', '.join(WEIGHT_DTYPES)}.")
    if fp8_scaled and weight_dtype.startswith("fp8"):
        raise MusubiError(f"{WHERE}: fp8_scaled stores the weights as fp8 itself; weight_dtype is then the compute dtype "
                          "(default, bf16, fp16 or fp32).")
    if fp8_format not in FP8_FORMATS:
        raise MusubiError(f"{WHERE}: fp8_format {fp8_format!r} is unknown; choose one of {', '.join(FP8_FORMATS)}.")
    if architecture != "auto" and architecture not in COMFYUI_NATIVE:
        raise MusubiError(f"{WHERE}: architecture {architecture!r} is not one ComfyUI loads; choose auto or one of "
                          f"{', '.join(COMFYUI_NATIVE)}.")
    cached = getattr(data, "cached_dataset", None)
    if not callable(cached):
        raise MusubiError(
            f"{WHERE} trains on caches in musubi-tuner's layout (<name>_<WWWW>x<HHHH>_<code>.safetensors with "
            "<name>_<code>_te.safetensors): the Training Dataset node's cache folder or musubi-tuner's, as data_dir, "
            "or a dataset config's cache_directory entries."
        )
    if architecture != "auto" and data.architecture != architecture:
        raise MusubiError(f"{WHERE}: the caches hold {family(data.architecture).title} latents, not {family(architecture).title}; "
                          "cache the data with this model's VAE and text encoder.")
    model = load_model(dit, data.architecture, fp8_scaled, weight_dtype, fp8_format, "dit")
    high_noise = None
    if dit_high_noise:
        high_noise = load_model(dit_high_noise, data.architecture, fp8_scaled, weight_dtype, fp8_format, "dit_high_noise")
        if timestep_boundary is None:
            timestep_boundary = DEFAULT_BOUNDARIES["i2v" if _takes_image_latents(model) else "t2v"]
    elif timestep_boundary is not None:
        raise MusubiError(f"{WHERE}: timestep_boundary is for Wan 2.2 A14B's two experts; set dit_high_noise too.")
    training_data = ComfyTrainingData(data.cached_dataset(), data.architecture)
    held = None
    if validation_data is not None:
        if not callable(getattr(validation_data, "cached_dataset", None)) or validation_data.architecture != data.architecture:
            raise MusubiError(f"{WHERE}: validation_data_dir must hold caches of the same family as the training data "
                              f"({family(data.architecture).title}), written by the Training Dataset node or musubi-tuner.")
        held = ComfyTrainingData(validation_data.cached_dataset(), validation_data.architecture)
        ValidationSet(held, where="validation_data_dir").check_matches(training_data, data.architecture)
    with torch.inference_mode(False), torch.enable_grad():
        adapter, items, held_items = prepare_training_with_validation(model, training_data, held, None, high_noise,
                                                                      timestep_boundary or 0.875)
    adapter.training_dataset = items
    adapter.validation_dataset = held_items
    lines = [f"dit {dit}: {_describe(model)}"]
    if high_noise is not None:
        lines.append(f"dit_high_noise {dit_high_noise}: {_describe(high_noise)}; experts split at t = {adapter.expert_boundary:g}")
    adapter.summary = "\n".join(lines)
    return adapter


def _describe(model) -> str:
    """The family, ComfyUI's model class and how the weights are held."""
    diffusion_model = model.model.diffusion_model
    dtype = str(model.model.get_dtype()).removeprefix("torch.")
    text = f"{family(architecture_of(model)).title} ({type(model.model).__name__})"
    if any(getattr(module, "quantized", False) for module in diffusion_model.modules()):
        return f"{text}, block-scaled fp8 computing in {dtype}: {memory_summary(diffusion_model)}"
    return f"{text}, weights in {dtype}"


def load_model(path: str, architecture: str, fp8_scaled: bool, weight_dtype: str, fp8_format: str, option: str):
    """The ComfyUI MODEL of the checkpoint at ``path``, checked (from its weight names, before
    loading) to be of ``architecture``, the family of the training data."""
    if not os.path.isfile(path):
        raise MusubiError(f"{WHERE}: {option} {path}: file not found.")
    header, _ = files.read_header(path)
    detected = detect_architecture(header)
    if detected == "framepack":
        raise MusubiError(f"{WHERE}: {option} {path} is a FramePack transformer; train it with --model framepack.")
    if detected not in COMFYUI_NATIVE:
        raise MusubiError(f"{WHERE}: {option} {path} is not a checkpoint of {', '.join(family(name).title for name in COMFYUI_NATIVE)} "
                          "(no known layout in its weight names).")
    if detected != architecture:
        raise MusubiError(f"{WHERE}: {option} {path} is a {family(detected).title} checkpoint, but the caches hold "
                          f"{family(architecture).title} latents; cache the data with this model's VAE and text encoder.")
    dtype = WEIGHT_DTYPES[weight_dtype]
    name = os.path.basename(path)
    if fp8_scaled or is_scaled_fp8_state_dict(header.keys()):
        state_dict, _, _, _ = scaled_state_dict(path, name, fp8_format=fp8_format, architecture=detected, where=WHERE)
        return load_scaled_model(state_dict, dtype, name, where=WHERE)
    options = {} if dtype is None else {"dtype": dtype}  # core Load Diffusion Model's call
    try:
        return comfy.sd.load_diffusion_model(path, model_options=options)
    except RuntimeError as error:
        raise MusubiError(f"{WHERE}: ComfyUI could not load {option} {path}: {error}") from error


def _takes_image_latents(model) -> bool:
    """Image-to-video experts take the image latents concatenated to the noise (Wan in_dim 36)."""
    config = getattr(model.model.model_config, "unet_config", {})
    return config.get("in_dim", 0) > config.get("out_dim", config.get("in_dim", 0))
