"""Which frames and frame indices each FramePack section sees while a video is *sampled*.

A video of ``S`` sections of ``window`` latent frames (9 by default) is generated one section at
a time; each section is denoised next to clean context taken from what was generated so far —
the start frame and one recent frame at full resolution (*clean*), two frames squeezed 2× and
sixteen squeezed 4× (*history*) — and every frame carries a frame index, its place on the time
axis for the rotary embedding. musubi-tuner (following lllyasviel's demos) has two directions:

* **vanilla** (inverted anti-drifting, ``demo_gradio.py``): sections are generated from the *end*
  of the video backwards. The history buffer starts as 19 zero frames; generated sections are
  put in front of it, so its first 19 frames are always the frames right after the section being
  made. Section indices: start frame 0, ``padding·window`` blank indices, the ``window`` target
  frames, then the clean frame after them and the 2x and 4x history:
  ``[0 | blank… | target… | post | 2x, 2x | 4x ×16]``. Paddings in sampling order are
  ``S−1, …, 1, 0``, or ``3, 2, …, 2, 1, 0`` past four sections. The last section sampled (the
  first in time) gets the start frame put in front, so the video has ``S·window + 1`` frames.
* **F1** (``demo_gradio_f1.py``): sections are generated forwards. The buffer starts as 19 zero
  frames followed by the start frame; generated sections are appended, and the context is its
  last 19 frames. Indices are the same for every section:
  ``[start 0 | 4x 1–16 | 2x 17, 18 | 1x 19 | target 20…]``.

Section count from a duration: ``max(round(seconds·fps / (window·4)), 1)`` (each latent frame is
four video frames; musubi fixes fps at 30).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MusubiError
from .training_sections import HISTORY_2X_FRAMES, HISTORY_4X_FRAMES, HISTORY_FRAMES, LATENT_WINDOW_SIZE, vanilla_paddings

DIRECTIONS = ("vanilla", "f1")
VIDEO_FRAMES_PER_LATENT = 4


@dataclass(frozen=True)
class SamplingSection:
    """One section in sampling order: its place in the video and the frame indices it uses."""

    order: int  # 0 = sampled first
    time_position: int  # 0 = the section right after the start frame
    padding: int  # blank windows between the start frame and the target (vanilla); 0 for F1
    latent_indices: tuple[int, ...]
    clean_indices: tuple[int, int]
    history_2x_indices: tuple[int, ...]
    history_4x_indices: tuple[int, ...]
    last: bool  # the last one sampled


def _check_whole(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MusubiError(f"FramePack {name} must be a whole number ≥ {minimum}, got {value!r}.")
    return value


def sections_for_duration(seconds: float, fps: float, window: int = LATENT_WINDOW_SIZE) -> int:
    """Sections for a video of ``seconds`` at ``fps`` (each section is ``window·4`` video frames)."""
    _check_whole(window, "latent_window_size")
    if not (seconds > 0 and fps > 0):
        raise MusubiError(f"FramePack total length needs seconds > 0 and fps > 0, got {seconds!r} s at {fps!r} fps.")
    return max(round(seconds * fps / (window * VIDEO_FRAMES_PER_LATENT)), 1)


def sampling_paddings(sections: int) -> list[int]:
    """Vanilla paddings in sampling order (last section of the video first)."""
    return list(reversed(vanilla_paddings(sections)))


def plan_sections(sections: int, window: int = LATENT_WINDOW_SIZE, direction: str = "vanilla") -> list[SamplingSection]:
    """The sections of a run in the order they are sampled."""
    _check_whole(sections, "section count")
    _check_whole(window, "latent_window_size")
    if direction not in DIRECTIONS:
        raise MusubiError(f"FramePack direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}.")
    plan = []
    if direction == "vanilla":
        for order, padding in enumerate(sampling_paddings(sections)):
            target = 1 + padding * window
            post = target + window
            plan.append(SamplingSection(
                order=order, time_position=sections - 1 - order, padding=padding,
                latent_indices=tuple(range(target, target + window)),
                clean_indices=(0, post),
                history_2x_indices=tuple(range(post + 1, post + 1 + HISTORY_2X_FRAMES)),
                history_4x_indices=tuple(range(post + 1 + HISTORY_2X_FRAMES, post + 1 + HISTORY_2X_FRAMES + HISTORY_4X_FRAMES)),
                last=order == sections - 1,
            ))
        return plan
    first_target = 1 + HISTORY_FRAMES
    for order in range(sections):
        plan.append(SamplingSection(
            order=order, time_position=order, padding=0,
            latent_indices=tuple(range(first_target, first_target + window)),
            clean_indices=(0, HISTORY_FRAMES),
            history_2x_indices=tuple(range(1 + HISTORY_4X_FRAMES, 1 + HISTORY_4X_FRAMES + HISTORY_2X_FRAMES)),
            history_4x_indices=tuple(range(1, 1 + HISTORY_4X_FRAMES)),
            last=order == sections - 1,
        ))
    return plan


def video_frames(sections: int, window: int = LATENT_WINDOW_SIZE) -> int:
    """Latent frames of the finished video: the start frame plus every section."""
    return 1 + sections * window


class SectionHistory:
    """The frames generated so far and the clean context each section sees.

    ``start`` is the start image's latent ``[B, C, 1, H, W]`` (already in the model's scale).
    ``end`` (vanilla only, as in musubi-tuner) is an end image's latent: it takes the place of the
    first zero frame of the history, so the last section of the video is drawn towards it.
    """

    def __init__(self, start: torch.Tensor, direction: str = "vanilla", end: torch.Tensor | None = None):
        if start.dim() != 5 or start.shape[2] != 1:
            raise MusubiError(f"FramePack start latent must be one frame [B, C, 1, H, W], got {tuple(start.shape)}.")
        if direction not in DIRECTIONS:
            raise MusubiError(f"FramePack direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}.")
        if end is not None and direction != "vanilla":
            raise MusubiError("FramePack end image: only the vanilla direction can use one (F1 generates forwards).")
        if end is not None and (end.dim() != 5 or end.shape[2] != 1 or end.shape[:2] + end.shape[3:] != start.shape[:2] + start.shape[3:]):
            raise MusubiError(
                f"FramePack end latent {tuple(end.shape)} must be one frame of the start latent's size {tuple(start.shape)}."
            )
        self.start = start
        self.direction = direction
        batch, channels, _, height, width = start.shape
        zeros = torch.zeros((batch, channels, HISTORY_FRAMES, height, width), dtype=start.dtype, device=start.device)
        if direction == "vanilla":
            if end is not None:
                zeros[:, :, :1] = end.to(zeros)
            self.frames = zeros
            self.generated = 0
        else:
            self.frames = torch.cat([zeros, start], dim=2)
            self.generated = 1

    def context(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clean [start, 1x], 2x history, 4x history) for the next section."""
        if self.direction == "vanilla":
            recent = self.frames[:, :, :HISTORY_FRAMES]
            one, two, four = recent.split([1, HISTORY_2X_FRAMES, HISTORY_4X_FRAMES], dim=2)
        else:
            recent = self.frames[:, :, -HISTORY_FRAMES:]
            four, two, one = recent.split([HISTORY_4X_FRAMES, HISTORY_2X_FRAMES, 1], dim=2)
        return torch.cat([self.start, one], dim=2), two, four

    def add(self, section: SamplingSection, generated: torch.Tensor) -> None:
        """Put a finished section into the history (in front for vanilla, behind for F1)."""
        generated = generated.to(self.frames)
        if self.direction == "vanilla":
            if section.last:
                generated = torch.cat([self.start.to(generated), generated], dim=2)
            self.frames = torch.cat([generated, self.frames], dim=2)
        else:
            self.frames = torch.cat([self.frames, generated], dim=2)
        self.generated += generated.shape[2]

    def video(self) -> torch.Tensor:
        """The frames generated so far in time order (the start frame first once it is in)."""
        if self.direction == "vanilla":
            return self.frames[:, :, : self.generated]
        return self.frames[:, :, self.frames.shape[2] - self.generated:]
