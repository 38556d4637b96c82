"""Benchmark: one process against two data-parallel processes (gloo, CPU) on one tiny model.

Run from the repository root: ``python bench/ddp.py`` (about 3 minutes on 2 CPU cores). Options:
``--model toy|wan`` (the library's toy DiT, or the tiny Wan 2.1 checkpoint of the tests through
ComfyUI's model code, which needs ComfyUI at $COMFYUI_PATH or ~/comfy/ComfyUI), ``--steps``,
``--width``/``--depth``/``--size`` (toy model and latent size), ``--rounds`` (each setup runs that
often, the setups alternating; the round with the median step time is shown with the spread of
all rounds, as other programs on the machine disturb single runs), ``--json FILE``.

Each setup trains the same LoRA on the same items with ``python -m musubi train`` in fresh
processes, the same global batch (2 items per optimizer step), the same seed:

* 1 process × batch 2 with 2 threads (the machine's two cores in one process),
* 1 process × batch 2 with 1 thread,
* 2 processes × batch 1 with 1 thread each (``torch.distributed.run``, gloo), each process
  training its row of every batch.

From the trainer's own clocks (``TrainResult.step_seconds`` and ``sync_seconds``, the time spent
in collective calls: the gradient all-reduce, the loss sum and the stop flag's reduce happen once
per step, and waiting for the slower process counts as communication) it reports the median
step time after ``--warmup`` steps, samples per second (global batch / step time) and the
communication share of the step time. On CPU both processes share two cores with each other
and with the gloo threads; on GPUs each process has its own device and the gradient all-reduce
(NCCL) overlaps little with the LoRA's small gradients, so the communication share is what
limits scaling there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

SETUPS = (  # label, processes, batch size per process, threads per process
    ("1 process  × batch 2, 2 threads", 1, 2, 2),
    ("1 process  × batch 2, 1 thread ", 1, 2, 1),
    ("2 processes × batch 1, 1 thread each", 2, 1, 1),
)


def write_data(folder: Path, model: str, size: int, count: int = 8) -> None:
    from musubi.data.latent_cache import write_latent_cache_item

    generator = torch.Generator().manual_seed(0)
    if model == "toy":
        for index in range(count):
            write_latent_cache_item(folder, f"item{index}", torch.randn(16, size, size, generator=generator),
                                    context=torch.randn(8, 8, generator=generator))
        return
    from musubi.data.cache import latent_tensor_key
    from musubi.data.text_embeddings import TextEmbedding, save_text_embedding
    from musubi.files import atomic_save_file

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        latent = torch.randn(16, 1, size, size, generator=generator)
        atomic_save_file({latent_tensor_key(latent): latent}, str(folder / f"item{index}_{size * 8:04d}x{size * 8:04d}_wan.safetensors"),
                         {"architecture": "wan", "width": str(size * 8), "height": str(size * 8), "format_version": "1.0.1"})
        save_text_embedding(folder / f"item{index}_wan_te.safetensors",
                            TextEmbedding(torch.randn(8, 4096, generator=generator), None, "wan", {}), caption=str(index))


def run_setup(args, work: Path, label: str, processes: int, batch: int, threads: int) -> dict:
    output = work / f"out_{processes}_{batch}_{threads}"
    shutil.rmtree(output, ignore_errors=True)  # the previous round's run
    result_file = work / f"result_{processes}_{batch}_{threads}.json"
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    if args.comfyui:
        environment["COMFYUI_PATH"] = str(args.comfyui)
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [sys.executable, *launcher, str(Path(__file__).resolve()), "--worker", str(result_file),
               "--model", args.model, "--data_dir", str(work / "data"), "--output_dir", str(output),
               "--batch_size", str(batch), "--steps", str(args.steps), "--width", str(args.width),
               "--depth", str(args.depth), "--threads", str(threads)]
    if args.model == "wan":
        command += ["--dit", str(work / "wan.safetensors")]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=1800)
    if completed.returncode != 0:
        raise SystemExit(f"{label} failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}")
    measured = json.loads(result_file.read_text())
    steps = measured["step_seconds"][args.warmup:]
    sync = measured["sync_seconds"][args.warmup:]
    step_time = statistics.median(steps)
    return {
        "setup": label.strip(), "processes": processes, "batch_per_process": batch, "threads_per_process": threads,
        "global_batch": processes * batch, "median_step_s": step_time,
        "samples_per_s": processes * batch / step_time,
        "communication_share": sum(sync) / sum(steps) if processes > 1 else 0.0,
        "median_communication_s": statistics.median(sync),
        "final_loss": measured["final_loss"],
    }


def combine(rounds: list[dict]) -> dict:
    """The round whose step time is the median of the rounds, with the spread of all rounds."""
    ordered = sorted(rounds, key=lambda row: row["median_step_s"])
    row = dict(ordered[len(ordered) // 2])
    row["step_s_range"] = [ordered[0]["median_step_s"], ordered[-1]["median_step_s"]]
    return row


def worker(args) -> None:
    """One training run, timed by the trainer itself; the main process writes the JSON."""
    torch.set_num_threads(args.threads)
    from musubi.training.cli import train_from_config
    from musubi.training.config import resolve_config

    values = {"data_dir": args.data_dir, "output_dir": args.output_dir, "output_name": "bench",
              "max_train_steps": args.steps, "batch_size": args.batch_size, "learning_rate": 1e-3, "seed": 1,
              "network_dim": 16, "network_alpha": 16.0, "save_state": False, "timestep_sampling": "sigmoid"}
    if args.model == "toy":
        values.update(model="toy", model_args={"latent_channels": 16, "width": args.width, "depth": args.depth})
    else:
        values.update(model="comfyui", dit=args.dit)
    result = train_from_config(resolve_config({}, values))
    if result.is_main_process:
        Path(args.worker).write_text(json.dumps({"step_seconds": result.step_seconds, "sync_seconds": result.sync_seconds,
                                                 "final_loss": result.losses[-1]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("toy", "wan"), default="toy")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="runs of every setup, alternating; the median round is shown")
    parser.add_argument("--width", type=int, default=256, help="toy model width")
    parser.add_argument("--depth", type=int, default=4, help="toy model blocks")
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    for hidden in ("--data_dir", "--output_dir", "--dit"):
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch_size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    args.comfyui = None
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as folder:
        work = Path(folder)
        if args.model == "wan":
            from comfy_server import find_comfyui
            from tiny_checkpoints import write_tiny_checkpoint

            args.comfyui = find_comfyui()
            if args.comfyui is None:
                raise SystemExit("--model wan needs ComfyUI: set COMFYUI_PATH (or unpack it at ~/comfy/ComfyUI).")
            write_tiny_checkpoint("wan21_t2v", work / "wan.safetensors", seed=0)
        write_data(work / "data", args.model, args.size)
        rounds = [[run_setup(args, work, *setup) for setup in SETUPS] for _ in range(args.rounds)]  # alternating
        rows = [combine([measured[index] for measured in rounds]) for index in range(len(SETUPS))]
    model = (f"toy DiT (width {args.width}, {args.depth} blocks)" if args.model == "toy" else "tiny Wan 2.1 (ComfyUI)")
    print(f"{model}, latents 16×{args.size}×{args.size}, LoRA rank 16, {args.steps} steps "
          f"(median of the last {args.steps - args.warmup}), global batch 2, CPU, gloo")
    print(f"{'setup':40s} {'step (s)':>9s} {'rounds (s)':>15s} {'samples/s':>10s} {'comm. share':>12s} {'comm. (s)':>10s}")
    for row in rows:
        spread = f"{row['step_s_range'][0]:.3f}–{row['step_s_range'][1]:.3f}"
        print(f"{row['setup']:40s} {row['median_step_s']:9.4f} {spread:>15s} {row['samples_per_s']:10.2f} "
              f"{row['communication_share']:12.1%} {row['median_communication_s']:10.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
