"""The noise levels FramePack samples each section at: a flux-style time shift of a linear ramp.

lllyasviel's FramePack (and musubi-tuner after it) uses ``n + 1`` levels
``σ_i = s / (s + (1/t_i − 1))`` for ``t_i = 1 − i/n`` (so ``σ_0 = 1`` and ``σ_n = 0``), with the
shift ``s`` either given or derived from the section's token count ``L = T·H·W/4`` (latent frames
times latent height and width over the 2×2 patch) as in FLUX: ``μ = 0.5 + (L − 256)·(1.15 − 0.5)/(4096 − 256)``,
``s = exp(μ)``, capped at 7 (every real FramePack resolution reaches the cap: 640×640 gives L = 14400).
"""

from __future__ import annotations

import math

from ..errors import MusubiError

MAX_AUTO_SHIFT = 7.0
_BASE_TOKENS, _BASE_MU = 256, 0.5
_MAX_TOKENS, _MAX_MU = 4096, 1.15


def auto_shift(token_count: int, max_shift: float = MAX_AUTO_SHIFT) -> float:
    """FLUX's resolution-dependent shift for ``token_count`` image tokens, at most ``max_shift``."""
    slope = (_MAX_MU - _BASE_MU) / (_MAX_TOKENS - _BASE_TOKENS)
    mu = _BASE_MU + slope * (token_count - _BASE_TOKENS)
    return math.exp(min(mu, math.log(max_shift)))


def section_token_count(frames: int, height: int, width: int) -> int:
    """Image tokens of one section of ``frames`` latent frames of ``height``×``width`` (2×2 patches)."""
    return frames * height * width // 4


def shifted_sigmas(steps: int, shift: float) -> list[float]:
    """``steps + 1`` noise levels from 1 down to 0, time-shifted by ``shift`` (1 keeps the ramp linear)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise MusubiError(f"FramePack steps must be a whole number ≥ 1, got {steps!r}.")
    if not math.isfinite(shift) or shift <= 0:
        raise MusubiError(f"FramePack shift must be a positive number (0 in the node means automatic), got {shift!r}.")
    sigmas = []
    for i in range(steps + 1):
        t = 1.0 - i / steps
        sigmas.append(0.0 if t <= 0 else shift / (shift + (1.0 / t - 1.0)))
    return sigmas


def section_sigmas(steps: int, shift: float | None, frames: int, height: int, width: int) -> tuple[list[float], float]:
    """The levels of one section and the shift used (``shift`` None or 0: automatic from its size)."""
    used = auto_shift(section_token_count(frames, height, width)) if not shift else float(shift)
    return shifted_sigmas(steps, used), used
