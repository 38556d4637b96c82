"""Sample a FramePack video section by section, with optional MagCache.

The loop of musubi-tuner's ``fpack_generate_video.py`` (after lllyasviel's demos), written for a
model given as a function: for every section in sampling order (see :mod:`.sampling_sections`)
draw fresh noise from one seeded CPU generator, pick the section's noise levels
(:mod:`.schedule`), integrate with UniPC-bh1 (:mod:`.unipc`) and put the result into the history
the next section sees. With real CFG (``cfg`` ≠ 1) each step makes a cond and an uncond call and
combines the clean-sample predictions ``x0_u + cfg·(x0_c − x0_u)`` (the same as combining the
velocities); with ``cfg`` = 1 the negative prompt is never evaluated, as in FramePack.

MagCache (:mod:`.block_cache`) starts afresh in every section: new decisions, no cached residual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import MusubiError
from ..magcache.recorder import CalibrationRecorder
from ..magcache.state import MagCacheState
from .block_cache import BlockCache
from .sampling_sections import SamplingSection, SectionHistory, plan_sections
from .schedule import section_sigmas
from .unipc import sample_unipc


@dataclass(frozen=True)
class SectionInputs:
    """What one model call gets besides the noisy latent and the noise level."""

    section: SamplingSection
    clean_latents: torch.Tensor
    history_2x: torch.Tensor
    history_4x: torch.Tensor
    branch: str  # "cond" | "uncond"


# predict(x, sigma, inputs) -> the model's clean-sample prediction x0 for x at sigma
ModelFunction = Callable[[torch.Tensor, float, SectionInputs], torch.Tensor]


@dataclass
class FramePackRun:
    """Settings of one video."""

    sections: int
    window: int = 9
    steps: int = 25
    direction: str = "vanilla"
    cfg: float = 1.0
    shift: float | None = None  # None or 0: automatic (capped at 7)
    seed: int = 0


@dataclass
class MagCachePlan:
    """How MagCache takes part: a controller per section, or a calibration recorder per section."""

    make_state: Callable[[int], MagCacheState] | None = None
    calibrate: bool = False


@dataclass
class RunResult:
    video: torch.Tensor  # [B, C, 1 + sections·window, H, W] in the model's latent scale
    shifts: list[float] = field(default_factory=list)
    section_reports: list[str] = field(default_factory=list)
    recorders: list[CalibrationRecorder] = field(default_factory=list)
    computed_calls: int = 0
    skipped_calls: int = 0


def sample_video(model: ModelFunction, start: torch.Tensor, run: FramePackRun, transformer: torch.nn.Module | None = None,
                 magcache: MagCachePlan | None = None,
                 on_step: Callable[[SamplingSection, int], Any] | None = None,
                 end: torch.Tensor | None = None) -> RunResult:
    """Generate the video; ``start`` is the start frame's latent ``[1, C, 1, H, W]`` in the model's scale.

    ``transformer`` (the diffusers module the model function runs) is needed for MagCache only;
    ``end`` is an optional end frame's latent (vanilla direction only).
    """
    if run.cfg <= 0:
        raise MusubiError(f"FramePack cfg must be > 0, got {run.cfg!r} (1 turns real guidance off).")
    plan = plan_sections(run.sections, run.window, run.direction)
    history = SectionHistory(start.float(), run.direction, None if end is None else end.float())
    generator = torch.Generator(device="cpu").manual_seed(int(run.seed))
    batch, channels, _, height, width = start.shape
    cache = None
    if magcache is not None and (magcache.calibrate or magcache.make_state is not None):
        if transformer is None:
            raise MusubiError("FramePack MagCache needs the transformer module to patch its blocks.")
        cache = BlockCache(transformer)
    result = RunResult(video=start)
    branches = ("cond",) if run.cfg == 1 else ("cond", "uncond")

    def run_sections() -> None:
        for section in plan:
            clean, two, four = history.context()
            noise = torch.randn((batch, channels, run.window, height, width), generator=generator, dtype=torch.float32)
            noise = noise.to(start.device)
            sigmas, shift = section_sigmas(run.steps, run.shift, run.window, height, width)
            result.shifts.append(shift)
            recorder = None
            if cache is not None:
                recorder = CalibrationRecorder() if magcache.calibrate else None
                state = None if magcache.calibrate else magcache.make_state(run.steps)
                cache.start_section(state, recorder)

            def predict(x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
                if cache is not None:
                    cache.begin_step(step)
                predictions = {}
                for branch in branches:
                    inputs = SectionInputs(section, clean, two, four, branch)
                    if cache is not None:
                        cache.begin_call(branch)
                    try:
                        predictions[branch] = model(x, sigma, inputs).float()
                    finally:
                        if cache is not None:
                            cache.end_call()
                if on_step is not None:
                    on_step(section, step)
                if run.cfg == 1:
                    return predictions["cond"]
                return predictions["uncond"] + run.cfg * (predictions["cond"] - predictions["uncond"])

            generated = sample_unipc(predict, noise, sigmas)
            history.add(section, generated)
            if cache is not None:
                if recorder is not None:
                    result.recorders.append(recorder)
                    result.section_reports.append(f"section {section.order + 1}: calibrated {recorder.steps_recorded} steps")
                elif cache.state is not None:
                    result.section_reports.append(f"section {section.order + 1}: {cache.state.summary()}")

    if cache is None:
        run_sections()
    else:
        with cache:
            run_sections()
        result.computed_calls, result.skipped_calls = cache.computed_calls, cache.skipped_calls
    result.video = history.video()
    return result
