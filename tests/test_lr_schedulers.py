"""Learning-rate schedulers: every curve against its closed form, for two LoRA+ groups (lr and 10·lr)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from musubi.errors import MusubiError
from musubi.training.schedulers import (
    SCHEDULER_NAMES,
    AdafactorRelativeStepLR,
    ScheduleFreeLR,
    build_lr_scheduler,
    build_lr_scheduler_from_class,
    parse_step_count,
)

torch.set_num_threads(1)

BASE_LR = 1e-4
PLUS_RATIO = 10.0
N, W = 20, 5


def lora_plus_optimizer(base_lr: float = BASE_LR) -> torch.optim.Optimizer:
    """SGD over two groups, as a LoRA+ network hands them over: lr and 10·lr."""
    down = torch.nn.Parameter(torch.zeros(2))
    up = torch.nn.Parameter(torch.zeros(2))
    groups = [
        {"params": [down], "lr": base_lr, "name": "unet"},
        {"params": [up], "lr": base_lr * PLUS_RATIO, "name": "unet plus"},
    ]
    return torch.optim.SGD(groups, lr=base_lr)


def flat(rows: list[list[float]]) -> list[float]:
    return [value for row in rows for value in row]


def group_lrs_per_step(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[list[float]]:
    """The lr of each group while optimizer step k runs, for k = 0 .. steps-1."""
    seen = []
    for _ in range(steps):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()  # no gradients: nothing moves, but the step is counted
        scheduler.step()
    return seen


def assert_factor_curve(name: str, expected_factor, steps: int = N + 3, **options) -> None:
    """Each group's lr at step k must be its own initial lr times expected_factor(k)."""
    optimizer = lora_plus_optimizer()
    scheduler = build_lr_scheduler(name, optimizer, **options)
    for step, (down_lr, up_lr) in enumerate(group_lrs_per_step(optimizer, scheduler, steps)):
        factor = expected_factor(step)
        assert down_lr == pytest.approx(BASE_LR * factor, rel=1e-9, abs=1e-18), (name, step)
        assert up_lr == pytest.approx(BASE_LR * PLUS_RATIO * factor, rel=1e-9, abs=1e-18), (name, step)


# Closed forms of the transformers/diffusers definitions, written out for N = 20, W = 5.


def warmup_factor(k: int) -> float:
    return k / 5


def constant_with_warmup(k: int) -> float:
    return warmup_factor(k) if k < 5 else 1.0


def linear(k: int) -> float:
    return warmup_factor(k) if k < 5 else max(0.0, (20 - k) / 15)


def cosine(k: int) -> float:
    return warmup_factor(k) if k < 5 else 0.5 * (1 + math.cos(math.pi * (k - 5) / 15))


def cosine_two_restarts(k: int) -> float:
    if k < 5:
        return warmup_factor(k)
    progress = (k - 5) / 15
    if progress >= 1:
        return 0.0
    return 0.5 * (1 + math.cos(math.pi * ((2 * progress) % 1)))


def polynomial_squared_to_one_percent(k: int) -> float:
    # lr_end = 1e-6 = 1 % of the base lr 1e-4; power 2.
    if k < 5:
        return warmup_factor(k)
    if k > 20:
        return 0.01
    return 0.99 * (1 - (k - 5) / 15) ** 2 + 0.01


def inverse_sqrt(k: int) -> float:
    # The timescale defaults to the warmup: 1 / sqrt(k / 5) after it.
    return warmup_factor(k) if k < 5 else math.sqrt(5 / k)


def cosine_to_ten_percent(k: int) -> float:
    if k < 5:
        return warmup_factor(k)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - 5) / 15))


def warmup_stable_decay(k: int) -> float:
    # W = 5, D = 5, so 10 stable steps; min ratio 0.1; linear warmup from 0.1, cosine decay to 0.1.
    if k < 5:
        return 0.1 + 0.9 * k / 5
    if k < 15:
        return 1.0
    if k < 20:
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - 15) / 5))
    return 0.1


def rex(k: int, warmup: int = 5, total: int = 20, low: float = 0.01, alpha: float = 0.1, beta: float = 0.9) -> float:
    if k < warmup:
        return low + (1 - low) * k / warmup
    if k >= total:
        return low
    z = (total - k) / (total - warmup)
    return low + (1 - low) * z / (alpha + beta * z)


def piecewise(k: int) -> float:
    return 1.0 if k < 3 else 0.5 if k < 8 else 0.1


CURVES = {
    "constant": (lambda k: 1.0, dict(total_steps=N)),
    "constant_with_warmup": (constant_with_warmup, dict(total_steps=N, warmup_steps=W)),
    "linear": (linear, dict(total_steps=N, warmup_steps=W)),
    "cosine": (cosine, dict(total_steps=N, warmup_steps=W)),
    "cosine_with_restarts": (cosine_two_restarts, dict(total_steps=N, warmup_steps=W, num_cycles=2)),
    "polynomial": (polynomial_squared_to_one_percent, dict(total_steps=N, warmup_steps=W, power=2.0, scheduler_args=["lr_end=1e-6"])),
    "inverse_sqrt": (inverse_sqrt, dict(total_steps=N, warmup_steps=W)),
    "cosine_with_min_lr": (cosine_to_ten_percent, dict(total_steps=N, warmup_steps=W, min_lr_ratio=0.1)),
    "warmup_stable_decay": (warmup_stable_decay, dict(total_steps=N, warmup_steps=W, decay_steps=5, min_lr_ratio=0.1)),
    "rex": (rex, dict(total_steps=N, warmup_steps=W)),
    "piecewise_constant": (piecewise, dict(total_steps=N, scheduler_args=["step_rules='1:3,0.5:8,0.1'"])),
}


def test_every_name_has_a_curve_test():
    assert set(CURVES) | {"adafactor"} == set(SCHEDULER_NAMES)


@pytest.mark.parametrize("name", sorted(CURVES))
def test_curve_matches_closed_form_and_keeps_lora_plus_ratio(name):
    expected, options = CURVES[name]
    assert_factor_curve(name, expected, **options)


def test_names_are_case_insensitive_and_none_means_constant():
    assert_factor_curve("Cosine", cosine, total_steps=N, warmup_steps=W)
    assert_factor_curve(None, lambda k: 1.0, total_steps=N)


def test_warmup_given_as_ratio_and_percentage():
    assert_factor_curve("linear", linear, total_steps=N, warmup_steps=0.25)
    assert_factor_curve("linear", linear, total_steps=N, warmup_steps="25%")


def test_cosine_num_cycles_counts_half_waves():
    # num_cycles 2 (musubi's option) = one full wave: down to 0 at the middle and back up to 1.
    def full_wave(k):
        return 0.5 * (1 + math.cos(2 * math.pi * k / 20))

    assert_factor_curve("cosine", full_wave, total_steps=N, num_cycles=2)


def test_inverse_sqrt_timescale():
    assert_factor_curve("inverse_sqrt", lambda k: 1 / math.sqrt((k + 10) / 10), total_steps=N, timescale=10)


def test_warmup_stable_decay_shapes():
    def curve(k):
        if k < 4:
            return 0.5 * (1 - math.cos(math.pi * k / 4))
        if k < 12:
            return 1.0
        if k < 20:
            return 1 - math.sqrt((k - 12) / 8)
        return 0.0

    options = dict(total_steps=N, warmup_steps=4, decay_steps=8, scheduler_args={"warmup_type": "cosine", "decay_type": "1-sqrt"})
    assert_factor_curve("warmup_stable_decay", curve, **options)


@pytest.mark.filterwarnings("ignore:Both num_training_steps")
def test_schedules_agree_with_transformers_as_musubi_calls_them():
    transformers = pytest.importorskip("transformers")
    calls = {
        "linear": ({}, {}),
        "cosine": ({}, {}),
        "cosine_with_restarts": (dict(num_cycles=3), dict(scheduler_specific_kwargs={"num_cycles": 3})),
        "polynomial": (dict(power=0.5), dict(scheduler_specific_kwargs={"power": 0.5})),
        "cosine_with_min_lr": (dict(min_lr_ratio=0.2, num_cycles=1), dict(scheduler_specific_kwargs={"num_cycles": 0.5, "min_lr_rate": 0.2})),
        "warmup_stable_decay": (
            dict(decay_steps=6, min_lr_ratio=0.05),
            dict(scheduler_specific_kwargs={"num_decay_steps": 6, "num_stable_steps": 9, "num_cycles": 0.5, "min_lr_ratio": 0.05}),
        ),
    }
    for name, (ours, theirs) in calls.items():
        our_optimizer = lora_plus_optimizer()
        our_lrs = group_lrs_per_step(our_optimizer, build_lr_scheduler(name, our_optimizer, N, warmup_steps=W, **ours), N + 2)
        their_optimizer = lora_plus_optimizer()
        their_scheduler = transformers.get_scheduler(name, their_optimizer, num_warmup_steps=W, num_training_steps=N, **theirs)
        their_lrs = group_lrs_per_step(their_optimizer, their_scheduler, N + 2)
        assert flat(our_lrs) == pytest.approx(flat(their_lrs), rel=1e-12, abs=1e-20), name


# Rex


def test_rex_has_no_first_step_spike():
    # N = 100, W = 10: musubi starts at 0.56 · lr, drops to the minimum, then warms up.
    optimizer = lora_plus_optimizer()
    scheduler = build_lr_scheduler("rex", optimizer, 100, warmup_steps=10)
    down = [lrs[0] for lrs in group_lrs_per_step(optimizer, scheduler, 101)]
    assert down[0] == pytest.approx(0.01 * BASE_LR)
    assert all(later > earlier for earlier, later in zip(down[:11], down[1:11]))
    assert max(down) == pytest.approx(BASE_LR)
    assert down.index(max(down)) == 10
    assert all(later <= earlier for earlier, later in zip(down[10:], down[11:]))
    assert down[100] == pytest.approx(0.01 * BASE_LR)


def test_rex_without_warmup_starts_at_the_full_lr():
    assert_factor_curve("rex", lambda k: rex(k, warmup=0), total_steps=N)


def test_rex_warmup_of_one_step():
    assert_factor_curve("rex", lambda k: rex(k, warmup=1), total_steps=N, warmup_steps=1)


def test_rex_settings():
    expected = lambda k: rex(k, low=0.2, alpha=0.5, beta=0.5)  # noqa: E731
    assert_factor_curve("rex", expected, total_steps=N, warmup_steps=W, min_lr_ratio=0.2, scheduler_args="rex_alpha=0.5 rex_beta=0.5")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(min_lr_ratio=1.5), "between 0 and 1"),
        (dict(warmup_steps=21), "more than the 20 training steps"),
        (dict(scheduler_args=["rex_alpha=-0.1"]), "rex_alpha"),
    ],
)
def test_rex_errors(options, message):
    with pytest.raises(MusubiError, match=message):
        build_lr_scheduler("rex", lora_plus_optimizer(), N, **options)


# Errors


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("constant", dict(warmup_steps=3), "constant_with_warmup"),
        ("cosine_with_min_lr", {}, "lr_scheduler_min_lr_ratio"),
        ("warmup_stable_decay", dict(warmup_steps=12, decay_steps=10), "exceed the 20"),
        ("warmup_stable_decay", dict(scheduler_args=["decay_type=square"]), "decay_type"),
        ("polynomial", dict(scheduler_args=["lr_end=1e-3"]), "lr_end"),
        ("cosine", dict(scheduler_args=["lr_end=1e-3"]), "cosine does not take 'lr_end'"),
        ("cosine", dict(scheduler_args=["num_cycles=2"]), "--lr_scheduler_num_cycles"),
        ("piecewise_constant", {}, "step_rules"),
        ("piecewise_constant", dict(scheduler_args=["step_rules='1:ten,0.1'"]), "malformed"),
        ("adafactor", {}, "Adafactor"),
        ("reduce_lr_on_plateau", {}, "rex"),
        ("linear", dict(warmup_steps=1.5), "ratio below 1"),
    ],
)
def test_scheduler_errors(name, options, message):
    with pytest.raises(MusubiError, match=message):
        build_lr_scheduler(name, lora_plus_optimizer(), N, **options)


@pytest.mark.parametrize("total", [0, -3, 2.5, None])
def test_total_steps_must_be_a_positive_int(total):
    with pytest.raises(MusubiError, match="training steps"):
        build_lr_scheduler("linear", lora_plus_optimizer(), total)


# parse_step_count


@pytest.mark.parametrize(
    "value, total, expected",
    [
        (None, 20, 0),
        (0, 20, 0),
        (0.0, 20, 0),
        (5, 20, 5),
        (20, 20, 20),
        (0.25, 20, 5),
        (0.1, 25, 2),
        (0.29, 100, 29),
        (150.0, 200, 150),
        ("10%", 20, 2),
        ("25 %", 20, 5),
        ("100%", 20, 20),
        ("7", 20, 7),
        ("0.5", 20, 10),
        (" 3 ", 20, 3),
    ],
)
def test_parse_step_count(value, total, expected):
    assert parse_step_count(value, total, "lr_warmup_steps") == expected


@pytest.mark.parametrize(
    "value, message",
    [
        (1.5, "use a count like 150, or a ratio below 1 like 0.1"),
        ("1.5", "ratio below 1"),
        (21, "more than the 20 training steps"),
        ("21", "more than the 20"),
        (-1, "negative"),
        (-0.5, "negative"),
        ("150%", "between 0% and 100%"),
        ("abc", "not a step count"),
        ("x%", "percentage"),
        (True, "step count"),
        (float("nan"), "negative"),
        ([3], "number"),
    ],
)
def test_parse_step_count_errors(value, message):
    with pytest.raises(MusubiError, match="lr_warmup_steps") as caught:
        parse_step_count(value, 20, "lr_warmup_steps")
    assert message in str(caught.value)


# Schedule-free and Adafactor stand-ins


def test_schedule_free_gets_a_scheduler_that_changes_nothing():
    schedulefree = pytest.importorskip("schedulefree")
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = schedulefree.AdamWScheduleFree([{"params": [parameter], "lr": 0.02}], lr=0.02)
    optimizer.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler = build_lr_scheduler("constant", optimizer, N)
    assert isinstance(scheduler, ScheduleFreeLR)
    for _ in range(3):
        parameter.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
        assert scheduler.get_last_lr() == [0.02]
        assert optimizer.param_groups[0]["lr"] == 0.02
    optimizer.param_groups[0]["lr"] = 0.5
    assert scheduler.get_last_lr() == [0.5]


def test_schedule_free_warns_that_a_schedule_is_ignored():
    schedulefree = pytest.importorskip("schedulefree")
    optimizer = schedulefree.SGDScheduleFree([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.warns(UserWarning, match="warmup_steps=N"):
        scheduler = build_lr_scheduler("cosine", optimizer, N, warmup_steps=W)
    assert isinstance(scheduler, ScheduleFreeLR)


def test_adafactor_relative_step_proxy_reports_adafactors_own_lr():
    transformers_optimization = pytest.importorskip("transformers.optimization")
    parameter = torch.nn.Parameter(torch.full((4,), 2.0))
    optimizer = transformers_optimization.Adafactor([{"params": [parameter], "lr": 3e-4}], lr=None, relative_step=True)
    scheduler = build_lr_scheduler("adafactor", optimizer, N)
    assert isinstance(scheduler, AdafactorRelativeStepLR)
    assert scheduler.get_last_lr() == [3e-4]  # before the first step: the given rate
    parameter.grad = torch.ones(4)
    optimizer.step()
    scheduler.step()
    # Adafactor's relative step at step 1: min(1e-2, 1/sqrt(1)) scaled by the parameter RMS (2.0).
    assert scheduler.get_last_lr()[0] == pytest.approx(0.02, rel=1e-6)


def test_adafactor_relative_step_replaces_other_schedulers_with_a_warning():
    transformers_optimization = pytest.importorskip("transformers.optimization")
    optimizer = transformers_optimization.Adafactor([torch.nn.Parameter(torch.ones(2))], lr=None)
    with pytest.warns(UserWarning, match="replaced by the adafactor scheduler"):
        scheduler = build_lr_scheduler("cosine", optimizer, N)
    assert isinstance(scheduler, AdafactorRelativeStepLR)


# Custom classes and resuming


def test_scheduler_class_by_bare_and_dotted_name():
    optimizer = lora_plus_optimizer()
    scheduler = build_lr_scheduler_from_class("StepLR", optimizer, ["step_size=2", "gamma=0.5"])
    seen = group_lrs_per_step(optimizer, scheduler, 5)
    assert [lrs[0] for lrs in seen] == pytest.approx([BASE_LR * 0.5 ** (k // 2) for k in range(5)])
    optimizer = lora_plus_optimizer()
    scheduler = build_lr_scheduler_from_class("torch.optim.lr_scheduler.ExponentialLR", optimizer, {"gamma": 0.5})
    seen = group_lrs_per_step(optimizer, scheduler, 3)
    assert [lrs[1] for lrs in seen] == pytest.approx([BASE_LR * PLUS_RATIO * 0.5**k for k in range(3)])


@pytest.mark.parametrize(
    "type_name, args, message",
    [("NoSuchLR", None, "no class NoSuchLR"), ("no_such_module.LR", None, "cannot import"), ("StepLR", ["size=2"], "rejected")],
)
def test_scheduler_class_errors(type_name, args, message):
    with pytest.raises(MusubiError, match=message):
        build_lr_scheduler_from_class(type_name, lora_plus_optimizer(), args)


def test_resumed_scheduler_continues_the_same_curve():
    optimizer = lora_plus_optimizer()
    scheduler = build_lr_scheduler("rex", optimizer, N, warmup_steps=W, min_lr_ratio=0.05)
    group_lrs_per_step(optimizer, scheduler, 8)
    saved = scheduler.state_dict()

    resumed_optimizer = lora_plus_optimizer()
    resumed = build_lr_scheduler("rex", resumed_optimizer, N, warmup_steps=W, min_lr_ratio=0.05)
    resumed.load_state_dict(saved)
    for group, lr in zip(resumed_optimizer.param_groups, resumed.get_last_lr()):
        group["lr"] = lr
    after = group_lrs_per_step(resumed_optimizer, resumed, 4)
    expected = [[BASE_LR * rex(k, low=0.05), BASE_LR * PLUS_RATIO * rex(k, low=0.05)] for k in range(8, 12)]
    assert flat(after) == pytest.approx(flat(expected), rel=1e-9)
