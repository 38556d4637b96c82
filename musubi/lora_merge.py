"""Merge LoRAs into base weights: ``W' = W + m · (U·D) · (α / r)``, before quantizing to fp8.

Merging must happen on the bf16/fp16 weights: adding a LoRA to fp8 codes ignores their scales
(musubi-tuner's ``--base_weights`` with ``--fp8_scaled`` does exactly that and gets a wrong model).
So LoRAs are merged first and the merged weights quantized afterwards; an fp8 base weight is
refused.

Three key layouts are read, for a model module ``blocks.0.self_attn.q``:

* kohya / musubi-tuner: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha``. Dots became underscores, which is ambiguous (``self_attn`` has one of its own), so
  the names are matched against ``"lora_unet_" + path.replace(".", "_")`` built from the model's
  own keys, never guessed back.
* ComfyUI: ``diffusion_model.blocks.0.self_attn.q.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``.
* diffusers / PEFT: ``<prefix>blocks.0.self_attn.q.lora_A.weight`` (down) / ``.lora_B.weight`` (up),
  prefix ``diffusion_model.``, ``transformer.``, ``base_model.model.`` or none; alpha usually absent.

``α`` missing or 0 means ``α = r``. The products of all LoRAs on a weight are summed in float32
and added to the float32 weight, which is rounded back to the weight's dtype once. LoRA keys that
match no layer are reported, not silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import safetensors_io
from .errors import MusubiError
from .fp8 import WEIGHT_SUFFIX, dtype_and_shape, resolve_architecture, strip_model_prefix

KOHYA_PREFIX = "lora_unet_"
LORA_KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")

# LoRA tensor suffix -> role.
LORA_SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".alpha": "alpha",
}
_UNSUPPORTED_NETWORK_MARKS = (".hada_w1_a", ".hada_w2_a", ".lokr_w1", ".lokr_w2", ".lokr_w1_a")

# HunyuanVideo layer names in the official file vs ComfyUI's internal (Flux-style) names, so a
# LoRA saved in either naming merges into a checkpoint in either naming.
_HUNYUAN_VIDEO_RENAMES = (
    ("_mod.linear", "_mod.lin"),
    ("_attn_qkv", "_attn.qkv"),
    ("_attn_proj", "_attn.proj"),
    ("_mlp.fc1", "_mlp.0"),
    ("_mlp.fc2", "_mlp.2"),
    (".modulation.linear", ".modulation.lin"),
)

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
    up: torch.Tensor
    down: torch.Tensor
    factor: float  # strength * alpha / rank


class LoraMerger:
    """Plans the merge from the model's key names and shapes, then merges one weight at a time.

    ``model`` maps keys to tensors or to ``(dtype, shape)`` from a safetensors header, so a
    checkpoint can be merged while it is streamed. Mismatched shapes and fp8 base weights are
    reported before any weight is touched.
    """

    def __init__(self, model: Mapping, loras: Sequence[tuple[Mapping[str, torch.Tensor], float]], architecture: str = "auto"):
        self.architecture = resolve_architecture(architecture, model.keys())
        self._weights = {key: dtype_and_shape(value) for key, value in model.items() if key.endswith(WEIGHT_SUFFIX)}
        by_path, by_kohya = self._name_tables()
        self._additions: dict[str, list[_Addition]] = {}
        self.report = LoraMergeReport([])
        for number, lora in enumerate(loras, start=1):
            if not (isinstance(lora, (tuple, list)) and len(lora) == 2):
                raise MusubiError(f"LoRA {number}: expected a (state_dict, strength) pair.")
            lora_state_dict, strength = lora
            self.report.loras.append(self._plan(number, lora_state_dict, strength, by_path, by_kohya))

    def merge(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with every planned LoRA product added, or ``weight`` itself when none targets it."""
        additions = self._additions.get(key)
        if not additions:
            return weight
        total = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for addition in additions:
            up = addition.up.to(device=weight.device, dtype=torch.float32)
            down = addition.down.to(device=weight.device, dtype=torch.float32)
            product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            total.add_(product.reshape(weight.shape), alpha=addition.factor)
        return (weight.to(torch.float32) + total).to(weight.dtype)

    # -- planning --

    def _name_tables(self) -> tuple[dict[str, str], dict[str, list[str]]]:
        """module path -> weight key, and kohya name -> weight keys (a list, to catch collisions)."""
        by_path: dict[str, str] = {}
        for key in self._weights:
            by_path[strip_model_prefix(key)[: -len(WEIGHT_SUFFIX)]] = key
        if self.architecture == "hunyuan_video":
            for path, key in list(by_path.items()):
                for alias in _hunyuan_video_aliases(path):
                    by_path.setdefault(alias, key)
        by_kohya: dict[str, list[str]] = {}
        for path, key in by_path.items():
            keys = by_kohya.setdefault(KOHYA_PREFIX + path.replace(".", "_"), [])
            if key not in keys:
                keys.append(key)
        return by_path, by_kohya

    def _plan(self, number, lora_state_dict, strength, by_path, by_kohya) -> LoraUsage:
        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength):
            raise MusubiError(f"LoRA {number}: strength {strength!r} must be a finite number (1.0 = full strength).")
        usage = LoraUsage(float(strength))
        modules, unused = _group_lora_keys(lora_state_dict)
        planned_keys = set()
        for module, roles in modules.items():
            if "up" not in roles or "down" not in roles:
                unused += roles.values()
                continue
            key = self._resolve(number, module, by_path, by_kohya)
            if key is None or key in planned_keys:
                unused += roles.values()
                continue
            up, down = lora_state_dict[roles["up"]], lora_state_dict[roles["down"]]
            rank = self._check_shapes(number, module, key, up, down)
            alpha = _alpha_value(lora_state_dict.get(roles.get("alpha")), rank)
            self._additions.setdefault(key, []).append(_Addition(up, down, float(strength) * alpha / rank))
            planned_keys.add(key)
            usage.merged.append(key)
        usage.unused_keys = sorted(unused)
        if not usage.merged:
            examples = ", ".join(sorted(lora_state_dict)[:3]) or "none"
            raise MusubiError(
                f"LoRA {number} matches no layer of this {self.architecture} model (its keys look like: {examples}); "
                "it was probably trained for another model. Pick the LoRA made for this checkpoint."
            )
        return usage

    def _resolve(self, number, module: str, by_path, by_kohya) -> str | None:
        if module.startswith(KOHYA_PREFIX):
            keys = by_kohya.get(module, [])
            if len(keys) > 1:
                raise MusubiError(
                    f"LoRA {number}: the kohya name {module} fits several layers ({', '.join(keys)}) because dots "
                    "became underscores; convert the LoRA to the ComfyUI or diffusers layout (dotted names)."
                )
            return keys[0] if keys else None
        for prefix in LORA_KEY_PREFIXES + ("",):
            if module.startswith(prefix) and module[len(prefix):] in by_path:
                return by_path[module[len(prefix):]]
        return None

    def _check_shapes(self, number, module, key, up: torch.Tensor, down: torch.Tensor) -> int:
        dtype_name, shape = self._weights[key]
        if dtype_name.startswith("F8"):
            raise MusubiError(
                f"LoRA {number}: the base weight {key} is stored as fp8; a LoRA added to fp8 codes is lost or "
                "scaled wrongly. Merge into the bf16/fp16 original, then quantize the result "
                "(python -m musubi quantize … --lora_weight …)."
            )
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


def _hunyuan_video_aliases(path: str) -> list[str]:
    aliases = []
    if path.startswith(("double_blocks.", "single_blocks.")):
        for official, comfy in _HUNYUAN_VIDEO_RENAMES:
            if path.endswith(official):
                aliases.append(path[: -len(official)] + comfy)
            elif path.endswith(comfy):
                aliases.append(path[: -len(comfy)] + official)
    return aliases


def _group_lora_keys(lora_state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """module name -> {role: key}, and the keys that are no LoRA tensor at all."""
    modules: dict[str, dict[str, str]] = {}
    unused: list[str] = []
    for key in lora_state_dict:
        for suffix, role in LORA_SUFFIXES.items():
            if key.endswith(suffix):
                roles = modules.setdefault(key[: -len(suffix)], {})
                if role in roles:
                    unused.append(key)
                else:
                    roles[role] = key
                break
        else:
            unused.append(key)
    return modules, unused


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
    """``(state_dict, metadata)`` of a LoRA .safetensors file; MusubiError for anything else."""
    header, metadata = safetensors_io.read_header(path)
    lora_suffixes = tuple(suffix for suffix, role in LORA_SUFFIXES.items() if role != "alpha")
    if not any(name.endswith(lora_suffixes) for name in header):
        if any(mark in name for name in header for mark in _UNSUPPORTED_NETWORK_MARKS):
            raise MusubiError(f"{path}: a LoHa/LoKr network; only plain LoRAs (lora_down/lora_up) can be merged here.")
        raise MusubiError(
            f"{path}: not a LoRA (no lora_down/lora_up or lora_A/lora_B tensors). If it is a full model, "
            "use it as the base checkpoint instead."
        )
    return dict(safetensors_io.iter_tensors(path)), metadata
