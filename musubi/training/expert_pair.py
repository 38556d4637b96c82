"""Two experts of one model split by noise level (Wan 2.2 A14B), trained as one LoRA.

Wan 2.2 A14B denoises with a high-noise expert while ``t ≥ boundary`` and a low-noise expert
below. As musubi-tuner does with ``--dit_high_noise``, one LoRA is trained on both: its modules
are shared by the two experts, and every batch trains one expert — the one the batch's first
noise level falls to. The other samples of the batch are re-drawn (at most 100 tries each)
until they fall to the same side, so only one expert runs per batch (the other can stay
offloaded) while each sample's noise level keeps the sampler's distribution.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import MusubiError

REDRAW_TRIES = 100

# musubi-tuner's boundaries of the published A14B experts (noise level t = timestep / 1000).
DEFAULT_BOUNDARIES = {"t2v": 0.875, "i2v": 0.9}


def check_boundary(boundary: float, option: str = "timestep_boundary") -> float:
    """A boundary in (0, 1); values above 1 are timesteps and are divided by 1000 (musubi's rule)."""
    if isinstance(boundary, bool) or not isinstance(boundary, (int, float)) or not math.isfinite(boundary):
        raise MusubiError(f"{option} must be a number, got {boundary!r}.")
    value = float(boundary)
    if value > 1:
        value /= 1000.0
    if not 0 < value < 1:
        raise MusubiError(
            f"{option} = {boundary}: the expert boundary must lie strictly between 0 and 1 (or 1 and 1000 as a "
            f"timestep); Wan 2.2 A14B uses {DEFAULT_BOUNDARIES['t2v']} (t2v) and {DEFAULT_BOUNDARIES['i2v']} (i2v)."
        )
    return value


def same_expert_noise_levels(noise_levels: torch.Tensor, boundary: float,
                             draw_one: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``noise_levels`` with samples 1… re-drawn by ``draw_one()`` until they fall on the side of
    sample 0 (``t ≥ boundary`` is the high-noise side); a sample still on the other side after
    :data:`REDRAW_TRIES` draws is kept (the batch is then split between the experts)."""
    levels = noise_levels.clone()
    high = bool(levels[0] >= boundary)
    for index in range(1, levels.numel()):
        tries = 0
        while bool(levels[index] >= boundary) != high and tries < REDRAW_TRIES:
            levels[index] = draw_one().reshape(())
            tries += 1
    return levels


class ExpertPairAdapter:
    """A model adapter over two experts' adapters: the low-noise one below ``boundary``, the
    high-noise one from it up. The LoRA network is built on the low-noise expert and attached
    to the high-noise one too (:meth:`twin_lora_roots`)."""

    def __init__(self, low_noise, high_noise, boundary: float):
        if low_noise.architecture != high_noise.architecture:
            raise MusubiError(
                f"the two experts must be the same architecture, got {low_noise.architecture} (low noise) and "
                f"{high_noise.architecture} (high noise)."
            )
        if low_noise.lora_root() is high_noise.lora_root():
            raise MusubiError("the high-noise and low-noise experts are the same model; connect the two expert files.")
        self.low_noise, self.high_noise = low_noise, high_noise
        self.architecture = low_noise.architecture
        self.expert_boundary = check_boundary(boundary)
        self.calls = {"low_noise": 0, "high_noise": 0}

    def lora_root(self) -> nn.Module:
        return self.low_noise.lora_root()

    def twin_lora_roots(self) -> list[nn.Module]:
        return [self.high_noise.lora_root()]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.low_noise.set_gradient_checkpointing(enabled)
        self.high_noise.set_gradient_checkpointing(enabled)

    def to_device(self, device: torch.device | str) -> None:
        for expert in (self.low_noise, self.high_noise):
            mover = getattr(expert, "to_device", None)
            if callable(mover):
                mover(device)

    def velocity_target(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.low_noise.velocity_target(latents, noise)

    def predict_velocity(self, noisy_latents: torch.Tensor, noise_level: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        high = noise_level >= self.expert_boundary
        if bool(high.all()) or not bool(high.any()):
            return self._expert_predict("high_noise" if bool(high[0]) else "low_noise", noisy_latents, noise_level, batch)
        # Rare: re-drawing could not bring every sample to one side; each expert takes its part.
        out = None
        for name, rows in (("high_noise", high.nonzero().flatten()), ("low_noise", (~high).nonzero().flatten())):
            part = _take_rows(batch, rows, noisy_latents.shape[0])
            prediction = self._expert_predict(name, noisy_latents[rows], noise_level[rows], part)
            if out is None:
                out = prediction.new_empty((noisy_latents.shape[0],) + tuple(prediction.shape[1:]))
            out[rows] = prediction
        return out

    def _expert_predict(self, name: str, noisy_latents, noise_level, batch):
        expert = getattr(self, name)
        activate = getattr(expert, "activate", None)
        if callable(activate):
            activate()
        self.calls[name] += 1
        return expert.predict_velocity(noisy_latents, noise_level, batch)


def _take_rows(batch: Mapping[str, Any], rows: torch.Tensor, size: int) -> dict[str, Any]:
    part = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            value = value[rows.to(value.device)]
        part[key] = value
    return part
