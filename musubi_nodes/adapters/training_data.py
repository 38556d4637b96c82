"""What Train LoRA trains on: items of (VAE latent, CONDITIONING), from graph inputs or a dataset node.

A source only has to say how many items it has, each item's latent shape (without reading the
latent, so buckets are planned up front), and give an item's latent and its CONDITIONING when a
batch needs them — so a dataset larger than memory streams from its cache. Train LoRA wraps any
source in :class:`TrainingItems`, the training engine's dataset view.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from ...musubi.errors import MusubiError
from ...musubi.data.latent_cache import CacheItem, LatentCacheDataset

NODE = "Train LoRA"

@runtime_checkable
class TrainingData(Protocol):
    """A source of training items; indices run from 0 to ``len() - 1`` (repeats included)."""

    def __len__(self) -> int: ...

    def latent_shape(self, index: int) -> tuple[int, ...]:
        """``[C, (T,) H, W]`` of item ``index``'s latent."""
        ...

    def latent(self, index: int) -> torch.Tensor:
        """The VAE latent ``[C, (T,) H, W]`` as core VAE Encode gives it (before the model's
        ``process_latent_in``), on the CPU."""
        ...

    def conditioning(self, index: int) -> list:
        """The item's CONDITIONING: ``[[cross_attn [1, L, D], {options}]]`` with batch 1 (its
        options may hold ``pooled_output``, ``guidance``, ``reference_latents``,
        ``concat_latent_image``, ``clip_vision_output`` …, all for this one item)."""
        ...


class GraphTrainingData:
    """Items from Train LoRA's ``latents`` and ``conditioning`` inputs (one caption per sample,
    or one for all)."""

    def __init__(self, latents: dict, conditioning: list, where: str = NODE):
        samples = latents["samples"]
        count = samples.shape[0]
        self.samples = [samples[i].clone() for i in range(count)]
        if len(conditioning) == count and count > 1:
            self.conditionings = [[[entry[0].clone(), dict(entry[1])]] for entry in conditioning]
        elif len(conditioning) == 1 and conditioning[0][0].shape[0] == count:
            context, options = conditioning[0]
            self.conditionings = [[[context[i:i + 1].clone(), _slice_options(options, i, count)]] for i in range(count)]
        elif len(conditioning) == 1 and conditioning[0][0].shape[0] == 1:
            self.conditionings = [[[conditioning[0][0].clone(), dict(conditioning[0][1])]] for _ in range(count)]
        else:
            raise MusubiError(
                f"{where}: {count} samples but the conditioning holds {len(conditioning)} entries of batch "
                f"{conditioning[0][0].shape[0] if conditioning else 0}; give one conditioning for all samples or one per sample."
            )

    def __len__(self) -> int:
        return len(self.samples)

    def latent_shape(self, index: int) -> tuple[int, ...]:
        return tuple(self.samples[index].shape)

    def latent(self, index: int) -> torch.Tensor:
        return self.samples[index]

    def conditioning(self, index: int) -> list:
        return self.conditionings[index]


def _slice_options(options: dict, index: int, count: int) -> dict:
    sliced = {}
    for key, value in options.items():
        if isinstance(value, torch.Tensor) and value.shape[:1] == (count,):
            value = value[index:index + 1].clone()
        sliced[key] = value
    return sliced


def training_data_from_inputs(latents: dict | None, conditioning: list | None, dataset) -> TrainingData:
    """The one source Train LoRA trains on: the dataset when connected, else latents + conditioning."""
    if dataset is not None:
        if latents is not None or conditioning is not None:
            raise MusubiError(f"{NODE}: connect either a dataset or latents + conditioning, not both.")
        if not isinstance(dataset, TrainingData):
            raise MusubiError(f"{NODE}: the dataset input got {type(dataset).__name__}, not a training dataset.")
        if len(dataset) == 0:
            raise MusubiError(f"{NODE}: the dataset has no items.")
        return dataset
    if latents is None or conditioning is None:
        raise MusubiError(f"{NODE}: connect training data: a dataset, or latents together with their conditioning.")
    return GraphTrainingData(latents, conditioning)


class TrainingItems(LatentCacheDataset):
    """The training engine's dataset over a :class:`TrainingData` source: buckets by latent shape,
    latents turned into the model's space with ``process_latent_in`` when a batch is built."""

    def __init__(self, data: TrainingData, process_latent_in, architecture: str, indices=None):
        self.data = data
        self.process_latent_in = process_latent_in
        # indices: the source items this view shows (training and validation items share one source,
        # so the adapter reads both by the same index); default all of them.
        self.indices = list(range(len(data))) if indices is None else list(indices)
        self.items = [CacheItem(str(index), "", tuple(data.latent_shape(index))) for index in self.indices]
        self.architecture = architecture

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        source = self.indices[index]
        latent = self.data.latent(source)
        with torch.no_grad():
            latent = self.process_latent_in(latent.unsqueeze(0).float())[0]
        return {"latents": latent, "index": torch.tensor(source)}


class SubsetData:
    """Some items of a source, in the given order (a held-out split)."""

    def __init__(self, data: TrainingData, indices):
        self.data, self.indices = data, list(indices)
        self.architecture = getattr(data, "architecture", None)

    def __len__(self) -> int:
        return len(self.indices)

    def latent_shape(self, index: int) -> tuple[int, ...]:
        return tuple(self.data.latent_shape(self.indices[index]))

    def latent(self, index: int) -> torch.Tensor:
        return self.data.latent(self.indices[index])

    def conditioning(self, index: int) -> list:
        return self.data.conditioning(self.indices[index])


class JoinedData:
    """Training items followed by validation items: one source the model adapter reads both from."""

    def __init__(self, first: TrainingData, second: TrainingData):
        self.parts = (first, second)
        self.split = len(first)
        self.architecture = getattr(first, "architecture", None)

    def __len__(self) -> int:
        return self.split + len(self.parts[1])

    def _where(self, index: int):
        return (self.parts[0], index) if index < self.split else (self.parts[1], index - self.split)

    def latent_shape(self, index: int) -> tuple[int, ...]:
        part, local = self._where(index)
        return tuple(part.latent_shape(local))

    def latent(self, index: int) -> torch.Tensor:
        part, local = self._where(index)
        return part.latent(local)

    def conditioning(self, index: int) -> list:
        part, local = self._where(index)
        return part.conditioning(local)


def item_groups(data: TrainingData) -> list[list[int]]:
    """Indices grouped by the item they repeat (a Training Dataset's num_repeats): a held-out split
    takes whole groups, so no repeat of a held-out item is trained on."""
    entries = getattr(getattr(data, "cached", None), "entries", None)
    if entries is None or len(entries) != len(data):
        return [[index] for index in range(len(data))]
    groups: dict[int, list[int]] = {}
    for index, entry in enumerate(entries):
        groups.setdefault(id(entry), []).append(index)
    return list(groups.values())
