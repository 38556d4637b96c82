"""How a FramePack training example is cut from a video latent: sections, history and frame indices.

FramePack denoises a *section* of ``window`` latent frames (9 by default) while it sees clean
context frames: the start frame and one recent frame at full resolution ("clean"), two frames
squeezed 2× and sixteen squeezed 4× ("history"). Every frame carries a *frame index*, its
position on the time axis for the rotary embedding; the model learns from those positions where
the context lies relative to the frames it makes.

musubi-tuner cuts a video of ``T`` latent frames into ``S = (T − 1) // window`` sections (frames
past ``S·window + 1`` are dropped) and writes one training example per section, in one of
three layouts:

* **vanilla** (FramePack's inverted anti-drifting sampling, generated from the end backwards):
  the context is what sampling would have generated *before* this section — the later frames.
  Section ``k`` (time order, targets ``k·window + 1 …``) sees the start frame (index 0) and
  the 19 real frames that follow its target, as 1x/2x/4x, with zero frames past the end of the
  video. Its target sits after a gap of ``padding·window`` blank indices, where ``padding``
  follows sampling's own schedule (``3, 2, …, 2, 1, 0`` from the last section to the first, or
  simply ``k`` for four sections or fewer).
* **f1** (FramePack-F1, generated forwards): section ``k`` sees the start frame and the 19 real
  frames right before its target (zeros before the start of the video); the indices are the same
  for every section: start 0, 4x 1–16, 2x 17–18, 1x 19, target 20….
* **one_frame** (musubi's one-frame training, an image-editing use): the latent is the control
  image(s) followed by one target frame. The target sits at ``target_index`` (9), the controls at
  ``clean_indices`` (0), a zero frame at ``window + 1`` (10) unless ``no_post``, and the 2x/4x
  history is all zeros at 11–12 and 13–28.

musubi-tuner's one-frame mode can also leave the 2x/4x history out (``no_2x``/``no_4x``); the
diffusers FramePack transformer trained here fails without it (diffusers issue #13588), so this
module always gives the zero history of the right size, which is musubi's default.

The functions here are pure bookkeeping over frame counts; :func:`cut_section` then gathers the
tensors of one section from a latent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import MusubiError

LATENT_WINDOW_SIZE = 9
CLEAN_1X_FRAMES = 1
HISTORY_2X_FRAMES = 2
HISTORY_4X_FRAMES = 16
HISTORY_FRAMES = CLEAN_1X_FRAMES + HISTORY_2X_FRAMES + HISTORY_4X_FRAMES  # 19
LAYOUTS = ("vanilla", "f1", "one_frame")

# Names of the tensors of one section, as stored in latent cache items and handed to the adapter.
TARGET_KEY = "latents"
LATENT_INDICES_KEY = "latent_indices"
CLEAN_LATENTS_KEY = "clean_latents"
CLEAN_INDICES_KEY = "clean_latent_indices"
HISTORY_2X_KEY = "history_2x_latents"
HISTORY_2X_INDICES_KEY = "history_2x_indices"
HISTORY_4X_KEY = "history_4x_latents"
HISTORY_4X_INDICES_KEY = "history_4x_indices"
INDEX_KEYS = (LATENT_INDICES_KEY, CLEAN_INDICES_KEY, HISTORY_2X_INDICES_KEY, HISTORY_4X_INDICES_KEY)


@dataclass(frozen=True)
class Section:
    """One training example: the source frame of every slot (``None``: a zero frame) and the
    frame index of every slot, for the target and each kind of context."""

    target_frames: tuple[int, ...]
    latent_indices: tuple[int, ...]
    clean_frames: tuple[int | None, ...]
    clean_indices: tuple[int, ...]
    history_2x_frames: tuple[int | None, ...]
    history_2x_indices: tuple[int, ...]
    history_4x_frames: tuple[int | None, ...]
    history_4x_indices: tuple[int, ...]

    @property
    def index_layout(self) -> tuple[tuple[int, ...], ...]:
        """All frame indices: examples with equal layouts can share one batched forward."""
        return (self.latent_indices, self.clean_indices, self.history_2x_indices, self.history_4x_indices)


def _check_window(window: int) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise MusubiError(f"FramePack latent_window_size must be a whole number ≥ 1, got {window!r}.")
    return window


def section_count(latent_frames: int, window: int = LATENT_WINDOW_SIZE) -> int:
    """Sections a video of ``latent_frames`` latent frames gives (the start frame plus whole windows)."""
    window = _check_window(window)
    count = (int(latent_frames) - 1) // window
    if count < 1:
        raise MusubiError(
            f"FramePack training needs at least {window + 1} latent frames ({window * 4 + 1} video frames) for one "
            f"section of {window}; this latent has {latent_frames}. Use a longer video, a smaller latent window, "
            "or one-frame training for images."
        )
    return count


def vanilla_paddings(sections: int) -> list[int]:
    """Blank windows between the start frame and each section's target, in *time* order.

    Sampling goes from the last section to the first with paddings ``S−1, …, 1, 0``, or, past four
    sections, ``3, 2, …, 2, 1, 0``; training reuses the padding its section gets when sampled.
    """
    in_sampling_order = list(reversed(range(sections)))
    if sections > 4:
        in_sampling_order = [3] + [2] * (sections - 3) + [1, 0]
    return list(reversed(in_sampling_order))


def vanilla_sections(latent_frames: int, window: int = LATENT_WINDOW_SIZE) -> list[Section]:
    """The sections of FramePack's inverted anti-drifting layout, in time order."""
    count = section_count(latent_frames, window)
    used_frames = count * window + 1
    sections = []
    for k, padding in enumerate(vanilla_paddings(count)):
        target_start = k * window + 1
        # The history is the real video after the target, zeros past its end.
        following = [frame if frame < used_frames else None for frame in range(target_start + window, target_start + window + HISTORY_FRAMES)]
        target_index = 1 + padding * window
        post_index = target_index + window
        sections.append(Section(
            target_frames=tuple(range(target_start, target_start + window)),
            latent_indices=tuple(range(target_index, target_index + window)),
            clean_frames=(0, following[0]),
            clean_indices=(0, post_index),
            history_2x_frames=tuple(following[1:3]),
            history_2x_indices=tuple(range(post_index + 1, post_index + 3)),
            history_4x_frames=tuple(following[3:]),
            history_4x_indices=tuple(range(post_index + 3, post_index + 3 + HISTORY_4X_FRAMES)),
        ))
    return sections


def f1_sections(latent_frames: int, window: int = LATENT_WINDOW_SIZE) -> list[Section]:
    """The sections of FramePack-F1's forward layout, in time order."""
    count = section_count(latent_frames, window)
    sections = []
    for k in range(count):
        target_start = k * window + 1
        # The 19 frames right before the target, oldest first; zeros before the video starts.
        before = [frame if frame >= 0 else None for frame in range(target_start - HISTORY_FRAMES, target_start)]
        sections.append(Section(
            target_frames=tuple(range(target_start, target_start + window)),
            latent_indices=tuple(range(1 + HISTORY_FRAMES, 1 + HISTORY_FRAMES + window)),
            clean_frames=(0, before[-1]),
            clean_indices=(0, HISTORY_FRAMES),
            history_2x_frames=tuple(before[HISTORY_4X_FRAMES:HISTORY_4X_FRAMES + 2]),
            history_2x_indices=(1 + HISTORY_4X_FRAMES, 2 + HISTORY_4X_FRAMES),
            history_4x_frames=tuple(before[:HISTORY_4X_FRAMES]),
            history_4x_indices=tuple(range(1, 1 + HISTORY_4X_FRAMES)),
        ))
    return sections


def one_frame_section(
    control_count: int = 1,
    window: int = LATENT_WINDOW_SIZE,
    target_index: int | None = None,
    clean_indices: Sequence[int] | None = None,
    no_post: bool = False,
) -> Section:
    """musubi-tuner's one-frame layout for a latent of ``control_count`` control frames then the target.

    ``target_index`` defaults to ``window`` (9); ``clean_indices`` (one per control frame) to
    ``[0]``; unless ``no_post`` a zero frame sits at ``window + 1``.
    """
    window = _check_window(window)
    if isinstance(control_count, bool) or not isinstance(control_count, int) or control_count < 1:
        raise MusubiError(f"FramePack one-frame training needs at least one control image, got {control_count!r}.")
    if clean_indices is None:
        if control_count != 1:
            raise MusubiError(
                f"FramePack one-frame training: {control_count} control images need as many clean indices "
                "(e.g. 0,1 for two start images, 0,10 for a start and an end image)."
            )
        clean_indices = (0,)
    clean_indices = tuple(int(index) for index in clean_indices)
    if len(clean_indices) != control_count:
        raise MusubiError(
            f"FramePack one-frame training: {len(clean_indices)} clean indices ({', '.join(map(str, clean_indices))}) "
            f"for {control_count} control image(s); give one index per control image."
        )
    target_index = window if target_index is None else int(target_index)
    if target_index < 0 or any(index < 0 for index in clean_indices):
        raise MusubiError("FramePack one-frame training: frame indices must be ≥ 0.")
    post_index = 1 + window
    clean_frames: tuple[int | None, ...] = tuple(range(control_count))
    if not no_post:
        clean_frames += (None,)
        clean_indices += (post_index,)
    return Section(
        target_frames=(control_count,),
        latent_indices=(target_index,),
        clean_frames=clean_frames,
        clean_indices=clean_indices,
        history_2x_frames=(None,) * HISTORY_2X_FRAMES,
        history_2x_indices=tuple(range(post_index + 1, post_index + 1 + HISTORY_2X_FRAMES)),
        history_4x_frames=(None,) * HISTORY_4X_FRAMES,
        history_4x_indices=tuple(range(post_index + 1 + HISTORY_2X_FRAMES, post_index + 1 + HISTORY_2X_FRAMES + HISTORY_4X_FRAMES)),
    )


def sections_for(latent_frames: int, layout: str, window: int = LATENT_WINDOW_SIZE, **one_frame_options) -> list[Section]:
    """The sections of a latent of ``latent_frames`` frames in ``layout`` (one of :data:`LAYOUTS`).

    For ``one_frame`` the last frame is the target and all earlier frames are control images.
    """
    if layout == "vanilla":
        return vanilla_sections(latent_frames, window)
    if layout == "f1":
        return f1_sections(latent_frames, window)
    if layout == "one_frame":
        if latent_frames < 2:
            raise MusubiError(
                "FramePack one-frame training needs a latent of at least 2 frames: the control image(s) first, "
                f"the target image last; this latent has {latent_frames}."
            )
        return [one_frame_section(latent_frames - 1, window, **one_frame_options)]
    raise MusubiError(f"FramePack training layout {layout!r} is unknown; choose one of: {', '.join(LAYOUTS)}.")


def _gather(latents: torch.Tensor, frames: Sequence[int | None]) -> torch.Tensor:
    zero = torch.zeros_like(latents[:, 0])
    return torch.stack([zero if frame is None else latents[:, frame] for frame in frames], dim=1)


def cut_section(latents: torch.Tensor, section: Section) -> dict[str, torch.Tensor]:
    """The tensors of one section from a latent ``[C, T, H, W]``: the target, the clean and 2x/4x
    context (``[C, n, H, W]``) and their frame indices (int64 ``[n]``), under this module's key names."""
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
        shape = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise MusubiError(f"FramePack training latents must be [C, T, H, W], got {shape}.")
    used = [frame for frame in section.target_frames + section.clean_frames + section.history_2x_frames + section.history_4x_frames
            if frame is not None]
    if used and max(used) >= latents.shape[1]:
        raise MusubiError(f"FramePack section needs latent frame {max(used)}, but the latent has {latents.shape[1]} frames.")

    def indices(values: tuple[int, ...]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64)

    return {
        TARGET_KEY: _gather(latents, section.target_frames),
        LATENT_INDICES_KEY: indices(section.latent_indices),
        CLEAN_LATENTS_KEY: _gather(latents, section.clean_frames),
        CLEAN_INDICES_KEY: indices(section.clean_indices),
        HISTORY_2X_KEY: _gather(latents, section.history_2x_frames),
        HISTORY_2X_INDICES_KEY: indices(section.history_2x_indices),
        HISTORY_4X_KEY: _gather(latents, section.history_4x_frames),
        HISTORY_4X_INDICES_KEY: indices(section.history_4x_indices),
    }


def cut_sections(latents: torch.Tensor, layout: str, window: int = LATENT_WINDOW_SIZE, **one_frame_options) -> list[dict[str, torch.Tensor]]:
    """Every section of a latent ``[C, T, H, W]`` in ``layout``, as tensors (see :func:`cut_section`)."""
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
        shape = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise MusubiError(f"FramePack training latents must be [C, T, H, W], got {shape}.")
    return [cut_section(latents, section) for section in sections_for(latents.shape[1], layout, window, **one_frame_options)]
