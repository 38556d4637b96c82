"""Validation Data: what Train LoRA (and Post-Hoc EMA Merge) score the LoRA on, and how often.

The node only gathers its inputs into a plain dict; Train LoRA splits a held-out fraction off its
training data or takes the given items, and the library's fixed plan does the scoring.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..musubi.errors import MusubiError
from ..musubi.training.validation import (
    DEFAULT_BANDS,
    DEFAULT_TIMESTEPS,
    ValidationSet,
    split_held_out,
)
from .adapters.training_data import (
    GraphTrainingData,
    SubsetData,
    TrainingData,
    item_groups,
)
from .train_settings import DatasetType

NODE = "Validation Data"
ValidationType = io.Custom("MUSUBI_VALIDATION")


class MusubiValidationData(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiValidationData",
            display_name="Validation Data",
            category="musubi/training",
            description="Data the LoRA is scored on but never trained on: a second Training Dataset, latents + conditioning, or a held-out fraction of the training data. Each evaluation uses the same fixed noise and noise levels, so validation losses compare across steps and runs.",
            inputs=[
                DatasetType.Input("dataset", optional=True, tooltip="A Training Dataset of other images/videos, encoded with the same VAE and text encoder."),
                io.Latent.Input("latents", optional=True, tooltip="Validation samples as VAE latents (with conditioning), instead of a dataset."),
                io.Conditioning.Input("conditioning", optional=True, tooltip="Captions of those latents: one for all or one per sample."),
                io.Float.Input("held_out_fraction", default=0.0, min=0.0, max=0.9, step=0.01,
                               tooltip="Instead of separate data: hold this share of the training items out of training (0.1 = every tenth item, chosen by seed) and validate on them. 0 = use the connected data."),
                io.Int.Input("every_n_steps", default=50, min=0, max=1_000_000,
                             tooltip="Score every N steps, plus before the first and after the last step (0: only those two)."),
                io.Int.Input("num_timesteps", default=DEFAULT_TIMESTEPS, min=1, max=256,
                             tooltip="Noise levels per item: fixed quantiles of the training timestep schedule."),
                io.Int.Input("num_bands", default=DEFAULT_BANDS, min=1, max=64,
                             tooltip="Report the loss per this many bands of those noise levels, least noise first."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the validation noise (and of the held-out choice); keep it to compare runs."),
            ],
            outputs=[ValidationType.Output("validation", display_name="validation", tooltip="For Train LoRA's or Post-Hoc EMA Merge's validation input.")],
        )

    @classmethod
    def execute(cls, held_out_fraction, every_n_steps, num_timesteps, num_bands, seed,
                dataset=None, latents=None, conditioning=None) -> io.NodeOutput:
        data = None
        if dataset is not None and (latents is not None or conditioning is not None):
            raise MusubiError(f"{NODE}: connect either a dataset or latents + conditioning, not both.")
        if (latents is None) != (conditioning is None) and dataset is None:
            missing = "conditioning" if conditioning is None else "latents"
            raise MusubiError(f"{NODE}: latents and conditioning go together; connect {missing} too.")
        if dataset is not None:
            if not isinstance(dataset, TrainingData) or len(dataset) == 0:
                raise MusubiError(f"{NODE}: the dataset input has no items.")
            data = dataset
        elif latents is not None:
            data = GraphTrainingData(latents, conditioning, where=NODE)
        if data is not None and held_out_fraction > 0:
            raise MusubiError(f"{NODE}: held_out_fraction is {held_out_fraction:g} and validation data is connected; "
                              "set held_out_fraction to 0 to use the connected data, or disconnect it.")
        if data is None and held_out_fraction <= 0:
            raise MusubiError(f"{NODE}: nothing to validate on: connect a dataset or latents + conditioning, or set "
                              "held_out_fraction (e.g. 0.1) to hold part of the training data out.")
        if num_bands > num_timesteps:
            raise MusubiError(f"{NODE}: num_bands ({num_bands}) cannot exceed num_timesteps ({num_timesteps}).")
        return io.NodeOutput({"data": data, "held_out_fraction": float(held_out_fraction), "every_n_steps": int(every_n_steps),
                              "num_timesteps": int(num_timesteps), "num_bands": int(num_bands), "seed": int(seed)})


def split_validation(validation: dict | None, training: TrainingData, where: str) -> tuple[TrainingData, TrainingData | None]:
    """(what trains, what validates): the connected data, or a held-out share of whole items
    (every repeat of a held-out item leaves training)."""
    if validation is None:
        return training, None
    if validation.get("data") is not None:
        data = unique_items(validation["data"])
        ValidationSet(data, where=f"{where}: validation (from {NODE})").check_matches(training, getattr(training, "architecture", None))
        return training, data
    groups = item_groups(training)
    try:
        kept, held = split_held_out(len(groups), validation["held_out_fraction"], validation["seed"], where)
    except MusubiError as error:
        raise MusubiError(f"{error} (held_out_fraction of {NODE})") from error
    return (SubsetData(training, [index for group in kept for index in groups[group]]),
            SubsetData(training, [groups[group][0] for group in held]))


def unique_items(data: TrainingData) -> TrainingData:
    """Each item once: a dataset's num_repeats would only score the same item again."""
    groups = item_groups(data)
    return data if len(groups) == len(data) else SubsetData(data, [group[0] for group in groups])
