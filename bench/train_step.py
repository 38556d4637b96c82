"""Benchmark: seconds per training step and peak memory of Train LoRA against core's TrainLoraNode.

Run from the repository root: ``python bench/train_step.py`` (about 4–5 minutes on 2 CPU cores; it
needs ComfyUI at $COMFYUI_PATH or ~/comfy/ComfyUI). Prints a table and exits 0.

Both trainers run inside a real ComfyUI server (``main.py --cpu``) on the same tiny seeded
checkpoint, the same random latents, text embedding, batch size, rank, optimizer (AdamW,
constant learning rate, no gradient clipping), compute precision and gradient checkpointing.

* Time per step: each graph execution is timed for ``N`` and ``2N`` steps, and
  ``(median t(2N) − median t(N)) / N`` cancels the fixed cost of a run (model clone, LoRA set-up,
  saving, the plot). Two clocks: wall time from the server's own ``execution_start`` and
  ``execution_success`` timestamps, and the CPU time of the server process (user + system, from
  ``/proc``), which other programs sharing the cores disturb far less. Two warm-up runs of each
  trainer (not counted) set N so that N steps of the slower one take about ``--target-seconds``.
  Then the trainers alternate — ours N, core N, ours 2N, core 2N — so each measurement follows the
  same kind of run. The loaders, embedding and latents are cached by ComfyUI
  between prompts; each trainer has its own copy of the checkpoint file, so neither sees the
  other's changes to the model. The server runs with ``OMP_NUM_THREADS`` = ``--threads`` (1 by
  default: on two cores, tiny models are dominated by thread contention, and with one thread
  the CPU time is the work itself).
* Peak memory: one fresh server per trainer and configuration, its allocator told to return
  large freed blocks to the kernel (glibc ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB). A first
  prompt loads the model, embedding and latents, a one-step training run pays the one-time costs
  (imports, Train LoRA's copy of the loader's inference-mode weights); then the kernel's peak-RSS
  counter is reset (``/proc/<pid>/clear_refs`` ← 5) and a ``--memory-steps`` training prompt runs
  on larger latents (``--memory-size``), so that training rather than the fixed end-of-run work
  sets the peak (Train LoRA's loss plot alone needs about 14 MiB for a moment). The result is
  ``VmHWM`` after it minus ``VmRSS`` before it: the extra resident memory the run needed. On CPU
  this is process RSS, not a tensor-allocator count, so it includes Python objects and allocator
  overheads; on a GPU one would read the allocator's peak instead.
* Trainable parameters come from the saved LoRA files (core via its Save LoRA Weights node).

What differs between the two, on purpose (each trainer keeps its own method):
core computes an x0-space MSE at one uniform noise level per sample and trains a LoRA on every
weight matrix (Linear, conv, embeddings) plus offsets for every norm weight and every bias; Train
LoRA computes musubi-tuner's flow-matching velocity MSE with its timestep sampling and trains a
LoRA only on the Linear layers inside the transformer blocks (modulation, norms and embeddings
excluded), so it trains far fewer parameters (see the last column). Train LoRA also streams one progress event per step and draws
the loss plot at the end (part of the fixed cost). Core fails on HunyuanVideo in fp32 and without
gradient checkpointing; such cells show the error instead of a number.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from comfy_server import ComfyExecutionError, ComfyServer, Graph, find_comfyui  # noqa: E402
from tiny_checkpoints import ARCHS, write_tiny_checkpoint  # noqa: E402

from musubi.data.text_embeddings import TextEmbedding, save_text_embedding  # noqa: E402

TRAINERS = ("ours", "core")
LABELS = {"ours": "Train LoRA (musubi)", "core": "core TrainLoraNode"}
PRECISIONS = {  # name → (our mixed_precision, core training_dtype)
    "fp32": ("no", "fp32"),
    "bf16": ("bf16", "bf16"),
}
LEARNING_RATE = 1e-4
MAX_STEPS = 200
NATIVE_ARCHS = [name for name, arch in ARCHS.items() if arch.comfy_native]
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}
# Core cannot train HunyuanVideo in fp32, and bf16 on a CPU is slow: these keep the run short.
DEFAULT_CONFIGS = ("wan21_t2v:fp32", "wan21_t2v:bf16", "hunyuan_video:bf16")


@dataclass
class Setup:
    arch: str
    precision: str
    samples: int
    batch_size: int
    rank: int
    size: int
    checkpointing: bool
    steps: int = 0  # N, chosen after the warm-up


@dataclass
class Result:
    wall: dict[int, list[float]] = field(default_factory=dict)  # steps → wall seconds of each run
    cpu: dict[int, list[float]] = field(default_factory=dict)  # steps → CPU seconds of each run
    error: str | None = None
    peak_mib: float | None = None
    parameters: int | None = None


# --- files -------------------------------------------------------------------------------------


def write_inputs(server: ComfyServer, arch: str, samples: int, size: int) -> None:
    """One checkpoint copy per trainer, a text embedding, and random latents for LoadLatent."""
    tiny = ARCHS[arch]
    for trainer in TRAINERS:
        path = server.models_dir("diffusion_models") / f"{arch}_{trainer}.safetensors"
        if not path.exists():
            write_tiny_checkpoint(arch, path, dtype=torch.float32)
    embedding = server.models_dir("text_embeddings") / f"{arch}.safetensors"
    if not embedding.exists():
        generator = torch.Generator().manual_seed(1)
        save_text_embedding(embedding, TextEmbedding(
            context=torch.randn(16, tiny.text_dim, generator=generator),
            pooled=None if tiny.pooled_dim is None else torch.randn(tiny.pooled_dim, generator=generator),
            architecture=tiny.family, extra={}))
    server.input_dir.mkdir(parents=True, exist_ok=True)
    latent = server.input_dir / latent_name(arch, samples, size)
    if not latent.exists():
        side = size // 8
        shape = (samples, tiny.latent_channels, 1, side, side) if tiny.latent_dims == 5 else (samples, tiny.latent_channels, side, side)
        tensors = {"latent_tensor": torch.randn(shape, generator=torch.Generator().manual_seed(2)),
                   "latent_format_version_0": torch.tensor([])}
        safetensors.torch.save_file(tensors, str(latent))


def latent_name(arch: str, samples: int, size: int) -> str:
    return f"bench_{arch}_{samples}x{size}.latent"


# --- graphs ------------------------------------------------------------------------------------


def inputs_graph(setup: Setup, trainer: str) -> tuple[Graph, list, list, list]:
    g = Graph()
    model = g.add("UNETLoader", unet_name=f"{setup.arch}_{trainer}.safetensors", weight_dtype="default")
    positive = g.add("MusubiLoadTextEmbedding", embedding=f"{setup.arch}.safetensors", architecture=ARCHS[setup.arch].family)
    latents = g.add("LoadLatent", latent=latent_name(setup.arch, setup.samples, setup.size))
    return g, model, positive, latents


def training_graph(setup: Setup, trainer: str, steps: int, seed: int, save: bool = False) -> tuple[dict, str]:
    """The API graph and the id of its training node."""
    g, model, positive, latents = inputs_graph(setup, trainer)
    ours_precision, core_dtype = PRECISIONS[setup.precision]
    if trainer == "ours":
        network = g.add("MusubiLoRANetworkSettings", network_dim=setup.rank, network_alpha=float(setup.rank),
                        network_dropout=0.0, rank_dropout=0.0, module_dropout=0.0, loraplus_lr_ratio=0.0,
                        exclude_patterns="", include_patterns="")
        optimizer = g.add("MusubiOptimizerSettings", optimizer_type="AdamW", custom_optimizer="",
                          learning_rate=LEARNING_RATE, optimizer_args="", lr_scheduler="constant", lr_warmup_steps="0",
                          lr_scheduler_num_cycles=1.0, lr_scheduler_power=1.0, lr_scheduler_min_lr_ratio=0.0,
                          lr_scheduler_args="", max_grad_norm=0.0)
        train = g.add("MusubiTrainLoRA", model=model[0], latents=latents[0], conditioning=positive[0], steps=steps,
                      batch_size=setup.batch_size, gradient_accumulation_steps=1, seed=seed,
                      output_name=f"bench_{setup.arch}", resume="no", mixed_precision=ours_precision,
                      gradient_checkpointing=setup.checkpointing, network_settings=network[0],
                      optimizer_settings=optimizer[0])
    else:
        train = g.add("TrainLoraNode", model=model[0], latents=latents[0], positive=positive[0],
                      batch_size=setup.batch_size, grad_accumulation_steps=1, steps=steps,
                      learning_rate=LEARNING_RATE, rank=setup.rank, optimizer="AdamW", loss_function="MSE", seed=seed,
                      training_dtype=core_dtype, lora_dtype="fp32", algorithm="LoRA",
                      gradient_checkpointing=setup.checkpointing, existing_lora="[None]")
        if save:
            g.add("SaveLoRANode", lora=train[1], prefix=f"loras/bench_core_{setup.arch}")
        else:
            g.add("PreviewAny", source=train[3])  # an output node, so the trainer runs
    return g.to_dict(), str(train)


def execution_seconds(server: ComfyServer, graph: dict) -> tuple[float, float, dict]:
    """Run a graph; return the server-side wall time from execution_start to execution_success,
    the CPU time the server process used meanwhile, and the outputs."""
    cpu_before = _cpu_seconds(server.process.pid)
    entry = server.wait(server.queue(graph), timeout=600)
    cpu = _cpu_seconds(server.process.pid) - cpu_before
    status = entry.get("status", {})
    if status.get("status_str") == "error":
        raise ComfyExecutionError(_error_text(status), status)
    stamps = {kind: data.get("timestamp") for kind, data in status.get("messages", [])}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0, cpu, entry.get("outputs", {})


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads included (fields 14 and 15 of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _error_text(status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return str(data.get("exception_message", "")).strip().splitlines()[-1][:120]
    return "failed"


# --- measurements ------------------------------------------------------------------------------


def measure_times(server: ComfyServer, setup: Setup, min_steps: int, target_seconds: float, repeats: int,
                  results: dict[str, Result]) -> None:
    """Warm up, choose N, then time ``repeats`` rounds of N and 2N steps per trainer."""
    seed = 1000
    slowest = 0.0  # seconds per step of the slower trainer, fixed cost included (an overestimate)
    for trainer in TRAINERS:
        try:
            for _ in range(2):  # the first run also pays one-time costs; the second sizes N
                seed += 1
                wall, _, _ = execution_seconds(server, training_graph(setup, trainer, min_steps, seed)[0])
            slowest = max(slowest, wall / min_steps)
        except ComfyExecutionError as error:
            results[trainer].error = str(error)
    setup.steps = max(min_steps, min(MAX_STEPS, round(target_seconds / slowest))) if slowest > 0 else min_steps
    for round_number in range(1, repeats + 1):
        for count in (setup.steps, 2 * setup.steps):
            for trainer in TRAINERS:
                result = results[trainer]
                if result.error:
                    continue
                seed += 1
                try:
                    wall, cpu, _ = execution_seconds(server, training_graph(setup, trainer, count, seed)[0])
                except ComfyExecutionError as error:
                    result.error = str(error)
                    continue
                result.wall.setdefault(count, []).append(wall)
                result.cpu.setdefault(count, []).append(cpu)
        print(f"  {setup.arch} {setup.precision}: N = {setup.steps}, round {round_number}/{repeats} done", flush=True)


def measure_memory(comfy_path: Path, base_dir: Path, setup: Setup, timing_size: int, trainer: str, steps: int,
                   result: Result) -> None:
    # A fixed mmap threshold makes glibc hand large freed blocks back to the kernel, so memory
    # freed by the warm-up run cannot silently cover part of the measured run's peak.
    server = ComfyServer(comfy_path, base_dir)
    saved_env = {key: os.environ.get(key) for key in MALLOC_ENV}
    os.environ.update(MALLOC_ENV)
    try:
        server.start()
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        g, *_ = inputs_graph(setup, trainer)
        for node in ("1", "2", "3"):
            g.add("PreviewAny", source=[node, 0])
        execution_seconds(server, g.to_dict())
        # Warm-up: one step on the small timing latents, so one-time costs (imports, the first
        # weight copy) stay out of the peak.
        warm_up = dataclasses.replace(setup, size=timing_size)
        execution_seconds(server, training_graph(warm_up, trainer, 1, seed=6)[0])
        graph, train = training_graph(setup, trainer, steps, seed=7, save=True)
        pid = server.process.pid
        before = _status_kib(pid, "VmRSS")
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM to the current RSS
        *_, outputs = execution_seconds(server, graph)
        result.peak_mib = (_status_kib(pid, "VmHWM") - before) / 1024
        result.parameters = _trained_parameters(server, setup, trainer, outputs, train)
    except ComfyExecutionError as error:
        result.error = result.error or str(error)
    finally:
        server.stop()


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} missing from /proc/{pid}/status")


def _trained_parameters(server: ComfyServer, setup: Setup, trainer: str, outputs: dict, train: str) -> int:
    if trainer == "ours":
        # the summary's first file line is the saved LoRA (more lines follow: resume states, time)
        path = Path(next(line for line in outputs[train]["text"][0].splitlines() if line.endswith(".safetensors")))
    else:
        path = max((server.output_dir / "loras").glob(f"bench_core_{setup.arch}_*.safetensors"), key=os.path.getmtime)
    tensors = safetensors.torch.load_file(str(path))
    return sum(t.numel() for key, t in tensors.items() if not key.endswith(".alpha"))


# --- report ------------------------------------------------------------------------------------


def per_step(times: dict[int, list[float]], steps: int) -> float | None:
    """Median of t(2N) minus median of t(N), over N: the cost of one more step."""
    short, long = times.get(steps), times.get(2 * steps)
    if not short or not long:
        return None
    return (statistics.median(long) - statistics.median(short)) / steps


def spread(times: dict[int, list[float]], steps: int) -> str:
    """Lowest–highest per-step estimate of the single rounds, to show how stable the median is."""
    pairs = [(b - a) / steps for a, b in zip(times.get(steps, []), times.get(2 * steps, []))]
    return f"{min(pairs) * 1000:.0f}–{max(pairs) * 1000:.0f}" if pairs else "–"


def _ratio(ours: float | None, core: float | None) -> str:
    return f"{ours / core:.2f}" if ours and core and core > 0 else "–"


def print_table(rows: list[tuple[Setup, dict[str, Result]]]) -> None:
    header = (f"{'model':<14} {'prec':<5} {'N':>3} {'trainer':<20} {'wall ms/step':>12} {'(range)':>11} "
              f"{'CPU ms/step':>11} {'(range)':>11} {'peak MiB':>8} {'trained params':>14}")
    print("\n" + header)
    print("-" * len(header))
    notes = []
    for setup, results in rows:
        steps = setup.steps
        for trainer in TRAINERS:
            result = results[trainer]
            wall, cpu = per_step(result.wall, steps), per_step(result.cpu, steps)
            if wall is None:
                print(f"{setup.arch:<14} {setup.precision:<5} {steps:>3} {LABELS[trainer]:<20} fails: {result.error or 'no result'}")
                continue
            if result.error:
                notes.append(f"{setup.arch} {setup.precision} {LABELS[trainer]}: memory run failed: {result.error}")
            peak = f"{result.peak_mib:.0f}" if result.peak_mib is not None else "–"
            params = f"{result.parameters:,}" if result.parameters is not None else "–"
            print(f"{setup.arch:<14} {setup.precision:<5} {steps:>3} {LABELS[trainer]:<20} {wall * 1000:>12.1f} "
                  f"{spread(result.wall, steps):>11} {cpu * 1000:>11.1f} {spread(result.cpu, steps):>11} "
                  f"{peak:>8} {params:>14}")
        ours, core = results["ours"], results["core"]
        print(f"{'':<14} {'':<5} {'':>3} {'ratio ours/core':<20} "
              f"{_ratio(per_step(ours.wall, steps), per_step(core.wall, steps)):>12} {'':>11} "
              f"{_ratio(per_step(ours.cpu, steps), per_step(core.cpu, steps)):>11} {'':>11} "
              f"{_ratio(ours.peak_mib, core.peak_mib):>8}")
    for note in notes:
        print("note: " + note)
    print("\nms/step: (median t(2N) − median t(N)) / N, wall time from the server's own timestamps and "
          "CPU time of the server process (steadier when other programs share the cores); range: the "
          "same from each round alone. peak MiB: extra resident memory of a training prompt in a fresh "
          "server.")


def parse_config(parser: argparse.ArgumentParser, text: str) -> tuple[str, str]:
    arch, _, precision = text.partition(":")
    if arch not in NATIVE_ARCHS or precision not in PRECISIONS:
        parser.error(f"--configs {text!r}: write ARCH:PRECISION with ARCH in {', '.join(NATIVE_ARCHS)} "
                     f"and PRECISION in {', '.join(PRECISIONS)}, e.g. wan21_t2v:fp32.")
    return arch, precision


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), metavar="ARCH:PRECISION",
                        help=f"model and precision pairs (default: {' '.join(DEFAULT_CONFIGS)}); models: "
                             f"{', '.join(NATIVE_ARCHS)}; precisions: {', '.join(PRECISIONS)}")
    parser.add_argument("--min-steps", type=int, default=4, help="smallest N; runs of N and 2N steps are timed (default 4)")
    parser.add_argument("--target-seconds", type=float, default=3.0,
                        help="N is chosen so that N steps of the slower trainer take about this long (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (default 3)")
    parser.add_argument("--samples", type=int, default=4, help="training latents (default 4)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels; latents are size/8 (default 128)")
    parser.add_argument("--no-checkpointing", action="store_true", help="train without gradient checkpointing")
    parser.add_argument("--memory-size", type=int, default=512,
                        help="image side of the peak-memory runs (default 512: larger than --size, so training, "
                             "not the fixed end-of-run work, sets the peak)")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps of the measured peak-memory run (default 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory servers")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the servers (default 1)")
    args = parser.parse_args(argv)
    configs = [parse_config(parser, text) for text in args.configs]

    comfy_path = find_comfyui()
    if comfy_path is None:
        print("ComfyUI not found: set COMFYUI_PATH or unpack it at ~/comfy/ComfyUI.")
        return 0
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the servers
    os.environ["MKL_NUM_THREADS"] = str(args.threads)
    started = time.monotonic()
    setups = [Setup(arch, precision, args.samples, args.batch_size, args.rank, args.size, not args.no_checkpointing)
              for arch, precision in configs]
    rows = [(setup, {trainer: Result() for trainer in TRAINERS}) for setup in setups]
    with tempfile.TemporaryDirectory(prefix="musubi-bench-") as base:
        base_dir = Path(base)
        server = ComfyServer(comfy_path, base_dir)
        for arch in dict.fromkeys(arch for arch, _ in configs):
            write_inputs(server, arch, args.samples, args.size)
            write_inputs(server, arch, args.samples, args.memory_size)
        print(f"timing in one server ({args.threads} thread(s)), {args.repeats} rounds after a warm-up…", flush=True)
        server.start()
        try:
            for setup, results in rows:
                measure_times(server, setup, args.min_steps, args.target_seconds, args.repeats, results)
        finally:
            server.stop()
        timed = time.monotonic()
        print(f"timing took {timed - started:.0f} s", flush=True)
        if not args.no_memory:
            print("peak memory, one fresh server per trainer and configuration…", flush=True)
            for setup, results in rows:
                for trainer in TRAINERS:
                    if results[trainer].error:  # it cannot train this configuration
                        continue
                    measure_memory(comfy_path, base_dir, dataclasses.replace(setup, size=args.memory_size), args.size, trainer,
                                   args.memory_steps, results[trainer])
    print(f"\ntiny checkpoints, {args.samples} latents of {args.size}×{args.size} px "
          f"({args.memory_size}×{args.memory_size} px and {args.memory_steps} steps for peak memory), batch {args.batch_size}, "
          f"rank {args.rank}, AdamW lr {LEARNING_RATE:g} constant, gradient checkpointing "
          f"{'off' if args.no_checkpointing else 'on'}, LoRA weights fp32, {args.threads} thread(s), "
          f"{args.repeats} rounds; took {time.monotonic() - started:.0f} s")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
