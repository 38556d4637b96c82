"""Timestep settings shared by the preview and the trainer, and the distribution preview."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..musubi.errors import MusubiError
from ..musubi.training.timestep_preview import compute_preview, console_text, render_image
from ..musubi.training.timesteps import METHODS, WEIGHTING_SCHEMES, TimestepSettings

TimestepSettingsType = io.Custom("MUSUBI_TIMESTEP_SETTINGS")
CATEGORY = "musubi/training"


class MusubiTimestepSettings(io.ComfyNode):
    """Collects the training timestep options once, so preview and training use the very same ones."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiTimestepSettings",
            display_name="Timestep Settings",
            category=CATEGORY,
            description="How training draws noise levels (timesteps) and weights the loss, with musubi-tuner's option names. Feed it to Timestep Distribution Preview to see the result, and to Train LoRA to use it.",
            inputs=[
                io.Combo.Input("timestep_sampling", options=list(METHODS), default="sigma",
                               tooltip="How noise levels are drawn. sigma: uniform on musubi's 1/1000 grid; uniform; sigmoid: logistic of a normal (favours the middle); shift: sigmoid then a flow shift; flux_shift/qwen_shift: shift that grows with the latent size; logsnr: log-SNR normal; qinglong_flux/qinglong_qwen: mixtures used by the Qinglong recipes."),
                io.Float.Input("discrete_flow_shift", default=1.0, min=0.01, max=100.0, step=0.01,
                               tooltip="Flow shift S used by 'shift' and 'sigma': t' = S·t / (1 + (S−1)·t). Above 1 favours high noise (3.0 is common for video)."),
                io.Float.Input("sigmoid_scale", default=1.0, min=0.01, max=100.0, step=0.01,
                               tooltip="Scale of the normal draw inside the sigmoid for sigmoid/shift/flux_shift/qwen_shift: larger spreads the noise levels towards 0 and 1."),
                io.Float.Input("logit_mean", default=0.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Mean of the normal draw for logsnr and for the logit_normal weighting scheme."),
                io.Float.Input("logit_std", default=1.0, min=0.01, max=10.0, step=0.01,
                               tooltip="Standard deviation of the normal draw for logsnr and for the logit_normal weighting scheme."),
                io.Combo.Input("weighting_scheme", options=list(WEIGHTING_SCHEMES), default="none",
                               tooltip="none: plain MSE. sigma_sqrt / cosmap: per-sample loss weights. logit_normal / mode: shape the draw of the 'sigma' method instead."),
                io.Float.Input("mode_scale", default=1.29, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scale of the 'mode' weighting scheme (only used with weighting_scheme = mode)."),
                io.Int.Input("min_timestep", default=0, min=0, max=999,
                             tooltip="Lowest noise level to train, in 1/1000 (0 = clean). Applies to every method, 'sigma' included."),
                io.Int.Input("max_timestep", default=1000, min=1, max=1000,
                             tooltip="Highest noise level to train, in 1/1000 (1000 = pure noise)."),
                io.Boolean.Input("preserve_distribution_shape", default=False,
                                 tooltip="With min/max set: keep the method's shape inside the range (rejection sampling) instead of squeezing the whole distribution into it."),
                io.Int.Input("num_timestep_buckets", default=0, min=0, max=1000,
                             tooltip="Stratify each epoch's draws into this many equal buckets so every noise range is visited evenly (0 = off)."),
            ],
            outputs=[TimestepSettingsType.Output("timestep_settings", tooltip="The settings, for the preview and for Train LoRA.")],
        )

    @classmethod
    def execute(cls, **options) -> io.NodeOutput:
        return io.NodeOutput(settings_from_node_options(options))


def settings_from_node_options(options: dict) -> TimestepSettings:
    """Map the node's widgets (0 / 1000 / 0 mean 'unset') onto the library's settings."""
    options = dict(options)
    options["min_timestep"] = options["min_timestep"] or None
    options["max_timestep"] = None if options["max_timestep"] == 1000 else options["max_timestep"]
    options["num_timestep_buckets"] = options["num_timestep_buckets"] or None
    settings = TimestepSettings(**options)
    try:
        settings.validate()
    except MusubiError as error:
        raise MusubiError(f"Timestep Settings: {error}") from None
    return settings


class MusubiTimestepDistributionPreview(io.ComfyNode):
    """Shows which noise levels training will see and how their losses are weighted."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiTimestepDistributionPreview",
            display_name="Timestep Distribution Preview",
            category=CATEGORY,
            description="Draws many training timesteps with the given settings and plots their histogram over 0–1000 with the loss-weighting curve, before you spend hours training.",
            is_output_node=True,
            inputs=[
                TimestepSettingsType.Input("timestep_settings", optional=True,
                                           tooltip="From Timestep Settings. Unconnected: musubi-tuner's defaults."),
                io.Latent.Input("latent", optional=True,
                                tooltip="A latent of your training size: flux_shift and qwen_shift depend on it. Overrides latent_width/latent_height."),
                io.Int.Input("latent_width", default=128, min=1, max=4096,
                             tooltip="Latent width (image width / 8) used by the resolution-dependent shifts when no latent is connected."),
                io.Int.Input("latent_height", default=128, min=1, max=4096,
                             tooltip="Latent height (image height / 8) used by the resolution-dependent shifts when no latent is connected."),
                io.Int.Input("num_samples", default=100_000, min=1000, max=10_000_000,
                             tooltip="How many timesteps to draw for the histogram."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Random seed of the draw."),
            ],
            outputs=[
                io.Image.Output("image", tooltip="Histogram of the sampled timesteps and the loss-weighting curve."),
                io.String.Output("text", tooltip="The same in text form, as musubi-tuner prints it."),
            ],
        )

    @classmethod
    def execute(cls, latent_width: int, latent_height: int, num_samples: int, seed: int,
                timestep_settings: TimestepSettings | None = None, latent: dict | None = None) -> io.NodeOutput:
        settings = timestep_settings or TimestepSettings()
        if latent is not None:
            latent_height, latent_width = latent["samples"].shape[-2:]
        preview = compute_preview(settings, latent_hw=(int(latent_height), int(latent_width)),
                                  num_samples=num_samples, seed=seed)
        text = console_text(preview)
        pixels = render_image(preview)
        image = torch.from_numpy(pixels).float().div(255.0).unsqueeze(0)
        return io.NodeOutput(image, text, ui=ui.PreviewImage(image, cls=cls))

