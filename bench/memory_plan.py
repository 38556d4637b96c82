"""What each GPU holds when training a LoRA, per architecture: frozen weights at bf16 against
block-scaled fp8, and the LoRA's training state — computed from parameter counts, no weight read.

Run from the repository root: ``python bench/memory_plan.py [--rank 32] [--json FILE]`` (seconds;
needs ComfyUI at $COMFYUI_PATH or ~/comfy/ComfyUI, and diffusers for FramePack).

Each model is built at its published size on PyTorch's ``meta`` device with the classes that train
it here (ComfyUI's for the native families, diffusers' for FramePack), so the counts are those of
the real checkpoints. Then, per model:

* bf16 weights: 2 bytes per parameter;
* fp8 scaled: the weights this pack quantizes (``musubi.fp8``'s rule of the family: the Linear
  weights of the transformer blocks) at 1 byte plus one bf16 scale per 64 (1.031 bytes), the rest
  at bf16;
* the LoRA (the family's preset, all attention and MLP Linears of the blocks) at rank ``--rank``,
  trained with AdamW in float32: weight, gradient and two moments, 16 bytes per LoRA parameter.

Activations come on top and depend on the latent size and frame count (with gradient checkpointing
about one block's activations plus each block's input).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from musubi.fp8 import should_quantize  # noqa: E402
from musubi.lora.network import LoRANetwork  # noqa: E402

GIB = 1024**3
SCALE_BYTES_PER_WEIGHT = 2 / 64  # one bf16 scale per block of 64 input columns


def comfy_models(comfy_path: Path) -> dict[str, tuple[str, torch.nn.Module]]:
    """name -> (family, model on the meta device), with the published configurations."""
    sys.path.insert(0, str(comfy_path))
    from comfy.cli_args import args

    args.cpu = args.cpu or not torch.cuda.is_available()
    import comfy.ops
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.hunyuan_video.model import HunyuanVideo
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    from comfy.ldm.wan.model import WanModel

    common = dict(device="meta", dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init)
    wan = dict(patch_size=(1, 2, 2), text_len=512, freq_dim=256, text_dim=4096, window_size=(-1, -1), qk_norm=True,
               cross_attn_norm=True, eps=1e-6)
    return {
        "Wan 2.1 T2V 1.3B": ("wan", WanModel(model_type="t2v", in_dim=16, out_dim=16, dim=1536, ffn_dim=8960, num_heads=12,
                                             num_layers=30, **wan, **common)),
        "Wan 2.1 T2V 14B (one A14B expert)": ("wan", WanModel(model_type="t2v", in_dim=16, out_dim=16, dim=5120, ffn_dim=13824,
                                                              num_heads=40, num_layers=40, **wan, **common)),
        "Wan 2.1 I2V 14B": ("wan", WanModel(model_type="i2v", in_dim=36, out_dim=16, dim=5120, ffn_dim=13824, num_heads=40,
                                            num_layers=40, **wan, **common)),
        "Wan 2.2 TI2V 5B": ("wan", WanModel(model_type="t2v", in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24,
                                            num_layers=30, **wan, **common)),
        "HunyuanVideo": ("hunyuan_video", HunyuanVideo(
            in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
            num_heads=24, depth=20, depth_single_blocks=40, axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2],
            qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False, **common)),
        "FLUX.1 Kontext [dev]": ("flux", Flux(
            in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
            num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
            qkv_bias=True, guidance_embed=True, **common)),
        "Qwen-Image (-Edit)": ("qwen_image", QwenImageTransformer2DModel(num_layers=60, **common)),
    }


def framepack_model() -> torch.nn.Module | None:
    try:
        from accelerate import init_empty_weights
        from diffusers import HunyuanVideoFramepackTransformer3DModel
    except ImportError:
        return None
    with init_empty_weights():  # diffusers' defaults are FramePack's published sizes
        return HunyuanVideoFramepackTransformer3DModel(has_image_proj=True, image_proj_dim=1152, has_clean_x_embedder=True)


def measure(family: str, model: torch.nn.Module, rank: int) -> dict:
    total = quantized = 0
    for name, tensor in model.state_dict(keep_vars=True).items():
        total += tensor.numel()
        if should_quantize(name, tensor, family):
            quantized += tensor.numel()
    network = LoRANetwork(model, family, network_dim=rank, network_alpha=float(rank))
    lora = sum(param.numel() for param in network.parameters())
    network.remove()
    weights_bf16 = 2 * total
    weights_fp8 = quantized * (1 + SCALE_BYTES_PER_WEIGHT) + 2 * (total - quantized)
    training_state = 16 * lora
    return {
        "parameters_b": total / 1e9, "quantized_share": quantized / total, "lora_parameters_m": lora / 1e6,
        "weights_bf16_gib": weights_bf16 / GIB, "weights_fp8_gib": weights_fp8 / GIB,
        "lora_state_gib": training_state / GIB,
        "total_bf16_gib": (weights_bf16 + training_state) / GIB, "total_fp8_gib": (weights_fp8 + training_state) / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from comfy_server import find_comfyui

    comfy_path = find_comfyui()
    if comfy_path is None:
        raise SystemExit("bench/memory_plan.py needs ComfyUI's model classes: set COMFYUI_PATH (or unpack it at ~/comfy/ComfyUI).")
    models = comfy_models(comfy_path)
    framepack = framepack_model()
    if framepack is not None:
        models["FramePack (I2V HY)"] = ("framepack", framepack)
    rows = {}
    for name, (family, model) in models.items():
        rows[name] = measure(family, model, args.rank)
        if name.startswith("Wan 2.1 T2V 14B"):  # Wan 2.2 A14B: two such experts, one shared LoRA
            expert = rows[name]
            both = {key: 2 * value for key, value in expert.items() if key in ("parameters_b", "weights_bf16_gib", "weights_fp8_gib")}
            both.update(quantized_share=expert["quantized_share"], lora_parameters_m=expert["lora_parameters_m"],
                        lora_state_gib=expert["lora_state_gib"])
            both["total_bf16_gib"] = both["weights_bf16_gib"] + both["lora_state_gib"]
            both["total_fp8_gib"] = both["weights_fp8_gib"] + both["lora_state_gib"]
            rows["Wan 2.2 A14B, both experts resident"] = both
    print(f"LoRA rank {args.rank}, AdamW float32 state; GiB = 2^30 bytes; activations not included")
    print(f"{'model':36s} {'params':>8s} {'fp8 share':>9s} {'bf16 weights':>12s} {'fp8 weights':>11s} "
          f"{'LoRA':>8s} {'LoRA state':>10s} {'total bf16':>10s} {'total fp8':>9s}")
    for name, row in rows.items():
        print(f"{name:36s} {row['parameters_b']:7.2f}B {row['quantized_share']:9.1%} {row['weights_bf16_gib']:12.1f} "
              f"{row['weights_fp8_gib']:11.1f} {row['lora_parameters_m']:7.1f}M {row['lora_state_gib']:10.2f} "
              f"{row['total_bf16_gib']:10.1f} {row['total_fp8_gib']:9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
