"""Which frames of a video become training items (musubi-tuner's ``frame_extraction`` modes).

Pure functions over frame counts. A *window* is the list of source-frame indices of one item; its
name suffix is ``_<first index:05d>-<frame count:03d>``. Video VAEs here compress time by 4 and
take ``4k + 1`` frames, so target lengths are rounded down to ``4k + 1``.

Modes (``N`` each target length that fits the video of ``L`` frames):

* ``head``: the first ``N`` frames.
* ``chunk``: consecutive, non-overlapping windows of ``N`` (a short rest is dropped).
* ``slide``: windows of ``N`` starting every ``frame_stride`` frames.
* ``uniform``: ``frame_sample`` windows of ``N`` whose starts are ``linspace(0, L − N, frame_sample)``
  truncated to whole numbers (``frame_sample = 1`` is ``head``).
* ``full``: one window of ``min(L, max_frames)`` frames, rounded down to ``4k + 1``.
"""

from __future__ import annotations

from ..errors import MusubiError

MODES = ("head", "chunk", "slide", "uniform", "full")
# Frames per second each architecture's models are trained at (used with ``source_fps``).
TARGET_FPS = {"wan": 16.0, "hunyuan_video": 24.0, "framepack": 30.0}


def round_to_4k_plus_1(frames: int) -> int:
    return (frames - 1) // 4 * 4 + 1


def normalize_target_frames(target_frames) -> list[int]:
    """Deduplicated, sorted, each rounded down to ``4k + 1``."""
    if isinstance(target_frames, int) and not isinstance(target_frames, bool):
        target_frames = [target_frames]
    if not isinstance(target_frames, (list, tuple)) or not target_frames:
        raise MusubiError(f"target_frames must be a list of frame counts such as [1, 25, 45], got {target_frames!r}.")
    for value in target_frames:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MusubiError(f"target_frames holds {value!r}; every entry must be a whole number of frames ≥ 1.")
    return sorted({round_to_4k_plus_1(value) for value in target_frames})


def extract_windows(frame_count: int, mode: str = "head", target_frames=(1,), frame_stride: int = 1,
                    frame_sample: int = 1, max_frames: int = 129) -> list[list[int]]:
    """The frame-index lists of the items one video of ``frame_count`` frames gives."""
    if mode not in MODES:
        raise MusubiError(f"frame_extraction {mode!r} is unknown; choose one of {', '.join(MODES)}.")
    if frame_stride < 1 or frame_sample < 1 or max_frames < 1:
        raise MusubiError("frame_stride, frame_sample and max_frames must each be at least 1.")
    if mode == "full":
        length = round_to_4k_plus_1(min(frame_count, max_frames))
        return [list(range(length))] if frame_count >= 1 else []
    if mode == "uniform" and frame_sample == 1:
        mode = "head"
    windows: list[list[int]] = []
    for length in normalize_target_frames(list(target_frames)):
        if length > frame_count:
            continue
        if mode == "head":
            starts = [0]
        elif mode == "chunk":
            starts = list(range(0, frame_count - length + 1, length))
        elif mode == "slide":
            starts = list(range(0, frame_count - length + 1, frame_stride))
        else:  # uniform
            last = frame_count - length
            starts = [int(last * i / (frame_sample - 1)) for i in range(frame_sample)]
        windows.extend(list(range(start, start + length)) for start in starts)
    return windows


def window_suffix(window: list[int]) -> str:
    return f"{window[0]:05d}-{len(window):03d}"


def resample_frame_indices(frame_count: int, source_fps: float, target_fps: float) -> list[int]:
    """Source frames kept when a ``source_fps`` video is played at ``target_fps``.

    A running sum grows by ``target_fps / source_fps`` per source frame; a frame is kept when the
    whole part of the sum (before adding) differs from that of the previously kept frame.
    """
    if source_fps <= 0 or target_fps <= 0:
        raise MusubiError(f"source_fps and the target fps must be positive, got {source_fps} and {target_fps}.")
    step = target_fps / source_fps
    kept: list[int] = []
    total, last = 0.0, None
    for index in range(frame_count):
        whole = int(total)
        if whole != last:
            kept.append(index)
            last = whole
        total += step
    return kept
