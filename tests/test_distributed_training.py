"""Several processes (data parallel, gloo on the CPU) running ``python -m musubi train``.

Each test launches real processes with ``torch.distributed.run`` (what ``accelerate launch`` runs
underneath; one test uses ``accelerate launch`` itself) on the toy model: 2 processes × batch 1
must train the LoRA that 1 process × batch 2 trains, files are written once, a state saved by two
processes resumes in one, and SIGINT to the launcher leaves one resumable state.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from musubi.data.latent_cache import write_latent_cache_item
from musubi.files import read_header

pytestmark = pytest.mark.slow

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENVIRONMENT = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
TIMEOUT = 300


def _toy_data(folder, count=3):
    """``count`` items of one latent shape: with 2 rows per batch the last batch of an odd count has
    one row, so one process has nothing to train in it."""
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        write_latent_cache_item(folder, f"item{index}", torch.randn(4, 6, 6, generator=generator),
                                context=torch.randn(3, 8, generator=generator))
    return str(folder)


def _train_arguments(data, output, steps, batch_size, *extra):
    return ["-m", "musubi", "train", "--model", "toy", "--model_args", "width=16", "--data_dir", data,
            "--output_dir", str(output), "--output_name", "ddp", "--max_train_steps", str(steps),
            "--batch_size", str(batch_size), "--learning_rate", "3e-2", "--seed", "5", "--network_dim", "4",
            "--timestep_sampling", "shift", "--discrete_flow_shift", "2.0", "--weighting_scheme", "sigma_sqrt",
            "--min_timestep", "50", *extra]


def _launch(processes: int, arguments: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *arguments]


def _run(command, cwd):
    completed = subprocess.run(command, cwd=cwd, env=ENVIRONMENT, capture_output=True, text=True, timeout=TIMEOUT)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


def _lora(path):
    return load_file(str(path))


def test_two_processes_of_batch_1_train_the_lora_of_one_process_of_batch_2(tmp_path):
    data = _toy_data(tmp_path / "data")
    steps = 5  # 3 items, 2 rows per batch: batches of 2 and 1 rows, so some batches leave a process idle
    one = _run([sys.executable, *_train_arguments(data, tmp_path / "one", steps, 2, "--save_every_n_steps", "2")], tmp_path)
    two = _run(_launch(2, _train_arguments(data, tmp_path / "two", steps, 1, "--save_every_n_steps", "2")), tmp_path)

    expected, trained = _lora(tmp_path / "one" / "ddp.safetensors"), _lora(tmp_path / "two" / "ddp.safetensors")
    assert set(trained) == set(expected)
    assert any(float(value.abs().max()) > 1e-3 for key, value in expected.items() if "lora_up" in key)
    for key, value in expected.items():
        torch.testing.assert_close(trained[key], value, rtol=1e-4, atol=1e-6)
    # The same losses, reported once: one start line and one line per reported step.
    losses = lambda text: re.findall(r"step (\d+)/\d+  loss ([\d.]+)", text)  # noqa: E731
    assert [step for step, _ in losses(two)] == [str(step) for step in range(1, steps + 1)]
    for (_, a), (_, b) in zip(losses(one), losses(two)):
        assert float(a) == pytest.approx(float(b), rel=1e-4)
    assert two.count("Training to step") == 1 and two.count("Done: 5 steps") == 1
    # Checkpoints, states and the final LoRA exist once, written by the main process.
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one")) == [
        "ddp-step000002-state", "ddp-step000002.safetensors", "ddp-step000004-state", "ddp-step000004.safetensors",
        "ddp-step000005-state", "ddp.safetensors"]
    state = tmp_path / "two" / "ddp-step000004-state"
    assert len(torch.load(state / "rng.pt", weights_only=False)) == 2  # each process's random state


def test_a_state_of_two_processes_resumes_in_one_and_continues_the_step_count(tmp_path):
    data = _toy_data(tmp_path / "data", count=4)
    _run(_launch(2, _train_arguments(data, tmp_path / "out", 4, 1)), tmp_path)
    output = _run([sys.executable, *_train_arguments(data, tmp_path / "out", 7, 2, "--resume", "latest")], tmp_path)
    assert f"Resumed from {tmp_path / 'out' / 'ddp-step000004-state'} (step 4)." in output
    assert "Training from step 4 to step 7." in output and "Done: 7 steps" in output
    assert re.findall(r"step (\d+)/7", output) == ["5", "6", "7"]
    _, metadata = read_header(str(tmp_path / "out" / "ddp.safetensors"))
    assert metadata["ss_steps"] == "7"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_sigint_to_accelerate_launch_saves_one_resumable_state(tmp_path):
    data = _toy_data(tmp_path / "data")
    # On a machine without GPUs accelerate runs several processes only with --multi_gpu (torchrun underneath);
    # the processes then train on the CPU (gloo) by themselves.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               *_train_arguments(data, tmp_path / "out", 1_000_000, 1, "--no-save_state")]
    process = subprocess.Popen(command, cwd=tmp_path, env=ENVIRONMENT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        lines = []
        deadline = time.monotonic() + TIMEOUT
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Training to step"):
                break
            assert time.monotonic() < deadline, "".join(lines)
        time.sleep(2.0)
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(lines) + rest
    assert (tmp_path / "out").is_dir(), output
    states = sorted(name for name in os.listdir(tmp_path / "out") if name.endswith("-state"))
    assert len(states) == 1, output
    assert output.count("Stopping after this step") == 1 and output.count("Stopped at step") == 1, output
    stopped = int(re.search(r"ddp-step(\d+)-state", states[0]).group(1))
    assert not (tmp_path / "out" / "ddp.safetensors").exists()
    assert (tmp_path / "out" / f"ddp-step{stopped:06d}.safetensors").exists()

    resumed = _run(_launch(2, _train_arguments(data, tmp_path / "out", stopped + 2, 1, "--resume", "latest")), tmp_path)
    assert f"(step {stopped})" in resumed and f"Done: {stopped + 2} steps" in resumed
