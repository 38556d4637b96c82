"""The training engine's model adapter for a ComfyUI MODEL.

ComfyUI turns each sample's CONDITIONING into model inputs with its own ``extra_conds``
(Wan i2v image latents and CLIP-vision, Flux guidance and Kontext reference latents,
Qwen-Image edit references, HunyuanVideo pooled text…), so every native architecture is
trained exactly as it samples. The model returns the denoised estimate ``x − σ·v`` in float32;
the velocity is recovered from it. The noise level handed to the model is the exact ``t``.
"""

from __future__ import annotations

import logging

import torch
import torch.utils.checkpoint

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers

from ..musubi.errors import MusubiError
from ..musubi.model_adapter import flow_matching_velocity

# ComfyUI model classes (and their subclasses) → the library's architecture names.
ARCHITECTURES = {"WAN21": "wan", "WAN22": "wan", "HunyuanVideo": "hunyuan_video", "Flux": "flux", "QwenImage": "qwen_image"}


def architecture_of(model) -> str:
    for cls in type(model.model).__mro__:
        if cls.__name__ in ARCHITECTURES:
            return ARCHITECTURES[cls.__name__]
    raise MusubiError(
        f"Train LoRA: {type(model.model).__name__} models are not supported; train Wan 2.1/2.2, "
        "HunyuanVideo, FLUX.1 (Kontext) or Qwen-Image models."
    )


def make_weights_usable_by_autograd(module: torch.nn.Module) -> None:
    """Loaders run under inference mode, and autograd refuses to save inference tensors for the
    backward pass (core's trainer fails on fp32 HunyuanVideo/Flux for this reason): give every
    such weight a normal copy, one tensor at a time. Call inside ``torch.inference_mode(False)``."""
    for child in module.modules():
        for name, tensor in list(child._parameters.items()):
            if tensor is not None and tensor.is_inference():
                child._parameters[name] = torch.nn.Parameter(tensor.clone(), requires_grad=False)
        for name, tensor in list(child._buffers.items()):
            if tensor is not None and tensor.is_inference():
                child._buffers[name] = tensor.clone()


def check_latent_layout(model, latents: list[torch.Tensor]) -> None:
    """Latents must be this model's own: its channel count and image (4-D) or video (5-D) layout."""
    latent_format = model.model.latent_format
    channels, dims = latent_format.latent_channels, latent_format.latent_dimensions + 1
    for index, latent in enumerate(latents):
        if latent.shape[0] != channels or latent.dim() != dims:
            kind = "video [C, T, H, W]" if dims == 4 else "image [C, H, W]"
            raise MusubiError(
                f"Train LoRA: sample {index} has a latent of shape {list(latent.shape)}, but this "
                f"{architecture_of(model)} model trains on {channels}-channel {kind} latents. Encode the "
                "training images or videos with the model's own VAE (VAE Encode)."
            )


def block_keys(diffusion_model) -> list[tuple[str, int]]:
    """The ("double_block"/"single_block", i) keys ComfyUI's block-replace patches use."""
    keys = []
    for attribute, kind in (("blocks", "double_block"), ("double_blocks", "double_block"),
                            ("transformer_blocks", "double_block"), ("single_blocks", "single_block")):
        blocks = getattr(diffusion_model, attribute, None)
        if isinstance(blocks, torch.nn.ModuleList):
            keys += [(kind, index) for index in range(len(blocks))]
    return keys


# ComfyUI's Flux-style blocks (Flux, HunyuanVideo) add to activations in place after saving them
# for the backward pass, which autograd refuses (core's trainer fails on HunyuanVideo without
# checkpointing for this reason). For them, tensors saved inside a block are kept as copies.
IN_PLACE_BLOCKS = {"flux", "hunyuan_video"}


def _copy_saved(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone()


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _run_block_keeping_saved_copies(args, extra):
    with torch.autograd.graph.saved_tensors_hooks(_copy_saved, _keep):
        return extra["original_block"](args)


def _run_block_checkpointed(args, extra):
    return torch.utils.checkpoint.checkpoint(extra["original_block"], args, use_reentrant=False)


class ComfyModelAdapter:
    """Predicts velocities with a loaded ComfyUI model; each batch names its items by ``index``."""

    def __init__(self, model, item_conds: list[dict]):
        self.model = model
        self.base_model = model.model
        self.architecture = architecture_of(model)
        self.item_conds = item_conds
        self.set_gradient_checkpointing(False)

    @classmethod
    def prepare(cls, model, conditionings: list, latents: list[torch.Tensor]) -> "ComfyModelAdapter":
        """Load the model and turn each sample's CONDITIONING into model inputs once."""
        check_latent_layout(model, latents)
        comfy.model_management.load_models_gpu([model])
        make_weights_usable_by_autograd(model.model.diffusion_model)
        device = model.load_device
        item_conds = []
        for conditioning, latent in zip(conditionings, latents):
            noise = latent.unsqueeze(0)
            conds = comfy.sampler_helpers.convert_cond(conditioning)
            conds = comfy.samplers.encode_model_conds(model.model.extra_conds, conds, noise, device, "positive",
                                                      latent_image=noise)
            model_conds = conds[0]["model_conds"]
            item_conds.append({key: value.process_cond(batch_size=1, device=device, area=None)
                               for key, value in model_conds.items()})
        return cls(model, item_conds)

    def lora_root(self) -> torch.nn.Module:
        return self.base_model.diffusion_model

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        run = None
        if enabled and self.architecture in IN_PLACE_BLOCKS:
            # ComfyUI's Flux/HunyuanVideo forwards build their block wrappers over a reused loop
            # variable, so a recomputed block would call the wrong block: train without it.
            logging.warning("Train LoRA: gradient checkpointing is not available for %s models yet; "
                            "training without it.", self.architecture)
            enabled = False
        if enabled:
            run = _run_block_checkpointed
        elif self.architecture in IN_PLACE_BLOCKS:
            run = _run_block_keeping_saved_copies
        replace = {key: run for key in block_keys(self.base_model.diffusion_model)} if run else {}
        self.transformer_options = {"patches_replace": {"dit": replace}} if replace else {}

    def velocity_target(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return flow_matching_velocity(latents, noise)

    def predict_velocity(self, noisy_latents: torch.Tensor, noise_level: torch.Tensor, batch) -> torch.Tensor:
        conds = comfy.samplers.cond_cat([self.item_conds[index] for index in batch["index"].tolist()])
        sigma = noise_level.to(noisy_latents.device, torch.float32)
        denoised = self.base_model.apply_model(noisy_latents, sigma, transformer_options=dict(self.transformer_options), **conds)
        shape = (-1,) + (1,) * (noisy_latents.dim() - 1)
        return (noisy_latents.float() - denoised) / sigma.clamp(min=1e-4).reshape(shape)
