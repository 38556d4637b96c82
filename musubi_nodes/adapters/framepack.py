"""The library's FramePack adapter fed from a ComfyUI FramePack MODEL and ComfyUI CONDITIONING.

Each sample's CONDITIONING gives the text (``cross_attn`` and ``pooled_output`` of the
HunyuanVideo text encoder) and, if present, the SigLIP image embedding as ``clip_vision_output``;
otherwise the embedding connected to FramePack Training Settings is used for every sample.
"""

from __future__ import annotations

import collections

import comfy.model_management
import torch

from ...musubi.data.latent_cache import LatentCacheDataset
from ...musubi.errors import MusubiError
from ...musubi.framepack import training_sections as sections
from ...musubi.framepack.adapter import CONTEXT_KEY, IMAGE_EMBEDS_KEY, POOLED_KEY, FramePackAdapter
from ...musubi.framepack.section_items import RECENT_SECTIONS, FramePackSections
from .comfy_model import make_weights_usable_by_autograd

NODE = "Train LoRA"


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
