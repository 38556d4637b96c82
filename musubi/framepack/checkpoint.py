"""What a FramePack checkpoint's tensor shapes say about its config, and the names all its layouts share.

Single-file FramePack checkpoints often carry no config. Shapes pin everything except the split of
the attention head over the rotary axes, which is FramePack's (16, 56, 56) for its 128-wide heads.
Recognising and loading checkpoints is :mod:`.loading`'s, which builds on this module.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import MusubiError

CLASS_NAME = "HunyuanVideoFramepackTransformer3DModel"
# The rotary split of the real model's 128-wide attention heads (time, height, width).
REAL_ROPE_AXES = (16, 56, 56)
CONFIG_FILE = "config.json"


def _count(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    numbers = {int(match.group(1)) for key in keys if (match := pattern.match(key))}
    return max(numbers) + 1 if numbers else 0


def config_from_shapes(state_dict: dict[str, torch.Tensor], source: str = "the checkpoint") -> dict[str, Any]:
    """The diffusers config of a FramePack state dict, recovered from its tensor shapes."""
    required = ("x_embedder.proj.weight", "proj_out.weight", "context_embedder.proj_in.weight",
                "time_text_embed.text_embedder.linear_1.weight", "transformer_blocks.0.attn.norm_q.weight",
                "transformer_blocks.0.ff.net.0.proj.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise MusubiError(
            f"{source}: not a FramePack transformer in diffusers naming (missing {', '.join(missing[:3])}). "
            "Load the FramePackI2V_HY / FramePack_F1_I2V_HY transformer or a single-file conversion of it."
        )
    patch = state_dict["x_embedder.proj.weight"]
    inner, in_channels, patch_t, patch_size = patch.shape[0], patch.shape[1], patch.shape[2], patch.shape[3]
    head_dim = state_dict["transformer_blocks.0.attn.norm_q.weight"].shape[0]
    if head_dim != sum(REAL_ROPE_AXES):
        raise MusubiError(
            f"{source}: attention heads of width {head_dim} (FramePack's are {sum(REAL_ROPE_AXES)}); the rotary split "
            "cannot be guessed — store the diffusers config as 'config' metadata or load the folder with its config.json."
        )
    keys = list(state_dict)
    up = state_dict.get("image_projection.up.weight")
    return {
        "_class_name": CLASS_NAME,
        "in_channels": in_channels,
        "out_channels": state_dict["proj_out.weight"].shape[0] // (patch_t * patch_size * patch_size),
        "num_attention_heads": inner // head_dim,
        "attention_head_dim": head_dim,
        "num_layers": _count(keys, "transformer_blocks."),
        "num_single_layers": _count(keys, "single_transformer_blocks."),
        "num_refiner_layers": _count(keys, "context_embedder.token_refiner.refiner_blocks."),
        "mlp_ratio": state_dict["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] / inner,
        "patch_size": patch_size,
        "patch_size_t": patch_t,
        "qk_norm": "rms_norm",
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in state_dict,
        "text_embed_dim": state_dict["context_embedder.proj_in.weight"].shape[1],
        "pooled_projection_dim": state_dict["time_text_embed.text_embedder.linear_1.weight"].shape[1],
        "rope_theta": 256.0,
        "rope_axes_dim": list(REAL_ROPE_AXES),
        "image_condition_type": None,
        "has_image_proj": up is not None,
        "image_proj_dim": up.shape[1] if up is not None else 1152,
        "has_clean_x_embedder": "clean_x_embedder.proj.weight" in state_dict,
    }
