"""What gradient checkpointing costs per training step, next to what recomputing the forward costs.

Checkpointing saves no block activations in the forward pass and recomputes each block in the
backward pass, so its fair price is about one more forward pass of the blocks. This bench times,
alternating and in one process, Train LoRA's own model adapter on a Wan 2.1 layout (ComfyUI's
model code, the pack's LoRA network): a forward pass without gradients, a training step (forward
+ backward) without checkpointing, and one with it. It prints medians with min–max and the two
ratios to compare: (checkpointed − plain) / plain and forward / plain.

Run: ``python bench/checkpointing.py [--dim 128] [--blocks 2] [--frames 1] [--side 16]`` (needs
ComfyUI at $COMFYUI_PATH or ~/comfy/ComfyUI). The defaults are the tiny Wan of the tests, where
fixed costs per block weigh most; ``--dim 512 --blocks 4 --frames 4 --side 32`` is closer to
how the costs split on a real model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_inprocess import comfyui_path, import_comfyui, pack_module


def import_pack():
    """ComfyUI's model code and this pack's adapters, imported in this process (no server)."""
    import_comfyui(comfyui_path("bench/checkpointing.py"))
    return (pack_module("musubi_nodes.adapters.comfy_model"), pack_module("musubi_nodes.adapters.training_data"),
            pack_module("musubi.lora.network"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=128, help="model width, a multiple of 128 (default 128)")
    parser.add_argument("--blocks", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--frames", type=int, default=1, help="latent frames (default 1: an image)")
    parser.add_argument("--side", type=int, default=16, help="latent side (default 16: 128 px)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds after two warm-up rounds")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    comfy_model, training_data, lora_network = import_pack()
    import comfy.sd
    import tiny_checkpoints

    tiny_checkpoints.WAN_TINY.update(dim=args.dim, ffn_dim=args.dim * 4, num_layers=args.blocks)
    state = tiny_checkpoints.tiny_state_dict("wan21_t2v", dtype=torch.float32)
    with torch.inference_mode(False):
        model = comfy.sd.load_diffusion_model_state_dict(state)
        generator = torch.Generator().manual_seed(0)
        latents = {"samples": torch.randn(args.batch, 16, args.frames, args.side, args.side, generator=generator)}
        data = training_data.GraphTrainingData(latents, [[torch.randn(1, 64, 4096, generator=generator), {}]])
        adapter = comfy_model.ComfyModelAdapter.prepare(model, data)
        lora_network.LoRANetwork(adapter.lora_root(), "wan", network_dim=16, network_alpha=16)
        items = training_data.TrainingItems(data, model.model.process_latent_in, "wan")
        noisy = torch.stack([items[index]["latents"] for index in range(args.batch)])
        batch = {"index": torch.arange(args.batch)}
        levels = torch.linspace(0.2, 0.8, args.batch)

        def forward() -> None:
            adapter.set_gradient_checkpointing(False)
            with torch.no_grad():
                adapter.predict_velocity(noisy, levels, batch)

        def step(checkpointing: bool) -> None:
            adapter.set_gradient_checkpointing(checkpointing)
            adapter.predict_velocity(noisy, levels, batch).float().square().mean().backward()

        jobs = {"forward": forward, "plain step": lambda: step(False), "checkpointed step": lambda: step(True)}
        times: dict[str, list[float]] = {name: [] for name in jobs}
        for round_index in range(args.repeats + 2):
            for name, job in jobs.items():  # alternating, so a slow spell hits every job alike
                start = time.perf_counter()
                job()
                if round_index >= 2:
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    tokens = args.frames * (args.side // 2) ** 2
    print(f"Wan 2.1 layout, width {args.dim}, {args.blocks} blocks, batch {args.batch} × {tokens} tokens, LoRA rank 16, "
          f"{args.threads} thread(s), {args.repeats} rounds")
    for name, values in times.items():
        print(f"  {name:<18} {medians[name] * 1000:8.1f} ms  ({min(values) * 1000:.1f}–{max(values) * 1000:.1f})")
    extra = medians["checkpointed step"] / medians["plain step"] - 1
    recompute = medians["forward"] / medians["plain step"]
    print(f"checkpointing adds {extra:.0%} to a step; a forward pass is {recompute:.0%} of a step "
          "(the recompute it replaces memory with)")


if __name__ == "__main__":
    main()
