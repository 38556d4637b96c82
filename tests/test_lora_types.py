"""LoHa and LoKr networks: their math against the formulas, initialisation, LoKr's factorization
and full-matrix fallback, dropouts, gradients and torch.compile through the shared hooks, files in
both layouts, warm starts, merging, post-hoc EMA, and the refusals (LoRA+, network_dropout)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from musubi.errors import MusubiError
from musubi.lora.ema import post_hoc_ema_merge
from musubi.lora.formats import file_network_type, load_lora_state_dict, save_lora
from musubi.lora.merge import load_lora_file, merge_loras_into_state_dict
from musubi.lora.modules import LoHaModule, LoKrModule, lokr_factors
from musubi.lora.network import (
    LoHaNetwork, LoKrNetwork, LoRANetwork, create_network, network_from_args, network_type_from_module,
)
from musubi.training.cli import train_from_config
from musubi.training.config import load_train_config, resolve_config
from test_lora_network import ConvBlock, HunyuanVideo, ToyBlock, WanModel, lora_term
from test_train_cli import config_file, toy_cache

torch.set_num_threads(1)

TYPES = ["loha", "lokr"]


def toy(features=12, out=20):
    torch.manual_seed(0)
    model = nn.Sequential(ToyBlock(features, out))
    model.requires_grad_(False)
    return model


def randomize(network, seed=1):
    """Distinct random values in every trainable tensor, as after some training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return network


def read(path):
    with safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, file.metadata()


# --- the math -------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha, expected_scale", [(2.0, 0.5), (0, 1.0), (8.0, 2.0)])
def test_loha_delta_is_the_hadamard_product_of_two_low_rank_pairs(alpha, expected_scale):
    model = toy()
    network = randomize(LoHaNetwork(model, "generic", network_dim=4, network_alpha=alpha))
    module = network.lora_modules[0]
    assert module.scale == expected_scale
    w1a, w1b, w2a, w2b = (getattr(module, name).double() for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    expected = (w1a @ w1b) * (w2a @ w2b) * expected_scale
    torch.testing.assert_close(module.delta_weight().double(), expected)
    network.set_multiplier(0.7)
    x = torch.randn(3, 5, 12)
    layer = model[0].proj
    base = x.double() @ layer.weight.double().T + layer.bias.double()
    torch.testing.assert_close(model(x).double(), base + 0.7 * x.double() @ expected.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank, full", [(2, False), (8, True)])
def test_lokr_delta_is_the_kronecker_product_and_the_hook_never_forms_it(rank, full):
    model = toy()  # 12 → 20: W1 4×3 (20 = 4·5, 12 = 3·4), W2 5×4
    network = randomize(LoKrNetwork(model, "generic", network_dim=rank, network_alpha=3.0))
    module = network.lora_modules[0]
    assert module.factors == (4, 5, 3, 4) and module.full is full
    w2 = module.lokr_w2.double() if full else module.lokr_w2_a.double() @ module.lokr_w2_b.double()
    scale = 1.0 if full else 3.0 / rank
    assert module.scale == scale
    expected = torch.kron(module.lokr_w1.double(), w2) * scale
    torch.testing.assert_close(module.delta_weight().double(), expected)
    x = torch.randn(3, 5, 12)
    term = lora_term(model, network, x).double()
    torch.testing.assert_close(term, x.double() @ expected.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dimension, split", [(3072, (48, 64)), (5120, (64, 80)), (8960, (80, 112)),
                                              (13824, (108, 128)), (4099, (1, 4099)), (12, (3, 4)), (1, (1, 1))])
def test_lokr_balanced_factorization_matches_musubi(dimension, split):
    assert lokr_factors(dimension, -1) == split


def test_lokr_forced_factor():
    assert lokr_factors(3072, 8) == (8, 384)
    assert lokr_factors(3072, 1024) == (3, 1024)  # the factor is one part, the smaller one comes first
    assert lokr_factors(100, 3) == (2, 50)  # 3 does not divide 100: most balanced split with a part ≤ 3
    assert lokr_factors(16, 0) == (1, 16)
    model = toy(features=16, out=24)
    module = LoKrNetwork(model, "generic", network_dim=2, factor=2).lora_modules[0]
    assert module.factors == (2, 12, 2, 8)
    assert module.lokr_w1.shape == (2, 2) and module.lokr_w2_a.shape == (12, 2) and module.lokr_w2_b.shape == (2, 8)


def test_lokr_full_matrix_fallback_is_reported_and_stores_alpha_as_rank(tmp_path):
    model = toy()
    network = LoKrNetwork(model, "generic", network_dim=8, network_alpha=2.0)  # 8 ≥ max(5, 4) / 2
    module = network.lora_modules[0]
    assert module.full and module.scale == 1.0 and float(module.alpha) == 8.0
    assert network.full_w2_modules() == ["0.proj"]
    assert "full lokr_w2" in network.describe() and "network_alpha does not apply" in network.describe()
    low = LoKrNetwork(toy(), "generic", network_dim=2, network_alpha=2.0)
    assert "full lokr_w2" not in low.describe() and low.lora_modules[0].scale == 1.0


def test_loha_initialisation_leaves_the_output_unchanged():
    torch.manual_seed(0)
    model = toy(features=400, out=300)
    x = torch.randn(2, 400)
    before = model(x)
    module = LoHaNetwork(model, "generic", network_dim=16).lora_modules[0]
    assert torch.equal(module.hada_w2_a, torch.zeros(300, 16))
    assert module.hada_w1_a.std().item() == pytest.approx(0.1, rel=0.05)
    assert module.hada_w1_b.std().item() == pytest.approx(1.0, rel=0.05)
    assert module.hada_w2_b.std().item() == pytest.approx(1.0, rel=0.05)
    assert torch.equal(model(x), before)


def test_lokr_initialisation_leaves_the_output_unchanged():
    torch.manual_seed(0)
    model = toy(features=400, out=300)  # W1 15×20, W2 20×20
    x = torch.randn(2, 400)
    before = model(x)
    module = LoKrNetwork(model, "generic", network_dim=4).lora_modules[0]
    assert not module.full
    assert module.lokr_w1.abs().max() <= 1 / math.sqrt(20) and module.lokr_w1.abs().max() > 0.9 / math.sqrt(20)
    assert module.lokr_w2_a.abs().max() <= 1 / math.sqrt(4)
    assert torch.equal(module.lokr_w2_b, torch.zeros(4, 20))
    assert torch.equal(model(x), before)
    full = LoKrNetwork(toy(features=400, out=300), "generic", network_dim=16).lora_modules[0]
    assert full.full and torch.equal(full.lokr_w2, torch.zeros(20, 20))


@pytest.mark.parametrize("network_type", TYPES)
def test_convolutions_take_the_weight_change_with_the_layer_geometry(network_type):
    torch.manual_seed(7)
    model = nn.Sequential(ConvBlock())
    network = randomize(create_network(network_type, model, "generic", network_dim=2, conv_dim=2, conv_alpha=1,
                                       exclude_patterns=[".*grouped.*"]))
    assert network.module_names() == ["0.pointwise", "0.spatial", "0.pointwise3d"]
    for module in network.lora_modules:
        assert module.delta_weight().shape == module.layer_shape.weight_shape
    layer = model[0].spatial
    module = network.modules_by_name()["0.spatial"]
    x = torch.randn(2, 3, 7, 7)
    network.remove()
    base = layer(x)
    network.attach()
    expected = F.conv2d(x.double(), module.delta_weight().double(), stride=2, padding=1)
    torch.testing.assert_close(layer(x).double() - base.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("network_type", TYPES)
def test_a_conv_padded_by_reflection_is_refused(network_type):
    block = ToyBlock()
    block.proj = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(MusubiError, match="zero padding"):
        create_network(network_type, nn.Sequential(block), "generic", conv_dim=2)


# --- hooks: dtype, fp8 layers, gradients, dropouts, compile -----------------------------------------


@pytest.mark.parametrize("network_type", TYPES)
def test_runs_in_its_own_dtype_and_the_output_keeps_the_layer_dtype(network_type):
    model = toy().to(torch.bfloat16)
    x = torch.randn(4, 12).to(torch.bfloat16)
    base = model(x)
    network = randomize(create_network(network_type, model, "generic", network_dim=2, network_alpha=2))
    out = model(x)
    assert out.dtype == torch.bfloat16 and next(network.parameters()).dtype == torch.float32
    expected = base.float() + x.float() @ network.lora_modules[0].delta_weight().T
    torch.testing.assert_close(out, expected.to(torch.bfloat16), rtol=0, atol=0.05)


@pytest.mark.parametrize("network_type", TYPES)
def test_gradients_reach_only_the_network_and_every_tensor_of_it(network_type):
    model = toy()
    network = randomize(create_network(network_type, model, "generic", network_dim=2))
    model(torch.randn(3, 12)).square().sum().backward()
    assert all(p.grad is None for p in model.parameters())
    for name, parameter in network.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("network_type", TYPES)
def test_a_fresh_network_learns_a_weight_change_of_its_own_kind(network_type):
    """From the zero initialisation the first gradients are non-zero, and Adam fits a teacher's change."""
    torch.manual_seed(0)
    teacher_model, model = toy(), toy()
    randomize(create_network(network_type, teacher_model, "generic", network_dim=2, network_alpha=2), seed=9)
    network = create_network(network_type, model, "generic", network_dim=2, network_alpha=2)
    x = torch.randn(64, 12)
    target = teacher_model(x).detach()
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-2)
    losses = []
    for _ in range(150):
        loss = (model(x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::15]


@pytest.mark.parametrize("network_type", TYPES)
def test_rank_dropout_drops_output_rows_of_the_change_for_the_whole_batch(network_type):
    torch.manual_seed(3)
    p = 0.25
    model = toy()
    network = randomize(create_network(network_type, model, "generic", network_dim=2, rank_dropout=p))
    x = torch.randn(16, 5, 12)
    full_term = (x @ network.lora_modules[0].delta_weight().T).detach()
    network.train()
    kept_rows = []
    for _ in range(40):
        term = lora_term(model, network, x).detach()
        keep = (term.abs().amax(dim=(0, 1)) > 1e-6).float()  # one mask of output rows per call, for the whole batch
        torch.testing.assert_close(term, full_term * keep / (1 - p), rtol=1e-4, atol=1e-5)
        kept_rows.append(keep)
    assert abs(torch.stack(kept_rows).mean().item() - (1 - p)) < 0.06
    network.eval()
    torch.testing.assert_close(lora_term(model, network, x), full_term, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("network_type", TYPES)
def test_module_dropout_skips_the_whole_change(network_type):
    torch.manual_seed(5)
    model = toy()
    network = randomize(create_network(network_type, model, "generic", module_dropout=0.5))
    x = torch.randn(2, 12)
    network.train()
    applied = [bool(lora_term(model, network, x).abs().max() > 1e-6) for _ in range(200)]
    assert 70 < sum(applied) < 130


@pytest.mark.parametrize("network_type", TYPES)
def test_hooks_trace_through_torch_compile(network_type):
    model = toy()
    randomize(create_network(network_type, model, "generic", network_dim=2))
    x = torch.randn(2, 12)
    eager = model(x)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)


@pytest.mark.parametrize("network_type", TYPES)
def test_one_network_on_two_twin_models_shares_its_weights(network_type):
    first, second = toy(), toy()
    network = randomize(create_network(network_type, first, "generic", network_dim=2))
    network.attach_twin(second)
    x = torch.randn(2, 12)
    torch.testing.assert_close(first(x), second(x))


# --- options and their refusals -----------------------------------------------------------------------


@pytest.mark.parametrize("network_type", TYPES)
def test_loraplus_and_network_dropout_are_refused_with_the_reason(network_type):
    with pytest.raises(MusubiError, match="loraplus_lr_ratio: LoRA\\+ .* none"):
        create_network(network_type, WanModel(blocks=1), "wan", loraplus_lr_ratio=4)
    with pytest.raises(MusubiError, match="network_dropout: .*rank_dropout or module_dropout"):
        create_network(network_type, WanModel(blocks=1), "wan", dropout=0.1)
    network = create_network(network_type, WanModel(blocks=1), "wan", network_dim=2)
    assert [group["name"] for group in network.param_groups(1e-4)] == ["unet"]


def test_selection_is_the_same_for_every_type_with_the_default_excludes():
    lora = LoRANetwork(WanModel(), "wan", network_dim=2).module_names()
    for network_type in TYPES:
        assert create_network(network_type, WanModel(), "wan", network_dim=2).module_names() == lora
    hunyuan = LoRANetwork(HunyuanVideo(), "hunyuan_video", exclude_patterns=[".*mlp.*"]).module_names()
    assert LoHaNetwork(HunyuanVideo(), "hunyuan_video", exclude_patterns=[".*mlp.*"]).module_names() == hunyuan


def test_network_from_args_takes_the_type_and_lokr_factor():
    network = network_from_args(WanModel(blocks=1), "wan", network_dim=2, network_args=["factor=2", "rank_dropout=0.1"],
                                network_type="lokr")
    assert isinstance(network, LoKrNetwork) and network.factor == 2
    assert network.metadata_network_args() == {"factor": "2", "rank_dropout": "0.1"}
    with pytest.raises(MusubiError, match="factor belongs to another network type"):
        network_from_args(WanModel(blocks=1), "wan", network_args=["factor=2"], network_type="loha")
    with pytest.raises(MusubiError, match="factor"):
        network_from_args(WanModel(blocks=1), "wan", network_args=["factor=-3"], network_type="lokr")
    with pytest.raises(MusubiError, match="network_type 'oft' is unknown"):
        create_network("oft", WanModel(blocks=1), "wan")


def test_musubi_network_module_names_map_to_types():
    assert network_type_from_module("networks.loha") == "loha"
    assert network_type_from_module("networks.lokr") == "lokr"
    assert network_type_from_module("networks.lora_wan") == "lora"
    assert network_type_from_module(None) is None
    with pytest.raises(MusubiError, match="networks.loha"):
        network_type_from_module("networks.oft")


def test_config_reads_network_type_or_musubis_network_module():
    base = {"model": "toy", "data_dir": "cache", "output_dir": "out"}
    assert resolve_config(base, {}).network_type == "lora"
    assert resolve_config({**base, "network_module": "networks.lokr"}, {}).network_type == "lokr"
    assert resolve_config({**base, "network_type": "loha"}, {}).network_type == "loha"
    assert resolve_config({**base, "network_module": "networks.loha"}, {"network_type": "loha"}).network_type == "loha"
    with pytest.raises(MusubiError, match="name different networks"):
        resolve_config({**base, "network_module": "networks.loha"}, {"network_type": "lokr"})
    with pytest.raises(MusubiError, match="not a choice"):
        resolve_config({**base, "network_type": "dora"}, {})


# --- files ---------------------------------------------------------------------------------------------


EXPECTED_NAMES = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"),
                  "lokr": ("lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha")}


@pytest.mark.parametrize("network_type", TYPES)
@pytest.mark.parametrize("file_format", ["comfyui", "musubi"])
def test_saved_keys_layout_and_metadata(tmp_path, network_type, file_format):
    network = randomize(create_network(network_type, HunyuanVideo(), "hunyuan_video", network_dim=2, network_alpha=1))
    path = tmp_path / "net.safetensors"
    save_lora(network, str(path), format=file_format, dtype=torch.bfloat16)
    tensors, metadata = read(path)
    names = []
    for module_path, module in network.modules_by_name().items():
        if file_format == "comfyui":
            prefix = f"diffusion_model.{module_path}."
        else:
            prefix = "lora_unet_" + network.preset.musubi_name(module_path).replace(".", "_") + "."
        expected = ("lokr_w1", "lokr_w2", "alpha") if getattr(module, "full", False) else EXPECTED_NAMES[network_type]
        names += [prefix + name for name in expected]
    if network_type == "lokr":  # 8 = 2·4 wide layers keep a full W2 at rank 2, wider ones a low-rank one
        assert {m.full for m in network.lora_modules} == {True, False}
    assert sorted(tensors) == sorted(names)
    assert {tensor.dtype for tensor in tensors.values()} == {torch.bfloat16}
    assert all(tensor.dim() == 0 for key, tensor in tensors.items() if key.endswith(".alpha"))
    if (network_type, file_format) == ("loha", "comfyui"):
        assert "diffusion_model.double_blocks.0.img_mlp.0.hada_w1_a" in tensors  # ComfyUI's tree names
    assert metadata["ss_network_module"] == f"networks.{network_type}"
    assert file_network_type(tensors) == network_type
    if network_type == "lokr":
        assert json.loads(metadata["ss_network_args"]) == {"factor": "-1"}


@pytest.mark.parametrize("network_type", TYPES)
@pytest.mark.parametrize("file_format", ["comfyui", "musubi"])
def test_round_trip_and_warm_start_give_the_same_outputs(tmp_path, network_type, file_format):
    model = WanModel(blocks=1)
    rank = 1  # low-rank W2 for LoKr on these 8- and 16-wide layers, so alpha applies
    source = randomize(create_network(network_type, model, "wan", network_dim=rank, network_alpha=1.5))
    layer = model.blocks[0].cross_attn.v
    x = torch.randn(3, 8)
    expected = layer(x)
    path = tmp_path / "net.safetensors"
    save_lora(source, str(path), format=file_format)
    source.remove()
    target = create_network(network_type, model, "wan", network_dim=rank, network_alpha=7)  # alpha from the file
    report = target.warm_start(str(path))
    assert sorted(report.loaded_modules) == sorted(target.module_names()) and report.modules_not_in_file == []
    assert report.notes and "alpha 1.5 from the file" in report.notes[0]
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    torch.testing.assert_close(layer(x), expected)


def test_warm_start_refuses_another_type_or_rank_and_names_the_fix(tmp_path):
    model = WanModel(blocks=1)
    path = tmp_path / "loha.safetensors"
    save_lora(randomize(LoHaNetwork(model, "wan", network_dim=2)).requires_grad_(False), str(path))
    for network_type, title in (("lokr", "LoKr"), ("lora", "LoRA")):
        network = create_network(network_type, WanModel(blocks=1), "wan", network_dim=2)
        with pytest.raises(MusubiError, match=f"holds a LoHa network .* this network is a {title}; set the network type to loha"):
            network.warm_start(str(path))
    with pytest.raises(MusubiError, match="rank 2 in the file, 4 in the settings.*Set network_dim"):
        LoHaNetwork(WanModel(blocks=1), "wan", network_dim=4).warm_start(str(path))
    lora_path = tmp_path / "lora.safetensors"
    save_lora(LoRANetwork(WanModel(blocks=1), "wan", network_dim=2), str(lora_path))
    with pytest.raises(MusubiError, match="holds a LoRA network"):
        LoHaNetwork(WanModel(blocks=1), "wan", network_dim=2).warm_start(str(lora_path))
    # Plain load_weights takes the rank from the file (as for LoRA).
    assert LoHaNetwork(WanModel(blocks=1), "wan", network_dim=4).load_weights(str(path)).loaded_modules


def test_warm_start_refuses_a_file_of_another_model_size(tmp_path):
    path = tmp_path / "loha.safetensors"
    save_lora(LoHaNetwork(toy(features=12, out=20), "generic", network_dim=2), str(path))
    with pytest.raises(MusubiError, match="LoHa weights do not fit the model"):
        LoHaNetwork(toy(features=16, out=20), "generic", network_dim=2).warm_start(str(path))
    path = tmp_path / "lokr.safetensors"
    save_lora(LoKrNetwork(toy(features=12, out=20), "generic", network_dim=2), str(path))
    with pytest.raises(MusubiError, match="LoKr weights do not fit the model"):
        LoKrNetwork(toy(features=16, out=20), "generic", network_dim=2).warm_start(str(path))


def test_a_lokr_reloads_without_being_told_its_factor(tmp_path):
    """musubi-tuner needs the training factor again to reload a LoKr; the file's shapes say it all."""
    model = toy(features=16, out=24)
    source = randomize(LoKrNetwork(model, "generic", network_dim=2, factor=2))
    x = torch.randn(3, 16)
    expected = model(x)
    path = tmp_path / "lokr.safetensors"
    save_lora(source, str(path))
    source.remove()
    target = LoKrNetwork(model, "generic", network_dim=2)  # factor -1 would give W1 4×4
    assert target.lora_modules[0].factors == (4, 6, 4, 4)
    report = target.warm_start(str(path))
    assert target.lora_modules[0].factors == (2, 12, 2, 8)
    assert any("factorization" in note for note in report.notes)
    torch.testing.assert_close(model(x), expected)
    # The resumable state (the canonical state dict) round-trips too, full W2 included.
    full = randomize(LoKrNetwork(toy(), "generic", network_dim=8))
    again = LoKrNetwork(toy(), "generic", network_dim=8)
    again.load_state_dict(full.state_dict())
    assert all(torch.equal(again.state_dict()[k], v) for k, v in full.state_dict().items())


def test_a_full_lokr_file_needs_a_rank_that_keeps_w2_full(tmp_path):
    path = tmp_path / "full.safetensors"
    save_lora(randomize(LoKrNetwork(toy(), "generic", network_dim=8)), str(path))
    LoKrNetwork(toy(), "generic", network_dim=3).warm_start(str(path))  # 3 ≥ max(5, 4)/2: full as well
    with pytest.raises(MusubiError, match="full lokr_w2 .* rank 2 makes it low-rank"):
        LoKrNetwork(toy(), "generic", network_dim=2).warm_start(str(path))


def test_hand_made_lycoris_style_files_load(tmp_path):
    """musubi-tuner's kohya layout (lora_unet_ names), alpha as int64 and a full LoKr W2."""
    model = WanModel(blocks=1)
    w1 = torch.randn(2, 2)
    w2 = torch.randn(4, 4)  # 8 = 2·4 both ways
    save_file({"lora_unet_blocks_0_self_attn_q.lokr_w1": w1, "lora_unet_blocks_0_self_attn_q.lokr_w2": w2,
               "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(4, dtype=torch.int64)}, str(tmp_path / "lokr.safetensors"))
    network = LoKrNetwork(model, "wan", network_dim=4)
    report = network.load_weights(str(tmp_path / "lokr.safetensors"))
    assert report.file_format == "musubi" and report.loaded_modules == ["blocks.0.self_attn.q"]
    module = network.modules_by_name()["blocks.0.self_attn.q"]
    assert module.full and module.scale == 1.0
    torch.testing.assert_close(module.delta_weight(), torch.kron(w1, w2))


# --- merging and post-hoc EMA ----------------------------------------------------------------------


def _wan_weights(model):
    return {f"model.diffusion_model.{key}": value.detach().clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("network_type", TYPES)
@pytest.mark.parametrize("file_format", ["comfyui", "musubi"])
def test_merging_a_file_adds_the_weight_change_the_hooks_apply(tmp_path, network_type, file_format):
    model = WanModel(blocks=1)
    network = randomize(create_network(network_type, model, "wan", network_dim=2, network_alpha=1))
    path = tmp_path / "net.safetensors"
    save_lora(network, str(path), format=file_format)
    state_dict, _ = load_lora_file(str(path))
    weights = _wan_weights(model)
    merged, report = merge_loras_into_state_dict(weights, [(state_dict, 0.8)], architecture="wan")
    assert report.merged_weights == len(network.module_names())
    for module_path, module in network.modules_by_name().items():
        key = f"model.diffusion_model.{module_path}.weight"
        torch.testing.assert_close(merged[key], weights[key] + 0.8 * module.delta_weight().detach(), rtol=1e-6, atol=1e-6)


def test_merging_reads_a_decomposed_lokr_w1_and_refuses_tucker():
    model = WanModel(blocks=1)
    weights = _wan_weights(model)
    w1a, w1b, w2a, w2b = torch.randn(2, 1), torch.randn(1, 2), torch.randn(4, 3), torch.randn(3, 4)
    # ffn.2 maps 16 → 8: W1 2×2 (from lokr_w1_a·lokr_w1_b) ⊗ W2 4×8 (rank 3)
    lora = {"diffusion_model.blocks.0.ffn.2.lokr_w1_a": w1a, "diffusion_model.blocks.0.ffn.2.lokr_w1_b": w1b,
            "diffusion_model.blocks.0.ffn.2.lokr_w2_a": w2a, "diffusion_model.blocks.0.ffn.2.lokr_w2_b": w2b.repeat(1, 2),
            "diffusion_model.blocks.0.ffn.2.alpha": torch.tensor(1.5)}
    merged, _ = merge_loras_into_state_dict(weights, [(lora, 1.0)], architecture="wan")
    key = "model.diffusion_model.blocks.0.ffn.2.weight"
    expected = torch.kron(w1a @ w1b, w2a @ w2b.repeat(1, 2)) * 0.5  # alpha / rank of the low-rank W2
    torch.testing.assert_close(merged[key] - weights[key], expected)
    tucker = {"diffusion_model.blocks.0.ffn.2.lokr_w1": torch.randn(2, 2), "diffusion_model.blocks.0.ffn.2.lokr_t2": torch.randn(2, 2, 1, 1),
              "diffusion_model.blocks.0.ffn.2.lokr_w2_a": w2a, "diffusion_model.blocks.0.ffn.2.lokr_w2_b": w2b}
    with pytest.raises(MusubiError, match="Tucker"):
        merge_loras_into_state_dict(weights, [(tucker, 1.0)], architecture="wan")


def test_merging_a_loha_of_another_model_size_is_refused(tmp_path):
    network = LoHaNetwork(WanModel(blocks=1), "wan", network_dim=2)
    path = tmp_path / "net.safetensors"
    save_lora(network, str(path))
    other = _wan_weights(WanModel(blocks=1))
    other["model.diffusion_model.blocks.0.ffn.0.weight"] = torch.zeros(16, 9)  # another input width
    with pytest.raises(MusubiError, match="LoHa module blocks.0.ffn.0 cannot be merged"):
        merge_loras_into_state_dict(other, [(load_lora_file(str(path))[0], 1.0)], architecture="wan")


@pytest.mark.parametrize("network_type", TYPES)
def test_post_hoc_ema_merges_checkpoints_of_every_type(tmp_path, network_type):
    paths = []
    for step in range(3):
        network = randomize(create_network(network_type, WanModel(blocks=1), "wan", network_dim=2), seed=step)
        paths.append(str(tmp_path / f"run-step{step + 1:06d}.safetensors"))
        save_lora(network, paths[-1])
    result = post_hoc_ema_merge(paths, str(tmp_path / "ema.safetensors"), beta=0.5, no_sort=True)
    merged, metadata = read(tmp_path / "ema.safetensors")
    first, second, third = (read(path)[0] for path in paths)
    assert result.weights == [0.25, 0.25, 0.5]
    for key, value in merged.items():
        if key.endswith(".alpha"):
            assert torch.equal(value, first[key])
        else:
            torch.testing.assert_close(value, 0.25 * first[key] + 0.25 * second[key] + 0.5 * third[key])
    assert metadata["ss_network_module"] == f"networks.{network_type}"
    canonical, _, layout = load_lora_state_dict(str(tmp_path / "ema.safetensors"))
    assert layout == "comfyui" and file_network_type(canonical) == network_type


# --- module classes on their own ---------------------------------------------------------------------


def test_modules_can_be_built_on_their_own():
    loha = LoHaModule("x", nn.Linear(6, 4), rank=3, alpha=1.5)
    assert loha.hada_w1_a.shape == (4, 3) and loha.hada_w1_b.shape == (3, 6) and loha.scale == 0.5
    lokr = LoKrModule("x", nn.Linear(6, 4), rank=1, alpha=1.0)
    assert lokr.factors == (2, 2, 2, 3) and not lokr.full and lokr.lokr_w2_b.shape == (1, 3)
    with pytest.raises(MusubiError, match="rank"):
        LoHaModule("x", nn.Linear(3, 2), rank=0)


# --- the train command ---------------------------------------------------------------------------


def test_the_train_command_trains_lokr_and_warm_starts_from_its_file(tmp_path):
    toy_cache(tmp_path / "data")
    config = config_file(tmp_path)
    first = load_train_config(config, {"max_train_steps": 3, "save_state": False, "network_module": "networks.lokr",
                                       "network_args": ["factor=2"], "output_name": "lokr"})
    assert first.network_type == "lokr"
    result = train_from_config(first)
    saved, metadata = read(result.final_lora_path)
    assert metadata["ss_network_module"] == "networks.lokr" and json.loads(metadata["ss_network_args"]) == {"factor": "2"}
    assert file_network_type(saved) == "lokr"

    warm = load_train_config(config, {"max_train_steps": 1, "save_state": False, "network_type": "lokr",
                                      "network_weights": result.final_lora_path, "output_name": "warm",
                                      "learning_rate": 1e-12})
    continued, _ = read(train_from_config(warm).final_lora_path)  # factor -1 here: the file's split is kept
    assert set(continued) == set(saved)
    for key, value in saved.items():
        torch.testing.assert_close(continued[key], value, rtol=1e-6, atol=1e-9)

    wrong = load_train_config(config, {"max_train_steps": 1, "network_type": "loha", "output_name": "wrong",
                                       "network_weights": result.final_lora_path})
    with pytest.raises(MusubiError, match="holds a LoKr network"):
        train_from_config(wrong)
