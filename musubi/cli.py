"""python -m musubi <command> …: one sub-command per feature.

Each command lives in its own module exposing ``add_cli_arguments(parser)`` and
``run_cli(args) -> int``; only the module of the command being run is imported.
"""

import argparse
import importlib
import sys

from .errors import MusubiError

COMMANDS = {
    "ema-merge": (".training.ema_selection", "Merge LoRA checkpoints with a post-hoc EMA (optionally the profile with the lowest validation loss)."),
    "timesteps": (".training.timestep_preview", "Show the training timestep distribution."),
    "quantize": (".fp8", "Quantize a DiT checkpoint to block-scaled FP8."),
    "train": (".training.cli", "Train a LoRA from a TOML config on cached latents."),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m musubi", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = None
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = commands.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:
            chosen = importlib.import_module(module_name, __package__)
            chosen.add_cli_arguments(command_parser)
    args = parser.parse_args(argv)
    try:
        return int(chosen.run_cli(args) or 0)
    except MusubiError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
