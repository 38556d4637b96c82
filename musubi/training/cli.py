"""``python -m musubi train``: train a LoRA from a TOML config on a latent cache.

    python -m musubi train --config_file my_lora.toml [--learning_rate 2e-4 --no-save_state ...]

Every config key is also an option; given options win over the file. On several GPUs run the same
command under accelerate: ``accelerate launch -m musubi train --config_file my_lora.toml`` (each
process trains on its share of the batches; only the main process prints and writes files).

Ctrl-C stops after the current step and saves a resumable checkpoint (a second Ctrl-C aborts at
once); continue with ``--resume latest``. Files go into output_dir as in musubi-tuner, but a fresh
run never overwrites another run's files there: it stops before training and says how to go on.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import signal
import threading
from typing import Any

import torch

from ..key_value_args import parse_key_value_args
from ..data.musubi_cache import open_cache_folder
from ..lora.network import network_from_args
from .adapter import load_adapter
from .checkpoints import plan_run
from .config import ConfigOption, TrainConfig, config_options, load_train_config
from .loop import Trainer, TrainCallbacks, TrainResult

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
    with _stop_on_ctrl_c(progress):
        result = train_from_config(config, progress)
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
    """Build the adapter, the data and the LoRA of ``config`` and train.

    Checked first: a run that does not resume must not overwrite another run's files (an error).
    """
    plan = plan_run(config.settings, config.resume, on_existing="refuse")
    adapter = load_adapter(config.model, dit=config.dit, **config.model_args)
    dataset = open_cache_folder(config.data_dir)
    settings = config.settings
    if settings.seed is None and not config.resume:
        settings = dataclasses.replace(settings, seed=random.SystemRandom().randrange(2**32))
    if settings.seed is not None:
        torch.manual_seed(settings.seed)  # the LoRA's initial weights (a resumed state replaces them)
    network = network_from_args(
        adapter.lora_root(), adapter.architecture, config.network_dim, config.network_alpha,
        config.network_dropout, config.network_args,
    )
    if config.network_weights:
        network.load_weights(config.network_weights)
    trainer = Trainer(adapter, network, dataset, settings, callbacks)
    return trainer.train(resume_from=plan.resume_from)


class ConsoleProgress(TrainCallbacks):
    """Prints about twenty progress lines per run and every saved file; Ctrl-C sets ``stop``."""

    def __init__(self):
        self.stop = False
        self.every = 1

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


class _stop_on_ctrl_c:
    """While active, the first Ctrl-C asks the trainer to stop and save; the second aborts."""

    def __init__(self, progress: ConsoleProgress):
        self.progress = progress
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.progress.stop:
            raise KeyboardInterrupt
        self.progress.stop = True
        print("\nStopping after this step and saving a resumable checkpoint (Ctrl-C again to abort).", flush=True)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False
