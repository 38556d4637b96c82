"""Which FramePack checkpoint a path is, judged from safetensors headers before any weight is read,
and the transformer loaded from it (:func:`load_transformer`).

The layouts in circulation all use diffusers' unprefixed ``HunyuanVideoFramepackTransformer3DModel``
names:

* ``folder``: lllyasviel's FramePackI2V_HY / FramePack_F1_I2V_HY — ``config.json``,
  ``diffusion_pytorch_model-0000N-of-0000M.safetensors`` shards and their
  ``diffusion_pytorch_model.safetensors.index.json`` (a diffusers pipeline folder with a
  ``transformer/`` sub-folder works too);
* ``file``: single-file bf16/fp16/fp32 conversions (config from the file's ``config`` metadata
  when present, otherwise recovered from the tensor shapes; see :mod:`.checkpoint`);
* ``file`` already in the block-scaled fp8 layout of this package / musubi-tuner
  (``.scale_weight`` tensors): loaded as it is.

Files that look like FramePack but cannot be used are refused with what to load instead: plain fp8
casts without scales (their precision is gone, and they cast the embedders too) and ComfyUI- or
Tencent-format HunyuanVideo checkpoints (text-to-video, not FramePack).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import files
from ..errors import MusubiError
from ..architectures import SCALE_SUFFIX, WEIGHT_SUFFIX, strip_model_prefix
from ..fp8 import is_comfyui_quantized
from .checkpoint import CLASS_NAME, CONFIG_FILE, config_from_shapes

INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
# Keys only a FramePack transformer has (history embedder, SigLIP projection).
FRAMEPACK_MARKERS = ("clean_x_embedder.proj.weight", "image_projection.up.weight")
# Keys of HunyuanVideo checkpoints in Tencent's / ComfyUI's naming.
HUNYUAN_VIDEO_MARKERS = ("double_blocks.0.img_attn_qkv.weight", "double_blocks.0.img_attn.qkv.weight", "img_in.proj.weight")


@dataclass
class FramePackSource:
    """A checkpoint recognised as FramePack: its files, its config and whether it is fp8 already."""

    path: str
    layout: str  # "folder" | "file"
    files: tuple[str, ...]
    config: dict[str, Any]
    prequantized: bool = False
    header: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        kind = "diffusers folder" if self.layout == "folder" else "single file"
        extra = ", block-scaled fp8" if self.prequantized else ""
        config = self.config
        return (f"{os.path.basename(self.path.rstrip(os.sep))}: {kind} ({len(self.files)} file(s){extra}), "
                f"{config.get('num_layers')} double + {config.get('num_single_layers')} single blocks, "
                f"{config.get('num_attention_heads')} heads x {config.get('attention_head_dim')}, "
                f"rope {tuple(config.get('rope_axes_dim', ()))}")


def looks_like_framepack(keys) -> bool:
    """Whether tensor names are those of a FramePack transformer (for other loaders' errors)."""
    keys = set(keys)
    return all(marker in keys for marker in FRAMEPACK_MARKERS)


def is_framepack_folder(path: str) -> bool:
    """A folder holding a FramePack transformer (its own config.json naming the class, or a
    ``transformer/`` sub-folder with one)."""
    folder = _transformer_folder(path)
    if folder is None:
        return False
    try:
        with open(os.path.join(folder, CONFIG_FILE), encoding="utf-8") as stream:
            return json.load(stream).get("_class_name") == CLASS_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _transformer_folder(path: str) -> str | None:
    for folder in (os.path.join(path, "transformer"), path):
        if os.path.isfile(os.path.join(folder, CONFIG_FILE)):
            return folder
    return None


def inspect_source(path: str, node: str = "Load FramePack DiT") -> FramePackSource:
    """Recognise a FramePack folder or file from headers only; MusubiError for anything else."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _inspect_folder(path, node)
    if not os.path.isfile(path):
        raise MusubiError(f"{node}: {path} does not exist; pick a FramePack folder or .safetensors file in models/diffusion_models.")
    header, metadata = files.read_header(path)
    return _inspect_file(path, header, metadata, node)


def _inspect_folder(path: str, node: str) -> FramePackSource:
    folder = _transformer_folder(path)
    if folder is None:
        raise MusubiError(
            f"{node}: the folder {path} has no {CONFIG_FILE}; a FramePack folder is the diffusers layout of "
            "lllyasviel/FramePackI2V_HY (config.json + diffusion_pytorch_model-0000N-of-0000M.safetensors)."
        )
    try:
        with open(os.path.join(folder, CONFIG_FILE), encoding="utf-8") as stream:
            config = json.load(stream)
    except (OSError, ValueError) as error:
        raise MusubiError(f"{node}: {os.path.join(folder, CONFIG_FILE)} cannot be read as JSON ({error}).") from None
    if not isinstance(config, dict) or config.get("_class_name") != CLASS_NAME:
        found = config.get("_class_name") if isinstance(config, dict) else None
        raise MusubiError(
            f"{node}: {folder} holds a {found or 'model without _class_name'}, not a FramePack transformer "
            f"({CLASS_NAME}); download lllyasviel/FramePackI2V_HY or FramePack_F1_I2V_HY."
        )
    shards = _shard_files(folder, node)
    header: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in shards:
        header.update(files.read_header(file)[0])
    _check_tensors(folder, header, node)
    _check_config_matches(folder, config, header, node)
    return FramePackSource(folder, "folder", tuple(shards), config, _is_prequantized(header), header)


def _shard_files(folder: str, node: str) -> list[str]:
    """The weight files of a folder: those its index names, else every .safetensors file."""
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
        names = _indexed_files(index_path, node)
        missing = [name for name in names if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise MusubiError(
                f"{node}: {folder} lacks {', '.join(missing)} named by its index; the download is incomplete."
            )
        return [os.path.join(folder, name) for name in names]
    names = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    if not names:
        raise MusubiError(f"{node}: {folder} has a {CONFIG_FILE} but no .safetensors weights.")
    return [os.path.join(folder, name) for name in names]


def _indexed_files(index_path: str, node: str) -> list[str]:
    """The weight files a diffusers index names, after checking its shape: a JSON object whose
    ``weight_map`` maps tensor names to file names inside the folder. A hand-edited or damaged
    index is named instead of failing as a Python error."""
    def refuse(problem: str) -> MusubiError:
        return MusubiError(f"{node}: {index_path} is not a usable diffusers weight index: {problem}. "
                           "Download the index again (or delete it: every .safetensors file in the folder is then read).")

    try:
        with open(index_path, encoding="utf-8") as stream:
            index = json.load(stream)
    except (OSError, ValueError) as error:
        raise refuse(f"it cannot be read as JSON ({error})") from None
    if not isinstance(index, dict) or "weight_map" not in index:
        raise refuse("it has no 'weight_map'")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
        raise refuse(f"'weight_map' is a {type(weight_map).__name__}, not an object of tensor name → file name")
    if not weight_map:
        raise refuse("'weight_map' is empty")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise refuse(f"'weight_map' gives {key!r} the value {name!r}, not a file name")
        if os.path.isabs(name) or os.path.normpath(name) != os.path.basename(name) or name in (".", ".."):
            raise refuse(f"'weight_map' gives {key!r} the file {name!r}, which is not a plain file name in the folder")
        if not name.endswith(".safetensors"):
            raise refuse(f"'weight_map' gives {key!r} the file {name!r}, which is not a .safetensors file")
    return sorted(set(weight_map.values()))


def _inspect_file(path: str, header: dict, metadata: dict, node: str) -> FramePackSource:
    names = {strip_model_prefix(key) for key in header}
    if any(marker in names for marker in HUNYUAN_VIDEO_MARKERS):
        raise MusubiError(
            f"{node}: {os.path.basename(path)} is a HunyuanVideo checkpoint (Tencent / ComfyUI naming), not FramePack. "
            "Load it with the core Load Diffusion Model node; for FramePack download lllyasviel/FramePackI2V_HY "
            "or a single-file FramePack conversion."
        )
    if is_comfyui_quantized(header.keys()):
        raise MusubiError(
            f"{node}: {os.path.basename(path)} is in ComfyUI's own fp8 format; load the bf16 FramePack file and "
            "turn on fp8_scaled instead."
        )
    if any(key.startswith(("model.diffusion_model.", "diffusion_model.")) for key in header):
        raise MusubiError(
            f"{node}: {os.path.basename(path)} stores its weights under a 'diffusion_model.' prefix; FramePack "
            "files use diffusers' unprefixed names. Use the original bf16 FramePack file."
        )
    _check_tensors(path, header, node)
    config = None
    if metadata.get("config"):
        try:
            config = json.loads(metadata["config"])
        except ValueError as error:
            raise MusubiError(f"{node}: {path}: the 'config' metadata is not valid JSON ({error}).") from None
    if config is None:
        shapes = {key: torch.empty(shape, device="meta") for key, (_, shape) in header.items()
                  if not key.endswith(SCALE_SUFFIX)}
        try:
            config = config_from_shapes(shapes, os.path.basename(path))
        except MusubiError as error:
            raise MusubiError(f"{node}: {error}") from None
    _check_config_matches(path, config, header, node)
    return FramePackSource(path, "file", (path,), config, _is_prequantized(header), header)


def _check_tensors(where: str, header: dict, node: str) -> None:
    name = os.path.basename(where.rstrip(os.sep))
    missing = [marker for marker in FRAMEPACK_MARKERS if marker not in header]
    if missing:
        if "x_embedder.proj.weight" in header:
            raise MusubiError(
                f"{node}: {name} is a diffusers HunyuanVideo transformer without FramePack's history embedder "
                f"and image projection ({', '.join(missing)} missing), not FramePack."
            )
        raise MusubiError(
            f"{node}: {name} is not a FramePack transformer (no {', '.join(missing)}). Load lllyasviel's "
            "FramePackI2V_HY / FramePack_F1_I2V_HY folder or a single-file bf16 conversion of it."
        )
    unscaled = [key for key, (dtype, _) in header.items()
                if dtype.startswith("F8") and not (key.endswith(WEIGHT_SUFFIX) and key[: -len(WEIGHT_SUFFIX)] + SCALE_SUFFIX in header)]
    if unscaled:
        raise MusubiError(
            f"{node}: {name} is a plain fp8 cast without scales ({len(unscaled)} tensors such as {unscaled[0]}), like "
            "the 'FramePack fp8' single files: its precision is already lost and its embedders and output layer are "
            "fp8 too. Load the bf16 file and turn on fp8_scaled for the same memory at far better precision."
        )


def _check_config_matches(where: str, config: dict, header: dict, node: str) -> None:
    name = os.path.basename(where.rstrip(os.sep))
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    rope = config.get("rope_axes_dim") or ()
    patch = header.get("x_embedder.proj.weight")
    if patch is None or not isinstance(heads, int) or not isinstance(head_dim, int):
        raise MusubiError(f"{node}: {name}: its config lacks num_attention_heads / attention_head_dim.")
    if patch[1][0] != heads * head_dim:
        raise MusubiError(
            f"{node}: {name}: the config says {heads} heads x {head_dim} but the weights are {patch[1][0]} wide; "
            "the config belongs to another model."
        )
    if sum(rope) != head_dim:
        raise MusubiError(f"{node}: {name}: rope_axes_dim {tuple(rope)} must add up to the head width {head_dim}.")


def _is_prequantized(header: dict) -> bool:
    return any(key.endswith(SCALE_SUFFIX) for key in header)


def read_state_dict(source: FramePackSource) -> dict[str, torch.Tensor]:
    """Every tensor of the source, read one at a time (never two copies of a shard)."""
    state_dict: dict[str, torch.Tensor] = {}
    for file in source.files:
        for key, tensor in files.iter_tensors(file):
            state_dict[key] = tensor
    return state_dict


def transformer_options(config: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of diffusers' FramePack class from a stored config."""
    options = {key: value for key, value in config.items() if not key.startswith("_")}
    if "rope_axes_dim" in options:
        options["rope_axes_dim"] = tuple(options["rope_axes_dim"])
    return options


def build_empty_transformer(config: dict[str, Any], source: str = "the checkpoint"):
    """diffusers' FramePack transformer with every tensor on the meta device (no memory, no init)."""
    try:
        from diffusers import HunyuanVideoFramepackTransformer3DModel  # heavy import, only for FramePack
    except ImportError as error:
        raise MusubiError(
            f"FramePack needs diffusers ≥ 0.34 (HunyuanVideoFramepackTransformer3DModel): {error}. "
            "Install the pack's requirements."
        ) from None
    try:
        with torch.device("meta"):
            return HunyuanVideoFramepackTransformer3DModel(**transformer_options(config))
    except TypeError as error:
        raise MusubiError(f"{source}: its config does not fit diffusers' FramePack transformer ({error}).") from None


def load_transformer(path: str, dtype: torch.dtype | None = None, node: str = "FramePack model"):
    """The frozen FramePack transformer of a folder or single file, on the CPU, in ``dtype``
    (default: the file's own). Files that are no usable FramePack weights (see :func:`inspect_source`)
    and files already quantized to fp8 are refused with what to load instead."""
    source = inspect_source(os.fspath(path), node)
    if source.prequantized:
        raise MusubiError(
            f"{node}: {os.path.basename(source.path)} is already quantized to fp8; training from the command line "
            "needs the bf16 (or fp16/fp32) FramePack checkpoint."
        )
    state_dict = read_state_dict(source)
    if dtype is not None:
        state_dict = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor for key, tensor in state_dict.items()}
    model = build_empty_transformer(source.config, source.path)
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {len(result.missing_keys)} (e.g. {', '.join(result.missing_keys[:3])})")
        if result.unexpected_keys:
            parts.append(f"unexpected {len(result.unexpected_keys)} (e.g. {', '.join(result.unexpected_keys[:3])})")
        raise MusubiError(f"{node}: {source.path}: the weights do not fit a FramePack transformer of its config: {'; '.join(parts)}.")
    return model.requires_grad_(False).eval()
