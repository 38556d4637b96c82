"""FramePack as a ComfyUI MODEL: diffusers' transformer inside a ``comfy.model_base.BaseModel``.

ComfyUI has no FramePack architecture. The network here is diffusers'
``HunyuanVideoFramepackTransformer3DModel`` with its Linear and Conv3d layers swapped for
ComfyUI's cast operations (or this pack's block-scaled fp8 ones), held by a :class:`FramePackModel`
and a ``ModelPatcher``. That gives what every MODEL has:

* ComfyUI's memory management (load/offload, low-VRAM partial loading of the cast layers);
* ``model.clone()`` and weight patches under ``diffusion_model.<diffusers name>`` — so core
  *LoraLoaderModelOnly* applies LoRAs in ComfyUI's ``diffusion_model.<module>.lora_up/lora_down``
  layout and musubi-tuner's ``lora_unet_<module>`` layout;
* ``model_options`` wrappers: ``APPLY_MODEL`` around every call and ``DIFFUSION_MODEL`` around
  the transformer itself.

A FramePack call needs the section's history latents, frame indices and SigLIP embedding, which
KSampler cannot provide: it is sampled with *FramePack Sampler*, which passes them as the
``framepack`` keyword of ``apply_model``. :func:`framepack_transformer` gives the diffusers module
to code that drives it directly (training).
"""

from __future__ import annotations

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.supported_models_base
import torch

from ..musubi.errors import MusubiError
from ..musubi.fp8 import SCALE_SUFFIX
from ..musubi.framepack.loading import build_empty_transformer

IMAGE_MODEL = "framepack"
FRAMEPACK_INPUTS = "framepack"  # the apply_model keyword that carries a call's FramePack inputs


class FramePackConfig(comfy.supported_models_base.BASE):
    """What ComfyUI's BaseModel reads from a model config: FramePack is a flow model (σ·1000 as
    timestep) on the HunyuanVideo VAE's latents (16 channels, scale 0.476986)."""

    unet_config = {"image_model": IMAGE_MODEL}
    unet_extra_config = {}
    sampling_settings = {"shift": 1.0, "multiplier": 1000.0}
    latent_format = comfy.latent_formats.HunyuanVideo
    memory_usage_factor = 1.8
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]


def _swap_layers(module: torch.nn.Module, operations, weight_dtype: torch.dtype) -> None:
    """Replace diffusers' Linear / Conv3d layers by ComfyUI operations of the same shape (on meta)."""
    for name, child in list(module.named_children()):
        if type(child) is torch.nn.Linear:
            layer = operations.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                      device="meta", dtype=weight_dtype)
        elif type(child) is torch.nn.Conv3d:
            layer = operations.Conv3d(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                                      padding=child.padding, bias=child.bias is not None, device="meta", dtype=weight_dtype)
        else:
            _swap_layers(child, operations, weight_dtype)
            continue
        setattr(module, name, layer)


def build_comfy_transformer(framepack_config: dict, operations=None, dtype: torch.dtype | None = None, **_unused):
    """The diffusers transformer with ComfyUI layers, every tensor still on the meta device.

    Called by BaseModel as its ``unet_model``; the weights are assigned afterwards by
    :func:`load_framepack_model` (no random init, no second copy of the weights).
    """
    transformer = build_empty_transformer(framepack_config)
    _swap_layers(transformer, operations or comfy.ops.disable_weight_init, dtype or torch.bfloat16)
    return transformer


class FramePackModel(comfy.model_base.BaseModel):
    """ComfyUI's BaseModel around diffusers' FramePack transformer."""

    def __init__(self, model_config: FramePackConfig, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device, unet_model=build_comfy_transformer)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.manual_cast_dtype or self.model_config.unet_config.get("dtype") or torch.bfloat16

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        inputs = kwargs.get(FRAMEPACK_INPUTS)
        if inputs is None:
            raise MusubiError(
                "FramePack MODEL: it needs each section's history latents, frame indices and image embedding, which "
                "KSampler and other core samplers cannot give; sample it with the FramePack Sampler node."
            )
        dtype = self.compute_dtype
        device = x.device
        sigma = t
        call = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            call[key] = value
        call["timestep"] = self.model_sampling.timestep(sigma).float().to(device)
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._run_transformer, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, transformer_options),
        )
        velocity = executor.execute(x.to(dtype), call, transformer_options).float()
        return self.model_sampling.calculate_denoised(sigma, velocity, x)

    def _run_transformer(self, hidden_states: torch.Tensor, call: dict, transformer_options: dict) -> torch.Tensor:
        return self.diffusion_model(hidden_states=hidden_states, return_dict=False, **call)[0]


def framepack_transformer(model) -> torch.nn.Module | None:
    """The diffusers ``HunyuanVideoFramepackTransformer3DModel`` of a FramePack MODEL, else None.

    Accepts a ModelPatcher (a MODEL) or the BaseModel inside one.
    """
    base = getattr(model, "model", model)
    if isinstance(base, FramePackModel):
        return base.diffusion_model
    return None


def _layer_owned_keys(transformer: torch.nn.Module) -> set[str]:
    """State-dict keys of the swapped Linear/Conv3d layers (they keep the weight dtype)."""
    keys = set()
    for name, module in transformer.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv3d)):
            for suffix in ("weight", "bias", SCALE_SUFFIX[1:]):
                keys.add(f"{name}.{suffix}")
    return keys


def load_framepack_model(state_dict: dict[str, torch.Tensor], config: dict, weight_dtype: torch.dtype,
                         compute_dtype: torch.dtype | None, operations=None, node: str = "Load FramePack DiT"):
    """A ModelPatcher holding a FramePack transformer with ``state_dict``'s weights.

    Linear/Conv3d weights are stored in ``weight_dtype`` (fp8 codes and their scales stay as
    they are); everything else (norms) in the compute dtype, which is ``compute_dtype`` or what
    ComfyUI picks for the device. ``state_dict`` is consumed.
    """
    load_device = comfy.model_management.get_torch_device()
    model_config = FramePackConfig({"framepack_config": dict(config)})
    if compute_dtype is None:
        manual_cast = comfy.model_management.unet_manual_cast(weight_dtype, load_device, model_config.supported_inference_dtypes)
    else:
        manual_cast = None if compute_dtype == weight_dtype else compute_dtype
    model_config.set_inference_dtype(weight_dtype, manual_cast)
    if operations is not None:
        model_config.custom_operations = operations
    model = FramePackModel(model_config)
    transformer = model.diffusion_model
    layer_keys = _layer_owned_keys(transformer)
    norm_dtype = manual_cast or weight_dtype
    for key in list(state_dict):
        tensor = state_dict[key]
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or key.endswith(SCALE_SUFFIX):
            continue
        if tensor.is_floating_point():
            state_dict[key] = tensor.to(weight_dtype if key in layer_keys else norm_dtype)
    result = transformer.load_state_dict(state_dict, strict=False, assign=True)
    state_dict.clear()
    unexpected = [key for key in result.unexpected_keys if not key.endswith(SCALE_SUFFIX)]
    if result.missing_keys or unexpected:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {len(result.missing_keys)} (e.g. {', '.join(result.missing_keys[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        raise MusubiError(f"{node}: the weights do not fit a FramePack transformer of this config: {'; '.join(parts)}.")
    left_on_meta = [name for name, tensor in [*transformer.named_parameters(), *transformer.named_buffers()] if tensor.is_meta]
    if left_on_meta:
        raise MusubiError(f"{node}: no weights for {', '.join(left_on_meta[:3])}; the checkpoint is incomplete.")
    transformer.requires_grad_(False).eval()
    offload_device = comfy.model_management.unet_offload_device()
    model = model.to(offload_device)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
