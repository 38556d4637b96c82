"""Optimizer choice, musubi-tuner style (``--optimizer_type``, ``--optimizer_args``).

``build_optimizer`` accepts musubi-tuner's names: ``AdamW`` (also the default, for None or ""),
``AdamW8bit`` (bitsandbytes), ``Adafactor`` (transformers, ``relative_step=True`` unless told
otherwise), ``Prodigy`` (prodigyopt), the schedule-free optimizers (``AdamWScheduleFree``,
``RAdamScheduleFree``, ``SGDScheduleFree`` or any name ending in ``ScheduleFree``), any
``torch.optim`` class by its bare name, and any class by a dotted path ``package.module.Class``.
Built-in names are case-insensitive; optional packages are imported only when chosen.

Schedule-free optimizers keep two copies of the weights and must be told whether the model is
training or being evaluated: ``set_train_mode`` before training steps, ``eval_mode`` around
sampling and saving (the weights seen there are the averaged ones).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import warnings
from typing import Any, Iterable, Iterator, Mapping

import torch

from ..errors import MusubiError
from ..key_value_args import format_key_value_args, parse_key_value_args

BUILTIN_OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor", "Prodigy", "AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree")

# Optimizers that estimate their own step size and expect learning_rate around 1.0.
_SELF_TUNING_PREFIXES = ("prodigy", "dadapt")
_SELF_TUNING_LR_FLOOR = 0.1

# Where the optional optimizers come from, and how to get them.
_OPTIONAL_PACKAGES = {
    "bitsandbytes": "pip install bitsandbytes, or use AdamW",
    "prodigyopt": "pip install prodigyopt, or use AdamW",
    "schedulefree": "pip install schedulefree, or use AdamW",
    "transformers.optimization": "pip install transformers, or use AdamW",
}


def build_optimizer(
    optimizer_type: str | None,
    param_groups: Iterable[Any],
    learning_rate: float | None,
    optimizer_args: Iterable[str] | Mapping[str, Any] | str | None = None,
) -> tuple[torch.optim.Optimizer, str]:
    """Build the optimizer and its description (musubi's ``ss_optimizer`` metadata value).

    ``param_groups`` are parameters or dicts such as ``{"params": [...], "lr": 1e-4, "name": "unet"}``;
    a group's own ``lr`` wins over ``learning_rate``. With Adafactor's ``relative_step`` the optimizer
    sets its own learning rate: pair it with the ``adafactor`` scheduler (see
    ``requires_adafactor_scheduler``).
    """
    kwargs = parse_key_value_args(optimizer_args, "optimizer_args")
    if "lr" in kwargs:
        raise MusubiError("--optimizer_args: do not pass lr there; set --learning_rate instead")
    type_name = (optimizer_type or "").strip() or "AdamW"
    optimizer_class = resolve_optimizer_class(type_name)
    param_groups = _checked_param_groups(param_groups)
    lr = _checked_learning_rate(learning_rate)

    if _is_transformers_adafactor(optimizer_class):
        kwargs = _adafactor_arguments(kwargs)
        if kwargs["relative_step"]:
            _warn_ignored_group_lrs(param_groups)
            lr = None
    elif lr is None:
        raise MusubiError(f"--learning_rate is required for --optimizer_type {type_name}")
    if optimizer_class.__name__.lower().startswith(_SELF_TUNING_PREFIXES) and lr is not None and lr < _SELF_TUNING_LR_FLOOR:
        warnings.warn(
            f"{optimizer_class.__name__} estimates its own step size and multiplies it by --learning_rate, "
            f"which should be about 1.0; {lr:g} shrinks every step by that factor",
            stacklevel=2,
        )

    _check_argument_names(optimizer_class, kwargs)
    try:
        optimizer = optimizer_class(param_groups, lr=lr, **kwargs)
    except (TypeError, ValueError) as error:
        raise MusubiError(f"--optimizer_type {type_name} rejected its settings ({_class_path(optimizer_class)}): {error}") from error
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise MusubiError(f"--optimizer_type {type_name}: {_class_path(optimizer_class)} is not a torch.optim.Optimizer")
    if lr is None:
        # Relative-step Adafactor ignores the group lr; keep the given rate there for logging.
        for group in optimizer.param_groups:
            if group.get("lr") is None:
                group["lr"] = learning_rate
    description = _class_path(optimizer_class) + (f"({format_key_value_args(kwargs)})" if kwargs else "")
    return optimizer, description


def resolve_optimizer_class(optimizer_type: str) -> type:
    """The class behind an ``--optimizer_type`` value (built-in name, torch.optim name or dotted path)."""
    type_name = optimizer_type.strip()
    lowered = type_name.lower()
    if lowered == "adamw":
        return torch.optim.AdamW
    if lowered == "adafactor":
        return _import_module("transformers.optimization", type_name).Adafactor
    if lowered == "prodigy":
        return _import_module("prodigyopt", type_name).Prodigy
    if "." in type_name:
        return _class_from_dotted_path(type_name)
    if lowered.endswith("8bit"):
        return _find_class(_import_module("bitsandbytes", type_name).optim, type_name, "bitsandbytes.optim")
    if lowered.endswith("schedulefree"):
        return _find_class(_import_module("schedulefree", type_name), type_name, "schedulefree")
    return _find_class(torch.optim, type_name, "torch.optim")


def is_schedule_free(optimizer_or_type: torch.optim.Optimizer | str | None) -> bool:
    """True for schedule-free optimizers, which need no lr scheduler but train/eval switching."""
    if optimizer_or_type is None or isinstance(optimizer_or_type, str):
        return (optimizer_or_type or "").strip().lower().endswith("schedulefree")
    optimizer_class = type(optimizer_or_type)
    return optimizer_class.__name__.lower().endswith("schedulefree") or optimizer_class.__module__.split(".")[0] == "schedulefree"


def requires_adafactor_scheduler(optimizer: torch.optim.Optimizer) -> bool:
    """True when the optimizer is Adafactor with ``relative_step``: it sets its own learning rate,
    so the only fitting scheduler is the ``adafactor`` proxy that reports it."""
    return _is_transformers_adafactor(type(optimizer)) and any(group.get("relative_step") for group in optimizer.param_groups)


def set_train_mode(optimizer: torch.optim.Optimizer) -> None:
    """Switch a schedule-free optimizer to its training weights (no-op for the others)."""
    train = getattr(optimizer, "train", None)
    if callable(train):
        train()


def set_eval_mode(optimizer: torch.optim.Optimizer) -> None:
    """Switch a schedule-free optimizer to its averaged weights (no-op for the others)."""
    evaluate = getattr(optimizer, "eval", None)
    if callable(evaluate):
        evaluate()


@contextlib.contextmanager
def eval_mode(optimizer: torch.optim.Optimizer) -> Iterator[torch.optim.Optimizer]:
    """Averaged weights inside the block (for sampling and saving), the previous mode after it."""
    was_training = _in_train_mode(optimizer)
    set_eval_mode(optimizer)
    try:
        yield optimizer
    finally:
        if was_training:
            set_train_mode(optimizer)


def group_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rate of each param group, keyed by the group's name, for logging.

    Optimizers that adapt a step size ``d`` (Prodigy, D-Adaptation) report ``d * lr``, the rate
    actually applied.
    """
    rates: dict[str, float] = {}
    for index, group in enumerate(optimizer.param_groups):
        name = str(group.get("name") or f"group{index}")
        if name in rates:
            name = f"{name} ({index})"
        lr = group.get("lr")
        lr = float(lr) if lr is not None else float("nan")
        if group.get("d") is not None:
            lr *= float(group["d"])
        rates[name] = lr
    return rates


def _checked_param_groups(param_groups: Iterable[Any]) -> list[Any]:
    groups = list(param_groups)
    if not groups:
        raise MusubiError("there are no trainable parameters to optimize; check the network settings")
    return groups


def _checked_learning_rate(learning_rate: Any) -> float | None:
    if learning_rate is None:
        return None
    try:
        lr = float(learning_rate)
    except (TypeError, ValueError):
        raise MusubiError(f"--learning_rate must be a number, got {learning_rate!r}") from None
    if not lr >= 0.0 or lr == float("inf"):
        raise MusubiError(f"--learning_rate must be a finite number ≥ 0, got {learning_rate!r}")
    return lr


def _adafactor_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """musubi's Adafactor defaults: relative_step on unless disabled, and forced on by warmup_init."""
    kwargs = dict(kwargs)
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        warnings.warn("Adafactor: warmup_init=True needs relative_step; relative_step is set to True", stacklevel=3)
        kwargs["relative_step"] = True
    return kwargs


def _warn_ignored_group_lrs(param_groups: list[Any]) -> None:
    group_lrs = {group.get("lr") for group in param_groups if isinstance(group, dict) and group.get("lr") is not None}
    if len(group_lrs) > 1:
        warnings.warn(
            "Adafactor with relative_step ignores per-group learning rates, so a LoRA+ ratio has no effect; "
            "set relative_step=False in --optimizer_args to keep it",
            stacklevel=3,
        )


def _check_argument_names(optimizer_class: type, kwargs: Mapping[str, Any]) -> None:
    """Name the offending argument instead of letting a bare TypeError escape."""
    try:
        parameters = inspect.signature(optimizer_class).parameters
    except (TypeError, ValueError):
        return
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return
    accepted = [name for name in parameters if name not in ("self", "params", "lr")]
    for name in kwargs:
        if name not in parameters:
            raise MusubiError(
                f"--optimizer_args: '{name}' is not an argument of {_class_path(optimizer_class)}; "
                f"it accepts: {', '.join(accepted) or 'nothing besides lr'}"
            )


def _import_module(module_name: str, type_name: str):
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        hint = _OPTIONAL_PACKAGES.get(module_name, f"install the package that provides {module_name}")
        raise MusubiError(f"--optimizer_type {type_name} needs the module {module_name}, which cannot be imported ({error}): {hint}") from error


def _class_from_dotted_path(type_name: str) -> type:
    module_name, _, class_name = type_name.rpartition(".")
    if not module_name or not class_name:
        raise MusubiError(f"--optimizer_type {type_name!r}: a dotted path must look like package.module.Class")
    module = _import_module(module_name, type_name)
    optimizer_class = getattr(module, class_name, None)
    if not isinstance(optimizer_class, type):
        raise MusubiError(f"--optimizer_type {type_name}: module {module_name} has no class {class_name} (the name is case-sensitive)")
    return optimizer_class


def _find_class(module: Any, type_name: str, module_label: str) -> type:
    """Exact name first, then a unique case-insensitive match."""
    candidates = {name: value for name, value in vars(module).items() if isinstance(value, type) and issubclass(value, torch.optim.Optimizer)}
    if type_name in candidates:
        return candidates[type_name]
    matches = [value for name, value in candidates.items() if name.lower() == type_name.lower()]
    if len(matches) == 1:
        return matches[0]
    available = ", ".join(sorted(name for name in candidates if name != "Optimizer"))
    raise MusubiError(
        f"unknown --optimizer_type {type_name!r}. Built-in choices: {', '.join(BUILTIN_OPTIMIZERS)}; "
        f"{module_label} also has: {available}; any other class by its dotted path (package.module.Class)"
    )


def _is_transformers_adafactor(optimizer_class: type) -> bool:
    return optimizer_class.__name__ == "Adafactor" and optimizer_class.__module__.split(".")[0] == "transformers"


def _in_train_mode(optimizer: torch.optim.Optimizer) -> bool:
    groups = optimizer.param_groups
    if groups and "train_mode" in groups[0]:
        return bool(groups[0]["train_mode"])
    return True


def _class_path(optimizer_class: type) -> str:
    return f"{optimizer_class.__module__}.{optimizer_class.__name__}"
