"""bench/real_size.py: its smoke run (the tests' tiny Wan, each case in its own ComfyUI process)
goes through both loaders, sampling and both trainers and prints every figure the docs quote, so
the real-size measurement keeps working."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from comfy_server import REPO_ROOT, find_comfyui

SCRIPT = REPO_ROOT / "bench" / "real_size.py"
CASES = ["sample fp32", "sample fp8>fp32", "train core fp32", "train ours fp32", "train ours fp8>fp32"]


@pytest.mark.comfyui
@pytest.mark.skipif(find_comfyui() is None, reason="needs ComfyUI")
def test_smoke_run_measures_every_case(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--base", str(tmp_path), "--steps", "1", "--skip", "1", "--size", "64",
         "--text-tokens", "16", "--threads", "1", "--cases", *CASES],
        capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    out = completed.stdout
    assert "--smoke" in out and "allocator: glibc default" in out
    weights = {}
    for case in CASES:
        row = next(line for line in out.splitlines() if line.startswith(case + " "))
        sizes = [float(value) * (1024 if unit == "GiB" else 1) for value, unit in re.findall(r"(-?[\d.]+) (GiB|MiB)", row)]
        assert len(sizes) == 4, row  # weights, load peak, run peak, above model (MiB)
        assert 0 < sizes[0] <= sizes[2] and sizes[1] > 0, row  # the run holds at least the weights
        assert re.search(r"[\d.]+ s \([\d.]+–[\d.]+\)$", row), row  # seconds per step, median with its range
        weights[case] = sizes[0]
    assert weights["sample fp8>fp32"] < 0.8 * weights["sample fp32"]  # fp8 codes kept (the tiny model is mostly embeddings)
    assert re.search(r"fp32 compute — fp8 scaled / fp32 weights, time per step: sampling [\d.]+×, training [\d.]+×", out)
    assert re.search(r"fp32 — Train LoRA / core TrainLoraNode: time per step [\d.]+×, peak [\d.]+×", out)
    assert re.search(r"train ours fp8>fp32: Load DiT \(fp8 scaled\) peaks at [\d.]+ [GM]iB while loading", out)
    assert (tmp_path / "models" / "diffusion_models" / "smoke_wan21_t2v_tiny_bf16.safetensors").is_file()
