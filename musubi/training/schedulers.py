"""Learning-rate schedules, musubi-tuner style (``--lr_scheduler`` and its options).

Every schedule multiplies each param group's *own* initial learning rate by one factor that depends
only on the step count k (the number of scheduler steps taken so far; k = 0 during the first
optimizer step). So LoRA+ groups keep their lr ratio at every step, warmup included. The factors
follow the transformers/diffusers definitions of the same names, with N the total number of steps
and W the warmup steps; warmups rise linearly from 0 at k = 0 to 1 at k = W.

Rex (Chen et al., "REX: Revisiting Budgeted Training with an Improved Schedule") keeps
musubi-tuner's curve after the warmup but warms up linearly from the minimum lr, starting at k = 0.

Schedule-free optimizers get a scheduler that changes nothing, and Adafactor with ``relative_step``
a proxy that reports the rate Adafactor computes itself.
"""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from ..errors import MusubiError
from ..key_value_args import parse_key_value_args
from .optimizers import is_schedule_free, requires_adafactor_scheduler

SCHEDULER_NAMES = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "rex",
    "piecewise_constant",
    "adafactor",
)

# Extra settings each schedule takes through --lr_scheduler_args, with their defaults.
_SCHEDULER_ARGS: dict[str, dict[str, Any]] = {
    "polynomial": {"lr_end": 1e-7},
    "cosine_with_min_lr": {"min_lr": None},
    "warmup_stable_decay": {"warmup_type": "linear", "decay_type": "cosine"},
    "rex": {"rex_alpha": 0.1, "rex_beta": 0.9},
    "piecewise_constant": {"step_rules": None},
}

# Settings that have their own option; naming them in --lr_scheduler_args is a mistake to explain.
_DEDICATED_OPTIONS = {
    "num_warmup_steps": "--lr_warmup_steps",
    "num_training_steps": "--max_train_steps",
    "num_decay_steps": "--lr_decay_steps",
    "num_cycles": "--lr_scheduler_num_cycles",
    "power": "--lr_scheduler_power",
    "timescale": "--lr_scheduler_timescale",
    "min_lr_ratio": "--lr_scheduler_min_lr_ratio",
    "min_lr_rate": "--lr_scheduler_min_lr_ratio",
}

_WSD_SHAPES = ("linear", "cosine", "1-sqrt")
_REX_DEFAULT_MIN_LR_RATIO = 0.01


def parse_step_count(value: Any, total_steps: int, option_name: str) -> int:
    """A step count given as an int, a ratio of the total in [0, 1), or a percentage ``"10%"``.

    A non-integral number ≥ 1 (``1.5``) is rejected: musubi-tuner silently reads it as 150 %.
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        raise MusubiError(f"--{option_name} must be a step count, a ratio below 1 or a percentage, got {value!r}")
    if isinstance(value, str):
        return _parse_step_text(value.strip(), total_steps, option_name)
    if isinstance(value, int):
        return _checked_count(value, total_steps, option_name)
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise MusubiError(f"--{option_name} must not be negative, got {value!r}")
        if value < 1.0:
            return _ratio_of(value, total_steps)
        if value.is_integer():
            return _checked_count(int(value), total_steps, option_name)
        raise MusubiError(
            f"--{option_name} {value!r} is ambiguous: use a count like {round(value * 100)}, or a ratio below 1 like 0.1"
        )
    raise MusubiError(f"--{option_name} must be a number or a percentage like '10%', got {value!r}")


def build_lr_scheduler(
    name: str | None,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: Any = 0,
    decay_steps: Any = 0,
    num_cycles: float = 1,
    power: float = 1.0,
    min_lr_ratio: float | None = None,
    scheduler_args: Iterable[str] | Mapping[str, Any] | str | None = None,
    timescale: int | None = None,
) -> LRScheduler:
    """The scheduler for ``--lr_scheduler name``; step it once per optimizer step.

    ``total_steps`` is N; ``warmup_steps``/``decay_steps`` take anything ``parse_step_count`` takes.
    ``num_cycles`` is musubi's ``--lr_scheduler_num_cycles``: the number of hard restarts for
    ``cosine_with_restarts``; for the other cosine curves, half of it is the number of cosine waves
    (1 = one half-wave down to the minimum).
    """
    key = (name or "constant").strip().lower()
    if key not in SCHEDULER_NAMES:
        raise MusubiError(f"unknown --lr_scheduler {name!r}; choose one of: {', '.join(SCHEDULER_NAMES)}")
    args = parse_key_value_args(scheduler_args, "lr_scheduler_args")

    if is_schedule_free(optimizer):
        if key != "constant" or warmup_steps:
            warnings.warn(
                f"{type(optimizer).__name__} schedules itself: --lr_scheduler {key} and its warmup are ignored "
                "(give it a warmup with --optimizer_args warmup_steps=N)",
                stacklevel=2,
            )
        return ScheduleFreeLR(optimizer)
    if requires_adafactor_scheduler(optimizer):
        if key not in ("adafactor", "constant") or warmup_steps:
            warnings.warn(
                f"Adafactor with relative_step sets its own learning rate: --lr_scheduler {key} and its warmup "
                "are replaced by the adafactor scheduler (set relative_step=False in --optimizer_args to schedule it)",
                stacklevel=2,
            )
        return AdafactorRelativeStepLR(optimizer)
    if key == "adafactor":
        raise MusubiError("--lr_scheduler adafactor only works with --optimizer_type Adafactor and relative_step=True")

    total = _checked_total_steps(total_steps)
    warmup = parse_step_count(warmup_steps, total, "lr_warmup_steps")
    decay = parse_step_count(decay_steps, total, "lr_decay_steps")
    settings = _scheduler_settings(key, args)
    factor = _make_factor(key, optimizer, total, warmup, decay, float(num_cycles), float(power), min_lr_ratio, timescale, settings)
    return LambdaLR(optimizer, factor)


def build_lr_scheduler_from_class(
    scheduler_type: str, optimizer: torch.optim.Optimizer, scheduler_args: Iterable[str] | Mapping[str, Any] | str | None = None
) -> Any:
    """musubi's ``--lr_scheduler_type``: any scheduler class, built with only ``--lr_scheduler_args``.

    A bare name is looked up in ``torch.optim.lr_scheduler``, a dotted path is imported. Such a
    class decides for itself how it treats the groups' own learning rates.
    """
    args = parse_key_value_args(scheduler_args, "lr_scheduler_args")
    type_name = scheduler_type.strip()
    module_name, _, class_name = type_name.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim.lr_scheduler
    except ImportError as error:
        raise MusubiError(f"--lr_scheduler_type {type_name}: cannot import {module_name} ({error})") from error
    scheduler_class = getattr(module, class_name, None)
    if not isinstance(scheduler_class, type):
        where = module_name or "torch.optim.lr_scheduler"
        raise MusubiError(f"--lr_scheduler_type {type_name}: {where} has no class {class_name} (the name is case-sensitive)")
    try:
        return scheduler_class(optimizer, **args)
    except (TypeError, ValueError) as error:
        raise MusubiError(f"--lr_scheduler_type {type_name} rejected --lr_scheduler_args {args}: {error}") from error


class ScheduleFreeLR(LRScheduler):
    """A scheduler that leaves the lr alone: schedule-free optimizers need none, but a training
    loop still steps and logs one. Its last lr is always the groups' current lr."""

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self.get_lr()


class AdafactorRelativeStepLR(LRScheduler):
    """Reports the learning rate that Adafactor with ``relative_step`` computes for itself.

    Before a group has taken a step its initial lr (the given learning rate) is reported.
    """

    def get_lr(self) -> list[float]:
        optimizer = self.optimizer
        rates = []
        for group, base_lr in zip(optimizer.param_groups, self.base_lrs):
            state = optimizer.state.get(group["params"][0], {}) if group["params"] else {}
            rates.append(float(optimizer._get_lr(group, state)) if "step" in state else base_lr)
        return rates


def _parse_step_text(text: str, total_steps: int, option_name: str) -> int:
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise MusubiError(f"--{option_name} {text!r} is not a percentage like '10%'") from None
        if not 0.0 <= percent <= 100.0:
            raise MusubiError(f"--{option_name} {text!r} must be between 0% and 100%")
        return _ratio_of(percent / 100.0, total_steps)
    if text.lstrip("+-").isdigit():
        return _checked_count(int(text), total_steps, option_name)
    try:
        number = float(text)
    except ValueError:
        raise MusubiError(f"--{option_name} {text!r} is not a step count, a ratio or a percentage like '10%'") from None
    return parse_step_count(number, total_steps, option_name)


def _ratio_of(ratio: float, total_steps: int) -> int:
    # The small tolerance keeps 0.29 of 100 at 29 steps despite binary rounding.
    return int(math.floor(ratio * total_steps + 1e-9))


def _checked_count(count: int, total_steps: int, option_name: str) -> int:
    if count < 0:
        raise MusubiError(f"--{option_name} must not be negative, got {count}")
    if count > total_steps:
        raise MusubiError(f"--{option_name} {count} is more than the {total_steps} training steps; lower it or train longer")
    return count


def _checked_total_steps(total_steps: Any) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise MusubiError(f"the number of training steps must be a positive integer, got {total_steps!r}")
    return total_steps


def _scheduler_settings(key: str, args: Mapping[str, Any]) -> dict[str, Any]:
    accepted = _SCHEDULER_ARGS.get(key, {})
    for arg_name in args:
        if arg_name in accepted:
            continue
        if arg_name in _DEDICATED_OPTIONS:
            raise MusubiError(f"--lr_scheduler_args {arg_name}=...: set it with {_DEDICATED_OPTIONS[arg_name]} instead")
        takes = f"it takes: {', '.join(accepted)}" if accepted else "it takes none"
        raise MusubiError(f"--lr_scheduler_args: {key} does not take '{arg_name}'; {takes}")
    return {**accepted, **args}


def _make_factor(
    key: str,
    optimizer: torch.optim.Optimizer,
    total: int,
    warmup: int,
    decay: int,
    num_cycles: float,
    power: float,
    min_lr_ratio: float | None,
    timescale: int | None,
    settings: dict[str, Any],
) -> Callable[[int], float]:
    if key == "constant":
        if warmup:
            raise MusubiError("--lr_scheduler constant has no warmup; use constant_with_warmup, or set --lr_warmup_steps 0")
        return ConstantFactor()
    if key == "constant_with_warmup":
        return ConstantWithWarmupFactor(warmup)
    if key == "linear":
        return LinearFactor(warmup, total)
    if key == "cosine":
        return CosineFactor(warmup, total, waves=num_cycles / 2)
    if key == "cosine_with_restarts":
        return CosineWithRestartsFactor(warmup, total, restarts=num_cycles)
    if key == "polynomial":
        return _polynomial_factor(optimizer, warmup, total, power, settings["lr_end"])
    if key == "inverse_sqrt":
        return _inverse_sqrt_factor(warmup, timescale)
    if key == "cosine_with_min_lr":
        ratio = _cosine_min_lr_ratio(optimizer, min_lr_ratio, settings["min_lr"])
        return CosineFactor(warmup, total, waves=num_cycles / 2, min_ratio=ratio)
    if key == "warmup_stable_decay":
        return _warmup_stable_decay_factor(warmup, decay, total, num_cycles, min_lr_ratio, settings)
    if key == "rex":
        return _rex_factor(warmup, total, min_lr_ratio, settings)
    if warmup:
        raise MusubiError("--lr_scheduler piecewise_constant has no warmup; put it in step_rules, or set --lr_warmup_steps 0")
    return _piecewise_constant_factor(settings["step_rules"])


def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


@dataclass(frozen=True)
class ConstantFactor:
    def __call__(self, step: int) -> float:
        return 1.0


@dataclass(frozen=True)
class ConstantWithWarmupFactor:
    warmup: int

    def __call__(self, step: int) -> float:
        return _warmup(step, self.warmup) if step < self.warmup else 1.0


@dataclass(frozen=True)
class LinearFactor:
    """Warmup, then a straight line from 1 at k = W to 0 at k = N."""

    warmup: int
    total: int

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return _warmup(step, self.warmup)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


@dataclass(frozen=True)
class CosineFactor:
    """Warmup, then ``waves`` cosine waves from 1 down to ``min_ratio`` (half a wave by default)."""

    warmup: int
    total: int
    waves: float = 0.5
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return _warmup(step, self.warmup)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        cosine = 0.5 * (1.0 + math.cos(2.0 * math.pi * self.waves * progress))
        return max(0.0, self.min_ratio + (1.0 - self.min_ratio) * cosine)


@dataclass(frozen=True)
class CosineWithRestartsFactor:
    """Warmup, then ``restarts`` half-cosines from 1 to 0, each starting again at 1; 0 from k = N."""

    warmup: int
    total: int
    restarts: float = 1.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return _warmup(step, self.warmup)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((self.restarts * progress) % 1.0))))


@dataclass(frozen=True)
class PolynomialFactor:
    """Warmup, then ``(1 - end) * remaining**power + end``, ``end`` being lr_end over the initial lr."""

    warmup: int
    total: int
    power: float
    end_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return _warmup(step, self.warmup)
        if step > self.total:
            return self.end_ratio
        remaining = 1.0 - (step - self.warmup) / max(1, self.total - self.warmup)
        return (1.0 - self.end_ratio) * remaining**self.power + self.end_ratio


@dataclass(frozen=True)
class InverseSqrtFactor:
    """Warmup, then ``1 / sqrt((k - W + timescale) / timescale)``."""

    warmup: int
    timescale: int

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return _warmup(step, self.warmup)
        return 1.0 / math.sqrt((step - self.warmup + self.timescale) / self.timescale)


@dataclass(frozen=True)
class WarmupStableDecayFactor:
    """Warmup from ``min_ratio`` to 1 over W steps, 1 for S steps, decay to ``min_ratio`` over D steps."""

    warmup: int
    stable: int
    decay: int
    min_ratio: float
    waves: float
    warmup_shape: str
    decay_shape: str

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            progress = step / max(1, self.warmup)
            rise = {"linear": progress, "cosine": 0.5 * (1.0 - math.cos(math.pi * progress)), "1-sqrt": 1.0 - math.sqrt(1.0 - progress)}
            return max(0.0, self.min_ratio + (1.0 - self.min_ratio) * rise[self.warmup_shape])
        if step < self.warmup + self.stable:
            return 1.0
        if step < self.warmup + self.stable + self.decay:
            progress = (step - self.warmup - self.stable) / max(1, self.decay)
            fall = {
                "linear": 1.0 - progress,
                "cosine": 0.5 * (1.0 + math.cos(2.0 * math.pi * self.waves * progress)),
                "1-sqrt": 1.0 - math.sqrt(progress),
            }
            return max(0.0, self.min_ratio + (1.0 - self.min_ratio) * fall[self.decay_shape])
        return self.min_ratio


@dataclass(frozen=True)
class RexFactor:
    """Linear warmup from ``min_ratio`` to 1 over W steps, then the REX curve down to ``min_ratio``
    (reached at k = N and kept after)."""

    warmup: int
    total: int
    min_ratio: float
    alpha: float
    beta: float

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.min_ratio + (1.0 - self.min_ratio) * step / self.warmup
        remaining_steps = self.total - self.warmup
        if step >= self.total or remaining_steps <= 0:
            return self.min_ratio
        z = (self.total - step) / remaining_steps
        return self.min_ratio + (1.0 - self.min_ratio) * z / (self.alpha + self.beta * z)


@dataclass(frozen=True)
class PiecewiseConstantFactor:
    """diffusers' ``step_rules``: factor ``value_i`` while k < ``boundary_i``, then the last value."""

    boundaries: tuple[int, ...]
    values: tuple[float, ...]
    final_value: float

    def __call__(self, step: int) -> float:
        for boundary, value in zip(self.boundaries, self.values):
            if step < boundary:
                return value
        return self.final_value


def _polynomial_factor(optimizer: torch.optim.Optimizer, warmup: int, total: int, power: float, lr_end: Any) -> PolynomialFactor:
    # As in transformers, lr_end is an absolute lr for the optimizer's base learning rate; other groups
    # (LoRA+) end at the same fraction of their own lr.
    initial_lr = _reference_lr(optimizer)
    lr_end = _number(lr_end, "lr_end")
    if not initial_lr > lr_end >= 0:
        raise MusubiError(f"--lr_scheduler_args lr_end={lr_end:g} must be ≥ 0 and below the learning rate {initial_lr:g}")
    return PolynomialFactor(warmup, total, power, lr_end / initial_lr)


def _inverse_sqrt_factor(warmup: int, timescale: Any) -> InverseSqrtFactor:
    if timescale is None:
        timescale = warmup or 10_000
    if isinstance(timescale, bool) or not isinstance(timescale, (int, float)) or timescale <= 0:
        raise MusubiError(f"--lr_scheduler_timescale must be a positive number of steps, got {timescale!r}")
    return InverseSqrtFactor(warmup, timescale)


def _cosine_min_lr_ratio(optimizer: torch.optim.Optimizer, min_lr_ratio: float | None, min_lr: Any) -> float:
    if min_lr_ratio is not None and min_lr is not None:
        raise MusubiError("cosine_with_min_lr: give either --lr_scheduler_min_lr_ratio or --lr_scheduler_args min_lr=..., not both")
    if min_lr is not None:
        min_lr_ratio = _number(min_lr, "min_lr") / _reference_lr(optimizer)
    if min_lr_ratio is None:
        raise MusubiError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1) or --lr_scheduler_args min_lr=...")
    return _checked_min_ratio(min_lr_ratio, "cosine_with_min_lr")


def _warmup_stable_decay_factor(
    warmup: int, decay: int, total: int, num_cycles: float, min_lr_ratio: float | None, settings: Mapping[str, Any]
) -> WarmupStableDecayFactor:
    if warmup + decay > total:
        raise MusubiError(f"warmup_stable_decay: --lr_warmup_steps {warmup} + --lr_decay_steps {decay} exceed the {total} training steps")
    shapes = {}
    for arg_name in ("warmup_type", "decay_type"):
        shape = str(settings[arg_name]).strip().lower()
        if shape not in _WSD_SHAPES:
            raise MusubiError(f"--lr_scheduler_args {arg_name}={settings[arg_name]!r}: choose one of {', '.join(_WSD_SHAPES)}")
        shapes[arg_name] = shape
    ratio = _checked_min_ratio(0.0 if min_lr_ratio is None else min_lr_ratio, "warmup_stable_decay")
    return WarmupStableDecayFactor(
        warmup, total - warmup - decay, decay, ratio, num_cycles / 2, shapes["warmup_type"], shapes["decay_type"]
    )


def _rex_factor(warmup: int, total: int, min_lr_ratio: float | None, settings: Mapping[str, Any]) -> RexFactor:
    ratio = _checked_min_ratio(_REX_DEFAULT_MIN_LR_RATIO if min_lr_ratio is None else min_lr_ratio, "rex")
    alpha = _number(settings["rex_alpha"], "rex_alpha")
    beta = _number(settings["rex_beta"], "rex_beta")
    if alpha < 0 or alpha + beta <= 0:
        raise MusubiError(f"rex: need rex_alpha ≥ 0 and rex_alpha + rex_beta > 0 (got {alpha:g} and {beta:g}); the defaults are 0.1 and 0.9")
    return RexFactor(warmup, total, ratio, alpha, beta)


def _piecewise_constant_factor(step_rules: Any) -> PiecewiseConstantFactor:
    example = "e.g. --lr_scheduler_args step_rules='1:10,0.1:20,0.01' (factor 1 before step 10, 0.1 before 20, then 0.01)"
    if not isinstance(step_rules, str) or not step_rules.strip():
        raise MusubiError(f"--lr_scheduler piecewise_constant needs step_rules, {example}")
    *rules, last = [part.strip() for part in step_rules.split(",")]
    boundaries, values = [], []
    try:
        for rule in rules:
            value_text, boundary_text = rule.split(":")
            values.append(float(value_text))
            boundaries.append(int(boundary_text))
        final_value = float(last)
    except ValueError:
        raise MusubiError(f"--lr_scheduler_args step_rules={step_rules!r} is malformed, {example}") from None
    order = sorted(range(len(boundaries)), key=boundaries.__getitem__)
    return PiecewiseConstantFactor(tuple(boundaries[i] for i in order), tuple(values[i] for i in order), final_value)


def _reference_lr(optimizer: torch.optim.Optimizer) -> float:
    """The optimizer's base learning rate (the one LoRA+ ratios are relative to)."""
    lr = optimizer.defaults.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool):
        lr = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0].get("lr"))
    return float(lr)


def _checked_min_ratio(ratio: Any, scheduler: str) -> float:
    ratio = _number(ratio, "lr_scheduler_min_lr_ratio")
    if not 0.0 <= ratio <= 1.0:
        raise MusubiError(f"{scheduler}: --lr_scheduler_min_lr_ratio must be between 0 and 1 (the minimum lr over the learning rate), got {ratio:g}")
    return ratio


def _number(value: Any, option_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MusubiError(f"{option_name} must be a finite number, got {value!r}")
    return float(value)
