"""musubi-tuner's FramePack latent caches (``*_fp.safetensors``, one section per file) as training items.

Apart from :mod:`.adapter` and free of :mod:`musubi.data`, so the data package's cache-folder
reader can use it while the adapter still writes items through the data package.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .. import files
from ..errors import MusubiError
from . import training_sections as sections

IMAGE_EMBEDS_KEY = "image_embeds"

# musubi-tuner's FramePack latent-cache keys (``<stem>_<F>x<H>x<W>_<dtype>`` for latents,
# ``<stem>_<dtype>`` otherwise) and the names used here.
_MUSUBI_LATENT_STEMS = {"latents": sections.TARGET_KEY, "latents_clean": sections.CLEAN_LATENTS_KEY,
                        "latents_clean_2x": sections.HISTORY_2X_KEY, "latents_clean_4x": sections.HISTORY_4X_KEY}
_MUSUBI_STEMS = {"latent_indices": sections.LATENT_INDICES_KEY, "clean_latent_indices": sections.CLEAN_INDICES_KEY,
                 "clean_latent_2x_indices": sections.HISTORY_2X_INDICES_KEY,
                 "clean_latent_4x_indices": sections.HISTORY_4X_INDICES_KEY, "image_embeddings": IMAGE_EMBEDS_KEY}
_MUSUBI_LATENT_KEY = re.compile(r"^(latents(?:_clean(?:_2x|_4x)?)?)_\d+x\d+x\d+_[a-z0-9]+$")
_MUSUBI_KEY = re.compile(r"^(latent_indices|clean_latent_indices|clean_latent_2x_indices|clean_latent_4x_indices|image_embeddings)_[a-z0-9]+$")


def from_musubi_cache(tensors: Mapping[str, torch.Tensor], source: str = "the cache") -> dict[str, torch.Tensor]:
    """A training item (without the text) from the tensors of one musubi-tuner FramePack latent cache
    (``*_fp.safetensors``, one section each). One-frame caches store only the 2x/4x indices: their
    history becomes zeros, as musubi-tuner's trainer fills it; caches made with ``--one_frame_no_2x``
    or ``--one_frame_no_4x`` are refused (the diffusers transformer needs that history)."""
    item: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _MUSUBI_LATENT_KEY.match(key)
        if match:
            item[_MUSUBI_LATENT_STEMS[match.group(1)]] = tensor
            continue
        match = _MUSUBI_KEY.match(key)
        if match:
            item[_MUSUBI_STEMS[match.group(1)]] = tensor
    required = (sections.TARGET_KEY, sections.LATENT_INDICES_KEY, sections.CLEAN_LATENTS_KEY, sections.CLEAN_INDICES_KEY, IMAGE_EMBEDS_KEY)
    missing = [key for key in required if key not in item]
    if missing:
        raise MusubiError(f"{source}: not a musubi-tuner FramePack latent cache (no {', '.join(missing)}); cache it with fpack_cache_latents.py.")
    target = item[sections.TARGET_KEY]
    for latents_key, indices_key, frames, option in (
        (sections.HISTORY_2X_KEY, sections.HISTORY_2X_INDICES_KEY, sections.HISTORY_2X_FRAMES, "--one_frame_no_2x"),
        (sections.HISTORY_4X_KEY, sections.HISTORY_4X_INDICES_KEY, sections.HISTORY_4X_FRAMES, "--one_frame_no_4x"),
    ):
        if indices_key not in item:
            raise MusubiError(
                f"{source}: cached with {option} (no {frames}-frame history); the diffusers FramePack transformer "
                "needs it (diffusers issue #13588). Cache again without that option."
            )
        if latents_key not in item:
            item[latents_key] = target.new_zeros((target.shape[0], frames, *target.shape[2:]))
    item[sections.LATENT_INDICES_KEY] = item[sections.LATENT_INDICES_KEY].long()
    for key in (sections.CLEAN_INDICES_KEY, sections.HISTORY_2X_INDICES_KEY, sections.HISTORY_4X_INDICES_KEY):
        item[key] = item[key].long()
    return item


def read_musubi_cache_item(path: str) -> dict[str, torch.Tensor]:
    """The training item (without the text) of the musubi-tuner FramePack latent cache at ``path``."""
    return from_musubi_cache(dict(files.iter_tensors(path)), path)
