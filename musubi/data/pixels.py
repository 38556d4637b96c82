"""Pixels of one planned item, fitted to its bucket, as the VAE takes them: ``float [T, H, W, 3]`` in 0..1."""

from __future__ import annotations

import numpy as np
import torch

from .buckets import BUCKET_STEP, BucketSelector
from .plan import PlannedItem
from .media import fit_to_bucket, read_image, read_video_frames


def item_pixels(item: PlannedItem) -> torch.Tensor:
    if item.kind == "image":
        frames = [read_image(item.source)]
    else:
        frames = read_video_frames(item.source, list(item.frames))
    return _to_tensor([fit_to_bucket(frame, item.bucket) for frame in frames])


def control_pixels(item: PlannedItem) -> list[torch.Tensor]:
    """Each control image at the item's bucket, at the bucket of ``control_resolution`` when set, or
    at its own size floored to the bucket step with ``no_resize_control``."""
    result = []
    for path in item.controls:
        image = read_image(path)
        if item.no_resize_control:
            bucket = (BUCKET_STEP * (image.width // BUCKET_STEP), BUCKET_STEP * (image.height // BUCKET_STEP))
        elif item.control_resolution is not None:
            bucket = BucketSelector(item.control_resolution, enable_bucket=True).bucket_for(image.width, image.height)
        else:
            bucket = item.bucket
        result.append(_to_tensor([fit_to_bucket(image, bucket)]))
    return result


def first_frame_video(pixels: torch.Tensor) -> torch.Tensor:
    """Image-to-video input as core WanImageToVideo builds it: the item's first frame, then mid-gray
    (0.5) for the remaining frames."""
    video = torch.full_like(pixels, 0.5)
    video[:1] = pixels[:1]
    return video


def _to_tensor(frames: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(frames)).float().div(255.0)
