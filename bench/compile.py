"""Benchmark: eager against regionally compiled (torch.compile per block) steps, side by side.

Run from the repository root: ``python bench/compile.py`` (one to two minutes on 2 CPU cores, most
of it compiling). Prints a table and exits 0.

The model is the library's toy DiT (pre-norm MLP blocks with modulation) made wider and deeper,
with a rank-16 LoRA attached by forward hooks, as in training. Two kinds of step are timed:

* training: forward, the flow-matching loss, backward into the LoRA weights;
* sampling: a forward pass without gradients.

The compiled model is the same module with its blocks compiled in place (:mod:`musubi.compile`).
Its first call of each kind compiles; that call's time minus the eager median is reported as the
one-off compile time. Then eager and compiled steps alternate ``--repeats`` times on the same
inputs and the medians are compared, so both see the same machine load. The compiled outputs
are checked against eager before timing.

On CPU the gain may be small, or even a loss for tiny widths: inductor's CPU code fuses the
elementwise work (norms, modulation, activations, the LoRA's scaling) around the matrix products,
which stay library calls, and there are no kernel launches to save. The large gains people report
are on GPUs, where fusion saves memory traffic and launches; measure there with ``--device cuda``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from musubi.compile import CompileSettings, compile_regions  # noqa: E402
from musubi.lora.network import LoRANetwork  # noqa: E402
from musubi.lora.presets import get_preset  # noqa: E402
from musubi.training.adapter import ToyAdapter  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--mode", default=None, help="inductor mode (default, reduce-overhead, max-autotune)")
    parser.add_argument("--width", type=int, default=256, help="hidden width of the blocks")
    parser.add_argument("--depth", type=int, default=6, help="number of blocks")
    parser.add_argument("--size", type=int, default=24, help="latent height and width (tokens = size²)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15, help="timed steps of each kind and model")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep inductor's disk cache (default: an empty one, so the compile time is a cold compile)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if not args.warm_cache:
        with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            return measure(args)
    return measure(args)


def measure(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    adapter = ToyAdapter(latent_channels=16, context_dim=64, width=args.width, depth=args.depth, seed=0)
    adapter.to_device(device)
    torch.manual_seed(0)
    network = LoRANetwork(adapter.lora_root(), "generic", network_dim=16, network_alpha=16.0).to(device)
    with torch.no_grad():
        for module in network.lora_modules:
            module.lora_up.weight.normal_(std=0.02)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 16, args.size, args.size, generator=generator).to(device)
    t = torch.rand(args.batch, generator=generator).to(device)
    batch = {"context": torch.randn(args.batch, 12, 64, generator=generator).to(device)}
    target = torch.randn(x.shape, generator=generator).to(device)

    def train_step() -> torch.Tensor:
        network.zero_grad(set_to_none=True)
        loss = (adapter.predict_velocity(x, t, batch).float() - target).square().mean()
        loss.backward()
        return loss.detach()

    def sample_step() -> torch.Tensor:
        with torch.no_grad():
            return adapter.predict_velocity(x, t, batch)

    def timed(step) -> tuple[float, torch.Tensor]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, result

    settings = CompileSettings(args.backend, args.mode)
    regions = compile_regions([adapter.lora_root()], get_preset("generic").is_target_block, settings, where="bench")
    print(f"toy DiT: width {args.width}, {args.depth} blocks, {args.size * args.size} tokens, batch {args.batch}, "
          f"LoRA rank 16 on {len(network.lora_modules)} layers; device {device}, {torch.get_num_threads()} threads; "
          f"backend {settings.describe()}, {len(regions.modules)} blocks compiled one by one")

    rows = []
    for name, step in (("training", train_step), ("sampling", sample_step)):
        for _ in range(2):  # warm-up of the eager path
            eager_reference = timed(step)[1]
        regions.install()
        first, compiled_result = timed(step)
        regions.remove()
        if regions.failure:
            print(f"compiling failed ({regions.failure}); nothing to compare.")
            return 0
        difference = (compiled_result.float() - eager_reference.float()).abs().max().item()
        eager_times, compiled_times = [], []
        for _ in range(args.repeats):
            eager_times.append(timed(step)[0])
            with regions:
                compiled_times.append(timed(step)[0])
        rows.append((name, eager_times, compiled_times, first - statistics.median(eager_times), difference))

    print()
    print(f"{'step':<10}{'eager ms (min–max)':>24}{'compiled ms (min–max)':>24}{'speed-up (range)':>20}"
          f"{'compile s (once)':>18}{'max |diff|':>12}")
    for name, eager_times, compiled_times, compile_time, difference in rows:
        speed_ups = [eager / compiled for eager, compiled in zip(eager_times, compiled_times)]
        print(f"{name:<10}{spread(eager_times, 1e3):>24}{spread(compiled_times, 1e3):>24}"
              f"{statistics.median(eager_times) / statistics.median(compiled_times):>8.2f}× "
              f"({min(speed_ups):.2f}–{max(speed_ups):.2f}){compile_time:>12.1f}{difference:>12.2e}")
    print()
    print(f"medians of {args.repeats} alternating steps with their min–max; speed-up = median eager / median compiled "
          "time, its range from each alternating pair. Compile time: the first compiled step over an eager one, with "
          f"{'the inductor cache as found' if args.warm_cache else 'an empty inductor cache (cold compile)'}. On CPU "
          "the gain may be small or negative; compiling pays off on GPUs and on long runs that amortise the compile time.")
    return 0


def spread(values: list[float], unit: float) -> str:
    return f"{statistics.median(values) * unit:.2f} ({min(values) * unit:.2f}–{max(values) * unit:.2f})"


if __name__ == "__main__":
    sys.exit(main())
