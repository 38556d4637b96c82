"""MagCache nodes: a sampler that skips predictable model calls, its calibration, and a MODEL patch.

The decisions and statistics live in :mod:`musubi.magcache.core`; how the model is hooked in lives in
:mod:`.magcache_patch`. This module turns node options into those objects: which ratios a run
uses (a published calibration picked by name or recognised from the model, a saved calibration
file, or a pasted list), which Wan 2.2 A14B expert a run samples, and where calibrations go.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace

import comfy.model_base
import comfy.samplers
import folder_paths
import nodes as comfy_core_nodes  # ComfyUI's own node module: common_ksampler is what KSampler runs
from comfy_api.latest import io, ui

from ..musubi.errors import MusubiError
from ..musubi.magcache.core import (
    EXPERTS,
    Calibration,
    CalibrationRecorder,
    MagCacheSettings,
    MagCacheState,
    default_calibration,
    default_key_for,
    expert_part,
    list_default_models,
    load_calibration_json,
    parse_ratio_string,
)
from .magcache_patch import MagCacheRun, RunContext, RunPlan, block_layout, install
from .paths import new_output_path

CATEGORY = "musubi/sampling"
MAGCACHE_FOLDER = "magcache"
SAMPLER_NODE = "MagCache Sampler"
CALIBRATE_NODE = "Calibrate MagCache"
PATCH_NODE = "MagCache (patch model)"
EXPERT_CHOICES = ("auto", "none", *EXPERTS)


def register_magcache_folder() -> None:
    """``models/magcache`` holds calibrations (JSON) that the MagCache nodes list for reuse."""
    if MAGCACHE_FOLDER not in folder_paths.folder_names_and_paths:
        folder = os.path.join(folder_paths.models_dir, MAGCACHE_FOLDER)
        folder_paths.folder_names_and_paths[MAGCACHE_FOLDER] = ([folder], {".json"})


register_magcache_folder()


# ---------------------------------------------------------------------------------------------
# "auto": the published calibration of the model at hand
# ---------------------------------------------------------------------------------------------

# Widths of the released Wan networks; other widths (fine-tunes, test models) use the nearest.
_WAN_SIZES = {"1.3B": 1536, "14B": 5120}
# Pixel counts of the resolutions the published curves were measured at.
_WAN_I2V_RESOLUTIONS = {"480p": 832 * 480, "720p": 1280 * 720}
_HUNYUAN_RESOLUTIONS = {"544p": 960 * 544, "720p": 1280 * 720}
_LATENT_TO_PIXELS = 8  # spatial compression of the Wan 2.1 and HunyuanVideo VAEs


def _nearest(value: float, sizes: dict[str, float]) -> str:
    """The name whose size is closest to ``value`` on a log scale (a ratio, not a difference)."""
    return min(sizes, key=lambda name: abs(math.log(value / sizes[name])))


def _resolution(latent_shape: tuple[int, ...] | None, resolutions: dict[str, int]) -> str:
    if not latent_shape or len(latent_shape) < 4:
        return next(iter(resolutions))
    pixels = latent_shape[-1] * latent_shape[-2] * _LATENT_TO_PIXELS**2
    return _nearest(pixels, resolutions)


def auto_calibration_key(model_patcher, family: str, node: str, num_steps: int | None = None,
                         latent_shape: tuple[int, ...] | None = None, has_denoise_mask: bool = False,
                         has_reference_latents: bool = False) -> str:
    """The published calibration for this model, as ratios "auto" picks it.

    Wan: the network width chooses 1.3B or 14B (nearest released width), the input channels and
    image embedding choose t2v, i2v (480p or 720p by the latent's size) or Wan 2.2 I2V A14B, VACE
    and Wan 2.2 TI2V 5B (image-to-video when the latent carries a mask) are recognised by class.
    HunyuanVideo: 544p or 720p by the latent's size. FLUX.1 and Qwen-Image: the Kontext / Edit
    curve when the conditioning holds a reference latent. Wan 2.2 T2V A14B's experts cannot be
    told from Wan 2.1 T2V 14B; pick ``wan2.2_t2v_A14B`` by name for them.
    """
    base = model_patcher.model
    unet = dict(getattr(getattr(base, "model_config", None), "unet_config", None) or {})
    if family == "wan":
        key = default_key_for("wan", _wan_variant(base, unet, node, latent_shape, has_denoise_mask), num_steps)
    elif family == "hunyuan_video":
        if type(base) is not comfy.model_base.HunyuanVideo:
            raise _unknown_model(node, type(base).__name__)
        key = default_key_for("hunyuan_video", _resolution(latent_shape, _HUNYUAN_RESOLUTIONS), num_steps)
    elif family == "flux":
        key = default_key_for("flux_kontext" if has_reference_latents else "flux", None, num_steps)
    elif family == "qwen_image":
        key = default_key_for("qwen_image", "edit" if has_reference_latents else None, num_steps)
    else:
        raise _unknown_model(node, type(base).__name__)
    return key


def _wan_variant(base, unet: dict, node: str, latent_shape, has_denoise_mask: bool) -> str:
    if isinstance(base, comfy.model_base.WAN22):
        return "ti2v_5B_i2v" if has_denoise_mask else "ti2v_5B"
    model_type = unet.get("model_type", "t2v")
    size = _nearest(unet.get("dim") or _WAN_SIZES["1.3B"], _WAN_SIZES)
    in_channels = unet.get("in_dim", 16)
    if model_type == "vace":
        return f"vace_{size}"
    if model_type == "i2v":
        return f"i2v_{_resolution(latent_shape, _WAN_I2V_RESOLUTIONS)}"
    if model_type == "t2v" and in_channels == 16:
        return f"t2v_{size}"
    if model_type == "t2v" and in_channels == 36:  # image channels but no CLIP embedding: Wan 2.2 I2V A14B
        return "i2v_A14B"
    raise _unknown_model(node, f"{type(base).__name__} ({model_type}, {in_channels} input channels)")


def _unknown_model(node: str, description: str) -> MusubiError:
    return MusubiError(
        f"{node}: ratios 'auto' knows no published calibration for this model ({description}). Calibrate it with "
        f"'{CALIBRATE_NODE}' and pick the saved file in 'ratios', or pick a published calibration by name."
    )


def _calibration_family(calibration: Calibration) -> str:
    if calibration.architecture:
        return calibration.architecture
    key = calibration.key
    for prefix, family in (("wan", "wan"), ("hunyuan_video", "hunyuan_video"), ("framepack", "hunyuan_video"),
                           ("flux", "flux"), ("qwen_image", "qwen_image")):
        if key.startswith(prefix):
            return family
    return ""


# ---------------------------------------------------------------------------------------------
# From node options to one run's plan
# ---------------------------------------------------------------------------------------------


@dataclass
class MagCacheChoice:
    """What a MagCache node asked for; turns into a plan when a sampling run starts."""

    node: str
    settings: MagCacheSettings = field(default_factory=MagCacheSettings)
    ratios: str = "auto"
    expert: str = "auto"
    pasted: tuple[float, ...] | None = None
    calibration: Calibration | None = None
    calibrating: bool = False
    keep_runs: bool = True
    runs: list[MagCacheRun] = field(default_factory=list)

    def plan_run(self, context: RunContext) -> RunPlan:
        try:
            return self._plan(context)
        except MusubiError as error:
            raise _named(self.node, error) from None

    def _plan(self, context: RunContext) -> RunPlan:
        if self.calibrating:
            return RunPlan(label=f"calibration of a {context.family} model", recorder=CalibrationRecorder())
        if self.pasted is not None:
            settings = replace(self.settings, ratios=self.pasted)
            return RunPlan(label=f"pasted ratios ({len(self.pasted)} values)",
                           state=MagCacheState.for_run(settings, context.num_steps))
        calibration, label = self.calibration, f"ratios {self.ratios}"
        if calibration is None:
            key = auto_calibration_key(
                context.model_patcher, context.family, self.node, context.num_steps, context.latent_shape,
                context.has_denoise_mask, context.has_reference_latents,
            )
            calibration, label = default_calibration(key), f"ratios {key} (auto)"
        expert = self._expert_for(calibration, context)
        if expert is not None:
            calibration = expert_part(calibration, expert)
            label += f", {expert} expert"
        settings = self.settings
        if calibration.max_step_deviation is not None:
            settings = replace(settings, max_step_deviation=calibration.max_step_deviation)
        return RunPlan(label=label, state=MagCacheState.for_run(settings, context.num_steps, calibration))

    def _expert_for(self, calibration: Calibration, context: RunContext) -> str | None:
        if calibration.expert_switch_step is None:
            if self.expert in EXPERTS:
                raise MusubiError(
                    f"expert '{self.expert}' needs a two-expert calibration, but {calibration.key!r} covers one network; "
                    "pick wan2.2_t2v_A14B or wan2.2_i2v_A14B in 'ratios', or set expert to auto."
                )
            return None
        if self.expert != "auto":
            return None if self.expert == "none" else self.expert
        # The high-noise expert samples from the top of the schedule and stops early; the
        # low-noise expert starts part-way and ends at sigma 0.
        starts_at_top = math.isclose(context.sigmas[0], context.sigma_max, rel_tol=1e-3)
        ends_at_zero = context.sigmas[-1] == 0
        if starts_at_top and not ends_at_zero:
            return "high_noise"
        if ends_at_zero and not starts_at_top:
            return "low_noise"
        if starts_at_top and ends_at_zero:
            return None
        raise MusubiError(
            f"expert 'auto' cannot tell which Wan 2.2 A14B expert samples sigmas {context.sigmas[0]:.4g}…"
            f"{context.sigmas[-1]:.4g}; set expert to high_noise or low_noise."
        )

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
        settings = MagCacheSettings(threshold=threshold, K=K, retention_ratio=retention_ratio).validate()
        if expert not in EXPERT_CHOICES:
            raise MusubiError(f"expert must be one of {', '.join(EXPERT_CHOICES)}, got {expert!r}.")
        choice = MagCacheChoice(node, settings, ratios, expert)
        if pasted_ratios and pasted_ratios.strip():
            if expert in EXPERTS:
                raise MusubiError(
                    f"expert '{expert}' selects part of a published two-expert calibration, but pasted_ratios replaces "
                    "the calibration; paste the expert's own curve and set expert to auto."
                )
            choice.pasted = tuple(parse_ratio_string(pasted_ratios, "pasted_ratios"))
            return choice
        if ratios == "auto":
            # An unknown model fails here, not inside the sampler.
            recognised = default_calibration(auto_calibration_key(model, family, node))
            if expert in EXPERTS and recognised.expert_switch_step is None:
                raise MusubiError(
                    f"expert '{expert}' needs a two-expert calibration, but 'auto' recognises this model as "
                    f"{recognised.key!r}; pick wan2.2_t2v_A14B or wan2.2_i2v_A14B in 'ratios', or set expert to auto."
                )
        elif ratios in list_default_models():
            choice.calibration = default_calibration(ratios)
        else:
            path = folder_paths.get_full_path(MAGCACHE_FOLDER, ratios)
            if path is None:
                raise MusubiError(
                    f"ratios {ratios!r} is neither 'auto', a published calibration nor a file in models/{MAGCACHE_FOLDER}; "
                    f"run '{CALIBRATE_NODE}' to make one."
                )
            choice.calibration = load_calibration_json(path)
        if choice.calibration is not None:
            measured_on = _calibration_family(choice.calibration)
            if measured_on and measured_on != family:
                raise MusubiError(
                    f"ratios {ratios!r} were measured on a {measured_on} model but this model is {family}; pick a "
                    f"calibration of this model or make one with '{CALIBRATE_NODE}'."
                )
            if expert in EXPERTS and choice.calibration.expert_switch_step is None:
                raise MusubiError(
                    f"expert '{expert}' needs a two-expert calibration, but {ratios!r} covers one network; pick "
                    "wan2.2_t2v_A14B or wan2.2_i2v_A14B, or set expert to auto."
                )
        return choice
    except MusubiError as error:
        raise _named(node, error) from None


# ---------------------------------------------------------------------------------------------
# Inputs shared by the nodes
# ---------------------------------------------------------------------------------------------


def _recommended_settings_text() -> str:
    lines = []
    for key in list_default_models():
        calibration = default_calibration(key)
        lines.append(f"{key}: threshold {calibration.threshold:g}, K {calibration.K}, retention_ratio "
                     f"{calibration.retention_ratio:g} ({calibration.calibrated_steps} steps)")
    return "\n".join(lines)


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
    recommended = _recommended_settings_text()
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


# ---------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------


def _sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise):
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
    def execute(cls, model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive, negative,
                latent_image, denoise: float, threshold: float, retention_ratio: float, K: int, ratios: str,
                expert: str, pasted_ratios: str = "") -> io.NodeOutput:
        choice = magcache_choice(SAMPLER_NODE, model, threshold, retention_ratio, K, ratios, expert, pasted_ratios)
        patched = install(model, choice, SAMPLER_NODE)
        latent = _sample(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise)
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
        choice = MagCacheChoice(CALIBRATE_NODE, calibrating=True)
        patched = install(model, choice, CALIBRATE_NODE)
        latent = _sample(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise)
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
            extra["published_counterpart"] = auto_calibration_key(model, family, CALIBRATE_NODE, run.num_steps)
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
    def execute(cls, model, threshold: float, retention_ratio: float, K: int, ratios: str, expert: str,
                pasted_ratios: str = "") -> io.NodeOutput:
        choice = magcache_choice(PATCH_NODE, model, threshold, retention_ratio, K, ratios, expert, pasted_ratios)
        choice.keep_runs = False
        return io.NodeOutput(install(model, choice, PATCH_NODE))
