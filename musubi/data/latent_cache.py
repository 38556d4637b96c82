"""Training data on disk: one safetensors file per item, holding a latent and its conditioning.

An item ``<name>.safetensors`` holds ``latents`` ``[C, (T,) H, W]`` and the conditioning tensors the
model adapter needs — ``context`` ``[L, D]`` (text encoder output), optionally ``pooled`` and any
other tensor, all passed through to the batch under their own names — with the metadata key
``architecture``. Items are read from disk when a batch needs them, so a cache larger than the
memory trains fine; only the headers are read up front.

Batches only combine items of equal latent shape (a *bucket* per shape). ``context`` tensors of
different lengths are padded with zeros, and ``context_mask`` ``[B, L]`` marks the real tokens.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from .. import files
from ..errors import MusubiError

LATENTS_KEY = "latents"
CONTEXT_KEY = "context"
CONTEXT_MASK_KEY = "context_mask"
ARCHITECTURE_KEY = "architecture"
EXTENSION = ".safetensors"


@dataclass(frozen=True)
class CacheItem:
    """One item as seen from its header: where it is and the shape of its latent."""

    name: str
    path: str
    latent_shape: tuple[int, ...]


class LatentCacheDataset:
    """The items of one latent cache folder, all made for one architecture.

    A folder in musubi-tuner's cache layout (``*_<code>.safetensors`` latents with
    ``*_<code>_te.safetensors`` text caches, as musubi-tuner and the dataset node write them) is
    read by :class:`.musubi_cache.MusubiCacheFolder`; :func:`.musubi_cache.open_cache_folder`
    picks the right one for a folder.
    """

    def __init__(self, directory: str, num_repeats: int = 1):
        directory = os.fspath(directory)
        check_repeats(num_repeats, f"data_dir {directory}")
        if not os.path.isdir(directory):
            raise MusubiError(f"data_dir {directory}: folder not found; point data_dir at a latent cache folder.")
        names = sorted(entry for entry in os.listdir(directory) if entry.endswith(EXTENSION) and not entry.startswith("."))
        if not names:
            raise MusubiError(
                f"data_dir {directory}: no {EXTENSION} items in this folder; write the training latents there first "
                "(write_latent_cache_item)."
            )
        self.directory = directory
        self.items: list[CacheItem] = []
        architectures: dict[str, list[str]] = {}
        for file_name in names:
            path = os.path.join(directory, file_name)
            tensors, metadata = files.read_header(path)
            if LATENTS_KEY not in tensors:
                found = ", ".join(sorted(tensors)) or "no tensors"
                raise MusubiError(f"{path}: no '{LATENTS_KEY}' tensor (found {found}); this is not a latent cache item.")
            shape = tensors[LATENTS_KEY][1]
            if len(shape) not in (3, 4):
                raise MusubiError(f"{path}: '{LATENTS_KEY}' has shape {list(shape)}; expected [C, H, W] or [C, T, H, W].")
            architecture = metadata.get(ARCHITECTURE_KEY)
            if not architecture:
                raise MusubiError(
                    f"{path}: no '{ARCHITECTURE_KEY}' in the metadata; write items with write_latent_cache_item(..., architecture=...)."
                )
            architectures.setdefault(architecture, []).append(file_name)
            self.items.append(CacheItem(file_name[: -len(EXTENSION)], path, tuple(shape)))
        if len(architectures) > 1:
            listing = "; ".join(f"{arch}: {', '.join(files[:3])}{' …' if len(files) > 3 else ''}" for arch, files in architectures.items())
            raise MusubiError(
                f"data_dir {directory} mixes items of several architectures ({listing}); keep one architecture per folder."
            )
        self.architecture = next(iter(architectures))
        self.items = repeated(self.items, num_repeats)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.items[index]
        try:
            return load_file(item.path, device="cpu")
        except Exception as error:  # safetensors raises several types for damaged files
            raise MusubiError(f"{item.path}: cannot read the item ({error}); re-create it.") from error

    def latent_shape(self, index: int) -> tuple[int, ...]:
        """Item ``index``'s latent shape, known without reading the latent (its bucket)."""
        return self.items[index].latent_shape

    def buckets(self) -> dict[tuple[int, ...], list[int]]:
        """Item indices grouped by latent shape, in file order."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, item in enumerate(self.items):
            groups.setdefault(item.latent_shape, []).append(index)
        return groups

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> list[list[int]]:
        """One epoch's batches: each bucket shuffled and cut into batches (the last one may be
        short), then the order of all batches shuffled. The same generator state gives the same epoch."""
        if batch_size < 1:
            raise MusubiError(f"batch_size must be at least 1, got {batch_size}.")
        batches: list[list[int]] = []
        for indices in self.buckets().values():
            order = torch.randperm(len(indices), generator=generator).tolist()
            shuffled = [indices[i] for i in order]
            batches.extend(shuffled[start:start + batch_size] for start in range(0, len(shuffled), batch_size))
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]

    def num_batches(self, batch_size: int) -> int:
        """Batches per epoch: the buckets' sizes rounded up to whole batches."""
        return sum(-(-len(indices) // batch_size) for indices in self.buckets().values())

    @staticmethod
    def collate(items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack items into a batch; ``context`` is padded to the longest and masked."""
        if not items:
            raise MusubiError("cannot build a batch from no items.")
        keys = set(items[0])
        for item in items[1:]:
            if set(item) != keys:
                raise MusubiError(
                    f"items of one batch hold different tensors ({sorted(keys)} vs {sorted(item)}); "
                    "every item of a cache needs the same conditioning."
                )
        batch: dict[str, torch.Tensor] = {}
        for key in sorted(keys):
            if key == CONTEXT_MASK_KEY:
                continue
            tensors = [item[key] for item in items]
            if key == CONTEXT_KEY:
                masks = [item.get(CONTEXT_MASK_KEY) for item in items]
                batch[CONTEXT_KEY], batch[CONTEXT_MASK_KEY] = _pad_context(tensors, masks)
                continue
            shapes = {tuple(tensor.shape) for tensor in tensors}
            if len(shapes) > 1:
                raise MusubiError(f"'{key}' has different shapes within one batch ({sorted(shapes)}); only 'context' may vary in length.")
            batch[key] = torch.stack(tensors)
        return batch


def check_repeats(num_repeats, where: str) -> int:
    if isinstance(num_repeats, bool) or not isinstance(num_repeats, int) or num_repeats < 1:
        raise MusubiError(f"{where}: num_repeats must be a whole number ≥ 1, got {num_repeats!r}.")
    return num_repeats


def repeated(items: list, num_repeats: int) -> list:
    """Each item ``num_repeats`` times in a row (musubi-tuner's repeats: more visits per epoch)."""
    return [item for item in items for _ in range(num_repeats)]


def _pad_context(contexts: list[torch.Tensor], masks: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    for context in contexts:
        if context.dim() != 2:
            raise MusubiError(f"'{CONTEXT_KEY}' must be [tokens, width], got shape {list(context.shape)}.")
    widths = {context.shape[1] for context in contexts}
    if len(widths) > 1:
        raise MusubiError(f"'{CONTEXT_KEY}' widths differ within one batch ({sorted(widths)}); the items come from different text encoders.")
    length = max(context.shape[0] for context in contexts)
    padded = contexts[0].new_zeros((len(contexts), length, contexts[0].shape[1]))
    mask = torch.zeros((len(contexts), length), dtype=torch.bool)
    for row, (context, own_mask) in enumerate(zip(contexts, masks)):
        padded[row, : context.shape[0]] = context
        mask[row, : context.shape[0]] = True if own_mask is None else own_mask.to(torch.bool).reshape(-1)
    return padded, mask


def write_latent_cache_item(
    directory: str,
    name: str,
    latents: torch.Tensor,
    architecture: str = "generic",
    **conditioning: torch.Tensor,
) -> str:
    """Write ``<directory>/<name>.safetensors`` atomically and return its path.

    ``conditioning`` tensors (``context=...``, ``pooled=...``, ...) are stored under their names and
    reach the model adapter in the batch.
    """
    directory = os.fspath(directory)
    if not name or os.sep in name or (os.altsep and os.altsep in name) or name.startswith("."):
        raise MusubiError(f"latent cache item name {name!r} must be a plain file name (no folders, not starting with '.').")
    if not isinstance(latents, torch.Tensor) or latents.dim() not in (3, 4):
        shape = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise MusubiError(f"latents of {name!r} must be a tensor [C, H, W] or [C, T, H, W], got {shape}.")
    tensors = {LATENTS_KEY: latents}
    for key, value in conditioning.items():
        if not isinstance(value, torch.Tensor):
            raise MusubiError(f"conditioning '{key}' of {name!r} must be a tensor, got {type(value).__name__}.")
        tensors[key] = value
    if CONTEXT_KEY in tensors and tensors[CONTEXT_KEY].dim() != 2:
        raise MusubiError(f"'{CONTEXT_KEY}' of {name!r} must be [tokens, width], got {list(tensors[CONTEXT_KEY].shape)}.")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name + EXTENSION)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    files.atomic_save_file(tensors, path, {ARCHITECTURE_KEY: str(architecture)})
    return path
