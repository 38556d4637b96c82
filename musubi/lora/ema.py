"""Post-hoc EMA: merge the LoRA checkpoints of one training run into a smoother LoRA.

The checkpoints are taken oldest first and folded into a float32 running average,
``average = average * beta + checkpoint * (1 - beta)``, one checkpoint at a time, so merging
many files needs memory for about one float32 copy of a LoRA, not one per file.

Two ways to choose the decay ``beta`` of each merge:

* linear: ``beta`` for the first merge moving linearly to ``beta2`` for the last (constant when
  ``beta2`` is not given). The result is bit for bit the one of musubi-tuner's
  ``lora_post_hoc_ema.py``.
* sigma_rel: the power-function EMA of EDM2 (Karras et al. 2024), whose averaging profile is
  ``t**gamma`` with relative width ``sigma_rel``. The checkpoints are treated as equally spaced
  samples at ``t = 1..n``, so merging checkpoint ``k`` (0-based) uses
  ``beta = (1 - 1/(k + 1)) ** (gamma + 1)`` and checkpoint ``k`` ends with weight
  ``((k + 1)**(gamma + 1) - k**(gamma + 1)) / n**(gamma + 1)``. Every checkpoint, the oldest
  included, contributes; musubi-tuner counts from ``t = 0`` and so discards the oldest file.

:func:`select_run_checkpoints` picks a run's step checkpoints out of what a glob matched: a
training folder also holds the final LoRA and, from older runs, resume states whose
``network.safetensors`` would otherwise be merged as if they were checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .. import files
from ..errors import MusubiError

# Parameter names that identify a LoRA (kohya/musubi, PEFT/diffusers, LyCORIS LoHa and LoKr).
LORA_PARAMETER_SUFFIXES = (
    ".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
)

_GOLDEN_RATIO = (1 + math.sqrt(5)) / 2
# sigma_rel(gamma) rises from 0 at gamma = -1 to its maximum at gamma = -1/phi**2, then falls to 0.
GAMMA_AT_MAX_SIGMA_REL = -1 / _GOLDEN_RATIO**2
SIGMA_REL_MAX = _GOLDEN_RATIO**-2.5  # about 0.30028

PROVENANCE_KEY = "ss_post_hoc_ema"

# What the trainer names its files: step checkpoints, and the state folders beside older runs' ones.
STEP_CHECKPOINT = re.compile(r"(?P<run>.+)-step(?P<step>\d{6,})\.safetensors")
STATE_FOLDER = re.compile(r".+-step\d{6,}-state")


@dataclass
class EMAMergeResult:
    output_file: str
    files: list[str]  # in merge order, oldest first
    decays: list[float]  # beta of each merge; decays[i] merges files[i + 1]
    weights: list[float]  # share of each file in the result, sums to 1
    metadata: dict[str, str]  # what was written to the output file


@dataclass
class CheckpointChoice:
    files: list[str]  # what to merge, in the order given
    left_out: list[tuple[str, str]]  # (file, why) of what was not taken


def select_run_checkpoints(paths: Sequence[str], named: Sequence[str] = ()) -> CheckpointChoice:
    """The step checkpoints (``<run>-stepNNNNNN.safetensors``) of one training run among ``paths``.

    Files inside a resume state folder are left out, and so is everything else once step
    checkpoints are among the files (the run's final LoRA repeats a step's weights). Files in
    ``named`` were asked for one by one and are kept. Files without step names are all kept
    (checkpoints named some other way). Step checkpoints of several runs (same name and folder
    = one run) are a MusubiError naming the runs, since averaging across runs mixes unrelated weights.
    """
    named = {os.path.abspath(path) for path in named}
    candidates, left_out = [], []
    for path in paths:
        explicit = os.path.abspath(path) in named
        if not explicit and STATE_FOLDER.fullmatch(os.path.basename(os.path.dirname(os.path.abspath(path)))):
            left_out.append((path, "inside a resume state folder (the trainer's working copy, not a checkpoint)"))
        else:
            candidates.append(path)
    runs = _runs_of(candidates)
    if len(runs) > 1:
        described = "; ".join(
            f"'{run}' in {folder} ({len(steps)} checkpoint{'s' * (len(steps) != 1)}, steps {min(steps)}–{max(steps)})"
            for (folder, run), steps in sorted(runs.items())
        )
        raise MusubiError(
            f"the checkpoints belong to {len(runs)} training runs: {described}. Merge the checkpoints of one run, "
            "e.g. with a glob like '<run folder>/<run>-step*.safetensors'."
        )
    if not runs:
        return CheckpointChoice(list(candidates), left_out)
    [(folder, run)] = runs
    steps = runs[(folder, run)]
    chosen = []
    for path in candidates:
        if STEP_CHECKPOINT.fullmatch(os.path.basename(path)) or os.path.abspath(path) in named:
            chosen.append(path)
        elif os.path.basename(path) == run + ".safetensors" and os.path.dirname(os.path.abspath(path)) == folder:
            left_out.append((path, _final_lora_note(path, run, steps)))
        else:
            left_out.append((path, f"not a step checkpoint of run '{run}' ({run}-stepNNNNNN.safetensors)"))
    return CheckpointChoice(chosen, left_out)


def _runs_of(paths: Sequence[str]) -> dict[tuple[str, str], list[int]]:
    """(folder, run name) -> steps of the step checkpoints among ``paths``."""
    runs: dict[tuple[str, str], list[int]] = {}
    for path in paths:
        match = STEP_CHECKPOINT.fullmatch(os.path.basename(path))
        if match:
            key = (os.path.dirname(os.path.abspath(path)), match.group("run"))
            runs.setdefault(key, []).append(int(match.group("step")))
    return runs


def _final_lora_note(path: str, run: str, steps: Sequence[int]) -> str:
    try:
        step = int(files.read_header(path)[1].get("ss_steps", ""))
    except (MusubiError, ValueError, OSError):
        return f"the final LoRA of run '{run}', not a step checkpoint"
    if step in steps:
        return f"the final LoRA of run '{run}': the same step {step} as {run}-step{step:06d}.safetensors"
    return f"the final LoRA of run '{run}' (step {step}, not a step checkpoint); name it on a line of its own to merge it too"


def sigma_rel_of_gamma(gamma: float) -> float:
    """Relative standard deviation of the power-function EMA profile ``t**gamma`` (EDM2, eq. 3)."""
    return math.sqrt((gamma + 1) / (gamma + 3)) / (gamma + 2)


def solve_gamma(sigma_rel: float) -> float:
    """Exponent ``gamma`` of the power-function EMA whose relative width is ``sigma_rel``.

    Two exponents share each width; this returns the larger one, the branch that holds every
    non-negative ``gamma`` and continues below 0 down to ``-1/phi**2`` for the widest profiles
    (sigma_rel between 1/sqrt(12) and about 0.3003), which ``t**gamma`` still represents.
    """
    if not isinstance(sigma_rel, numbers.Real) or not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise MusubiError(
            f"sigma_rel={sigma_rel!r} is out of range: it must lie in (0, {SIGMA_REL_MAX:.5f}]; "
            "typical values are 0.05 to 0.25 (smaller = the newest checkpoints dominate)."
        )
    # sigma_rel_of_gamma falls monotonically on [GAMMA_AT_MAX_SIGMA_REL, inf) and stays below
    # 1/(gamma + 2), so the root lies in [GAMMA_AT_MAX_SIGMA_REL, 1/sigma_rel]; bisect to full precision.
    low, high = GAMMA_AT_MAX_SIGMA_REL, min(1 / sigma_rel, sys.float_info.max)
    while True:
        middle = (low + high) / 2
        if not low < middle < high:
            return low
        if sigma_rel_of_gamma(middle) >= sigma_rel:
            low = middle
        else:
            high = middle


def merge_decays(n_files: int, beta: float = 0.95, beta2: float | None = None,
                 sigma_rel: float | None = None) -> list[float]:
    """The decay ``beta`` of each of the ``n_files - 1`` merges; ``sigma_rel`` overrides beta/beta2."""
    if n_files < 1:
        raise MusubiError("no checkpoints given: pass the LoRA files saved during training.")
    if sigma_rel is not None:
        exponent = solve_gamma(sigma_rel) + 1
        return [(1 - 1 / (k + 1)) ** exponent for k in range(1, n_files)]
    _check_decay("beta", beta)
    beta2 = beta if beta2 is None else beta2
    _check_decay("beta2", beta2)
    merges = n_files - 1
    if merges == 1:
        return [beta]
    return [beta + (beta2 - beta) * (i / (merges - 1)) for i in range(merges)]


def _check_decay(option: str, value: float) -> None:
    if not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise MusubiError(f"{option}={value!r} is out of range: a decay must lie in [0, 1] (for example 0.95).")


def effective_weights(decays: Sequence[float]) -> list[float]:
    """Share of each file in the merged result (oldest first) for the given merge decays."""
    weights = [1.0]
    for beta in decays:
        weights = [weight * beta for weight in weights] + [1 - beta]
    return weights


def post_hoc_ema_merge(paths: Sequence[str | os.PathLike], output_file: str | os.PathLike, beta: float = 0.95,
                       beta2: float | None = None, sigma_rel: float | None = None, no_sort: bool = False,
                       overwrite: bool = False, extra_metadata: Mapping[str, str] | None = None) -> EMAMergeResult:
    """Merge LoRA checkpoints of one run with a post-hoc EMA and write the result atomically.

    Files are merged oldest first by modification time (in the given order with ``no_sort``).
    Everything is validated before any merging, so bad input writes nothing. The output carries
    the newest file's metadata, ``extra_metadata``, recomputed ``sshs_*`` hashes and a
    ``ss_post_hoc_ema`` entry recording the settings and each file's weight.
    """
    paths = [os.fspath(path) for path in paths]
    output_file = os.fspath(output_file)
    _check_paths(paths)
    merge_decays(len(paths), beta, beta2, sigma_rel)
    _check_output_file(output_file, paths, overwrite)
    ordered, decays, merged, headers = merge_in_memory(paths, beta, beta2, sigma_rel, no_sort)
    weights = effective_weights(decays)
    metadata = dict(headers[ordered[-1]][1])
    metadata.update(extra_metadata or {})
    metadata[PROVENANCE_KEY] = _provenance(ordered, weights, beta, beta2, sigma_rel, no_sort)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = files.model_hashes(merged, metadata)
    files.atomic_save_file(merged, output_file, metadata)
    return EMAMergeResult(output_file, ordered, decays, weights, metadata)


def merge_in_memory(paths: Sequence[str | os.PathLike], beta: float = 0.95, beta2: float | None = None,
                    sigma_rel: float | None = None, no_sort: bool = False):
    """``(files oldest first, decays, merged tensors, headers)`` without writing anything: what
    :func:`post_hoc_ema_merge` writes, for scoring several profiles before choosing one."""
    paths = [os.fspath(path) for path in paths]
    _check_paths(paths)
    decays = merge_decays(len(paths), beta, beta2, sigma_rel)
    headers = {path: files.read_header(path) for path in paths}
    ordered = list(paths) if no_sort else sorted(paths, key=os.path.getmtime)
    _check_compatible(ordered, headers)
    return ordered, decays, _merge(ordered, decays, headers), headers


def _check_paths(paths: Sequence[str]) -> None:
    if not paths:
        raise MusubiError("no checkpoints given: pass at least two LoRA files saved during training.")
    if len(paths) < 2:
        raise MusubiError(f"need at least two checkpoints to merge, got only {paths[0]}.")


def _check_output_file(output_file: str, inputs: Sequence[str], overwrite: bool) -> None:
    target = os.path.realpath(output_file)
    for path in inputs:
        if os.path.realpath(path) == target or (os.path.exists(output_file) and os.path.exists(path)
                                                and os.path.samefile(path, output_file)):
            raise MusubiError(f"output_file {output_file} is one of the input checkpoints; choose a new file name.")
    if os.path.isdir(output_file):
        raise MusubiError(f"output_file {output_file} is a folder; give a file name such as merged.safetensors.")
    if os.path.exists(output_file) and not overwrite:
        raise MusubiError(f"output_file {output_file} already exists; choose another name or allow overwriting.")
    folder = os.path.dirname(os.path.abspath(output_file))
    if not os.path.isdir(folder):
        raise MusubiError(f"output_file {output_file}: the folder {folder} does not exist; create it first.")


def _is_lora(tensor_names) -> bool:
    return any(name.endswith(LORA_PARAMETER_SUFFIXES) for name in tensor_names)


def _check_compatible(ordered: Sequence[str], headers) -> None:
    """Refuse files that are not LoRAs of the same network before any tensor is merged."""
    for path in ordered:
        if not _is_lora(headers[path][0]):
            raise MusubiError(
                f"{path} is not a LoRA: expected tensors named like '<module>.lora_down.weight' / "
                "'.lora_up.weight' (or PEFT '.lora_A.weight' / '.lora_B.weight', LoHa 'hada_*', LoKr 'lokr_*')."
            )
    first = ordered[0]
    first_infos = headers[first][0]
    for path in ordered[1:]:
        for name, (dtype, shape) in headers[path][0].items():
            if name not in first_infos:
                if name.endswith(".alpha") or not files.is_float_dtype(dtype):
                    continue  # cannot change the result: alphas and non-float tensors come from the first file
                raise MusubiError(
                    f"tensor '{name}' of {path} is missing from the oldest checkpoint {first}; "
                    "merge only checkpoints of the same training run (same network, rank and modules)."
                )
            first_dtype, first_shape = first_infos[name]
            if first_shape != shape:
                raise MusubiError(
                    f"tensor '{name}' has shape {list(first_shape)} in {first} but {list(shape)} in {path}; "
                    "merge only checkpoints of the same training run (same rank and modules)."
                )
            if files.is_float_dtype(first_dtype) != files.is_float_dtype(dtype):
                raise MusubiError(
                    f"tensor '{name}' is {first_dtype} in {first} but {dtype} in {path}; "
                    "merge only checkpoints of the same training run."
                )
    _check_alphas(ordered, headers)


def _check_alphas(ordered: Sequence[str], headers) -> None:
    """Alphas scale the LoRA; averaging files with different alphas would be meaningless."""
    first = ordered[0]
    alpha_names = [name for name in headers[first][0] if name.endswith(".alpha")]
    first_alphas = dict(files.iter_tensors(first, alpha_names))
    for path in ordered[1:]:
        shared = [name for name in alpha_names if name in headers[path][0]]
        for name, alpha in files.iter_tensors(path, shared):
            expected = first_alphas[name]
            if not torch.allclose(expected.to(torch.float32), alpha.to(torch.float32)):
                raise MusubiError(
                    f"alpha '{name}' is {expected.tolist()} in {first} but {alpha.tolist()} in {path}; "
                    "merge only checkpoints trained with the same network_alpha."
                )


def _merge(ordered: Sequence[str], decays: Sequence[float], headers) -> dict[str, torch.Tensor]:
    """Fold the files into a float32 running average, reading one file at a time."""
    first = ordered[0]
    average: dict[str, torch.Tensor] = {}
    original_dtypes: dict[str, torch.dtype] = {}
    for name, tensor in files.iter_tensors(first):
        # Alphas and non-float tensors are kept from the oldest file as they are.
        if tensor.dtype.is_floating_point and not name.endswith(".alpha"):
            original_dtypes[name] = tensor.dtype
            tensor = tensor.to(torch.float32)
        average[name] = tensor

    for path, beta in zip(ordered[1:], decays):
        names = [name for name in headers[path][0] if name in original_dtypes]
        for name, tensor in files.iter_tensors(path, names):
            average[name] = average[name] * beta + tensor.to(torch.float32) * (1 - beta)

    for name, dtype in original_dtypes.items():
        average[name] = average[name].to(dtype)
    return average


def _provenance(ordered, weights, beta, beta2, sigma_rel, no_sort) -> str:
    if sigma_rel is None:
        settings = {"mode": "linear", "beta": beta, "beta2": beta if beta2 is None else beta2}
    else:
        settings = {"mode": "sigma_rel", "sigma_rel": sigma_rel, "gamma": float(f"{solve_gamma(sigma_rel):.6g}")}
    settings["order"] = "as given" if no_sort else "modification time"
    settings["files"] = [[os.path.basename(path), float(f"{weight:.6g}")] for path, weight in zip(ordered, weights)]
    return json.dumps(settings, separators=(",", ":"), ensure_ascii=False)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="LoRA checkpoints of one training run (.safetensors).")
    parser.add_argument("--output_file", required=True, help="Where to write the merged LoRA (overwritten if present).")
    parser.add_argument("--beta", type=float, default=0.95, help="Decay per merge (default 0.95).")
    parser.add_argument("--beta2", type=float, default=None,
                        help="Decay of the last merge; the decay moves linearly from --beta to it (default: --beta).")
    parser.add_argument("--sigma_rel", type=float, default=None,
                        help="Power-function EMA width (EDM2), in (0, 0.3003]; overrides --beta/--beta2.")
    parser.add_argument("--no_sort", action="store_true",
                        help="Merge in the order given instead of by modification time (oldest first).")


def run_cli(args: argparse.Namespace) -> int:
    result = post_hoc_ema_merge(args.paths, args.output_file, beta=args.beta, beta2=args.beta2,
                                sigma_rel=args.sigma_rel, no_sort=args.no_sort, overwrite=True)
    print("Merge order (oldest first) and each file's weight in the result:")
    for path, weight in zip(result.files, result.weights):
        print(f"  {weight:10.6f}  {path}")
    print(f"Saved {result.output_file}")
    return 0
