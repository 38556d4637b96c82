"""Checkpoints on disk: a LoRA file per saved step and a resumable state folder for it.

``<name>-stepNNNNNN.safetensors`` in ``output_dir`` is the LoRA of step N and ``<name>.safetensors``
the final one; ``<name>-stepNNNNNN-state/`` holds everything needed to continue exactly (see
:mod:`.loop`), written all or nothing, in ``state_dir`` (``output_dir`` unless set). States that an
older layout left in ``output_dir`` are still found, so those runs keep resuming.

Those files together are one training run. :func:`plan_run` keeps a new run from overwriting
another run's files: it refuses, or picks a free name (``<name>_2`` …).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from safetensors.torch import load_file

from ..errors import MusubiError
from .settings import TrainSettings

logger = logging.getLogger(__name__)

# Files of a state folder. trainer_state.json is written last: a folder without it is incomplete.
STATE_FORMAT = 1
NETWORK_FILE = "network.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
RNG_FILE = "rng.pt"
TRAINER_STATE_FILE = "trainer_state.json"

STATE_FOLDER_PATTERN = re.compile(r"(?P<name>.+)-step(?P<step>\d{6,})-state")


def checkpoint_path(output_dir: str, output_name: str, step: int) -> str:
    return os.path.join(output_dir, f"{output_name}-step{step:06d}.safetensors")


def final_lora_path(output_dir: str, output_name: str) -> str:
    return os.path.join(output_dir, output_name + ".safetensors")


def state_dir_path(state_root: str, output_name: str, step: int) -> str:
    return os.path.join(state_root, f"{output_name}-step{step:06d}-state")


def state_root(settings: TrainSettings) -> str:
    """The folder new state folders go to."""
    return settings.state_dir or settings.output_dir


def state_roots(settings: TrainSettings) -> list[str]:
    """Where states of this run may be: the state folder first, then output_dir (older layout)."""
    roots = [state_root(settings)]
    if os.path.abspath(settings.output_dir) != os.path.abspath(roots[0]):
        roots.append(settings.output_dir)
    return roots


def list_checkpoints(output_dir: str, output_name: str, state_dirs: Iterable[str] = ()) -> dict[int, dict[str, Any]]:
    """step -> {"lora": file, "state": folder, "states": [folders]} of ``output_name``'s checkpoints.

    LoRA files come from ``output_dir``; complete states from ``state_dirs`` and ``output_dir``, in
    that order of preference ("state" is the preferred one, "states" all copies).
    """
    lora_pattern = re.compile(re.escape(output_name) + r"-step(\d{6,})\.safetensors")
    state_pattern = re.compile(re.escape(output_name) + r"-step(\d{6,})-state")
    found: dict[int, dict[str, Any]] = {}
    folders = _unique_folders([*state_dirs, output_dir])
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        is_output_dir = os.path.abspath(folder) == os.path.abspath(output_dir)
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            match = lora_pattern.fullmatch(entry)
            if match and is_output_dir and os.path.isfile(path):
                found.setdefault(int(match.group(1)), {})["lora"] = path
                continue
            match = state_pattern.fullmatch(entry)
            if match and os.path.isfile(os.path.join(path, TRAINER_STATE_FILE)):
                checkpoint = found.setdefault(int(match.group(1)), {})
                checkpoint.setdefault("state", path)
                checkpoint.setdefault("states", []).append(path)
    return found


def _unique_folders(folders: Iterable[str]) -> list[str]:
    unique, seen = [], set()
    for folder in folders:
        key = os.path.abspath(folder)
        if key not in seen:
            seen.add(key)
            unique.append(folder)
    return unique


def list_states(output_dir: str, output_name: str, state_dirs: Iterable[str] = ()) -> list[tuple[int, str]]:
    """(step, folder) of every complete state of ``output_name``, newest first (preferred copy first)."""
    checkpoints = list_checkpoints(output_dir, output_name, state_dirs)
    return [(step, folder) for step in sorted(checkpoints, reverse=True) for folder in checkpoints[step].get("states", [])]


def find_latest_state(output_dir: str, output_name: str, state_dirs: Iterable[str] = ()) -> str | None:
    """The complete state folder of ``output_name`` with the highest step, or None."""
    states = list_states(output_dir, output_name, state_dirs)
    return states[0][1] if states else None


def prune_checkpoints(output_dir: str, output_name: str, keep: int, current_step: int, state_dirs: Iterable[str] = ()) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints up to ``current_step``; returns what was deleted.

    Checkpoints after ``current_step`` (left over from an earlier, longer run) are not counted
    and not touched.
    """
    checkpoints = list_checkpoints(output_dir, output_name, state_dirs)
    steps = sorted(step for step in checkpoints if step <= current_step)
    deleted = []
    for step in steps[: max(0, len(steps) - keep)]:
        entry = checkpoints[step]
        if "lora" in entry:
            os.remove(entry["lora"])
            deleted.append(entry["lora"])
        for state in entry.get("states", []):
            shutil.rmtree(state)
            deleted.append(state)
    return deleted


def last_good_checkpoint(settings: TrainSettings, step: int) -> str | None:
    checkpoints = list_checkpoints(settings.output_dir, settings.output_name, state_roots(settings))
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
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MusubiError(f"resume: cannot read {path} ({error}).") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise MusubiError(f"resume: {state_dir} was written by another version (state format {found}).")
    return state


# --- reading a whole state ---------------------------------------------------------------------


@dataclass
class SavedState:
    """Every file of a state folder, read into memory: a state either loads completely or not at all."""

    folder: str
    trainer_state: dict
    network: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: list
    scaler: dict | None = None

    @property
    def step(self) -> int:
        return int(self.trainer_state["global_step"])


def read_state(folder: str) -> SavedState:
    """Read a state folder; a missing, truncated or unreadable file is a MusubiError naming it."""
    trainer_state = read_trainer_state(folder)
    missing = [key for key in ("global_step", "epoch", "position", "seed") if key not in trainer_state]
    if missing:
        raise MusubiError(f"resume: {os.path.join(folder, TRAINER_STATE_FILE)} lacks {', '.join(missing)}.")
    network = _read_file(folder, NETWORK_FILE, lambda path: load_file(path, device="cpu"))
    optimizer = _read_file(folder, OPTIMIZER_FILE, _torch_load)
    scheduler = _read_file(folder, SCHEDULER_FILE, _torch_load)
    rng = _read_file(folder, RNG_FILE, _torch_load)
    if not isinstance(rng, list) or not rng:
        raise MusubiError(f"resume: {os.path.join(folder, RNG_FILE)} holds no random states.")
    scaler = None
    if os.path.isfile(os.path.join(folder, SCALER_FILE)):
        scaler = _read_file(folder, SCALER_FILE, _torch_load)
    return SavedState(folder, trainer_state, network, optimizer, scheduler, rng, scaler)


def _torch_load(path: str):
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_file(folder: str, name: str, reader: Callable[[str], Any]) -> Any:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise MusubiError(f"resume: {path} is missing.")
    try:
        return reader(path)
    except Exception as error:  # noqa: BLE001 - safetensors, pickle and zip readers raise many kinds
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MusubiError(f"resume: cannot read {path} ({type(error).__name__}: {reason[:200]}); the file is damaged or truncated.") from error


def read_newest_state(output_dir: str, output_name: str, state_dirs: Iterable[str] = ()) -> tuple[SavedState | None, list[str]]:
    """The newest state of ``output_name`` that reads completely, and a line for each newer one skipped.

    None (and no lines) when there is no state at all; a MusubiError naming every file at fault
    when there are states but none reads.
    """
    skipped: list[str] = []
    for _, folder in list_states(output_dir, output_name, state_dirs):
        try:
            state = read_state(folder)
        except MusubiError as error:
            skipped.append(str(error).removeprefix("resume: "))
            logger.warning("resume: skipping the state %s: %s", folder, skipped[-1])
            continue
        return state, skipped
    if skipped:
        raise MusubiError(
            f"resume: no state of '{output_name}' could be read: {'; '.join(skipped)}. "
            "Move the damaged state folders away to start over from an earlier one, or train anew (resume off)."
        )
    return None, skipped


# --- one run, one set of files -----------------------------------------------------------------


def run_files(settings: TrainSettings) -> list[str]:
    """The files a run named ``settings.output_name`` left: step LoRAs, the final LoRA and states."""
    found = []
    for entry in list_checkpoints(settings.output_dir, settings.output_name, state_roots(settings)).values():
        if "lora" in entry:
            found.append(entry["lora"])
        found.extend(entry.get("states", []))
    final = final_lora_path(settings.output_dir, settings.output_name)
    if os.path.isfile(final):
        found.append(final)
    return sorted(found)


@dataclass
class RunPlan:
    """Where a run writes and what it continues: the result of :func:`plan_run`."""

    settings: TrainSettings  # with the free name when one was picked
    resume_from: str | None  # None: a fresh run
    renamed_from: str | None = None  # the asked-for output_name, when its files belong to another run
    other_run_files: list[str] = dataclasses.field(default_factory=list)  # that other run's files

    def describe(self) -> str:
        """One line for a report, or ''."""
        if self.renamed_from is None:
            return ""
        shown = ", ".join(os.path.basename(path) for path in self.other_run_files[:3])
        more = f" and {len(self.other_run_files) - 3} more" if len(self.other_run_files) > 3 else ""
        return (f"new run '{self.settings.output_name}': '{self.renamed_from}' already holds another run's files "
                f"({shown}{more}), which are kept")


def plan_run(settings: TrainSettings, resume_from: str | None, on_existing: str = "refuse") -> RunPlan:
    """Decide whether a run continues an earlier one and where it writes, before anything is written.

    Resuming (a state folder, or ``"latest"`` when ``output_name`` has a state) continues that run
    in place. Otherwise a run starts fresh, and when ``output_name`` already holds files of another
    run, ``on_existing`` decides: ``"refuse"`` (a MusubiError saying how to go on) or
    ``"new_name"`` (the first free ``<name>_2``, ``<name>_3`` …; a folder named after the run is
    renamed with it).
    """
    if on_existing not in ("refuse", "new_name"):
        raise ValueError(f"on_existing must be 'refuse' or 'new_name', got {on_existing!r}")
    resume_from = resume_from or None
    if resume_from is not None and resume_from != "latest":
        return RunPlan(settings, resume_from)
    if resume_from == "latest" and list_states(settings.output_dir, settings.output_name, state_roots(settings)):
        return RunPlan(settings, "latest")
    existing = run_files(settings)
    if not existing:
        return RunPlan(settings, None)
    if on_existing == "refuse":
        shown = ", ".join(os.path.basename(path) for path in existing[:4]) + (" …" if len(existing) > 4 else "")
        why = ("resume = 'latest' found no resumable state of it, and a fresh run" if resume_from == "latest"
               else "a fresh run")
        raise MusubiError(
            f"{settings.output_dir} already holds files of a run named '{settings.output_name}' ({shown}); "
            f"{why} would overwrite them. Continue that run with resume = 'latest' (or a state folder), "
            "or choose another output_name or output_dir, or move those files away."
        )
    for number in range(2, 10_000):
        candidate = _renamed(settings, f"{settings.output_name}_{number}")
        if not run_files(candidate):
            logger.info("'%s' already holds another run's files; this run is '%s'.", settings.output_name, candidate.output_name)
            return RunPlan(candidate, None, settings.output_name, existing)
    raise MusubiError(f"no free name left for a new run of '{settings.output_name}'; choose another output_name.")


def _renamed(settings: TrainSettings, name: str) -> TrainSettings:
    """The settings with ``name``; folders named after the old name are renamed too."""

    def move(folder: str | None) -> str | None:
        if not folder:
            return folder
        trimmed = os.path.normpath(folder)
        if os.path.basename(trimmed) == settings.output_name:
            return os.path.join(os.path.dirname(trimmed), name)
        return folder

    return dataclasses.replace(settings, output_dir=move(settings.output_dir), state_dir=move(settings.state_dir), output_name=name)
