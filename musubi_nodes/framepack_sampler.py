"""FramePack Sampler: image to video by sections (vanilla backwards or F1 forwards), with MagCache.

The loop, schedule, solver and MagCache decisions live in :mod:`musubi.framepack`; this node turns
ComfyUI's inputs (CONDITIONING from a HunyuanVideo text encode, CLIP_VISION_OUTPUT from SigLIP,
the start image's LATENT from the HunyuanVideo VAE) into the model's inputs and calls the MODEL
through ``apply_model``, so LoRAs and wrappers on the MODEL take part.
"""

from __future__ import annotations

import os

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..musubi.errors import MusubiError
from ..musubi.framepack.calibration import (
    MAGCACHE_MODES,
    PUBLISHED_RATIOS,
    magcache_plan,
    paste_string,
    published_key,
    save_section_calibration,
)
from ..musubi.framepack.sampling import FramePackRun, SectionInputs, sample_video
from ..musubi.framepack.sampling_sections import DIRECTIONS, sections_for_duration
from .framepack_model import FRAMEPACK_INPUTS, framepack_transformer
from .magcache import MAGCACHE_FOLDER, magcache_folder_root
from .paths import missing_file_message, new_output_path

NODE = "FramePack Sampler"
TEXT_WIDTH, POOLED_WIDTH, IMAGE_WIDTH = 4096, 768, 1152


def _text(conditioning, name: str, config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [1, L, D] of the attended tokens, pooled [1, P]) from a HunyuanVideo text encode."""
    if not conditioning:
        raise MusubiError(f"{NODE}: {name} is empty; connect CLIPTextEncode with a HunyuanVideo text encoder (DualCLIPLoader, type hunyuan_video).")
    context, options = conditioning[0][0], conditioning[0][1]
    width = config.get("text_embed_dim", TEXT_WIDTH)
    if context.dim() != 3 or context.shape[-1] != width:
        raise MusubiError(
            f"{NODE}: {name} has text states of shape {tuple(context.shape)}; FramePack needs LLaVA-Llama3 states "
            f"[1, tokens, {width}] — encode the prompt with DualCLIPLoader (llava_llama3 + clip_l, type hunyuan_video)."
        )
    pooled = options.get("pooled_output")
    pooled_width = config.get("pooled_projection_dim", POOLED_WIDTH)
    if pooled is None or pooled.shape[-1] != pooled_width:
        raise MusubiError(
            f"{NODE}: {name} has no CLIP-L pooled output of width {pooled_width}; encode the prompt with "
            "DualCLIPLoader (llava_llama3 + clip_l, type hunyuan_video)."
        )
    context = context[:1]
    mask = options.get("attention_mask")
    if mask is not None:
        # Keep the attended tokens only: for one prompt this is the same as passing the mask.
        context = context[:, mask[0].reshape(-1).bool().to(context.device)]
    if context.shape[1] == 0:
        raise MusubiError(f"{NODE}: {name} attends to no token; write a prompt.")
    return context, pooled[:1].reshape(1, -1)


def _image_embeds(clip_vision_output, config: dict) -> torch.Tensor:
    state = getattr(clip_vision_output, "last_hidden_state", None)
    width = config.get("image_proj_dim", IMAGE_WIDTH)
    if state is None or state.dim() != 3 or state.shape[-1] != width:
        shape = None if state is None else tuple(state.shape)
        raise MusubiError(
            f"{NODE}: the image embedding has shape {shape}; FramePack needs SigLIP's last hidden state [1, 729, {width}] — "
            "use CLIPVisionLoader with sigclip_vision_patch14_384.safetensors and CLIPVisionEncode."
        )
    return state[:1]


def _start_latent(latent: dict, name: str = "start_latent") -> torch.Tensor:
    samples = latent["samples"]
    if samples.dim() != 5 or samples.shape[1] != 16:
        raise MusubiError(
            f"{NODE}: {name} has shape {tuple(samples.shape)}; encode the start image with VAE Encode and the "
            "HunyuanVideo VAE (hunyuan_video_vae_bf16.safetensors), which gives [1, 16, 1, H/8, W/8]."
        )
    if samples.shape[-1] % 2 or samples.shape[-2] % 2:
        raise MusubiError(f"{NODE}: the {name} image must be a multiple of 16 pixels wide and high (latent {tuple(samples.shape[-2:])}).")
    return samples[:1, :, :1]


class MusubiFramePackSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        saved = folder_paths.get_filename_list(MAGCACHE_FOLDER)
        return io.Schema(
            node_id="MusubiFramePackSampler",
            display_name=NODE,
            category="musubi/sampling",
            description="Image to video with FramePack, section by section as musubi-tuner and lllyasviel's demos do: vanilla generates the sections from the end of the video backwards, F1 forwards; each section sees the start frame and the frames generated so far. UniPC (bh1) with FramePack's shifted schedule; MagCache skips predictable steps, restarting in every section. Decode the LATENT with VAE Decode and the HunyuanVideo VAE.",
            inputs=[
                io.Model.Input("model", tooltip="A FramePack model from Load FramePack DiT (LoRA loaders may come between). Use F1 weights with direction f1."),
                io.Conditioning.Input("positive", tooltip="The prompt: CLIPTextEncode with DualCLIPLoader (llava_llama3 + clip_l, type hunyuan_video)."),
                io.ClipVisionOutput.Input("clip_vision_output", tooltip="CLIPVisionEncode of the start image with sigclip_vision_patch14_384 (SigLIP, 729 × 1152)."),
                io.Latent.Input("start_latent", tooltip="VAE Encode of the start image with the HunyuanVideo VAE; its size sets the video's size (multiples of 16 pixels)."),
                io.Combo.Input("direction", options=list(DIRECTIONS), default="vanilla",
                               tooltip="vanilla: FramePack's inverted anti-drifting order (last section first). f1: FramePack-F1, forwards (use the F1 weights)."),
                io.Float.Input("total_seconds", default=5.0, min=0.1, max=600.0, step=0.1,
                               tooltip="Video length; sections = round(seconds × fps / (latent_window_size × 4)), at least 1. Ignored when sections > 0."),
                io.Int.Input("fps", default=30, min=1, max=120, tooltip="Frame rate the length is counted in (FramePack is trained at 30)."),
                io.Int.Input("sections", default=0, min=0, max=1000,
                             tooltip="Number of sections to generate directly (each latent_window_size latent frames); 0: from total_seconds and fps."),
                io.Int.Input("latent_window_size", default=9, min=1, max=33, tooltip="Latent frames per section (9 = 33 video frames, FramePack's trained value)."),
                io.Int.Input("steps", default=25, min=1, max=200, tooltip="UniPC steps per section."),
                io.Float.Input("cfg", default=1.0, min=1.0, max=32.0, step=0.1,
                               tooltip="Real classifier-free guidance; 1 (FramePack's default) runs one model call per step and ignores negative."),
                io.Float.Input("distilled_guidance", default=10.0, min=0.0, max=32.0, step=0.1,
                               tooltip="The guidance scale embedded into the model (FramePack's 10)."),
                io.Float.Input("shift", default=0.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Time shift of the schedule; 0 = automatic from the section size as FramePack does (capped at 7, which every real resolution reaches)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of one CPU generator that draws every section's noise in turn."),
                io.Combo.Input("magcache", options=list(MAGCACHE_MODES), default="on",
                               tooltip="on: skip predictable steps (reset every section). off: compute every step. calibrate: compute every step, measure this model's curve and save it to models/magcache."),
                io.Float.Input("magcache_threshold", default=0.1, min=0.0, max=10.0, step=0.01,
                               tooltip="Most accumulated error before a step must be computed; 0 skips nothing (identical to off). The MagCache authors use 0.1 for FramePack (musubi-tuner defaults to 0.24)."),
                io.Int.Input("magcache_K", default=3, min=0, max=100, tooltip="Most steps skipped in a row (authors: 3; musubi-tuner: 6)."),
                io.Float.Input("magcache_retention_ratio", default=0.2, min=0.0, max=0.99, step=0.01,
                               tooltip="Fraction of the first steps of every section that is always computed; the last step is always computed too."),
                io.Combo.Input("magcache_ratios", options=["auto", *PUBLISHED_RATIOS, *saved], default="auto",
                               tooltip="auto: the MagCache authors' FramePack curve (vanilla) or F1 curve (f1), 25 steps, resampled to your step count, with their rule that a step whose own ratio is off 1 by more than 0.06 is computed. framepack_musubi_default is musubi-tuner's built-in default, which is really a HunyuanVideo curve. *.json: a calibration saved by magcache = calibrate."),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative prompt, used only when cfg > 1."),
                io.String.Input("pasted_ratios", default="", multiline=True, optional=True, placeholder="1.00000,1.26562,…",
                                tooltip="Optional ratios (comma-separated, e.g. from a calibration); replace magcache_ratios when not empty."),
                io.String.Input("calibration_name", default="", optional=True, placeholder="(auto: framepack_<direction>_<steps>steps)",
                                tooltip="Name of the calibration saved in models/magcache when magcache = calibrate (never overwrites)."),
                io.Latent.Input("end_latent", optional=True,
                                tooltip="Optional end image (VAE Encode, same size as the start image), vanilla direction only: the video is drawn towards it, as musubi-tuner's --end_image_path."),
            ],
            outputs=[
                io.Latent.Output(tooltip="The video latent [1, 16, 1 + sections × window, H, W]; decode it with VAE Decode (HunyuanVideo VAE)."),
                io.String.Output("report", tooltip="Sections, schedule, and what MagCache skipped or measured."),
            ],
        )

    @classmethod
    def validate_inputs(cls, magcache_ratios: str | None = None, pasted_ratios: str | None = "") -> bool | str:
        """A calibration file missing from models/magcache is reported when the prompt is queued
        (pasted ratios replace the pick, so then nothing is checked)."""
        if magcache_ratios is None or pasted_ratios is None or pasted_ratios.strip():
            return True
        if magcache_ratios == "auto" or magcache_ratios in PUBLISHED_RATIOS:
            return True
        return missing_file_message(NODE, "magcache_ratios", MAGCACHE_FOLDER, magcache_ratios) or True

    @classmethod
    def execute(cls, model, positive, clip_vision_output, start_latent, direction: str, total_seconds: float, fps: int,
                sections: int, latent_window_size: int, steps: int, cfg: float, distilled_guidance: float, shift: float,
                seed: int, magcache: str, magcache_threshold: float, magcache_K: int, magcache_retention_ratio: float,
                magcache_ratios: str, negative=None, pasted_ratios: str = "", calibration_name: str = "",
                end_latent=None) -> io.NodeOutput:
        if framepack_transformer(model) is None:
            raise MusubiError(f"{NODE}: the model is a {type(model.model).__name__}, not FramePack; load it with Load FramePack DiT.")
        config = model.model.model_config.unet_config["framepack_config"]
        if magcache == "calibrate" and (calibration_name or "").strip():  # a bad name fails now, not after sampling
            new_output_path(NODE, MAGCACHE_FOLDER, calibration_name, extension=".json", option="calibration_name")
        try:
            plan, magcache_label = magcache_plan(
                magcache, direction, steps, magcache_threshold, magcache_K, magcache_retention_ratio, magcache_ratios,
                pasted_ratios, saved_path=folder_paths.get_full_path(MAGCACHE_FOLDER, magcache_ratios),
                saved_folder=f"models/{MAGCACHE_FOLDER}",
            )
        except MusubiError as error:
            raise MusubiError(str(error) if str(error).startswith(NODE) else f"{NODE}: {error}") from None
        count = sections if sections > 0 else sections_for_duration(total_seconds, fps, latent_window_size)
        texts = {"cond": _text(positive, "positive", config)}
        if cfg != 1:
            if negative is None:
                raise MusubiError(f"{NODE}: cfg {cfg:g} needs a negative prompt; connect one or set cfg to 1.")
            texts["uncond"] = _text(negative, "negative", config)
        image_embeds = _image_embeds(clip_vision_output, config)
        base = model.model
        start = base.process_latent_in(_start_latent(start_latent).float())
        end = None
        if end_latent is not None:
            if direction != "vanilla":
                raise MusubiError(f"{NODE}: end_latent works with direction vanilla only (F1 generates forwards); disconnect it or switch direction.")
            end = base.process_latent_in(_start_latent(end_latent, "end_latent").float())
            if end.shape != start.shape:
                raise MusubiError(f"{NODE}: end_latent {list(end.shape)} must have the start latent's size {list(start.shape)}; encode both images at one size.")

        # Activations grow with the latent pixels of a section and its context (1 + 2 + 16 frames).
        context_pixels = start.shape[-1] * start.shape[-2] * (latent_window_size + 19)
        comfy.model_management.load_models_gpu([model], memory_required=base.memory_required([1, 16, context_pixels, 1, 1]))
        device = model.load_device
        transformer = framepack_transformer(model)
        options = comfy.model_patcher.create_model_options_clone(model.model_options).setdefault("transformer_options", {})
        guidance = torch.tensor([distilled_guidance * 1000.0])

        def predict(x: torch.Tensor, sigma: float, inputs: SectionInputs) -> torch.Tensor:
            context, pooled = texts[inputs.branch]
            section = inputs.section
            call = {
                "encoder_hidden_states": context,
                "encoder_attention_mask": torch.ones(context.shape[:2], dtype=torch.long),
                "pooled_projections": pooled,
                "image_embeds": image_embeds,
                "guidance": guidance,
                "indices_latents": torch.tensor(section.latent_indices),
                "latents_clean": inputs.clean_latents,
                "indices_latents_clean": torch.tensor(section.clean_indices),
                "latents_history_2x": inputs.history_2x,
                "indices_latents_history_2x": torch.tensor(section.history_2x_indices),
                "latents_history_4x": inputs.history_4x,
                "indices_latents_history_4x": torch.tensor(section.history_4x_indices),
            }
            sigma_tensor = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=device)
            # The keys ComfyUI's own sampling puts there, for wrappers that read them.
            call_options = {**options, "sigmas": sigma_tensor, "cond_or_uncond": [0 if inputs.branch == "cond" else 1]}
            return base.apply_model(x.to(device), sigma_tensor, transformer_options=call_options, **{FRAMEPACK_INPUTS: call})

        progress = comfy.utils.ProgressBar(count * steps)

        def on_step(section, step) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update(1)

        run = FramePackRun(sections=count, window=latent_window_size, steps=steps, direction=direction, cfg=cfg,
                           shift=shift or None, seed=seed)
        model.pre_run()
        try:
            result = sample_video(predict, start.to(device), run, transformer=transformer, magcache=plan, on_step=on_step,
                                  end=None if end is None else end.to(device))
        finally:
            model.cleanup()
        video = base.process_latent_out(result.video.float()).to(comfy.model_management.intermediate_device())

        lines = [
            f"FramePack {direction}: {count} section(s) of {latent_window_size} latent frames, {steps} steps, cfg {cfg:g}, "
            f"distilled guidance {distilled_guidance:g}, shift {result.shifts[0]:.4g}",
            f"video latent {list(video.shape)} ({(video.shape[2] - 1) * 4 + 1} frames)",
            magcache_label,
        ]
        calls_per_step = len(texts)
        if plan is not None and not plan.calibrate:
            lines += result.section_reports
            lines.append(f"model calls: {result.computed_calls} computed, {result.skipped_calls} skipped")
        else:
            lines.append(f"model calls: {count * steps * calls_per_step} computed")
        if plan is not None and plan.calibrate:
            name = (calibration_name or "").strip() or f"framepack_{direction}_{steps}steps"
            path = new_output_path(NODE, MAGCACHE_FOLDER, name, extension=".json", option="calibration_name")
            payload = save_section_calibration(path, result.recorders, steps, extra={
                "direction": direction, "seed": seed, "cfg": cfg, "latent_shape": list(start.shape),
                "published_counterpart": published_key(direction),
            })
            listed = os.path.relpath(path, magcache_folder_root(path)).replace(os.sep, "/")
            lines.append(f"ratios: {paste_string(payload['ratios'])}")
            lines.append(f"saved {path} (listed as '{listed}' in magcache_ratios)")
        report = "\n".join(lines)
        return io.NodeOutput({"samples": video}, report, ui=ui.PreviewText(report))

