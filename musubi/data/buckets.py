"""Aspect-ratio buckets: which training resolution an image or video of a given size gets.

musubi-tuner's rules. For a target resolution ``W×H`` (area ``A = W·H``) and a step ``q`` (16 for
every architecture here) the buckets are: with ``r = floor(√A)`` and ``w0 = q·floor((r // 2) / q)``,
for ``w = w0, w0 + q, …`` while ``w < r + q``, the sizes ``(w, h)`` and ``(h, w)`` with
``h = q·floor((A // w) / q)``, deduplicated and sorted. An item goes to the bucket whose aspect
ratio ``w / h`` is nearest its own (the first in sorted order on a tie); with ``bucket_no_upscale``
an item no larger than ``A`` keeps its own size floored to multiples of ``q`` instead. Without
bucketing every item gets ``W×H``.

An item is resized so it covers its bucket (scale ``k = max(bw / iw, bh / ih)``, new size
``int(iw·k + 0.5) × int(ih·k + 0.5)``), then center-cropped with offsets ``floor((new − bucket) / 2)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import MusubiError

BUCKET_STEP = 16


def parse_resolution(value, option: str = "resolution") -> tuple[int, int]:
    """``960`` or ``[960, 544]`` → ``(width, height)``."""
    if isinstance(value, bool):
        raise MusubiError(f"{option} must be a number or [width, height], got {value!r}.")
    if isinstance(value, int):
        width = height = value
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        width, height = value
    else:
        raise MusubiError(f"{option} must be a whole number or [width, height], got {value!r}.")
    if width < BUCKET_STEP or height < BUCKET_STEP:
        raise MusubiError(f"{option} {width}x{height} is too small; each side must be at least {BUCKET_STEP}.")
    return int(width), int(height)


def bucket_resolutions(resolution: tuple[int, int], step: int = BUCKET_STEP) -> list[tuple[int, int]]:
    """Every bucket ``(w, h)`` of about the area of ``resolution``, sorted."""
    area = resolution[0] * resolution[1]
    root = math.isqrt(area)
    width = step * ((root // 2) // step)
    found: set[tuple[int, int]] = set()
    while width < root + step:
        if width > 0:
            height = step * ((area // width) // step)
            if height > 0:
                found.add((width, height))
                found.add((height, width))
        width += step
    return sorted(found)


@dataclass(frozen=True)
class BucketSelector:
    """Chooses each item's bucket for one dataset's settings."""

    resolution: tuple[int, int]
    enable_bucket: bool = False
    bucket_no_upscale: bool = False
    step: int = BUCKET_STEP

    def __post_init__(self):
        if self.enable_bucket:
            buckets = bucket_resolutions(self.resolution, self.step)
            if not buckets:
                raise MusubiError(f"resolution {self.resolution[0]}x{self.resolution[1]} gives no bucket; use a larger resolution.")
            object.__setattr__(self, "_buckets", buckets)

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return list(getattr(self, "_buckets", [self.resolution]))

    def bucket_for(self, width: int, height: int) -> tuple[int, int]:
        if width <= 0 or height <= 0:
            raise MusubiError(f"an item of size {width}x{height} has no pixels.")
        if not self.enable_bucket:
            return self.resolution
        if self.bucket_no_upscale and width * height <= self.resolution[0] * self.resolution[1]:
            own = (self.step * (width // self.step), self.step * (height // self.step))
            if own[0] == 0 or own[1] == 0:
                raise MusubiError(
                    f"an item of size {width}x{height} is smaller than one bucket step ({self.step} px); "
                    "remove it or turn bucket_no_upscale off."
                )
            return own
        ratio = width / height
        buckets = self._buckets
        errors = [abs(w / h - ratio) for w, h in buckets]
        return buckets[errors.index(min(errors))]


@dataclass(frozen=True)
class ResizePlan:
    """How one item becomes its bucket: resize to ``size``, then crop the box ``(left, top, right, bottom)``."""

    size: tuple[int, int]
    crop: tuple[int, int, int, int]
    upscale: bool


def resize_plan(width: int, height: int, bucket: tuple[int, int]) -> ResizePlan:
    scale = max(bucket[0] / width, bucket[1] / height)
    new_width, new_height = int(width * scale + 0.5), int(height * scale + 0.5)
    left, top = (new_width - bucket[0]) // 2, (new_height - bucket[1]) // 2
    return ResizePlan((new_width, new_height), (left, top, left + bucket[0], top + bucket[1]), scale > 1)
