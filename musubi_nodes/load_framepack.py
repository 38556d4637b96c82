"""Load FramePack DiT: lllyasviel's FramePack / FramePack-F1 transformer as a ComfyUI MODEL."""

from __future__ import annotations

import os

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..musubi.errors import MusubiError
from ..musubi.fp8 import quantize_checkpoint
from ..musubi.framepack.loading import FramePackSource, inspect_source, is_framepack_folder, read_state_dict
from .fp8_ops import ScaledFP8Ops, attach_lora_callback
from .framepack_model import load_framepack_model
from .load_dit_fp8 import memory_summary

NODE = "Load FramePack DiT"
FOLDER = "diffusion_models"
WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COMPUTE_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def framepack_choices() -> list[str]:
    """FramePack folders (diffusers layout) and single files in models/diffusion_models.

    Shards inside a FramePack folder are not listed on their own: the folder stands for them.
    """
    folders: list[str] = []
    for root in folder_paths.get_folder_paths(FOLDER):
        if not os.path.isdir(root):
            continue
        for current, subfolders, _files in os.walk(root, followlinks=True):
            if is_framepack_folder(current) and current != root:
                folders.append(os.path.relpath(current, root).replace(os.sep, "/"))
                subfolders.clear()
    files = [name for name in folder_paths.get_filename_list(FOLDER)
             if name.endswith(".safetensors") and not any(name.replace(os.sep, "/").startswith(folder + "/") for folder in folders)]
    return sorted(set(folders)) + files


def resolve_choice(name: str) -> str:
    for root in folder_paths.get_folder_paths(FOLDER):
        candidate = os.path.join(root, name)
        if os.path.isdir(candidate):
            return candidate
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise MusubiError(f"{NODE}: {name!r} is not in models/{FOLDER}; pick a FramePack folder or file from the list.")
    return path


def missing_choice_message(name: str | None) -> str | None:
    """Why ``name`` (a FramePack folder or file of the model_name list) cannot be loaded, or None."""
    if name is None or any(os.path.isdir(os.path.join(root, name)) for root in folder_paths.get_folder_paths(FOLDER)):
        return None
    if folder_paths.get_full_path(FOLDER, name) is not None:
        return None
    roots = ", ".join(folder_paths.get_folder_paths(FOLDER))
    return (f"{NODE}: model_name {name!r} is neither a FramePack folder nor a file in the {FOLDER} folders ({roots}); "
            "put it there or pick one that the list shows.")


def _quantized_state_dict(source: FramePackSource) -> tuple[dict[str, torch.Tensor], str]:
    """Block Linear weights as fp8 (e4m3fn, one scale per 64 inputs), one shard at a time."""
    state_dict: dict[str, torch.Tensor] = {}
    quantized = kept = 0
    for file in source.files:
        tensors, _metadata, report = quantize_checkpoint(file, architecture="framepack")
        state_dict.update(tensors)
        quantized += report.quantized
        kept += report.kept
    return state_dict, f"fp8 scaled: quantized {quantized} block weights to e4m3fn (block 64), kept {kept} tensors"


class MusubiLoadFramePack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiLoadFramePack",
            display_name=NODE,
            category="musubi/loaders",
            description="Loads lllyasviel's FramePack or FramePack-F1 image-to-video transformer (HunyuanVideo packed) as a MODEL: the diffusers folder (config.json + diffusion_pytorch_model-0000N-of-0000M.safetensors) or a single-file bf16 conversion from models/diffusion_models. fp8_scaled stores the block weights as FP8 with one scale per 64 inputs (about half their memory). Sample it with FramePack Sampler; core LoRA loaders work on it.",
            inputs=[
                io.Combo.Input("model_name", options=framepack_choices(),
                               tooltip="A FramePack folder (diffusers layout, as downloaded from lllyasviel/FramePackI2V_HY or FramePack_F1_I2V_HY) or a single .safetensors conversion in models/diffusion_models. F1 and vanilla FramePack are different weights of the same network."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="bf16",
                               tooltip="Dtype the weights are kept in (the layers not quantized, when fp8_scaled is on)."),
                io.Boolean.Input("fp8_scaled", default=False,
                                 tooltip="Store the Linear weights of the transformer blocks as FP8 (e4m3fn) with one scale per block of 64 inputs, as musubi-tuner's --fp8_scaled: those layers take about half their bf16 memory. Embedders, norms and the output layer stay in weight_dtype."),
                io.Combo.Input("compute_dtype", options=list(COMPUTE_DTYPES), default="default",
                               tooltip="Dtype of the activations; the weights are cast into it for each matmul. default: what ComfyUI picks for this device."),
            ],
            outputs=[io.Model.Output(tooltip="The FramePack transformer; connect it to FramePack Sampler (LoRA loaders may come between).")],
        )

    @classmethod
    def validate_inputs(cls, model_name: str | None = None) -> bool | str:
        """A missing model is reported when the prompt is queued, not after the other loaders ran."""
        return missing_choice_message(model_name) or True

    @classmethod
    def execute(cls, model_name: str, weight_dtype: str, fp8_scaled: bool, compute_dtype: str) -> io.NodeOutput:
        source = inspect_source(resolve_choice(model_name), NODE)
        lines = [source.describe()]
        operations = None
        if source.prequantized:
            state_dict = read_state_dict(source)
            operations = ScaledFP8Ops
            lines.append("already block-scaled fp8: loaded as it is")
        elif fp8_scaled:
            state_dict, summary = _quantized_state_dict(source)
            operations = ScaledFP8Ops
            lines.append(summary)
        else:
            state_dict = read_state_dict(source)
        model = load_framepack_model(state_dict, source.config, WEIGHT_DTYPES[weight_dtype], COMPUTE_DTYPES[compute_dtype],
                                     operations=operations, node=NODE)
        if operations is not None:
            attach_lora_callback(model)
            lines.append(memory_summary(model.model.diffusion_model))
        base = model.model
        lines.append(f"weights {weight_dtype}, compute {str(base.compute_dtype).removeprefix('torch.')}")
        return io.NodeOutput(model, ui=ui.PreviewText("\n".join(lines)))
