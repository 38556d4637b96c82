"""Encoded training items on disk, in musubi-tuner's cache layout, reused while still valid.

Per item ``<key>_<WWWW>x<HHHH>_<code>.safetensors`` holds the latent in the model's space (as
musubi-tuner stores it) under ``latents_<F>x<H>x<W>_<dtype>`` (``F`` = 1 for images), with
musubi's metadata (``architecture``, ``width``, ``height``, ``format_version``, ``frame_count``);
control images of edit models add ``latents_control_<i>_<F>x<H>x<W>_<dtype>``, Wan image-to-video
items ``latents_image_<F>x<H>x<W>_<dtype>`` (4 mask channels, then the first-frame latent) and
``clip_<dtype>`` (CLIP-vision states), as musubi-tuner names them. Per source file
``<basename>_<code>_te.safetensors`` holds the text-encoder output in musubi-tuner's layout
(see :mod:`.text_embeddings`). So musubi-tuner trains from these caches and its caches are read here
(the headless trainer reads such a folder through :mod:`.musubi_cache`).

Each file written here also keeps, in the metadata key ``musubi_cache_key``, what it was made
from: the source file (size, modification time, SHA-256), the VAE or text encoder, the bucket, the
frames, the caption. A file whose key no longer matches is encoded again; a file without a key
(musubi-tuner's own) is used as it is while no encoder is given to check it against.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import files
from .plan import ARCHITECTURE_CODES, PlannedItem, latent_cache_name, text_cache_name, unreadable_files_message
from ..errors import MusubiError
from .pixels import control_pixels, item_pixels
from .text_embeddings import CAPTION_KEY, TextEmbedding, load_text_embedding, save_text_embedding

CACHE_KEY = "musubi_cache_key"
FORMAT_VERSION = "1.0.1"
_LATENT_KEY = re.compile(r"^latents_(\d+)x(\d+)x(\d+)_([a-z0-9_]+)$")
_CONTROL_KEY = re.compile(r"^latents_control_(?:(\d+)_)?(\d+)x(\d+)x(\d+)_([a-z0-9_]+)$")
_IMAGE_LATENT_KEY = re.compile(r"^latents_image_(\d+)x(\d+)x(\d+)_([a-z0-9_]+)$")
_CLIP_KEY = re.compile(r"^clip_([a-z0-9_]+)$")


@dataclass
class Encoders:
    """What encodes missing items; any part may be None when every cache it would write is valid.

    ``encode_pixels`` takes ``float [T, H, W, 3]`` in 0..1 (T = 1 for an image) and returns the VAE
    latent ``[C, (T,) H, W]``; ``to_model_space`` maps it to the space musubi-tuner caches hold.
    """

    encode_pixels: Callable[[torch.Tensor], torch.Tensor] | None = None
    vae_id: str | None = None
    encode_text: Callable[[str], TextEmbedding] | None = None
    text_encoder_id: str | None = None
    to_model_space: Callable[[torch.Tensor], torch.Tensor] = lambda latent: latent
    # Image-to-video conditioning from the pixels of an item (its first frame): tensors stored
    # under their names (e.g. ``latents_image`` in the model's space, ``clip``); None when unused.
    encode_image_condition: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None
    image_condition_id: str | None = None


@dataclass
class CacheReport:
    encoded_latents: int = 0
    encoded_texts: int = 0
    reused_latents: int = 0
    reused_texts: int = 0

    def describe(self) -> str:
        return (f"encoded {self.encoded_latents} latent(s) and {self.encoded_texts} caption(s); "
                f"reused {self.reused_latents} latent(s) and {self.reused_texts} caption(s) from the cache")


@dataclass(frozen=True)
class CachedItem:
    """One encoded item: its two files, its latent's shape (as stored) and repeats."""

    key: str
    latent_path: str
    text_path: str
    latent_shape: tuple[int, ...]
    num_repeats: int = 1
    control_keys: tuple[str, ...] = field(default_factory=tuple)


def build_cache(items: list[PlannedItem], architecture: str, encoders: Encoders, *, reencode: bool = False,
                progress: Callable[[int, int], None] | None = None, where: str = "dataset",
                load_pixels: Callable[[PlannedItem], torch.Tensor] | None = None,
                load_controls: Callable[[PlannedItem], list[torch.Tensor]] | None = None) -> tuple[list[CachedItem], CacheReport]:
    """Encode what is missing or stale, reuse the rest; return the cached items (in plan order)."""
    load_pixels = load_pixels or item_pixels
    load_controls = load_controls or control_pixels
    report = CacheReport()
    latent_todo: list[tuple[PlannedItem, str, dict]] = []
    text_todo: dict[str, tuple[PlannedItem, dict]] = {}
    text_seen: set[str] = set()
    for item in items:
        path = os.path.join(item.cache_directory, latent_cache_name(item, architecture))
        key = _latent_key(item, encoders.vae_id, encoders.image_condition_id)
        if reencode or not _latent_cache_valid(path, key, encoders.vae_id):
            latent_todo.append((item, path, key))
        else:
            report.reused_latents += 1
        text_path = os.path.join(item.cache_directory, text_cache_name(item, architecture))
        if text_path in text_seen:
            continue
        text_seen.add(text_path)
        text_key = {"caption": item.caption, "text_encoder": encoders.text_encoder_id}
        if reencode or not _text_cache_valid(text_path, text_key, encoders.text_encoder_id):
            text_todo[text_path] = (item, text_key)
        else:
            report.reused_texts += 1
    _check_encoders(latent_todo, text_todo, encoders, where)

    total, done = len(latent_todo) + len(text_todo), 0
    if progress:
        progress(0, total)
    # A file whose header was fine can still fail to decode; every such file is collected (its
    # first error) and all are listed once the rest is encoded and cached.
    unreadable: dict[str, str] = {}
    for item, path, key in latent_todo:
        media = _read_media(item, load_pixels, load_controls, unreadable)
        if media is not None:
            pixels, control_frames = media
            latent = encoders.to_model_space(encoders.encode_pixels(pixels).float().cpu())
            controls = [encoders.to_model_space(encoders.encode_pixels(c).float().cpu()) for c in control_frames]
            extras = {} if encoders.encode_image_condition is None else encoders.encode_image_condition(pixels)
            write_latent_cache(path, latent, architecture, item, key, controls, extras)
            report.encoded_latents += 1
        done += 1
        if progress:
            progress(done, total)
    for text_path, (item, key) in text_todo.items():
        embedding = encoders.encode_text(item.caption)
        write_text_cache(text_path, embedding, architecture, item.caption, key)
        report.encoded_texts += 1
        done += 1
        if progress:
            progress(done, total)
    if unreadable:
        raise MusubiError(
            f"{where}: {unreadable_files_message(list(unreadable.values()))} The other items are encoded and "
            "cached; replace or remove these files and run again."
        )

    cached = []
    for item in items:
        path = os.path.join(item.cache_directory, latent_cache_name(item, architecture))
        shape, controls = read_latent_layout(path)
        cached.append(CachedItem(item.key, path, os.path.join(item.cache_directory, text_cache_name(item, architecture)),
                                 shape, item.num_repeats, controls))
    return cached, report


def _read_media(item: PlannedItem, load_pixels, load_controls, unreadable: dict[str, str]):
    """``(pixels, control pixels)`` of an item, or None with the error kept in ``unreadable``
    (by file: a video's windows or a shared control image are listed once)."""
    try:
        pixels = load_pixels(item)
    except MusubiError as error:
        unreadable.setdefault(item.source, str(error))
        return None
    try:
        return pixels, load_controls(item)
    except MusubiError as error:
        unreadable.setdefault(str(error), str(error))  # the message names the control image
        return None


def _check_encoders(latent_todo, text_todo, encoders: Encoders, where: str) -> None:
    if latent_todo and encoders.encode_pixels is None:
        names = ", ".join(os.path.basename(item.source) for item, _, _ in latent_todo[:10])
        raise MusubiError(
            f"{where}: {len(latent_todo)} item(s) are not in the cache yet ({names}{' …' if len(latent_todo) > 10 else ''}); "
            "connect the VAE so they can be encoded."
        )
    if text_todo and encoders.encode_text is None:
        names = ", ".join(os.path.basename(item.source) for item, _ in list(text_todo.values())[:10])
        raise MusubiError(
            f"{where}: the captions of {len(text_todo)} file(s) are not in the cache yet or changed ({names}"
            f"{' …' if len(text_todo) > 10 else ''}); connect the text encoder (CLIP) so they can be encoded."
        )


# --- keys -------------------------------------------------------------------------------------

def file_signature(path: str, with_hash: bool = True) -> dict:
    stat = os.stat(path)
    signature = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if with_hash:
        signature["sha256"] = _sha256(path)
    return signature


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _latent_key(item: PlannedItem, vae_id: str | None, image_condition_id: str | None = None) -> dict:
    return {
        "image_condition": image_condition_id,
        "source": os.path.abspath(item.source),
        "bucket": list(item.bucket),
        "frames": None if item.frames is None else [item.frames[0], len(item.frames), item.frames[-1]],
        "frame_list_sha": None if item.frames is None else hashlib.sha256(str(list(item.frames)).encode()).hexdigest()[:16],
        "controls": [os.path.abspath(c) for c in item.controls],
        "control_resolution": None if item.control_resolution is None else list(item.control_resolution),
        "no_resize_control": item.no_resize_control,
        "vae": vae_id,
        "resize": "cover-center-crop/lanczos-up/box-down",
    }


def _same_file(path: str, saved: dict | None) -> bool:
    """Unchanged when size and time match, or (after a touch or copy) the content hash does."""
    if not saved or not os.path.isfile(path):
        return False
    signature = file_signature(path, with_hash=False)
    if signature["size"] != saved.get("size"):
        return False
    if signature["mtime_ns"] == saved.get("mtime_ns"):
        return True
    return _sha256(path) == saved.get("sha256")


def _read_key(path: str) -> tuple[dict | None, dict]:
    """``(our key or None, metadata)``; ``(None, {})`` when the file is missing or unreadable."""
    if not os.path.isfile(path):
        return None, {}
    try:
        _, metadata = files.read_header(path)
    except MusubiError:
        return None, {}
    try:
        return json.loads(metadata[CACHE_KEY]), metadata
    except (KeyError, json.JSONDecodeError):
        return None, metadata or {"_foreign": "1"}


def _latent_cache_valid(path: str, key: dict, vae_id: str | None) -> bool:
    saved, metadata = _read_key(path)
    if not metadata:
        return False
    if saved is None:  # musubi-tuner's cache: trusted only when there is no VAE to check it against
        return vae_id is None
    stored_sources = saved.get("files", {})
    if any(saved.get(name) != value for name, value in key.items() if name != "vae"):
        return False
    if vae_id is not None and saved.get("vae") != vae_id:
        return False
    return all(_same_file(source, stored_sources.get(source)) for source in [key["source"], *key["controls"]])


def _text_cache_valid(path: str, key: dict, text_encoder_id: str | None) -> bool:
    saved, metadata = _read_key(path)
    if not metadata or metadata.get(CAPTION_KEY) != key["caption"]:
        return False
    if saved is None:
        return text_encoder_id is None
    return text_encoder_id is None or saved.get("text_encoder") == text_encoder_id


# --- writing ----------------------------------------------------------------------------------

def latent_tensor_key(latent: torch.Tensor, prefix: str = "latents") -> str:
    frames, height, width = (latent.shape[1], latent.shape[2], latent.shape[3]) if latent.dim() == 4 else (1, *latent.shape[1:])
    return f"{prefix}_{frames}x{height}x{width}_{str(latent.dtype).removeprefix('torch.')}"


def write_latent_cache(path: str, latent: torch.Tensor, architecture: str, item: PlannedItem, key: dict,
                       controls: list[torch.Tensor] = (), extras: dict[str, torch.Tensor] | None = None) -> None:
    if latent.dim() not in (3, 4):
        raise MusubiError(f"{item.source}: the VAE gave a latent of shape {list(latent.shape)}; expected [C, H, W] or [C, T, H, W].")
    if not torch.isfinite(latent).all():
        raise MusubiError(f"{item.source}: the VAE produced NaN or infinite values; encode in float32 or bfloat16.")
    tensors = {latent_tensor_key(latent): latent.contiguous()}
    for index, control in enumerate(controls):
        # FLUX.1 Kontext takes one control, which musubi-tuner stores without an index.
        prefix = "latents_control" if architecture == "flux" and len(controls) == 1 else f"latents_control_{index}"
        tensors[latent_tensor_key(control, prefix)] = control.contiguous()
    for name, tensor in (extras or {}).items():
        tensor = tensor.detach().cpu().contiguous()
        if name.startswith("latents_"):
            tensors[latent_tensor_key(tensor, name)] = tensor
        else:
            tensors[f"{name}_{str(tensor.dtype).removeprefix('torch.')}"] = tensor
    signatures = {source: file_signature(source) for source in [key["source"], *key["controls"]]}
    metadata = {
        "architecture": ARCHITECTURE_CODES[architecture][1],
        "width": str(item.size[0]),
        "height": str(item.size[1]),
        "format_version": FORMAT_VERSION,
        CACHE_KEY: json.dumps({**key, "files": signatures}),
    }
    if item.frames is not None:
        metadata["frame_count"] = str(len(item.frames))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.atomic_save_file(tensors, path, metadata)


def write_text_cache(path: str, embedding: TextEmbedding, architecture: str, caption: str, key: dict) -> None:
    """musubi-tuner's text cache (via save_text_embedding) with our key added to its metadata."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    staging = os.path.join(folder, "." + os.path.basename(path) + ".staging")
    embedding = TextEmbedding(embedding.context, embedding.pooled, architecture, {}, source=path)
    try:
        save_text_embedding(staging, embedding, caption=caption)
        _, metadata = files.read_header(staging)
        tensors = dict(files.iter_tensors(staging))
        files.atomic_save_file(tensors, path, {**metadata, CACHE_KEY: json.dumps(key)})
    finally:
        if os.path.exists(staging):
            os.remove(staging)


# --- reading ----------------------------------------------------------------------------------

def read_latent_layout(path: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The latent's shape and the control-latent keys, from the header only."""
    tensors, _ = files.read_header(path)
    latent_keys = [name for name in tensors if _LATENT_KEY.match(name)]
    if len(latent_keys) != 1:
        raise MusubiError(
            f"{path}: expected one 'latents_<F>x<H>x<W>_<dtype>' tensor, found {len(latent_keys)} "
            f"({', '.join(sorted(tensors)) or 'no tensors'}); delete the file so it is encoded again."
        )
    controls = tuple(sorted((name for name in tensors if _CONTROL_KEY.match(name)), key=_control_order))
    return tuple(tensors[latent_keys[0]][1]), controls


def _control_order(name: str) -> int:
    index = _CONTROL_KEY.match(name).group(1)
    return int(index) if index else 0


def read_latent(path: str) -> torch.Tensor:
    tensors, _ = files.read_header(path)
    [name] = [name for name in tensors if _LATENT_KEY.match(name)]
    return dict(files.iter_tensors(path, [name]))[name]


def read_controls(path: str, keys: tuple[str, ...]) -> list[torch.Tensor]:
    if not keys:
        return []
    tensors = dict(files.iter_tensors(path, list(keys)))
    return [tensors[key] for key in keys]


def read_image_condition(path: str) -> dict[str, torch.Tensor]:
    """``latents_image`` (image-to-video latent, model space) and ``clip`` (CLIP-vision states) when cached."""
    tensors, _ = files.read_header(path)
    wanted = {}
    for name in tensors:
        if _IMAGE_LATENT_KEY.match(name):
            wanted["latents_image"] = name
        elif _CLIP_KEY.match(name):
            wanted["clip"] = name
    if not wanted:
        return {}
    loaded = dict(files.iter_tensors(path, list(wanted.values())))
    return {role: loaded[name] for role, name in wanted.items()}


class CachedDataset:
    """The training items of a built cache, read from disk on demand; indices include repeats.

    ``latent(i)`` is in the model's space (as cached); callers map it back to the VAE's space.
    """

    def __init__(self, items: list[CachedItem], architecture: str):
        self.architecture = architecture
        self.entries: list[CachedItem] = [item for item in items for _ in range(item.num_repeats)]

    def __len__(self) -> int:
        return len(self.entries)

    def latent_shape(self, index: int) -> tuple[int, ...]:
        return self.entries[index].latent_shape

    def model_latent(self, index: int) -> torch.Tensor:
        entry = self.entries[index]
        try:
            return read_latent(entry.latent_path)
        except (MusubiError, ValueError) as error:
            raise MusubiError(f"{entry.latent_path}: cannot read the cached latent ({error}); re-encode the dataset.") from error

    def model_controls(self, index: int) -> list[torch.Tensor]:
        entry = self.entries[index]
        return read_controls(entry.latent_path, entry.control_keys)

    def model_image_condition(self, index: int) -> dict[str, torch.Tensor]:
        return read_image_condition(self.entries[index].latent_path)

    def text(self, index: int) -> TextEmbedding:
        return load_text_embedding(self.entries[index].text_path)
