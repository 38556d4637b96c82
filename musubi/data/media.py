"""Reading training images (Pillow) and videos (PyAV), fitted to their bucket.

Both libraries are imported only when a file is read. An unreadable file raises MusubiError
naming it. Frames come back as ``uint8`` arrays ``[H, W, 3]`` (RGB).
"""

from __future__ import annotations

import os

import numpy as np

from .buckets import resize_plan
from ..errors import MusubiError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".gif")


def image_size(path: str) -> tuple[int, int]:
    """``(width, height)`` from the file header, without decoding the pixels."""
    Image = _pillow()
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for bad files
        raise MusubiError(f"{path}: cannot read this image ({error}); replace or remove it.") from error


def read_image(path: str):
    """The image as an RGB Pillow image (transparency dropped)."""
    Image = _pillow()
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except Exception as error:  # noqa: BLE001
        raise MusubiError(f"{path}: cannot read this image ({error}); replace or remove it.") from error


def fit_to_bucket(image, bucket: tuple[int, int]) -> np.ndarray:
    """Resize to cover ``bucket`` (Lanczos up, box/area down) and center-crop to it: ``uint8 [H, W, 3]``."""
    Image = _pillow()
    plan = resize_plan(image.width, image.height, bucket)
    if plan.size != (image.width, image.height):
        image = image.resize(plan.size, Image.LANCZOS if plan.upscale else Image.BOX)
    image = image.crop(plan.crop)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def video_info(path: str) -> tuple[int, int, int]:
    """``(width, height, frame count)``; the frames are counted by decoding when the container does not say."""
    av = _pyav()
    try:
        with av.open(path) as container:
            stream = _video_stream(container, path)
            width, height = stream.codec_context.width, stream.codec_context.height
            count = stream.frames
            if not count:
                count = sum(1 for _ in container.decode(stream))
            return width, height, int(count)
    except MusubiError:
        raise
    except Exception as error:  # noqa: BLE001 - PyAV raises many types for bad files
        raise MusubiError(f"{path}: cannot read this video ({error}); replace or remove it.") from error


def read_video_frames(path: str, indices: list[int] | None = None) -> list:
    """The frames at ``indices`` (all frames when None) as RGB Pillow images, in index order."""
    av = _pyav()
    wanted = None if indices is None else set(indices)
    last = None if indices is None else max(indices)
    frames: dict[int, object] = {}
    try:
        with av.open(path) as container:
            stream = _video_stream(container, path)
            for index, frame in enumerate(container.decode(stream)):
                if wanted is None or index in wanted:
                    frames[index] = frame.to_image().convert("RGB")
                if last is not None and index >= last:
                    break
    except Exception as error:  # noqa: BLE001
        raise MusubiError(f"{path}: cannot read this video ({error}); replace or remove it.") from error
    order = sorted(frames) if indices is None else list(indices)
    missing = [index for index in order if index not in frames]
    if missing:
        raise MusubiError(
            f"{path}: the video ended before frame {missing[0]} ({len(frames)} frames decoded); "
            "the file may be truncated — re-encode or remove it."
        )
    return [frames[index] for index in order]


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_video_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def _video_stream(container, path: str):
    if not container.streams.video:
        raise MusubiError(f"{path}: holds no video stream; replace or remove it.")
    return container.streams.video[0]


def _pillow():
    from PIL import Image

    return Image


def _pyav():
    try:
        import av
    except ImportError as error:
        raise MusubiError("reading videos needs PyAV: pip install av") from error
    return av
