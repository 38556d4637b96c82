"""bench/gpu_check.py: its real-size plan is Wan 2.1 1.3B, and its smoke run (what a machine without
CUDA runs) goes through every case and prints every row without a failed cell, so the script a GPU
machine runs keeps working."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from comfy_server import REPO_ROOT, find_comfyui, load_script

SCRIPT = REPO_ROOT / "bench" / "gpu_check.py"
ROWS = ["train bf16 ckpt off", "train bf16 ckpt on", "train fp8 ckpt off", "train fp8 ckpt on", "fp8 forward",
        "MagCache", "compile train", "compile sample"]


@pytest.fixture(scope="module")
def bench():
    yield from load_script(SCRIPT, "bench_gpu_check")


def test_the_real_plan_is_wan_1_3b_at_its_real_size_on_small_latents(bench):
    plan = bench.REAL
    assert not plan.smoke
    assert plan.wan == {"dim": 1536, "ffn_dim": 8960, "num_layers": 30, "freq_dim": 256, "text_dim": 4096}
    assert (plan.width, plan.height) == (832, 480)
    assert plan.train_steps > plan.train_skip + 5 and plan.sample_steps > plan.sample_skip + 5
    assert plan.train_backend == "INDUCTOR" and plan.sample_backend == "inductor"


def test_cells_are_medians_with_their_range(bench):
    assert bench.duration([0.010, 0.012, 0.030]) == "12.0 ms (10.0–30.0)"
    assert bench.duration([2.0, 1.5, 2.5]) == "2.00 s (1.50–2.50)"
    a, b = bench.Measured(seconds=[0.2, 0.2], first=[1.0]), bench.Measured(seconds=[0.1], first=[31.0], graphs=3)
    assert bench.compile_speedup(a, b) == "speed-up eager/compiled 2.00×, compile once ≈ 30.0 s, 3 graph(s) compiled"
    assert bench.fp8_overhead(b, a) == "fp8/bf16 time 2.00× (+100%)"


@pytest.mark.comfyui
@pytest.mark.skipif(find_comfyui() is None, reason="needs ComfyUI")
def test_smoke_run_prints_every_row_without_a_failed_cell(tmp_path):
    out = tmp_path / "rows.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out)], capture_output=True, text=True, timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "SMOKE RUN" in completed.stdout
    payload = json.loads(out.read_text())
    assert payload["smoke"] is True
    rows = payload["rows"]
    assert [row["case"] for row in rows] == ROWS
    for row in rows:
        for cell in ("a", "b", "ratio"):
            assert row[cell] and row[cell] != "–", (row["case"], row)
            assert not row[cell].startswith(("FAILED", "skipped")), (row["case"], row[cell])
        assert row["case"] in completed.stdout and row["a"] in completed.stdout
    magcache = next(row for row in rows if row["case"] == "MagCache")
    assert "calls" in magcache["a"] and "calls" in magcache["b"]
    # the temporary model folder is gone
    assert not list(tmp_path.glob("gpu-check-*"))
