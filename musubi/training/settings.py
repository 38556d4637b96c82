"""What a training run is told: every option of :class:`TrainSettings`, its type, default and help.

The same table feeds the TOML config, the command line and the Train LoRA node, so an option is
declared once; ``result_settings`` are the ones that change the trained weights (a resume
with different ones is warned about and reported in the result).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..compile import BACKEND_HELP, DYNAMIC_HELP, FULLGRAPH_HELP, MODE_HELP, MODES, settings_from_options
from ..errors import MusubiError
from ..key_value_args import parse_key_value_args
from ..lora import formats as lora_formats
from .schedulers import SCHEDULER_NAMES, parse_step_count
from .timesteps import TimestepSettings

DEFAULT_TRACKER_NAME = "network_train"
MIXED_PRECISIONS = ("no", "fp16", "bf16")
LOG_WITH = ("tensorboard", "wandb", "all")
SAVE_PRECISIONS = {
    "float": torch.float32, "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}

# --- option types ------------------------------------------------------------------------------

_KIND_DESCRIPTIONS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "key values": "a list of 'key=value' strings or a table",
    "table": "a table of values",
    "step count": "a step count, a ratio below 1 or a percentage string like '10%'",
}


def describe_kind(kind: str) -> str:
    """Words for an option kind, as used in error messages."""
    base = kind.removeprefix("optional ")
    text = _KIND_DESCRIPTIONS[base]
    return text + " (or unset)" if kind.startswith("optional ") else text


def check_option_value(name: str, value: Any, kind: str) -> Any:
    """Return ``value`` (an int becomes a float for number options) or raise MusubiError naming
    the option, the expected type and the value. Strings are never read as numbers."""
    optional = kind.startswith("optional ")
    base = kind.removeprefix("optional ")
    if value is None and (optional or base == "key values"):
        return None
    is_bool = isinstance(value, bool)
    if base == "int" and isinstance(value, int) and not is_bool:
        return value
    if base == "float" and isinstance(value, (int, float)) and not is_bool:
        return float(value)
    if base == "bool" and is_bool:
        return value
    if base == "str" and isinstance(value, str):
        return value
    if base == "table" and isinstance(value, dict):
        return value
    if base == "step count" and (isinstance(value, (int, float, str)) and not is_bool):
        parse_step_count(value, 10**12, name)
        return value
    if base == "key values" and isinstance(value, (str, list, tuple, dict)):
        parse_key_value_args(value, name)
        return value
    message = f"{name} must be {describe_kind(kind)}, got {value!r} ({type(value).__name__})"
    if base in ("int", "float") and isinstance(value, str) and _looks_numeric(value):
        message += f"; write the number without quotes: {name} = {value.strip()}"
    raise MusubiError(message + ".")


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _option(default: Any, kind: str, help: str, choices: tuple | None = None, affects_result: bool = True):
    return field(default=default, metadata={"kind": kind, "help": help, "choices": choices, "affects_result": affects_result})


# --- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """The options of one training run (musubi-tuner's names). Call :meth:`validate` before use."""

    output_dir: str | None = _option(None, "optional str", "folder for checkpoints, states and the final LoRA (required)", affects_result=False)
    output_name: str = _option("lora", "str", "base name of the saved files", affects_result=False)
    state_dir: str | None = _option(None, "optional str", "folder for the resumable state folders (default: output_dir)", affects_result=False)
    learning_rate: float = _option(2e-6, "float", "learning rate; the default is musubi-tuner's, which suits full fine-tuning: LoRAs usually train at 1e-4 to 2e-4")
    optimizer_type: str = _option("AdamW", "str", "AdamW, AdamW8bit, Adafactor, Prodigy, *ScheduleFree, a torch.optim name or package.module.Class")
    optimizer_args: Any = _option(None, "key values", "optimizer settings, e.g. ['weight_decay=0.01', 'betas=(0.9,0.99)']")
    lr_scheduler: str = _option("constant", "str", "learning-rate schedule", choices=SCHEDULER_NAMES)
    lr_warmup_steps: Any = _option(0, "step count", "warmup steps: a count, a ratio below 1, or '10%'")
    lr_decay_steps: Any = _option(0, "step count", "decay steps of warmup_stable_decay: a count, a ratio below 1, or '10%'")
    lr_scheduler_num_cycles: float = _option(1.0, "float", "restarts of cosine_with_restarts; cosine waves ×2 for the other cosine schedules")
    lr_scheduler_power: float = _option(1.0, "float", "power of the polynomial schedule")
    lr_scheduler_min_lr_ratio: float | None = _option(None, "optional float", "lowest lr as a ratio of the initial lr (cosine_with_min_lr, warmup_stable_decay, rex)")
    lr_scheduler_timescale: int | None = _option(None, "optional int", "timescale of inverse_sqrt (default: the warmup steps)")
    lr_scheduler_args: Any = _option(None, "key values", "extra schedule settings, e.g. ['rex_alpha=0.1']")
    max_train_steps: int = _option(1600, "int", "optimizer steps to train (max_train_epochs wins when set)")
    max_train_epochs: int | None = _option(None, "optional int", "epochs to train; overrides max_train_steps")
    batch_size: int = _option(1, "int", "items per batch (items of one batch share a latent shape)")
    gradient_accumulation_steps: int = _option(1, "int", "batches per optimizer step")
    max_grad_norm: float = _option(1.0, "float", "clip the gradient norm to this value (0 = no clipping)")
    mixed_precision: str = _option("no", "str", "autocast dtype of the forward pass", choices=MIXED_PRECISIONS)
    gradient_checkpointing: bool = _option(False, "bool", "recompute activations in the backward pass to save memory", affects_result=False)
    seed: int | None = _option(None, "optional int", "random seed (default: a random one, stored in the metadata and the state)")
    save_every_n_steps: int | None = _option(None, "optional int", "save a checkpoint every N steps", affects_result=False)
    save_every_n_epochs: int | None = _option(None, "optional int", "save a checkpoint every N epochs", affects_result=False)
    save_last_n_checkpoints: int | None = _option(None, "optional int", "keep only the newest N checkpoints (LoRA files and states)", affects_result=False)
    save_state: bool = _option(True, "bool", "save a resumable state folder with every checkpoint and at the end", affects_result=False)
    save_precision: str | None = _option(None, "optional str", "dtype of saved LoRA files (default float32)", choices=tuple(SAVE_PRECISIONS), affects_result=False)
    lora_format: str = _option("comfyui", "str", "key layout of saved LoRA files", choices=lora_formats.FORMATS, affects_result=False)
    log_with: str | None = _option(None, "optional str", "tracker (default: tensorboard when logging_dir is set)", choices=LOG_WITH, affects_result=False)
    logging_dir: str | None = _option(None, "optional str", "folder for tracker logs (one sub-folder per run)", affects_result=False)
    log_prefix: str | None = _option(None, "optional str", "prefix of the run's log folder name", affects_result=False)
    log_tracker_name: str | None = _option(None, "optional str", f"tracker project name (default {DEFAULT_TRACKER_NAME})", affects_result=False)
    training_comment: str | None = _option(None, "optional str", "stored as ss_training_comment", affects_result=False)
    metadata_title: str | None = _option(None, "optional str", "modelspec.title (default: output_name)", affects_result=False)
    metadata_author: str | None = _option(None, "optional str", "modelspec.author", affects_result=False)
    metadata_description: str | None = _option(None, "optional str", "modelspec.description", affects_result=False)
    metadata_license: str | None = _option(None, "optional str", "modelspec.license", affects_result=False)
    metadata_tags: str | None = _option(None, "optional str", "modelspec.tags", affects_result=False)
    validate_every_n_steps: int | None = _option(None, "optional int", "with validation data: its loss every N steps (and before the first and after the last step; unset: only those two)", affects_result=False)
    validation_timesteps: int = _option(8, "int", "noise levels per validation item: fixed quantiles of the timestep schedule", affects_result=False)
    validation_bands: int = _option(4, "int", "report the validation loss per this many bands of those noise levels (lowest noise first)", affects_result=False)
    validation_seed: int = _option(0, "int", "seed of the validation noise (fixed, independent of seed, so runs compare)", affects_result=False)
    dynamo_backend: str = _option("NO", "str", BACKEND_HELP, affects_result=False)
    dynamo_mode: str | None = _option(None, "optional str", MODE_HELP, choices=MODES, affects_result=False)
    dynamo_fullgraph: bool = _option(False, "bool", FULLGRAPH_HELP, affects_result=False)
    dynamo_dynamic: bool = _option(False, "bool", DYNAMIC_HELP, affects_result=False)
    timesteps: TimestepSettings = field(default_factory=TimestepSettings)

    def validate(self) -> "TrainSettings":
        """Raise MusubiError naming the first bad option; return self."""
        for option in option_fields():
            value = check_option_value(option.name, getattr(self, option.name), option.metadata["kind"])
            choices = option.metadata["choices"]
            if choices and value is not None and value not in choices:
                raise MusubiError(f"{option.name}: {value!r} is not a choice; choose one of {', '.join(choices)}.")
        if not isinstance(self.timesteps, TimestepSettings):
            raise MusubiError(f"timesteps must be TimestepSettings, got {type(self.timesteps).__name__}.")
        self.timesteps.validate()
        settings_from_options(self).validate()
        if not self.output_dir:
            raise MusubiError("output_dir is required: the folder where checkpoints and the final LoRA go.")
        if not self.output_name or os.sep in self.output_name or (os.altsep and os.altsep in self.output_name):
            raise MusubiError(f"output_name must be a plain file name without folders, got {self.output_name!r}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise MusubiError(f"learning_rate must be a finite number ≥ 0, got {self.learning_rate}.")
        if self.learning_rate == 0:
            raise MusubiError("learning_rate is 0: nothing would train; set e.g. 1e-4 (about 1.0 for Prodigy and other "
                              "optimizers that find their own step size).")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise MusubiError(f"max_grad_norm must be a finite number ≥ 0 (0 = no clipping), got {self.max_grad_norm}.")
        for name in ("max_train_steps", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise MusubiError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("max_train_epochs", "save_every_n_steps", "save_every_n_epochs", "save_last_n_checkpoints",
                     "validate_every_n_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise MusubiError(f"{name} must be at least 1 (or unset), got {value}.")
        if self.validation_timesteps < 1 or not 1 <= self.validation_bands <= self.validation_timesteps or self.validation_seed < 0:
            raise MusubiError(f"validation_timesteps must be ≥ 1 and validation_bands between 1 and validation_timesteps "
                              f"(seed ≥ 0), got {self.validation_timesteps}, {self.validation_bands} (seed {self.validation_seed}).")
        if self.log_with in ("tensorboard", "all") and not self.logging_dir:
            raise MusubiError(f"log_with {self.log_with!r} writes TensorBoard logs: set logging_dir too.")
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly values (the timestep options nested under ``timesteps``)."""
        values = {option.name: plain_value(getattr(self, option.name)) for option in option_fields()}
        values["timesteps"] = self.timesteps.to_dict()
        return values

    def result_settings(self) -> dict[str, Any]:
        """The values that change the trained weights (not the saving or logging ones)."""
        values = {option.name: plain_value(getattr(self, option.name)) for option in option_fields() if option.metadata["affects_result"]}
        values["timesteps"] = self.timesteps.to_dict()
        return values

    def settings_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.result_settings(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def save_dtype(self) -> torch.dtype:
        return SAVE_PRECISIONS[self.save_precision or "float"]


def option_fields() -> list[dataclasses.Field]:
    """The plain options of :class:`TrainSettings` (all but the nested timestep settings)."""
    return [option for option in dataclasses.fields(TrainSettings) if "kind" in option.metadata]


def plain_value(value: Any) -> Any:
    """Tuples as lists and dict keys as strings, all the way down: how values look in JSON and TOML."""
    if isinstance(value, tuple):
        return [plain_value(item) for item in value]
    if isinstance(value, list):
        return [plain_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): plain_value(item) for key, item in value.items()}
    return value
