"""Two experts split by noise level, one shared LoRA (Wan 2.2 A14B training, musubi's --dit_high_noise)."""

from __future__ import annotations

import pytest
import torch

from musubi.errors import MusubiError
from musubi.training.expert_pair import ExpertPairAdapter, check_boundary, same_expert_noise_levels
from musubi.data.latent_cache import write_latent_cache_item, LatentCacheDataset
from musubi.lora.network import LoRANetwork
from musubi.training.adapter import ToyAdapter
from musubi.training.timesteps import TimestepSettings, sample_noise_levels
from musubi.training.loop import Trainer
from musubi.training.settings import TrainSettings


def test_boundary_accepts_noise_levels_and_timesteps_and_refuses_the_rest():
    assert check_boundary(0.875) == 0.875
    assert check_boundary(900) == pytest.approx(0.9)  # musubi: values above 1 are timesteps
    for bad in (0, 1, -0.5, 1000, float("nan"), "0.9", True):
        with pytest.raises(MusubiError, match="timestep_boundary"):
            check_boundary(bad)


def test_redrawn_samples_share_the_first_samples_side_and_keep_the_sampler_distribution():
    settings = TimestepSettings(timestep_sampling="uniform")
    generator = torch.Generator().manual_seed(0)
    boundary = 0.875
    seconds_high, firsts_high = 0, 0
    trials = 4000
    for _ in range(trials):
        levels = sample_noise_levels(settings, 3, generator=generator)
        levels = same_expert_noise_levels(levels, boundary, lambda: sample_noise_levels(settings, 1, generator=generator))
        sides = levels >= boundary
        assert bool(sides.all()) or not bool(sides.any())
        firsts_high += int(sides[0])
        seconds_high += int(sides[1])
    # Each sample alone is still uniform: P(t ≥ b) = 1 − b for the first and the re-drawn ones.
    assert firsts_high / trials == pytest.approx(1 - boundary, abs=0.02)
    assert seconds_high / trials == pytest.approx(1 - boundary, abs=0.02)


def test_redrawing_gives_up_after_a_hundred_tries():
    levels = torch.tensor([0.95, 0.1])
    draws = []

    def always_low():
        draws.append(1)
        return torch.tensor([0.2])

    kept = same_expert_noise_levels(levels, 0.875, always_low)
    assert len(draws) == 100 and kept[1] == pytest.approx(0.2)


def _pair(boundary=0.5):
    return ExpertPairAdapter(ToyAdapter(seed=1), ToyAdapter(seed=2), boundary)


def test_each_noise_level_goes_to_its_expert_even_in_a_mixed_batch():
    pair = _pair(0.5)
    x = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.2, 0.5])
    batch = {"context": torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))}
    out = pair.predict_velocity(x, t, batch)
    for row, expert in ((0, pair.high_noise), (1, pair.low_noise), (2, pair.high_noise)):
        alone = expert.predict_velocity(x[row:row + 1], t[row:row + 1], {"context": batch["context"][row:row + 1]})
        torch.testing.assert_close(out[row:row + 1], alone)
    assert pair.calls == {"high_noise": 1, "low_noise": 1}


def test_the_same_model_twice_is_refused():
    toy = ToyAdapter(seed=1)
    with pytest.raises(MusubiError, match="same model"):
        ExpertPairAdapter(toy, toy, 0.875)


def test_a_twin_of_another_layout_is_refused():
    network = LoRANetwork(ToyAdapter(seed=1).lora_root(), "generic", network_dim=2)
    with pytest.raises(MusubiError, match="same architecture and size"):
        network.attach_twin(ToyAdapter(width=16, seed=2).lora_root())


def test_one_lora_trains_on_both_experts(tmp_path):
    pair = _pair(0.5)
    data = tmp_path / "data"
    for index in range(2):
        g = torch.Generator().manual_seed(index)
        write_latent_cache_item(data, f"item{index}", torch.randn(4, 2, 2, generator=g), context=torch.randn(3, 8, generator=g))
    network = LoRANetwork(pair.lora_root(), "generic", network_dim=4, network_alpha=4)
    settings = TrainSettings(output_dir=str(tmp_path / "out"), max_train_steps=12, learning_rate=1e-2, seed=0, batch_size=2,
                             timesteps=TimestepSettings(timestep_sampling="uniform"), save_state=False)
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(5))
    context = {"context": torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(6))}
    with torch.no_grad():
        before = {name: getattr(pair, name).predict_velocity(x, torch.tensor([0.5]), context) for name in ("low_noise", "high_noise")}
    Trainer(pair, network, LatentCacheDataset(data), settings).train()
    assert pair.calls["low_noise"] > 0 and pair.calls["high_noise"] > 0, pair.calls
    with torch.no_grad():
        after = {name: getattr(pair, name).predict_velocity(x, torch.tensor([0.5]), context) for name in ("low_noise", "high_noise")}
    for name in before:  # the shared LoRA acts on both experts
        assert (after[name] - before[name]).abs().max() > 1e-5, name
    network.remove()
    with torch.no_grad():
        for name in before:
            torch.testing.assert_close(getattr(pair, name).predict_velocity(x, torch.tensor([0.5]), context), before[name])
