"""bench/magcache.py: its metrics against their formulas, its test videos, and a smoke run of the
whole measurement (calibration, KSampler, MagCache Sampler, core EasyCache) on an untrained model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from comfy_server import REPO_ROOT, find_comfyui, load_script

SCRIPT = REPO_ROOT / "bench" / "magcache.py"


@pytest.fixture(scope="module")
def bench():
    yield from load_script(SCRIPT, "bench_magcache")


def test_psnr_is_ten_log10_of_peak_squared_over_mse(bench):
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(3, 4, 8, 8, generator=generator)
    result = reference + 0.05 * torch.randn(3, 4, 8, 8, generator=generator)
    mse = sum((float(a) - float(b)) ** 2 for a, b in zip(result.flatten(), reference.flatten())) / reference.numel()
    assert bench.psnr(result, reference) == pytest.approx(10 * math.log10(1 / mse), rel=1e-9)
    # the same error on a signal twice as large, measured against a peak twice as large
    assert bench.psnr(2 * result, 2 * reference, peak=2.0) == pytest.approx(bench.psnr(result, reference), rel=1e-9)
    assert bench.psnr(reference, reference.clone()) == math.inf
    with pytest.raises(ValueError):
        bench.psnr(result, reference[:2])


def test_interpolation_is_linear_between_neighbours_and_refuses_to_extrapolate(bench):
    points = [(0.5, 20.0), (0.1, 40.0), (0.3, 30.0)]
    assert bench.interpolate(points, 0.2) == pytest.approx(35.0)
    assert bench.interpolate(points, 0.45) == pytest.approx(22.5)
    assert bench.interpolate(points, 0.3) == pytest.approx(30.0)
    assert bench.interpolate(points, 0.6) is None
    assert bench.interpolate(points, 0.05) is None


def test_pareto_front_keeps_the_points_nothing_beats_and_reads_savings_off_it(bench):
    points = [(0.0, math.inf), (0.2, 30.0), (0.3, 25.0), (0.25, 20.0), (0.6, 10.0), (0.6, 12.0), (0.5, 8.0)]
    front = bench.pareto_front(points)
    assert front == [(0.0, math.inf), (0.2, 30.0), (0.3, 25.0), (0.6, 12.0)]
    for saved, value in points:  # every point is on or below the front
        assert any(s >= saved and v >= value for s, v in front)
    assert bench.saving_at_psnr(front, 25.0) == pytest.approx(0.3)
    assert bench.saving_at_psnr(front, 18.5) == pytest.approx(0.3 + 0.3 * (25.0 - 18.5) / (25.0 - 12.0))
    assert bench.saving_at_psnr(front, 5.0) == pytest.approx(0.6)
    assert bench.saving_at_psnr(front, 40.0) == 0.0


def test_latent_projection_round_trips_videos(bench):
    projection = bench.latent_projection()
    assert torch.allclose(projection.T @ projection, torch.eye(3), atol=1e-6)
    video = bench.render_video(2, 4, 16, torch.Generator().manual_seed(3))
    assert video.shape == (3, 4, 16, 16) and 0 <= float(video.min()) and float(video.max()) <= 1
    latent = bench.encode_video(video, projection)
    assert latent.shape == (16, 4, 16, 16)
    assert 0.5 < float(latent.std()) < 2.0  # roughly unit variance, like a VAE latent
    assert torch.allclose(bench.decode_video(latent, projection), video, atol=1e-5)


def test_every_prompt_renders_videos_that_the_colour_check_recognises(bench):
    generator = torch.Generator().manual_seed(5)
    for prompt in range(len(bench.PROMPTS)):
        for _ in range(3):
            video = bench.render_video(prompt, 4, 16, generator)
            assert bench.follows_prompt(video, prompt)
            assert not any(bench.follows_prompt(video, other) for other in range(len(bench.PROMPTS)) if other != prompt)
    # the object moves: frames differ
    video = bench.render_video(0, 4, 16, generator)
    assert float((video[:, 0] - video[:, -1]).abs().max()) > 0.2


@pytest.mark.comfyui
@pytest.mark.skipif(find_comfyui() is None, reason="needs ComfyUI")
def test_smoke_run_on_an_untrained_model(tmp_path):
    steps = 6
    out = tmp_path / "result.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--no-train", "--quick", "--steps", str(steps), "--cache-dir", str(tmp_path),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "Matched model calls" in completed.stdout
    payload = json.loads(out.read_text())
    results = payload["results"]
    videos = payload["info"]["videos"]
    uncached = results[0]
    assert uncached["method"] == "uncached"
    # cfg > 1: a cond and an uncond evaluation per step and video
    assert uncached["calls"] == 2 * steps * videos
    methods = {result["method"] for result in results}
    assert methods == {"uncached", "magcache", "easycache"}
    minimum = 2 * 2 * videos  # MagCache always computes the first step (retention) and the last
    for result in results:
        assert result["total_calls"] == uncached["calls"]
        assert result["saved"] == pytest.approx(1 - result["calls"] / uncached["calls"])
        assert len(result["mse"]) == videos
        if result["calls"] == uncached["calls"]:
            assert all(value == 0 for value in result["mse"])  # skipping nothing reproduces KSampler exactly
        if result["method"] == "magcache":
            assert minimum <= result["calls"] < uncached["calls"]
            assert result["calls"] % 2 == 0  # cond and uncond share each step's decision
    assert any(result["threshold"] == 0.24 and result["K"] == 6 for result in results if result["method"] == "magcache")
    assert len(payload["comparisons"]) == len(results) - 1
    assert len(payload["info"]["ratios"].split(",")) == steps
