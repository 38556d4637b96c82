"""Which ratios a MagCache run uses, from the options a user picked.

A front end (the ComfyUI nodes) offers ``ratios`` — "auto", a published calibration by key or a
saved calibration file —, ``pasted_ratios``, which replace both, and ``expert``, which picks one
expert's part of a Wan 2.2 A14B curve. :func:`choose_ratios` checks those options once, when the
node runs, so a mistake is reported by the node that made it; :meth:`RatioChoice.state_for_run`
then builds each sampling run's :class:`~.state.MagCacheState`.

"auto" reads the published calibration off the model. The front end describes the model
(:class:`ModelFacts`) and the run (:class:`RunFacts`) with plain values, so nothing here depends on
how a framework represents models. Messages name the options; the front end puts its own name in
front of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from ..errors import MusubiError
from .calibration import EXPERTS, Calibration, expert_part, load_calibration_json
from .published import default_calibration, default_key_for, list_default_models
from .settings import MagCacheSettings, parse_ratio_string
from .state import MagCacheState

EXPERT_CHOICES = ("auto", "none", *EXPERTS)

# Widths of the released Wan networks; other widths (fine-tunes, test models) use the nearest.
_WAN_SIZES = {"1.3B": 1536, "14B": 5120}
# Pixel counts of the resolutions the published curves were measured at.
_WAN_I2V_RESOLUTIONS = {"480p": 832 * 480, "720p": 1280 * 720}
_HUNYUAN_RESOLUTIONS = {"544p": 960 * 544, "720p": 1280 * 720}
_LATENT_TO_PIXELS = 8  # spatial compression of the Wan 2.1 and HunyuanVideo VAEs


# ---------------------------------------------------------------------------------------------
# "auto": the published calibration of the model at hand
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What "auto" needs to know about a model, as plain values.

    ``family`` is the architecture whose blocks are cached (wan, hunyuan_video, flux, qwen_image);
    ``class_name`` names the model in messages; ``config`` holds the network's settings (Wan:
    ``model_type``, ``dim``, ``in_dim``). ``wan_ti2v`` marks Wan 2.2 TI2V 5B, and
    ``hunyuan_video_t2v`` plain HunyuanVideo (none of its image-to-video variants).
    """

    family: str
    class_name: str
    config: Mapping[str, Any] = field(default_factory=dict)
    wan_ti2v: bool = False
    hunyuan_video_t2v: bool = False


def _nearest(value: float, sizes: dict[str, float]) -> str:
    """The name whose size is closest to ``value`` on a log scale (a ratio, not a difference)."""
    return min(sizes, key=lambda name: abs(math.log(value / sizes[name])))


def _resolution(latent_shape: tuple[int, ...] | None, resolutions: dict[str, int]) -> str:
    if not latent_shape or len(latent_shape) < 4:
        return next(iter(resolutions))
    pixels = latent_shape[-1] * latent_shape[-2] * _LATENT_TO_PIXELS**2
    return _nearest(pixels, resolutions)


def auto_calibration_key(model: ModelFacts, num_steps: int | None = None, latent_shape: tuple[int, ...] | None = None,
                         has_denoise_mask: bool = False, has_reference_latents: bool = False, *,
                         calibrate_with: str) -> str:
    """The published calibration for this model, as ratios "auto" picks it.

    Wan: the network width chooses 1.3B or 14B (nearest released width), the input channels and
    image embedding choose t2v, i2v (480p or 720p by the latent's size) or Wan 2.2 I2V A14B, VACE
    and Wan 2.2 TI2V 5B (image-to-video when the latent carries a mask) are recognised by class.
    HunyuanVideo: 544p or 720p by the latent's size. FLUX.1 and Qwen-Image: the Kontext / Edit
    curve when the conditioning holds a reference latent. Wan 2.2 T2V A14B's experts cannot be
    told from Wan 2.1 T2V 14B; pick ``wan2.2_t2v_A14B`` by name for them. ``calibrate_with``
    names the tool that measures a model's own curve, for the message when none is published.
    """
    family = model.family
    if family == "wan":
        key = default_key_for("wan", _wan_variant(model, latent_shape, has_denoise_mask, calibrate_with), num_steps)
    elif family == "hunyuan_video":
        if not model.hunyuan_video_t2v:
            raise _unknown_model(model.class_name, calibrate_with)
        key = default_key_for("hunyuan_video", _resolution(latent_shape, _HUNYUAN_RESOLUTIONS), num_steps)
    elif family == "flux":
        key = default_key_for("flux_kontext" if has_reference_latents else "flux", None, num_steps)
    elif family == "qwen_image":
        key = default_key_for("qwen_image", "edit" if has_reference_latents else None, num_steps)
    else:
        raise _unknown_model(model.class_name, calibrate_with)
    return key


def _wan_variant(model: ModelFacts, latent_shape, has_denoise_mask: bool, calibrate_with: str) -> str:
    if model.wan_ti2v:
        return "ti2v_5B_i2v" if has_denoise_mask else "ti2v_5B"
    config = model.config
    model_type = config.get("model_type", "t2v")
    size = _nearest(config.get("dim") or _WAN_SIZES["1.3B"], _WAN_SIZES)
    in_channels = config.get("in_dim", 16)
    if model_type == "vace":
        return f"vace_{size}"
    if model_type == "i2v":
        return f"i2v_{_resolution(latent_shape, _WAN_I2V_RESOLUTIONS)}"
    if model_type == "t2v" and in_channels == 16:
        return f"t2v_{size}"
    if model_type == "t2v" and in_channels == 36:  # image channels but no CLIP embedding: Wan 2.2 I2V A14B
        return "i2v_A14B"
    raise _unknown_model(f"{model.class_name} ({model_type}, {in_channels} input channels)", calibrate_with)


def _unknown_model(description: str, calibrate_with: str) -> MusubiError:
    return MusubiError(
        f"ratios 'auto' knows no published calibration for this model ({description}). Calibrate it with "
        f"'{calibrate_with}' and pick the saved file in 'ratios', or pick a published calibration by name."
    )


def calibration_family(calibration: Calibration) -> str:
    """The architecture a calibration was measured on ("" when unknown)."""
    if calibration.architecture:
        return calibration.architecture
    key = calibration.key
    for prefix, family in (("wan", "wan"), ("hunyuan_video", "hunyuan_video"), ("framepack", "hunyuan_video"),
                           ("flux", "flux"), ("qwen_image", "qwen_image")):
        if key.startswith(prefix):
            return family
    return ""


# ---------------------------------------------------------------------------------------------
# Checking the options
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFacts:
    """What is known when a sampling run starts: its steps, its noise levels and its inputs."""

    num_steps: int
    sigmas: tuple[float, ...]
    sigma_max: float
    latent_shape: tuple[int, ...] = ()
    has_denoise_mask: bool = False
    has_reference_latents: bool = False


@dataclass(frozen=True)
class RatioChoice:
    """Checked options: the settings, and where each run's ratios come from.

    ``pasted`` replaces everything else; otherwise ``calibration`` (a published or saved one), or,
    when it is None, the published calibration "auto" recognises in each run's model.
    """

    settings: MagCacheSettings
    ratios: str = "auto"
    expert: str = "auto"
    pasted: tuple[float, ...] | None = None
    calibration: Calibration | None = None
    calibrate_with: str = ""

    def state_for_run(self, model: ModelFacts, run: RunFacts) -> tuple[str, MagCacheState]:
        """A label naming the run's ratios, and the run's skip decisions."""
        if self.pasted is not None:
            settings = replace(self.settings, ratios=self.pasted)
            return f"pasted ratios ({len(self.pasted)} values)", MagCacheState.for_run(settings, run.num_steps)
        calibration, label = self.calibration, f"ratios {self.ratios}"
        if calibration is None:
            key = auto_calibration_key(model, run.num_steps, run.latent_shape, run.has_denoise_mask,
                                       run.has_reference_latents, calibrate_with=self.calibrate_with)
            calibration, label = default_calibration(key), f"ratios {key} (auto)"
        expert = run_expert(calibration, self.expert, run.sigmas, run.sigma_max)
        if expert is not None:
            calibration = expert_part(calibration, expert)
            label += f", {expert} expert"
        settings = self.settings
        if calibration.max_step_deviation is not None:
            settings = replace(settings, max_step_deviation=calibration.max_step_deviation)
        return label, MagCacheState.for_run(settings, run.num_steps, calibration)


def run_expert(calibration: Calibration, expert: str, sigmas: tuple[float, ...], sigma_max: float) -> str | None:
    """Which expert's part of ``calibration`` a run with these noise levels samples (None: the whole curve)."""
    if calibration.expert_switch_step is None:
        if expert in EXPERTS:
            raise MusubiError(
                f"expert '{expert}' needs a two-expert calibration, but {calibration.key!r} covers one network; "
                "pick wan2.2_t2v_A14B or wan2.2_i2v_A14B in 'ratios', or set expert to auto."
            )
        return None
    if expert != "auto":
        return None if expert == "none" else expert
    # The high-noise expert samples from the top of the schedule and stops early; the
    # low-noise expert starts part-way and ends at sigma 0.
    starts_at_top = math.isclose(sigmas[0], sigma_max, rel_tol=1e-3)
    ends_at_zero = sigmas[-1] == 0
    if starts_at_top and not ends_at_zero:
        return "high_noise"
    if ends_at_zero and not starts_at_top:
        return "low_noise"
    if starts_at_top and ends_at_zero:
        return None
    raise MusubiError(
        f"expert 'auto' cannot tell which Wan 2.2 A14B expert samples sigmas {sigmas[0]:.4g}…"
        f"{sigmas[-1]:.4g}; set expert to high_noise or low_noise."
    )


def choose_ratios(model: ModelFacts, threshold: float, retention_ratio: float, K: int, ratios: str, expert: str,
                  pasted_ratios: str, *, saved_path: str | None, saved_folder: str, calibrate_with: str) -> RatioChoice:
    """Check a node's MagCache options now, so mistakes show on the node that made them.

    ``ratios`` is "auto", a published key or the name of a saved calibration; ``saved_path`` is
    where that name was found in ``saved_folder`` (None when it was not), and
    ``calibrate_with`` names the tool that makes calibrations, for the messages.
    """
    settings = MagCacheSettings(threshold=threshold, K=K, retention_ratio=retention_ratio).validate()
    if expert not in EXPERT_CHOICES:
        raise MusubiError(f"expert must be one of {', '.join(EXPERT_CHOICES)}, got {expert!r}.")
    if pasted_ratios and pasted_ratios.strip():
        if expert in EXPERTS:
            raise MusubiError(
                f"expert '{expert}' selects part of a published two-expert calibration, but pasted_ratios replaces "
                "the calibration; paste the expert's own curve and set expert to auto."
            )
        pasted = tuple(parse_ratio_string(pasted_ratios, "pasted_ratios"))
        return RatioChoice(settings, ratios, expert, pasted=pasted, calibrate_with=calibrate_with)
    calibration = None
    if ratios == "auto":
        # An unknown model fails here, not inside the sampler.
        recognised = default_calibration(auto_calibration_key(model, calibrate_with=calibrate_with))
        if expert in EXPERTS and recognised.expert_switch_step is None:
            raise MusubiError(
                f"expert '{expert}' needs a two-expert calibration, but 'auto' recognises this model as "
                f"{recognised.key!r}; pick wan2.2_t2v_A14B or wan2.2_i2v_A14B in 'ratios', or set expert to auto."
            )
    elif ratios in list_default_models():
        calibration = default_calibration(ratios)
    else:
        if saved_path is None:
            raise MusubiError(
                f"ratios {ratios!r} is neither 'auto', a published calibration nor a file in {saved_folder}; "
                f"run '{calibrate_with}' to make one."
            )
        calibration = load_calibration_json(saved_path)
    if calibration is not None:
        measured_on = calibration_family(calibration)
        if measured_on and measured_on != model.family:
            raise MusubiError(
                f"ratios {ratios!r} were measured on a {measured_on} model but this model is {model.family}; pick a "
                f"calibration of this model or make one with '{calibrate_with}'."
            )
        if expert in EXPERTS and calibration.expert_switch_step is None:
            raise MusubiError(
                f"expert '{expert}' needs a two-expert calibration, but {ratios!r} covers one network; pick "
                "wan2.2_t2v_A14B or wan2.2_i2v_A14B, or set expert to auto."
            )
    return RatioChoice(settings, ratios, expert, calibration=calibration, calibrate_with=calibrate_with)


def recommended_settings_text() -> str:
    """One line per published calibration: the settings its authors recommend, and its step count."""
    lines = []
    for key in list_default_models():
        calibration = default_calibration(key)
        lines.append(f"{key}: threshold {calibration.threshold:g}, K {calibration.K}, retention_ratio "
                     f"{calibration.retention_ratio:g} ({calibration.calibrated_steps} steps)")
    return "\n".join(lines)
