"""``python -m musubi train``: train a LoRA from a TOML config on cached latents.

    python -m musubi train --config_file my_lora.toml [--learning_rate 2e-4 --no-save_state ...]
    python -m musubi train --model comfyui --dit wan.safetensors --dataset_config data.toml ...

Every config key is also an option; given options win over the file. The model is a built-in name
(``comfyui``, ``wan``, ``hunyuan_video``, ``flux``, ``qwen_image``: ComfyUI's own model code, as
Train LoRA uses it; ``framepack``; ``toy``) or an adapter factory. On several GPUs run the same
command under accelerate: ``accelerate launch --num_processes N -m musubi train …`` (each process
trains its shard of every batch, gradients are summed into the batch's mean; only the main
process prints and writes files).

Ctrl-C stops after the current step and saves a resumable checkpoint (a second Ctrl-C aborts at
once); continue with ``--resume latest``. Files go into output_dir as in musubi-tuner, but a fresh
run never overwrites another run's files there: it stops before training and says how to go on.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import signal
import threading
import warnings
from typing import Any

import torch

from ..key_value_args import parse_key_value_args
from ..data.musubi_cache import open_training_data
from ..errors import MusubiError
from ..lora.network import network_from_args
from .adapter import load_adapter
from .checkpoints import plan_run
from .config import ConfigOption, TrainConfig, config_options, load_train_config
from .loop import Trainer, TrainCallbacks, TrainResult, multi_process_cpu

_PRINTS_PER_RUN = 20


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config_file", default=None, help="TOML file with the training options ('.toml' may be left out)")
    groups: dict[str, Any] = {}
    for option in config_options().values():
        group = groups.get(option.group) or groups.setdefault(option.group, parser.add_argument_group(option.group))
        group.add_argument(f"--{option.name}", dest=option.name, default=argparse.SUPPRESS, **_argument_settings(option))


def _argument_settings(option: ConfigOption) -> dict[str, Any]:
    base = option.kind.removeprefix("optional ")
    default = "" if option.default in (None, {}) else f" (default: {option.default})"
    settings: dict[str, Any] = {"help": (option.help + default).replace("%", "%%")}
    if base == "bool":
        settings["action"] = argparse.BooleanOptionalAction
    elif base in ("key values", "table"):
        settings.update(nargs="+", metavar="KEY=VALUE")
    elif base == "step count":
        settings["type"] = _step_count
    else:
        settings["type"] = {"int": int, "float": float, "str": str}[base]
    if option.choices:
        settings["choices"] = option.choices
    return settings


def _step_count(text: str) -> int | float | str:
    """'100' -> 100, '0.1' -> 0.1, '10%' stays text (checked with the other settings)."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def run_cli(args: argparse.Namespace) -> int:
    options = config_options()
    overrides = {name: value for name, value in vars(args).items() if name in options}
    if "model_args" in overrides:
        overrides["model_args"] = parse_key_value_args(overrides["model_args"], "model_args")
    config = load_train_config(args.config_file, overrides)
    progress = ConsoleProgress()
    progress.main = _join_process_group()
    with _stop_on_ctrl_c(progress):
        try:
            result = train_from_config(config, progress)
        except MusubiError:
            if not progress.main:
                return 2  # the main process reports it, once
            raise
    if not result.is_main_process:
        return 130 if result.interrupted else 0
    if result.resumed_from:
        print(f"Resumed from {result.resumed_from} (step {result.start_step}).")
        for line in result.skipped_states:
            print(f"  skipped an unreadable newer state: {line}")
    if result.interrupted:
        print(f"Stopped at step {result.global_step}/{result.total_steps}; the state is in {result.last_state_dir}.")
        print("Continue with: --resume latest (or --resume <that folder>).")
        return 130
    print(f"Done: {result.global_step} steps. LoRA saved to {result.final_lora_path}")
    return 0


def train_from_config(config: TrainConfig, callbacks: TrainCallbacks | None = None) -> TrainResult:
    """Open the data, build the adapter and the LoRA of ``config`` and train.

    Checked first: a run that does not resume must not overwrite another run's files (an error).
    """
    plan = plan_run(config.settings, config.resume, on_existing="refuse")
    settings = config.settings
    dataset = open_training_data(config.data_dir, config.dataset_config, config.num_repeats, settings.batch_size)
    validation = None
    if config.validation_data_dir:
        try:
            validation = open_training_data(config.validation_data_dir, None, 1, settings.batch_size)
        except MusubiError as error:
            raise MusubiError(f"validation_data_dir: {error}") from error
    adapter = load_adapter(config.model, data=dataset, validation_data=validation, **adapter_options(config))
    dataset = getattr(adapter, "training_dataset", None) or dataset
    if validation is not None:  # an adapter that reads conditioning from its own view offers one for validation too
        validation = getattr(adapter, "validation_dataset", None) or validation
    report = getattr(callbacks, "on_prepared", None)
    if callable(report):
        report(getattr(adapter, "summary", None), dataset)
    if settings.seed is None and not config.resume:
        settings = dataclasses.replace(settings, seed=_shared_random_seed())
    if settings.seed is not None:
        torch.manual_seed(settings.seed)  # the LoRA's initial weights (a resumed state replaces them)
    network = network_from_args(
        adapter.lora_root(), adapter.architecture, config.network_dim, config.network_alpha,
        config.network_dropout, config.network_args, network_type=config.network_type,
    )
    if config.network_type != "lora":
        _tell(callbacks, network.describe())
    if config.network_weights:
        report = network.warm_start(config.network_weights)
        _tell(callbacks, f"warm start from {config.network_weights}: {len(report.loaded_modules)} layers loaded"
                         + "".join(f"; {note}" for note in report.notes))
    trainer = Trainer(adapter, network, dataset, settings, callbacks, validation_data=validation)
    return trainer.train(resume_from=plan.resume_from)


def _tell(callbacks: TrainCallbacks | None, line: str) -> None:
    """A line about the run: printed by the command line's progress, logged otherwise."""
    if isinstance(callbacks, ConsoleProgress):
        if callbacks.main:
            print(line, flush=True)
    else:
        logging.getLogger(__name__).info("%s", line)


def adapter_options(config: TrainConfig) -> dict[str, Any]:
    """The factory's keyword arguments: model_args plus the model options that are set."""
    options = dict(config.model_args)
    named = {"dit": config.dit, "dit_high_noise": config.dit_high_noise, "timestep_boundary": config.timestep_boundary,
             "fp8_scaled": True if config.fp8_scaled else None}
    for name, value in named.items():
        if value is None:
            continue
        if name in options and options[name] != value:
            raise MusubiError(f"{name} is given twice, as {value!r} and in model_args as {options[name]!r}; keep one.")
        options[name] = value
    return options


def _join_process_group() -> bool:
    """Under ``accelerate launch`` / ``torchrun`` with several processes: join the process group now
    (each process takes its own GPU before any model loads) and keep the other processes quiet.
    Returns whether this is the main process."""
    state = _process_group()
    if state is None:
        return True
    if not state.is_main_process:
        logging.getLogger().setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
    return state.is_main_process


def _process_group():
    """accelerate's state of a multi-process launch (the process group joined), or None for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # On a machine without a GPU the processes train on the CPU (gloo) with nothing to configure.
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or multi_process_cpu())


def _shared_random_seed() -> int:
    """A random seed, the same on every process of a multi-process run (the main process's)."""
    seed = random.SystemRandom().randrange(2**32)
    if _process_group() is not None:
        from accelerate.utils import broadcast_object_list

        seed = broadcast_object_list([seed])[0]
    return seed


class ConsoleProgress(TrainCallbacks):
    """Prints about twenty progress lines per run and every saved file; Ctrl-C sets ``stop``."""

    def __init__(self):
        self.stop = False
        self.every = 1
        self.main = True  # only the main process of a multi-process run prints

    def on_prepared(self, model_summary: str | None, dataset) -> None:
        """What the run loaded: the model (as its adapter describes it) and the data."""
        if not self.main:
            return
        if model_summary:
            print(model_summary, flush=True)
        buckets = dataset.buckets() if callable(getattr(dataset, "buckets", None)) else {}
        shapes = ", ".join("x".join(map(str, shape)) for shape in sorted(buckets))
        print(f"data: {len(dataset)} items (repeats included)" + (f" in {len(buckets)} bucket(s) of latent shape {shapes}" if buckets else ""),
              flush=True)

    def on_start(self, start_step: int, total_steps: int) -> None:
        self.every = max(1, (total_steps - start_step) // _PRINTS_PER_RUN)
        self.total = total_steps
        where = f"from step {start_step} " if start_step else ""
        print(f"Training {where}to step {total_steps}.", flush=True)

    def should_stop(self) -> bool:
        return self.stop

    def on_step(self, step: int, loss: float, lrs: dict[str, float]) -> None:
        if step % self.every == 0 or step == self.total:
            rates = ", ".join(f"{name} {rate:.3g}" for name, rate in lrs.items())
            print(f"step {step}/{self.total}  loss {loss:.5f}  lr {rates}", flush=True)

    def on_checkpoint(self, path: str) -> None:
        print(f"saved {path}", flush=True)

    def on_validation(self, step: int, result) -> None:
        print(f"step {step}/{self.total}  {result.describe()}", flush=True)


class _stop_on_ctrl_c:
    """While active, the first Ctrl-C asks the trainer to stop and save; the second aborts.

    SIGTERM asks for the same stop and save (never an abort): launchers (accelerate's for one
    process) and cluster schedulers send it before they kill a run. Under a multi-process launch
    the launcher passes the signal on to every process; the main process's request counts.
    """

    def __init__(self, progress: ConsoleProgress):
        self.progress = progress
        self.previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
            if hasattr(signal, "SIGTERM"):
                self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.progress.stop:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.progress.stop = True
        if self.progress.main:
            print("\nStopping after this step and saving a resumable checkpoint (Ctrl-C again to abort).", flush=True)

    def __exit__(self, *exc):
        for number, previous in self.previous.items():
            signal.signal(number, previous)
        return False
