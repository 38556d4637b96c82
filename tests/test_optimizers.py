"""Optimizer choice and ``key=value`` options, checked against the optimizers' update rules."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

from musubi.errors import MusubiError
from musubi.key_value_args import format_key_value_args, parse_key_value_args
from musubi.training.optimizers import (
    BUILTIN_OPTIMIZERS,
    build_optimizer,
    eval_mode,
    group_learning_rates,
    is_schedule_free,
    requires_adafactor_scheduler,
    set_eval_mode,
    set_train_mode,
)

torch.set_num_threads(1)

LR = 1e-3


def lora_plus_groups(ratio: float = 10.0, lr: float = LR) -> list[dict]:
    """Two groups as a LoRA+ network hands them over, with distinct starting values."""
    down = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    up = torch.nn.Parameter(torch.tensor([0.5, 0.25, -1.0]))
    return [{"params": [down], "lr": lr, "name": "unet"}, {"params": [up], "lr": lr * ratio, "name": "unet plus"}]


def params_of(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def take_step(optimizer: torch.optim.Optimizer, gradients: list[torch.Tensor]) -> None:
    for parameter, gradient in zip(params_of(optimizer), gradients):
        parameter.grad = gradient.clone()
    optimizer.step()


GRADIENTS = [torch.tensor([0.5, -1.0, 2.0]), torch.tensor([-3.0, 0.1, 1.0])]


# key=value options


@pytest.mark.parametrize(
    "items, expected",
    [
        (["betas=0.9,0.99"], {"betas": (0.9, 0.99)}),
        (["betas=(0.9, 0.99)", "weight_decay=0.01"], {"betas": (0.9, 0.99), "weight_decay": 0.01}),
        (["eps=1e-8", "amsgrad=True", "foreach=None"], {"eps": 1e-8, "amsgrad": True, "foreach": None}),
        (["relative_step=false", "warmup_init=TRUE"], {"relative_step": False, "warmup_init": True}),
        (["decay_type=cosine", "warmup_type=1-sqrt"], {"decay_type": "cosine", "warmup_type": "1-sqrt"}),
        (["step_rules='1:10,0.1:20,0.01'"], {"step_rules": "1:10,0.1:20,0.01"}),
        (["step_rules=1:10,0.1"], {"step_rules": "1:10,0.1"}),
        (["expr=a=b"], {"expr": "a=b"}),
        (["pattern='.*attn=1.*'"], {"pattern": ".*attn=1.*"}),
        (["exclude=['a', 'b']", "n=3"], {"exclude": ["a", "b"], "n": 3}),
        ([" key = 5 "], {"key": 5}),
        ([], {}),
        (None, {}),
        ("weight_decay=0.01 betas=(0.9, 0.99)\nname='x y'", {"weight_decay": 0.01, "betas": (0.9, 0.99), "name": "x y"}),
        ({"betas": [0.9, 0.99], "weight_decay": "0.1"}, {"betas": [0.9, 0.99], "weight_decay": "0.1"}),
    ],
)
def test_parse_key_value_args(items, expected):
    parsed = parse_key_value_args(items, "optimizer_args")
    assert parsed == expected
    assert [type(value) for value in parsed.values()] == [type(value) for value in expected.values()]


def test_parse_key_value_args_copies_a_mapping():
    table = {"gamma": 0.5}
    parsed = parse_key_value_args(table, "lr_scheduler_args")
    parsed["gamma"] = 1.0
    assert table == {"gamma": 0.5}


@pytest.mark.parametrize(
    "items, message",
    [
        (["weight_decay"], "not of the form key=value"),
        (["=0.1"], "no valid name"),
        (["two words=1"], "no valid name"),
        (["betas=(0.9,0.99"], "not a valid Python literal"),
        (["name='unclosed"], "not a valid Python literal"),
        (["eps="], "no value"),
        (["a=1", "a=2"], "given twice"),
        ([3], "key=value"),
        ({"not an identifier": 1}, "not a valid argument name"),
    ],
)
def test_parse_key_value_args_errors(items, message):
    with pytest.raises(MusubiError, match="--network_args") as caught:
        parse_key_value_args(items, "network_args")
    assert message in str(caught.value)


def test_format_key_value_args():
    assert format_key_value_args({"weight_decay": 0.01, "betas": (0.9, 0.95)}) == "weight_decay=0.01,betas=(0.9, 0.95)"


# AdamW and torch.optim classes


def adamw_first_step(value: torch.Tensor, gradient: torch.Tensor, lr: float, weight_decay: float, eps: float = 1e-8) -> torch.Tensor:
    """AdamW's first step: decoupled decay, then m̂ = g and v̂ = g² so the move is lr·g/(|g|+eps)."""
    return value * (1 - lr * weight_decay) - lr * gradient / (gradient.abs() + eps)


@pytest.mark.parametrize("optimizer_type", [None, "", "  ", "AdamW", "adamw", "ADAMW"])
def test_adamw_is_the_default_and_case_insensitive(optimizer_type):
    groups = lora_plus_groups()
    before = [group["params"][0].detach().clone() for group in groups]
    optimizer, description = build_optimizer(optimizer_type, groups, LR)
    assert type(optimizer) is torch.optim.AdamW
    assert description == "torch.optim.adamw.AdamW"
    take_step(optimizer, GRADIENTS)
    for value, gradient, parameter, lr in zip(before, GRADIENTS, params_of(optimizer), (LR, 10 * LR)):
        assert torch.allclose(parameter.detach(), adamw_first_step(value, gradient, lr, weight_decay=0.01), atol=1e-7)


def test_optimizer_args_reach_the_optimizer_and_the_description():
    groups = lora_plus_groups()
    before = [group["params"][0].detach().clone() for group in groups]
    optimizer, description = build_optimizer("AdamW", groups, LR, ["weight_decay=0.5", "betas=0.9,0.95"])
    assert description == "torch.optim.adamw.AdamW(weight_decay=0.5,betas=(0.9, 0.95))"
    assert [group["betas"] for group in optimizer.param_groups] == [(0.9, 0.95)] * 2
    assert [group["name"] for group in optimizer.param_groups] == ["unet", "unet plus"]
    take_step(optimizer, GRADIENTS)
    for value, gradient, parameter, lr in zip(before, GRADIENTS, params_of(optimizer), (LR, 10 * LR)):
        assert torch.allclose(parameter.detach(), adamw_first_step(value, gradient, lr, weight_decay=0.5), atol=1e-7)


@pytest.mark.parametrize("optimizer_type", ["SGD", "sgd", "torch.optim.SGD", "torch.optim.sgd.SGD"])
def test_sgd_by_bare_and_dotted_name(optimizer_type):
    groups = lora_plus_groups()
    before = [group["params"][0].detach().clone() for group in groups]
    optimizer, description = build_optimizer(optimizer_type, groups, LR)
    assert type(optimizer) is torch.optim.SGD
    assert description == "torch.optim.sgd.SGD"
    take_step(optimizer, GRADIENTS)
    for value, gradient, parameter, lr in zip(before, GRADIENTS, params_of(optimizer), (LR, 10 * LR)):
        assert torch.allclose(parameter.detach(), value - lr * gradient)


def test_plain_parameter_list_uses_the_learning_rate():
    parameter = torch.nn.Parameter(torch.ones(2))
    optimizer, _ = build_optimizer("SGD", iter([parameter]), 0.25, {"momentum": 0.0})
    take_step(optimizer, [torch.tensor([1.0, -2.0])])
    assert torch.allclose(parameter.detach(), torch.tensor([0.75, 1.5]))


def test_group_learning_rates_use_group_names():
    optimizer, _ = build_optimizer("AdamW", lora_plus_groups() + [{"params": [torch.nn.Parameter(torch.ones(1))]}], LR)
    assert group_learning_rates(optimizer) == pytest.approx({"unet": LR, "unet plus": 10 * LR, "group2": LR})


# Errors


@pytest.mark.parametrize(
    "optimizer_type, message",
    [
        ("NoSuchOptimizer", "Built-in choices: AdamW, AdamW8bit, Adafactor, Prodigy"),
        ("torch.optim.NoSuchOptimizer", "has no class NoSuchOptimizer"),
        ("torch.optim.sgd", "has no class sgd"),
        ("no_such_package.Optimizer", "cannot be imported"),
    ],
)
def test_unknown_optimizer_types(optimizer_type, message):
    with pytest.raises(MusubiError, match=message):
        build_optimizer(optimizer_type, lora_plus_groups(), LR)


def test_builtin_choices_are_listed():
    with pytest.raises(MusubiError) as caught:
        build_optimizer("Lamb", lora_plus_groups(), LR)
    for name in BUILTIN_OPTIMIZERS:
        assert name in str(caught.value)


@pytest.mark.parametrize(
    "args, message",
    [
        (["weight_decy=0.01"], "'weight_decy' is not an argument of torch.optim.adamw.AdamW; it accepts: betas, eps, weight_decay"),
        (["lr=0.1"], "--learning_rate"),
        (["betas=(2.0, 0.9)"], "--optimizer_type AdamW rejected its settings"),
    ],
)
def test_bad_optimizer_args(args, message):
    with pytest.raises(MusubiError, match="optimizer") as caught:
        build_optimizer("AdamW", lora_plus_groups(), LR, args)
    assert message in str(caught.value)


@pytest.mark.parametrize("learning_rate, message", [(None, "--learning_rate is required"), (-1.0, "≥ 0"), ("fast", "a number")])
def test_bad_learning_rates(learning_rate, message):
    with pytest.raises(MusubiError, match=message):
        build_optimizer("AdamW", lora_plus_groups(), learning_rate)


def test_no_parameters():
    with pytest.raises(MusubiError, match="no trainable parameters"):
        build_optimizer("AdamW", [], LR)


# Optional packages


@pytest.mark.parametrize(
    "optimizer_type, module_name, hint",
    [
        ("AdamW8bit", "bitsandbytes", "pip install bitsandbytes, or use AdamW"),
        ("Prodigy", "prodigyopt", "pip install prodigyopt"),
        ("AdamWScheduleFree", "schedulefree", "pip install schedulefree"),
        ("Adafactor", "transformers.optimization", "pip install transformers"),
    ],
)
def test_missing_optional_packages(monkeypatch, optimizer_type, module_name, hint):
    monkeypatch.setitem(sys.modules, module_name, None)  # makes "import module_name" fail
    with pytest.raises(MusubiError, match=optimizer_type) as caught:
        build_optimizer(optimizer_type, lora_plus_groups(), LR)
    assert hint in str(caught.value)


def install_fake_module(monkeypatch, name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_adamw8bit_comes_from_bitsandbytes(monkeypatch):
    class AdamW8bit(torch.optim.AdamW):
        pass

    AdamW8bit.__module__ = "bitsandbytes.optim.adamw"
    install_fake_module(monkeypatch, "bitsandbytes", optim=types.SimpleNamespace(AdamW8bit=AdamW8bit))
    optimizer, description = build_optimizer("adamw8bit", lora_plus_groups(), LR, ["weight_decay=0.1"])
    assert type(optimizer) is AdamW8bit
    assert description == "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.1)"


class Prodigy(torch.optim.Optimizer):
    """Stands in for prodigyopt.Prodigy: a step size estimate ``d`` per group."""

    def __init__(self, params, lr=1.0, d0=1e-6):
        super().__init__(params, dict(lr=lr, d=d0))

    def step(self, closure=None):
        for group in self.param_groups:
            group["d"] *= 2.0


def test_prodigy_warns_about_adamw_sized_learning_rates(monkeypatch):
    install_fake_module(monkeypatch, "prodigyopt", Prodigy=Prodigy)
    with pytest.warns(UserWarning, match="should be about 1.0"):
        build_optimizer("prodigy", lora_plus_groups(lr=1e-4), 1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer, _ = build_optimizer("Prodigy", lora_plus_groups(ratio=2.0, lr=1.0), 1.0, ["d0=1e-5"])
    assert type(optimizer) is Prodigy
    optimizer.step()
    assert group_learning_rates(optimizer) == pytest.approx({"unet": 2e-5 * 1.0, "unet plus": 2e-5 * 2.0})


# Schedule-free


def schedule_free_eval_weights(y: torch.Tensor, z: torch.Tensor, beta: float) -> torch.Tensor:
    """x = y + (1 - 1/β)(z - y): the averaged weights recovered from the training point y and z."""
    return y + (1 - 1 / beta) * (z - y)


@pytest.mark.parametrize("optimizer_type", ["AdamWScheduleFree", "radamschedulefree", "SGDScheduleFree", "schedulefree.AdamWScheduleFree"])
def test_schedule_free_train_and_eval_modes(optimizer_type):
    pytest.importorskip("schedulefree")
    optimizer, description = build_optimizer(optimizer_type, lora_plus_groups(lr=0.05), 0.05)
    assert description.startswith("schedulefree.")
    assert is_schedule_free(optimizer) and is_schedule_free(optimizer_type)
    set_train_mode(optimizer)
    for scale in (1.0, -0.5, 2.0, 1.5, -1.0, 0.5, 1.0):  # RAdam skips its first updates
        take_step(optimizer, [gradient * scale for gradient in GRADIENTS])
    training = [p.detach().clone() for p in params_of(optimizer)]
    anchors = [optimizer.state[p]["z"].clone() for p in params_of(optimizer)]

    with eval_mode(optimizer):
        for parameter, y, z in zip(params_of(optimizer), training, anchors):
            assert not torch.allclose(parameter.detach(), y)
            assert torch.allclose(parameter.detach(), schedule_free_eval_weights(y, z, beta=0.9), atol=1e-6)
    for parameter, y in zip(params_of(optimizer), training):
        assert torch.allclose(parameter.detach(), y, atol=1e-6)

    set_eval_mode(optimizer)
    set_eval_mode(optimizer)  # twice is the same as once
    for parameter, y, z in zip(params_of(optimizer), training, anchors):
        assert torch.allclose(parameter.detach(), schedule_free_eval_weights(y, z, beta=0.9), atol=1e-6)
    with eval_mode(optimizer):
        pass
    assert not optimizer.param_groups[0]["train_mode"]  # eval_mode restores the mode it found


def test_mode_switches_do_nothing_for_ordinary_optimizers():
    optimizer, _ = build_optimizer("AdamW", lora_plus_groups(), LR)
    take_step(optimizer, GRADIENTS)
    before = [p.detach().clone() for p in params_of(optimizer)]
    set_eval_mode(optimizer)
    with eval_mode(optimizer):
        set_train_mode(optimizer)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params_of(optimizer), before))
    assert not is_schedule_free(optimizer)


@pytest.mark.parametrize(
    "type_name, expected",
    [("AdamWScheduleFree", True), ("prodigyplus.ProdigyPlusScheduleFree", True), ("AdamW", False), ("", False), (None, False)],
)
def test_is_schedule_free_by_type_string(type_name, expected):
    assert is_schedule_free(type_name) is expected


def test_unknown_schedule_free_name():
    pytest.importorskip("schedulefree")
    with pytest.raises(MusubiError, match="schedulefree also has: .*AdamWScheduleFree"):
        build_optimizer("ProdigyPlusScheduleFree", lora_plus_groups(), LR)


# Adafactor


def test_adafactor_defaults_to_relative_step():
    pytest.importorskip("transformers")
    with pytest.warns(UserWarning, match="LoRA\\+ ratio has no effect"):
        optimizer, description = build_optimizer("Adafactor", lora_plus_groups(), LR)
    assert description == "transformers.optimization.Adafactor(relative_step=True)"
    assert requires_adafactor_scheduler(optimizer)
    assert optimizer.defaults["lr"] is None
    before = [p.detach().clone() for p in params_of(optimizer)]
    take_step(optimizer, GRADIENTS)
    assert all(not torch.allclose(p.detach(), b) for p, b in zip(params_of(optimizer), before))


def test_adafactor_with_external_learning_rate():
    pytest.importorskip("transformers")
    groups = lora_plus_groups()
    before = [group["params"][0].detach().clone() for group in groups]
    args = ["relative_step=False", "scale_parameter=False"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer, description = build_optimizer("adafactor", groups, LR, args)
    assert description == "transformers.optimization.Adafactor(relative_step=False,scale_parameter=False)"
    assert not requires_adafactor_scheduler(optimizer)
    take_step(optimizer, GRADIENTS)
    # First step without momentum: the second-moment estimate is g² (+1e-30), so the update is sign(g)
    # (RMS 1, under the clip threshold), scaled by each group's own lr.
    for value, gradient, parameter, lr in zip(before, GRADIENTS, params_of(optimizer), (LR, 10 * LR)):
        assert torch.allclose(parameter.detach(), value - lr * torch.sign(gradient), atol=1e-7)


def test_adafactor_warmup_init_forces_relative_step():
    pytest.importorskip("transformers")
    with pytest.warns(UserWarning, match="warmup_init=True needs relative_step"):
        optimizer, description = build_optimizer("Adafactor", [torch.nn.Parameter(torch.ones(2))], LR, ["relative_step=False", "warmup_init=True"])
    assert description == "transformers.optimization.Adafactor(relative_step=True,warmup_init=True)"
    assert requires_adafactor_scheduler(optimizer)
    assert optimizer.param_groups[0]["lr"] == LR  # kept for logging before the first step


def test_requires_adafactor_scheduler_is_false_for_others():
    optimizer, _ = build_optimizer("AdamW", lora_plus_groups(), LR)
    assert not requires_adafactor_scheduler(optimizer)
    torch_adafactor, _ = build_optimizer("torch.optim.Adafactor", lora_plus_groups(), LR)
    assert not requires_adafactor_scheduler(torch_adafactor)
