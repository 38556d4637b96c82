"""From dataset settings to the list of training items: which file, caption, bucket and frames.

Only file headers are read here (image sizes, video frame counts); pixels are decoded when an
item is encoded. Problems are collected and reported together — every image without a caption,
every video too short for the target frames — so one run shows all that needs fixing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .buckets import BucketSelector
from .config import DatasetSpec
from ..architectures import FAMILIES, VIDEO_FAMILIES
from ..errors import MusubiError
from .frames import TARGET_FPS, extract_windows, resample_frame_indices, window_suffix
from .media import image_size, is_image_file, is_video_file, video_info

# Architecture → (short code in cache file names, full name in cache metadata), as musubi-tuner names them.
ARCHITECTURE_CODES = {family.name: (family.cache_code, family.cache_architecture) for family in FAMILIES}
VIDEO_ARCHITECTURES = VIDEO_FAMILIES
# How many problems one error lists before it only counts the rest.
MAX_LISTED_UNREADABLE = 10
MAX_LISTED_SHORT = 20


@dataclass(frozen=True)
class PlannedItem:
    """One training item before (or after) encoding."""

    key: str  # <basename> or <basename>_<start>-<frames>
    basename: str
    source: str
    kind: str  # "image" or "video"
    caption: str
    size: tuple[int, int]  # original (width, height)
    bucket: tuple[int, int]
    frames: tuple[int, ...] | None  # source-frame indices of a video item
    controls: tuple[str, ...]
    num_repeats: int
    cache_directory: str
    control_resolution: tuple[int, int] | None = None
    no_resize_control: bool = False


def plan_items(specs: list[DatasetSpec], architecture: str, where: str = "dataset") -> list[PlannedItem]:
    """Every item of every dataset; raises MusubiError listing all problems found.

    Every file of every dataset is probed before anything is reported, so an unreadable video is
    listed together with an unreadable image of the same folder (they are separate datasets).
    """
    if architecture not in ARCHITECTURE_CODES:
        raise MusubiError(f"{where}: architecture {architecture!r} is unknown; choose one of {', '.join(ARCHITECTURE_CODES)}.")
    items: list[PlannedItem] = []
    unreadable: list[str] = []
    too_short: list[str] = []
    for spec in specs:
        if spec.kind == "video" and architecture not in VIDEO_ARCHITECTURES:
            raise MusubiError(
                f"{where}: {spec.source} is a video dataset, but {architecture} trains on images only; "
                f"use an image dataset or a video architecture ({', '.join(VIDEO_ARCHITECTURES)})."
            )
        planned, broken, short = _plan_dataset(spec, architecture, where)
        items.extend(planned)
        unreadable.extend(broken)
        if short:
            too_short.append(
                f"{len(short)} video(s) in {spec.source} are shorter than the shortest target_frames "
                f"({min(spec.target_frames)}): {listing(short, MAX_LISTED_SHORT, ', ')}."
            )
    problems = []
    if unreadable:
        problems.append(unreadable_files_message(unreadable))
    if too_short:
        problems.append(" ".join(too_short) + " Lower target_frames, or remove these videos.")
    if problems:
        raise MusubiError(f"{where}: " + " ".join(problems))
    if not items:
        sources = ", ".join(spec.source for spec in specs)
        raise MusubiError(f"{where}: no training items found in {sources}; add images or videos with captions.")
    _check_unique_cache_names(items, architecture, where)
    return items


def listing(entries: list[str], limit: int, separator: str = " ") -> str:
    """The first ``limit`` entries, then how many more there are."""
    shown = separator.join(entries[:limit])
    return shown + (f"{separator}… and {len(entries) - limit} more" if len(entries) > limit else "")


def unreadable_files_message(errors: list[str]) -> str:
    """One sentence for every file that could not be read (each error names its file), capped."""
    text = f"{len(errors)} file(s) cannot be read — {listing(errors, MAX_LISTED_UNREADABLE)}"
    return text if text.endswith(".") else text + "."


def latent_cache_name(item: PlannedItem, architecture: str) -> str:
    """musubi-tuner's name: ``<key>_<WWWW>x<HHHH>_<code>.safetensors`` with the original size."""
    return f"{item.key}_{item.size[0]:04d}x{item.size[1]:04d}_{ARCHITECTURE_CODES[architecture][0]}.safetensors"


def text_cache_name(item: PlannedItem, architecture: str) -> str:
    """musubi-tuner's name: ``<basename>_<code>_te.safetensors`` (one per source file)."""
    return f"{item.basename}_{ARCHITECTURE_CODES[architecture][0]}_te.safetensors"


def _plan_dataset(spec: DatasetSpec, architecture: str, where: str) -> tuple[list[PlannedItem], list[str], list[str]]:
    """``(items, errors of unreadable files, videos too short)`` of one dataset; the caller reports."""
    entries = _entries(spec, where)
    selector = BucketSelector(spec.resolution, spec.enable_bucket, spec.bucket_no_upscale)
    items: list[PlannedItem] = []
    too_short: list[str] = []
    unreadable: list[str] = []
    for source, caption, controls in entries:
        basename = os.path.splitext(os.path.basename(source))[0]
        common = dict(basename=basename, source=source, caption=caption, controls=tuple(controls),
                      num_repeats=spec.num_repeats, cache_directory=spec.cache_folder,
                      control_resolution=spec.control_resolution, no_resize_control=spec.no_resize_control)
        try:
            info = image_size(source) if spec.kind == "image" else video_info(source)
        except MusubiError as error:
            unreadable.append(str(error))
            continue
        if spec.kind == "image":
            width, height = info
            items.append(PlannedItem(key=basename, kind="image", size=(width, height),
                                     bucket=selector.bucket_for(width, height), frames=None, **common))
            continue
        width, height, count = info
        usable = list(range(count))
        if spec.source_fps is not None:
            usable = resample_frame_indices(count, spec.source_fps, TARGET_FPS.get(architecture, spec.source_fps))
        windows = extract_windows(len(usable), spec.frame_extraction, spec.target_frames, spec.frame_stride,
                                  spec.frame_sample, spec.max_frames)
        if not windows:
            too_short.append(f"{os.path.basename(source)} ({len(usable)} frames)")
            continue
        bucket = selector.bucket_for(width, height)
        for window in windows:
            items.append(PlannedItem(key=f"{basename}_{window_suffix(window)}", kind="video", size=(width, height),
                                     bucket=bucket, frames=tuple(usable[i] for i in window), **common))
    return items, unreadable, too_short


def _entries(spec: DatasetSpec, where: str) -> list[tuple[str, str, list[str]]]:
    """``(media path, caption, control paths)`` of a dataset, from its folder or JSONL file."""
    if spec.jsonl_file:
        return _jsonl_entries(spec, where)
    folder = spec.directory
    if not folder or not os.path.isdir(folder):
        raise MusubiError(f"{where}: the folder {folder!r} does not exist; check the path.")
    accepts = is_image_file if spec.kind == "image" else is_video_file
    files = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                   if accepts(name) and not name.startswith(".") and os.path.isfile(os.path.join(folder, name)))
    if not files:
        kind = "images" if spec.kind == "image" else "videos"
        raise MusubiError(f"{where}: the folder {folder} holds no {kind}; put the training {kind} (with caption files) there.")
    entries, missing = [], []
    for path in files:
        caption_file = os.path.splitext(path)[0] + spec.caption_extension
        if not os.path.isfile(caption_file):
            missing.append(os.path.basename(path))
            continue
        with open(caption_file, encoding="utf-8") as file:
            caption = file.read().strip()
        entries.append((path, caption, _controls(spec, path, where)))
    if missing:
        raise MusubiError(
            f"{where}: {len(missing)} file(s) in {folder} have no caption file (<name>{spec.caption_extension}): "
            f"{', '.join(missing[:20])}{' …' if len(missing) > 20 else ''}. Add the captions (an empty file means no caption)."
        )
    return entries


def _controls(spec: DatasetSpec, path: str, where: str) -> list[str]:
    """Control images of an item: same base name in control_directory, or numbered ``<name>_0``, ``<name>_1`` …"""
    if not spec.control_directory:
        return []
    if not os.path.isdir(spec.control_directory):
        raise MusubiError(f"{where}: control_directory {spec.control_directory} does not exist.")
    basename = os.path.splitext(os.path.basename(path))[0]
    names = sorted(os.listdir(spec.control_directory))
    exact = [name for name in names if os.path.splitext(name)[0] == basename and is_image_file(name)]
    numbered = sorted(
        (name for name in names if is_image_file(name) and os.path.splitext(name)[0].startswith(basename + "_")
         and os.path.splitext(name)[0][len(basename) + 1:].isdigit()),
        key=lambda name: int(os.path.splitext(name)[0][len(basename) + 1:]),
    )
    found = exact[:1] + numbered
    if not found:
        raise MusubiError(
            f"{where}: no control image for {os.path.basename(path)} in {spec.control_directory} "
            f"(expected {basename}.png or {basename}_0.png …)."
        )
    return [os.path.join(spec.control_directory, name) for name in found]


def _jsonl_entries(spec: DatasetSpec, where: str) -> list[tuple[str, str, list[str]]]:
    path = spec.jsonl_file
    if not os.path.isfile(path):
        raise MusubiError(f"{where}: the JSONL file {path} does not exist.")
    media_key = "image_path" if spec.kind == "image" else "video_path"
    base = os.path.dirname(path)
    entries = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise MusubiError(f"{path} line {number}: not valid JSON ({error.msg}).") from error
            if not isinstance(record, dict) or media_key not in record:
                raise MusubiError(f"{path} line {number}: needs {media_key!r} and 'caption'.")
            if not isinstance(record.get("caption"), str):
                raise MusubiError(f"{path} line {number}: the caption is missing or not text.")
            media = os.path.join(base, os.path.expanduser(record[media_key]))
            if not os.path.isfile(media):
                raise MusubiError(f"{path} line {number}: {record[media_key]} does not exist.")
            controls = [record["control_path"]] if "control_path" in record else []
            index = 0
            while f"control_path_{index}" in record:
                controls.append(record[f"control_path_{index}"])
                index += 1
            entries.append((media, record["caption"].strip(), [os.path.join(base, c) for c in controls]))
    if not entries:
        raise MusubiError(f"{where}: {path} lists no items.")
    return entries


def _check_unique_cache_names(items: list[PlannedItem], architecture: str, where: str) -> None:
    seen: dict[str, str] = {}
    for item in items:
        text_path = os.path.normcase(os.path.join(item.cache_directory, text_cache_name(item, architecture)))
        if text_path in seen and seen[text_path] != item.source:
            raise MusubiError(
                f"{where}: {item.source} and {seen[text_path]} have the same base name, so their captions would share "
                f"the cache file {text_path}; rename one."
            )
        seen[text_path] = item.source
        path = os.path.normcase(os.path.join(item.cache_directory, latent_cache_name(item, architecture)))
        if path in seen and seen[path] != item.source:
            raise MusubiError(
                f"{where}: {item.source} and {seen[path]} would share the cache file {path} (same base name and size); "
                "rename one, or give their datasets different cache directories."
            )
        seen[path] = item.source
