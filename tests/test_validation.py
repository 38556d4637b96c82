"""Validation loss: the fixed plan against its formulas, the score against a hand computation,
exact reproducibility, and that validating never changes the trained LoRA.

Reference values come from the formulas (quantiles (k + ½)/K, the flow shift, Φ⁻¹ from Python's
statistics module, x_t = (1 − t)·x0 + t·ε, MSE against ε − x0) or from comparing runs.
"""

from __future__ import annotations

import glob
import math
import statistics

import pytest
import torch

from musubi.data.latent_cache import LatentCacheDataset, write_latent_cache_item
from musubi.errors import MusubiError
from musubi.lora.network import LoRANetwork
from musubi.training.adapter import ToyAdapter
from musubi.training.loop import TrainCallbacks, Trainer
from musubi.training.settings import TrainSettings
from musubi.training.timesteps import TimestepSettings
from musubi.training.validation import (
    ValidationSet,
    band_slices,
    noise_levels,
    noise_seed,
    quantiles,
    split_held_out,
    validation_noise,
)

torch.set_num_threads(1)


def write_items(folder, count, shape=(4, 4, 4), seed=0):
    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        write_latent_cache_item(folder, f"item{index:02d}", torch.randn(shape, generator=generator),
                                context=torch.randn(3, 8, generator=generator))
    return LatentCacheDataset(folder)


def make_settings(tmp_path, name, **values):
    values.setdefault("learning_rate", 1e-2)
    values.setdefault("seed", 7)
    values.setdefault("save_state", False)
    values.setdefault("timesteps", TimestepSettings(timestep_sampling="uniform"))
    return TrainSettings(output_dir=str(tmp_path / name), **values)


def make_network(adapter, **options):
    torch.manual_seed(0)
    return LoRANetwork(adapter.lora_root(), "generic", network_dim=4, network_alpha=4.0, **options)


# --- the fixed plan ----------------------------------------------------------------------------


def test_noise_levels_are_the_schedules_quantiles():
    assert torch.equal(quantiles(4), torch.tensor([0.125, 0.375, 0.625, 0.875]))
    uniform = noise_levels(TimestepSettings(timestep_sampling="uniform"), 8, (4, 4), seed=0)
    torch.testing.assert_close(uniform, torch.tensor([(k + 0.5) / 8 for k in range(8)]), rtol=0, atol=1e-7)
    # shift: t = S·s / (1 + (S − 1)·s), s = sigmoid(scale · Φ⁻¹(u))
    shift, scale = 3.0, 1.5
    expected = []
    for k in range(6):
        s = 1 / (1 + math.exp(-scale * statistics.NormalDist().inv_cdf((k + 0.5) / 6)))
        expected.append(shift * s / (1 + (shift - 1) * s))
    levels = noise_levels(TimestepSettings(timestep_sampling="shift", discrete_flow_shift=shift, sigmoid_scale=scale), 6, (4, 4), 0)
    torch.testing.assert_close(levels, torch.tensor(expected), rtol=0, atol=2e-6)
    # min/max_timestep bound them like training: t = a + (b − a)·u
    bounded = noise_levels(TimestepSettings(timestep_sampling="uniform", min_timestep=200, max_timestep=600), 4, (4, 4), 0)
    torch.testing.assert_close(bounded, torch.tensor([0.2 + 0.4 * (k + 0.5) / 4 for k in range(4)]), rtol=0, atol=1e-6)


def test_bands_are_contiguous_and_as_equal_as_possible():
    assert band_slices(8, 4) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    sizes = [part.stop - part.start for part in band_slices(10, 4)]
    assert sizes == [2, 3, 2, 3] and sum(sizes) == 10
    assert band_slices(5, 1) == [slice(0, 5)]


def test_noise_is_fixed_by_seed_item_and_level():
    first = validation_noise(0, 1, 2, (4, 4, 4))
    generator = torch.Generator().manual_seed(noise_seed(0, 1, 2))
    assert torch.equal(first, torch.randn((4, 4, 4), generator=generator))
    assert torch.equal(first, validation_noise(0, 1, 2, (4, 4, 4)))
    assert not torch.equal(first, validation_noise(1, 1, 2, (4, 4, 4)))
    assert not torch.equal(first, validation_noise(0, 1, 3, (4, 4, 4)))
    assert not torch.equal(first, validation_noise(0, 2, 2, (4, 4, 4)))


def test_the_score_is_the_flow_matching_loss_computed_by_hand(tmp_path):
    data = write_items(tmp_path / "val", 3)
    adapter = ToyAdapter()
    timesteps = TimestepSettings(timestep_sampling="uniform", weighting_scheme="cosmap")
    plan = ValidationSet(data, num_timesteps=6, num_bands=3, seed=5)
    result = plan.evaluate(adapter, timesteps, batch_size=4)
    rows = []
    for item in range(3):
        entry = data[item]
        row = []
        for k in range(6):
            t = (k + 0.5) / 6
            noise = torch.randn((4, 4, 4), generator=torch.Generator().manual_seed(noise_seed(5, item, k)))
            x0 = entry["latents"]
            with torch.no_grad():
                prediction = adapter.model(((1 - t) * x0 + t * noise)[None], torch.tensor([1000 * t]), entry["context"][None])[0]
            weight = 2 / (math.pi * (1 - 2 * t + 2 * t * t))
            row.append(((prediction - (noise - x0)) ** 2).mean().item() * weight)
        rows.append(row)
    table = torch.tensor(rows, dtype=torch.float64)
    assert result.mean == pytest.approx(table.mean().item(), rel=1e-5)
    for band, part in enumerate([slice(0, 2), slice(2, 4), slice(4, 6)]):
        assert result.bands[band] == pytest.approx(table[:, part].mean().item(), rel=1e-5)
        assert result.band_levels[band] == pytest.approx(((part.start + 0.5) / 6, (part.stop - 0.5) / 6), abs=1e-6)
    # batch size changes nothing: each (item, level) has its own noise
    again = plan.evaluate(adapter, timesteps, batch_size=1)
    assert again.mean == pytest.approx(result.mean, rel=1e-6)


def test_held_out_split_and_plan_errors(tmp_path):
    kept, held = split_held_out(10, 0.2, seed=3)
    assert len(held) == 2 and len(kept) == 8 and sorted(kept + held) == list(range(10))
    assert split_held_out(10, 0.2, seed=3) == (kept, held)
    with pytest.raises(MusubiError, match="held_out_fraction 0.5 of 1 item"):
        split_held_out(1, 0.5, seed=0)
    with pytest.raises(MusubiError, match="held_out_fraction must be between 0 and 1"):
        split_held_out(10, 0.0, seed=0)
    data = write_items(tmp_path / "val", 1)
    with pytest.raises(MusubiError, match="num_bands"):
        ValidationSet(data, num_timesteps=2, num_bands=4)
    other = write_items(tmp_path / "other", 1, shape=(8, 4, 4))
    with pytest.raises(MusubiError, match="8 channels|4 channels"):
        ValidationSet(other).check_matches(data, "generic")


# --- inside the trainer ------------------------------------------------------------------------


class Scores(TrainCallbacks):
    def __init__(self):
        self.seen = []

    def on_validation(self, step, result):
        self.seen.append((step, result.mean, list(result.bands)))


def train(tmp_path, name, validation=None, **values):
    data = write_items(tmp_path / "data", 4)
    adapter = ToyAdapter()
    network = make_network(adapter, dropout=0.2)  # dropout draws from the global generator while training
    callbacks = Scores()
    trainer = Trainer(adapter, network, data, make_settings(tmp_path, name, max_train_steps=6, batch_size=2, **values),
                      callbacks=callbacks, validation_data=validation)
    result = trainer.train()
    return result, {key: value.detach().clone() for key, value in network.state_dict().items()}, callbacks


def test_validation_is_reproducible_and_never_changes_the_lora(tmp_path):
    validation = write_items(tmp_path / "val", 2, seed=9)
    plain, plain_weights, _ = train(tmp_path, "plain")
    first, first_weights, scores = train(tmp_path, "first", validation, validate_every_n_steps=2)
    second, second_weights, _ = train(tmp_path, "second", validation, validate_every_n_steps=2)
    assert [entry["step"] for entry in first.validation] == [0, 2, 4, 6]
    assert first.validation == second.validation  # exactly the same numbers
    assert [(step, mean) for step, mean, _ in scores.seen] == [(e["step"], e["mean"]) for e in first.validation]
    assert all(len(entry["bands"]) == 4 for entry in first.validation)
    assert first.losses == plain.losses
    for key, value in plain_weights.items():
        assert torch.equal(value, first_weights[key]), key
        assert torch.equal(value, second_weights[key]), key
    assert first.validation_seconds > 0 and len(first.step_seconds) == 6


def test_validation_without_data_and_tensorboard_scalars(tmp_path):
    with pytest.raises(MusubiError, match="validate_every_n_steps is set but there is no validation data"):
        train(tmp_path, "none", validate_every_n_steps=2)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    validation = write_items(tmp_path / "val", 1, seed=9)
    result, _, _ = train(tmp_path, "tb", validation, validate_every_n_steps=3, logging_dir=str(tmp_path / "logs"),
                         log_prefix="run-", log_tracker_name="toy")
    files = glob.glob(str(tmp_path / "logs" / "run-*" / "toy" / "events.out.tfevents.*"))
    events = EventAccumulator(files[0], size_guidance={"scalars": 0})
    events.Reload()
    assert {"validation/mean", "validation/band_1", "validation/band_4"} <= set(events.Tags()["scalars"])
    logged = [(event.step, event.value) for event in events.Scalars("validation/mean")]
    assert [step for step, _ in logged] == [0, 3, 6]
    assert [value for _, value in logged] == pytest.approx([entry["mean"] for entry in result.validation], rel=1e-6)


def test_validation_loss_falls_while_the_lora_learns(tmp_path):
    pattern = torch.tensor([3.0, -3.0, 2.0, -2.0]).reshape(4, 1, 1).expand(4, 4, 4).clone()
    generator = torch.Generator().manual_seed(0)
    for index in range(2):
        write_latent_cache_item(tmp_path / "data", f"item{index}", pattern, context=torch.randn(3, 8, generator=generator))
    write_latent_cache_item(tmp_path / "val", "held", pattern, context=torch.randn(3, 8, generator=generator))
    adapter = ToyAdapter()
    result = Trainer(adapter, make_network(adapter), LatentCacheDataset(tmp_path / "data"), make_settings(
        tmp_path, "learn", max_train_steps=120, batch_size=2, validate_every_n_steps=40,
    ), validation_data=LatentCacheDataset(tmp_path / "val")).train()
    means = [entry["mean"] for entry in result.validation]
    assert [entry["step"] for entry in result.validation] == [0, 40, 80, 120]
    assert means[-1] < means[0] / 3, means
