"""musubi-tuner's cache folders as the headless trainer's dataset, and :func:`open_cache_folder`,
the one place that picks the dataset for a folder.

A family whose cache files are not one latent each names its reader in :data:`ITEM_READERS`, so
this generic code never branches on the model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import torch

from ..errors import MusubiError
from ..framepack.cache_items import read_musubi_cache_item as read_framepack_item
from .cache import read_image_condition, read_latent, read_latent_layout
from .latent_cache import CONTEXT_KEY, LATENTS_KEY, CacheItem, LatentCacheDataset
from .plan import ARCHITECTURE_CODES
from .text_embeddings import load_text_embedding

_CACHE_NAME = re.compile(r"^(?P<key>.+)_(?P<w>\d{4,})x(?P<h>\d{4,})_(?P<code>[a-z0-9]+)\.safetensors$")
_WINDOW = re.compile(r"_\d{5}-\d{3}$")

ItemReader = Callable[[str], dict[str, torch.Tensor]]


def read_latent_item(path: str) -> dict[str, torch.Tensor]:
    """A one-latent cache file as a training item: ``latents``, plus Wan image-to-video's
    ``latents_image`` and ``clip`` when cached."""
    item = {LATENTS_KEY: read_latent(path)}
    item.update(read_image_condition(path))
    return item


# How a family's latent cache file becomes a training item (without the text); families not
# listed store one latent per file (read_latent_item).
ITEM_READERS: dict[str, ItemReader] = {
    "framepack": read_framepack_item,  # one section per file, with its history and indices
}


def is_musubi_cache_folder(directory: str) -> bool:
    """True when the folder holds musubi-tuner-style caches (``*_<code>.safetensors`` + ``*_te``)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    return any(name.endswith("_te.safetensors") for name in names) and any(_CACHE_NAME.match(name) for name in names)


class MusubiCacheFolder(LatentCacheDataset):
    """A musubi-tuner cache folder (written by musubi-tuner or by the dataset node) as the training
    engine's dataset: each latent cache read by its family's item reader, ``context`` (and
    ``pooled``) from the text cache of its source file. Latent caches without a text cache are an
    error listing them."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        names = sorted(os.listdir(self.directory))
        found: dict[str, list[tuple[str, str]]] = {}
        for name in names:
            match = _CACHE_NAME.match(name)
            if match and not name.endswith("_te.safetensors") and not name.startswith("."):
                found.setdefault(match.group("code"), []).append((name, match.group("key")))
        codes = {code: arch for arch, (code, _) in ARCHITECTURE_CODES.items()}
        known = {code: latents for code, latents in found.items() if code in codes}
        if len(known) != 1:
            listing = ", ".join(sorted(found)) or "none"
            raise MusubiError(
                f"data_dir {self.directory}: expected the latent caches of one architecture "
                f"({', '.join(codes)}), found codes: {listing}."
            )
        [(code, latents)] = known.items()
        self.architecture = codes[code]
        self.items: list[CacheItem] = []
        self.text_paths: list[str] = []
        missing = []
        for name, key in latents:
            basename = _WINDOW.sub("", key)
            text_path = os.path.join(self.directory, f"{basename}_{code}_te.safetensors")
            if not os.path.isfile(text_path):
                missing.append(name)
                continue
            path = os.path.join(self.directory, name)
            shape, _ = read_latent_layout(path)
            self.items.append(CacheItem(name[: -len(".safetensors")], path, shape))
            self.text_paths.append(text_path)
        if missing:
            raise MusubiError(
                f"data_dir {self.directory}: {len(missing)} latent cache(s) have no text cache "
                f"(<name>_{code}_te.safetensors): {', '.join(missing[:10])}; cache their captions too."
            )
        if not self.items:
            raise MusubiError(f"data_dir {self.directory}: no training items.")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.items[index]
        text = load_text_embedding(self.text_paths[index])
        result = ITEM_READERS.get(self.architecture, read_latent_item)(item.path)
        result[CONTEXT_KEY] = text.context
        if text.pooled is not None:
            result["pooled"] = text.pooled
        return result


def open_cache_folder(directory: str) -> LatentCacheDataset:
    """The training dataset of a cache folder: :class:`MusubiCacheFolder` for musubi-tuner's layout
    (``*_<code>.safetensors`` latents with ``*_<code>_te.safetensors`` text caches), otherwise
    :class:`.latent_cache.LatentCacheDataset` (one ``<name>.safetensors`` item per file)."""
    directory = os.fspath(directory)
    if is_musubi_cache_folder(directory):
        return MusubiCacheFolder(directory)
    return LatentCacheDataset(directory)
