"""FramePack in Train LoRA: the FramePack Training Settings node and the glue that trains a FramePack MODEL.

When Train LoRA gets a FramePack MODEL, every training sample — a HunyuanVideo-VAE video latent
``[16, T, H, W]`` with its CONDITIONING — is cut into musubi-tuner's sections
(:mod:`musubi.framepack.training_sections`), one training item per section, and the model is
driven by the library's FramePack adapter. Each sample's CONDITIONING gives the text
(``cross_attn`` and ``pooled_output`` of the HunyuanVideo text encoder) and, if present, the
SigLIP image embedding as ``clip_vision_output``; otherwise the embedding connected to the
settings node is used for every sample.
"""

from __future__ import annotations

import collections

import comfy.model_management
import torch
from comfy_api.latest import io

from ..musubi.errors import MusubiError
from ..musubi.framepack import training_sections as sections
from ..musubi.framepack.adapter import CONTEXT_KEY, IMAGE_EMBEDS_KEY, POOLED_KEY, FramePackAdapter
from ..musubi.data.latent_cache import LatentCacheDataset
from .framepack_model import framepack_transformer
from .train_adapter import make_weights_usable_by_autograd

NODE = "Train LoRA"
FramePackTrainingSettings = io.Custom("MUSUBI_FRAMEPACK_TRAINING_SETTINGS")
# HunyuanVideo VAE latents are scaled by this before the model sees them (ComfyUI and musubi-tuner alike).
LATENT_CHANNELS = 16
RECENT_SECTIONS = 16  # sections kept cut (and samples' conditionings kept converted) between batches

DEFAULT_SETTINGS = {
    "layout": "vanilla",
    "latent_window_size": sections.LATENT_WINDOW_SIZE,
    "one_frame_target_index": sections.LATENT_WINDOW_SIZE,
    "one_frame_clean_indices": (0,),
    "one_frame_no_post": False,
    "guidance_scale": 1.0,
    "clip_vision_output": None,
}


class MusubiFramePackTrainingSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiFramePackTrainingSettings",
            display_name="FramePack Training Settings",
            category="musubi/training",
            description="How Train LoRA cuts FramePack training samples into sections (musubi-tuner's FramePack caching): vanilla (inverted anti-drifting), F1, or one-frame (image editing).",
            inputs=[
                io.Combo.Input("layout", options=list(sections.LAYOUTS), default="vanilla",
                               tooltip="vanilla: FramePack's backwards sampling, each section sees the video after it. f1: FramePack-F1, each section sees the 19 frames before it. one_frame: each sample is control image(s) then one target image."),
                io.Int.Input("latent_window_size", default=sections.LATENT_WINDOW_SIZE, min=1, max=33,
                             tooltip="Latent frames per section (9 as in FramePack; a video needs window·4+1 frames at least)."),
                io.Int.Input("one_frame_target_index", default=sections.LATENT_WINDOW_SIZE, min=0, max=128,
                             tooltip="one_frame: frame index of the target image (9 by default; larger = bigger change, kisekaeichi uses 1)."),
                io.String.Input("one_frame_clean_indices", default="0",
                                tooltip="one_frame: frame index of each control image, comma separated (0; 0,1 for 1f-mc; 0,10 for kisekaeichi)."),
                io.Boolean.Input("one_frame_no_post", default=False,
                                 tooltip="one_frame: leave out the zero frame after the window (kisekaeichi sets this)."),
                io.Float.Input("guidance_scale", default=1.0, min=0.0, max=32.0, step=0.1,
                               tooltip="Distilled guidance the model is told during training (musubi-tuner trains with 1.0)."),
                io.ClipVisionOutput.Input("clip_vision_output", optional=True,
                                          tooltip="SigLIP image embedding (CLIP Vision Encode with sigclip_vision_patch14_384, crop none) used for every sample whose conditioning carries none."),
            ],
            outputs=[FramePackTrainingSettings.Output("framepack_settings", tooltip="For Train LoRA's framepack_settings input.")],
        )

    @classmethod
    def execute(cls, layout, latent_window_size, one_frame_target_index, one_frame_clean_indices, one_frame_no_post,
                guidance_scale, clip_vision_output=None) -> io.NodeOutput:
        return io.NodeOutput({
            "layout": layout,
            "latent_window_size": latent_window_size,
            "one_frame_target_index": one_frame_target_index,
            "one_frame_clean_indices": parse_indices(one_frame_clean_indices),
            "one_frame_no_post": one_frame_no_post,
            "guidance_scale": guidance_scale,
            "clip_vision_output": clip_vision_output,
        })


def parse_indices(text: str) -> tuple[int, ...]:
    parts = [part.strip() for part in (text or "").replace(";", ",").split(",") if part.strip()]
    try:
        return tuple(int(part) for part in parts) or (0,)
    except ValueError:
        raise MusubiError(f"FramePack Training Settings: one_frame_clean_indices {text!r} must be whole numbers separated by commas, e.g. 0 or 0,10.") from None


class FramePackSections:
    """Train LoRA's samples cut into FramePack sections: one training item per section.

    Offers the training-data interface of ``nodes/training_data.py`` (the target latents of a
    section as the item's latent) plus each section's context tensors.
    """

    def __init__(self, data, settings: dict):
        self.data = data
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        layout, window = self.settings["layout"], self.settings["latent_window_size"]
        options = {}
        if layout == "one_frame":
            options = {"target_index": self.settings["one_frame_target_index"],
                       "clean_indices": self.settings["one_frame_clean_indices"], "no_post": self.settings["one_frame_no_post"]}
        self.entries: list[tuple[int, sections.Section]] = []
        for sample in range(len(data)):
            shape = tuple(data.latent_shape(sample))
            if len(shape) != 4 or shape[0] != LATENT_CHANNELS:
                raise MusubiError(
                    f"{NODE}: sample {sample} has a latent of shape {list(shape)}; FramePack trains on HunyuanVideo VAE "
                    f"latents [{LATENT_CHANNELS}, T, H, W] (VAE Encode of the video with the HunyuanVideo VAE)."
                )
            try:
                cut = sections.sections_for(shape[1], layout, window, **options)
            except MusubiError as error:
                raise MusubiError(f"{NODE}: sample {sample}: {error}") from None
            self.entries.extend((sample, section) for section in cut)
        self._recent: collections.OrderedDict[int, dict[str, torch.Tensor]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def latent_shape(self, index: int) -> tuple[int, ...]:
        sample, section = self.entries[index]
        channels, _, height, width = self.data.latent_shape(sample)
        return (channels, len(section.target_frames), height, width)

    def section_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """The target, context latents and frame indices of section ``index`` (VAE latent space)."""
        if index in self._recent:
            self._recent.move_to_end(index)
            return self._recent[index]
        sample, section = self.entries[index]
        self._recent[index] = sections.cut_section(self.data.latent(sample).float(), section)
        while len(self._recent) > RECENT_SECTIONS:
            self._recent.popitem(last=False)
        return self._recent[index]

    def latent(self, index: int) -> torch.Tensor:
        return self.section_tensors(index)[sections.TARGET_KEY]

    def conditioning(self, index: int) -> list:
        return self.data.conditioning(self.entries[index][0])


def framepack_training_data(model, data, settings: dict | None):
    """Train LoRA's data cut into FramePack sections when ``model`` is FramePack; otherwise unchanged."""
    if framepack_transformer(model) is None:
        if settings is not None:
            raise MusubiError(f"{NODE}: FramePack Training Settings is connected but the model is not a FramePack model; "
                              "disconnect it, or load FramePack with Load FramePack DiT.")
        return data
    return FramePackSections(data, settings)


def framepack_adapter(model, data):
    """The adapter that trains a FramePack MODEL on :class:`FramePackSections`; None for other models."""
    transformer = framepack_transformer(model)
    if transformer is None:
        return None
    if not isinstance(data, FramePackSections):
        raise MusubiError(f"{NODE}: FramePack training data must be cut into sections first (framepack_training_data).")
    return ComfyFramePackAdapter.prepare(model, transformer, data)


def _image_embedding(value) -> torch.Tensor | None:
    if value is None:
        return None
    embedding = getattr(value, "last_hidden_state", None)
    if embedding is None and isinstance(value, dict):
        embedding = value.get("last_hidden_state")
    return embedding


class ComfyFramePackAdapter(FramePackAdapter):
    """The library's FramePack adapter fed from a ComfyUI FramePack MODEL; batches name sections by ``index``."""

    to_device = None  # ComfyUI places the model on its device

    def __init__(self, model, transformer, data: FramePackSections):
        super().__init__(transformer, data.settings["guidance_scale"], model.model.compute_dtype)
        self.model = model
        self.data = data
        self.process_latent_in = model.model.process_latent_in
        self._conditions: collections.OrderedDict[int, dict[str, torch.Tensor]] = collections.OrderedDict()

    @classmethod
    def prepare(cls, model, transformer, data: FramePackSections) -> "ComfyFramePackAdapter":
        adapter = cls(model, transformer, data)
        adapter._sample_conditioning(data.entries[0][0])  # a wrong kind of conditioning fails before the model loads
        comfy.model_management.load_models_gpu([model])
        make_weights_usable_by_autograd(transformer)
        return adapter

    def activate(self) -> None:
        comfy.model_management.load_models_gpu([self.model])

    def _sample_conditioning(self, sample: int) -> dict[str, torch.Tensor]:
        if sample in self._conditions:
            self._conditions.move_to_end(sample)
            return self._conditions[sample]
        conditioning = self.data.data.conditioning(sample)
        if not conditioning:
            raise MusubiError(f"{NODE}: sample {sample} has an empty conditioning.")
        context, options = conditioning[0][0], conditioning[0][1]
        config = self.transformer.config
        if context.dim() != 3 or context.shape[0] != 1 or context.shape[-1] != config.text_embed_dim:
            raise MusubiError(
                f"{NODE}: sample {sample}'s conditioning is {list(context.shape)}; FramePack needs the HunyuanVideo text "
                f"encoder's output [1, tokens, {config.text_embed_dim}] (CLIP loader type hunyuan_video: llava_llama3 + clip_l)."
            )
        pooled = options.get("pooled_output")
        if pooled is None or pooled.numel() != config.pooled_projection_dim:
            raise MusubiError(
                f"{NODE}: sample {sample}'s conditioning has no CLIP-L pooled output of width {config.pooled_projection_dim}; "
                "encode the caption with the hunyuan_video text encoders (llava_llama3 + clip_l)."
            )
        mask = options.get("attention_mask")
        if mask is not None:  # keep the attended tokens: for one caption the same as passing the mask
            context = context[:, mask[0].reshape(-1).bool().to(context.device)]
        if context.shape[1] == 0:
            raise MusubiError(f"{NODE}: sample {sample}'s conditioning has no attended text token; encode the caption again.")
        image = _image_embedding(options.get("clip_vision_output"))
        if image is None:
            image = _image_embedding(self.data.settings.get("clip_vision_output"))
        if image is None:
            raise MusubiError(
                f"{NODE}: FramePack needs the SigLIP embedding of the start image: connect CLIP Vision Encode "
                "(sigclip_vision_patch14_384, crop none) to FramePack Training Settings' clip_vision_output, or give "
                "each sample's conditioning a clip_vision_output."
            )
        if image.dim() == 2:
            image = image.unsqueeze(0)
        if image.dim() != 3 or image.shape[0] != 1 or image.shape[-1] != config.image_proj_dim:
            raise MusubiError(
                f"{NODE}: the image embedding is {list(image.shape)}; FramePack needs SigLIP's last hidden state "
                f"[1, 729, {config.image_proj_dim}] (CLIP Vision Encode with sigclip_vision_patch14_384), not another CLIP vision model."
            )
        self._conditions[sample] = {
            CONTEXT_KEY: context[0].detach().clone(),
            POOLED_KEY: pooled.reshape(-1).detach().clone(),
            IMAGE_EMBEDS_KEY: image[0].detach().clone(),
        }
        while len(self._conditions) > RECENT_SECTIONS:
            self._conditions.popitem(last=False)
        return self._conditions[sample]

    def _item_inputs(self, index: int) -> dict[str, torch.Tensor]:
        tensors = self.data.section_tensors(index)
        inputs = {key: tensors[key] for key in sections.INDEX_KEYS}
        with torch.no_grad():
            for key in (sections.CLEAN_LATENTS_KEY, sections.HISTORY_2X_KEY, sections.HISTORY_4X_KEY):
                inputs[key] = self.process_latent_in(tensors[key].unsqueeze(0).float())[0]
        inputs.update(self._sample_conditioning(self.data.entries[index][0]))
        return inputs

    def predict_velocity(self, noisy_latents: torch.Tensor, noise_level: torch.Tensor, batch) -> torch.Tensor:
        inputs = LatentCacheDataset.collate([self._item_inputs(index) for index in batch["index"].tolist()])
        inputs = {key: value.to(noisy_latents.device) for key, value in inputs.items()}
        return super().predict_velocity(noisy_latents, noise_level, inputs)
