"""Timestep preview: histogram, weights, musubi's console layout, the image and the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from musubi.cli import main as cli_main
from musubi.errors import MusubiError
from musubi.training.timestep_preview import TimestepPreview, compute_preview, console_text, render_image
from musubi.training.timesteps import TimestepSettings

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def test_sigma_preview_counts_a_draw_of_exactly_one_in_the_last_bin():
    preview = compute_preview(TimestepSettings(), num_samples=100_000, seed=1)
    counts = np.asarray(preview.counts)
    assert counts.shape == (1000,) and int(counts.sum()) == 100_000
    # σ = k/1000 lands in bin k; bin 0 stays empty and bin 999 also holds σ = 1
    assert counts[0] == 0
    typical = counts[1:999].mean()  # ≈ 100
    assert 0.99 * 100_000 / 1000 < typical < 1.01 * 100_000 / 1000
    assert 1.6 * typical < counts[999] < 2.4 * typical
    assert preview.latent_hw == (128, 128)


def test_preview_of_a_range_stays_inside_it():
    settings = TimestepSettings(timestep_sampling="sigmoid", min_timestep=300, max_timestep=600)
    counts = np.asarray(compute_preview(settings, num_samples=20_000).counts)
    assert counts[:300].sum() == 0 and counts[601:].sum() == 0 and counts.sum() == 20_000


def test_preview_feeds_stratified_uniforms_when_buckets_are_set():
    settings = TimestepSettings(timestep_sampling="uniform", num_timestep_buckets=10)
    counts = np.asarray(compute_preview(settings, num_samples=1000, seed=3).counts)
    # one batch of 1000 stratified over 10 buckets: exactly 100 draws per tenth
    assert counts.reshape(10, 100).sum(axis=1).tolist() == [100] * 10


def test_preview_is_reproducible_per_seed():
    settings = TimestepSettings(timestep_sampling="logsnr")
    first = compute_preview(settings, num_samples=5000, seed=7).counts
    assert np.array_equal(first, compute_preview(settings, num_samples=5000, seed=7).counts)
    assert not np.array_equal(first, compute_preview(settings, num_samples=5000, seed=8).counts)


def test_preview_weights_are_the_loss_weights_at_model_timesteps_1_to_1000():
    sqrt = np.asarray(compute_preview(TimestepSettings(weighting_scheme="sigma_sqrt"), num_samples=1000).weights)
    sigma = np.arange(1, 1001) / 1000
    assert sqrt.shape == (1000,) and np.all(np.isfinite(sqrt))
    np.testing.assert_allclose(sqrt, sigma**-2.0, rtol=1e-5)
    cosmap = np.asarray(compute_preview(TimestepSettings(weighting_scheme="cosmap"), num_samples=1000).weights)
    np.testing.assert_allclose(cosmap, 2 / (np.pi * (1 - 2 * sigma + 2 * sigma**2)), rtol=1e-5)
    plain = np.asarray(compute_preview(TimestepSettings(), num_samples=1000).weights)
    assert np.all(plain == 1.0)


def test_preview_rejects_bad_arguments():
    with pytest.raises(MusubiError, match="num_samples"):
        compute_preview(TimestepSettings(), num_samples=0)
    with pytest.raises(MusubiError, match="latent"):
        compute_preview(TimestepSettings(), latent_hw=(0, 64))
    with pytest.raises(MusubiError, match="min_timestep"):
        compute_preview(TimestepSettings(min_timestep=900, max_timestep=100))


def _handmade_preview() -> TimestepPreview:
    counts = np.arange(1000)
    weights = np.linspace(2.0, 0.5, 1000)
    return TimestepPreview(counts=counts, weights=weights, settings=TimestepSettings(), latent_hw=(128, 128))


def test_console_text_has_musubis_layout():
    lines = console_text(_handmade_preview()).split("\n")
    assert len(lines) == 82
    # counts: group i averages 25i..25i+24 = 25i + 12; the largest is 987
    assert lines[0] == "Sampled timesteps: max count=987.0"
    for i in range(40):
        average = 25 * i + 12
        assert lines[1 + i] == "%4d-%4d: " % (25 * i, 25 * i + 24) + "#" * int(average / 987 * 64)
    assert lines[1] == "   0-  24: "
    assert lines[40] == " 975- 999: " + "#" * 64
    # weights fall linearly from 2.0 to 0.5: group averages are the mean of their 25 values
    weights = np.linspace(2.0, 0.5, 1000)
    groups = [float(np.mean(weights[25 * i:25 * i + 25])) for i in range(40)]
    assert lines[41] == f"Sampled loss weighting: max weighting={max(groups)}"
    for i, weight in enumerate(groups):
        assert lines[42 + i] == "%4d-%4d: %8.2f " % (25 * i, 25 * i + 24, weight) + "#" * int(weight / max(groups) * 64)


def test_console_text_of_uniform_weights_fills_every_line():
    text = console_text(compute_preview(TimestepSettings(timestep_sampling="uniform"), num_samples=2000))
    weight_lines = text.split("\n")[42:]
    assert weight_lines[0] == "   0-  24:     1.00 " + "#" * 64 and len(weight_lines) == 40


def test_render_image_draws_both_panels():
    preview = compute_preview(TimestepSettings(timestep_sampling="shift", discrete_flow_shift=3.0, weighting_scheme="cosmap"),
                              num_samples=5000)
    pixels = render_image(preview)
    assert pixels.dtype == np.uint8 and pixels.shape == (768, 1024, 3)
    not_white = np.any(pixels < 240, axis=2)
    assert 0.05 < not_white.mean() < 0.8
    # the histogram (blue-ish) sits in the upper part, the weight curve (orange-ish) in the lower part
    r, g, b = (pixels[..., c].astype(int) for c in range(3))
    blue = (b - r > 60)
    orange = (r - b > 20)
    assert blue[: 768 // 2].sum() > 5000 and orange[768 // 2:].sum() > 5000
    small = render_image(preview, width=640, height=480)
    assert small.shape == (480, 640, 3)
    with pytest.raises(MusubiError, match="image size"):
        render_image(preview, width=10, height=10)


def _run_cli(*arguments: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "musubi", "timesteps", *arguments], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=120)


def test_command_line_prints_and_writes_the_console_text(tmp_path):
    out = tmp_path / "timesteps.txt"
    result = _run_cli("--timestep_sampling", "shift", "--discrete_flow_shift", "3", "--num_samples", "20000",
                      "--show", "console", "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 82 and lines[0].startswith("Sampled timesteps: max count=")
    bars = [line.split(": ", 1)[1].count("#") for line in lines[1:41]]
    assert sum(bars[20:]) > 1.5 * sum(bars[:20])  # shift 3 favours high noise
    assert out.read_text() == result.stdout
    assert sorted(os.listdir(tmp_path)) == ["timesteps.txt"]


def test_command_line_writes_a_png(tmp_path):
    from PIL import Image

    out = tmp_path / "timesteps.png"
    result = _run_cli("--timestep_sampling", "flux_shift", "--latent_height", "64", "--latent_width", "64",
                      "--num_samples", "5000", "--show", "image", "--out", str(out))
    assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1024, 768)
        assert len(set(image.convert("L").get_flattened_data())) > 8
    assert sorted(os.listdir(tmp_path)) == ["timesteps.png"]


def test_command_line_errors_are_clear(tmp_path, capsys):
    assert cli_main(["timesteps", "--show", "image"]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli_main(["timesteps", "--min_timestep", "700", "--max_timestep", "300"]) == 2
    assert "min_timestep" in capsys.readouterr().err
    assert cli_main(["timesteps", "--show", "image", "--out", str(tmp_path / "missing" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
