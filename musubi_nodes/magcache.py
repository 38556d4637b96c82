"""MagCache nodes: a sampler that skips predictable model calls, its calibration, and a MODEL patch.

The decisions and statistics live in :mod:`musubi.magcache`, and which ratios a run uses (a
published calibration picked by name or recognised from the model, a saved calibration file, a
pasted list, a Wan 2.2 A14B expert) in :mod:`musubi.magcache.choice`; how the model is hooked in
lives in :mod:`.magcache_patch`. This module reads what those need off ComfyUI's objects (the
model's class and config, the calibrations folder) and keeps the runs for the report.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import comfy.model_base
import comfy.samplers
import folder_paths
import nodes as comfy_core_nodes  # ComfyUI's own node module: common_ksampler is what KSampler runs
from comfy_api.latest import io, ui

from ..musubi.errors import MusubiError
from ..musubi.magcache.choice import (
    EXPERT_CHOICES,
    ModelFacts,
    RatioChoice,
    auto_calibration_key,
    choose_ratios,
    recommended_settings_text,
)
from ..musubi.magcache.published import list_default_models
from ..musubi.magcache.recorder import CalibrationRecorder
from ..musubi.magcache.steps import repeated_levels
from .adapters.comfy_model import ConditioningCheck
from .magcache_patch import MagCacheRun, RunContext, RunPlan, block_layout, install
from .paths import missing_file_message, new_output_path, register_model_folder

CATEGORY = "musubi/sampling"
MAGCACHE_FOLDER = "magcache"
SAMPLER_NODE = "MagCache Sampler"
CALIBRATE_NODE = "Calibrate MagCache"
PATCH_NODE = "MagCache (patch model)"


def register_magcache_folder() -> None:
    """``models/magcache`` holds calibrations (JSON) that the MagCache nodes list for reuse."""
    register_model_folder(MAGCACHE_FOLDER, {".json"})


register_magcache_folder()


# ---------------------------------------------------------------------------------------------
# From node options to one run's plan
# ---------------------------------------------------------------------------------------------


def model_facts(model_patcher, family: str) -> ModelFacts:
    """What "auto" reads off a ComfyUI MODEL to recognise its published calibration."""
    base = model_patcher.model
    return ModelFacts(
        family=family,
        class_name=type(base).__name__,
        config=dict(getattr(getattr(base, "model_config", None), "unet_config", None) or {}),
        wan_ti2v=isinstance(base, comfy.model_base.WAN22),
        hunyuan_video_t2v=type(base) is comfy.model_base.HunyuanVideo,
    )


@dataclass
class MagCacheChoice:
    """What a MagCache node asked for; turns into a plan when a sampling run starts.

    ``ratios`` is None for a calibration run (nothing skipped, every residual recorded).
    """

    node: str
    ratios: RatioChoice | None = None
    keep_runs: bool = True
    runs: list[MagCacheRun] = field(default_factory=list)

    def plan_run(self, context: RunContext) -> RunPlan:
        if self.ratios is None:
            repeated = repeated_levels(context.run.sigmas)
            if repeated:
                distinct = context.run.num_steps - repeated
                raise MusubiError(
                    f"{self.node}: this scheduler gives only {distinct} distinct noise levels for {context.run.num_steps} "
                    "steps (the model has a limited number of timesteps), and steps at the same noise level cannot be "
                    f"measured apart; calibrate with at most {distinct} steps, or with another scheduler."
                )
            return RunPlan(label=f"calibration of a {context.family} model", recorder=CalibrationRecorder())
        try:
            label, state = self.ratios.state_for_run(model_facts(context.model_patcher, context.family), context.run)
        except MusubiError as error:
            raise _named(self.node, error) from None
        return RunPlan(label=label, state=state)

    def run_finished(self, run: MagCacheRun) -> None:
        logging.info(run.report())
        if self.keep_runs:
            self.runs.append(run)


def _named(node: str, error: MusubiError) -> MusubiError:
    text = str(error)
    return MusubiError(text if text.startswith(node) else f"{node}: {text}")


def magcache_choice(node: str, model, threshold: float, retention_ratio: float, K: int, ratios: str,
                    expert: str, pasted_ratios: str) -> MagCacheChoice:
    """Check a node's MagCache options now, so mistakes show on the node that made them."""
    try:
        family = block_layout(model, node).family
        checked = choose_ratios(
            model_facts(model, family), threshold, retention_ratio, K, ratios, expert, pasted_ratios,
            saved_path=folder_paths.get_full_path(MAGCACHE_FOLDER, ratios), saved_folder=f"models/{MAGCACHE_FOLDER}",
            calibrate_with=CALIBRATE_NODE,
        )
    except MusubiError as error:
        raise _named(node, error) from None
    return MagCacheChoice(node, checked)


# ---------------------------------------------------------------------------------------------
# Inputs shared by the nodes
# ---------------------------------------------------------------------------------------------


def _sampling_inputs() -> list:
    """KSampler's inputs, same names, order and ranges, so the nodes drop in for it."""
    return [
        io.Model.Input("model", tooltip="The diffusion model (Wan 2.1/2.2, HunyuanVideo, FLUX.1, Qwen-Image); LoRAs, fp8 loaders and other patches may come before."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="The random seed used for creating the noise."),
        io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Number of sampling steps; any count works, the ratios are resampled to it."),
        io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale. 1 runs one model call per step; above 1 cond and uncond share each step's decision."),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                       tooltip="The sampling algorithm. Extra evaluations inside a step (heun, dpmpp_2s…) share that step's decision."),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="How the noise levels are spaced."),
        io.Conditioning.Input("positive", tooltip="What the result should show."),
        io.Conditioning.Input("negative", tooltip="What the result should avoid (used when cfg > 1)."),
        io.Latent.Input("latent_image", tooltip="The latent to denoise."),
        io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="How much of the schedule to run; lower keeps more of the input latent."),
    ]


def _magcache_inputs() -> list:
    recommended = recommended_settings_text()
    saved = folder_paths.get_filename_list(MAGCACHE_FOLDER)
    return [
        io.Float.Input("threshold", default=0.24, min=0.0, max=10.0, step=0.01,
                       tooltip="Most accumulated error |1 − product of ratios| a run of skipped steps may reach. Higher skips more (faster, less exact); 0 skips nothing. Recommended per published calibration:\n" + recommended),
        io.Float.Input("retention_ratio", default=0.2, min=0.0, max=0.99, step=0.01,
                       tooltip="Fraction of the first steps always computed (the layout forms there). At least one step is always computed, and so is the last."),
        io.Int.Input("K", default=6, min=0, max=1000,
                     tooltip="Most steps skipped in a row before one is computed again; 0 skips nothing."),
        io.Combo.Input("ratios", options=["auto", *list_default_models(), *saved], default="auto",
                       tooltip="The magnitude-ratio curve that predicts each step's change. auto: the published calibration of the detected model (Wan 1.3B/14B by width, the nearest released width for other widths; i2v 480p/720p and HunyuanVideo 544p/720p by latent size; FLUX.1 Kontext and Qwen-Image-Edit when a reference latent is given). Named entries: a published calibration. *.json: a calibration saved by Calibrate MagCache in models/magcache. Steps are resampled to your step count."),
        io.Combo.Input("expert", options=list(EXPERT_CHOICES), default="auto",
                       tooltip="Wan 2.2 A14B only (ratios wan2.2_t2v_A14B or wan2.2_i2v_A14B): which expert this model is. Recipe: patch the high-noise model and the low-noise model with one MagCache each (same ratios), then sample with two KSamplerAdvanced: high noise with steps 0→switch and leftover noise returned, low noise from switch→end. auto tells the experts apart by where their run starts and ends; none uses the whole curve. The authors never skip in the I2V high-noise expert: use threshold 0 there to follow them."),
        io.String.Input("pasted_ratios", default="", multiline=True, optional=True,
                        placeholder="1.00000,0.99812,0.99604,…",
                        tooltip="Optional: ratios as printed by Calibrate MagCache (or musubi-tuner), comma-separated. When not empty, this replaces 'ratios'; a list of another length is resampled to your step count."),
    ]


def missing_ratios_message(node: str, ratios: str | None, pasted_ratios: str | None) -> str | None:
    """Why the ``ratios`` pick cannot be used (a calibration file missing from models/magcache),
    or None; pasted ratios replace the pick, so then nothing is checked."""
    if ratios is None or pasted_ratios is None or pasted_ratios.strip():
        return None
    if ratios == "auto" or ratios in list_default_models():
        return None
    return missing_file_message(node, "ratios", MAGCACHE_FOLDER, ratios)


# ---------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------


def _sample(node, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise):
    """Core KSampler's sampling, after checking the prompts fit the model (another text encoder's
    CONDITIONING fails deep inside ComfyUI with a raw KeyError or shape error)."""
    checker = ConditioningCheck(model)
    for name, conditioning in (("positive", positive), ("negative", negative)):
        checker.check_input(f"{node}: {name}", conditioning)
    return comfy_core_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                            latent_image, denoise=denoise)[0]


class MusubiMagCacheSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiMagCacheSampler",
            display_name=SAMPLER_NODE,
            category=CATEGORY,
            description="KSampler with MagCache (arXiv 2506.09045): skips the transformer blocks on steps whose change the calibrated magnitude ratios predict, reusing the last computed residual — about 2–3× faster Wan, HunyuanVideo, FLUX.1 and Qwen-Image sampling. Reports the model calls made and skipped.",
            inputs=[*_sampling_inputs(), *_magcache_inputs()],
            outputs=[
                io.Latent.Output(tooltip="The denoised latent."),
                io.String.Output("report", tooltip="Which steps were skipped and how many model calls were made."),
            ],
        )

    @classmethod
    def validate_inputs(cls, ratios: str | None = None, pasted_ratios: str | None = "") -> bool | str:
        """A missing calibration file is reported when the prompt is queued."""
        return missing_ratios_message(SAMPLER_NODE, ratios, pasted_ratios) or True

    @classmethod
    def execute(cls, model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive, negative,
                latent_image, denoise: float, threshold: float, retention_ratio: float, K: int, ratios: str,
                expert: str, pasted_ratios: str = "") -> io.NodeOutput:
        choice = magcache_choice(SAMPLER_NODE, model, threshold, retention_ratio, K, ratios, expert, pasted_ratios)
        patched = install(model, choice, SAMPLER_NODE)
        latent = _sample(SAMPLER_NODE, patched, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise)
        report = "\n\n".join(run.report() for run in choice.runs) or "MagCache: nothing was sampled (no steps to run)."
        return io.NodeOutput(latent, report, ui=ui.PreviewText(report))


class MusubiCalibrateMagCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiCalibrateMagCache",
            display_name=CALIBRATE_NODE,
            category=CATEGORY,
            description="Samples like KSampler without skipping anything and measures the model's MagCache curve: per step the ratio of residual magnitudes, its spread and the cosine distance. Returns the ratios ready to paste and saves them (with sampler, scheduler and statistics) as JSON in models/magcache, where MagCache Sampler and MagCache (patch model) list it.",
            is_output_node=True,
            inputs=[
                *_sampling_inputs(),
                io.String.Input("filename", default="", optional=True, placeholder="(auto: <model>_<steps>steps_<sampler>_<scheduler>)",
                                tooltip="Name of the calibration inside models/magcache (sub-folders allowed). Empty: named after the model family, steps, sampler and scheduler. Never overwrites: _00001… is appended."),
            ],
            outputs=[
                io.Latent.Output(tooltip="The denoised latent (identical to KSampler's)."),
                io.String.Output("ratios", tooltip="The measured ratios, comma-separated: paste into pasted_ratios."),
                io.String.Output("calibration_file", tooltip="The saved file's name, as the 'ratios' list shows it."),
            ],
        )

    @classmethod
    def execute(cls, model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive, negative,
                latent_image, denoise: float, filename: str = "") -> io.NodeOutput:
        family = block_layout(model, CALIBRATE_NODE).family
        if (filename or "").strip():  # a bad name fails now, not after the sampling
            new_output_path(CALIBRATE_NODE, MAGCACHE_FOLDER, filename, extension=".json")
        choice = MagCacheChoice(CALIBRATE_NODE)
        patched = install(model, choice, CALIBRATE_NODE)
        latent = _sample(CALIBRATE_NODE, patched, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise)
        if not choice.runs:
            raise MusubiError(f"{CALIBRATE_NODE}: nothing was sampled (denoise 0 leaves no step); set denoise above 0.")
        run = choice.runs[-1]
        if run.disabled or run.recorder.steps_recorded != run.num_steps:
            reasons = "; ".join(run.notes) or "not every step reached the model"
            raise MusubiError(
                f"{CALIBRATE_NODE}: only {run.recorder.steps_recorded} of {run.num_steps} steps could be measured ({reasons}). "
                "Calibrate with a standard sampler (euler, dpmpp_2m…) and scheduler."
            )
        name = (filename or "").strip() or f"{family}_{run.num_steps}steps_{sampler_name}_{scheduler}"
        path = new_output_path(CALIBRATE_NODE, MAGCACHE_FOLDER, name, extension=".json")
        extra = {"model_class": type(model.model).__name__, "cfg": cfg, "denoise": denoise, "seed": seed,
                 "latent_shape": list(latent_image["samples"].shape)}
        try:
            extra["published_counterpart"] = auto_calibration_key(model_facts(model, family), run.num_steps,
                                                                  calibrate_with=CALIBRATE_NODE)
        except MusubiError:
            pass
        _named_call(CALIBRATE_NODE, run.recorder.save_json, path, architecture=family, steps=run.num_steps,
                    sampler=sampler_name, scheduler=scheduler, extra=extra)
        listed = os.path.relpath(path, magcache_folder_root(path)).replace(os.sep, "/")
        ratios = run.recorder.as_paste_string()
        summary = f"{run.report()}\nratios: {ratios}\nsaved {path} (listed as '{listed}' in MagCache's ratios)"
        return io.NodeOutput(latent, ratios, listed, ui=ui.PreviewText(summary))


def magcache_folder_root(path: str) -> str:
    """The models/magcache folder that holds ``path``."""
    for root in folder_paths.get_folder_paths(MAGCACHE_FOLDER):
        root = os.path.abspath(root)
        if os.path.commonpath([root, os.path.abspath(path)]) == root:
            return root
    return os.path.dirname(path)


def _named_call(node: str, function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except MusubiError as error:
        raise _named(node, error) from None


class MusubiMagCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = [io.Model.Input("model", tooltip="The diffusion model to patch (Wan 2.1/2.2, HunyuanVideo, FLUX.1, Qwen-Image)."),
                  *_magcache_inputs()]
        return io.Schema(
            node_id="MusubiMagCache",
            display_name=PATCH_NODE,
            category=CATEGORY,
            description="Adds MagCache to a MODEL so any sampler node (KSampler, KSamplerAdvanced, SamplerCustom, SamplerCustomAdvanced…) skips predictable model calls. Works through ComfyUI's block patches and sampler wrappers, so LoRAs, fp8 models and other patches keep working. Each run's report goes to the console log.",
            inputs=inputs,
            outputs=[io.Model.Output(tooltip="The model with MagCache; every sampling run with it is cached.")],
        )

    @classmethod
    def validate_inputs(cls, ratios: str | None = None, pasted_ratios: str | None = "") -> bool | str:
        """A missing calibration file is reported when the prompt is queued."""
        return missing_ratios_message(PATCH_NODE, ratios, pasted_ratios) or True

    @classmethod
    def execute(cls, model, threshold: float, retention_ratio: float, K: int, ratios: str, expert: str,
                pasted_ratios: str = "") -> io.NodeOutput:
        choice = magcache_choice(PATCH_NODE, model, threshold, retention_ratio, K, ratios, expert, pasted_ratios)
        choice.keep_runs = False
        return io.NodeOutput(install(model, choice, PATCH_NODE))
