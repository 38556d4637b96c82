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

LoHa and LoKr (:class:`LoHaNetwork`, :class:`LoKrNetwork`) select the same layers with the same
options and attach through the same hooks; only the module on each layer differs (see
:mod:`.modules`), and their state dicts use their own tensor names (``<path>.hada_w1_a`` …,
``<path>.lokr_w1`` …). :func:`create_network` builds any of them by type name.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import formats as lora_formats
from ..errors import MusubiError
from ..key_value_args import parse_key_value_args
from .modules import (
    NETWORK_TYPES, LayerShape, LoHaModule, LoKrModule, LoRAModule, NetworkModule, layer_kind, network_type_title,
)
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

# Extra --network_args keys of one network type.
TYPE_NETWORK_ARGS = {"lokr": ("factor",)}
# musubi-tuner's --network_module values (besides networks.lora and its per-architecture variants).
NETWORK_MODULES = {"networks.loha": "loha", "networks.lokr": "lokr"}

_MAX_LISTED = 8


def _is_pointwise(module: nn.Module) -> bool:
    return all(size == 1 for size in module.kernel_size)


@dataclass
class LoadReport:
    """What :meth:`LoRANetwork.load_weights` did."""

    loaded_modules: list[str] = field(default_factory=list)
    unmatched_keys: list[str] = field(default_factory=list)  # file keys that fit no module
    modules_not_in_file: list[str] = field(default_factory=list)  # kept their fresh initialisation
    file_format: str = ""
    notes: list[str] = field(default_factory=list)  # what the file set differently from the settings


class LoRANetwork(nn.Module):
    """LoRA modules for the selected layers of ``model``, attached by forward hooks at creation.

    ``model`` is not registered as a sub-module: ``parameters()``, ``state_dict()`` and ``.to()``
    only concern the LoRA weights, and the dropouts follow the network's own ``train()`` /
    ``eval()``, not the model's. :meth:`remove` detaches every hook.

    Subclasses change the module each layer gets (:attr:`network_type`, :meth:`_make_module`);
    selection, hooks, twins, state and loading are shared.
    """

    network_type = "lora"

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
        self._check_type_options()

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
        logger.info("%s (%s): %d modules, dim %d, alpha %g", network_type_title(self.network_type), self.preset.name,
                    len(self._paths), self.network_dim, self.network_alpha)

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
        module = self._make_module(path, layer, rank, alpha)
        self.lora_modules.append(module)
        self._paths.append(path)
        self._targets.append(layer)
        self._flat_names[flat] = path

    def _make_module(self, path: str, layer: nn.Module, rank: int, alpha: float) -> NetworkModule:
        return LoRAModule(
            path, layer, rank, alpha, dropout=self.dropout, rank_dropout=self.rank_dropout,
            module_dropout=self.module_dropout,
        )

    def _check_type_options(self) -> None:
        """Refuse options the network type cannot honour (LoRA takes them all)."""

    @property
    def network_module(self) -> str:
        """musubi-tuner's ``--network_module`` of this network, stored as ``ss_network_module``."""
        return self.preset.network_module

    def metadata_network_args(self) -> dict[str, str]:
        """The network args recorded in the saved file's ``ss_network_args``."""
        return dict(self.network_args)

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def describe(self) -> str:
        """One line on what is trained: type, layers, rank, alpha and trainable parameters."""
        return (f"{network_type_title(self.network_type)} on {len(self._paths)} layers, rank {self.network_dim}, "
                f"alpha {self.network_alpha:g}, {self.trainable_parameter_count():,} trainable parameters")

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

    def load_weights(self, path_or_state_dict: str | Mapping[str, torch.Tensor], strict: bool = True,
                     match_settings: bool = False) -> LoadReport:
        """Start from an existing LoRA (file path or state dict, ComfyUI / musubi / diffusers keys).

        Rank and alpha of every module come from the file (for LoKr also the factorization and
        whether W2 is full). A file key that fits no module, a layer size that differs from the
        model's, or a file of another network type is a MusubiError (with ``strict=False`` the
        unmatched keys are only reported). Modules the file lacks keep their initialisation.

        ``match_settings`` (a warm start): a rank other than the network's settings is refused too,
        so the run trains what its settings say; alpha and LoKr's factorization come from the file
        and :attr:`LoadReport.notes` say where they differ from the settings.
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
        report = self._load_canonical(canonical, strict=strict, source=source, match_settings=match_settings)
        report.file_format = file_format
        return report

    def warm_start(self, path: str) -> LoadReport:
        """Continue training from a saved LoRA/LoHa/LoKr file: :meth:`load_weights` with its
        type, layers and ranks checked against this network's settings."""
        return self.load_weights(path, strict=True, match_settings=True)

    def _load_canonical(self, state_dict: dict[str, torch.Tensor], strict: bool, source: str = "the state dict",
                        match_settings: bool = False) -> LoadReport:
        modules = self.modules_by_name()
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        report = LoadReport()
        for key, tensor in state_dict.items():
            suffix = next((s for s in lora_formats.CANONICAL_SUFFIXES if key.endswith(s)), None)
            path = key[: -len(suffix)] if suffix else None
            if path not in modules:
                report.unmatched_keys.append(key)
                continue
            grouped.setdefault(path, {})[suffix] = tensor

        title = network_type_title(self.network_type)
        for path, tensors in grouped.items():
            kind = lora_formats.module_network_type(tensors)
            if kind is not None and kind != self.network_type:
                example = path + next(s for s in tensors if s != lora_formats.LORA_ALPHA)
                raise MusubiError(
                    f"{source} holds a {network_type_title(kind)} network ({example} …), but this network is a {title}; "
                    f"set the network type to {kind} to continue it, or pick a {title} file."
                )

        problems = []
        for path, tensors in grouped.items():
            problem = modules[path].file_problem(tensors, path)
            if problem:
                problems.append(problem)
        if problems:
            raise MusubiError(
                f"{source}: {title} weights do not fit the model: " + "; ".join(problems[:_MAX_LISTED])
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
        if match_settings:
            mismatches = [f"{path}: {problem}" for path, tensors in grouped.items()
                          if (problem := modules[path].rank_mismatch(tensors))]
            if mismatches:
                raise MusubiError(
                    f"{source}: its ranks do not fit the network settings: " + "; ".join(mismatches[:_MAX_LISTED])
                    + _more(mismatches) + ". Set network_dim (conv_dim for convolutions) to the file's rank."
                )

        before = {path: (float(modules[path].alpha), getattr(modules[path], "factors", None)) for path in grouped}
        for path, tensors in grouped.items():
            modules[path].load_file_tensors(tensors)
            report.loaded_modules.append(path)
        report.modules_not_in_file = [path for path in self._paths if path not in grouped]
        if grouped and report.modules_not_in_file:
            logger.info("%d LoRA modules are not in %s and start from scratch.", len(report.modules_not_in_file), source)
        if match_settings:
            report.notes = self._load_notes(before, modules, grouped)
        return report

    def _load_notes(self, before, modules, grouped) -> list[str]:
        """Where a loaded file set alpha or LoKr factors differently from the settings."""
        alphas = sorted({float(modules[path].alpha) for path in grouped if float(modules[path].alpha) != before[path][0]
                         and not getattr(modules[path], "full", False)})
        notes = []
        if alphas:
            notes.append(f"alpha {', '.join(f'{a:g}' for a in alphas)} from the file (settings: {self.network_alpha:g})")
        refactored = [path for path in grouped if before[path][1] is not None and modules[path].factors != before[path][1]]
        if refactored:
            notes.append(f"{len(refactored)} LoKr layers keep the file's factorization (other than factor {getattr(self, 'factor', -1)} gives)")
        return notes


def _more(items: Sequence) -> str:
    return f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""


# --- LoHa and LoKr ------------------------------------------------------------------------------


class _WeightChangeNetwork(LoRANetwork):
    """What LoHa and LoKr share: options that only LoRA has are refused, not silently ignored."""

    def _check_type_options(self) -> None:
        check_type_options(self.network_type, self.loraplus_lr_ratio, self.dropout)

    @property
    def network_module(self) -> str:
        return f"networks.{self.network_type}"


class LoHaNetwork(_WeightChangeNetwork):
    """LoHa on the selected layers: ``ΔW = (α/r) · (W1a·W1b) ⊙ (W2a·W2b)`` (see :class:`LoHaModule`)."""

    network_type = "loha"

    def _make_module(self, path: str, layer: nn.Module, rank: int, alpha: float) -> NetworkModule:
        return LoHaModule(path, layer, rank, alpha, rank_dropout=self.rank_dropout, module_dropout=self.module_dropout)


class LoKrNetwork(_WeightChangeNetwork):
    """LoKr on the selected layers: ``ΔW = s · W1 ⊗ W2`` (see :class:`LoKrModule`).

    ``factor``: −1 splits each width into its most balanced pair of divisors, N > 0 uses N as one
    part when it divides the width (else the most balanced split with a part ≤ N).
    """

    network_type = "lokr"

    def __init__(self, *args, factor: int = -1, **kwargs):
        self.factor = _lokr_factor(factor)
        super().__init__(*args, **kwargs)

    def _make_module(self, path: str, layer: nn.Module, rank: int, alpha: float) -> NetworkModule:
        return LoKrModule(path, layer, rank, alpha, factor=self.factor, rank_dropout=self.rank_dropout,
                          module_dropout=self.module_dropout)

    def full_w2_modules(self) -> list[str]:
        """Paths of the modules whose W2 is a full matrix (scale 1, network_alpha not applied)."""
        return [path for path, module in zip(self._paths, self.lora_modules) if module.full]

    def metadata_network_args(self) -> dict[str, str]:
        return {**self.network_args, "factor": str(self.factor)}

    def describe(self) -> str:
        line = super().describe() + f", factor {self.factor}"
        full = self.full_w2_modules()
        if full:
            line += (f"; {len(full)} of them keep a full lokr_w2 (the rank is at least half of W2's larger side, "
                     "so a low-rank W2 would save nothing): scale 1 there, network_alpha does not apply")
        return line


NETWORK_CLASSES: dict[str, type[LoRANetwork]] = {"lora": LoRANetwork, "loha": LoHaNetwork, "lokr": LoKrNetwork}


def network_type_from_module(network_module: str | None) -> str | None:
    """musubi-tuner's ``--network_module`` as a network type: ``networks.loha`` → loha,
    ``networks.lokr`` → lokr, ``networks.lora`` and its per-architecture ``networks.lora_*`` → lora."""
    if network_module is None or network_module == "":
        return None
    name = str(network_module).strip()
    if name in NETWORK_MODULES:
        return NETWORK_MODULES[name]
    if name == "networks.lora" or name.startswith("networks.lora_"):
        return "lora"
    raise MusubiError(
        f"network_module {name!r} is not a network this trainer has; use networks.lora (or its per-architecture "
        "networks.lora_*), networks.loha or networks.lokr — or network_type = lora, loha or lokr."
    )


def check_network_type(network_type: str | None) -> str:
    """The network type, "lora" when unset; a MusubiError listing the types for anything else."""
    if network_type is None or network_type == "":
        return "lora"
    if network_type not in NETWORK_CLASSES:
        raise MusubiError(f"network_type {network_type!r} is unknown; choose one of: {', '.join(NETWORK_TYPES)}.")
    return network_type


def check_type_options(network_type: str, loraplus_lr_ratio: float | None = None, dropout: float | None = None) -> None:
    """Refuse the LoRA-only options for LoHa / LoKr (musubi-tuner accepts LoRA+ there, logs that it
    has no effect and trains one group at the base learning rate; its LoHa/LoKr ignore network_dropout)."""
    if network_type == "lora":
        return
    title = network_type_title(network_type)
    if loraplus_lr_ratio is not None:
        raise MusubiError(
            f"loraplus_lr_ratio: LoRA+ speeds up LoRA's lora_up weights; a {title} has none, so it would train "
            "as without it. Set loraplus_lr_ratio to 0 (off) or use the lora network type."
        )
    if dropout:
        raise MusubiError(
            f"network_dropout: it drops LoRA's inner (rank) features, which a {title} does not compute; "
            "use rank_dropout or module_dropout instead, or set network_dropout to 0."
        )


def create_network(network_type: str | None, model: nn.Module, preset_or_arch: LoraPreset | str,
                   factor: int | None = None, **options) -> LoRANetwork:
    """A network of ``network_type`` ("lora", "loha", "lokr"); ``options`` are :class:`LoRANetwork`'s,
    ``factor`` is LoKr's (an error for the other types)."""
    network_type = check_network_type(network_type)
    if network_type == "lokr":
        return LoKrNetwork(model, preset_or_arch, factor=-1 if factor is None else factor, **options)
    if factor is not None:
        raise MusubiError(f"factor: only the lokr network type has a factor (this one is {network_type}).")
    return NETWORK_CLASSES[network_type](model, preset_or_arch, **options)


def _lokr_factor(value: Any) -> int:
    number = _number(value, "factor")
    if number != int(number) or number < -1:
        raise MusubiError(f"factor: expected -1 (balanced split), 0 or a whole number ≥ 1, got {value!r}.")
    return int(number)


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
    network_type: str | None = None,
) -> LoRANetwork:
    """Build a network from musubi-tuner style options (``--network_args key=value ...``);
    ``network_type`` "lora" (default), "loha" or "lokr" (whose ``factor`` is a network arg)."""
    network_type = check_network_type(network_type)
    values = parse_key_value_args(network_args, "network_args")
    known = KNOWN_NETWORK_ARGS + TYPE_NETWORK_ARGS.get(network_type, ())
    unknown = sorted(set(values) - set(known))
    if unknown:
        other = [key for key in unknown if any(key in keys for keys in TYPE_NETWORK_ARGS.values())]
        hint = (f" ({', '.join(other)} belongs to another network type than {network_type})" if other else "")
        raise MusubiError(
            f"--network_args: unknown key(s) {', '.join(unknown)}{hint}; known keys: {', '.join(known)}."
        )
    type_options = {"factor": values["factor"]} if "factor" in values else {}
    network = create_network(
        network_type,
        model,
        arch,
        **type_options,
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
