"""Files that tests put into ComfyUI's model folders."""

from __future__ import annotations

import os

import safetensors.torch
import torch


def write_wan_lora_checkpoints(folder, count: int, rank: int = 4) -> list:
    """LoRA checkpoints for the tiny Wan model in ComfyUI-native keys, oldest first."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {"blocks.0.self_attn.q": (128, 128), "blocks.0.cross_attn.k": (128, 128), "blocks.0.ffn.0": (256, 128)}
    paths = []
    for index in range(count):
        generator = torch.Generator().manual_seed(100 + index)
        tensors = {}
        for module, (out_features, in_features) in shapes.items():
            prefix = f"diffusion_model.{module}"
            tensors[f"{prefix}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator).to(torch.bfloat16)
            tensors[f"{prefix}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator).to(torch.bfloat16)
            tensors[f"{prefix}.alpha"] = torch.tensor(float(rank))
        path = folder / f"step_{index:03d}.safetensors"
        safetensors.torch.save_file(tensors, path, metadata={"ss_steps": str(index)})
        os.utime(path, (1_700_000_000 + index, 1_700_000_000 + index))
        paths.append(path)
    return paths
