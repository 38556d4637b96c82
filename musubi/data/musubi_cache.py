"""musubi-tuner's cache folders as the headless trainer's dataset: :func:`open_cache_folder`, the
one place that picks the dataset for a folder, and :func:`open_training_data`, which also reads
musubi-tuner's dataset configs through their cache folders.

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
from .cache import CachedDataset, CachedItem, read_image_condition, read_latent, read_latent_layout
from .config import load_dataset_config
from .latent_cache import CONTEXT_KEY, LATENTS_KEY, CacheItem, LatentCacheDataset, check_repeats
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
    ``pooled``) from the text cache of its source file, every item ``num_repeats`` times per epoch.
    Latent caches without a text cache are an error listing them. Several folders of one
    architecture (the datasets of a dataset config) train as one dataset: :meth:`joined`.

    :attr:`cached` lists the cache files once each (with their repeats); :meth:`cached_dataset`
    gives them to readers that build their own conditioning from the caches (ComfyUI's models)."""

    def __init__(self, directory: str, num_repeats: int = 1, where: str | None = None):
        self.directory = os.fspath(directory)
        where = where or f"data_dir {self.directory}"
        check_repeats(num_repeats, where)
        if not os.path.isdir(self.directory):
            raise MusubiError(f"{where}: folder not found; point it at a cache folder.")
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
                f"{where}: expected the latent caches of one architecture "
                f"({', '.join(codes)}), found codes: {listing}."
            )
        [(code, latents)] = known.items()
        self.architecture = codes[code]
        self.cached: list[CachedItem] = []
        missing = []
        for name, key in latents:
            basename = _WINDOW.sub("", key)
            text_path = os.path.join(self.directory, f"{basename}_{code}_te.safetensors")
            if not os.path.isfile(text_path):
                missing.append(name)
                continue
            path = os.path.join(self.directory, name)
            shape, controls = read_latent_layout(path)
            self.cached.append(CachedItem(name[: -len(".safetensors")], path, text_path, shape, num_repeats, controls))
        if missing:
            raise MusubiError(
                f"{where}: {len(missing)} latent cache(s) have no text cache "
                f"(<name>_{code}_te.safetensors): {', '.join(missing[:10])}; cache their captions too."
            )
        if not self.cached:
            raise MusubiError(f"{where}: no training items.")
        self._index()

    @classmethod
    def joined(cls, parts: list["MusubiCacheFolder"]) -> "MusubiCacheFolder":
        """One dataset of several cache folders (in order), which must hold one architecture."""
        architectures = {part.architecture for part in parts}
        if len(architectures) != 1:
            listing = "; ".join(f"{part.directory}: {part.architecture}" for part in parts)
            raise MusubiError(f"the datasets' caches are of different architectures ({listing}); train one architecture per run.")
        if len(parts) == 1:
            return parts[0]
        joined = cls.__new__(cls)
        joined.directory = os.pathsep.join(part.directory for part in parts)
        joined.architecture = parts[0].architecture
        joined.cached = [item for part in parts for item in part.cached]
        joined._index()
        return joined

    def _index(self) -> None:
        self.entries = [item for item in self.cached for _ in range(item.num_repeats)]
        self.items = [CacheItem(entry.key, entry.latent_path, entry.latent_shape) for entry in self.entries]

    def cached_dataset(self) -> CachedDataset:
        """The same items (repeats included, same order) as the cache reader the dataset node uses."""
        return CachedDataset(self.cached, self.architecture)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        entry = self.entries[index]
        text = load_text_embedding(entry.text_path)
        result = ITEM_READERS.get(self.architecture, read_latent_item)(entry.latent_path)
        result[CONTEXT_KEY] = text.context
        if text.pooled is not None:
            result["pooled"] = text.pooled
        return result


def open_cache_folder(directory: str, num_repeats: int = 1) -> LatentCacheDataset:
    """The training dataset of a cache folder: :class:`MusubiCacheFolder` for musubi-tuner's layout
    (``*_<code>.safetensors`` latents with ``*_<code>_te.safetensors`` text caches), otherwise
    :class:`.latent_cache.LatentCacheDataset` (one ``<name>.safetensors`` item per file); each item
    ``num_repeats`` times per epoch."""
    directory = os.fspath(directory)
    if is_musubi_cache_folder(directory):
        return MusubiCacheFolder(directory, num_repeats)
    return LatentCacheDataset(directory, num_repeats)


def open_training_data(data_dir: str | None = None, dataset_config: str | None = None, num_repeats: int = 1,
                       batch_size: int | None = None) -> LatentCacheDataset:
    """The dataset of a training run: the cache folder ``data_dir`` (each item ``num_repeats``
    times), or the caches of every ``[[datasets]]`` entry of musubi-tuner's dataset config (its
    ``cache_directory``, else its image/video folder, with that entry's ``num_repeats``), read
    as musubi-tuner's trainer reads them: from the caches alone, the images and videos unneeded.

    A dataset config's ``batch_size`` other than 1 must agree with the run's ``batch_size``.
    """
    if bool(data_dir) == bool(dataset_config):
        raise MusubiError("give the training data as data_dir (a cache folder) or dataset_config (musubi-tuner's "
                          "dataset TOML, read through its cache_directory entries), one of the two.")
    if data_dir:
        return open_cache_folder(data_dir, num_repeats)
    if num_repeats != 1:
        raise MusubiError(f"num_repeats = {num_repeats} is for data_dir; with dataset_config set num_repeats in each "
                          "[[datasets]] entry.")
    specs = load_dataset_config(dataset_config)
    parts = []
    for number, spec in enumerate(specs, 1):
        where = f"dataset_config {dataset_config} [[datasets]] #{number}"
        if batch_size is not None and spec.batch_size not in (1, batch_size):
            raise MusubiError(f"{where} sets batch_size = {spec.batch_size} but the run's batch_size is {batch_size}; "
                              f"set batch_size = {spec.batch_size} in the training options (one batch size per run).")
        folder = spec.cache_folder
        if not is_musubi_cache_folder(folder):
            raise MusubiError(
                f"{where}: {folder} holds no caches (<name>_<WWWW>x<HHHH>_<code>.safetensors with <name>_<code>_te"
                ".safetensors); cache the dataset first with the Training Dataset node or musubi-tuner's caching scripts."
            )
        parts.append(MusubiCacheFolder(folder, spec.num_repeats, where=f"{where} (cache {folder})"))
    return MusubiCacheFolder.joined(parts)
