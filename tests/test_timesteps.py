"""Timestep sampling: musubi-tuner's distributions, checked against formulas written out here."""

from __future__ import annotations

import argparse
import math
import warnings
from statistics import NormalDist

import numpy as np
import pytest
import torch

from musubi.errors import MusubiError
from musubi.training.timesteps import (
    METHODS,
    TimestepSettings,
    add_timestep_arguments,
    apply_loss_weights,
    loss_weights,
    resolution_shift,
    sample_noise_levels,
    settings_from_args,
    stratified_uniforms,
)

torch.set_num_threads(1)


def draw(count=100_000, seed=0, latent_hw=(128, 128), u=None, **options) -> torch.Tensor:
    settings = TimestepSettings(**options)
    return sample_noise_levels(settings, count, latent_hw=latent_hw, generator=torch.Generator().manual_seed(seed), u=u)


def logistic(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def probit(u: float) -> float:
    """Φ⁻¹ from the standard library (independent of torch.erfinv), with musubi's clamp to
    [1e-7, 1 - 1e-7] and its float32 rounding of 2u − 1 (which matters only near 0 and 1)."""
    clamped = np.float32(min(max(u, 1e-7), 1 - 1e-7))
    term = np.float32(2) * clamped - np.float32(1)
    return NormalDist().inv_cdf((float(term) + 1) / 2)


GRID_U = [0.0, 1e-9, 0.01, 0.1, 0.25, 0.5, 0.6180339, 0.9, 0.99, 0.999999, 1.0]


# --- continuous methods ------------------------------------------------------------------------


def test_every_method_returns_float32_noise_levels_in_the_unit_interval():
    for method in METHODS:
        t = draw(5000, timestep_sampling=method)
        assert t.dtype == torch.float32 and t.shape == (5000,), method
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0, method


def test_uniform_has_the_moments_of_a_uniform():
    t = draw(200_000, timestep_sampling="uniform")
    assert abs(float(t.mean()) - 0.5) < 0.004
    assert abs(float(t.var()) - 1 / 12) < 0.002


def test_sigmoid_is_the_logistic_of_a_scaled_normal():
    t = draw(200_000, timestep_sampling="sigmoid", sigmoid_scale=2.0)
    assert abs(float(t.median()) - 0.5) < 0.005
    # P(t < logistic(2·1)) = P(Z < 1) = Φ(1)
    below = float((t < logistic(2.0)).float().mean())
    assert abs(below - NormalDist().cdf(1.0)) < 0.005


def test_shift_maps_each_supplied_uniform_through_the_formula():
    shift, scale = 3.0, 1.3
    u = torch.tensor(GRID_U)
    t = draw(len(GRID_U), u=u, timestep_sampling="shift", discrete_flow_shift=shift, sigmoid_scale=scale)
    for value, got in zip(GRID_U, t.tolist()):
        p = logistic(scale * probit(value))
        assert got == pytest.approx(shift * p / (1 + (shift - 1) * p), abs=2e-5), value


def test_shift_moves_the_median_where_the_formula_says():
    t = draw(200_000, timestep_sampling="shift", discrete_flow_shift=3.0)
    assert abs(float(t.median()) - 3 * 0.5 / (1 + 2 * 0.5)) < 0.005  # median of sigmoid(Z) is 0.5


def test_resolution_shift_matches_musubis_examples():
    assert resolution_shift("flux_shift", 128, 128) == pytest.approx(3.1582, abs=1e-4)
    assert math.log(resolution_shift("flux_shift", 128, 128)) == pytest.approx(1.15, abs=1e-9)
    assert resolution_shift("qwen_shift", 128, 128) == pytest.approx(2.0008, abs=1e-4)
    assert math.log(resolution_shift("qwen_shift", 128, 128)) == pytest.approx(0.69355, abs=1e-5)
    assert math.log(resolution_shift("flux_shift", 64, 64)) == pytest.approx(0.63, abs=1e-9)
    assert resolution_shift("flux_shift", 64, 64) == pytest.approx(1.8776, abs=1e-4)
    # odd sizes use the packed token count (h//2)·(w//2); the line extrapolates below 256 tokens
    assert math.log(resolution_shift("flux_shift", 33, 33)) == pytest.approx(0.5 + 0.65 * (256 - 256) / 3840)
    assert math.log(resolution_shift("flux_shift", 16, 16)) == pytest.approx(0.5 + 0.65 * (64 - 256) / 3840)
    with pytest.raises(MusubiError, match="shift"):
        resolution_shift("uniform", 128, 128)


def test_flux_and_qwen_shift_use_the_latent_size():
    u = torch.full((3,), 0.5)
    for method, shift in (("flux_shift", math.exp(1.15)), ("qwen_shift", math.exp(0.5 + 0.4 * 3840 / 7936))):
        t = draw(3, u=u, timestep_sampling=method)
        assert t.tolist() == pytest.approx([shift / (1 + shift)] * 3, abs=1e-6)
    t = draw(1, u=torch.tensor([0.5]), latent_hw=(64, 64), timestep_sampling="flux_shift")
    assert float(t) == pytest.approx(math.exp(0.63) / (1 + math.exp(0.63)), abs=1e-6)
    with pytest.raises(MusubiError, match="latent_hw"):
        draw(4, latent_hw=None, timestep_sampling="flux_shift")


def test_logsnr_maps_a_normal_log_snr_to_a_noise_level():
    mean, std = 1.5, 0.7
    t = draw(len(GRID_U), u=torch.tensor(GRID_U), timestep_sampling="logsnr", logit_mean=mean, logit_std=std)
    for value, got in zip(GRID_U, t.tolist()):
        log_snr = mean + std * probit(value)
        assert got == pytest.approx(1 / (1 + math.exp(log_snr / 2)), abs=2e-5), value
    # fresh draws: the median noise level is logistic(-mean/2); a positive mean means less noise
    fresh = draw(100_000, timestep_sampling="logsnr", logit_mean=mean, logit_std=std)
    assert abs(float(fresh.median()) - logistic(-mean / 2)) < 0.005


def test_qinglong_flux_mixes_three_branches_79_11_10():
    shift = math.exp(1.15)
    t = draw(100_000, u=torch.full((100_000,), 0.5), timestep_sampling="qinglong_flux")
    # with u = 0.5 (Z = 0) each branch gives one value: shifted 0.5, logsnr N(0,1) → 0.5, N(5.36,1) → σ(-2.68)
    shifted = (t - shift / (1 + shift)).abs() < 1e-5
    middle = (t - 0.5).abs() < 1e-5
    clean = (t - logistic(-2.68)).abs() < 1e-5
    assert bool((shifted | middle | clean).all())
    assert abs(float(shifted.float().mean()) - 0.79) < 0.006
    assert abs(float(middle.float().mean()) - 0.11) < 0.005
    assert abs(float(clean.float().mean()) - 0.10) < 0.005


def test_qinglong_qwen_mixes_two_branches_95_5():
    shift = math.exp(0.5 + 0.4 * 3840 / 7936)
    t = draw(100_000, u=torch.full((100_000,), 0.5), timestep_sampling="qinglong_qwen")
    shifted = (t - shift / (1 + shift)).abs() < 1e-5
    clean = (t - logistic(-2.68)).abs() < 1e-5
    assert bool((shifted | clean).all())
    assert abs(float(shifted.float().mean()) - 0.95) < 0.004


# --- range restriction -------------------------------------------------------------------------


def test_min_max_squeeze_the_draw_affinely_into_the_range():
    u = torch.tensor(GRID_U)
    t = draw(len(GRID_U), u=u, timestep_sampling="uniform", min_timestep=200, max_timestep=700)
    assert t.tolist() == pytest.approx([0.2 + 0.5 * value for value in GRID_U], abs=1e-6)
    fresh = draw(50_000, timestep_sampling="logsnr", min_timestep=300, max_timestep=400)
    assert float(fresh.min()) >= 0.3 - 1e-6 and float(fresh.max()) <= 0.4 + 1e-6


def test_preserve_distribution_shape_keeps_the_shape_inside_the_range():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = draw(100_000, timestep_sampling="sigmoid", max_timestep=500, preserve_distribution_shape=True)
    assert float(t.max()) <= 0.5
    # sigmoid(Z) conditioned on Z ≤ 0: its median is sigmoid(Φ⁻¹(1/4)); the affine squeeze would give 0.25
    assert abs(float(t.median()) - logistic(NormalDist().inv_cdf(0.25))) < 0.005


def test_preserve_distribution_shape_never_leaks_out_of_an_impossible_range():
    # sigmoid(Z) ≥ 0.999 needs Z ≥ 6.9: (almost) never drawn
    with pytest.warns(RuntimeWarning, match="preserve_distribution_shape"):
        t = draw(64, timestep_sampling="sigmoid", min_timestep=999, preserve_distribution_shape=True)
    assert t.shape == (64,)
    assert float(t.min()) >= torch.tensor(0.999).item() and float(t.max()) <= 1.0
    assert t.unique().numel() > 32, "the remainder is squeezed into the range, not piled on its edge"


def test_preserve_distribution_shape_works_with_bucketed_u():
    settings = dict(timestep_sampling="shift", discrete_flow_shift=3.0, min_timestep=100, max_timestep=600,
                    preserve_distribution_shape=True, num_timestep_buckets=8)
    u = stratified_uniforms(8, 4096, torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = draw(4096, u=u, **settings)
    assert float(t.min()) >= torch.tensor(0.1).item() and float(t.max()) <= torch.tensor(0.6).item()
    # values of u already in range keep their slot
    p = torch.sigmoid(math.sqrt(2) * torch.erfinv(2 * u.double().clamp(1e-7, 1 - 1e-7) - 1))
    expected = 3 * p / (1 + 2 * p)
    inside = (expected > 0.1001) & (expected < 0.5999)
    assert torch.allclose(t[inside].double(), expected[inside], atol=1e-5)


# --- the sigma method --------------------------------------------------------------------------


def test_sigma_draws_uniformly_on_the_thousandth_grid():
    t = draw(200_000)  # the defaults: sigma
    steps = t.double() * 1000
    assert bool(((steps - steps.round()).abs() < 1e-3).all())
    assert int(steps.round().min()) == 1 and int(steps.round().max()) == 1000
    assert abs(float(t.mean()) - 0.5005) < 0.003
    counts = torch.bincount(steps.round().long(), minlength=1001)[1:]
    assert int(counts.min()) > 100 and int(counts.max()) < 300  # ~200 each


def test_sigma_maps_supplied_u_to_the_grid_then_shifts():
    u = torch.tensor(GRID_U)
    plain = draw(len(GRID_U), u=u)
    shifted = draw(len(GRID_U), u=u, discrete_flow_shift=3.0)
    for value, got, got_shifted in zip(GRID_U, plain.tolist(), shifted.tolist()):
        sigma = min(math.floor(value * 1000) + 1, 1000) / 1000
        assert got == pytest.approx(sigma, abs=1e-7), value
        assert got_shifted == pytest.approx(3 * sigma / (1 + 2 * sigma), abs=1e-6), value


def test_sigma_min_max_bound_the_noise_level_the_intuitive_way():
    low = draw(50_000, max_timestep=500)
    assert float(low.max()) <= 0.5 and abs(float(low.mean()) - 0.25) < 0.003  # musubi: all ≥ 0.501
    high = draw(50_000, min_timestep=800)
    assert float(high.min()) >= torch.tensor(0.8).item() and float(high.max()) <= 1.0


def test_sigma_preserve_shape_is_honoured():
    # shift 3 maps σ ≤ 0.1 to t ≤ 0.25 and σ ≤ 0.25 to t ≤ 0.5: kept shape gives P(t ≤ 0.25) ≈ 0.4;
    # the affine squeeze would give P(shifted σ ≤ 0.5) = 0.25
    t = draw(100_000, discrete_flow_shift=3.0, max_timestep=500, preserve_distribution_shape=True)
    assert float(t.max()) <= 0.5
    assert abs(float((t <= 0.25).float().mean()) - 0.4) < 0.01


def test_sigma_logit_normal_positive_mean_means_more_noise():
    t = draw(100_000, weighting_scheme="logit_normal", logit_mean=1.0)
    assert abs(float(t.median()) - logistic(1.0)) < 0.004
    u = torch.tensor(GRID_U)
    exact = draw(len(GRID_U), u=u, weighting_scheme="logit_normal", logit_mean=0.4, logit_std=1.2)
    for value, got in zip(GRID_U, exact.tolist()):
        v = logistic(0.4 + 1.2 * probit(value))
        assert got == pytest.approx(min(math.floor(v * 1000) + 1, 1000) / 1000, abs=1e-6), value


def test_sigma_mode_scheme_never_indexes_past_the_grid():
    u = torch.tensor([0.0, 0.3, 0.7, 1.0])
    t = draw(4, u=u, weighting_scheme="mode", mode_scale=1.29)
    for value, got in zip(u.tolist(), t.tolist()):
        v = 1 - value - 1.29 * (math.cos(math.pi * value / 2) ** 2 - 1 + value)
        v = min(max(v, 0.0), 1.0)
        assert got == pytest.approx(min(math.floor(v * 1000) + 1, 1000) / 1000, abs=1e-6)
    assert float(t[0]) == 1.0
    fresh = draw(100_000, weighting_scheme="mode")
    assert abs(float(fresh.mean()) - 0.5) < 0.004  # the mode map is symmetric about 1/2


# --- buckets -----------------------------------------------------------------------------------


def test_stratified_uniforms_give_every_bucket_its_share():
    values = stratified_uniforms(4, 100, torch.Generator().manual_seed(0))
    assert values.dtype == torch.float32 and values.shape == (100,)
    assert torch.bincount((values * 4).floor().long(), minlength=4).tolist() == [25, 25, 25, 25]
    assert not bool((values[1:] >= values[:-1]).all()), "not shuffled"
    short = stratified_uniforms(5, 13, torch.Generator().manual_seed(1))
    per_bucket = torch.bincount((short * 5).floor().long(), minlength=5)
    assert int(per_bucket.sum()) == 13 and int(per_bucket.max()) <= 3 and int(per_bucket.min()) >= 1
    again = stratified_uniforms(4, 100, torch.Generator().manual_seed(0))
    assert torch.equal(values, again)


def test_uniform_sampling_uses_the_supplied_u():
    u = stratified_uniforms(10, 50, torch.Generator().manual_seed(2))
    assert torch.equal(draw(50, u=u, timestep_sampling="uniform"), u)
    with pytest.raises(MusubiError, match="one uniform per sample"):
        draw(49, u=u, timestep_sampling="uniform")


# --- loss weights ------------------------------------------------------------------------------


def test_loss_weight_formulas():
    t = torch.tensor([0.0, 0.0005, 0.001, 0.1, 0.25, 0.5, 0.9, 1.0])
    sqrt = loss_weights(TimestepSettings(weighting_scheme="sigma_sqrt"), t)
    expected = [1 / max(value, 1e-3) ** 2 for value in t.tolist()]
    assert sqrt.dtype == torch.float32 and sqrt.shape == (8,)
    assert sqrt.tolist() == pytest.approx(expected, rel=1e-5)
    assert bool(torch.isfinite(sqrt).all())
    cosmap = loss_weights(TimestepSettings(weighting_scheme="cosmap"), t)
    assert cosmap.tolist() == pytest.approx([2 / (math.pi * (1 - 2 * s + 2 * s * s)) for s in t.tolist()], rel=1e-6)
    for scheme in ("none", "logit_normal", "mode"):
        assert loss_weights(TimestepSettings(weighting_scheme=scheme), t).tolist() == [1.0] * 8


def test_loss_weights_apply_per_sample_even_for_4d_losses():
    loss = torch.rand(2, 3, 4, 2, generator=torch.Generator().manual_seed(0))  # last dim = batch size
    weights = torch.tensor([1.0, 3.0])
    weighted = apply_loss_weights(loss, weights)
    expected = (loss[0].mean() * 1.0 + loss[1].mean() * 3.0) / 2
    assert float(weighted.mean()) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(MusubiError, match="one weight per sample"):
        apply_loss_weights(loss, torch.ones(3))


# --- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, words",
    [
        (dict(timestep_sampling="karras"), ["timestep_sampling", "karras", "uniform", "qinglong_qwen"]),
        (dict(weighting_scheme="snr"), ["weighting_scheme", "cosmap"]),
        (dict(min_timestep=500, max_timestep=500), ["min_timestep", "max_timestep", "1000"]),
        (dict(min_timestep=800, max_timestep=200), ["min_timestep"]),
        (dict(max_timestep=1001), ["max_timestep", "1000"]),
        (dict(min_timestep=-1), ["min_timestep"]),
        (dict(logit_std=0.0), ["logit_std", "> 0"]),
        (dict(discrete_flow_shift=-2.0), ["discrete_flow_shift", "> 0"]),
        (dict(sigmoid_scale=float("nan")), ["sigmoid_scale"]),
        (dict(num_timestep_buckets=1), ["num_timestep_buckets", "2"]),
        (dict(weighting_scheme="mode", mode_scale=3.0), ["mode_scale", "1.7519"]),
        (dict(min_timestep=1.5), ["min_timestep", "integer"]),
        (dict(preserve_distribution_shape="yes"), ["preserve_distribution_shape", "true or false"]),
    ],
)
def test_validate_names_the_bad_option(options, words):
    with pytest.raises(MusubiError) as error:
        TimestepSettings(**options).validate()
    for word in words:
        assert word in str(error.value)


def test_sampling_validates_its_settings():
    with pytest.raises(MusubiError, match="max_timestep"):
        draw(4, max_timestep=2000)


def test_settings_round_trip_through_a_dict():
    settings = TimestepSettings(timestep_sampling="shift", discrete_flow_shift=3, min_timestep=100, num_timestep_buckets=5)
    values = settings.to_dict()
    assert values["discrete_flow_shift"] == 3.0 and isinstance(values["discrete_flow_shift"], float)
    assert values["min_timestep"] == 100 and values["max_timestep"] is None
    assert TimestepSettings.from_dict(values) == settings
    assert TimestepSettings.from_dict({}) == TimestepSettings()


def test_from_dict_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(MusubiError, match="'timestep_shift'.*known options.*discrete_flow_shift"):
        TimestepSettings.from_dict({"timestep_shift": 3.0})
    with pytest.raises(MusubiError, match="discrete_flow_shift must be a number"):
        TimestepSettings.from_dict({"discrete_flow_shift": "3.0"})
    with pytest.raises(MusubiError, match="max_timestep must be an integer"):
        TimestepSettings.from_dict({"max_timestep": 900.0})
    with pytest.raises(MusubiError, match="timestep_sampling must be a string"):
        TimestepSettings.from_dict({"timestep_sampling": 3})
    with pytest.raises(MusubiError, match="sigmoid_scale must be a number"):
        TimestepSettings.from_dict({"sigmoid_scale": True})
    with pytest.raises(MusubiError, match="min_timestep"):
        TimestepSettings.from_dict({"min_timestep": 900, "max_timestep": 100})
    with pytest.raises(MusubiError, match="table"):
        TimestepSettings.from_dict(["shift"])


def test_command_line_options_use_musubis_names():
    parser = argparse.ArgumentParser()
    add_timestep_arguments(parser)
    defaults = settings_from_args(parser.parse_args([]))
    assert defaults == TimestepSettings()
    args = parser.parse_args(["--timestep_sampling", "shift", "--discrete_flow_shift", "3.1582", "--min_timestep", "100",
                              "--max_timestep", "900", "--preserve_distribution_shape", "--num_timestep_buckets", "4",
                              "--weighting_scheme", "cosmap", "--sigmoid_scale", "1.5", "--logit_mean", "0.2",
                              "--logit_std", "0.9", "--mode_scale", "1.0"])
    assert settings_from_args(args) == TimestepSettings(
        timestep_sampling="shift", discrete_flow_shift=3.1582, min_timestep=100, max_timestep=900,
        preserve_distribution_shape=True, num_timestep_buckets=4, weighting_scheme="cosmap",
        sigmoid_scale=1.5, logit_mean=0.2, logit_std=0.9, mode_scale=1.0)
    with pytest.raises(MusubiError, match="min_timestep"):
        settings_from_args(parser.parse_args(["--min_timestep", "900", "--max_timestep", "100"]))
