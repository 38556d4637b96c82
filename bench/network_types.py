"""Trainable parameters and file size of LoRA, LoHa and LoKr at the same rank, side by side.

For every tiny architecture of the tests (the real module names and layer kinds, widths shrunk
to what a CPU loads in seconds; Flux and Qwen-Image keep their real 3072 width, which their
detection fixes) it builds the model as ComfyUI loads it (FramePack as diffusers' tree, which
the pack wraps), puts each network type on the layers the architecture's preset selects, counts
the trainable parameters and writes the file Train LoRA would write (ComfyUI layout, metadata
included) to measure its size. LoKr also reports how many layers keep a full W2 (its rank is at
least half of W2's larger side: more parameters than the rank suggests, scale 1).

Run: ``python bench/network_types.py [--rank 16] [--alpha 8] [--factor -1] [--dtype bfloat16]
[--archs wan21_t2v,hunyuan_video]`` (needs ComfyUI at $COMFYUI_PATH or ~/comfy/ComfyUI; about a
minute on 2 CPU cores, most of it building the two 400 M-parameter models).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from comfy_server import find_comfyui  # noqa: E402
from musubi.lora.formats import save_lora  # noqa: E402
from musubi.lora.network import create_network  # noqa: E402
from tiny_checkpoints import ARCHITECTURES, ARCHS, build_framepack_model, framepack_config, tiny_state_dict  # noqa: E402

TYPES = ("lora", "loha", "lokr")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_comfyui():
    """ComfyUI's model loading, in this process (no server)."""
    comfyui = find_comfyui()
    if comfyui is None:
        raise SystemExit("bench/network_types.py needs ComfyUI: set COMFYUI_PATH to a ComfyUI v0.3.64+ checkout.")
    sys.path.insert(0, str(comfyui))
    from comfy.cli_args import args

    args.cpu = args.cpu or not torch.cuda.is_available()
    import comfy.sd

    return comfy.sd


def model_tree(arch: str, comfy_sd) -> torch.nn.Module:
    """The module tree Train LoRA attaches to: ComfyUI's diffusion model, or FramePack's diffusers transformer."""
    if arch == "framepack":
        return build_framepack_model(framepack_config())
    patcher = comfy_sd.load_diffusion_model_state_dict(tiny_state_dict(arch))
    return patcher.model.diffusion_model


def measure(tree: torch.nn.Module, family: str, network_type: str, args, folder: str) -> dict:
    options = {"factor": args.factor} if network_type == "lokr" else {}
    network = create_network(network_type, tree, family, network_dim=args.rank, network_alpha=args.alpha, **options)
    try:
        path = os.path.join(folder, f"{network_type}.safetensors")
        save_lora(network, path, dtype=DTYPES[args.dtype])
        return {
            "layers": len(network.module_names()),
            "params": network.trainable_parameter_count(),
            "bytes": os.path.getsize(path),
            "full_w2": len(network.full_w2_modules()) if network_type == "lokr" else 0,
        }
    finally:
        network.remove()


class WanAttentionBlock(torch.nn.Module):
    """The trained layers of one Wan 2.1 block (ComfyUI's names), at any width; no weights."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        for attention in ("self_attn", "cross_attn"):
            holder = torch.nn.Module()
            for name in ("q", "k", "v", "o"):
                setattr(holder, name, torch.nn.Linear(dim, dim, bias=False, device="meta"))
            setattr(self, attention, holder)
        self.ffn = torch.nn.Sequential(torch.nn.Linear(dim, ffn_dim, bias=False, device="meta"), torch.nn.GELU(),
                                       torch.nn.Linear(ffn_dim, dim, bias=False, device="meta"))


def real_width_line(args) -> str:
    """Trainable parameters on Wan 2.1 14B's real widths (5120, FFN 13824, 40 blocks); the file holds
    them in the save dtype (plus a small header)."""
    tree = torch.nn.Module()
    tree.blocks = torch.nn.ModuleList([WanAttentionBlock(5120, 13824) for _ in range(40)])
    cells = []
    for network_type in TYPES:
        options = {"factor": args.factor} if network_type == "lokr" else {}
        network = create_network(network_type, tree, "wan", network_dim=args.rank, network_alpha=args.alpha, **options)
        count = network.trainable_parameter_count()
        network.remove()
        cells.append(f"{count:>13,} {size_text(count * DTYPES[args.dtype].itemsize):>11}")
    return f"{'Wan 2.1 14B':<16} {400:>6}  " + "  ".join(cells)


def size_text(count: int) -> str:
    for unit, step in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if count >= step:
            return f"{count / step:.2f} {unit}iB"
    return f"{count} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16, help="network_dim of every type (default 16)")
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--factor", type=int, default=-1, help="LoKr factor (default -1: balanced split)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="save precision (default bfloat16)")
    parser.add_argument("--archs", default=",".join(ARCHITECTURES), help="comma list of tiny architectures")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    comfy_sd = load_comfyui()

    header = f"{'architecture':<16} {'layers':>6}  " + "  ".join(f"{name + ' params':>13} {name + ' file':>11}" for name in
                                                                  ("LoRA", "LoHa", "LoKr"))
    print(f"rank {args.rank}, alpha {args.alpha:g}, LoKr factor {args.factor}, files in {args.dtype} (ComfyUI layout)")
    print(header)
    print("-" * len(header))
    notes = []
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode(False):
        for arch in [name.strip() for name in args.archs.split(",") if name.strip()]:
            tree = model_tree(arch, comfy_sd)
            results = {network_type: measure(tree, ARCHS[arch].family, network_type, args, folder) for network_type in TYPES}
            del tree
            cells = "  ".join(f"{results[t]['params']:>13,} {size_text(results[t]['bytes']):>11}" for t in TYPES)
            print(f"{arch:<16} {results['lora']['layers']:>6}  {cells}", flush=True)
            if results["lokr"]["full_w2"]:
                notes.append(f"{arch}: {results['lokr']['full_w2']} of {results['lokr']['layers']} LoKr layers keep a full W2")
    print(real_width_line(args) + "   (real widths, file size from the parameter count)")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
