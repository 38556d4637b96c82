"""A LoRA network attached to a frozen diffusion transformer through forward hooks.

For each selected layer ``y = f(x)`` a :class:`LoRAModule` adds ``m · (α/r) · U(D(x))``:
``D`` ("lora_down", r×in) and ``U`` ("lora_up", out×r), ``α`` the alpha, ``r`` the rank and ``m``
the multiplier. The branch is added by a forward hook on the layer, which only sees the layer's
input and output: the layer itself, its ``forward`` and its weights are never touched or read.
That keeps the LoRA working on ComfyUI's layers, whose weights may live in another dtype or
device than the computation, be fp8 with scales, carry ComfyUI's own LoRA patches, or be
compiled with ``torch.compile``.

Layer selection follows musubi-tuner (see :mod:`.presets` for the per-family defaults):

1. candidates are the Linear (and Conv2d/Conv3d) layers inside the preset's target blocks,
   named by their dotted path from the model root;
2. a candidate is skipped when an exclude regex fully matches its path and no include regex
   does (include patterns only rescue excluded layers; to train a subset, exclude ``.*`` and
   include the subset);
3. Linear and 1×1 convolutions get ``network_dim``; other convolutions only with ``conv_dim``.

The network's ``state_dict()`` has one canonical form, keyed by the module path on the model:
``<path>.lora_down.weight``, ``<path>.lora_up.weight``, ``<path>.alpha`` (0-dim).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import formats as lora_formats
from ..errors import MusubiError
from ..key_value_args import parse_key_value_args
from .presets import LoraPreset, get_preset

logger = logging.getLogger(__name__)

LORA_TENSOR_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")

# --network_args keys this network understands.
KNOWN_NETWORK_ARGS = (
    "exclude_patterns",
    "include_patterns",
    "conv_dim",
    "conv_alpha",
    "rank_dropout",
    "module_dropout",
    "loraplus_lr_ratio",
    "verbose",
)

_MAX_LISTED = 8


@dataclass(frozen=True)
class LayerShape:
    """What a LoRA needs from its target layer: kind, widths and, for convolutions, the geometry."""

    kind: str  # "linear", "conv2d" or "conv3d"
    in_features: int
    out_features: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: Any = ()
    dilation: tuple[int, ...] = ()
    padding_mode: str = "zeros"

    @classmethod
    def of(cls, layer: nn.Module) -> LayerShape:
        kind = layer_kind(layer)
        if kind == "linear":
            return cls(kind, layer.in_features, layer.out_features)
        if kind is None:
            raise MusubiError(f"a LoRA needs a Linear, Conv2d or Conv3d layer, got {type(layer).__name__}.")
        return cls(
            kind, layer.in_channels, layer.out_channels, tuple(layer.kernel_size), tuple(layer.stride),
            layer.padding, tuple(layer.dilation), layer.padding_mode,
        )

    def make_down_up(self, rank: int) -> tuple[nn.Module, nn.Module]:
        """D with the layer's own geometry, U a plain (or 1×1 conv) projection back to its width."""
        if self.kind == "linear":
            return nn.Linear(self.in_features, rank, bias=False), nn.Linear(rank, self.out_features, bias=False)
        conv = nn.Conv3d if self.kind == "conv3d" else nn.Conv2d
        down = conv(
            self.in_features, rank, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, padding_mode=self.padding_mode, bias=False,
        )
        return down, conv(rank, self.out_features, 1, bias=False)


class LoRAModule(nn.Module):
    """The low-rank branch of one Linear / Conv layer: ``m · s · U(drop(D(x)))`` with ``s = α / r``."""

    def __init__(
        self,
        path: str,
        target: nn.Module | LayerShape,
        rank: int,
        alpha: float | None = None,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__()
        if rank < 1:
            raise MusubiError(f"{path}: the LoRA rank must be at least 1, got {rank}.")
        self.path = path
        self.layer_shape = target if isinstance(target, LayerShape) else LayerShape.of(target)
        self.multiplier = float(multiplier)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.rank = 0
        self._build(rank)
        alpha = float(self.rank) if alpha is None or float(alpha) == 0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self._refresh_scale()
        self.register_load_state_dict_post_hook(_refresh_scale_after_load)

    def _build(self, rank: int, like: torch.Tensor | None = None) -> None:
        self.rank = int(rank)
        down, up = self.layer_shape.make_down_up(self.rank)
        if like is not None:
            down, up = down.to(device=like.device, dtype=like.dtype), up.to(device=like.device, dtype=like.dtype)
        # kaiming_uniform with a=√5 is Uniform(±1/√fan_in), fan_in = in (× kernel size for convs).
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(up.weight)
        self.lora_down, self.lora_up = down, up

    @property
    def is_conv(self) -> bool:
        return self.layer_shape.kind != "linear"

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA term for input ``x``, computed in the LoRA's dtype (dropouts only in training)."""
        weight = self.lora_down.weight
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(device=weight.device)
        else:
            x = x.to(device=weight.device, dtype=weight.dtype)
        hidden = self.lora_down(x)
        scale = self.scale
        if self.training:
            if self.dropout:
                hidden = F.dropout(hidden, p=self.dropout, training=True)
            if self.rank_dropout:
                hidden = hidden * self._rank_keep_mask(hidden)
                scale = scale / (1.0 - self.rank_dropout)  # as if the rank itself were smaller
        return self.lora_up(hidden) * (self.multiplier * scale)

    def _rank_keep_mask(self, hidden: torch.Tensor) -> torch.Tensor:
        """A keep-mask per (sample, rank), shared by all tokens / pixels of that sample."""
        batch = hidden.shape[0] if hidden.dim() > 1 else 1
        keep = (torch.rand(batch, self.rank, device=hidden.device) >= self.rank_dropout).to(hidden.dtype)
        if hidden.dim() == 1:
            return keep[0]
        if self.is_conv:  # [B, r, *spatial]
            return keep.reshape((batch, self.rank) + (1,) * (hidden.dim() - 2))
        return keep.reshape((batch,) + (1,) * (hidden.dim() - 2) + (self.rank,))  # [B, ..., r]

    def hook(self, target: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Forward hook on the target layer: returns ``output + branch(input)``."""
        if self.multiplier == 0 or not isinstance(output, torch.Tensor):
            return output
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return output
        x = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
        delta = self.branch(x).to(device=output.device)
        # One rounding to the layer's output dtype, after the sum.
        return (output + delta).to(output.dtype)

    def resize(self, rank: int) -> None:
        """Re-create D and U with another rank (freshly initialised), keeping dtype and device."""
        if rank != self.rank:
            self._build(rank, like=self.lora_down.weight)
            self._refresh_scale()

    def _refresh_scale(self) -> None:
        alpha = float(self.alpha)
        self.scale = (alpha if alpha != 0 else self.rank) / self.rank

    def extra_repr(self) -> str:
        return f"{self.path}, rank={self.rank}, alpha={float(self.alpha):g}"


def _refresh_scale_after_load(module: LoRAModule, incompatible_keys) -> None:
    module._refresh_scale()


def layer_kind(module: nn.Module) -> str | None:
    """"linear", "conv2d", "conv3d", or None for layers a LoRA does not target."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv3d):
        return "conv3d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def _is_pointwise(module: nn.Module) -> bool:
    return all(size == 1 for size in module.kernel_size)


@dataclass
class LoadReport:
    """What :meth:`LoRANetwork.load_weights` did."""

    loaded_modules: list[str] = field(default_factory=list)
    unmatched_keys: list[str] = field(default_factory=list)  # file keys that fit no module
    modules_not_in_file: list[str] = field(default_factory=list)  # kept their fresh initialisation
    file_format: str = ""


class LoRANetwork(nn.Module):
    """LoRA modules for the selected layers of ``model``, attached by forward hooks at creation.

    ``model`` is not registered as a sub-module: ``parameters()``, ``state_dict()`` and ``.to()``
    only concern the LoRA weights, and the dropouts follow the network's own ``train()`` /
    ``eval()``, not the model's. :meth:`remove` detaches every hook.
    """

    def __init__(
        self,
        model: nn.Module,
        preset_or_arch: LoraPreset | str,
        network_dim: int = 4,
        network_alpha: float | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        include_patterns: Sequence[str] | None = None,
        exclude_patterns: Sequence[str] | None = None,
        conv_dim: int | None = None,
        conv_alpha: float | None = None,
        loraplus_lr_ratio: float | None = None,
        verbose: bool | str | int = False,
    ):
        super().__init__()
        self.preset = get_preset(preset_or_arch)
        self.network_dim = _positive_int(4 if network_dim is None else network_dim, "network_dim")
        self.network_alpha = 1.0 if network_alpha is None else _number(network_alpha, "network_alpha")
        self.conv_dim = None if conv_dim is None else _positive_int(conv_dim, "conv_dim", allow_zero=True)
        self.conv_alpha = 1.0 if conv_alpha is None else _number(conv_alpha, "conv_alpha")
        self.dropout = _probability(dropout, "network_dropout")
        self.rank_dropout = _probability(rank_dropout, "rank_dropout")
        self.module_dropout = _probability(module_dropout, "module_dropout", allow_one=True)
        self.loraplus_lr_ratio = None if loraplus_lr_ratio is None else _number(loraplus_lr_ratio, "loraplus_lr_ratio")
        self.verbose = parse_verbose(verbose)
        self.user_exclude_patterns = list(_pattern_list(exclude_patterns, "exclude_patterns"))
        self.include_patterns = list(_pattern_list(include_patterns, "include_patterns"))
        self.exclude_patterns = self.user_exclude_patterns + list(self.preset.default_exclude_patterns)
        self.network_args: dict[str, str] = {}  # raw --network_args, for metadata

        self.lora_modules = nn.ModuleList()
        self._paths: list[str] = []
        self._targets: list[nn.Module] = []
        self._twin_targets: list[list[nn.Module]] = []  # the same layers in other models sharing these weights
        self._handles: list[Any] = []
        self._flat_names: dict[str, str] = {}
        self._select_and_create(model)
        self.attach()

    # --- selection ----------------------------------------------------------------------------

    def _select_and_create(self, model: nn.Module) -> None:
        excludes = _compile_patterns(self.exclude_patterns, "exclude_patterns")
        includes = _compile_patterns(self.include_patterns, "include_patterns")
        candidates = self._candidates(model)
        excluded: list[str] = []
        skipped: list[str] = []
        for path, layer in candidates.items():
            if any(p.fullmatch(path) for p in excludes) and not any(p.fullmatch(path) for p in includes):
                excluded.append(path)
                continue
            rank, alpha = self._rank_and_alpha(layer)
            if not rank:
                skipped.append(path)
                continue
            self._add_module(path, layer, rank, alpha)

        if self.verbose:
            for path in excluded:
                logger.info("LoRA: excluded %s", path)
            for path in skipped:
                logger.info("LoRA: skipped %s (convolution without conv_dim, or grouped)", path)
            for module in self.lora_modules:
                logger.info("LoRA: created %-60s dim %d, alpha %g", module.path, module.rank, float(module.alpha))
        if not self._paths:
            raise MusubiError(self._empty_selection_message(model, candidates, excluded, skipped))
        logger.info("LoRA (%s): %d modules, dim %d, alpha %g", self.preset.name, len(self._paths),
                    self.network_dim, self.network_alpha)

    def _candidates(self, model: nn.Module) -> dict[str, nn.Module]:
        """Linear/Conv layers inside target blocks, by path; a layer in nested blocks counts once."""
        candidates: dict[str, nn.Module] = {}
        for block_path, block in model.named_modules():
            if not self.preset.is_target_block(block):
                continue
            for child_path, child in block.named_modules():
                if layer_kind(child) is not None:
                    path = ".".join(part for part in (block_path, child_path) if part)
                    candidates.setdefault(path, child)
        return candidates

    def _rank_and_alpha(self, layer: nn.Module) -> tuple[int | None, float | None]:
        if layer_kind(layer) == "linear":
            return self.network_dim, self.network_alpha
        if getattr(layer, "groups", 1) != 1:
            return None, None  # a grouped convolution's weight cannot take a dense LoRA update
        if _is_pointwise(layer):
            return self.network_dim, self.network_alpha
        return self.conv_dim, self.conv_alpha

    def _add_module(self, path: str, layer: nn.Module, rank: int, alpha: float) -> None:
        # musubi-tuner names a module by its path with dots as underscores; two paths that collide
        # there could not be told apart in its file format.
        flat = self.preset.musubi_name(path).replace(".", "_")
        clash = self._flat_names.get(flat)
        if clash is not None:
            raise MusubiError(
                f"the layers '{clash}' and '{path}' get the same LoRA name 'lora_unet_{flat}'; "
                "exclude one of them with exclude_patterns."
            )
        module = LoRAModule(
            path, layer, rank, alpha, dropout=self.dropout, rank_dropout=self.rank_dropout,
            module_dropout=self.module_dropout,
        )
        self.lora_modules.append(module)
        self._paths.append(path)
        self._targets.append(layer)
        self._flat_names[flat] = path

    def _empty_selection_message(self, model, candidates, excluded, skipped) -> str:
        blocks = sum(1 for _, module in model.named_modules() if self.preset.is_target_block(module))
        if not blocks:
            return (
                f"LoRA preset '{self.preset.name}' selected no layer: the model ({type(model).__name__}) has no "
                f"{self.preset.describe_targets()}; pick the preset of this model's architecture."
            )
        if not candidates:
            return (
                f"LoRA preset '{self.preset.name}': the model's {blocks} target blocks contain no Linear/Conv layer."
            )
        reason = (
            f"exclude patterns {self.exclude_patterns} removed all {len(excluded)} candidate layers "
            f"(include patterns {self.include_patterns} rescued none)"
            if excluded else f"{len(skipped)} candidates are convolutions without conv_dim"
        )
        return f"LoRA preset '{self.preset.name}' selected no layer: {reason}; loosen the patterns."

    # --- hooks ----------------------------------------------------------------------------------

    def attach(self) -> None:
        """Register the forward hooks (done at creation; again after :meth:`remove`)."""
        if self._handles:
            return
        for targets in [self._targets, *self._twin_targets]:
            for module, target in zip(self.lora_modules, targets):
                self._handles.append(target.register_forward_hook(module.hook, with_kwargs=True))

    def attach_twin(self, model: nn.Module) -> None:
        """Apply the same LoRA modules (shared weights) to ``model`` too: a model of the same
        layout, such as the other expert of Wan 2.2 A14B, so one LoRA trains on both."""
        targets = []
        for path, module in zip(self._paths, self.lora_modules):
            try:
                layer = model.get_submodule(path)
            except AttributeError:
                layer = None
            if layer is None or layer_kind(layer) is None or LayerShape.of(layer) != module.layer_shape:
                raise MusubiError(
                    f"the second model has no layer '{path}' shaped like the first model's; both models "
                    "must have the same architecture and size to share one LoRA."
                )
            targets.append(layer)
        self._twin_targets.append(targets)
        if self._handles:
            for module, target in zip(self.lora_modules, targets):
                self._handles.append(target.register_forward_hook(module.hook, with_kwargs=True))

    def remove(self) -> None:
        """Detach every hook: the model computes exactly as before the network existed."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # --- settings -------------------------------------------------------------------------------

    def module_names(self) -> list[str]:
        """Module paths (on the model) of the LoRA modules, in creation order."""
        return list(self._paths)

    def modules_by_name(self) -> dict[str, LoRAModule]:
        return dict(zip(self._paths, self.lora_modules))

    def set_multiplier(self, multiplier: float) -> None:
        for module in self.lora_modules:
            module.multiplier = float(multiplier)

    def param_groups(self, learning_rate: float) -> list[dict]:
        """Optimizer groups; with LoRA+ the ``lora_up`` weights get ``learning_rate × ratio``."""
        ratio = self.loraplus_lr_ratio
        regular, plus = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (plus if ratio is not None and "lora_up" in name else regular).append(param)
        if ratio is not None and not plus:
            logger.warning("loraplus_lr_ratio is set but the network has no trainable lora_up weight; LoRA+ has no effect.")
        groups = [{"params": regular, "lr": learning_rate, "name": "unet"}]
        if ratio is not None:
            groups.append({"params": plus, "lr": learning_rate * ratio, "name": "unet plus"})
        return [group for group in groups if group["params"] and group["lr"]]

    # --- state ----------------------------------------------------------------------------------

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Canonical form: ``<module path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``."""
        result = {} if destination is None else destination
        for path, module in zip(self._paths, self.lora_modules):
            for name, tensor in module.state_dict(keep_vars=keep_vars).items():
                result[f"{prefix}{path}.{name}"] = tensor
        return result

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False) -> LoadReport:
        """Load a canonical state dict (:meth:`load_weights` also reads files and other key formats)."""
        return self._load_canonical(dict(state_dict), strict=strict)

    def load_weights(self, path_or_state_dict: str | Mapping[str, torch.Tensor], strict: bool = True) -> LoadReport:
        """Start from an existing LoRA (file path or state dict, ComfyUI / musubi / diffusers keys).

        Rank and alpha of every module come from the file. A file key that fits no module, or a
        layer size that differs from the model's, is a MusubiError (with ``strict=False`` the
        unmatched keys are only reported). Modules the file lacks keep their initialisation.
        """
        if isinstance(path_or_state_dict, Mapping):
            canonical, file_format = lora_formats.to_canonical(
                path_or_state_dict, module_names=self._paths, arch=self.preset
            )
            source = "the state dict"
        else:
            canonical, _, file_format = lora_formats.load_lora_state_dict(
                str(path_or_state_dict), module_names=self._paths, arch=self.preset
            )
            source = str(path_or_state_dict)
        report = self._load_canonical(canonical, strict=strict, source=source)
        report.file_format = file_format
        return report

    def _load_canonical(self, state_dict: dict[str, torch.Tensor], strict: bool, source: str = "the state dict") -> LoadReport:
        modules = self.modules_by_name()
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        report = LoadReport()
        for key, tensor in state_dict.items():
            suffix = next((s for s in LORA_TENSOR_SUFFIXES if key.endswith(s)), None)
            path = key[: -len(suffix)] if suffix else None
            if path not in modules:
                report.unmatched_keys.append(key)
                continue
            grouped.setdefault(path, {})[suffix] = tensor

        problems = []
        for path, tensors in grouped.items():
            if ".lora_down.weight" not in tensors or ".lora_up.weight" not in tensors:
                present = ", ".join(path + s for s in tensors)
                problems.append(f"{present} (its lora_down/lora_up partner is missing)")
                continue
            problem = _shape_problem(modules[path], tensors[".lora_down.weight"], tensors[".lora_up.weight"])
            if problem:
                problems.append(f"{path}: {problem}")
        if problems:
            raise MusubiError(
                f"{source}: LoRA weights do not fit the model: " + "; ".join(problems[:_MAX_LISTED])
                + _more(problems) + ". The LoRA was made for another model size or architecture."
            )
        if report.unmatched_keys:
            message = (
                f"{source}: {len(report.unmatched_keys)} LoRA keys match no selected layer: "
                + ", ".join(report.unmatched_keys[:_MAX_LISTED]) + _more(report.unmatched_keys)
            )
            if strict:
                raise MusubiError(
                    message + ". Check the architecture and the include/exclude patterns, or load with strict=False."
                )
            logger.warning(message)

        for path, tensors in grouped.items():
            module = modules[path]
            down, up = tensors[".lora_down.weight"], tensors[".lora_up.weight"]
            module.resize(down.shape[0])
            rank = down.shape[0]
            alpha = tensors.get(".alpha")
            alpha_value = float(rank) if alpha is None or float(alpha) == 0 else float(alpha)
            with torch.no_grad():
                module.lora_down.weight.copy_(down.reshape(module.lora_down.weight.shape))
                module.lora_up.weight.copy_(up.reshape(module.lora_up.weight.shape))
                module.alpha.fill_(alpha_value)
            module._refresh_scale()
            report.loaded_modules.append(path)
        report.modules_not_in_file = [path for path in self._paths if path not in grouped]
        if grouped and report.modules_not_in_file:
            logger.info("%d LoRA modules are not in %s and start from scratch.", len(report.modules_not_in_file), source)
        return report


def _shape_problem(module: LoRAModule, down: torch.Tensor, up: torch.Tensor) -> str | None:
    """Why a (down, up) pair cannot sit on this module's layer, or None when it fits."""
    if down.dim() < 2 or up.dim() < 2:
        return f"lora_down {list(down.shape)} / lora_up {list(up.shape)} are not weight matrices"
    rank = down.shape[0]
    expected_down = (rank,) + tuple(module.lora_down.weight.shape[1:])
    expected_up = (module.lora_up.weight.shape[0], rank) + tuple(module.lora_up.weight.shape[2:])
    down_ok = tuple(down.shape) == expected_down or (
        not module.is_conv and down.dim() == 2 and tuple(down.shape) == expected_down[:2]
    )
    up_ok = tuple(up.shape) == expected_up or tuple(up.shape) == expected_up[:2] + (1,) * (up.dim() - 2)
    if down_ok and up_ok and up.shape[1] == rank:
        return None
    return (
        f"lora_down {list(down.shape)} / lora_up {list(up.shape)} do not match the layer "
        f"(expected {list(expected_down)} / {list(expected_up)})"
    )


def _more(items: Sequence) -> str:
    return f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""


# --- argument parsing --------------------------------------------------------------------------


def parse_verbose(value: Any) -> bool:
    """True for True / 1 / "true" / "True" / "yes" / "on"; False likewise; anything else is an error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off", ""):
        return value.strip().lower() in ("true", "1", "yes", "on")
    if value is None:
        return False
    raise MusubiError(f"verbose: expected true or false, got {value!r}.")


def network_from_args(
    model: nn.Module,
    arch: LoraPreset | str,
    network_dim: int | None = None,
    network_alpha: float | None = None,
    network_dropout: float | None = None,
    network_args: Iterable[str] | Mapping[str, Any] | str | None = None,
) -> LoRANetwork:
    """Build a network from musubi-tuner style options (``--network_args key=value ...``)."""
    values = parse_key_value_args(network_args, "network_args")
    unknown = sorted(set(values) - set(KNOWN_NETWORK_ARGS))
    if unknown:
        raise MusubiError(
            f"--network_args: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(KNOWN_NETWORK_ARGS)}."
        )
    network = LoRANetwork(
        model,
        arch,
        network_dim=4 if network_dim is None else network_dim,
        network_alpha=1.0 if network_alpha is None else network_alpha,
        dropout=network_dropout,
        rank_dropout=values.get("rank_dropout"),
        module_dropout=values.get("module_dropout"),
        include_patterns=values.get("include_patterns"),
        exclude_patterns=values.get("exclude_patterns"),
        conv_dim=values.get("conv_dim"),
        conv_alpha=values.get("conv_alpha"),
        loraplus_lr_ratio=values.get("loraplus_lr_ratio"),
        verbose=values.get("verbose", False),
    )
    network.network_args = _raw_network_args(network_args, values)
    return network


def _raw_network_args(network_args, values: Mapping[str, Any]) -> dict[str, str]:
    """The key/value texts as given (musubi-tuner stores these in ss_network_args)."""
    if network_args is None or isinstance(network_args, Mapping):
        return {key: str(value) for key, value in values.items()}
    items = [network_args] if isinstance(network_args, str) else list(network_args)
    raw: dict[str, str] = {}
    for item in items:
        key, _, text = item.partition("=")
        raw[key.strip()] = text.strip()
    # A single string may hold several items; fall back to the parsed values then.
    return raw if set(raw) == set(values) else {key: str(value) for key, value in values.items()}


def _pattern_list(patterns: Sequence[str] | str | None, option: str) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise MusubiError(f"{option}: expected a list of regex strings such as ['.*norm.*'], got {patterns!r}.")
    return list(patterns)


def _compile_patterns(patterns: Sequence[str], option: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise MusubiError(f"{option}: {pattern!r} is not a valid regular expression ({error}).") from error
    return compiled


def _number(value: Any, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MusubiError(f"{option}: expected a number, got {value!r}.")
    try:
        number = float(value)
    except ValueError as error:
        raise MusubiError(f"{option}: expected a number, got {value!r}.") from error
    if not math.isfinite(number):
        raise MusubiError(f"{option}: expected a finite number, got {value!r}.")
    return number


def _positive_int(value: Any, option: str, allow_zero: bool = False) -> int:
    number = _number(value, option)
    if number != int(number) or number < (0 if allow_zero else 1):
        lowest = 0 if allow_zero else 1
        raise MusubiError(f"{option}: expected a whole number ≥ {lowest}, got {value!r}.")
    return int(number)


def _probability(value: Any, option: str, allow_one: bool = False) -> float | None:
    if value is None:
        return None
    number = _number(value, option)
    if not (0 <= number < 1 or (allow_one and number == 1)):
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise MusubiError(f"{option}: expected a probability in {bound}, got {value!r}.")
    return number or None
