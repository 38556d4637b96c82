"""Checkpoints on disk: a LoRA file per saved step and, beside it, a resumable state folder.

``<name>-stepNNNNNN.safetensors`` is the LoRA of step N; ``<name>-stepNNNNNN-state/`` holds
everything needed to continue exactly (see :mod:`.loop`), written all or nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from ..errors import MusubiError
from .settings import TrainSettings

# Files of a state folder. trainer_state.json is written last: a folder without it is incomplete.
STATE_FORMAT = 1
NETWORK_FILE = "network.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
RNG_FILE = "rng.pt"
TRAINER_STATE_FILE = "trainer_state.json"



def checkpoint_path(output_dir: str, output_name: str, step: int) -> str:
    return os.path.join(output_dir, f"{output_name}-step{step:06d}.safetensors")


def state_dir_path(output_dir: str, output_name: str, step: int) -> str:
    return os.path.join(output_dir, f"{output_name}-step{step:06d}-state")


def list_checkpoints(output_dir: str, output_name: str) -> dict[int, dict[str, str]]:
    """step -> {"lora": file, "state": folder} of the checkpoints of ``output_name`` (complete states only)."""
    lora_pattern = re.compile(re.escape(output_name) + r"-step(\d{6,})\.safetensors")
    state_pattern = re.compile(re.escape(output_name) + r"-step(\d{6,})-state")
    found: dict[int, dict[str, str]] = {}
    if not os.path.isdir(output_dir):
        return found
    for entry in os.listdir(output_dir):
        path = os.path.join(output_dir, entry)
        match = lora_pattern.fullmatch(entry)
        if match and os.path.isfile(path):
            found.setdefault(int(match.group(1)), {})["lora"] = path
            continue
        match = state_pattern.fullmatch(entry)
        if match and os.path.isfile(os.path.join(path, TRAINER_STATE_FILE)):
            found.setdefault(int(match.group(1)), {})["state"] = path
    return found


def find_latest_state(output_dir: str, output_name: str) -> str | None:
    """The complete state folder of ``output_name`` with the highest step, or None."""
    states = {step: entry["state"] for step, entry in list_checkpoints(output_dir, output_name).items() if "state" in entry}
    return states[max(states)] if states else None


def prune_checkpoints(output_dir: str, output_name: str, keep: int, current_step: int) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints up to ``current_step``; returns what was deleted.

    Checkpoints after ``current_step`` (left over from an earlier, longer run) are not counted
    and not touched.
    """
    checkpoints = list_checkpoints(output_dir, output_name)
    steps = sorted(step for step in checkpoints if step <= current_step)
    deleted = []
    for step in steps[: max(0, len(steps) - keep)]:
        entry = checkpoints[step]
        if "lora" in entry:
            os.remove(entry["lora"])
            deleted.append(entry["lora"])
        if "state" in entry:
            shutil.rmtree(entry["state"])
            deleted.append(entry["state"])
    return deleted


def last_good_checkpoint(settings: TrainSettings, step: int) -> str | None:
    checkpoints = list_checkpoints(settings.output_dir, settings.output_name)
    earlier = [s for s in checkpoints if s < step]
    if not earlier:
        return None
    entry = checkpoints[max(earlier)]
    return entry.get("state") or entry.get("lora")


def write_json(path: str, values: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(values, handle, indent=1, default=str)


def read_trainer_state(state_dir: str) -> dict:
    path = os.path.join(state_dir, TRAINER_STATE_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise MusubiError(f"resume: cannot read {path} ({error}).") from error
    if state.get("format") != STATE_FORMAT:
        raise MusubiError(f"resume: {state_dir} was written by another version (state format {state.get('format')}).")
    return state
