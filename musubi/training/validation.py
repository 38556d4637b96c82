"""Validation loss: the training objective on held-back data, evaluated so numbers compare.

A :class:`ValidationSet` fixes everything random once, so every evaluation — at step 100 of this
run, at step 100 of another run, of a post-hoc EMA candidate — scores the same noisy inputs:

* noise levels: ``num_timesteps`` quantiles ``u_k = (k + ½) / K`` of the run's own timestep
  schedule (the sampler's map from a uniform to a noise level, as ``num_timestep_buckets`` uses
  it), sorted; so the mean is a midpoint-rule estimate of the training loss's expectation;
* noise: ε of item ``i`` at quantile ``k`` is ``randn`` from a generator seeded with
  :func:`noise_seed` ``(seed, i, k)`` — its own generator, never the trainer's;
* bands: the sorted noise levels cut into ``num_bands`` contiguous groups (band 1 = least noise).

The loss is the trainer's: ``x_t = (1 − t)·x0 + t·ε``, the adapter's prediction against its
velocity target, per-sample float32 MSE times the ``weighting_scheme`` weight (so the validation
mean sits on the training loss's scale; with the default scheme the weight is 1). It runs with no
autograd and the network in eval mode (no dropout); it draws nothing from any global generator.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import MusubiError
from .timesteps import (
    TimestepSettings,
    apply_loss_weights,
    loss_weights,
    sample_noise_levels,
)

DEFAULT_TIMESTEPS = 8
DEFAULT_BANDS = 4


@dataclass
class ValidationResult:
    """One evaluation: the mean over every (item, noise level) and the mean of each band."""

    step: int
    mean: float
    bands: list[float]
    band_levels: list[tuple[float, float]]  # (lowest, highest) noise level of each band (first item's)
    items: int
    seconds: float = 0.0
    per_row: list[list[float]] = field(default_factory=list)  # [item][k] weighted loss, for checks

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "mean": self.mean, "bands": list(self.bands),
                "band_levels": [list(pair) for pair in self.band_levels], "items": self.items}

    def describe(self) -> str:
        bands = ", ".join(f"{low:.2f}–{high:.2f}: {value:.5f}" for value, (low, high) in zip(self.bands, self.band_levels))
        return f"validation loss {self.mean:.5f} (noise-level bands {bands})"


def quantiles(num_timesteps: int) -> torch.Tensor:
    """The fixed uniforms ``(k + ½) / K``: the midpoints of K equal slices of [0, 1]."""
    return (torch.arange(num_timesteps, dtype=torch.float64) + 0.5).div(num_timesteps).float()


def band_slices(num_timesteps: int, num_bands: int) -> list[slice]:
    """Contiguous groups of the sorted noise levels, as equal as K and B allow (sizes differ by ≤ 1)."""
    return [slice(b * num_timesteps // num_bands, (b + 1) * num_timesteps // num_bands) for b in range(num_bands)]


def noise_seed(seed: int, item: int, k: int) -> int:
    """The seed of item ``item``'s noise at quantile ``k``: independent of batch size and run."""
    digest = hashlib.sha256(repr(("validation", int(seed), int(item), int(k))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def validation_noise(seed: int, item: int, k: int, shape) -> torch.Tensor:
    generator = torch.Generator().manual_seed(noise_seed(seed, item, k))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def noise_levels(timesteps: TimestepSettings, num_timesteps: int, latent_hw: tuple[int, int], seed: int) -> torch.Tensor:
    """The K noise levels of one latent size, sorted ascending (resolution-dependent shifts differ
    by size; a sampler that still draws something, qinglong's branch, draws from a seeded generator)."""
    generator = torch.Generator().manual_seed(noise_seed(seed, -1, -1))
    levels = sample_noise_levels(timesteps, num_timesteps, latent_hw=latent_hw, generator=generator,
                                 u=quantiles(num_timesteps))
    return torch.sort(levels).values


class ValidationSet:
    """Items of a dataset (a LatentCacheDataset-like view the adapter can read) and the fixed plan."""

    def __init__(self, dataset, num_timesteps: int = DEFAULT_TIMESTEPS, num_bands: int = DEFAULT_BANDS, seed: int = 0,
                 where: str = "validation"):
        for name, value, low in (("num_timesteps", num_timesteps, 1), ("num_bands", num_bands, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MusubiError(f"{where}: {name} must be a whole number ≥ {low}, got {value!r}.")
        if num_bands > num_timesteps:
            raise MusubiError(f"{where}: num_bands ({num_bands}) cannot exceed num_timesteps ({num_timesteps}); "
                              "every band needs at least one noise level.")
        if dataset is None or len(dataset) == 0:
            raise MusubiError(f"{where}: the validation data has no items; give at least one item.")
        self.dataset, self.where = dataset, where
        self.num_timesteps, self.num_bands, self.seed = num_timesteps, num_bands, seed
        self._levels: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def check_matches(self, training_dataset, architecture: str | None) -> None:
        """Refuse validation data another model could not score: other architecture or latent channels."""
        own = getattr(self.dataset, "architecture", None)
        if own and architecture and own != architecture:
            raise MusubiError(f"{self.where}: the validation data was made for '{own}' but the model is '{architecture}'; "
                              "encode it with this model's VAE and text encoder.")
        shape_of = getattr(training_dataset, "latent_shape", None)
        if not callable(shape_of) or len(training_dataset) == 0:
            return
        reference = tuple(shape_of(0))
        for index in range(len(self.dataset)):
            shape = tuple(self.dataset.latent_shape(index))
            if len(shape) != len(reference) or shape[0] != reference[0]:
                raise MusubiError(
                    f"{self.where}: validation item {index} has a latent of shape {list(shape)}, but the training latents "
                    f"are {list(reference)} ({reference[0]} channels, {len(reference)} dimensions); encode the validation "
                    "data with the same VAE (and as images or videos like the training data).")

    def levels_for(self, timesteps: TimestepSettings, latent_hw: tuple[int, int]) -> torch.Tensor:
        key = (tuple(sorted(timesteps.to_dict().items())), tuple(latent_hw))
        if key not in self._levels:
            self._levels[key] = noise_levels(timesteps, self.num_timesteps, latent_hw, self.seed)
        return self._levels[key]

    def evaluate(self, adapter, timesteps: TimestepSettings, step: int = 0, batch_size: int = 1,
                 device: torch.device | str = "cpu", autocast: Callable[[], Any] | None = None) -> ValidationResult:
        """Score the adapter (with whatever LoRA is attached, as it is now) on the fixed plan.

        The caller puts the network in eval mode; this runs without autograd and leaves a pair
        adapter's per-expert call counts as they were (they count training batches)."""
        started = time.perf_counter()
        autocast = autocast or contextlib.nullcontext
        calls = getattr(adapter, "calls", None)
        saved_calls = dict(calls) if isinstance(calls, dict) else None
        rows: list[list[float]] = []
        first_levels = None
        try:
            with torch.no_grad():
                for item in range(len(self.dataset)):
                    losses, levels = self._evaluate_item(adapter, timesteps, item, batch_size, device, autocast)
                    rows.append(losses)
                    first_levels = levels if first_levels is None else first_levels
        finally:
            if saved_calls is not None:
                calls.clear()
                calls.update(saved_calls)
        table = torch.tensor(rows, dtype=torch.float64)
        if not bool(torch.isfinite(table).all()):
            raise MusubiError(f"{self.where}: the validation loss became NaN/inf at step {step}.")
        slices = band_slices(self.num_timesteps, self.num_bands)
        bands = [float(table[:, part].mean()) for part in slices]
        band_levels = [(float(first_levels[part].min()), float(first_levels[part].max())) for part in slices]
        return ValidationResult(step, float(table.mean()), bands, band_levels, len(rows),
                                time.perf_counter() - started, rows)

    def _evaluate_item(self, adapter, timesteps, item: int, batch_size: int, device, autocast):
        """(weighted loss at each of the K levels, those levels) of one item."""
        shard = self.dataset.collate([self.dataset[item]])
        latents = shard.pop("latents").float()
        levels = self.levels_for(timesteps, tuple(latents.shape[-2:]))
        weights = loss_weights(timesteps, levels)
        losses: list[float] = []
        for start in range(0, self.num_timesteps, max(1, batch_size)):
            ks = list(range(start, min(self.num_timesteps, start + max(1, batch_size))))
            count = len(ks)
            batch = {key: _repeat_rows(value, count).to(device) for key, value in shard.items()}
            x0 = latents.expand(count, *latents.shape[1:]).to(device)
            noise = torch.stack([validation_noise(self.seed, item, k, latents.shape[1:]) for k in ks]).to(device)
            t = levels[ks].to(device)
            shaped = t.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
            noisy = (1 - shaped) * x0 + shaped * noise
            target = adapter.velocity_target(x0, noise)
            with autocast():
                prediction = adapter.predict_velocity(noisy, t, batch)
            error = F.mse_loss(prediction.float(), target.float(), reduction="none")
            per_sample = error.reshape(count, -1).mean(dim=1)
            weighted = apply_loss_weights(per_sample, weights[ks].to(per_sample.device).float())
            losses.extend(float(value) for value in weighted.cpu())
        return losses, levels


def _repeat_rows(value: torch.Tensor, count: int) -> torch.Tensor:
    """A batch-of-one tensor repeated to ``count`` rows (an item's conditioning for each noise level)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    return value.expand(count, *value.shape[1:]).contiguous() if value.shape[0] == 1 else value


def split_held_out(count: int, fraction: float, seed: int, where: str = "validation") -> tuple[list[int], list[int]]:
    """(training indices, held-out indices): ``round(count × fraction)`` items (at least one) chosen
    by a generator seeded with ``seed``, both lists in ascending order. Refuses a split that would
    leave either side empty."""
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0 < fraction < 1):
        raise MusubiError(f"{where}: held_out_fraction must be between 0 and 1 (e.g. 0.1), got {fraction!r}.")
    held = max(1, round(count * fraction))
    if count < 2 or held >= count:
        raise MusubiError(f"{where}: held_out_fraction {fraction:g} of {count} item(s) leaves "
                          f"{'nothing to hold out' if count < 2 else 'no training items'}; use more data, a smaller "
                          "fraction, or separate validation data.")
    generator = torch.Generator().manual_seed(noise_seed(seed, -2, -2))
    chosen = sorted(torch.randperm(count, generator=generator)[:held].tolist())
    kept = [index for index in range(count) if index not in set(chosen)]
    return kept, chosen
