"""Stand-ins for the files the example workflows name, written under the real names.

- Diffusion models: tiny checkpoints (``tiny_checkpoints.py``) with the real key layout.
- LoRAs: rank-4 LoRAs on a few layers of that tiny model, in ComfyUI's key layout.
- VAEs: ComfyUI's own VAE of that kind (the sizes are fixed by ComfyUI, not read from the
  file) with seeded random weights: cheap enough to load and run on a CPU at tiny sizes.
- Input images: a small seeded noise picture; input videos: a few frames of seeded noise.

Text encoders and CLIP vision cannot be made small (ComfyUI builds them at full size whatever
the file holds), so ``test_workflows.py`` replaces those nodes in the graph instead.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from tiny_checkpoints import tiny_layout

# Which ComfyUI VAE a name stands for: a key that makes ComfyUI pick that VAE class, with the
# shape ComfyUI reads from it (it builds the rest of the model from its own fixed config).
VAE_DETECTION_KEYS: dict[str, dict[str, tuple[int, ...]]] = {
    "wan21": {"decoder.middle.0.residual.0.gamma": (384, 1, 1, 1)},
    "wan22": {"decoder.middle.0.residual.0.gamma": (1024, 1, 1, 1),
              "decoder.upsamples.0.upsamples.0.residual.2.weight": (1024, 1024, 3, 3, 3)},
    "hunyuan_video": {"decoder.conv_in.conv.weight": (512, 16, 3, 3, 3), "post_quant_conv.weight": (16, 16, 1, 1, 1)},
    "flux": {"decoder.conv_in.weight": (512, 16, 3, 3)},
}

# Runs inside ComfyUI's folder: builds each VAE ComfyUI would build for its detection keys and
# writes it with random weights: norm scales 1, biases 0, other weights a seeded N(0, 1/fan_in)
# pattern (one short random vector tiled: drawing ~1 G values one by one would take minutes).
_RANDOM_VAE_SCRIPT = r"""
import json, math, sys, torch
jobs = json.loads(sys.argv[1])
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.sd
from safetensors.torch import save_file
pattern = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
for keys, path in jobs:
    vae = comfy.sd.VAE(sd={name: torch.zeros(shape) for name, shape in keys.items()})
    tensors = {}
    for name, value in vae.first_stage_model.state_dict().items():
        if name.endswith("gamma") or (value.dim() == 1 and name.endswith("weight")):
            tensors[name] = torch.ones(value.shape, dtype=torch.bfloat16)
        elif name.endswith("bias") or value.dim() < 2:
            tensors[name] = torch.zeros(value.shape, dtype=torch.bfloat16)
        else:
            count, offset = value.numel(), len(tensors) * 7919 % (1 << 19)
            values = pattern.roll(offset).repeat(count // len(pattern) + 1)[:count]
            tensors[name] = (values / math.sqrt(math.prod(value.shape[1:]))).view(value.shape).contiguous()
    save_file(tensors, path)
"""


def write_random_vaes(files: dict[str, Path], comfy_path: Path) -> None:
    """``{kind: path}``: ComfyUI's ``kind`` VAE with random weights at each path (atomically;
    one ComfyUI import for all of them)."""
    import json

    jobs, temps = [], {}
    for kind, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temps[kind] = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        keys = {name: list(shape) for name, shape in VAE_DETECTION_KEYS[kind].items()}
        jobs.append([keys, temps[kind]])
    try:
        subprocess.run([sys.executable, "-c", _RANDOM_VAE_SCRIPT, json.dumps(jobs)], cwd=comfy_path, check=True,
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
        for kind, path in files.items():
            os.replace(temps[kind], path)
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"could not build random VAEs {sorted(files)}:\n{error.stderr[-3000:]}") from None
    finally:
        for temp in temps.values():
            if os.path.exists(temp):
                os.remove(temp)


def write_tiny_lora(arch: str, path: Path, rank: int = 4, layers: int = 4, seed: int = 0) -> Path:
    """A LoRA on the first ``layers`` block Linear layers of the tiny ``arch`` model (ComfyUI keys)."""
    targets = [
        (key[: -len(".weight")], spec.shape)
        for key, spec in tiny_layout(arch).items()
        if key.endswith(".weight") and len(spec.shape) == 2 and "blocks" in key
    ][:layers]
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in targets:
        prefix = f"diffusion_model.{module}"
        tensors[f"{prefix}.lora_down.weight"] = (torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)).to(torch.bfloat16)
        tensors[f"{prefix}.lora_up.weight"] = (torch.randn(out_features, rank, generator=generator) * 0.01).to(torch.bfloat16)
        tensors[f"{prefix}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_noise_image(path: Path, width: int = 64, height: int = 48, seed: int = 0) -> Path:
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_noise_video(path: Path, width: int = 64, height: int = 48, frames: int = 5, fps: int = 30, seed: int = 0) -> Path:
    """An H.264 .mp4 of seeded noise frames (5 frames: one FramePack section of latent window 1)."""
    import av

    generator = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path
