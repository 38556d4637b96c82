"""musubi-tuner's dataset configuration: a ``[general]`` table and ``[[datasets]]`` entries.

Each dataset reads images (``image_directory`` or ``image_jsonl_file``) or videos
(``video_directory`` or ``video_jsonl_file``) with captions. A value is taken from the dataset's
own entry, else from ``[general]``, else musubi's default. Unknown keys, wrong types and
contradictions are errors naming the dataset and the key (musubi reports some, ignores others).
Relative paths are taken relative to the TOML file's folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from .buckets import parse_resolution
from ..errors import MusubiError
from .frames import MODES, normalize_target_frames

DEFAULT_RESOLUTION = (960, 544)

# key -> (kind, default); kinds are checked by _check_type.
_COMMON = {
    "resolution": ("resolution", DEFAULT_RESOLUTION),
    "caption_extension": ("str", ".txt"),
    "batch_size": ("int", 1),
    "num_repeats": ("int", 1),
    "enable_bucket": ("bool", False),
    "bucket_no_upscale": ("bool", False),
}
_IMAGE_ONLY = {
    "image_directory": ("path", None),
    "image_jsonl_file": ("path", None),
    "multiple_target": ("bool", False),
    "fp_latent_window_size": ("int", 9),
    "fp_1f_clean_indices": ("int list", None),
    "fp_1f_target_index": ("int", None),
    "fp_1f_no_post": ("bool", False),
}
_VIDEO_ONLY = {
    "video_directory": ("path", None),
    "video_jsonl_file": ("path", None),
    "target_frames": ("int list", [1]),
    "frame_extraction": ("str", "head"),
    "frame_stride": ("int", 1),
    "frame_sample": ("int", 1),
    "max_frames": ("int", 129),
    "source_fps": ("number", None),
    "fp_latent_window_size": ("int", 9),
}
_SHARED_DATASET = {
    "cache_directory": ("path", None),
    "control_directory": ("path", None),
    "no_resize_control": ("bool", False),
    "control_resolution": ("resolution", None),
}
_ALIASES = {
    "flux_kontext_no_resize_control": "no_resize_control",
    "qwen_image_edit_no_resize_control": "no_resize_control",
    "qwen_image_edit_control_resolution": "control_resolution",
}


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset's resolved settings (paths absolute)."""

    kind: str  # "image" or "video"
    directory: str | None = None
    jsonl_file: str | None = None
    caption_extension: str = ".txt"
    resolution: tuple[int, int] = DEFAULT_RESOLUTION
    batch_size: int = 1
    num_repeats: int = 1
    enable_bucket: bool = False
    bucket_no_upscale: bool = False
    cache_directory: str | None = None
    control_directory: str | None = None
    no_resize_control: bool = False
    control_resolution: tuple[int, int] | None = None
    target_frames: tuple[int, ...] = (1,)
    frame_extraction: str = "head"
    frame_stride: int = 1
    frame_sample: int = 1
    max_frames: int = 129
    source_fps: float | None = None
    extra: dict = field(default_factory=dict)  # accepted keys this library does not use (FramePack one-frame options)

    @property
    def source(self) -> str:
        return self.directory or self.jsonl_file or ""

    @property
    def cache_folder(self) -> str:
        """musubi's default: the image/video directory itself (required for JSONL datasets)."""
        if self.cache_directory:
            return self.cache_directory
        if self.directory:
            return self.directory
        raise MusubiError(f"dataset {self.jsonl_file}: a JSONL dataset needs a cache_directory.")


def load_dataset_config(path: str) -> list[DatasetSpec]:
    """Read a musubi-tuner dataset TOML (or JSON) file."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise MusubiError(f"dataset config {path}: file not found.")
    try:
        if path.lower().endswith(".json"):
            import json

            with open(path, encoding="utf-8") as file:
                data = json.load(file)
        else:
            import toml

            data = toml.load(path)
    except Exception as error:  # noqa: BLE001 - toml/json raise several types for bad syntax
        raise MusubiError(f"dataset config {path}: cannot be parsed ({error}).") from error
    return parse_dataset_config(data, os.path.dirname(path), where=path)


def parse_dataset_config(data: Any, base_dir: str, where: str = "dataset config") -> list[DatasetSpec]:
    if not isinstance(data, dict):
        raise MusubiError(f"{where}: expected a table with [general] and [[datasets]].")
    unknown = set(data) - {"general", "datasets"}
    if unknown:
        raise MusubiError(f"{where}: unknown top-level key(s) {', '.join(sorted(unknown))}; only [general] and [[datasets]] are allowed.")
    general = _renamed(data.get("general") or {}, f"{where} [general]")
    if not isinstance(general, dict):
        raise MusubiError(f"{where}: [general] must be a table.")
    for key in general:
        if key not in _COMMON:
            raise MusubiError(
                f"{where} [general]: key {key!r} is not allowed here; [general] takes {', '.join(_COMMON)}. "
                "Put dataset-specific keys in the [[datasets]] entry."
            )
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise MusubiError(f"{where}: no [[datasets]] entries; add at least one with image_directory or video_directory.")
    specs = [_parse_dataset(entry, general, base_dir, f"{where} [[datasets]] #{index + 1}") for index, entry in enumerate(datasets)]
    caches: dict[str, str] = {}
    for spec in specs:
        folder = os.path.normcase(spec.cache_folder)
        if folder in caches:
            raise MusubiError(
                f"{where}: datasets {caches[folder]} and {spec.source} share the cache directory {spec.cache_folder}; "
                "give each dataset its own cache_directory."
            )
        caches[folder] = spec.source
    return specs


def _renamed(table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        return table
    result = {}
    for key, value in table.items():
        new = _ALIASES.get(key, key)
        if new in result:
            raise MusubiError(f"{where}: {key!r} and {new!r} are the same option; keep one.")
        result[new] = value
    return result


def _parse_dataset(entry: Any, general: dict, base_dir: str, where: str) -> DatasetSpec:
    if not isinstance(entry, dict):
        raise MusubiError(f"{where}: must be a table of options.")
    entry = _renamed(entry, where)
    is_image = "image_directory" in entry or "image_jsonl_file" in entry
    is_video = "video_directory" in entry or "video_jsonl_file" in entry
    if is_image and is_video:
        raise MusubiError(f"{where}: has both image and video sources; make one [[datasets]] entry for each.")
    if not is_image and not is_video:
        raise MusubiError(f"{where}: needs image_directory, image_jsonl_file, video_directory or video_jsonl_file.")
    kind = "image" if is_image else "video"
    allowed = {**_COMMON, **_SHARED_DATASET, **(_IMAGE_ONLY if is_image else _VIDEO_ONLY)}
    values: dict[str, Any] = {}
    for key, value in entry.items():
        if key not in allowed:
            other = _VIDEO_ONLY if is_image else _IMAGE_ONLY
            hint = f" (it belongs to {'video' if is_image else 'image'} datasets)" if key in other else ""
            raise MusubiError(f"{where}: unknown key {key!r}{hint}.")
        values[key] = _check_type(key, value, allowed[key][0], base_dir, where)
    for key, value in general.items():
        values.setdefault(key, _check_type(key, value, _COMMON[key][0], base_dir, f"{where.split(' [[')[0]} [general]"))
    directory_key, jsonl_key = (("image_directory", "image_jsonl_file") if is_image else ("video_directory", "video_jsonl_file"))
    if directory_key in values and jsonl_key in values:
        raise MusubiError(f"{where}: give either {directory_key} or {jsonl_key}, not both.")
    spec = DatasetSpec(kind=kind, directory=values.get(directory_key), jsonl_file=values.get(jsonl_key))
    settings: dict[str, Any] = {}
    for key in ("caption_extension", "resolution", "batch_size", "num_repeats", "enable_bucket", "bucket_no_upscale",
                "cache_directory", "control_directory", "no_resize_control", "control_resolution"):
        if key in values:
            settings[key] = values[key]
    if is_video:
        for key in ("frame_extraction", "frame_stride", "frame_sample", "max_frames", "source_fps"):
            if key in values:
                settings[key] = values[key]
        if "target_frames" in values:
            settings["target_frames"] = tuple(normalize_target_frames(values["target_frames"]))
    settings["extra"] = {key: values[key] for key in ("multiple_target", "fp_latent_window_size", "fp_1f_clean_indices",
                                                      "fp_1f_target_index", "fp_1f_no_post") if key in values}
    spec = replace(spec, **settings)
    _check_values(spec, where)
    if spec.jsonl_file and not spec.cache_directory:
        raise MusubiError(f"{where}: a JSONL dataset needs a cache_directory.")
    return spec


def _check_type(key: str, value: Any, kind: str, base_dir: str, where: str) -> Any:
    def fail(expected: str):
        raise MusubiError(f"{where}: {key} must be {expected}, got {value!r}.")

    if kind == "str":
        if not isinstance(value, str):
            fail("text")
        return value
    if kind == "path":
        if not isinstance(value, str) or not value.strip():
            fail("a path")
        return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            fail("a whole number")
        return value
    if kind == "number":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            fail("a number")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if kind == "int list":
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            fail("a list of whole numbers")
        return value
    if kind == "resolution":
        return parse_resolution(value, f"{where}: {key}")
    raise AssertionError(kind)


def _check_values(spec: DatasetSpec, where: str) -> None:
    if spec.num_repeats < 1:
        raise MusubiError(f"{where}: num_repeats must be at least 1, got {spec.num_repeats}.")
    if spec.batch_size < 1:
        raise MusubiError(f"{where}: batch_size must be at least 1, got {spec.batch_size}.")
    if spec.caption_extension and not spec.caption_extension.startswith("."):
        raise MusubiError(f"{where}: caption_extension {spec.caption_extension!r} must start with a dot, e.g. '.txt'.")
    if spec.frame_extraction not in MODES:
        raise MusubiError(f"{where}: frame_extraction {spec.frame_extraction!r} is unknown; choose one of {', '.join(MODES)}.")
    for key in ("frame_stride", "frame_sample", "max_frames"):
        if getattr(spec, key) < 1:
            raise MusubiError(f"{where}: {key} must be at least 1, got {getattr(spec, key)}.")
    if spec.source_fps is not None and spec.source_fps <= 0:
        raise MusubiError(f"{where}: source_fps must be positive, got {spec.source_fps}.")
