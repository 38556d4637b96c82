"""Peak memory and time of ``musubi quantize`` on a real-size checkpoint, beside a plain load-and-save.

Builds (once, into bench/.cache/) a bf16 checkpoint with Wan 2.1's key layout and real widths
(dim 1536, ffn 8960; ``--blocks`` transformer blocks, 14 by default: about 1.3 GiB), then runs,
each in a fresh process and alternating, ``--repeats`` times:

* ``stream``: ``quantize_file`` as ``python -m musubi quantize`` runs it (read a tensor, quantize
  it, write it, next);
* ``in_memory``: ``quantize_checkpoint`` (what Load DiT (fp8 scaled) holds as its model) written
  with safetensors' own ``save_file``, for comparison;
* ``load_save``: safetensors ``load_file`` + ``save_file`` of the same file, nothing computed —
  the I/O floor a quantizer is measured against;
* ``load_save_synced``: the same, then fsync — the copy made as durable as the quantizer's
  atomic writer makes its output (which is flushed to disk before it replaces the old file).

Each process reports its peak resident memory (VmHWM) above what importing the library costs
(VmRSS right after the imports), and its wall time for the job alone. Printed: medians with
min–max per job, and the ratios docs/fp8.md quotes (peak / input size; stream time / load_save
time, unsynced and synced). Run: ``python bench/quantize_memory.py [--blocks 14] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO_ROOT, "bench", ".cache")
DIM, FFN, TEXT, FREQ = 1536, 8960, 4096, 256


def wan_layout(blocks: int) -> list[tuple[str, tuple[int, ...]]]:
    """Wan 2.1 T2V key names and shapes at real width (blocks as asked)."""
    entries = [("patch_embedding.weight", (DIM, 16, 1, 2, 2)), ("patch_embedding.bias", (DIM,)),
               ("text_embedding.0.weight", (DIM, TEXT)), ("text_embedding.0.bias", (DIM,)),
               ("text_embedding.2.weight", (DIM, DIM)), ("text_embedding.2.bias", (DIM,)),
               ("time_embedding.0.weight", (DIM, FREQ)), ("time_embedding.0.bias", (DIM,)),
               ("time_embedding.2.weight", (DIM, DIM)), ("time_embedding.2.bias", (DIM,)),
               ("time_projection.1.weight", (DIM * 6, DIM)), ("time_projection.1.bias", (DIM * 6,))]
    for block in range(blocks):
        prefix = f"blocks.{block}."
        for attention in ("self_attn", "cross_attn"):
            for name in ("q", "k", "v", "o"):
                entries += [(f"{prefix}{attention}.{name}.weight", (DIM, DIM)), (f"{prefix}{attention}.{name}.bias", (DIM,))]
            entries += [(f"{prefix}{attention}.norm_q.weight", (DIM,)), (f"{prefix}{attention}.norm_k.weight", (DIM,))]
        entries += [(f"{prefix}norm3.weight", (DIM,)), (f"{prefix}norm3.bias", (DIM,)),
                    (f"{prefix}ffn.0.weight", (FFN, DIM)), (f"{prefix}ffn.0.bias", (FFN,)),
                    (f"{prefix}ffn.2.weight", (DIM, FFN)), (f"{prefix}ffn.2.bias", (DIM,)),
                    (f"{prefix}modulation", (1, 6, DIM))]
    entries += [("head.head.weight", (64, DIM)), ("head.head.bias", (64,)), ("head.modulation", (1, 2, DIM))]
    return entries


def make_checkpoint(blocks: int) -> str:
    """The bf16 checkpoint, written tensor by tensor (so making it needs no more memory than using it)."""
    import torch

    from musubi.files import stream_save_file

    path = os.path.join(CACHE, f"wan_layout_{blocks}blocks_bf16.safetensors")
    if os.path.exists(path):
        return path
    os.makedirs(CACHE, exist_ok=True)
    layout = wan_layout(blocks)
    generator = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape in layout:
            yield name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    stream_save_file(path, [(name, "BF16", shape) for name, shape in layout], tensors())
    return path


JOB = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
from safetensors.torch import load_file, save_file
from musubi import files, fp8

def rss(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024

baseline = rss("VmRSS:")
start = time.perf_counter()
job, source, target = {job!r}, {source!r}, {target!r}
if job == "stream":
    fp8.quantize_file(source, target)
elif job == "in_memory":
    state, metadata, _ = fp8.quantize_checkpoint(source)
    save_file(state, target, metadata)
else:
    save_file(load_file(source), target)
    if job == "load_save_synced":
        with open(target, "rb+") as written:
            os.fsync(written.fileno())
seconds = time.perf_counter() - start
print(json.dumps({{"peak": rss("VmHWM:") - baseline, "seconds": seconds}}))
"""


def run_job(job: str, source: str, threads: int) -> dict:
    target = os.path.join(CACHE, f"out_{job}.safetensors")
    code = JOB.format(root=REPO_ROOT, job=job, source=source, target=target, threads=threads)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    os.remove(target)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=14)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: every core)")
    args = parser.parse_args()
    sys.path.insert(0, REPO_ROOT)
    source = make_checkpoint(args.blocks)
    size = os.path.getsize(source)
    jobs = ("stream", "in_memory", "load_save", "load_save_synced")
    runs: dict[str, list[dict]] = {job: [] for job in jobs}
    for _ in range(args.repeats):
        for job in jobs:  # alternating, so a slow spell of a shared machine hits every job alike
            runs[job].append(run_job(job, source, args.threads))
    print(f"input: {size / 2**30:.2f} GiB bf16 ({args.blocks} Wan-width blocks), {args.repeats} runs per job, {args.threads} torch thread(s)")
    print(f"{'job':<16} {'peak above imports':>24} {'peak / input':>16} {'seconds':>22}")
    medians = {}
    for job in jobs:
        peaks = [run["peak"] for run in runs[job]]
        seconds = [run["seconds"] for run in runs[job]]
        medians[job] = (statistics.median(peaks), statistics.median(seconds))
        print(f"{job:<16} {medians[job][0] / 2**20:>10.0f} MiB ({min(peaks) / 2**20:.0f}–{max(peaks) / 2**20:.0f})"
              f" {medians[job][0] / size:>14.3f}x {medians[job][1]:>8.2f} s ({min(seconds):.2f}–{max(seconds):.2f})")
    print(f"stream time / load_save time: {medians['stream'][1] / medians['load_save'][1]:.2f}x "
          f"(synced: {medians['stream'][1] / medians['load_save_synced'][1]:.2f}x); "
          f"stream peak / input: {medians['stream'][0] / size:.3f}x; "
          f"in_memory peak / input: {medians['in_memory'][0] / size:.3f}x")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"(bench took {time.perf_counter() - started:.0f} s)")
