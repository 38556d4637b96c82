"""Block-scaled FP8 weights: quantize a DiT checkpoint to one byte per weight plus a scale per block.

A weight ``W`` (out x in) is cut into groups (each block of ``B`` input columns of a row, each
row, or the whole tensor); every group gets ``scale = max|W| / F`` (``F`` the largest finite
value of the fp8 format) and is stored as ``q = fp8(W / scale)``, so ``W ≈ q * scale``. Small
blocks keep one outlier from flattening the precision of a whole row.

File layout (the one musubi-tuner's ``--fp8_scaled`` loader patches its Linear layers for): the
weight key keeps the fp8 codes and ``<module>.scale_weight`` holds the scale, shaped ``[]``
(tensor), ``[out, 1]`` (channel) or ``[out, in/B, 1]`` (block); the scale's rank tells the
mode. Scales are computed in float32 from the float32 weight and stored in bfloat16, which has
float32's exponent range: musubi computes them in the weight dtype, where small fp16 rows get
subnormal or zero scales and then dequantize to zero. The codes are computed with the stored
bfloat16 scale itself, so storing it adds no error, and a block of 64 weights costs 66 bytes
(0.516x of bf16) instead of 68 with float32 scales. musubi's patched Linear multiplies in the
dtype of the stored scale, so its loader reads this layout.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from . import files
from .architectures import (
    SCALE_SUFFIX,
    WEIGHT_SUFFIX,
    WITH_GENERIC,
    resolve_architecture,
    strip_model_prefix,
)
from .errors import MusubiError
from .files import dtype_and_shape
from .lora.merge import LoraMerger, load_lora_file

FP8_FORMATS: dict[str, torch.dtype] = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
MODES = ("block", "channel", "tensor")
DEFAULT_FORMAT = "e4m3fn"
DEFAULT_MODE = "block"
DEFAULT_BLOCK_SIZE = 64

# Smallest normal float32: a scale never reaches zero (which would erase its group) and its
# reciprocal stays finite. Only groups whose largest value is below ~5e-36 ever reach the floor.
MIN_SCALE = torch.finfo(torch.float32).tiny
# The dtype scales are stored in: float32's range (never subnormal), half the bytes.
SCALE_DTYPE = torch.bfloat16

ARCHITECTURES = WITH_GENERIC

METADATA_PREFIX = "musubi.fp8."


class QuantizedWeight(NamedTuple):
    q: torch.Tensor  # float8 codes, same shape as the weight
    scale: torch.Tensor  # SCALE_DTYPE: [] tensor, [out, 1] channel, [out, in/B, 1] block
    mode: str  # the mode actually used (after any fallback)


# --- one weight --------------------------------------------------------------------------


def fp8_dtype(fp8_format: str) -> torch.dtype:
    """The torch dtype of a format name ("e4m3fn" or "e5m2")."""
    if fp8_format not in FP8_FORMATS:
        raise MusubiError(f"fp8_format={fp8_format!r} is not supported; choose one of: {', '.join(FP8_FORMATS)}.")
    return FP8_FORMATS[fp8_format]


def fp8_max(fp8_format: str) -> float:
    """Largest finite value of the format: 448 for e4m3fn, 57344 for e5m2."""
    return float(torch.finfo(fp8_dtype(fp8_format)).max)


def effective_mode(shape: Iterable[int], mode: str = DEFAULT_MODE, block_size: int = DEFAULT_BLOCK_SIZE) -> str:
    """The mode a weight of ``shape`` really gets: block needs a 2-D weight whose input size is a
    multiple of the block size (else channel), channel needs a 2-D weight (else tensor)."""
    _check_mode(mode, block_size)
    shape = tuple(shape)
    if len(shape) != 2 or math.prod(shape) == 0:
        return "tensor"
    if mode == "block" and shape[1] % block_size != 0:
        return "channel"
    return mode


def scale_shape(weight_shape: Iterable[int], mode: str = DEFAULT_MODE, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[int, ...]:
    """Shape of the stored scale of a weight: ``()``, ``(out, 1)`` or ``(out, in/B, 1)``, after fallbacks.

    Lets a loader create the scale buffers of its layers before reading the file.
    """
    weight_shape = tuple(weight_shape)
    used_mode = effective_mode(weight_shape, mode, block_size)
    if used_mode == "tensor":
        return ()
    if used_mode == "channel":
        return (weight_shape[0], 1)
    return (weight_shape[0], weight_shape[1] // block_size, 1)


def quantize_weight(
    weight: torch.Tensor,
    fp8_format: str = DEFAULT_FORMAT,
    mode: str = DEFAULT_MODE,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> QuantizedWeight:
    """Quantize one weight to fp8 codes and bfloat16 scales; ``weight`` is left untouched.

    Falls back from block to channel when the input size is not a multiple of ``block_size``
    and to tensor for non-2-D weights; the returned ``mode`` says which was used.
    """
    dtype = fp8_dtype(fp8_format)
    largest = fp8_max(fp8_format)
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        raise MusubiError(f"only floating-point weights can be quantized, got {getattr(weight, 'dtype', type(weight))}.")
    if weight.dtype.itemsize == 1:
        raise MusubiError(
            f"the weight is already {weight.dtype}; quantizing fp8 codes again loses precision. "
            "Start from the bf16/fp16/fp32 original."
        )
    used_mode = effective_mode(weight.shape, mode, block_size)
    weight = weight.detach()
    if weight.numel() == 0:
        return QuantizedWeight(torch.empty(weight.shape, dtype=dtype, device=weight.device),
                               torch.tensor(MIN_SCALE, dtype=SCALE_DTYPE, device=weight.device), "tensor")
    if used_mode == "tensor":
        groups = weight.reshape(-1, weight.shape[-1]) if weight.dim() >= 2 else weight.reshape(1, -1)
        absmax, finite = _absmax(weight.reshape(1, -1))
        scale = _scales(absmax, largest)
        codes = torch.empty(groups.shape, dtype=dtype, device=weight.device)
        divisor = scale.to(torch.float32)
        for rows in _row_chunks(groups):
            codes[rows] = _codes(groups[rows], divisor, largest, finite)
        return QuantizedWeight(codes.reshape(weight.shape), scale.reshape(()).contiguous(), used_mode)
    if used_mode == "block":
        out_features, in_features = weight.shape
        groups = weight.reshape(out_features, in_features // block_size, block_size)
    else:  # channel
        groups = weight
    # Chunk by chunk of rows, so the float32 temporaries stay in cache: the group maxima, the
    # scales and the codes of one chunk are done before the next is touched.
    codes = torch.empty(groups.shape, dtype=dtype, device=weight.device)
    scale = torch.empty(groups.shape[:-1] + (1,), dtype=SCALE_DTYPE, device=weight.device)
    for rows in _row_chunks(groups):
        part = groups[rows]
        absmax, finite = _absmax(part)
        scale[rows] = _scales(absmax, largest)
        codes[rows] = _codes(part, scale[rows].to(torch.float32), largest, finite)
    return QuantizedWeight(codes.reshape(weight.shape), scale.contiguous(), used_mode)


def _scales(absmax: torch.Tensor, largest: float) -> torch.Tensor:
    """The stored (bfloat16) scale of groups with these float32 maxima; never below MIN_SCALE."""
    return (absmax / largest).clamp_(min=MIN_SCALE).to(SCALE_DTYPE)


def _codes(values: torch.Tensor, divisor: torch.Tensor, largest: float, finite: bool) -> torch.Tensor:
    """The values in float32 divided by their stored scales, NaN to 0 and clamped to the format's range.

    With ``finite`` (no NaN or ±inf among the values) the quotients are finite, so the NaN pass is
    skipped: the result is the same.
    """
    quotients = values.to(torch.float32, copy=True).div_(divisor)
    if not finite:
        quotients.nan_to_num_(nan=0.0)
    return quotients.clamp_(-largest, largest)


# Rows are processed in pieces of about this many elements on the CPU: the 8 MiB float32 temporaries
# stay in the last-level cache (3x faster than whole-layer operations, and never a float32 copy of
# a big layer), while each operation still has enough work to amortise its dispatch across threads.
_CPU_CHUNK_ELEMENTS = 1 << 21


def _row_chunks(groups: torch.Tensor) -> list[slice]:
    rows = groups.shape[0]
    if groups.device.type != "cpu":
        return [slice(0, rows)]
    step = max(1, _CPU_CHUNK_ELEMENTS // max(1, groups[0].numel()))
    return [slice(start, start + step) for start in range(0, rows, step)]


# Bit patterns of each float dtype as signed integers of its width, and the mask that clears the sign.
_SAME_WIDTH_INTEGERS = {2: (torch.int16, 0x7FFF), 4: (torch.int32, 0x7FFF_FFFF), 8: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF)}


def _absmax(groups: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """float32 max|x| over the last dimension (kept), ignoring NaN and ±inf so one bad value
    cannot wipe its group, and whether every value was finite.

    With the sign bit cleared, IEEE floats order like their bit patterns read as integers, so
    the largest pattern is the largest magnitude: one integer pass over the stored dtype, with
    no float32 copy and no rounding (taking maxima is exact in any dtype).
    """
    integer, magnitude_bits = _SAME_WIDTH_INTEGERS[groups.dtype.itemsize]
    largest_bits = (groups.view(integer) & magnitude_bits).amax(dim=-1, keepdim=True)
    absmax = largest_bits.view(groups.dtype).to(torch.float32)
    if bool(torch.isfinite(absmax).all()):
        return absmax, True
    finite = torch.nan_to_num(groups.to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return finite.abs().amax(dim=-1, keepdim=True), False


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``q * scale`` computed in float32 and returned in ``dtype``; the mode comes from the scale's rank."""
    scale = scale.to(device=q.device, dtype=torch.float32)
    if scale.numel() == 1 and scale.dim() <= 1:
        groups = q.reshape(-1, q.shape[-1]) if q.dim() >= 2 else q.reshape(1, -1)
        scale = scale.reshape(1, 1)
    elif scale.dim() == 2 and q.dim() == 2 and tuple(scale.shape) == (q.shape[0], 1):
        groups = q
    elif (scale.dim() == 3 and q.dim() == 2 and scale.shape[0] == q.shape[0] and scale.shape[2] == 1
          and scale.shape[1] > 0 and q.shape[1] % scale.shape[1] == 0):
        groups = q.reshape(q.shape[0], scale.shape[1], q.shape[1] // scale.shape[1])
    else:
        raise MusubiError(
            f"scale of shape {list(scale.shape)} does not fit an fp8 weight of shape {list(q.shape)} "
            "(expected [], [out, 1] or [out, in/B, 1]); the file is damaged or not in this layout."
        )
    result = torch.empty(groups.shape, dtype=dtype, device=q.device)
    if q.numel():
        widen, scale = _widening(groups, scale)
        for rows in _row_chunks(groups):
            part_scale = scale if scale.shape[0] == 1 else scale[rows]
            if widen is None:
                result[rows] = groups[rows].to(torch.float32) * part_scale
            else:
                result[rows] = widen(groups[rows]).to(torch.float32) * part_scale
    return result.reshape(q.shape)


def _widening(groups: torch.Tensor, scale: torch.Tensor):
    """On the CPU, a fast exact way to widen the codes (None: torch's conversion) and the scale to use with it.

    torch converts fp8 element by element on the CPU (about 10x slower than the rest of
    dequantizing). Moving bits is exact and vectorised: E5M2 is float16's upper byte, and
    E4M3FN's exponent and mantissa placed in float16's low exponent bits read as the value
    times 2**-8, normal and subnormal codes alike, so the scale takes the 256. E4M3FN's two NaN
    codes would read as ±480, so a tensor holding one (no quantizer writes them) keeps the slow
    path, as does a scale too large to take the factor.
    """
    if groups.device.type != "cpu" or groups.dtype not in (torch.float8_e5m2, torch.float8_e4m3fn):
        return None, scale
    if groups.dtype == torch.float8_e5m2:
        return (lambda codes: codes.view(torch.int8).to(torch.int16).bitwise_left_shift_(8).view(torch.float16)), scale
    if int((groups.view(torch.uint8) & 0x7F).amax()) == 0x7F:
        return None, scale
    scaled = scale * 256.0
    if not bool(torch.isfinite(scaled).all()):
        return None, scale
    # int8 sign-extends: shifted left by 7, the sign lands on bits 15 and 14; bit 14 is cleared.
    return (lambda codes: codes.view(torch.int8).to(torch.int16).bitwise_left_shift_(7).bitwise_and_(-16385)
            .view(torch.float16)), scaled


def scale_key_for(weight_key: str) -> str:
    """``blocks.0.attn.q.weight`` -> ``blocks.0.attn.q.scale_weight`` (only the final suffix changes)."""
    if not weight_key.endswith(WEIGHT_SUFFIX):
        raise MusubiError(f"{weight_key!r} is not a '.weight' key, so it has no scale key.")
    return weight_key[: -len(WEIGHT_SUFFIX)] + SCALE_SUFFIX


def _check_mode(mode: str, block_size: int) -> None:
    if mode not in MODES:
        raise MusubiError(f"mode={mode!r} is not supported; choose one of: {', '.join(MODES)}.")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise MusubiError(f"block_size={block_size!r} must be a positive integer (64 is the usual choice).")


# --- which keys, per architecture --------------------------------------------------------


@dataclass(frozen=True)
class QuantizationRule:
    """Plain substring tests on the key (prefix removed), as musubi-tuner selects its fp8 layers."""

    targets: tuple[str, ...]  # the key must contain one of these
    excludes: tuple[str, ...]  # and none of these

    def selects(self, key: str) -> bool:
        return any(part in key for part in self.targets) and not any(part in key for part in self.excludes)


RULES: dict[str, QuantizationRule] = {
    "wan": QuantizationRule(
        ("blocks",),
        ("norm", "patch_embedding", "text_embedding", "time_embedding", "time_projection", "head", "modulation", "img_emb"),
    ),
    # HunyuanVideo: musubi has no rule; this keeps norms, modulation ("img_mod.linear" in the
    # official file, "img_mod.lin" in ComfyUI's names), embedders and the final layer.
    "hunyuan_video": QuantizationRule(("double_blocks.", "single_blocks."), ("norm", "_mod.", "modulation")),
    "framepack": QuantizationRule(("transformer_blocks", "single_transformer_blocks"), ("norm",)),
    "flux": QuantizationRule(("single_blocks", "double_blocks"), ("norm", "mod")),
    # Qwen-Image quantizes its modulation layers (img_mod.1 / txt_mod.1) on purpose, as musubi does.
    "qwen_image": QuantizationRule(("transformer_blocks",), ("norm", "time_text_embed")),
    "generic": QuantizationRule(
        ("blocks.", "layers."),
        ("norm", "emb", "modulation", "adaLN", "adaln", "_mod.", "_mod_", "head"),
    ),
}


def selects_key(key: str, architecture: str) -> bool:
    """Whether the architecture's rule picks this key, judged on the name alone."""
    if architecture not in RULES:
        raise MusubiError(f"architecture={architecture!r} is unknown; choose one of: {', '.join(ARCHITECTURES)}.")
    name = strip_model_prefix(key)
    return name.endswith(WEIGHT_SUFFIX) and RULES[architecture].selects(name)


def should_quantize(key: str, tensor, architecture: str) -> bool:
    """True for a non-empty floating 2-D ``.weight`` picked by the architecture's rule.

    ``tensor`` may be a tensor or ``(dtype_name, shape)`` from a safetensors header. Biases,
    norms and other 1-D or N-D tensors are never quantized, even when a rule would pick them.
    """
    dtype_name, shape = dtype_and_shape(tensor)
    return (
        _is_float_dtype_name(dtype_name)
        and len(shape) == 2
        and math.prod(shape) > 0
        and selects_key(key, architecture)
    )


# --- already-quantized inputs -------------------------------------------------------------


def _is_float_dtype_name(name: str) -> bool:
    return name in ("F64", "F32", "F16", "BF16") or name.startswith("F8")


def _is_fp8_dtype_name(name: str) -> bool:
    return name.startswith("F8")


def is_comfyui_quantized(keys: Iterable[str]) -> bool:
    """ComfyUI's own formats: a ``scaled_fp8`` marker with ``.scale_weight``/``.scale_input``
    tensors, or the newer ``.weight_scale`` + ``.comfy_quant`` layout."""
    for key in keys:
        name = strip_model_prefix(key)
        if name == "scaled_fp8" or name.endswith((".scaled_fp8", ".scale_input", ".comfy_quant", ".weight_scale")):
            return True
    return False


def is_scaled_fp8_state_dict(keys: Iterable[str]) -> bool:
    """True for the scaled fp8 layout written here (and by musubi-tuner): any ``.scale_weight``
    key, in a file that is not one of ComfyUI's own quantized formats."""
    keys = list(keys)
    return any(key.endswith(SCALE_SUFFIX) for key in keys) and not is_comfyui_quantized(keys)


def check_not_prequantized(state_dict_or_header: Mapping, path: str | None = None) -> None:
    """Raise MusubiError when the weights are fp8 in a form that cannot be used as a base model.

    Accepts a state dict or a safetensors header (``{name: (dtype, shape)}``). Plain fp8 casts
    (fp8 tensors without ``.scale_weight``) and ComfyUI's own quantized files are refused with
    what to load instead; files in the scaled layout written here pass (they load as they are).
    """
    where = path or "the state dict"
    keys = list(state_dict_or_header.keys())
    if is_comfyui_quantized(keys):
        raise MusubiError(
            f"{where}: this is ComfyUI's own fp8 format (scaled_fp8 / weight_scale tensors), not the "
            "block-scaled layout read here. Load it with the core Load Diffusion Model node, or use the "
            "bf16/fp16 original here."
        )
    key_set = set(keys)
    unscaled = [
        key for key in keys
        if _is_fp8_dtype_name(dtype_and_shape(state_dict_or_header[key])[0])
        and not (key.endswith(WEIGHT_SUFFIX) and scale_key_for(key) in key_set)
    ]
    if unscaled:
        examples = ", ".join(unscaled[:3])
        raise MusubiError(
            f"{where}: {len(unscaled)} tensors (e.g. {examples}) are plain fp8 casts without scales (like the "
            "'fp8' files that only cast bf16 to fp8); their precision is already lost, so they can be neither "
            "re-quantized nor merged with LoRAs. Load the bf16/fp16 original instead."
        )


# --- whole state dicts and files -----------------------------------------------------------


@dataclass
class QuantizationReport:
    architecture: str
    fp8_format: str
    mode: str
    block_size: int
    quantized: int = 0  # weights turned into fp8 + scale
    kept: int = 0  # tensors copied unchanged
    fallbacks: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)  # (key, shape, mode used)
    bytes_before: int = 0  # tensor data, input
    bytes_after: int = 0  # tensor data, output
    lora_report: object | None = None  # LoraMergeReport when LoRAs were merged first

    def summary(self, max_listed: int = 5) -> str:
        lines = [
            f"architecture: {self.architecture}",
            f"quantized {self.quantized} weights to {self.fp8_format} ({self.mode}"
            + (f", block size {self.block_size})" if self.mode == "block" else ")"),
            f"kept {self.kept} tensors unchanged",
        ]
        if self.fallbacks:
            lines.append(f"{len(self.fallbacks)} weights used another mode than {self.mode}:")
            lines += [f"  {key} {list(shape)} -> {mode}" for key, shape, mode in self.fallbacks[:max_listed]]
            if len(self.fallbacks) > max_listed:
                lines.append(f"  … and {len(self.fallbacks) - max_listed} more")
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 1.0
        lines.append(f"tensor bytes: {_format_bytes(self.bytes_before)} -> {_format_bytes(self.bytes_after)} ({ratio:.3f}x)")
        return "\n".join(lines)


def _format_bytes(count: int) -> str:
    if count < 1024**2:
        return f"{count} B"
    if count < 1024**3:
        return f"{count / 1024**2:.2f} MiB"
    return f"{count / 1024**3:.2f} GiB"


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _quantize_items(
    items: Iterable[tuple[str, torch.Tensor]], report: QuantizationReport, copy_kept: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the output tensors for each input tensor, counting into ``report``.

    ``copy_kept`` copies the tensors passed through unquantized, for inputs that are only borrowed.
    """
    for key, tensor in items:
        report.bytes_before += _tensor_bytes(tensor)
        if should_quantize(key, tensor, report.architecture):
            quantized = quantize_weight(tensor, report.fp8_format, report.mode, report.block_size)
            report.quantized += 1
            if quantized.mode != report.mode:
                report.fallbacks.append((key, tuple(tensor.shape), quantized.mode))
            report.bytes_after += _tensor_bytes(quantized.q) + _tensor_bytes(quantized.scale)
            yield key, quantized.q
            yield scale_key_for(key), quantized.scale
        else:
            report.kept += 1
            report.bytes_after += _tensor_bytes(tensor)
            yield key, tensor.clone() if copy_kept else tensor


def _prepare(keys_source: Mapping, path: str | None, architecture: str, fp8_format: str, mode: str,
             block_size: int) -> QuantizationReport:
    """Validate the options and the input; return an empty report carrying the settings."""
    fp8_dtype(fp8_format)
    _check_mode(mode, block_size)
    check_not_prequantized(keys_source, path)
    if is_scaled_fp8_state_dict(keys_source.keys()):
        raise MusubiError(
            f"{path or 'the state dict'}: already quantized (it has .scale_weight tensors); load it directly, "
            "or quantize the bf16/fp16 original to change the settings."
        )
    return QuantizationReport(resolve_architecture(architecture, keys_source.keys()), fp8_format, mode, block_size)


def quantize_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    architecture: str = "auto",
    fp8_format: str = DEFAULT_FORMAT,
    mode: str = DEFAULT_MODE,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict[str, torch.Tensor]:
    """A new state dict in the scaled fp8 layout; ``state_dict`` is not modified.

    Selected weights become fp8 codes under their own key plus ``<module>.scale_weight``
    (float32); every other tensor is passed through as the same object.
    """
    report = _prepare(state_dict, None, architecture, fp8_format, mode, block_size)
    return dict(_quantize_items(state_dict.items(), report))


def quantize_state_dict_with_report(
    state_dict: Mapping[str, torch.Tensor],
    architecture: str = "auto",
    fp8_format: str = DEFAULT_FORMAT,
    mode: str = DEFAULT_MODE,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[dict[str, torch.Tensor], QuantizationReport]:
    """``quantize_state_dict`` plus what was done (counts, fallbacks, bytes)."""
    report = _prepare(state_dict, None, architecture, fp8_format, mode, block_size)
    return dict(_quantize_items(state_dict.items(), report)), report


def dequantize_state_dict(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Undo the layout: every weight with a ``.scale_weight`` becomes ``dtype`` again, scales are dropped."""
    result = {}
    for key, tensor in state_dict.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        scale_key = scale_key_for(key) if key.endswith(WEIGHT_SUFFIX) else None
        result[key] = dequantize_weight(tensor, state_dict[scale_key], dtype) if scale_key in state_dict else tensor
    return result


def quantize_checkpoint(
    in_path: str,
    architecture: str = "auto",
    fp8_format: str = DEFAULT_FORMAT,
    mode: str = DEFAULT_MODE,
    block_size: int = DEFAULT_BLOCK_SIZE,
    loras: list[tuple[Mapping[str, torch.Tensor], float]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str], QuantizationReport]:
    """Quantize a safetensors checkpoint in memory, reading one tensor at a time.

    Memory peaks at about the output (1 byte per quantized weight) plus one input tensor; the
    bf16 model is never held whole, and the pages of the input are not kept (see
    :func:`files.iter_tensors`). ``loras`` (``[(lora_state_dict, strength), …]``) are merged
    into each weight before it is quantized. Returns the tensors, the metadata to store with them
    (the input's own plus the settings under ``musubi.fp8.*``) and what was done.
    """
    header, metadata, report, items = _quantized_items(in_path, architecture, fp8_format, mode, block_size, loras,
                                                       keeping=True)
    output = dict(items)
    return output, _output_metadata(metadata, report, report.quantized), report


def quantize_file(in_path: str, out_path: str, architecture: str = "auto", fp8_format: str = DEFAULT_FORMAT,
                  mode: str = DEFAULT_MODE, block_size: int = DEFAULT_BLOCK_SIZE,
                  loras: list[tuple[Mapping[str, torch.Tensor], float]] | None = None) -> QuantizationReport:
    """Quantize ``in_path`` into ``out_path`` (never over the input), streaming.

    The output's header is known before any tensor is read (the input's header, the scale shapes
    and the settings), so each tensor is read, merged, quantized and written in turn: memory stays
    near the largest single tensor, whatever the checkpoint's size. The file appears atomically.
    """
    if os.path.abspath(in_path) == os.path.abspath(out_path):
        raise MusubiError(
            f"--output_file {out_path} is the input file; write to a new file (the bf16 original is still "
            "needed to merge LoRAs or change the settings later)."
        )
    header, metadata, report, items = _quantized_items(in_path, architecture, fp8_format, mode, block_size, loras)
    entries = []
    code_dtype = files.SAFETENSORS_DTYPES[fp8_dtype(fp8_format)]
    for key, (dtype, shape) in header.items():
        if should_quantize(key, (dtype, shape), report.architecture):
            entries.append((key, code_dtype, shape))
            entries.append((scale_key_for(key), files.SAFETENSORS_DTYPES[SCALE_DTYPE], scale_shape(shape, mode, block_size)))
        else:
            entries.append((key, dtype, shape))
    announced = sum(1 for key, info in header.items() if should_quantize(key, info, report.architecture))
    files.stream_save_file(out_path, entries, items, _output_metadata(metadata, report, announced))
    return report


def _quantized_items(in_path, architecture, fp8_format, mode, block_size, loras, keeping=False):
    """The input's header and metadata, the report to fill, and the lazy stream of output tensors.

    The input is only borrowed (mapped, each tensor's pages given back once it is done): nothing
    is copied on the way in, and ``keeping`` copies the tensors that pass through unquantized.
    """
    header, metadata = files.read_header(in_path)
    report = _prepare(header, in_path, architecture, fp8_format, mode, block_size)
    items: Iterable[tuple[str, torch.Tensor]] = files.iter_tensors(in_path, borrowed=True)
    if loras:
        merger = LoraMerger(header, loras, report.architecture)
        report.lora_report = merger.report
        items = ((key, merger.merge(key, tensor)) for key, tensor in items)
    return header, metadata, report, _quantize_items(items, report, copy_kept=keeping)


def _output_metadata(metadata: Mapping[str, str], report: QuantizationReport, quantized: int) -> dict[str, str]:
    out_metadata = dict(metadata)
    out_metadata.update({
        METADATA_PREFIX + "format": report.fp8_format,
        METADATA_PREFIX + "mode": report.mode,
        METADATA_PREFIX + "block_size": str(report.block_size),
        METADATA_PREFIX + "architecture": report.architecture,
        METADATA_PREFIX + "scale_dtype": "bfloat16",
        METADATA_PREFIX + "quantized": str(quantized),
    })
    return out_metadata


# --- command line --------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_file", help="bf16/fp16/fp32 DiT checkpoint (.safetensors)")
    parser.add_argument("--output_file", required=True, help="where to write the fp8 checkpoint (.safetensors)")
    parser.add_argument("--fp8_format", choices=tuple(FP8_FORMATS), default=DEFAULT_FORMAT,
                        help="e4m3fn (default, more precision) or e5m2 (more range)")
    parser.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                        help="one scale per block of input columns (default), per output row, or per tensor")
    parser.add_argument("--block_size", type=int, default=DEFAULT_BLOCK_SIZE, help="input columns per block (default 64)")
    parser.add_argument("--arch", choices=("auto",) + ARCHITECTURES, default="auto",
                        help="which layers to quantize; auto detects it from the key names")
    parser.add_argument("--lora_weight", nargs="*", default=[], metavar="LORA",
                        help="LoRA files to merge into the weights before quantizing")
    parser.add_argument("--lora_multiplier", nargs="*", type=float, default=[], metavar="M",
                        help="strength of each LoRA (default 1.0 for each)")


def run_cli(args: argparse.Namespace) -> int:
    loras = []
    if args.lora_multiplier and len(args.lora_multiplier) != len(args.lora_weight):
        raise MusubiError(
            f"--lora_multiplier has {len(args.lora_multiplier)} values for {len(args.lora_weight)} --lora_weight files; "
            "give one per file or none (1.0 each)."
        )
    if args.lora_weight:

        multipliers = args.lora_multiplier or [1.0] * len(args.lora_weight)
        loras = [(load_lora_file(path)[0], multiplier) for path, multiplier in zip(args.lora_weight, multipliers)]
    report = quantize_file(
        args.input_file, args.output_file, architecture=args.arch, fp8_format=args.fp8_format,
        mode=args.mode, block_size=args.block_size, loras=loras,
    )
    if report.lora_report is not None:
        print(report.lora_report.summary())
    print(report.summary())
    print(f"wrote {args.output_file}")
    return 0
