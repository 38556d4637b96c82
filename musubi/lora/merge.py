"""Merge LoRAs into base weights: ``W' = W + m · (U·D) · (α / r)``, before quantizing to fp8.

LoHa and LoKr files merge the same way with their own ``ΔW`` (:mod:`.modules`) and ComfyUI's
scale rule: ``α / r`` with ``r`` the rank of hada_w1_b (LoHa) or of the low-rank W2 (else W1) of a
LoKr; a LoKr of two full matrices is applied with scale 1.

Merging must happen on the bf16/fp16 weights: adding a LoRA to fp8 codes ignores their scales
(musubi-tuner's ``--base_weights`` with ``--fp8_scaled`` does exactly that and gets a wrong model).
So LoRAs are merged first and the merged weights quantized afterwards; an fp8 base weight is
refused.

LoRAs are read in any layout :mod:`.formats` knows (ComfyUI, musubi-tuner / kohya,
diffusers / PEFT), resolved against the checkpoint's own module names, so an ambiguous kohya name
is an error rather than a guess. For HunyuanVideo, whose official checkpoint and ComfyUI name
some layers differently, the checkpoint's names are brought to the preset's tree naming, so a
LoRA in either naming merges into a checkpoint in either naming.

``α`` missing or 0 means ``α = r``. The products of all LoRAs on a weight are summed in float32
and added to the float32 weight, which is rounded back to the weight's dtype once. LoRA keys that
match no layer are reported, not silently dropped.

NaN/inf never enter a merged model silently: a LoRA file holding any is refused when read (naming
the file and the first bad tensor), a LoRA given as tensors when its used tensors hold any, and a
merged weight that comes out non-finite (a base weight already broken, or a sum beyond what the
weight's dtype can hold) is refused naming the weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .. import files
from . import formats as lora_formats
from ..errors import MusubiError
from ..architectures import WEIGHT_SUFFIX, resolve_architecture, strip_model_prefix
from ..files import dtype_and_shape
from .formats import LORA_ALPHA, LORA_DOWN, LORA_UP, implied_rank, module_network_type
from .modules import file_weight_change, file_weight_change_problem, network_type_title
from .presets import get_preset

MAX_LISTED_KEYS = 5


@dataclass
class LoraUsage:
    """What one LoRA contributed."""

    strength: float
    merged: list[str] = field(default_factory=list)  # model weight keys it changed
    unused_keys: list[str] = field(default_factory=list)  # its keys that matched no layer


@dataclass
class LoraMergeReport:
    loras: list[LoraUsage]

    @property
    def merged_weights(self) -> int:
        return len({key for usage in self.loras for key in usage.merged})

    def summary(self) -> str:
        lines = []
        for number, usage in enumerate(self.loras, start=1):
            line = f"LoRA {number} (strength {usage.strength:g}): merged into {len(usage.merged)} layers"
            if usage.unused_keys:
                listed = ", ".join(usage.unused_keys[:MAX_LISTED_KEYS])
                more = " …" if len(usage.unused_keys) > MAX_LISTED_KEYS else ""
                line += f"; {len(usage.unused_keys)} keys unused: {listed}{more}"
            lines.append(line)
        return "\n".join(lines)


@dataclass
class _Addition:
    up: torch.Tensor | None
    down: torch.Tensor | None
    factor: float  # strength * alpha / rank
    # LoHa / LoKr: the module's canonical tensors (up and down are None then)
    network_type: str = "lora"
    tensors: dict[str, torch.Tensor] | None = None


class LoraMerger:
    """Plans the merge from the model's key names and shapes, then merges one weight at a time.

    ``model`` maps keys to tensors or to ``(dtype, shape)`` from a safetensors header, so a
    checkpoint can be merged while it is streamed. Mismatched shapes and fp8 base weights are
    reported before any weight is touched.
    """

    def __init__(self, model: Mapping, loras: Sequence[tuple[Mapping[str, torch.Tensor], float]], architecture: str = "auto"):
        self.architecture = resolve_architecture(architecture, model.keys())
        self._preset = get_preset(self.architecture)
        self._weights = {key: dtype_and_shape(value) for key, value in model.items() if key.endswith(WEIGHT_SUFFIX)}
        self._key_by_path = self._module_paths()
        self._additions: dict[str, list[_Addition]] = {}
        self.report = LoraMergeReport([])
        for number, lora in enumerate(loras, start=1):
            if not (isinstance(lora, (tuple, list)) and len(lora) == 2):
                raise MusubiError(f"LoRA {number}: expected a (state_dict, strength) pair.")
            lora_state_dict, strength = lora
            self.report.loras.append(self._plan(number, lora_state_dict, strength))

    def merge(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with every planned LoRA product added, or ``weight`` itself when none targets it."""
        additions = self._additions.get(key)
        if not additions:
            return weight
        total = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for addition in additions:
            if addition.tensors is not None:
                change = file_weight_change(addition.network_type, addition.tensors, tuple(weight.shape), weight.device)
                total.add_(change, alpha=addition.factor)
                continue
            up = addition.up.to(device=weight.device, dtype=torch.float32)
            down = addition.down.to(device=weight.device, dtype=torch.float32)
            product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            total.add_(product.reshape(weight.shape), alpha=addition.factor)
        merged = (weight.to(torch.float32) + total).to(weight.dtype)
        if not torch.isfinite(merged).all():
            _refuse_non_finite_merge(key, weight, [usage.strength for usage in self.report.loras
                                                   if key in usage.merged])
        return merged

    # -- planning --

    def _module_paths(self) -> dict[str, str]:
        """Module path in the preset's tree naming -> weight key (HunyuanVideo's official names renamed)."""
        key_by_path: dict[str, str] = {}
        for key in self._weights:
            path = strip_model_prefix(key)[: -len(WEIGHT_SUFFIX)]
            key_by_path.setdefault(self._preset.tree_name(path), key)
        return key_by_path

    def _plan(self, number, lora_state_dict, strength) -> LoraUsage:
        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength):
            raise MusubiError(f"LoRA {number}: strength {strength!r} must be a finite number (1.0 = full strength).")
        try:
            lora = lora_formats.group_lora_modules(lora_state_dict, self._key_by_path, self._preset)
        except MusubiError as error:
            raise MusubiError(f"LoRA {number}: {error}") from error
        usage = LoraUsage(float(strength))
        unused = list(lora.unresolved)
        for path, roles in lora.modules.items():
            try:
                network_type = module_network_type(roles)
            except MusubiError as error:
                raise MusubiError(f"LoRA {number}: {path}: {error}") from error
            if network_type in ("loha", "lokr"):
                self._plan_weight_change(number, path, roles, network_type, strength)
                usage.merged.append(self._key_by_path[path])
                continue
            if LORA_UP not in roles or LORA_DOWN not in roles:
                unused += [file_key for file_key, _ in roles.values()]
                continue
            key = self._key_by_path[path]
            up, down = roles[LORA_UP][1], roles[LORA_DOWN][1]
            for file_key, tensor in roles.values():
                if not _is_finite(tensor):
                    raise MusubiError(f"LoRA {number}: {file_key} holds NaN/inf values; the LoRA is broken "
                                      "(its training diverged?). Use an earlier checkpoint of it, or retrain.")
            rank = self._check_shapes(number, path, key, up, down)
            alpha = _alpha_value(roles[LORA_ALPHA][1] if LORA_ALPHA in roles else None, rank)
            self._additions.setdefault(key, []).append(_Addition(up, down, float(strength) * alpha / rank))
            usage.merged.append(key)
        usage.unused_keys = sorted(unused)
        if not usage.merged:
            examples = ", ".join(sorted(lora_state_dict)[:3]) or "none"
            raise MusubiError(
                f"LoRA {number} matches no layer of this {self.architecture} model (its keys look like: {examples}); "
                "it was probably trained for another model. Pick the LoRA made for this checkpoint."
            )
        return usage

    def _plan_weight_change(self, number, path, roles, network_type: str, strength: float) -> None:
        """Plan one LoHa / LoKr module: checked for NaN/inf and against the weight's shape now."""
        key = self._key_by_path[path]
        tensors = {role: tensor for role, (_, tensor) in roles.items()}
        for file_key, tensor in roles.values():
            if not _is_finite(tensor):
                raise MusubiError(f"LoRA {number}: {file_key} holds NaN/inf values; the LoRA is broken "
                                  "(its training diverged?). Use an earlier checkpoint of it, or retrain.")
        self._refuse_fp8(number, key)
        _, shape = self._weights[key]
        problem = file_weight_change_problem(network_type, tensors, tuple(shape))
        if problem:
            raise MusubiError(
                f"LoRA {number}: the {network_type_title(network_type)} module {path} cannot be merged into {key} "
                f"{list(shape)}: {problem}; the file was trained for a different model size or architecture."
            )
        rank = implied_rank(tensors)
        alpha = roles[LORA_ALPHA][1] if LORA_ALPHA in roles else None
        scale = 1.0 if rank is None else _alpha_value(alpha, rank) / rank
        self._additions.setdefault(key, []).append(
            _Addition(None, None, float(strength) * scale, network_type=network_type,
                      tensors={role: tensor for role, tensor in tensors.items() if role != LORA_ALPHA}))

    def _refuse_fp8(self, number, key) -> None:
        dtype_name, _ = self._weights[key]
        if dtype_name.startswith("F8"):
            raise MusubiError(
                f"LoRA {number}: the base weight {key} is stored as fp8; a LoRA added to fp8 codes is lost or "
                "scaled wrongly. Merge into the bf16/fp16 original, then quantize the result "
                "(python -m musubi quantize … --lora_weight …)."
            )

    def _check_shapes(self, number, module, key, up: torch.Tensor, down: torch.Tensor) -> int:
        dtype_name, shape = self._weights[key]
        self._refuse_fp8(number, key)
        rank = down.shape[0] if down.dim() >= 1 else 0
        fits = (
            rank > 0 and up.dim() >= 2 and len(shape) >= 2
            and up.shape[0] == shape[0] and up.shape[1] == rank and all(size == 1 for size in up.shape[2:])
            and down.numel() // rank == math.prod(shape[1:])
        )
        if not fits:
            raise MusubiError(
                f"LoRA {number}: {module} has up {list(up.shape)} and down {list(down.shape)}, which do not fit the "
                f"weight {key} of shape {list(shape)}; the LoRA was trained for a different model size or architecture."
            )
        return rank


def _is_finite(tensor) -> bool:
    """Whether a tensor (or a plain number) holds no NaN/inf; integer tensors always do."""
    if isinstance(tensor, torch.Tensor):
        return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())
    return not isinstance(tensor, float) or math.isfinite(tensor)


def first_non_finite_key(tensors) -> str | None:
    """The first key (in order) whose tensor holds NaN/inf, or None; ``tensors`` yields ``(key, tensor)``."""
    for key, tensor in tensors:
        if not _is_finite(tensor):
            return key
    return None


def _refuse_non_finite_merge(key: str, weight: torch.Tensor, strengths: list[float]) -> None:
    if not torch.isfinite(weight.float()).all():
        raise MusubiError(f"The base weight {key} already holds NaN/inf values; the checkpoint is broken — "
                          "download it again or pick another file.")
    shown = ", ".join(f"{strength:g}" for strength in strengths)
    raise MusubiError(f"Merging the LoRA(s) into {key} gives values beyond what {str(weight.dtype).removeprefix('torch.')} "
                      f"can hold (strength {shown}); lower the strength.")


def _alpha_value(alpha, rank: int) -> float:
    if alpha is None:
        return float(rank)
    value = float(alpha.float().reshape(-1)[0]) if isinstance(alpha, torch.Tensor) else float(alpha)
    return value if value != 0 and math.isfinite(value) else float(rank)


def merge_loras_into_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    loras: Sequence[tuple[Mapping[str, torch.Tensor], float]],
    architecture: str = "auto",
) -> tuple[dict[str, torch.Tensor], LoraMergeReport]:
    """A new state dict with the LoRAs merged in; unchanged tensors are the same objects.

    ``loras`` is ``[(lora_state_dict, strength), …]``; ``architecture`` ("auto" detects it) only
    matters for HunyuanVideo, whose LoRAs come in two namings.
    """
    merger = LoraMerger(state_dict, loras, architecture)
    merged = {key: merger.merge(key, tensor) for key, tensor in state_dict.items()}
    return merged, merger.report


def load_lora_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` of a LoRA .safetensors file; MusubiError for anything else,
    including a LoRA holding NaN/inf (which would merge into a model that only gives NaN)."""
    header, metadata = files.read_header(path)
    try:
        lora_formats.check_is_lora(header)
    except MusubiError as error:
        raise MusubiError(f"{path}: {error}") from error
    state_dict = dict(files.iter_tensors(path))
    bad = first_non_finite_key(state_dict.items())
    if bad is not None:
        count = sum(not _is_finite(tensor) for tensor in state_dict.values())
        raise MusubiError(f"{path}: {bad} holds NaN/inf values ({count} of {len(state_dict)} tensors do); the LoRA is "
                          "broken (its training diverged?). Use an earlier checkpoint of it, or retrain.")
    return state_dict, metadata
