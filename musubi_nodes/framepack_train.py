"""FramePack Training Settings: how Train LoRA cuts a FramePack model's training samples into sections.

The cutting itself is :mod:`musubi.framepack.section_items`; the ComfyUI side of training a
FramePack MODEL is :mod:`.adapters.framepack`.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..musubi.errors import MusubiError
from ..musubi.framepack import training_sections as sections

FramePackTrainingSettings = io.Custom("MUSUBI_FRAMEPACK_TRAINING_SETTINGS")


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
