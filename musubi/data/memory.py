"""Training items held in memory (latents handed over by a ComfyUI graph, say).

Batching, buckets and collation are the latent cache's own; only where items live differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import MusubiError
from .latent_cache import LATENTS_KEY, CacheItem, LatentCacheDataset


class InMemoryLatentDataset(LatentCacheDataset):
    """Items as dicts of tensors, each with a ``latents`` tensor ([C, H, W] or [C, T, H, W])."""

    def __init__(self, items: Sequence[Mapping[str, torch.Tensor]], architecture: str | None = None):
        if not items:
            raise MusubiError("no training items: connect at least one latent.")
        self.tensors = [dict(item) for item in items]
        self.items = []
        for index, item in enumerate(self.tensors):
            latents = item.get(LATENTS_KEY)
            if latents is None or latents.dim() not in (3, 4):
                shape = None if latents is None else list(latents.shape)
                raise MusubiError(f"training item {index}: expected a '{LATENTS_KEY}' tensor [C, H, W] or [C, T, H, W], got {shape}.")
            self.items.append(CacheItem(str(index), "", tuple(latents.shape)))
        self.architecture = architecture

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.tensors[index]
