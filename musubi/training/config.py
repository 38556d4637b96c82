"""Training options from a TOML file and the command line, checked before anything runs.

The file layout is musubi-tuner's: top-level values and the values of every top-level table are
read into one flat set of options (so tables only group options for the reader), and a nested
sub-table becomes a table value, e.g. ``[optimizer.optimizer_args]``. A top-level table named
after an option that takes a table (``[network_args]``, ``[optimizer_args]``,
``[lr_scheduler_args]``, ``[model_args]``) is that option's value. Precedence: command line, then
the file, then the defaults.

Unlike musubi-tuner every value is checked: an unknown key is an error naming it (with the
closest known name), so is a value of the wrong type (naming the key, the expected type and
the value) or outside its choices, and so is a key set twice in one file. Strings are never read
as numbers: ``learning_rate = "1e-4"`` is an error that says to drop the quotes. (The command line
converts its text arguments as usual.) Integers are accepted for number options. Booleans can
be switched off from the command line (``--no-save_state``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import MusubiError
from ..lora.modules import NETWORK_TYPES
from ..lora.network import check_network_type, network_type_from_module
from .models import BUILTIN_MODELS, model_choices_help
from .timesteps import METHODS, WEIGHTING_SCHEMES, TimestepSettings, add_timestep_arguments
from .settings import TrainSettings, check_option_value, option_fields

try:
    import tomllib as _toml

    _TOML_ERROR = _toml.TOMLDecodeError
except ModuleNotFoundError:  # Python 3.10
    import toml as _toml

    _TOML_ERROR = _toml.TomlDecodeError

# Option kinds whose value is a table (a top-level TOML table of that name is the value itself).
TABLE_KINDS = ("key values", "table")

# musubi-tuner options this trainer does not take, and what to do instead.
_MUSUBI_ONLY = {
    "fp8_base": "fp8_scaled loads the frozen weights block-scaled to fp8 (musubi-tuner's --fp8_base --fp8_scaled)",
    "save_last_n_steps": "use save_last_n_checkpoints (keeps the newest N checkpoints)",
    "save_last_n_epochs": "use save_last_n_checkpoints (keeps the newest N checkpoints)",
    "save_last_n_steps_state": "use save_last_n_checkpoints (states are pruned with their LoRA files)",
    "save_last_n_epochs_state": "use save_last_n_checkpoints (states are pruned with their LoRA files)",
    "save_state_on_train_end": "save_state (on by default) also saves the state at the end",
    "full_fp16": "use mixed_precision = 'fp16'",
    "full_bf16": "use mixed_precision = 'bf16'",
    "lr_scheduler_type": "use lr_scheduler with one of the built-in schedules",
}


@dataclass(frozen=True)
class ConfigOption:
    name: str
    kind: str  # see trainer.check_option_value
    default: Any
    help: str
    choices: tuple | None = None
    group: str = "training"


@dataclass(frozen=True)
class TrainConfig:
    """A checked training configuration: what to build, and the trainer's settings."""

    model: str
    data_dir: str | None
    settings: TrainSettings
    dit: str | None = None
    dit_high_noise: str | None = None
    timestep_boundary: float | None = None
    fp8_scaled: bool = False
    dataset_config: str | None = None
    num_repeats: int = 1
    validation_data_dir: str | None = None
    model_args: dict = dataclasses.field(default_factory=dict)
    network_dim: int | None = None
    network_alpha: float = 1.0
    network_dropout: float | None = None
    network_args: Any = None
    network_weights: str | None = None
    network_type: str = "lora"
    resume: str | None = None
    source: str | None = None


_BUILD_OPTIONS = (
    ConfigOption("model", "optional str", None, model_choices_help(), group="model"),
    ConfigOption("dit", "optional str", None, "the DiT checkpoint (Wan 2.2 A14B: the low-noise expert)", group="model"),
    ConfigOption("dit_high_noise", "optional str", None,
                 "Wan 2.2 A14B: the high-noise expert's checkpoint; one LoRA trains on both experts", group="model"),
    ConfigOption("timestep_boundary", "optional float", None,
                 "Wan 2.2 A14B: noise level where the high-noise expert takes over (values above 1 are timesteps; "
                 "default 0.875, 0.9 for image-to-video)", group="model"),
    ConfigOption("fp8_scaled", "bool", False,
                 "load the frozen weights block-scaled to fp8 (about half of bf16's memory), as Load DiT (fp8 scaled)",
                 group="model"),
    ConfigOption("model_args", "table", {}, "more keyword arguments for the adapter factory", group="model"),
    ConfigOption("data_dir", "optional str", None,
                 "cache folder to train on: the Training Dataset node's or musubi-tuner's caches, or latent cache items "
                 "(this or dataset_config is required)", group="data"),
    ConfigOption("dataset_config", "optional str", None,
                 "musubi-tuner's dataset TOML: trains on each dataset's cache_directory with its num_repeats", group="data"),
    ConfigOption("num_repeats", "int", 1, "how often each item of data_dir appears per epoch", group="data"),
    ConfigOption("validation_data_dir", "optional str", None,
                 "cache folder of validation data (same layout and model as data_dir), scored with fixed noise before the "
                 "first step, every validate_every_n_steps and after the last step", group="data"),
    ConfigOption("network_dim", "optional int", None, "LoRA rank (default 4)", group="network"),
    ConfigOption("network_alpha", "float", 1.0, "LoRA alpha (scale = alpha / rank)", group="network"),
    ConfigOption("network_dropout", "optional float", None, "dropout on the LoRA's inner features", group="network"),
    ConfigOption("network_args", "key values", None,
                 "e.g. ['loraplus_lr_ratio=4', \"exclude_patterns=['.*norm.*']\"]", group="network"),
    ConfigOption("network_weights", "optional str", None,
                 "start from this LoRA/LoHa/LoKr file (a warm start: its type and ranks must fit these settings)",
                 group="network"),
    ConfigOption("network_type", "optional str", None, "lora (default), loha or lokr (LoKr's factor: network_args factor=N)",
                 choices=NETWORK_TYPES, group="network"),
    ConfigOption("network_module", "optional str", None,
                 "musubi-tuner's spelling of network_type: networks.lora (or networks.lora_*), networks.loha, networks.lokr",
                 group="network"),
    ConfigOption("resume", "optional str", None, "a state folder to resume from, or 'latest'", group="saving"),
)

_TIMESTEP_KINDS = {"str": "str", "float": "float", "bool": "bool", "int | None": "optional int"}
_TIMESTEP_CHOICES = {"timestep_sampling": METHODS, "weighting_scheme": WEIGHTING_SCHEMES}
_SAVING_OPTIONS = {"output_dir", "output_name", "state_dir", "save_every_n_steps", "save_every_n_epochs", "save_last_n_checkpoints",
                   "save_state", "save_precision", "lora_format"}
_LOGGING_PREFIXES = ("log_", "logging_", "metadata_", "training_comment")


def config_options() -> dict[str, ConfigOption]:
    """Every option of a training config, by name, in a stable order."""
    options = {option.name: option for option in _BUILD_OPTIONS}
    for option in option_fields():
        if option.name in _SAVING_OPTIONS:
            group = "saving"
        elif option.name.startswith(_LOGGING_PREFIXES):
            group = "logging and metadata"
        else:
            group = "training"
        options[option.name] = ConfigOption(
            option.name, option.metadata["kind"], option.default, option.metadata["help"], option.metadata["choices"], group
        )
    helps = _timestep_helps()
    for option in dataclasses.fields(TimestepSettings):
        options[option.name] = ConfigOption(
            option.name, _TIMESTEP_KINDS[option.type], option.default, helps.get(option.name, ""),
            _TIMESTEP_CHOICES.get(option.name), "timesteps",
        )
    return options


def _timestep_helps() -> dict[str, str]:
    parser = argparse.ArgumentParser(add_help=False)
    add_timestep_arguments(parser)
    # The command line adds "(default: …)" itself, from the option's default.
    return {action.dest: (action.help or "").replace(" (default: %(default)s)", "").replace("%(default)s", str(action.default))
            for action in parser._actions}


def read_config_file(path: str) -> tuple[dict[str, Any], str]:
    """The flattened options of a TOML file, and the file's path (``.toml`` appended if missing)."""
    path = os.fspath(path)
    if not path.endswith(".toml"):
        path += ".toml"
    if not os.path.isfile(path):
        raise MusubiError(f"config_file {path}: file not found.")
    try:
        if _toml.__name__ == "tomllib":
            with open(path, "rb") as handle:
                document = _toml.load(handle)
        else:
            document = _toml.load(path)
    except (_TOML_ERROR, UnicodeDecodeError) as error:
        raise MusubiError(f"{path}: not valid TOML ({error}).") from error
    options = config_options()
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}

    def put(key: str, value: Any, where: str) -> None:
        if key in values:
            raise MusubiError(f"{path}: '{key}' is set twice ({origins[key]} and {where}); keep one.")
        values[key], origins[key] = value, where

    for key, value in document.items():
        takes_table = key in options and options[key].kind in TABLE_KINDS
        if isinstance(value, dict) and not takes_table:
            for sub_key, sub_value in value.items():
                put(sub_key, sub_value, f"table [{key}]")
        else:
            put(key, value, "the top level")
    return values, path


def load_train_config(config_file: str | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The checked configuration: ``overrides`` (command line) over ``config_file`` over defaults."""
    file_values, source = read_config_file(config_file) if config_file else ({}, None)
    return resolve_config(file_values, overrides or {}, source)


def resolve_config(file_values: Mapping[str, Any], overrides: Mapping[str, Any], source: str | None = None) -> TrainConfig:
    """Check and combine option values (from a file, then overrides) into a :class:`TrainConfig`."""
    options = config_options()
    values = {name: _copy(option.default) for name, option in options.items()}
    for origin, given in ((source or "config", file_values), ("command line", overrides)):
        for key, value in given.items():
            if key not in options:
                raise MusubiError(f"{origin}: {_unknown_key_message(key, options)}")
            option = options[key]
            try:
                value = check_option_value(key, value, option.kind)
            except MusubiError as error:
                raise MusubiError(f"{origin}: {error}") from None
            if option.choices and value is not None and value not in option.choices:
                raise MusubiError(f"{origin}: {key} = {value!r} is not a choice; choose one of {', '.join(map(str, option.choices))}.")
            values[key] = value

    timestep_names = [option.name for option in dataclasses.fields(TimestepSettings)]
    timesteps = TimestepSettings(**{name: values[name] for name in timestep_names}).validate()
    settings = TrainSettings(**{option.name: values[option.name] for option in option_fields()}, timesteps=timesteps).validate()
    if not values["model"]:
        raise MusubiError(f"model is required: {', '.join(BUILTIN_MODELS)}, or an adapter factory 'package.module:factory'.")
    if not values["data_dir"] and not values["dataset_config"]:
        raise MusubiError("the training data is required: data_dir (a cache folder) or dataset_config (musubi-tuner's "
                          "dataset TOML, read through its cache_directory entries).")
    if values["data_dir"] and values["dataset_config"]:
        raise MusubiError("data_dir and dataset_config are both set; give one of them.")
    if settings.validate_every_n_steps and not values["validation_data_dir"]:
        raise MusubiError("validate_every_n_steps is set but validation_data_dir is not; give the validation cache folder "
                          "(validation_data_dir) or leave validate_every_n_steps out.")
    if values["num_repeats"] < 1:
        raise MusubiError(f"num_repeats must be at least 1, got {values['num_repeats']}.")
    if values["timestep_boundary"] is not None and not values["dit_high_noise"]:
        raise MusubiError("timestep_boundary is for Wan 2.2 A14B's two experts: set dit_high_noise too (dit is then the "
                          "low-noise expert), or leave timestep_boundary out.")
    return TrainConfig(
        model=values["model"], data_dir=values["data_dir"], settings=settings, dit=values["dit"],
        dit_high_noise=values["dit_high_noise"], timestep_boundary=values["timestep_boundary"],
        fp8_scaled=values["fp8_scaled"], dataset_config=values["dataset_config"], num_repeats=values["num_repeats"],
        validation_data_dir=values["validation_data_dir"],
        model_args=dict(values["model_args"]), network_dim=values["network_dim"], network_alpha=values["network_alpha"],
        network_dropout=values["network_dropout"], network_args=values["network_args"],
        network_weights=values["network_weights"], network_type=_network_type(values), resume=values["resume"],
        source=source,
    )


def _network_type(values: Mapping[str, Any]) -> str:
    """network_type, or musubi-tuner's network_module; both given must name the same type."""
    from_module = network_type_from_module(values["network_module"])
    given = values["network_type"]
    if given and from_module and given != from_module:
        raise MusubiError(
            f"network_type = {given!r} and network_module = {values['network_module']!r} name different networks; keep one."
        )
    return check_network_type(given or from_module)


def _unknown_key_message(key: str, options: Mapping[str, ConfigOption]) -> str:
    if key in _MUSUBI_ONLY:
        return f"'{key}' is a musubi-tuner option this trainer does not take: {_MUSUBI_ONLY[key]}."
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; run 'python -m musubi train --help' for the list."
    return f"unknown option '{key}'{hint}"


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value
