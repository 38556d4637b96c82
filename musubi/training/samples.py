"""Samples during training: when they are due, what their files are called, how they are encoded.

The sampling itself belongs to whoever owns the model (the ComfyUI node samples through ComfyUI's
own sampler); this module only knows the schedule, the names, the pictures (PNG for one frame,
animated WebP for a video, both with Pillow), the atomic writes next to the checkpoints, and how
to leave every random stream as it was so that sampling never changes what training draws next.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..files import write_bytes_atomically

SAMPLES_FOLDER = "samples"  # inside the run's LoRA folder, next to the checkpoints


@dataclass(frozen=True)
class SampleTiming:
    """When one group of prompts is sampled: every N steps (0 = never), whenever a LoRA file is
    written (checkpoints and the final LoRA), and before the first step."""

    every_n_steps: int = 0
    at_checkpoints: bool = True
    at_start: bool = False

    def due_after_step(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def describe(self) -> str:
        parts = []
        if self.at_start:
            parts.append("at the start")
        if self.every_n_steps:
            parts.append(f"every {self.every_n_steps} steps")
        if self.at_checkpoints:
            parts.append("at every checkpoint")
        return ", ".join(parts) or "never"


def sample_file_name(output_name: str, step: int, index: int, frames: int) -> str:
    """``<output_name>-step000004-p1.png`` (a video: ``.webp``): sorted by step, then prompt."""
    extension = "webp" if frames > 1 else "png"
    return f"{output_name}-step{step:06d}-p{index + 1}.{extension}"


def to_uint8_frames(images: torch.Tensor) -> np.ndarray:
    """ComfyUI IMAGE frames ``[F, H, W, C]`` in 0..1 as ``uint8`` RGB (truncated like core Save Image)."""
    pixels = images.detach().float().cpu().mul(255).clamp(0, 255).to(torch.uint8).numpy()
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return pixels[..., :3]


def encode_frames(frames: np.ndarray, fps: float = 16.0) -> bytes:
    """One frame: PNG. Several: a looping animated WebP (what browsers and TensorBoard-free viewers
    play without a codec)."""
    pictures = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    if len(pictures) == 1:
        pictures[0].save(buffer, format="PNG", compress_level=4)
    else:
        duration = max(1, round(1000 / max(fps, 0.1)))
        pictures[0].save(buffer, format="WEBP", save_all=True, append_images=pictures[1:], duration=duration, loop=0,
                         lossless=False, quality=90, method=4)
    return buffer.getvalue()


def encode_sample(output_name: str, step: int, index: int, images: torch.Tensor, fps: float = 16.0) -> tuple[str, bytes]:
    """(file name, encoded file) of one sample's frames: a PNG, or an animated WebP for a video."""
    frames = to_uint8_frames(images)
    return sample_file_name(output_name, step, index, len(frames)), encode_frames(frames, fps)


def write_sample(folder: str, output_name: str, step: int, index: int, images: torch.Tensor, fps: float = 16.0) -> str:
    """Writes one sample's frames atomically into ``folder``; returns the file's path."""
    name, data = encode_sample(output_name, step, index, images, fps)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    write_bytes_atomically(path, data)
    return path


def log_to_trackers(trackers, step: int, tag: str, images: torch.Tensor) -> None:
    """Logs a sample's first frame (``[F, H, W, C]`` in 0..1) to every TensorBoard tracker."""
    frame = to_uint8_frames(images[:1])[0]
    for tracker in trackers:
        if getattr(tracker, "name", None) == "tensorboard":
            tracker.tracker.add_image(tag, frame, global_step=step, dataformats="HWC")
