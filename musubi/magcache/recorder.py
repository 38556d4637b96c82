"""Measuring a model's MagCache curve from the residuals of a run that skips nothing.

A calibration run records every step's residual; :class:`CalibrationRecorder` turns consecutive
residuals into per-step statistics (magnitude ratio, its spread, cosine distance) and writes them
in the file format :func:`musubi.magcache.calibration.load_calibration_json` reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..errors import MusubiError
from ..files import write_text_atomically
from .calibration import CALIBRATION_FORMAT, CALIBRATION_VERSION

# Tokens are processed in slices of this many rows, so a calibration never holds a float32 copy of
# a whole video-sized residual.
_TOKEN_CHUNK = 16384


@dataclass
class _StepStatistics:
    norm_ratio: float
    norm_std: float
    cos_dis: float


class CalibrationRecorder:
    """Measures a model's magnitude-ratio curve from the residuals of a run that skips nothing.

    Feed :meth:`record` the residual of every step (any shape with the hidden dimension last). Per
    step it keeps, over tokens, ``norm_ratio = mean(‖r_t‖/‖r_{t−1}‖)``, ``norm_std`` (the spread
    of that per-token ratio) and ``cos_dis = mean(1 − cos(r_t, r_{t−1}))``, each rounded to 5
    decimals. Statistics are computed in float32 whatever the residual's dtype. Tokens whose
    previous residual is exactly zero (padding) have no ratio and are left out of the ratio.

    When a step runs as several model calls (cond and uncond unbatched), record each call with the
    same ``step_index``, in the same order every step: the calls' tokens pool into one step, as a
    batched call would. The recorder keeps references to the last two steps' residuals; pass
    tensors nothing else writes to.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._finished: list[_StepStatistics] = []
        self._first_step = -1
        self._step = -1
        self._previous_parts: list[torch.Tensor] = []
        self._current_parts: list[torch.Tensor] = []
        self._current_ratios: list[torch.Tensor] = []
        self._current_cosines: list[torch.Tensor] = []

    @property
    def steps_recorded(self) -> int:
        return 0 if self._step < 0 else self._step - self._first_step + 1

    def record(self, residual: torch.Tensor, step_index: int | None = None) -> None:
        """Add the residual of step ``step_index`` (default: the step after the last one).

        A step index below the last one starts a new recording (a new run).
        """
        if not isinstance(residual, torch.Tensor) or residual.dim() < 1 or residual.shape[-1] == 0:
            raise MusubiError("MagCache calibration: the residual must be a tensor with the hidden dimension last.")
        step = self._step + 1 if step_index is None else step_index
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise MusubiError(f"MagCache calibration: step index {step_index!r} must be a whole number ≥ 0.")
        if step < self._step:
            self.reset()
        if self._step < 0:
            self._first_step = step
            self._start_step(step)
        elif step == self._step + 1:
            self._start_step(step)
        elif step != self._step:
            raise MusubiError(
                f"MagCache calibration: step {step} follows step {self._step}; every step must be computed and "
                "recorded (a calibration run skips nothing)."
            )
        self._add_part(residual.detach())

    def _start_step(self, step: int) -> None:
        if self._step >= 0:
            if self._previous_parts and len(self._current_parts) != len(self._previous_parts):
                raise MusubiError(
                    f"MagCache calibration: step {self._step} had {len(self._current_parts)} model calls but step "
                    f"{self._step - 1} had {len(self._previous_parts)}; record the same calls every step."
                )
            if self._current_ratios:
                self._finished.append(self._current_statistics())
        self._previous_parts = self._current_parts
        self._current_parts, self._current_ratios, self._current_cosines = [], [], []
        self._step = step

    def _add_part(self, residual: torch.Tensor) -> None:
        """Compare with the same call of the step before (when there is one), then keep it."""
        index = len(self._current_parts)
        if self._previous_parts:
            if index >= len(self._previous_parts):
                raise MusubiError(
                    f"MagCache calibration: step {self._step} has more model calls than step {self._step - 1} "
                    f"({len(self._previous_parts)}); record the same calls every step."
                )
            previous = self._previous_parts[index]
            if previous.shape != residual.shape:
                raise MusubiError(
                    f"MagCache calibration: the residual of step {self._step} has shape {tuple(residual.shape)} but "
                    f"the one before it {tuple(previous.shape)}; start a new recorder when the latent size changes "
                    "(for instance per FramePack section)."
                )
            ratios, cosines = _token_statistics(residual, previous)
            self._current_ratios.append(ratios)
            self._current_cosines.append(cosines)
        self._current_parts.append(residual)

    def _current_statistics(self) -> _StepStatistics:
        ratios = torch.cat(self._current_ratios)
        cosines = torch.cat(self._current_cosines)
        valid = ratios[torch.isfinite(ratios)]
        if valid.numel() == 0:
            raise MusubiError(
                f"MagCache calibration: the residual of step {self._step - 1} is zero everywhere, so step "
                f"{self._step} has no magnitude ratio; the model's blocks change nothing."
            )
        spread = valid.std().item() if valid.numel() > 1 else 0.0
        return _StepStatistics(
            norm_ratio=round(valid.mean().item(), 5),
            norm_std=round(spread, 5),
            cos_dis=round((1.0 - cosines).mean().item(), 5),
        )

    def _statistics(self) -> list[_StepStatistics]:
        finished = list(self._finished)
        if self._current_ratios:
            finished.append(self._current_statistics())
        return finished

    # -- results --------------------------------------------------------------------------------

    def ratios(self) -> list[float]:
        """One ratio per recorded step, starting with the 1.0 pad of the first step."""
        if self._step < 0:
            return []
        return [1.0] + [entry.norm_ratio for entry in self._statistics()]

    def norm_stds(self) -> list[float]:
        return [entry.norm_std for entry in self._statistics()]

    def cos_distances(self) -> list[float]:
        return [entry.cos_dis for entry in self._statistics()]

    def statistics(self) -> list[dict[str, float]]:
        """Per step from the second on: step, norm_ratio, norm_std, cos_dis."""
        return [
            {"step": step, "norm_ratio": entry.norm_ratio, "norm_std": entry.norm_std, "cos_dis": entry.cos_dis}
            for step, entry in enumerate(self._statistics(), start=self._first_step + 1)
        ]

    def as_paste_string(self) -> str:
        """``1.00000,0.99817,…``: the ratios with 5 decimals, ready to paste as MagCache ratios."""
        return ",".join(f"{value:.5f}" for value in self.ratios())

    def to_dict(self, architecture: str, steps: int | None = None, sampler: str = "", scheduler: str = "",
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The calibration as a JSON-ready dict (see :func:`.calibration.load_calibration_json`)."""
        ratios = self.ratios()
        if len(ratios) < 2:
            raise MusubiError("MagCache calibration: record at least two steps before saving.")
        if steps is not None and steps != len(ratios):
            raise MusubiError(
                f"MagCache calibration: {len(ratios)} steps were recorded but the run has {steps}; "
                "finish the run (every step computed) before saving."
            )
        if not isinstance(architecture, str) or not architecture:
            raise MusubiError("MagCache calibration: name the model's architecture (for instance 'wan').")
        return {
            "format": CALIBRATION_FORMAT,
            "version": CALIBRATION_VERSION,
            "architecture": architecture,
            "steps": len(ratios),
            "sampler": sampler,
            "scheduler": scheduler,
            "layout": "per_step",
            "ratios": ratios,
            "norm_std": [0.0] + self.norm_stds(),
            "cos_dis": [0.0] + self.cos_distances(),
            "extra": dict(extra or {}),
        }

    def to_json(self, architecture: str, steps: int | None = None, sampler: str = "", scheduler: str = "",
                extra: Mapping[str, Any] | None = None) -> str:
        """The calibration as JSON text; ``norm_std`` and ``cos_dis`` carry a 0.0 pad like ``ratios``."""
        payload = self.to_dict(architecture, steps, sampler, scheduler, extra)
        try:
            return json.dumps(payload, indent=1)
        except TypeError as error:
            raise MusubiError(f"MagCache calibration: extra must hold JSON values only ({error}).") from error

    def save_json(self, path: str, architecture: str, steps: int | None = None, sampler: str = "",
                  scheduler: str = "", extra: Mapping[str, Any] | None = None) -> None:
        """Write :meth:`to_json` to ``path`` atomically (no half-written file on a crash)."""
        text = self.to_json(architecture, steps, sampler, scheduler, extra)
        write_text_atomically(path, text + "\n")


def _token_statistics(current: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ‖current‖/‖previous‖ (inf/nan where previous is zero) and cosine, as float32 on CPU."""
    width = current.shape[-1]
    current = current.reshape(-1, width)
    previous = previous.reshape(-1, width)
    ratios, cosines = [], []
    for start in range(0, current.shape[0], _TOKEN_CHUNK):
        now = current[start:start + _TOKEN_CHUNK].float()
        before = previous[start:start + _TOKEN_CHUNK].float()
        if not (torch.isfinite(now).all() and torch.isfinite(before).all()):
            raise MusubiError("MagCache calibration: a residual holds NaN or infinite values; the model run is broken.")
        norm_now = torch.linalg.vector_norm(now, dim=-1)
        norm_before = torch.linalg.vector_norm(before, dim=-1)
        ratio = torch.where(norm_before > 0, norm_now / norm_before, torch.full_like(norm_now, math.inf))
        ratios.append(ratio.cpu())
        cosines.append(F.cosine_similarity(now, before, dim=-1, eps=1e-8).cpu())
    return torch.cat(ratios), torch.cat(cosines)
