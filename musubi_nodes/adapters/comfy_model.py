"""The training engine's model adapter for a ComfyUI MODEL.

ComfyUI turns each sample's CONDITIONING into model inputs with its own ``extra_conds``
(Wan i2v image latents and CLIP-vision, Flux guidance and Kontext reference latents,
Qwen-Image edit references, HunyuanVideo pooled text…), so every native architecture is
trained exactly as it samples. The model returns the denoised estimate ``x − σ·v`` in float32;
the velocity is recovered from it. The noise level handed to the model is the exact ``t``.
"""

from __future__ import annotations

import collections
import math
import types

import torch
import torch.utils.checkpoint

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers

from ...musubi.architectures import COMFYUI_CLASSES, COMFYUI_NATIVE, family
from ...musubi.data.text_embeddings import expected_widths
from ...musubi.errors import MusubiError
from ...musubi.training.adapter import flow_matching_velocity
from .training_data import GraphTrainingData


def architecture_of(model) -> str:
    for cls in type(model.model).__mro__:
        if cls.__name__ in COMFYUI_CLASSES:  # the class or one it derives from
            return COMFYUI_CLASSES[cls.__name__]
    raise MusubiError(
        f"Train LoRA: {type(model.model).__name__} models are not supported; train Wan 2.1/2.2, "
        "HunyuanVideo, FLUX.1 (Kontext) or Qwen-Image models."
    )


def make_weights_usable_by_autograd(module: torch.nn.Module) -> None:
    """Loaders run under inference mode, and autograd refuses to save inference tensors for the
    backward pass (core's trainer fails on fp32 HunyuanVideo/Flux for this reason): give every
    such weight a normal copy, one tensor at a time. Call inside ``torch.inference_mode(False)``."""
    for child in module.modules():
        for name, tensor in list(child._parameters.items()):
            if tensor is not None and tensor.is_inference():
                child._parameters[name] = torch.nn.Parameter(tensor.clone(), requires_grad=False)
        for name, tensor in list(child._buffers.items()):
            if tensor is not None and tensor.is_inference():
                child._buffers[name] = tensor.clone()


def check_latent_layout(model, shapes: list[tuple[int, ...]]) -> None:
    """Latents must be this model's own: its channel count and image (3-D) or video (4-D) layout."""
    latent_format = model.model.latent_format
    channels, dims = latent_format.latent_channels, latent_format.latent_dimensions + 1
    for index, shape in enumerate(shapes):
        if shape[0] != channels or len(shape) != dims:
            kind = "video [C, T, H, W]" if dims == 4 else "image [C, H, W]"
            raise MusubiError(
                f"Train LoRA: sample {index} has a latent of shape {list(shape)}, but this "
                f"{architecture_of(model)} model trains on {channels}-channel {kind} latents. Encode the "
                "training images or videos with the model's own VAE (VAE Encode)."
            )


# --- conditioning against the model ------------------------------------------------------------
#
# A CONDITIONING of another model's text encoder fails deep inside the forward pass (a matrix
# product of the wrong width, or ComfyUI's ``extra_conds`` reading a pooled output that is not
# there). The widths are read from the loaded model's own input layers, so variants of a family
# are judged by what they really take.

# The layers that take the text, the pooled text and the CLIP-vision states, per family.
TEXT_LAYERS = {
    "wan": "text_embedding.0",
    "hunyuan_video": "txt_in.input_embedder",
    "flux": "txt_in",
    "qwen_image": "txt_in",
}
POOLED_LAYERS = {"hunyuan_video": "vector_in.in_layer", "flux": "vector_in.in_layer"}
CLIP_VISION_LAYERS = {"wan": "img_emb.proj.1"}  # only image-to-video Wan models have it
# ComfyUI's extra_conds of these families read ``pooled_output`` unconditionally.
NEEDS_POOLED = {"hunyuan_video", "flux"}
# What to encode the captions with, in the names ComfyUI's loaders show.
TEXT_ENCODERS = {
    "wan": "the Wan text encoder (umt5_xxl; Load CLIP type wan)",
    "hunyuan_video": "the HunyuanVideo text encoders (llava_llama3 + clip_l; DualCLIPLoader type hunyuan_video)",
    "flux": "the Flux text encoders (t5xxl + clip_l; DualCLIPLoader type flux)",
    "qwen_image": "the Qwen-Image text encoder (qwen_2.5_vl_7b; Load CLIP type qwen_image)",
}


def _layer_in_width(diffusion_model, path: str | None) -> int | None:
    """Input width of the Linear at ``path``; None when this variant has no such layer."""
    if path is None:
        return None
    try:
        layer = diffusion_model.get_submodule(path)
    except AttributeError:
        return None
    width = getattr(layer, "in_features", None)
    if width is None and isinstance(getattr(layer, "weight", None), torch.Tensor) and layer.weight.dim() == 2:
        width = layer.weight.shape[1]
    return int(width) if width is not None else None


class ConditioningCheck:
    """What one loaded ComfyUI model takes as CONDITIONING, and the per-sample check against it."""

    def __init__(self, model):
        self.architecture = architecture_of(model)
        diffusion_model = model.model.diffusion_model
        self.title = family(self.architecture).title
        self.text_width = _layer_in_width(diffusion_model, TEXT_LAYERS.get(self.architecture))
        self.pooled_width = _layer_in_width(diffusion_model, POOLED_LAYERS.get(self.architecture))
        self.clip_vision_width = _layer_in_width(diffusion_model, CLIP_VISION_LAYERS.get(self.architecture))
        self.encoder = TEXT_ENCODERS.get(self.architecture, f"the {self.title} text encoder")

    def check(self, index: int, conditioning) -> None:
        """Refuse sample ``index``'s CONDITIONING when this model could not take it."""
        self.check_input(f"Train LoRA: sample {index}", conditioning)

    def check_input(self, where: str, conditioning) -> None:
        """Refuse a CONDITIONING this model could not take; ``where`` starts each message ("Node: input")."""
        if not isinstance(conditioning, (list, tuple)) or not conditioning:
            raise MusubiError(f"{where} has no conditioning; connect the CONDITIONING of a text encode node.")
        for entry in conditioning:
            context, options = entry[0], entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            self._check_text(where, context, options.get("pooled_output"))
            self._check_guidance(where, options.get("guidance"))
            self._check_clip_vision(where, options.get("clip_vision_output"))

    def _check_text(self, where: str, context, pooled) -> None:
        if not isinstance(context, torch.Tensor) or context.dim() != 3:
            shape = list(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise MusubiError(f"{where}'s conditioning is {shape}, not text-encoder states [batch, tokens, width]; "
                              f"connect the output of a text encode node using {self.encoder}.")
        width = context.shape[-1]
        pooled_width = pooled.shape[-1] if isinstance(pooled, torch.Tensor) else None
        fix = f"Encode the captions with {self.encoder}"
        if self.text_width is not None and width != self.text_width:
            raise MusubiError(f"{where}'s conditioning is {width} wide{_as_whose(width, pooled_width)}, but this "
                              f"{self.title} model takes {self.text_width}-wide text. {fix}.")
        if self.architecture in NEEDS_POOLED and pooled_width is None:
            needed = f" ({self.pooled_width} wide, from clip_l)" if self.pooled_width else ""
            raise MusubiError(f"{where}'s conditioning has no pooled output, which this {self.title} model needs{needed}; "
                              f"it is {width} wide without one{_as_whose(width, None)}. {fix}.")
        if self.architecture not in NEEDS_POOLED and pooled_width is not None:
            raise MusubiError(f"{where}'s conditioning carries a {pooled_width}-wide pooled output"
                              f"{_as_whose(width, pooled_width)}; {self.title} models take none. {fix}.")
        if self.pooled_width is not None and pooled_width != self.pooled_width:
            raise MusubiError(f"{where}'s pooled output is {pooled_width} wide, but this {self.title} model takes "
                              f"{self.pooled_width} (clip_l). {fix}.")
        for name, tensor in (("conditioning", context), ("pooled output", pooled)):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise MusubiError(f"{where}'s {name} holds NaN/inf values; encode the caption again "
                                  "(in float32 or bfloat16 if the text encoder ran in float16).")

    def _check_guidance(self, where: str, guidance) -> None:
        if guidance is None:
            return
        if isinstance(guidance, torch.Tensor) and guidance.numel() == 1:
            guidance = guidance.item()
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise MusubiError(f"{where}'s guidance is {guidance!r}; set a finite number (FluxGuidance's guidance).")

    def _check_clip_vision(self, where: str, clip_vision_output) -> None:
        states = getattr(clip_vision_output, "penultimate_hidden_states", None)
        if self.clip_vision_width is None or not isinstance(states, torch.Tensor):
            return
        if states.shape[-1] != self.clip_vision_width:
            raise MusubiError(
                f"{where}'s clip_vision_output is {states.shape[-1]} wide, but this {self.title} image-to-video model "
                f"takes {self.clip_vision_width}-wide CLIP-vision states. Encode the start image with CLIP Vision "
                "Encode using clip_vision_h."
            )


def _as_whose(width: int, pooled_width: int | None) -> str:
    """", as Qwen-Image's" — the families whose text encoders give this width (and pooled width)."""
    owners = [f"{family(name).title}'s" for name in COMFYUI_NATIVE if expected_widths(name) == (width, pooled_width)]
    return f", as {' or '.join(owners)}" if owners else ""


def check_conditioning(model, data) -> ConditioningCheck:
    """Check the samples' CONDITIONING before the first step: every sample when the data is held in
    memory (graph inputs), else the first (a dataset's captions all come from one text encoder, and
    every other sample is checked when it is first used)."""
    checker = ConditioningCheck(model)
    count = len(data) if isinstance(data, GraphTrainingData) else min(1, len(data))
    for index in range(count):
        checker.check(index, data.conditioning(index))
    return checker


def block_keys(diffusion_model) -> list[tuple[str, int]]:
    """The ("double_block"/"single_block", i) keys ComfyUI's block-replace patches use."""
    keys = []
    for attribute, kind in (("blocks", "double_block"), ("double_blocks", "double_block"),
                            ("transformer_blocks", "double_block"), ("single_blocks", "single_block")):
        blocks = getattr(diffusion_model, attribute, None)
        if isinstance(blocks, torch.nn.ModuleList):
            keys += [(kind, index) for index in range(len(blocks))]
    return keys


# ComfyUI's Flux-style blocks (Flux, HunyuanVideo) add to activations in place after saving them
# for the backward pass, which autograd refuses (core's trainer fails on HunyuanVideo without
# checkpointing for this reason). For them, tensors saved inside a block are kept as copies.
IN_PLACE_BLOCKS = {"flux", "hunyuan_video"}


def _copy_saved(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone()


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _run_block_keeping_saved_copies(args, extra):
    with torch.autograd.graph.saved_tensors_hooks(_copy_saved, _keep):
        return extra["original_block"](args)


def frozen_closure(function):
    """A copy of ``function`` whose closure variables keep the values they have now.

    ComfyUI's Flux/HunyuanVideo forwards define each block's wrapper over the loop variable that
    holds the block, so by the backward pass every wrapper would call the last block; a
    checkpoint's recompute must call the block of its own forward.
    """
    closure = function.__closure__
    if not closure:
        return function
    cells = []
    for cell in closure:
        try:
            cells.append(types.CellType(cell.cell_contents))
        except ValueError:  # a variable not yet assigned stays unassigned
            cells.append(types.CellType())
    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__, tuple(cells))
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy


def _checkpointed(args: dict, extra: dict, in_place: bool) -> dict:
    """Run a block under the reentrant checkpoint: nothing is saved in the forward, and the block
    is replayed in the backward pass as an ordinary forward.

    Measured on a tiny Wan (bench/train_step.py), it costs about the recompute itself, where the
    non-reentrant checkpoint's per-tensor hooks added as much again. A constant that requires
    grad makes the LoRA weights of the first block train too (the reentrant checkpoint passes
    gradients only when an input needs them). Blocks that change saved activations in place
    (Flux, HunyuanVideo) get cloned inputs and keep copies of what they save during the replay.
    """
    block = frozen_closure(extra["original_block"])
    names = [name for name, value in args.items() if isinstance(value, torch.Tensor)]
    others = {name: value for name, value in args.items() if name not in names}
    output_names: list[str] = []

    def run(_anchor, *tensors):
        if in_place:
            with torch.autograd.graph.saved_tensors_hooks(_copy_saved, _keep):
                out = block({**others, **{name: tensor.clone() for name, tensor in zip(names, tensors)}})
        else:
            out = block({**others, **dict(zip(names, tensors))})
        output_names[:] = list(out)
        return tuple(out[name] for name in output_names)

    anchor = torch.zeros((), requires_grad=True)
    inputs = [args[name].clone() if in_place else args[name] for name in names]
    outputs = torch.utils.checkpoint.checkpoint(run, anchor, *inputs, use_reentrant=True)
    return dict(zip(output_names, outputs))


def _run_block_checkpointed(args, extra):
    return _checkpointed(args, extra, in_place=False)


def _run_in_place_block_checkpointed(args, extra):
    return _checkpointed(args, extra, in_place=True)


class ItemConditions:
    """Each training item's CONDITIONING turned into model inputs by ComfyUI's own ``extra_conds``
    — on demand, so a large dataset's conditionings never sit on the device all at once; the
    most recently used ones are kept. Each is checked against the model before ComfyUI sees it, so
    a streamed sample that does not fit is named instead of failing inside the model."""

    def __init__(self, model, data, keep: int = 32, checker: ConditioningCheck | None = None):
        self.model, self.data, self.keep = model, data, keep
        self.checker = checker or ConditioningCheck(model)
        self.cache: collections.OrderedDict[int, dict] = collections.OrderedDict()

    def __getitem__(self, index: int) -> dict:
        if index in self.cache:
            self.cache.move_to_end(index)
            return self.cache[index]
        device = self.model.load_device
        noise = self.data.latent(index).unsqueeze(0).float()
        conditioning = self.data.conditioning(index)
        self.checker.check(index, conditioning)
        conds = comfy.sampler_helpers.convert_cond(conditioning)
        conds = comfy.samplers.encode_model_conds(self.model.model.extra_conds, conds, noise, device, "positive",
                                                  latent_image=noise)
        model_conds = conds[0]["model_conds"]
        encoded = {key: value.process_cond(batch_size=1, device=device, area=None) for key, value in model_conds.items()}
        self.cache[index] = encoded
        while len(self.cache) > self.keep:
            self.cache.popitem(last=False)
        return encoded


class ComfyModelAdapter:
    """Predicts velocities with a loaded ComfyUI model; each batch names its items by ``index``."""

    def __init__(self, model, data, checker: ConditioningCheck | None = None):
        self.model = model
        self.base_model = model.model
        self.architecture = architecture_of(model)
        self.conditions = ItemConditions(model, data, checker=checker)
        self.set_gradient_checkpointing(False)

    @classmethod
    def prepare(cls, model, data) -> "ComfyModelAdapter":
        """Check the data fits the model (latent layout, conditioning widths), load the model and make
        its weights usable by autograd."""
        check_latent_layout(model, [data.latent_shape(index) for index in range(len(data))])
        checker = check_conditioning(model, data)
        comfy.model_management.load_models_gpu([model])
        make_weights_usable_by_autograd(model.model.diffusion_model)
        return cls(model, data, checker)

    def lora_root(self) -> torch.nn.Module:
        return self.base_model.diffusion_model

    def activate(self) -> None:
        """Make sure this model is on its device (of two experts, ComfyUI may have offloaded it)."""
        comfy.model_management.load_models_gpu([self.model])

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        in_place = self.architecture in IN_PLACE_BLOCKS
        if enabled:
            run = _run_in_place_block_checkpointed if in_place else _run_block_checkpointed
        else:
            run = _run_block_keeping_saved_copies if in_place else None
        replace = {key: run for key in block_keys(self.base_model.diffusion_model)} if run else {}
        self.transformer_options = {"patches_replace": {"dit": replace}} if replace else {}

    def velocity_target(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return flow_matching_velocity(latents, noise)

    def predict_velocity(self, noisy_latents: torch.Tensor, noise_level: torch.Tensor, batch) -> torch.Tensor:
        item_conds = [self.conditions[index] for index in batch["index"].tolist()]
        sigma = noise_level.to(noisy_latents.device, torch.float32)
        groups = concatenable_groups(item_conds)
        if len(groups) == 1:
            denoised = self._denoise(noisy_latents, sigma, item_conds)
        else:  # e.g. captions of different token counts with their attention masks: one call per group
            denoised = torch.empty(noisy_latents.shape, dtype=torch.float32, device=noisy_latents.device)
            for rows in groups:
                denoised[rows] = self._denoise(noisy_latents[rows], sigma[rows], [item_conds[row] for row in rows]).float()
        shape = (-1,) + (1,) * (noisy_latents.dim() - 1)
        return (noisy_latents.float() - denoised) / sigma.clamp(min=1e-4).reshape(shape)

    def _denoise(self, noisy_latents, sigma, item_conds: list[dict]) -> torch.Tensor:
        conds = comfy.samplers.cond_cat(item_conds)
        return self.base_model.apply_model(noisy_latents, sigma, transformer_options=dict(self.transformer_options), **conds)


def concatenable_groups(item_conds: list[dict]) -> list[list[int]]:
    """Rows whose model inputs ComfyUI can batch together (its own ``can_concat`` rule), in order
    of first appearance; a batch of equal captions is one group."""
    groups: list[list[int]] = []
    for row, conds in enumerate(item_conds):
        for group in groups:
            first = item_conds[group[0]]
            if first.keys() == conds.keys() and all(first[key].can_concat(conds[key]) for key in conds):
                group.append(row)
                break
        else:
            groups.append([row])
    return groups
