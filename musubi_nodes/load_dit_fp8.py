"""Load DiT (fp8 scaled): a bf16 checkpoint quantized block-wise to FP8, as a normal MODEL."""

from __future__ import annotations

import comfy.sd
import folder_paths
import safetensors.torch
import torch
from comfy_api.latest import io, ui

from ..musubi import files
from ..musubi.errors import MusubiError
from ..musubi.framepack.loading import looks_like_framepack
from ..musubi.fp8 import (
    ARCHITECTURES,
    DEFAULT_BLOCK_SIZE,
    FP8_FORMATS,
    MODES,
    check_not_prequantized,
    is_scaled_fp8_state_dict,
    quantize_checkpoint,
)
from ..musubi.lora.merge import load_lora_file
from .fp8_ops import ScaledFP8Ops, attach_lora_callback
from .paths import missing_file_message, new_output_path

NODE = "Load DiT (fp8 scaled)"
COMPUTE_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class MusubiLoadDiTFP8Scaled(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiLoadDiTFP8Scaled",
            display_name=NODE,
            category="musubi/loaders",
            description="Loads a bf16/fp16 diffusion model and stores its transformer-block weights as FP8 with one scale per block of 64 (musubi-tuner's --fp8_scaled): about half the memory of bf16 at far better precision than a plain fp8 cast. The MODEL works with KSampler, LoRA loaders, Train LoRA and MagCache. Files saved by this node or by musubi-tuner load directly.",
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="A bf16/fp16/fp32 checkpoint from models/diffusion_models, or a block-scaled fp8 file saved by this node or musubi-tuner."),
                io.Combo.Input("fp8_format", options=list(FP8_FORMATS), default="e4m3fn",
                               tooltip="e4m3fn: more precision (default). e5m2: more range, half the precision."),
                io.Combo.Input("mode", options=list(MODES), default="block",
                               tooltip="block: one scale per block_size input columns of each row (best). channel: one per row. tensor: one per weight (like ComfyUI's own fp8)."),
                io.Int.Input("block_size", default=DEFAULT_BLOCK_SIZE, min=8, max=4096, step=8,
                             tooltip="Input columns per scale in block mode; layers whose width is not a multiple use one scale per row."),
                io.Combo.Input("compute_dtype", options=list(COMPUTE_DTYPES), default="default",
                               tooltip="Dtype the weights are dequantized into for each matmul, and of the layers kept in high precision. default: what ComfyUI picks for this device."),
                io.Combo.Input("architecture", options=["auto", *ARCHITECTURES], default="auto",
                               tooltip="Which layers to quantize (norms, embeddings, modulation and heads stay in high precision). auto: recognised from the weight names."),
                io.String.Input("loras", default="", multiline=True, optional=True,
                                placeholder="my_style.safetensors:0.8",
                                tooltip="LoRAs merged into the bf16 weights BEFORE quantizing, one per line as name[:strength] from the loras folders. Merging first is exact; LoRAs loaded later with core loaders are applied on top at full precision too."),
                io.String.Input("save_as", default="", optional=True,
                                tooltip="Optional: also save the quantized model to models/diffusion_models/<save_as>.safetensors (musubi-tuner's layout) so the next load skips quantizing. Never overwrites."),
            ],
            outputs=[io.Model.Output(tooltip="The diffusion model with fp8 block-scaled weights.")],
        )

    @classmethod
    def validate_inputs(cls, unet_name: str | None = None) -> bool | str:
        """A missing checkpoint is reported when the prompt is queued, with ComfyUI's own checks
        (this ComfyUI does not check V3 combo values against their lists)."""
        return missing_file_message(NODE, "unet_name", "diffusion_models", unet_name) or True

    @classmethod
    def execute(cls, unet_name: str, fp8_format: str, mode: str, block_size: int, compute_dtype: str,
                architecture: str, loras: str = "", save_as: str = "") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        lora_list = parse_lora_lines(loras)
        # The name is checked before the costly quantizing, not after it (a file already quantized is not saved again).
        target = None
        if save_as.strip() and not is_scaled_fp8_state_dict(files.read_header(path)[0].keys()):
            target = new_output_path(NODE, "diffusion_models", save_as, option="save_as", example="my_model_fp8")
        state_dict, metadata, summary, quantized_now = scaled_state_dict(
            path, unet_name, fp8_format, mode, block_size, architecture, lora_list)
        if target is not None and quantized_now:
            # Tensor by tensor from the loaded model: no serialised second copy of it in memory.
            files.stream_save_file(target, files.entries_of(state_dict), state_dict.items(), metadata)
            summary += f"\nsaved {target}"
        model = load_scaled_model(state_dict, COMPUTE_DTYPES[compute_dtype], unet_name)
        summary += "\n" + memory_summary(model.model.diffusion_model)
        return io.NodeOutput(model, ui=ui.PreviewText(summary))


def scaled_state_dict(path: str, name: str, fp8_format: str = "e4m3fn", mode: str = "block",
                      block_size: int = DEFAULT_BLOCK_SIZE, architecture: str = "auto",
                      lora_list: list[tuple[str, float]] = (), where: str = NODE):
    """``(state dict, metadata, summary, quantized now)`` of the checkpoint at ``path`` with its
    transformer-block weights block-scaled to FP8 (LoRAs merged first); a file already in that
    layout (this node's or musubi-tuner's) is read as it is."""
    header, metadata = files.read_header(path)
    if looks_like_framepack(header):
        raise MusubiError(f"{where}: {name} is a FramePack transformer; load it with Load FramePack DiT "
                          "(its fp8_scaled option quantizes the same way).")
    check_not_prequantized(header, path)
    if is_scaled_fp8_state_dict(header.keys()):
        if lora_list:
            raise MusubiError(
                f"{where}: {name} is already quantized, so LoRAs cannot be merged into it exactly. "
                "Pick the bf16 original to merge them, or load them afterwards with a LoRA loader."
            )
        return safetensors.torch.load_file(path), metadata, f"{name}: already block-scaled fp8, loaded as it is", False
    try:  # the library's refusals (a LoRA unreadable, holding NaN/inf, of another model) name the caller
        loaded_loras = [(load_lora_file(lora_path)[0], strength) for lora_path, strength in lora_list]
        state_dict, metadata, report = quantize_checkpoint(
            path, architecture=architecture, fp8_format=fp8_format, mode=mode,
            block_size=block_size, loras=loaded_loras,
        )
    except MusubiError as error:
        raise MusubiError(f"{where}: {error}") from error
    summary = report.summary()
    if report.lora_report is not None:
        summary = report.lora_report.summary() + "\n" + summary
    return state_dict, metadata, summary, True


def load_scaled_model(state_dict: dict, compute_dtype: torch.dtype | None, name: str, where: str = NODE):
    """A ComfyUI MODEL over a block-scaled FP8 state dict: each matmul dequantizes into the compute
    dtype, LoRAs loaded later act on the dequantized weights."""
    options = {"custom_operations": ScaledFP8Ops}
    if compute_dtype is not None:
        options["dtype"] = compute_dtype
    model = comfy.sd.load_diffusion_model_state_dict(state_dict, model_options=options)
    if model is None:
        raise MusubiError(f"{where}: ComfyUI could not detect the model type of {name}.")
    attach_lora_callback(model)
    return model


def parse_lora_lines(text: str) -> list[tuple[str, float]]:
    """``name[:strength]`` per line (strength 1.0 when absent) → (full path, strength)."""
    result = []
    for line in (raw.strip() for raw in (text or "").splitlines()):
        if not line or line.startswith("#"):
            continue
        name, strength = line, 1.0
        head, separator, tail = line.rpartition(":")
        if separator:
            try:
                name, strength = head.strip(), float(tail)
            except ValueError:
                pass
        full = folder_paths.get_full_path("loras", name)
        if full is None:
            raise MusubiError(
                f"{NODE}: LoRA {name!r} is not in the loras folders; write names as Load LoRA lists "
                "them, one per line, e.g. my_style.safetensors:0.8."
            )
        result.append((full, strength))
    return result


def memory_summary(diffusion_model: torch.nn.Module) -> str:
    """Bytes the quantized layers hold now against what the same weights take in bf16."""
    quantized_bytes = bf16_bytes = 0
    for module in diffusion_model.modules():
        if getattr(module, "quantized", False):
            quantized_bytes += module.weight.nbytes + module.scale_weight.nbytes
            bf16_bytes += module.weight.numel() * 2
    if not bf16_bytes:
        return "no layer was quantized"
    return f"quantized layers hold {quantized_bytes} bytes, {quantized_bytes / bf16_bytes:.3f}x of bf16 ({bf16_bytes} bytes)"
