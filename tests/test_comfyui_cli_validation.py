"""Validation from the shell on tiny Wan through ComfyUI's model code: ``--validation_data_dir``
and ``--validate_every_n_steps`` score a musubi-layout cache without changing the LoRA, and
``ema-merge --candidates`` scores merges on the same plan (its newest-checkpoint-alone candidate,
beta 0, must score what training printed for the final step)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import safetensors.torch

from test_comfyui_cli import REPO_ROOT, run_cli, training_options, write_cache

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]
LINE = re.compile(r"step (\d+)/4  validation loss ([0-9.]+) \(noise-level bands")


def test_validation_and_ema_candidates_from_the_shell_on_tiny_wan(comfy, tiny_model_file, tmp_path):
    train, val = write_cache(tmp_path / "train", "wan21_t2v", 2), write_cache(tmp_path / "val", "wan21_t2v", 1, seed=5)
    dit = str(comfy.models_dir("diffusion_models") / tiny_model_file("wan21_t2v"))
    common = ["--model", "comfyui", "--dit", dit, "--data_dir", train]
    scored = run_cli(comfy, tmp_path, *common, *training_options(tmp_path / "with", "with", steps=4),
                     "--save_every_n_steps", "2", "--validation_data_dir", val, "--validate_every_n_steps", "2")
    printed = LINE.findall(scored)
    assert [int(step) for step, _ in printed] == [0, 2, 4], scored
    run_cli(comfy, tmp_path, *common, *training_options(tmp_path / "without", "without", steps=4))
    with_lora = safetensors.torch.load_file(tmp_path / "with" / "with.safetensors")
    without_lora = safetensors.torch.load_file(tmp_path / "without" / "without.safetensors")
    assert set(with_lora) == set(without_lora) and all(with_lora[key].equal(without_lora[key]) for key in with_lora)

    checkpoints = sorted(str(path) for path in (tmp_path / "with").glob("with-step*.safetensors"))
    assert len(checkpoints) == 2
    environment = {**os.environ, "COMFYUI_PATH": str(comfy.comfy_path), "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "2"}
    completed = subprocess.run(
        [sys.executable, "-m", "musubi", "ema-merge", *checkpoints, "--no_sort", "--output_file", str(tmp_path / "best.safetensors"),
         "--candidates", "0, 0.5", "--validation_data_dir", val, "--model", "comfyui", "--dit", dit,
         "--timestep_sampling", "uniform"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    rows = {float(value): float(loss) for value, loss in re.findall(r"^beta ([0-9.]+)\s+([0-9.]+)", completed.stdout, flags=re.M)}
    assert sorted(rows) == [0.0, 0.5], completed.stdout
    assert rows[0.0] == pytest.approx(float(printed[-1][1]), abs=2e-5)
    assert f"the best candidate, beta {min(rows, key=rows.get):g}" in completed.stdout
