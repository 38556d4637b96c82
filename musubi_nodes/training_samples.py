"""Training Samples: which prompts Train LoRA samples while it trains, how, and when."""

from __future__ import annotations

import logging
import os
import time

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..musubi.files import remove_leftovers, write_bytes_atomically
from ..musubi.training.samples import (
    SAMPLES_FOLDER,
    SampleTiming,
    encode_sample,
    log_to_trackers,
)
from .adapters.sampling import draw_sample

NODE = "Training Samples"
logger = logging.getLogger(__name__)
SAMPLES_EVENT = "musubi.train.samples"  # {node, prompt_id, client_id, step, images: [{filename, subfolder, type, label, …}]}
PREVIEW_SUBFOLDER = "musubi_samples"  # in ComfyUI's temp folder: what the live view shows
TrainingSamplesType = io.Custom("MUSUBI_TRAINING_SAMPLES")
EXTRA_PROMPTS = ("positive_2", "positive_3", "positive_4")


class MusubiTrainingSamples(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiTrainingSamples",
            display_name=NODE,
            category="musubi/training",
            description="Samples of the LoRA while Train LoRA trains it: each prompt is sampled with ComfyUI's own sampler on the training model (the LoRA as it is at that step), decoded with the VAE, shown live in Train LoRA, written as PNG (images) or animated WebP (videos) to models/loras/<output_name>/samples/ and logged to TensorBoard when that is on. Sampling never changes the trained weights. Chain a second Training Samples node into samples to add prompts of another size or schedule.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="The prompt to sample (CLIP Text Encode, or Load Text Embedding); image-to-video and edit models take their image inside it (WanImageToVideo, ReferenceLatent)."),
                io.Vae.Input("vae", tooltip="The model's own VAE, to decode the samples."),
                io.Int.Input("width", default=512, min=16, max=8192, step=16, tooltip="Sample width in pixels (ignored when latent is connected)."),
                io.Int.Input("height", default=512, min=16, max=8192, step=16, tooltip="Sample height in pixels (ignored when latent is connected)."),
                io.Int.Input("length", default=1, min=1, max=1024, step=4,
                             tooltip="Frames (video models: 1, 5, 9, … — 1 is a still image; image models: 1). Ignored when latent is connected."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Sampling steps."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Classifier-free guidance (1: no negative pass)."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler", tooltip="ComfyUI's sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="simple", tooltip="ComfyUI's scheduler, as in KSampler."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Noise seed, the same at every step so the samples show what the LoRA changes."),
                io.Int.Input("every_n_steps", default=100, min=0, max=1_000_000, tooltip="Sample every N optimizer steps (0: not by steps)."),
                io.Boolean.Input("at_checkpoints", default=True, tooltip="Sample whenever a LoRA file is saved (checkpoints and the final LoRA)."),
                io.Boolean.Input("at_start", default=False, tooltip="Sample once before the first step (the model as the run starts)."),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative prompt for cfg > 1 (default: an empty, zeroed prompt)."),
                *[io.Conditioning.Input(name, optional=True, tooltip="Another prompt, sampled with the same settings.")
                  for name in EXTRA_PROMPTS],
                io.Latent.Input("latent", optional=True,
                                tooltip="Copy the sample's shape (and start) from this LATENT instead of width/height/length, e.g. from WanImageToVideo. FramePack: the start image (VAE Encode)."),
                TrainingSamplesType.Input("samples", optional=True, tooltip="Prompts from another Training Samples node, sampled too."),
            ],
            outputs=[TrainingSamplesType.Output("training_samples", display_name="samples", tooltip="For Train LoRA's samples input.")],
        )

    @classmethod
    def execute(cls, positive, vae, width, height, length, steps, cfg, sampler_name, scheduler, seed, every_n_steps,
                at_checkpoints, at_start, negative=None, positive_2=None, positive_3=None, positive_4=None, latent=None,
                samples=None) -> io.NodeOutput:
        timing = SampleTiming(every_n_steps=every_n_steps, at_checkpoints=at_checkpoints, at_start=at_start)
        common = {"vae": vae, "width": width, "height": height, "length": length, "steps": steps, "cfg": cfg,
                  "sampler_name": sampler_name, "scheduler": scheduler, "seed": seed, "negative": negative,
                  "latent": latent, "timing": timing}
        prompts = [prompt for prompt in (positive, positive_2, positive_3, positive_4) if prompt is not None]
        return io.NodeOutput(list(samples or []) + [{**common, "positive": prompt} for prompt in prompts])


class SampleRunner:
    """Train LoRA's samples: called from its progress reporter at the start, after each step and
    after each saved LoRA file; samples the due prompts with the trainer's LoRA as it is now.

    Everything happens inside ``Trainer.evaluating()`` (eval mode, no grad, every random stream
    and the weights put back), so a run with samples trains the same LoRA as one without.
    Cancel inside the sampler marks the reporter cancelled; the trainer then saves its
    resumable checkpoint as for any Cancel.
    """

    def __init__(self, reporter, adapter, specs: list[dict], output_dir: str, output_name: str,
                 framepack_settings: dict | None = None):
        self.reporter, self.adapter, self.specs = reporter, adapter, specs
        self.folder = os.path.join(output_dir, SAMPLES_FOLDER)
        self.output_name, self.framepack_settings = output_name, framepack_settings
        self.trainer = None  # set once the Trainer exists
        self.seconds = 0.0
        self.files: list[str] = []
        self.latest: dict[int, tuple[int, torch.Tensor]] = {}  # prompt index -> (step, IMAGE frames)
        self.sampled_at: dict[int, int] = {}
        self.interrupted = False
        self.failures: list[str] = []  # "step N, prompt i: error" of samples that could not be drawn
        if os.path.isdir(self.folder):
            remove_leftovers(self.folder)  # what a killed earlier run left half-written

    def at_start(self, step: int) -> None:
        self._run(step, [i for i, spec in enumerate(self.specs) if spec["timing"].at_start])

    def after_step(self, step: int) -> None:
        self._run(step, [i for i, spec in enumerate(self.specs) if spec["timing"].due_after_step(step)])

    def at_checkpoint(self, step: int) -> None:
        self._run(step, [i for i, spec in enumerate(self.specs) if spec["timing"].at_checkpoints])

    def _run(self, step: int, indices: list[int]) -> None:
        indices = [i for i in indices if self.sampled_at.get(i) != step]
        if not indices or self.trainer is None or self.reporter.cancelled:
            return
        started = time.perf_counter()
        shown = []
        try:
            with self.trainer.evaluating():
                for index in indices:
                    spec = self.specs[index]
                    self.sampled_at[index] = step
                    try:
                        images = draw_sample(self.adapter, spec, spec["positive"], self.framepack_settings)
                        shown.append(self._write(step, index, images))
                    except comfy.model_management.InterruptProcessingException:
                        raise
                    except Exception as error:  # noqa: BLE001 — a failed sample (out of memory, say) must not end the run
                        logger.warning("%s: the sample of prompt %d at step %d failed: %s", NODE, index + 1, step, error)
                        self.failures.append(f"step {step}, prompt {index + 1}: {error}")
                        continue
                    self.latest[index] = (step, images)
        except comfy.model_management.InterruptProcessingException:
            self.interrupted = True
            self.reporter.cancelled = True  # the trainer stops with a resumable checkpoint, as for any Cancel
        finally:
            self.seconds += time.perf_counter() - started
        if shown:
            self.reporter.send(SAMPLES_EVENT, {"step": step, "images": shown})

    def _write(self, step: int, index: int, images: torch.Tensor) -> dict:
        """The sample's file next to the checkpoints, a preview copy in ComfyUI's temp folder (what
        /view serves to the live view), and a TensorBoard image when that is on."""
        name, data = encode_sample(self.output_name, step, index, images)
        frames = images.shape[0]
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, name)
        write_bytes_atomically(path, data)
        self.files.append(path)
        preview_folder = os.path.join(folder_paths.get_temp_directory(), PREVIEW_SUBFOLDER)
        os.makedirs(preview_folder, exist_ok=True)
        preview = f"{self.reporter.prompt_id or 'run'}_{self.reporter.node_id}_{name}".replace(os.sep, "_")
        write_bytes_atomically(os.path.join(preview_folder, preview), data)
        trackers = getattr(getattr(self.trainer, "accelerator", None), "trackers", None) or []
        log_to_trackers(trackers, step, f"samples/p{index + 1}", images)
        return {"filename": preview, "subfolder": PREVIEW_SUBFOLDER, "type": "temp", "step": step, "prompt": index + 1,
                "frames": frames, "label": f"step {step} · prompt {index + 1}" + (f" · {frames} frames" if frames > 1 else "")}

    def images(self) -> torch.Tensor | None:
        """The newest sample of every prompt as one IMAGE batch (frames of videos in order), each
        resized to the first one's size when they differ; None when nothing was sampled."""
        if not self.latest:
            return None
        batches = [self.latest[index][1] for index in sorted(self.latest)]
        height, width = batches[0].shape[1:3]
        fitted = []
        for frames in batches:
            if frames.shape[1:3] != (height, width):
                frames = comfy.utils.common_upscale(frames.movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)
            fitted.append(frames[..., :3])
        return torch.cat(fitted)

    def report(self, short: bool = False) -> str:
        """Summary lines: where the sample files are and which were written (short: the folder only),
        and the samples that failed."""
        failed = "".join(f"\nsample failed at {line}" for line in self.failures[:3])
        if len(self.failures) > 3:
            failed += f"\n… {len(self.failures) - 3} more samples failed (see the console)"
        if not self.files:
            return failed
        if short:
            return f"\nsamples: {self.folder}" + failed
        names = [os.path.basename(path) for path in self.files]
        shown = names if len(names) <= 8 else [*names[:2], "…", *names[-(len(self.latest)):]]
        return f"\nsamples: {len(names)} file(s) in {self.folder}: " + ", ".join(shown) + failed
