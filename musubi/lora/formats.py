"""LoRA files: the ComfyUI and musubi-tuner key layouts, metadata, and reading any of them back.

Three layouts name the same tensors of the LoRA on module ``blocks.0.self_attn.q``:

* ``"comfyui"`` (what :func:`save_lora` writes by default):
  ``diffusion_model.blocks.0.self_attn.q.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``,
  on the module paths of the tree the LoRA was trained on. ComfyUI's core LoRA loader maps
  ``diffusion_model.<path>`` for every weight of every model, so each key is applied.
* ``"musubi"`` (kohya): ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` …, on musubi-tuner's
  module names (HunyuanVideo's official names, see :mod:`.presets`), so musubi-tuner and
  tools made for its files read it.
* diffusers / PEFT (read only): ``transformer.<path>.lora_A.weight`` (down) / ``.lora_B.weight``
  (up), also with a ``diffusion_model.`` prefix; alpha usually absent, meaning ``α = r``.

LoHa and LoKr modules keep their own tensor names in every layout (``hada_w1_a``, ``hada_w1_b``,
``hada_w2_a``, ``hada_w2_b``; ``lokr_w1``, ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``; read also
``lokr_w1_a``/``lokr_w1_b`` and the Tucker ``hada_t1``/``hada_t2``/``lokr_t2``), behind the same
``diffusion_model.<path>`` or ``lora_unet_<name>`` module key, which is what ComfyUI's loaders apply.

Inside the library a LoRA is held in one *canonical* form: ``<path>.lora_down.weight``,
``<path>.lora_up.weight`` and ``<path>.alpha`` with ``path`` the module path on the trained tree
(``<path>.hada_w1_a`` … / ``<path>.lokr_w1`` … for LoHa / LoKr).
Because the kohya layout replaced dots by underscores, its names are resolved back through the
table of the model's module names, never by guessing which underscores were dots; a name that
fits several modules is an error.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file

from .. import files
from ..errors import MusubiError
from .presets import GENERIC, LoraPreset, get_preset

FORMATS = ("comfyui", "musubi")
KOHYA_PREFIX = "lora_unet_"
COMFYUI_PREFIX = "diffusion_model."
# Prefixes in front of the module path in ComfyUI-, diffusers- and PEFT-style files.
PATH_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")

# Canonical tensor suffixes of one module.
LORA_DOWN, LORA_UP, LORA_ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
LOHA_SUFFIXES = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2")
LOKR_SUFFIXES = (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")
CANONICAL_SUFFIXES = (LORA_DOWN, LORA_UP, LORA_ALPHA) + LOHA_SUFFIXES + LOKR_SUFFIXES
# File tensor suffix -> canonical suffix.
_SUFFIXES = {
    ".lora_down.weight": LORA_DOWN,
    ".lora_up.weight": LORA_UP,
    ".lora_A.weight": LORA_DOWN,
    ".lora_B.weight": LORA_UP,
    ".alpha": LORA_ALPHA,
    **{suffix: suffix for suffix in LOHA_SUFFIXES + LOKR_SUFFIXES},
}
_OTHER_NETWORK_MARKS = (".oft_", ".boft_")
_SAVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_LISTED = 8


# --- canonical <-> file layouts ----------------------------------------------------------------


def from_canonical(
    state_dict: Mapping[str, torch.Tensor], file_format: str, arch: LoraPreset | str = GENERIC,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """File tensors of ``file_format`` ("comfyui" or "musubi"), cast to ``dtype`` (alpha included)."""
    preset = get_preset(arch)
    if file_format not in FORMATS:
        raise MusubiError(f"LoRA file format {file_format!r} is unknown; choose one of: {', '.join(FORMATS)}.")
    if dtype is not None and dtype not in _SAVE_DTYPES:
        raise MusubiError(f"cannot save a LoRA as {dtype}; choose float32, float16 or bfloat16.")
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        suffix = next((s for s in CANONICAL_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise MusubiError(f"'{key}' is not a canonical LoRA key (<path>.lora_down.weight / .lora_up.weight / .alpha).")
        path = key[: -len(suffix)]
        if file_format == "comfyui":
            name = COMFYUI_PREFIX + path
        else:
            name = _kohya_name(preset.musubi_name(path))
        value = tensor.detach().to("cpu")
        if dtype is not None:
            value = value.to(dtype)
        tensors[name + suffix] = value.contiguous()
    return tensors


def to_canonical(
    state_dict: Mapping[str, torch.Tensor],
    module_names: Iterable[str] | None = None,
    arch: LoraPreset | str = GENERIC,
) -> tuple[dict[str, torch.Tensor], str]:
    """Canonical state dict and the detected layout ("comfyui", "musubi", "diffusers", "canonical").

    ``module_names`` (the model's module paths) resolves musubi-tuner names; without it those
    keys stay as they are. Keys that resolve to no known module, or are no LoRA tensor, are kept
    unchanged so that the loader can name them. A missing alpha becomes an explicit ``α = r``.
    """
    lora = group_lora_modules(state_dict, module_names, arch)
    canonical: dict[str, torch.Tensor] = {}
    for path, roles in lora.modules.items():
        for role, (_, tensor) in roles.items():
            canonical[path + role] = tensor
        rank = implied_rank({role: tensor for role, (_, tensor) in roles.items()})
        if LORA_ALPHA not in roles and rank is not None:
            canonical[path + LORA_ALPHA] = torch.tensor(float(rank))
    canonical.update(lora.unresolved)
    return canonical, lora.file_format


def module_network_type(suffixes: Iterable[str]) -> str | None:
    """"lora", "loha" or "lokr" from one module's canonical tensor suffixes (None for an alpha alone);
    a MusubiError when one module mixes the types."""
    kinds = set()
    for suffix in suffixes:
        if suffix in (LORA_DOWN, LORA_UP):
            kinds.add("lora")
        elif suffix in LOHA_SUFFIXES:
            kinds.add("loha")
        elif suffix in LOKR_SUFFIXES:
            kinds.add("lokr")
    if len(kinds) > 1:
        raise MusubiError(f"one module of the file mixes {' and '.join(sorted(kinds))} tensors ({', '.join(sorted(suffixes))}).")
    return kinds.pop() if kinds else None


def implied_rank(tensors: Mapping[str, torch.Tensor]) -> int | None:
    """The rank that ``α / rank`` divides by for one module's canonical tensors (ComfyUI's rule:
    lora_down's rows, hada_w1_b's, lokr_w2_b's, else lokr_w1_b's); None when nothing is low-rank
    (a LoKr of two full matrices is applied with scale 1)."""
    for suffix in (LORA_DOWN, ".hada_w1_b", ".lokr_w2_b", ".lokr_w1_b"):
        tensor = tensors.get(suffix)
        if tensor is not None and tensor.dim() >= 1:
            return int(tensor.shape[0])
    return None


def file_network_type(keys: Iterable[str]) -> str:
    """The network type of a file's tensor names: "lora", "loha", "lokr", or "mixed"."""
    kinds = set()
    for key in keys:
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            kind = module_network_type([_SUFFIXES[suffix]])
            if kind:
                kinds.add(kind)
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "none")


class LoraModules(NamedTuple):
    """A LoRA's tensors grouped by the model module they belong to, each with its key in the file."""

    modules: dict[str, dict[str, tuple[str, torch.Tensor]]]  # module path -> canonical suffix -> (file key, tensor)
    unresolved: dict[str, torch.Tensor]  # file keys of modules not found and of tensors that are no LoRA weight
    file_format: str  # "comfyui", "musubi", "diffusers", "canonical" or "mixed"


def group_lora_modules(
    state_dict: Mapping[str, torch.Tensor],
    module_names: Iterable[str] | None = None,
    arch: LoraPreset | str = GENERIC,
) -> LoraModules:
    """The parsing behind :func:`to_canonical`, keeping file keys so that callers can report them."""
    preset = get_preset(arch)
    names = None if module_names is None else list(module_names)
    known = None if names is None else set(names)
    kohya_table = None if names is None else _kohya_table(names, preset)

    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    leftovers: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        file_suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if file_suffix is None:
            leftovers[key] = tensor
            continue
        role = _SUFFIXES[file_suffix]
        roles = groups.setdefault(key[: -len(file_suffix)], {})
        if role in roles:
            raise MusubiError(f"the LoRA holds both '{roles[role][0]}' and '{key}' for the same weight; keep one.")
        roles[role] = (key, tensor)

    if not groups:
        _raise_not_a_lora(state_dict)

    modules: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unresolved: dict[str, torch.Tensor] = {}
    formats: set[str] = set()
    origin: dict[str, str] = {}
    for module_key, roles in groups.items():
        file_format, path = _resolve(module_key, roles, known, kohya_table, preset)
        formats.add(file_format)
        if path is None:
            unresolved.update({key: tensor for key, tensor in roles.values()})
            continue
        if path in origin:
            raise MusubiError(f"the LoRA holds module '{path}' twice (as '{origin[path]}' and '{module_key}'); keep one.")
        origin[path] = module_key
        modules[path] = roles
    unresolved.update(leftovers)
    return LoraModules(modules, unresolved, formats.pop() if len(formats) == 1 else "mixed")


def _kohya_table(module_names: Iterable[str], preset: LoraPreset) -> dict[str, set[str]]:
    """kohya name -> module paths; more than one path when turning dots into underscores made names collide.

    Both musubi-tuner's name and the tree's own name of each module are listed: ComfyUI maps
    ``lora_unet_`` names built from its own (tree) names too, and they differ for HunyuanVideo.
    """
    table: dict[str, set[str]] = {}
    for path in module_names:
        for name in (preset.musubi_name(path), path):
            table.setdefault(_kohya_name(name), set()).add(path)
    return table


def _kohya_name(dotted_name: str) -> str:
    return KOHYA_PREFIX + dotted_name.replace(".", "_")


def _resolve(module_key, roles, known, kohya_table, preset) -> tuple[str, str | None]:
    """(layout, module path on the tree or None when it cannot be resolved) of one file module."""
    if module_key.startswith(KOHYA_PREFIX):
        paths = set() if kohya_table is None else kohya_table.get(module_key, set())
        if len(paths) > 1:
            raise MusubiError(
                f"the kohya name {module_key} fits several layers ({', '.join(sorted(paths))}) because dots "
                "became underscores; convert the LoRA to the ComfyUI or diffusers layout (dotted names)."
            )
        return "musubi", next(iter(paths), None)
    prefix = next((p for p in PATH_PREFIXES if module_key.startswith(p)), "")
    rest = module_key[len(prefix):]
    peft = any(key.endswith((".lora_A.weight", ".lora_B.weight")) for key, _ in roles.values())
    file_format = "diffusers" if peft else ("comfyui" if prefix else "canonical")
    if known is None:
        return file_format, preset.tree_name(rest)
    for path in (rest, preset.tree_name(rest), module_key):
        if path in known:
            return file_format, path
    return file_format, None


def check_is_lora(keys: Iterable[str]) -> None:
    """MusubiError saying what the tensors are instead when none is a LoRA weight (so a file can be
    checked from its header alone)."""
    keys = list(keys)
    weight_suffixes = tuple(suffix for suffix, role in _SUFFIXES.items() if role != LORA_ALPHA)
    if not any(key.endswith(weight_suffixes) for key in keys):
        _raise_not_a_lora(keys)


def _raise_not_a_lora(keys: Iterable[str]) -> None:
    keys = list(keys)
    if any(mark in key for key in keys for mark in _OTHER_NETWORK_MARKS):
        raise MusubiError("this is an OFT/BOFT network, not a LoRA; LoRA (lora_down/lora_up, lora_A/lora_B), "
                          "LoHa (hada_w*) and LoKr (lokr_w*) are supported.")
    sample = ", ".join(keys[:3]) or "no tensors at all"
    raise MusubiError(
        f"not a LoRA: no lora_down/lora_up, lora_A/lora_B, LoHa hada_w* or LoKr lokr_w* tensors (found {sample}); "
        "is this a model checkpoint rather than a LoRA?"
    )


# --- reading -----------------------------------------------------------------------------------


def load_lora_state_dict(
    path: str, module_names: Iterable[str] | None = None, arch: LoraPreset | str = GENERIC,
) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """``(canonical state dict, metadata, layout)`` of a LoRA file in any of the known layouts."""
    _, metadata = files.read_header(path)  # clear MusubiError for a missing or malformed file
    try:
        tensors = load_file(path, device="cpu")
    except Exception as error:  # safetensors raises several types for corrupt data
        raise MusubiError(f"{path}: cannot read the tensors ({error}).") from error
    try:
        canonical, file_format = to_canonical(tensors, module_names=module_names, arch=arch)
    except MusubiError as error:
        raise MusubiError(f"{path}: {error}") from error
    return canonical, metadata, file_format


# --- metadata ----------------------------------------------------------------------------------


def training_metadata(
    arch: LoraPreset | str,
    network_dim: int,
    network_alpha: float,
    network_args: Mapping[str, Any] | Sequence[str] | None = None,
    network_module: str | None = None,
    values: Mapping[str, Any] | None = None,
    title: str | None = None,
    resolution: str | int | Sequence[int] | None = None,
    timestamp: float | None = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    tags: str | None = None,
    timestep_range: tuple[int, int] | None = None,
) -> dict[str, str]:
    """The metadata musubi-tuner writes into a LoRA (hashes are added by :func:`save_lora`).

    ``values`` holds the training facts the caller knows (``learning_rate``, ``seed``, … with or
    without the ``ss_`` prefix); each becomes ``ss_<name>`` as a string (dicts/lists as JSON).
    ``network_module`` replaces the preset's LoRA module name (``networks.loha`` / ``networks.lokr``).
    """
    preset = get_preset(arch)
    metadata: dict[str, str] = {}
    for key, value in (values or {}).items():
        name = key if key.startswith("ss_") else "ss_" + key
        metadata[name] = _metadata_text(value)
    metadata["ss_base_model_version"] = preset.base_model_version
    metadata["ss_network_module"] = network_module or preset.network_module
    metadata["ss_network_dim"] = str(network_dim)
    metadata["ss_network_alpha"] = str(network_alpha)
    if network_args:
        metadata["ss_network_args"] = json.dumps(_raw_args(network_args))

    timestamp = time.time() if timestamp is None else timestamp
    if title is None:
        title = str(values["output_name"]) if values and values.get("output_name") else f"LoRA@{int(timestamp)}"
    metadata["modelspec.sai_model_spec"] = "1.0.0"
    metadata["modelspec.architecture"] = f"{preset.modelspec_architecture}/lora"
    metadata["modelspec.implementation"] = preset.implementation
    metadata["modelspec.title"] = title
    metadata["modelspec.resolution"] = _resolution_text(resolution, preset)
    metadata["modelspec.date"] = datetime.datetime.fromtimestamp(int(timestamp)).isoformat()
    optional = {"author": author, "description": description, "license": license, "tags": tags}
    for key, value in optional.items():
        if value is not None:
            metadata[f"modelspec.{key}"] = str(value)
    if timestep_range is not None:
        low, high = timestep_range
        metadata["modelspec.timestep_range"] = f"{low},{high}"
    return metadata


def _metadata_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _raw_args(network_args: Mapping[str, Any] | Sequence[str]) -> dict[str, str]:
    if isinstance(network_args, Mapping):
        return {str(key): str(value) for key, value in network_args.items()}
    raw = {}
    for item in [network_args] if isinstance(network_args, str) else network_args:
        key, _, text = item.partition("=")
        raw[key.strip()] = text.strip()
    return raw


def _resolution_text(resolution, preset: LoraPreset) -> str:
    if resolution is None:
        return preset.resolution
    if isinstance(resolution, str):
        text = resolution.replace(",", "x").replace(" ", "")
        sizes = [part for part in text.split("x") if part]
    elif isinstance(resolution, int):
        sizes = [resolution]
    else:
        sizes = list(resolution)
    try:
        sizes = [int(size) for size in sizes]
    except ValueError as error:
        raise MusubiError(f"metadata resolution {resolution!r}: expected WIDTHxHEIGHT such as 1280x720.") from error
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2:
        raise MusubiError(f"metadata resolution {resolution!r}: expected WIDTHxHEIGHT such as 1280x720.")
    return f"{sizes[0]}x{sizes[1]}"


# --- writing -----------------------------------------------------------------------------------


def save_lora(
    network,
    path: str,
    format: str = "comfyui",
    dtype: torch.dtype = torch.float32,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Write the network's LoRA atomically; returns the metadata written.

    The metadata starts from :func:`training_metadata` of the network (architecture, dim, alpha,
    network args), is overlaid with ``metadata``, and always gets fresh ``sshs_model_hash`` /
    ``sshs_legacy_hash`` values.
    """
    tensors = from_canonical(network.state_dict(), format, network.preset, dtype=dtype)
    base = training_metadata(
        network.preset, network.network_dim, network.network_alpha,
        network_args=network_args_of(network),
        network_module=getattr(network, "network_module", None),
        values={"network_dropout": network.dropout},
    )
    return _write(tensors, path, {**base, **dict(metadata or {})})


def network_args_of(network) -> dict[str, str] | None:
    """The network args a network records in ``ss_network_args`` (None when there are none)."""
    method = getattr(network, "metadata_network_args", None)
    args = method() if method is not None else getattr(network, "network_args", None)
    return args or None


def _write(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str]) -> dict[str, str]:
    final = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise MusubiError(f"metadata entry {key!r}: keys and values must be strings (got {type(value).__name__}).")
        final[key] = value
    final["sshs_model_hash"], final["sshs_legacy_hash"] = files.model_hashes(tensors, final)
    files.atomic_save_file(tensors, path, final)
    return final


def convert_lora_file(
    in_path: str,
    out_path: str,
    to_format: str,
    module_names: Iterable[str] | None = None,
    arch: LoraPreset | str = GENERIC,
    dtype: torch.dtype | None = None,
) -> dict[str, str]:
    """Rewrite a LoRA file in another layout, keeping its metadata (hashes refreshed).

    Reading musubi-tuner names needs ``module_names``, the module paths of the model the LoRA
    belongs to (e.g. ``LoRANetwork.module_names()``), to undo their dots-to-underscores.
    """
    names = None if module_names is None else set(module_names)
    canonical, metadata, _ = load_lora_state_dict(in_path, module_names=names, arch=arch)
    unresolved = [key for key in canonical if not _is_canonical_key(key, names)]
    if unresolved:
        hint = (
            "pass the model's module names to resolve musubi-tuner names"
            if names is None else "the LoRA does not belong to this model or architecture"
        )
        raise MusubiError(
            f"{in_path}: {len(unresolved)} keys could not be mapped to model layers "
            f"({', '.join(unresolved[:_MAX_LISTED])}); {hint}."
        )
    tensors = from_canonical(canonical, to_format, arch, dtype=dtype)
    metadata = {key: value for key, value in metadata.items() if not key.startswith("sshs_")}
    return _write(tensors, out_path, metadata)


def _is_canonical_key(key: str, names: set[str] | None) -> bool:
    suffix = next((s for s in CANONICAL_SUFFIXES if key.endswith(s)), None)
    if suffix is None or key.startswith(KOHYA_PREFIX):
        return False
    return names is None or key[: -len(suffix)] in names
