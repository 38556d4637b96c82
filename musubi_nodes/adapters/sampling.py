"""Samples of the LoRA being trained, drawn through ComfyUI's own sampling path.

The training MODEL patcher carries the LoRA as hooks on its modules, so ``comfy.sample.sample``
on it gives what core KSampler gives on the same MODEL with that step's LoRA file loaded (up to
float rounding: the hooks add ``x·Aᵀ·Bᵀ`` instead of merging ``B·A`` into the weight). Wan 2.2
A14B samples as two KSamplerAdvanced would: the high-noise expert down to the first step below the
timestep boundary, keeping its leftover noise, the low-noise expert from there to the end.
FramePack samples one section with this pack's FramePack Sampler. Images and videos are decoded
with the given VAE into ComfyUI IMAGE frames ``[F, H, W, C]``.
"""

from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import torch

from ...musubi.errors import MusubiError
from ...musubi.training.expert_pair import ExpertPairAdapter
from ..framepack_sampler import MusubiFramePackSampler
from .framepack import ComfyFramePackAdapter

OPTION_NODE = "Training Samples"


def _model_of(adapter):
    return adapter.low_noise.model if isinstance(adapter, ExpertPairAdapter) else adapter.model


def _patch_size(model) -> int:
    patch = getattr(model.model.diffusion_model, "patch_size", 2)
    if isinstance(patch, (tuple, list)):
        patch = patch[-1]
    return int(patch or 1)


def zeroed(conditioning):
    """An empty negative the way core ConditioningZeroOut makes one (cfg 1 never uses it)."""
    out = []
    for tensor, options in conditioning:
        options = dict(options)
        if options.get("pooled_output") is not None:
            options["pooled_output"] = torch.zeros_like(options["pooled_output"])
        out.append([torch.zeros_like(tensor), options])
    return out


def latent_for(adapter, spec: dict, number: int) -> torch.Tensor:
    """The starting latent of one sample (zeros of the model's layout, or the given LATENT's first
    item), checked against the model and the VAE so a wrong input is named before training starts."""
    model = _model_of(adapter)
    where = f"{OPTION_NODE} (prompt {number})"
    vae = spec["vae"]
    if isinstance(adapter, ComfyFramePackAdapter):
        if spec.get("latent") is None:
            raise MusubiError(f"{where}: FramePack samples start from an image: connect VAE Encode of the start image "
                              "(HunyuanVideo VAE) to Training Samples' latent.")
        start = spec["latent"]["samples"][:1]
        if start.dim() != 5 or start.shape[1] != 16:
            raise MusubiError(f"{where}: latent has shape {list(start.shape)}; FramePack starts from the start image "
                              "encoded with VAE Encode and the HunyuanVideo VAE ([1, 16, 1, H/8, W/8]).")
        return start
    latent_format = model.model.latent_format
    channels, dims = latent_format.latent_channels, latent_format.latent_dimensions
    vae_channels, vae_dims = getattr(vae, "latent_channels", channels), getattr(vae, "latent_dim", dims)
    if vae_channels != channels or vae_dims != dims:
        raise MusubiError(
            f"{where}: the VAE makes {vae_channels}-channel {'video' if vae_dims == 3 else 'image'} latents but the "
            f"model uses {channels}-channel {'video' if dims == 3 else 'image'} latents; connect this model's own VAE "
            "(Wan 2.1/Qwen-Image: wan_2.1_vae, Wan 2.2 TI2V-5B: wan2.2_vae, HunyuanVideo: hunyuan_video_vae, FLUX: ae)."
        )
    if spec.get("latent") is not None:
        samples = spec["latent"]["samples"][:1]
        if samples.dim() == 4 and dims == 3:
            samples = samples.unsqueeze(2)
        if samples.shape[1] != channels and torch.count_nonzero(samples) == 0:
            samples = torch.zeros((1, channels, *samples.shape[2:]), dtype=samples.dtype)
        if samples.shape[1] != channels or samples.dim() != dims + 2:
            raise MusubiError(
                f"{where}: latent has shape {list(samples.shape)}, not a latent of this model "
                f"([1, {channels}, {'T, ' if dims == 3 else ''}H, W]); make it with this model's empty-latent or "
                "image-to-video node, or disconnect latent and set width/height/length."
            )
        return samples
    spatial = vae.spacial_compression_encode() if hasattr(vae, "spacial_compression_encode") else 8
    multiple = spatial * _patch_size(model)
    for option in ("width", "height"):
        if spec[option] % multiple:
            raise MusubiError(f"{where}: {option} {spec[option]} is not a multiple of {multiple} (the VAE's {spatial}× "
                              f"times the model's patch size {multiple // spatial}); use e.g. "
                              f"{max(multiple, spec[option] // multiple * multiple)}.")
    size = (spec["height"] // spatial, spec["width"] // spatial)
    if dims == 3:
        temporal = (vae.temporal_compression_decode() if hasattr(vae, "temporal_compression_decode") else None) or 4
        frames = (spec["length"] - 1) // temporal + 1
        return torch.zeros((1, channels, frames, *size))
    if spec["length"] != 1:
        raise MusubiError(f"{where}: this is an image model; set length to 1.")
    return torch.zeros((1, channels, *size))


def _framepack_clip_vision(positive, framepack_settings: dict | None):
    return positive[0][1].get("clip_vision_output") or (framepack_settings or {}).get("clip_vision_output")


def check_specs(adapter, specs: list[dict], framepack_settings: dict | None = None) -> None:
    """Every prompt's inputs against the model, before the first step (not at the first sample)."""
    for number, spec in enumerate(specs, start=1):
        latent_for(adapter, spec, number)
        if not isinstance(adapter, ComfyFramePackAdapter):
            continue
        if spec["cfg"] != 1 and spec.get("negative") is None:
            raise MusubiError(f"{OPTION_NODE} (prompt {number}): FramePack with cfg {spec['cfg']:g} needs a negative "
                              "prompt; connect one or set cfg to 1.")
        if _framepack_clip_vision(spec["positive"], framepack_settings) is None:
            raise MusubiError(f"{OPTION_NODE} (prompt {number}): FramePack samples need the start image's SigLIP "
                              "embedding: connect CLIP Vision Encode to FramePack Training Settings' clip_vision_output.")


def _interruptible(*_args) -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


def _ksampler(model, noise, latent, spec, positive, negative, **options) -> torch.Tensor:
    return comfy.sample.sample(model, noise, spec["steps"], spec["cfg"], spec["sampler_name"], spec["scheduler"],
                               positive, negative, latent, denoise=1.0, callback=_interruptible, disable_pbar=True,
                               seed=spec["seed"], **options)


def expert_switch_step(model, spec: dict, boundary: float) -> int:
    """The first step whose noise level is below ``boundary`` (as a fraction of 1000 timesteps):
    where the high-noise expert hands over."""
    sampler = comfy.samplers.KSampler(model, steps=spec["steps"], device=model.load_device, sampler=spec["sampler_name"],
                                      scheduler=spec["scheduler"], denoise=1.0, model_options=model.model_options)
    sampling = model.get_model_object("model_sampling")
    for index, sigma in enumerate(sampler.sigmas[:-1].tolist()):
        if float(sampling.timestep(torch.tensor(sigma))) / 1000.0 < boundary:
            return index
    return spec["steps"]


def sample_latent(adapter, spec: dict, positive, framepack_settings: dict | None = None) -> torch.Tensor:
    """One sample's denoised latent with the LoRA as it is now (the caller holds no grad, eval mode)."""
    negative = spec.get("negative") or zeroed(positive)
    latent = latent_for(adapter, spec, 0)
    if isinstance(adapter, ComfyFramePackAdapter):
        settings = framepack_settings or {}
        clip_vision = _framepack_clip_vision(positive, settings)
        output = MusubiFramePackSampler.execute(
            adapter.model, positive, clip_vision, {"samples": latent}, "f1" if settings.get("layout") == "f1" else "vanilla",
            1.0, 30, 1, int(settings.get("latent_window_size", 9)), spec["steps"], max(1.0, spec["cfg"]), 10.0, 0.0,
            spec["seed"], "off", 0.0, 0, 0.0, "auto", negative=spec.get("negative"),
        )
        return output.result[0]["samples"]
    model = _model_of(adapter)
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, spec["seed"], None)
    if not isinstance(adapter, ExpertPairAdapter):
        return _ksampler(model, noise, latent, spec, positive, negative)
    high = adapter.high_noise.model
    switch = expert_switch_step(model, spec, adapter.expert_boundary)
    if switch > 0:
        latent = _ksampler(high, noise, latent, spec, positive, negative, start_step=0, last_step=switch,
                           force_full_denoise=switch >= spec["steps"])
    if switch < spec["steps"]:
        zeros = torch.zeros(latent.size(), dtype=latent.dtype, layout=latent.layout, device="cpu")
        latent = _ksampler(model, zeros, latent, spec, positive, negative, disable_noise=True, start_step=switch,
                           last_step=10000, force_full_denoise=True)
    return latent


def decode(vae, latent: torch.Tensor) -> torch.Tensor:
    """IMAGE frames ``[F, H, W, C]`` of one sample (a video's frames in order)."""
    images = vae.decode(latent)
    if images.dim() == 5:
        images = images.reshape(-1, *images.shape[-3:])
    return images.float().cpu()


def draw_sample(adapter, spec: dict, positive, framepack_settings: dict | None = None) -> torch.Tensor:
    """Samples and decodes one prompt; the training model is put back on its device afterwards."""
    try:
        latent = sample_latent(adapter, spec, positive, framepack_settings)
        return decode(spec["vae"], latent)
    finally:
        activate = getattr(adapter, "activate", None)
        if callable(activate):
            activate()
