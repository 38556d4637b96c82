"""The training engine's model adapter for a diffusers FramePack transformer, and its training data.

A FramePack training item is one *section* (see :mod:`.training_sections`): the target latents
``[C, window, H, W]`` plus their frame indices and the clean, 2x and 4x context with theirs, the
text (``context`` ``[L, 4096]`` from LLaVA-Llama3, ``pooled`` ``[768]`` from CLIP-L) and
``image_embeds`` ``[729, 1152]`` (SigLIP's last hidden state of the start image).
:func:`write_training_items` cuts a video latent into such items for ``python -m musubi train``.

Like musubi-tuner the model gets guidance 1.0 (×1000) and learns the velocity ``noise − latents``;
unlike it, the timestep is exactly ``1000·t`` (musubi-tuner hands ``1000·t + 1``).

The diffusers transformer takes one 1-D set of frame indices for the whole batch, so a batch whose
items have different index layouts (vanilla sections with different paddings) is run as one
forward per layout; items of equal layout (all F1 sections, say) share one forward.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..data import latent_cache
from ..errors import MusubiError
from ..training.adapter import flow_matching_velocity
from . import training_sections as sections
from .cache_items import IMAGE_EMBEDS_KEY, from_musubi_cache  # noqa: F401 (from_musubi_cache re-exported)
from .loading import load_transformer

ARCHITECTURE = "framepack"
CONTEXT_KEY = "context"
CONTEXT_MASK_KEY = "context_mask"
POOLED_KEY = "pooled"
SECTION_KEYS = (sections.CLEAN_LATENTS_KEY, sections.HISTORY_2X_KEY, sections.HISTORY_4X_KEY) + sections.INDEX_KEYS
REQUIRED_KEYS = (CONTEXT_KEY, POOLED_KEY, IMAGE_EMBEDS_KEY) + SECTION_KEYS
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class FramePackAdapter:
    """A frozen ``HunyuanVideoFramepackTransformer3DModel`` behind the trainer's adapter interface."""

    architecture = ARCHITECTURE

    def __init__(self, transformer: nn.Module, guidance_scale: float = 1.0, compute_dtype: torch.dtype | None = None):
        if type(transformer).__name__ != "HunyuanVideoFramepackTransformer3DModel":
            raise MusubiError(f"FramePack training needs diffusers' HunyuanVideoFramepackTransformer3DModel, got {type(transformer).__name__}.")
        if getattr(transformer, "clean_x_embedder", None) is None or getattr(transformer, "image_projection", None) is None:
            raise MusubiError("this HunyuanVideo transformer has no FramePack history embedder or image projection; load a FramePack checkpoint.")
        self.transformer = transformer
        self.guidance_scale = float(guidance_scale)
        # Activations enter in this dtype (default: the patch embedder's weights'); a model whose
        # layers cast their weights per call (ComfyUI's) names its own.
        self.compute_dtype = compute_dtype

    def lora_root(self) -> nn.Module:
        return self.transformer

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    def velocity_target(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return flow_matching_velocity(latents, noise)

    def to_device(self, device: torch.device | str) -> None:
        self.transformer.to(device)

    def predict_velocity(self, noisy_latents: torch.Tensor, noise_level: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        missing = [key for key in REQUIRED_KEYS if key not in batch]
        if missing:
            raise MusubiError(
                f"FramePack training items lack {', '.join(missing)}; make them with "
                "musubi.framepack.adapter.write_training_items (or the Train LoRA node with a FramePack model)."
            )
        groups: dict[tuple, list[int]] = {}
        for row in range(noisy_latents.shape[0]):
            layout = tuple(tuple(batch[key][row].tolist()) for key in sections.INDEX_KEYS)
            groups.setdefault(layout, []).append(row)
        if len(groups) == 1:
            return self._forward(noisy_latents, noise_level, batch)
        parts, order = [], []
        for rows in groups.values():
            index = torch.tensor(rows, device=noisy_latents.device)
            part = {key: value.index_select(0, index.to(value.device)) if isinstance(value, torch.Tensor) else value
                    for key, value in batch.items()}
            parts.append(self._forward(noisy_latents.index_select(0, index), noise_level.index_select(0, index.to(noise_level.device)), part))
            order.extend(rows)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return torch.cat(parts).index_select(0, inverse.to(noisy_latents.device))

    def _forward(self, noisy_latents: torch.Tensor, noise_level: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """One forward for rows that share their frame indices."""
        model = self.transformer
        dtype = self.compute_dtype or model.x_embedder.proj.weight.dtype
        count, frames = noisy_latents.shape[0], noisy_latents.shape[2]
        indices = {key: batch[key][0] for key in sections.INDEX_KEYS}
        if indices[sections.LATENT_INDICES_KEY].numel() != frames:
            raise MusubiError(
                f"FramePack training item has {frames} target frames but {indices[sections.LATENT_INDICES_KEY].numel()} "
                "latent indices; re-create the training items."
            )
        context = batch[CONTEXT_KEY]
        mask = batch.get(CONTEXT_MASK_KEY)
        if mask is None:
            mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        pooled = batch[POOLED_KEY].reshape(count, -1)
        image_embeds = batch[IMAGE_EMBEDS_KEY]
        if image_embeds.dim() == 4:  # [B, 1, tokens, width] from items saved with a batch dimension
            image_embeds = image_embeds.flatten(1, 2)
        timestep = 1000.0 * noise_level.float()
        guidance = torch.full((count,), 1000.0 * self.guidance_scale, dtype=torch.float32, device=noisy_latents.device)
        output = model(
            hidden_states=noisy_latents.to(dtype),
            timestep=timestep,
            encoder_hidden_states=context.to(dtype),
            encoder_attention_mask=mask.to(torch.bool),
            pooled_projections=pooled.to(dtype),
            image_embeds=image_embeds.to(dtype),
            indices_latents=indices[sections.LATENT_INDICES_KEY],
            guidance=guidance,
            latents_clean=batch[sections.CLEAN_LATENTS_KEY].to(dtype),
            indices_latents_clean=indices[sections.CLEAN_INDICES_KEY],
            latents_history_2x=batch[sections.HISTORY_2X_KEY].to(dtype),
            indices_latents_history_2x=indices[sections.HISTORY_2X_INDICES_KEY],
            latents_history_4x=batch[sections.HISTORY_4X_KEY].to(dtype),
            indices_latents_history_4x=indices[sections.HISTORY_4X_INDICES_KEY],
            return_dict=False,
        )[0]
        return output.float()


def from_checkpoint(dit: str | None = None, path: str | None = None, dtype: str | None = None,
                    guidance_scale: float = 1.0) -> FramePackAdapter:
    """Adapter factory for ``python -m musubi train --model musubi.framepack.adapter:from_checkpoint``.

    The checkpoint is ``dit`` (or ``model_args`` ``path``): a diffusers-layout FramePack folder or a
    single safetensors file. ``dtype`` (float32, bfloat16, float16) casts the frozen weights;
    by default they keep the file's dtype.
    """
    if dit and path and os.path.abspath(dit) != os.path.abspath(path):
        raise MusubiError(f"FramePack model: dit ({dit}) and model_args path ({path}) name different checkpoints; give one.")
    checkpoint = dit or path
    if not checkpoint:
        raise MusubiError("FramePack model: name the checkpoint with dit = '<file or folder>' (or model_args path = ...).")
    if dtype is not None and dtype not in DTYPES:
        raise MusubiError(f"FramePack model: dtype {dtype!r} is unknown; choose one of {', '.join(DTYPES)}.")
    return FramePackAdapter(load_transformer(checkpoint, DTYPES.get(dtype) if dtype else None), guidance_scale)


def training_items(
    latents: torch.Tensor,
    context: torch.Tensor,
    pooled: torch.Tensor,
    image_embeds: torch.Tensor,
    layout: str = "vanilla",
    window: int = sections.LATENT_WINDOW_SIZE,
    context_mask: torch.Tensor | None = None,
    **one_frame_options,
) -> list[dict[str, torch.Tensor]]:
    """One training item per section of ``latents`` ``[C, T, H, W]`` (already in the model's
    latent space, i.e. VAE output × 0.476986 as musubi-tuner caches it), each with the conditioning."""
    if context.dim() == 3 and context.shape[0] == 1:
        context = context[0]
    if context.dim() != 2:
        raise MusubiError(f"FramePack text context must be [tokens, width], got {list(context.shape)}.")
    pooled = pooled.reshape(-1)
    if image_embeds.dim() == 3 and image_embeds.shape[0] == 1:
        image_embeds = image_embeds[0]
    if image_embeds.dim() != 2:
        raise MusubiError(f"FramePack image embedding must be [tokens, width] (SigLIP: [729, 1152]), got {list(image_embeds.shape)}.")
    conditioning = {CONTEXT_KEY: context, POOLED_KEY: pooled, IMAGE_EMBEDS_KEY: image_embeds}
    if context_mask is not None:
        conditioning[CONTEXT_MASK_KEY] = context_mask.reshape(-1).to(torch.bool)
    return [{**tensors, **conditioning} for tensors in sections.cut_sections(latents, layout, window, **one_frame_options)]


def write_training_items(
    directory: str,
    name: str,
    latents: torch.Tensor,
    context: torch.Tensor,
    pooled: torch.Tensor,
    image_embeds: torch.Tensor,
    layout: str = "vanilla",
    window: int = sections.LATENT_WINDOW_SIZE,
    context_mask: torch.Tensor | None = None,
    **one_frame_options,
) -> list[str]:
    """Write ``<directory>/<name>_<section:04d>.safetensors`` latent cache items (one per section) and
    return their paths; see :func:`training_items`."""
    items = training_items(latents, context, pooled, image_embeds, layout, window, context_mask, **one_frame_options)
    paths = []
    for number, item in enumerate(items):
        tensors = dict(item)
        target = tensors.pop(latent_cache.LATENTS_KEY)
        paths.append(latent_cache.write_latent_cache_item(directory, f"{name}_{number:04d}", target, ARCHITECTURE, **tensors))
    return paths
