"""torch.compile per transformer block: LoRA hooks traced, gradients intact, failures fall back to eager.

Most tests use small test backends registered here: one that records the graphs Dynamo hands it
and runs them as they are (so a compiled run must match eager bit for bit, and the recorded
graphs show what was compiled), and broken ones that raise in the forward or only in the
backward compiler. One test uses inductor, the backend users run.
"""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.registry import register_backend

from musubi import compile as compile_module
from musubi.cli import main
from musubi.compile import CompileSettings, compile_regions, select_regions
from musubi.errors import MusubiError
from musubi.lora.network import LoRANetwork
from musubi.lora.presets import get_preset
from musubi.training.adapter import ToyAdapter, ToyBlock
from musubi.training.timesteps import TimestepSettings
from musubi.training.cli import add_cli_arguments
from musubi.training.config import load_train_config
from musubi.training.loop import Trainer, flow_matching_loss
from musubi.training.settings import TrainSettings

from test_train_cli import toy_cache
from test_trainer import write_items

torch.set_num_threads(1)

RECORDED: list[torch.fx.GraphModule] = []


@register_backend(name="musubi_test_recording")
def _recording_backend(graph_module, example_inputs):
    RECORDED.append(graph_module)
    return graph_module.forward


@register_backend(name="musubi_test_broken")
def _broken_backend(graph_module, example_inputs):
    raise RuntimeError("this backend cannot compile anything")


def _no_backward(graph_module, example_inputs):
    raise RuntimeError("no backward compiler here")


def _boxed_forward(graph_module, example_inputs):
    from functorch.compile import make_boxed_func

    return make_boxed_func(graph_module.forward)


register_backend(name="musubi_test_broken_backward")(aot_autograd(fw_compiler=_boxed_forward, bw_compiler=_no_backward))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    RECORDED.clear()
    yield
    torch._dynamo.reset()


def toy(width=16, depth=2, seed=0):
    adapter = ToyAdapter(width=width, depth=depth, seed=seed)
    torch.manual_seed(seed)
    network = LoRANetwork(adapter.lora_root(), "generic", network_dim=4, network_alpha=4.0)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in network.lora_modules:  # a LoRA that already does something
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * 0.2)
    return adapter, network


def inputs(batch=2, size=(4, 4), seed=3):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, *size, generator=generator), torch.rand(batch, generator=generator),
            {"context": torch.randn(batch, 3, 8, generator=generator)})


def loss_and_grads(adapter, network, x, t, batch):
    network.zero_grad(set_to_none=True)
    target = torch.ones_like(x)
    loss = flow_matching_loss(adapter.predict_velocity(x, t, batch), target, torch.ones(x.shape[0]))
    loss.backward()
    return loss.detach(), {name: param.grad.clone() for name, param in network.named_parameters()}


def compiled(adapter, backend, **options):
    regions = compile_regions([adapter.lora_root()], get_preset("generic").is_target_block, CompileSettings(backend, **options))
    return regions.install()


def compile_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "musubi.compile" and record.levelno == logging.WARNING]


# --- settings ------------------------------------------------------------------------------------


def test_backend_names_are_case_insensitive_and_bad_options_are_named():
    assert CompileSettings("INDUCTOR").validate().torch_backend == "inductor"
    assert CompileSettings("Aot_Eager").validate().backend == "aot_eager"
    assert not CompileSettings("no").validate().enabled
    assert CompileSettings("inductor", mode="default").validate().mode is None
    with pytest.raises(MusubiError, match="dynamo_backend 'warp_drive'.*choose one of NO, .*INDUCTOR"):
        CompileSettings("warp_drive").validate()
    with pytest.raises(MusubiError, match="dynamo_mode 'max-autotune' only applies to the INDUCTOR"):
        CompileSettings("aot_eager", mode="max-autotune").validate()
    with pytest.raises(MusubiError, match="dynamo_backend"):
        TrainSettings(output_dir="out", dynamo_backend="warp_drive").validate()
    with pytest.raises(MusubiError, match="dynamo_mode: 'fastest' is not a choice"):
        TrainSettings(output_dir="out", dynamo_mode="fastest").validate()
    assert TrainSettings(output_dir="out", dynamo_backend="inductor", dynamo_mode="max-autotune").validate()


def test_toml_and_command_line_take_the_dynamo_options(tmp_path):
    config = tmp_path / "train.toml"
    config.write_text('model = "toy"\ndata_dir = "data"\noutput_dir = "out"\n[compile]\ndynamo_backend = "inductor"\n'
                      'dynamo_mode = "max-autotune"\ndynamo_dynamic = true\n')
    settings = load_train_config(str(config)).settings
    assert (settings.dynamo_backend, settings.dynamo_mode, settings.dynamo_fullgraph, settings.dynamo_dynamic) == (
        "inductor", "max-autotune", False, True)
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(["--dynamo_backend", "AOT_EAGER", "--dynamo_mode", "default", "--dynamo_fullgraph",
                              "--no-dynamo_dynamic"])
    overrides = {name: getattr(args, name) for name in ("dynamo_backend", "dynamo_mode", "dynamo_fullgraph", "dynamo_dynamic")}
    settings = load_train_config(str(config), overrides).settings
    assert (settings.dynamo_backend, settings.dynamo_fullgraph, settings.dynamo_dynamic) == ("AOT_EAGER", True, False)
    assert "dynamo" not in str(settings.result_settings())  # compiling does not change what is trained

    toy_cache(tmp_path / "data", count=2)
    code = main(["train", "--config_file", str(config), "--data_dir", str(tmp_path / "data"), "--output_dir",
                 str(tmp_path / "out"), "--max_train_steps", "1", "--dynamo_backend", "MUSUBI_TEST_RECORDING",
                 "--no-dynamo_dynamic", "--dynamo_mode", "default"])
    assert code == 0 and RECORDED and (tmp_path / "out" / "lora.safetensors").is_file()


def test_regions_are_the_outermost_blocks_or_the_whole_model_with_fullgraph():
    adapter, _ = toy(depth=3)
    model = adapter.lora_root()
    is_block = get_preset("generic").is_target_block
    assert select_regions([model], is_block, fullgraph=False) == list(model.blocks)
    assert select_regions([model, model], is_block, fullgraph=True) == [model]


# --- LoRA hooks and gradients ----------------------------------------------------------------------


def test_lora_hooks_are_compiled_into_the_blocks_and_change_the_output_exactly_as_eager():
    adapter, network = toy()
    model = adapter.lora_root()
    x, t, batch = inputs()
    with torch.no_grad():
        base = (network.remove(), adapter.predict_velocity(x, t, batch))[1]
        network.attach()
        eager = adapter.predict_velocity(x, t, batch)
        regions = compiled(adapter, "musubi_test_recording")
        assert all(block._compiled_call_impl is not None for block in model.blocks)
        with_lora = adapter.predict_velocity(x, t, batch)
        assert RECORDED and all("lora_down" in graph.code for graph in RECORDED)  # the hooks are inside the graph
        network.set_multiplier(0.5)
        half = adapter.predict_velocity(x, t, batch)
        network.remove()  # a LoRA taken off a compiled model no longer acts (no stale graph)
        without = adapter.predict_velocity(x, t, batch)
        network.attach()
        network.set_multiplier(1.0)
        again = adapter.predict_velocity(x, t, batch)
        regions.remove()
        assert all(block._compiled_call_impl is None for block in model.blocks)
    assert not torch.equal(eager, base)
    assert torch.equal(with_lora, eager) and torch.equal(without, base) and torch.equal(again, eager)
    # Half the multiplier moves each block's LoRA term by half: compare with eager at 0.5.
    network.set_multiplier(0.5)
    with torch.no_grad():
        assert torch.equal(half, adapter.predict_velocity(x, t, batch))


def test_inductor_training_step_gives_the_eager_loss_and_lora_gradients():
    adapter, network = toy(depth=1)
    x, t, batch = inputs()
    eager_loss, eager_grads = loss_and_grads(adapter, network, x, t, batch)
    regions = compiled(adapter, "inductor")
    loss, grads = loss_and_grads(adapter, network, x, t, batch)
    regions.remove()
    assert regions.failure is None
    assert torch.allclose(loss, eager_loss, rtol=1e-5, atol=1e-7)
    for name, grad in eager_grads.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_training_with_compiled_blocks_trains_exactly_as_eager_and_leaves_the_model_eager(tmp_path):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 3)
    results = {}
    for backend in ("NO", "musubi_test_recording"):
        adapter, network = toy()
        settings = TrainSettings(output_dir=str(tmp_path / backend), learning_rate=1e-2, seed=7, max_train_steps=3,
                                 batch_size=2, save_state=False, dynamo_backend=backend,
                                 timesteps=TimestepSettings(timestep_sampling="uniform"))
        result = Trainer(adapter, network, dataset, settings).train()
        assert all(block._compiled_call_impl is None for block in adapter.lora_root().blocks)
        results[backend] = result.losses, {key: value.clone() for key, value in network.state_dict().items()}
    assert RECORDED, "nothing was compiled"
    (eager_losses, eager_weights), (losses, weights) = results["NO"], results["musubi_test_recording"]
    assert losses == eager_losses
    trained = [key for key in weights if key.endswith("lora_down.weight")]
    assert trained and all(torch.equal(weights[key], eager_weights[key]) for key in weights)
    adapter, network = toy()
    assert all(not torch.equal(weights[key], network.state_dict()[key]) for key in trained)  # the LoRA learned


# --- failures and shapes -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["musubi_test_broken", "musubi_test_broken_backward"])
def test_a_failing_backend_trains_eagerly_with_one_warning(tmp_path, caplog, backend):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 2)
    losses = {}
    for name in ("NO", backend):
        adapter, network = toy()
        settings = TrainSettings(output_dir=str(tmp_path / name), learning_rate=1e-2, seed=7, max_train_steps=2,
                                 save_state=False, dynamo_backend=name, timesteps=TimestepSettings(timestep_sampling="uniform"))
        with caplog.at_level(logging.WARNING, logger="musubi.compile"):
            losses[name] = Trainer(adapter, network, dataset, settings).train().losses
    assert losses[backend] == losses["NO"]
    [warning] = compile_warnings(caplog)
    expected = "cannot compile anything" if backend == "musubi_test_broken" else "no backward compiler here"
    assert "continues uncompiled (eager)" in warning and expected in warning


def test_sampling_falls_back_too_and_fullgraph_failures_are_caught(caplog):
    adapter, network = toy()
    x, t, batch = inputs()
    with torch.no_grad():
        eager = adapter.predict_velocity(x, t, batch)
        with caplog.at_level(logging.WARNING, logger="musubi.compile"), compiled(adapter, "musubi_test_broken"):
            first = adapter.predict_velocity(x, t, batch)
            second = adapter.predict_velocity(x, t, batch)
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert len(compile_warnings(caplog)) == 1

    class Breaking(ToyBlock):
        def forward(self, hidden, conditioning):
            torch._dynamo.graph_break()  # fine for regional compilation, an error with fullgraph
            return super().forward(hidden, conditioning)

    adapter.lora_root().blocks[0].__class__ = Breaking
    caplog.clear()
    with torch.no_grad():
        eager = adapter.predict_velocity(x, t, batch)
        with caplog.at_level(logging.WARNING, logger="musubi.compile"):
            with compiled(adapter, "musubi_test_recording", fullgraph=True) as regions:
                assert regions.modules == [adapter.lora_root()]
                assert torch.equal(adapter.predict_velocity(x, t, batch), eager)
    [warning] = compile_warnings(caplog)
    assert "Unsupported" in warning


def test_new_shapes_past_the_limit_run_uncompiled_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(compile_module, "MAX_SHAPES", 2)
    adapter, _ = toy(depth=2)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="musubi.compile"):
        with compiled(adapter, "musubi_test_recording"):
            for size in (2, 3, 2, 4, 5, 3):
                x, t, batch = inputs(size=(size, size))
                compiled_output = adapter.predict_velocity(x, t, batch)
        for size in (4, 5):
            x, t, batch = inputs(size=(size, size))
            assert torch.equal(adapter.predict_velocity(x, t, batch), adapter.predict_velocity(x, t, batch))
    # Two shapes compiled (one graph each serves both blocks); sizes 4 and 5 ran eagerly.
    assert len(RECORDED) == 2
    [warning] = compile_warnings(caplog)
    assert "2 different input shapes" in warning and "dynamic" in warning
    assert torch.isfinite(compiled_output).all()


def test_recompiling_for_the_same_shapes_is_reported_once(caplog):
    class CountingBlock(ToyBlock):
        calls = 0

        def forward(self, hidden, conditioning):
            # A Python value that changes every call: Dynamo specialises on it and recompiles.
            return super().forward(hidden, conditioning) + float(type(self).calls)

    adapter, _ = toy(depth=1)
    block = adapter.lora_root().blocks[0]
    block.__class__ = CountingBlock
    x, t, batch = inputs()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="musubi.compile"):
        with compiled(adapter, "musubi_test_recording"):
            for call in range(6):
                CountingBlock.calls = call
                output = adapter.predict_velocity(x, t, batch)
        CountingBlock.calls = 5
        assert torch.equal(output, adapter.predict_velocity(x, t, batch))
    [warning] = compile_warnings(caplog)
    assert "keeps recompiling CountingBlock for inputs of unchanged shape" in warning
