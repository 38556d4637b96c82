"""Real-size Wan 2.1 T2V 1.3B on this machine's CPU: load peak, training peak and step time, fp32
against fp8 scaled, Train LoRA against core's TrainLoraNode.

Run from the repository root: ``python bench/real_size.py`` (needs ComfyUI at $COMFYUI_PATH or
~/comfy/ComfyUI with its requirements; about 9 GiB of RAM and 5 minutes on 2 cores, plus about
half a minute once to write the checkpoint). Not part of the tests, which run ``--smoke`` (the
tests' tiny Wan: the code path only, no measurement).

The checkpoint is Wan 2.1 T2V 1.3B at its real size and key layout (dim 1536, 30 blocks, ffn 8960,
text width 4096), seeded random bf16 weights (2.6 GiB), written once into ``bench/.cache/real_size/``
(tests/tiny_checkpoints.py at full width; nothing is downloaded). Each case runs in a fresh
process with ComfyUI's own code and the very node classes a graph would run (ComfyUI started as
``--cpu --use-pytorch-cross-attention``, plus ``--bf16-unet`` for core's loader in bf16 cases).

Cases: the model loaded by core's *Load Diffusion Model* (fp32, ComfyUI's CPU default, or bf16) or
by this pack's *Load DiT (fp8 scaled)* (E4M3, block 64, computing in fp32 or bf16), then either
KSampler steps at cfg 1 (one forward pass each) or training with gradient checkpointing (rank 16,
AdamW 1e-4, batch 1, two latents of one 128×128 frame: 64 tokens, 64 text tokens; bf16 cases
train in bf16 mixed precision). The bf16 cases are left out unless named in ``--cases``: on a CPU
without bf16 instructions a bf16 training step takes minutes. Per case: the process's peak
resident memory above what importing costs (VmHWM − VmRSS after the imports) while loading, and
during the sampling or training after it (the peak is reset in between through
``/proc/self/clear_refs``), and the seconds of each step after the first ``--skip`` (median and
min–max; training: optimizer step to optimizer step, sampling: sampler step to sampler step).

``--allocator returning`` runs the cases with glibc told to return large freed blocks at once
(``MALLOC_MMAP_THRESHOLD_=65536``, ``MALLOC_TRIM_THRESHOLD_=131072``, as bench/train_step.py
measures memory): peaks are then the memory in use, where the default heap keeps freed memory
that counts as a trainer's own; steps are slower, since every large temporary is a fresh mapping.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CACHE_BASE = BENCH / ".cache" / "real_size"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}
GIB = 1024**3
# case → (loader, precision, job, trainer). Precision: of the weights for core's loader (fp32 is
# ComfyUI's CPU default, bf16 as started with --bf16-unet), of the compute for Load DiT (fp8
# scaled), whose weights stay fp8; training runs in that precision (mixed bf16 or plain fp32).
CASES = {
    "sample fp32": ("core", "fp32", "sample", None),
    "sample fp8>fp32": ("fp8", "fp32", "sample", None),
    "sample bf16": ("core", "bf16", "sample", None),
    "sample fp8>bf16": ("fp8", "bf16", "sample", None),
    "train core fp32": ("core", "fp32", "train", "core"),
    "train ours fp32": ("core", "fp32", "train", "ours"),
    "train ours fp8>fp32": ("fp8", "fp32", "train", "ours"),
    "train core bf16": ("core", "bf16", "train", "core"),
    "train ours bf16": ("core", "bf16", "train", "ours"),
    "train ours fp8>bf16": ("fp8", "bf16", "train", "ours"),
}


def memory(field: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> bool:
    """Start VmHWM afresh from the current resident size (Linux ≥ 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def run_case(name: str, options: argparse.Namespace) -> dict:
    """One case in this process (the child side): prints nothing but the JSON result."""
    import logging

    import torch

    sys.path.insert(0, str(BENCH))
    import comfy_inprocess
    import gpu_check

    loader, precision, job, trainer = CASES[name]
    torch.set_num_threads(options.threads)
    logging.getLogger().setLevel(logging.WARNING)
    comfy_path = comfy_inprocess.comfyui_path("bench/real_size.py")
    comfy_inprocess.import_comfyui(comfy_path, base_directory=str(options.base), pytorch_attention=True)
    from comfy.cli_args import args

    args.bf16_unet = loader == "core" and precision == "bf16"  # else ComfyUI's CPU default: fp32
    env = gpu_check.load_modules(cuda=False)
    plan = plan_for(options, gpu_check)
    runner = gpu_check.Runner(env, plan, gpu_check.Inputs.make(plan), budget=float("inf"))
    baseline = memory("VmRSS")
    started = time.perf_counter()
    if loader == "core":
        model = env.core_nodes.UNETLoader().load_unet(checkpoint_path(options).name, "default")[0]
    else:
        model = env.fp8.MusubiLoadDiTFP8Scaled.execute(checkpoint_path(options).name, "e4m3fn", "block", 64, precision,
                                                        "auto").args[0]
    load_seconds = time.perf_counter() - started
    load_peak = memory("VmHWM") - baseline
    diffusion_model = model.model.diffusion_model
    model_bytes = sum(t.numel() * t.element_size() for t in [*diffusion_model.parameters(), *diffusion_model.buffers()])
    loaded = memory("VmRSS") - baseline
    peak_was_reset = reset_peak()
    if job == "sample":
        result = gpu_check.Measured()
        runner.guarded("sampling", lambda r: runner.sample_steps(model, r), result)
    else:
        result = runner.train(trainer, model, checkpointing=True, precision=precision)
    if result.error:
        raise SystemExit(f"{name}: {result.error}")
    return {"case": name, "load_seconds": load_seconds, "load_peak": load_peak, "model_bytes": model_bytes,
            "loaded": loaded, "phase_peak": memory("VmHWM") - baseline, "peak_was_reset": peak_was_reset,
            "seconds": result.seconds, "weight_dtypes": sorted({str(p.dtype) for p in diffusion_model.parameters()})}


def plan_for(options: argparse.Namespace, gpu_check):
    return gpu_check.Plan(
        smoke=options.smoke, wan=wan_sizes(options, gpu_check), width=options.size, height=options.size, text_tokens=options.text_tokens,
        train_latents=2, train_steps=options.steps + options.skip, train_skip=options.skip,
        sample_steps=options.steps + options.skip, sample_runs=1, sample_skip=options.skip, magcache_steps=0,
        magcache_cfg=1.0, magcache_runs=0, train_backend="EAGER", sample_backend="eager")


def checkpoint_path(options: argparse.Namespace) -> Path:
    name = "smoke_wan21_t2v_tiny_bf16" if options.smoke else "real_size_wan21_t2v_1.3B_bf16"
    return Path(options.base) / "models" / "diffusion_models" / f"{name}.safetensors"


def wan_sizes(options: argparse.Namespace, gpu_check) -> dict:
    """Overrides of tests/tiny_checkpoints.py's tiny Wan: the real 1.3B widths, or none (smoke)."""
    return {} if options.smoke else gpu_check.WAN_1_3B


def write_checkpoint(options: argparse.Namespace) -> Path:
    """The real-size checkpoint, written once (rewritten when the one there has other shapes)."""
    import torch

    sys.path.insert(0, str(BENCH))
    sys.path.insert(0, str(BENCH.parent))
    import comfy_inprocess
    import gpu_check

    from musubi.errors import MusubiError
    from musubi.files import read_header

    comfy_inprocess.comfyui_path("bench/real_size.py")  # puts tests/ on sys.path
    import tiny_checkpoints

    path = checkpoint_path(options)
    tiny_checkpoints.WAN_TINY.update(wan_sizes(options, gpu_check))
    sizes = tiny_checkpoints.WAN_TINY
    last_ffn = f"blocks.{sizes['num_layers'] - 1}.ffn.0.weight"
    try:
        if read_header(str(path))[0][last_ffn] == ("BF16", (sizes["ffn_dim"], sizes["dim"])):
            return path
    except (MusubiError, KeyError):
        pass
    return tiny_checkpoints.write_tiny_checkpoint("wan21_t2v", path, dtype=torch.bfloat16)


def spawn(arguments: list[str], allocator: str) -> dict:
    environment = {**os.environ, **(MALLOC_ENV if allocator == "returning" else {})}
    completed = subprocess.run([sys.executable, str(Path(__file__).resolve()), *arguments], env=environment,
                               capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(arguments)} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def size(count: float) -> str:
    """Bytes in GiB, or MiB below a GiB (the smoke run's tiny model)."""
    return f"{count / GIB:.2f} GiB" if abs(count) >= GIB else f"{count / 2**20:.1f} MiB"


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}–{max(values):.2f})"


def report(results: dict[str, dict], options: argparse.Namespace) -> None:
    print(f"Wan 2.1 T2V 1.3B, real size, seeded random weights; {options.threads} torch thread(s); one {options.size}×"
          f"{options.size} frame ({(options.size // 16) ** 2} tokens), {options.text_tokens} text tokens; "
          f"{options.steps} steps kept after {options.skip}; allocator: "
          f"{' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items()) if options.allocator == 'returning' else 'glibc default'}")
    print(f"{'case':<20} {'weights':>10} {'load peak':>10} {'load s':>7} {'run peak':>10} {'above model':>12}  "
          f"s/step median (min–max)")
    for name, result in results.items():
        print(f"{name:<20} {size(result['model_bytes']):>10} {size(result['load_peak']):>10} "
              f"{result['load_seconds']:>7.1f} {size(result['phase_peak']):>10} "
              f"{size(result['phase_peak'] - result['loaded']):>12}  {spread(result['seconds'])}")

    def ratio(a: str, b: str, what: str = "time") -> str:
        if a not in results or b not in results:
            return "–"
        if what == "time":
            return f"{statistics.median(results[a]['seconds']) / statistics.median(results[b]['seconds']):.2f}×"
        return f"{results[a][what] / results[b][what]:.2f}×"

    print()
    print(f"fp8 scaled weights / fp32 weights: {ratio('sample fp8>fp32', 'sample fp32', 'model_bytes')}, "
          f"/ bf16 weights: {ratio('sample fp8>bf16', 'sample bf16', 'model_bytes')}")
    for compute in ("fp32", "bf16"):
        print(f"{compute} compute — fp8 scaled / {compute} weights, time per step: sampling "
              f"{ratio(f'sample fp8>{compute}', f'sample {compute}')}, training "
              f"{ratio(f'train ours fp8>{compute}', f'train ours {compute}')}; training peak "
              f"{ratio(f'train ours fp8>{compute}', f'train ours {compute}', 'phase_peak')}")
        print(f"{compute} — Train LoRA / core TrainLoraNode: time per step "
              f"{ratio(f'train ours {compute}', f'train core {compute}')}, peak "
              f"{ratio(f'train ours {compute}', f'train core {compute}', 'phase_peak')}")
    print(f"bf16 / fp32 time per step on this CPU: sampling {ratio('sample bf16', 'sample fp32')}, training "
          f"{ratio('train ours bf16', 'train ours fp32')}")
    for name in ("train ours fp8>fp32", "train ours fp8>bf16"):
        if name in results:
            result = results[name]
            verdict = "below" if result["load_peak"] < result["phase_peak"] else "NOT below"
            print(f"{name}: Load DiT (fp8 scaled) peaks at {size(result['load_peak'])} while loading, "
                  f"{verdict} the training peak {size(result['phase_peak'])}")
    if not all(result["peak_was_reset"] for result in results.values()):
        print("(this system refused to reset the peak: run peaks include the load)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per case (default 4)")
    parser.add_argument("--skip", type=int, default=2, help="first steps dropped (set-up, warm-up; default 2)")
    parser.add_argument("--size", type=int, default=128, help="frame side in pixels, a multiple of 16 (default 128)")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: every core)")
    parser.add_argument("--allocator", choices=("default", "returning"), default="default",
                        help="glibc's default heap (what ComfyUI runs with), or large freed blocks returned to the "
                             "system at once (MALLOC_MMAP_THRESHOLD_=65536, as bench/train_step.py measures memory)")
    parser.add_argument("--cases", nargs="+", default=[name for name in CASES if "bf16" not in name],
                        choices=list(CASES), metavar="CASE",
                        help="default: the fp32 ones; bf16 cases are slow on CPUs without bf16 instructions "
                             f"(choices: {', '.join(repr(name) for name in CASES)})")
    parser.add_argument("--base", default=str(CACHE_BASE),
                        help="ComfyUI base folder of the runs, where the checkpoint is kept (default bench/.cache/real_size)")
    parser.add_argument("--smoke", action="store_true",
                        help="the tests' tiny Wan instead of the real size: checks the code path in seconds")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # the child side
    parser.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if not os.path.exists("/proc/self/status"):
        raise SystemExit("bench/real_size.py reads peak memory from /proc/self/status, which only Linux has.")
    if options.write:
        print(json.dumps({"path": str(write_checkpoint(options))}))
        return
    if options.case:
        print(json.dumps(run_case(options.case, options)))
        return
    started = time.perf_counter()
    if options.smoke:
        print("--smoke: the tests' tiny Wan, the code path only; the numbers are not measurements.", flush=True)
    elif not checkpoint_path(options).is_file():
        print("writing the real-size checkpoint once (about a minute)…", file=sys.stderr, flush=True)
    shared = ["--steps", str(options.steps), "--skip", str(options.skip), "--size", str(options.size),
              "--text-tokens", str(options.text_tokens), "--threads", str(options.threads), "--base", str(options.base),
              *(["--smoke"] if options.smoke else [])]
    spawn(["--write", *shared], "default")
    results = {}
    for name in options.cases:
        print(f"[{time.perf_counter() - started:4.0f} s] {name}…", file=sys.stderr, flush=True)
        results[name] = spawn(["--case", name, *shared], options.allocator)
    report(results, options)
    print(f"(bench took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
