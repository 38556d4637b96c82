"""ComfyUI operations for block-scaled FP8 weights (musubi's ``.scale_weight`` layout).

A quantized Linear keeps its FP8 codes and scale as buffers and dequantizes them into the
compute dtype on every forward. LoRA patches from core loaders are applied to that
dequantized weight, in float32, at forward time (an ``ON_LOAD`` callback hands each layer its
patches); they are never folded back into the FP8 codes, where re-rounding would drown a small
LoRA delta in quantization noise.
"""

from __future__ import annotations

import comfy.lora
import comfy.ops
import comfy.patcher_extension
import torch

from ..musubi.fp8 import SCALE_SUFFIX, dequantize_weight

CALLBACK_KEY = "musubi_fp8_scaled"


class ScaledFP8Ops(comfy.ops.manual_cast):
    """``manual_cast`` ops whose Linear layers accept musubi's block-scaled FP8 weights."""

    class Linear(comfy.ops.manual_cast.Linear):
        quantized = False
        lora_patches = None  # (weight key, patches) while a patched model is loaded

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            scale = state_dict.pop(prefix + SCALE_SUFFIX[1:], None)
            if scale is not None:
                codes = state_dict.pop(prefix + "weight")
                del self.weight
                self.register_buffer("weight", codes, persistent=True)
                self.register_buffer("scale_weight", scale, persistent=True)
                self.quantized = True
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            if self.quantized:
                for key in (prefix + "weight", prefix + "scale_weight"):
                    if key in missing_keys:
                        missing_keys.remove(key)

        def dequantized_weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            codes = self.weight.to(device, non_blocking=True)
            scale = self.scale_weight.to(device, non_blocking=True)
            if not self.lora_patches:
                return dequantize_weight(codes, scale, dtype)
            key, patches = self.lora_patches
            weight = dequantize_weight(codes, scale, torch.float32)
            weight = comfy.lora.calculate_weight(patches, weight, key, intermediate_dtype=torch.float32)
            return weight.to(dtype)

        def forward(self, input, *args, **kwargs):
            if not self.quantized:
                return super().forward(input, *args, **kwargs)
            weight = self.dequantized_weight(input.dtype, input.device)
            bias = None
            if self.bias is not None:
                bias = self.bias.to(device=input.device, dtype=input.dtype)
                for patch in self.bias_function:
                    bias = patch(bias)
            return torch.nn.functional.linear(input, weight, bias)


def hand_patches_to_quantized_layers(patcher, device_to, lowvram_model_memory, force_patch_weights, full_load):
    """ON_LOAD callback: give each quantized layer the LoRA patches of this model patcher."""
    for name, module in patcher.model.named_modules():
        if getattr(module, "quantized", False):
            key = f"{name}.weight"
            module.lora_patches = (key, patcher.patches[key]) if key in patcher.patches else None


def attach_lora_callback(patcher) -> None:
    patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, CALLBACK_KEY,
                                  hand_patches_to_quantized_layers)
