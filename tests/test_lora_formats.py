"""LoRA files: ComfyUI and musubi-tuner layouts, round trips, metadata and hashes, reading
hand-made files of every layout, error cases, and (with ComfyUI present) that ComfyUI's own
LoRA loader applies every key of a saved file."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from comfy_server import find_comfyui
from musubi.errors import MusubiError
from musubi.lora.formats import (
    check_is_lora, convert_lora_file, group_lora_modules, load_lora_state_dict, save_lora, to_canonical, training_metadata,
)
from musubi.lora.network import LoRANetwork, network_from_args
from test_lora_network import HunyuanVideo, QwenImageTransformer2DModel, WanModel

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent


def trained(network, seed=0):
    """Give every LoRA weight and alpha distinct random values, as after some training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for index, module in enumerate(network.lora_modules):
            module.lora_down.weight.copy_(torch.randn(module.lora_down.weight.shape, generator=generator))
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator))
            module.alpha.fill_(0.5 + index)
            module._refresh_scale()
    return network


def read(path):
    with safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, file.metadata()


# --- layouts --------------------------------------------------------------------------------------


def test_comfyui_format_keys_are_diffusion_model_paths_of_every_module(tmp_path):
    network = trained(LoRANetwork(HunyuanVideo(), "hunyuan_video", network_dim=3))
    path = tmp_path / "lora.safetensors"
    save_lora(network, str(path))
    tensors, _ = read(path)
    expected = set()
    for name in network.module_names():
        expected |= {f"diffusion_model.{name}.lora_up.weight", f"diffusion_model.{name}.lora_down.weight",
                     f"diffusion_model.{name}.alpha"}
    assert set(tensors) == expected
    assert "diffusion_model.double_blocks.0.img_mlp.0.lora_up.weight" in tensors


def test_musubi_format_uses_musubi_tuners_hunyuan_video_names(tmp_path):
    network = trained(LoRANetwork(HunyuanVideo(), "hunyuan_video", network_dim=3, include_patterns=[".*img_mod.*"]))
    path = tmp_path / "lora.safetensors"
    save_lora(network, str(path), format="musubi")
    tensors, _ = read(path)
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert modules == {
        f"lora_unet_double_blocks_{b}_{name}"
        for b in (0, 1)
        for name in ("img_attn_qkv", "img_attn_proj", "img_mlp_fc1", "img_mlp_fc2", "img_mod_linear",
                     "txt_attn_qkv", "txt_attn_proj", "txt_mlp_fc1", "txt_mlp_fc2")
    } | {f"lora_unet_single_blocks_{b}_{name}" for b in (0, 1) for name in ("linear1", "linear2")}
    up = tensors["lora_unet_double_blocks_1_img_mlp_fc1.lora_up.weight"]
    assert torch.equal(up, network.modules_by_name()["double_blocks.1.img_mlp.0"].lora_up.weight)


@pytest.mark.parametrize("file_format", ["comfyui", "musubi"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_restores_tensors_dtypes_and_alpha(tmp_path, file_format, dtype):
    source = trained(LoRANetwork(HunyuanVideo(), "hunyuan_video", network_dim=3))
    path = tmp_path / "lora.safetensors"
    save_lora(source, str(path), format=file_format, dtype=dtype)
    tensors, _ = read(path)
    assert {t.dtype for t in tensors.values()} == {dtype}
    assert all(t.dim() == 0 for key, t in tensors.items() if key.endswith(".alpha"))

    target = LoRANetwork(HunyuanVideo(), "hunyuan_video", network_dim=7, network_alpha=3)  # other rank
    report = target.load_weights(str(path))
    assert report.file_format == file_format and report.unmatched_keys == [] and report.modules_not_in_file == []
    expected = {key: value.to(dtype).float() for key, value in source.state_dict().items()}
    loaded = target.state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key].float(), value), key
    for before, after in zip(source.lora_modules, target.lora_modules):
        assert after.rank == 3 and after.scale == pytest.approx(float(before.alpha.to(dtype)) / 3)


def test_loaded_lora_computes_the_same_output_as_the_saved_one(tmp_path):
    torch.manual_seed(0)
    model = WanModel(blocks=1)
    source = trained(LoRANetwork(model, "wan", network_dim=2))
    layer = model.blocks[0].cross_attn.v
    x = torch.randn(3, 8)
    with_source = layer(x)
    save_lora(source, str(tmp_path / "lora.safetensors"), format="musubi")
    source.remove()
    LoRANetwork(model, "wan", network_dim=5).load_weights(str(tmp_path / "lora.safetensors"))
    torch.testing.assert_close(layer(x), with_source)


# --- reading hand-made files ----------------------------------------------------------------------


def hand_made_expectation(model, path, down, up, scale, x):
    layer = dict(model.named_modules())[path]
    return layer(x).double(), (x.double() @ down.double().T) @ up.double().T * scale


def test_a_hand_made_musubi_file_loads_with_its_rank_and_alpha(tmp_path):
    model = WanModel(blocks=2)
    down, up = torch.randn(3, 8), torch.randn(8, 3)
    file = {
        # "self_attn" has an underscore of its own: names are resolved through the model's table.
        "lora_unet_blocks_1_self_attn_q.lora_down.weight": down,
        "lora_unet_blocks_1_self_attn_q.lora_up.weight": up,
        "lora_unet_blocks_1_self_attn_q.alpha": torch.tensor(1.5, dtype=torch.float16),
    }
    save_file(file, str(tmp_path / "musubi.safetensors"))
    network = LoRANetwork(model, "wan", network_dim=4)
    report = network.load_weights(str(tmp_path / "musubi.safetensors"))
    assert report.file_format == "musubi" and report.loaded_modules == ["blocks.1.self_attn.q"]
    module = network.modules_by_name()["blocks.1.self_attn.q"]
    assert module.rank == 3 and module.scale == 0.5
    x = torch.randn(2, 8)
    layer = model.blocks[1].self_attn.q
    network.remove()
    base = layer(x).double()
    network.attach()
    expected = base + 0.5 * (x.double() @ down.double().T) @ up.double().T
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix", ["transformer.", "diffusion_model."])
def test_diffusers_peft_keys_load_with_alpha_equal_to_rank(prefix):
    model = WanModel(blocks=1)
    down, up = torch.randn(2, 8), torch.randn(16, 2)
    network = LoRANetwork(model, "wan")
    report = network.load_weights({f"{prefix}blocks.0.ffn.0.lora_A.weight": down,
                                   f"{prefix}blocks.0.ffn.0.lora_B.weight": up})
    assert report.file_format == "diffusers"
    module = network.modules_by_name()["blocks.0.ffn.0"]
    assert module.rank == 2 and module.scale == 1.0
    assert torch.equal(module.lora_down.weight, down) and torch.equal(module.lora_up.weight, up)


def test_official_hunyuan_video_names_load_onto_comfyuis_tree():
    # diffusion-pipe style (PEFT keys on the official names)
    network = LoRANetwork(HunyuanVideo(), "hunyuan_video")
    down, up = torch.randn(2, 8), torch.randn(24, 2)
    network.load_weights({"transformer.double_blocks.1.img_attn_qkv.lora_A.weight": down,
                          "transformer.double_blocks.1.img_attn_qkv.lora_B.weight": up})
    module = network.modules_by_name()["double_blocks.1.img_attn.qkv"]
    assert torch.equal(module.lora_up.weight, up)


def test_load_lora_state_dict_reports_layout_and_resolves_with_module_names(tmp_path):
    network = trained(LoRANetwork(QwenImageTransformer2DModel(), "qwen_image", network_dim=2))
    path = str(tmp_path / "lora.safetensors")
    save_lora(network, path, format="musubi")
    raw, metadata, layout = load_lora_state_dict(path)
    assert layout == "musubi" and "lora_unet_transformer_blocks_0_attn_to_out_0.lora_up.weight" in raw
    assert metadata["ss_network_module"] == "networks.lora_qwen_image"
    canonical, _, _ = load_lora_state_dict(path, module_names=network.module_names(), arch="qwen_image")
    assert set(canonical) == set(network.state_dict())


def test_convert_between_layouts_keeps_tensors_and_metadata(tmp_path):
    network = trained(LoRANetwork(HunyuanVideo(), "hunyuan_video", network_dim=2))
    musubi_path, comfy_path, back_path = (str(tmp_path / n) for n in ("m.safetensors", "c.safetensors", "b.safetensors"))
    save_lora(network, musubi_path, format="musubi", metadata={"ss_seed": "7"})
    with pytest.raises(MusubiError, match="module names"):
        convert_lora_file(musubi_path, comfy_path, "comfyui", arch="hunyuan_video")
    convert_lora_file(musubi_path, comfy_path, "comfyui", module_names=network.module_names(), arch="hunyuan_video")
    convert_lora_file(comfy_path, back_path, "musubi", arch="hunyuan_video")
    original, original_meta = read(musubi_path)
    converted, converted_meta = read(comfy_path)
    back, back_meta = read(back_path)
    assert "diffusion_model.double_blocks.0.img_mlp.0.lora_down.weight" in converted
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)
    assert converted_meta["ss_seed"] == back_meta["ss_seed"] == "7"
    assert back_meta["sshs_model_hash"] == original_meta["sshs_model_hash"]  # same tensors, same hash


def test_grouped_modules_keep_the_file_keys_of_every_tensor():
    down, up, alpha = torch.randn(2, 8), torch.randn(16, 2), torch.tensor(3.0)
    lora = {"transformer.blocks.0.ffn.0.lora_A.weight": down, "transformer.blocks.0.ffn.0.lora_B.weight": up,
            "lora_unet_blocks_0_self_attn_q.lora_down.weight": down, "lora_unet_blocks_0_self_attn_q.alpha": alpha,
            "lora_unet_blocks_5_ffn_0.lora_down.weight": down, "step": torch.tensor(1)}
    grouped = group_lora_modules(lora, ["blocks.0.ffn.0", "blocks.0.self_attn.q"], "wan")
    assert grouped.file_format == "mixed"
    assert grouped.modules == {
        "blocks.0.ffn.0": {".lora_down.weight": ("transformer.blocks.0.ffn.0.lora_A.weight", down),
                           ".lora_up.weight": ("transformer.blocks.0.ffn.0.lora_B.weight", up)},
        "blocks.0.self_attn.q": {".lora_down.weight": ("lora_unet_blocks_0_self_attn_q.lora_down.weight", down),
                                 ".alpha": ("lora_unet_blocks_0_self_attn_q.alpha", alpha)},
    }
    assert set(grouped.unresolved) == {"lora_unet_blocks_5_ffn_0.lora_down.weight", "step"}


def test_an_ambiguous_kohya_name_is_an_error_not_a_guess():
    down, up = torch.randn(2, 8), torch.randn(8, 2)
    lora = {"lora_unet_blocks_0_a_b_c.lora_down.weight": down, "lora_unet_blocks_0_a_b_c.lora_up.weight": up}
    with pytest.raises(MusubiError, match=r"fits several layers \(blocks\.0\.a\.b_c, blocks\.0\.a_b\.c\)"):
        to_canonical(lora, ["blocks.0.a_b.c", "blocks.0.a.b_c"])
    canonical, _ = to_canonical(lora, ["blocks.0.a_b.c", "blocks.0.x"])  # unambiguous on another model
    assert set(canonical) == {"blocks.0.a_b.c.lora_down.weight", "blocks.0.a_b.c.lora_up.weight", "blocks.0.a_b.c.alpha"}


def test_hunyuan_video_kohya_names_in_either_naming_resolve():
    """musubi-tuner writes the official names; ComfyUI also maps lora_unet_ names built from its own."""
    down, up = torch.randn(2, 8), torch.randn(8, 2)
    lora = {"lora_unet_double_blocks_0_img_mod_linear.lora_down.weight": down,
            "lora_unet_double_blocks_0_img_mod_linear.lora_up.weight": up,
            "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight": down,
            "lora_unet_double_blocks_0_img_mlp_0.lora_up.weight": up,
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,  # alike in both namings
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up}
    names = ["double_blocks.0.img_mod.lin", "double_blocks.0.img_mlp.0", "double_blocks.0.img_attn.qkv"]
    canonical, layout = to_canonical(lora, names, "hunyuan_video")
    assert layout == "musubi"
    assert set(canonical) == {f"{name}{suffix}" for name in names for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha")}


def test_check_is_lora_reads_key_names_only():
    check_is_lora(["lora_unet_x.lora_down.weight", "lora_unet_x.alpha"])
    check_is_lora(["transformer.x.lora_B.weight"])
    with pytest.raises(MusubiError, match="not a LoRA"):
        check_is_lora(["blocks.0.ffn.0.weight", "x.alpha"])
    # LoHa and LoKr are LoRA-family networks this pack trains and loads; OFT is not.
    check_is_lora(["lora_unet_x.lokr_w1", "lora_unet_x.lokr_w2"])
    check_is_lora(["diffusion_model.x.hada_w1_a", "diffusion_model.x.hada_w1_b", "diffusion_model.x.alpha"])
    with pytest.raises(MusubiError, match="OFT"):
        check_is_lora(["lora_unet_x.oft_blocks", "lora_unet_x.alpha"])


# --- metadata and hashes --------------------------------------------------------------------------


def test_metadata_has_musubis_keys_and_the_hashes_of_the_written_file(tmp_path):
    timestamp = 1_700_000_000.7
    network = network_from_args(QwenImageTransformer2DModel(), "qwen_image", network_dim=4, network_alpha=2,
                                network_args=["loraplus_lr_ratio=4", "exclude_patterns=['.*txt.*']"])
    trained(network)
    values = {"learning_rate": 1e-4, "seed": 42, "output_name": "my_lora", "ss_steps": 100,
              "datasets": [{"resolution": [512, 512]}]}
    metadata = training_metadata("qwen_image", 4, 2.0, network_args=network.network_args, values=values,
                                 timestamp=timestamp)
    path = tmp_path / "lora.safetensors"
    written = save_lora(network, str(path), metadata=metadata)
    _, stored = read(path)
    assert stored == written
    assert stored["ss_learning_rate"] == "0.0001" and stored["ss_seed"] == "42" and stored["ss_steps"] == "100"
    assert json.loads(stored["ss_datasets"]) == [{"resolution": [512, 512]}]
    assert stored["ss_network_module"] == "networks.lora_qwen_image"
    assert stored["ss_base_model_version"] == "qwen_image"
    assert (stored["ss_network_dim"], stored["ss_network_alpha"]) == ("4", "2.0")
    assert json.loads(stored["ss_network_args"]) == {"loraplus_lr_ratio": "4", "exclude_patterns": "['.*txt.*']"}
    assert stored["modelspec.sai_model_spec"] == "1.0.0"
    assert stored["modelspec.architecture"] == "Qwen-Image/lora"
    assert stored["modelspec.implementation"] == "https://github.com/QwenLM/Qwen-Image"
    assert stored["modelspec.title"] == "my_lora"
    assert stored["modelspec.resolution"] == "1328x1328"
    assert stored["modelspec.date"] == datetime.datetime.fromtimestamp(1_700_000_000).isoformat()

    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    assert stored["sshs_model_hash"] == hashlib.sha256(data[8 + header_length:]).hexdigest()
    assert len(data) < 0x100000 and stored["sshs_legacy_hash"] == "e3b0c442"  # SHA-256 of nothing


def test_legacy_hash_covers_the_second_mebibyte_of_the_training_metadata_serialisation(tmp_path):
    class BigBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(512, 512), nn.Linear(512, 512)

    network = trained(LoRANetwork(nn.Sequential(BigBlock()), "generic", network_dim=300))
    path = tmp_path / "big.safetensors"
    stored = save_lora(network, str(path), metadata={"ss_seed": "1", "modelspec.title": "x"})
    tensors, _ = read(path)
    buffer = safetensors.torch.save(tensors, {k: v for k, v in stored.items() if k.startswith("ss_")})
    assert len(buffer) > 0x110000
    assert stored["sshs_legacy_hash"] == hashlib.sha256(buffer[0x100000:0x110000]).hexdigest()[:8]


def test_default_metadata_without_caller_values(tmp_path):
    network = LoRANetwork(WanModel(blocks=1), "wan", network_dim=2, network_alpha=1)
    stored = save_lora(network, str(tmp_path / "lora.safetensors"))
    assert stored["ss_network_module"] == "networks.lora_wan" and stored["ss_base_model_version"] == "wan"
    assert stored["modelspec.architecture"] == "wan2.1/lora" and stored["modelspec.resolution"] == "1280x720"
    assert stored["modelspec.title"].startswith("LoRA@")
    assert "ss_network_args" not in stored


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path):
    network = LoRANetwork(WanModel(blocks=1), "wan")
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(MusubiError):
        save_lora(network, str(path), metadata={"ss_seed": 3})  # not a string: refused before writing
    assert path.read_bytes() == b"old"
    save_lora(network, str(path))
    assert os.listdir(tmp_path) == ["lora.safetensors"]


# --- errors ---------------------------------------------------------------------------------------


def test_a_model_checkpoint_is_not_a_lora(tmp_path):
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(8, 8)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(MusubiError, match="not a LoRA"):
        load_lora_state_dict(str(tmp_path / "model.safetensors"))
    with pytest.raises(MusubiError, match="not a LoRA"):
        LoRANetwork(WanModel(blocks=1), "wan").load_weights(str(tmp_path / "model.safetensors"))


def test_a_missing_or_broken_file_is_named(tmp_path):
    with pytest.raises(MusubiError, match="nothing.safetensors"):
        load_lora_state_dict(str(tmp_path / "nothing.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(MusubiError, match="broken.safetensors"):
        load_lora_state_dict(str(tmp_path / "broken.safetensors"))


def test_a_layer_size_mismatch_names_the_module():
    network = LoRANetwork(WanModel(blocks=1), "wan")
    with pytest.raises(MusubiError, match=r"blocks\.0\.ffn\.0.*\[2, 5\]"):
        network.load_weights({"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(2, 5),
                              "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.zeros(16, 2)})


def test_keys_matching_no_module_fail_strictly_and_are_reported_otherwise():
    good = {"lora_unet_blocks_0_ffn_0.lora_down.weight": torch.ones(2, 8),
            "lora_unet_blocks_0_ffn_0.lora_up.weight": torch.ones(16, 2)}
    stray = {"lora_unet_blocks_9_ffn_0.lora_down.weight": torch.ones(2, 8),
             "lora_unet_blocks_9_ffn_0.lora_up.weight": torch.ones(16, 2)}
    network = LoRANetwork(WanModel(blocks=1), "wan")
    with pytest.raises(MusubiError, match="lora_unet_blocks_9_ffn_0"):
        network.load_weights({**good, **stray})
    report = network.load_weights({**good, **stray}, strict=False)
    assert sorted(report.unmatched_keys) == sorted(stray)
    assert report.loaded_modules == ["blocks.0.ffn.0"]
    assert torch.equal(network.modules_by_name()["blocks.0.ffn.0"].lora_up.weight, torch.ones(16, 2))


def test_unsupported_network_types_and_formats_are_refused(tmp_path):
    with pytest.raises(MusubiError, match="LoHa"):
        LoRANetwork(WanModel(blocks=1), "wan").load_weights({"lora_unet_blocks_0_ffn_0.hada_w1_a": torch.zeros(2, 2)})
    network = LoRANetwork(WanModel(blocks=1), "wan")
    with pytest.raises(MusubiError, match="comfyui, musubi"):
        save_lora(network, str(tmp_path / "x.safetensors"), format="diffusers")
    with pytest.raises(MusubiError, match="float32, float16 or bfloat16"):
        save_lora(network, str(tmp_path / "x.safetensors"), dtype=torch.int8)


# --- inside ComfyUI -------------------------------------------------------------------------------

# Runs in a subprocess so ComfyUI's import-time global state stays out of the test process. For
# each tiny checkpoint: build ComfyUI's model, attach a network, save it in both layouts, load the
# ComfyUI file with ComfyUI's own LoRA loader, and compare its patched layers with the hooks.
COMFY_LORA_SCRIPT = r"""
import json, logging, sys
comfy_path, tests_dir, repo_root = sys.argv[1:4]
sys.path[:0] = [comfy_path, tests_dir, repo_root]
import torch
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.lora, comfy.sd, comfy.utils
from tiny_checkpoints import tiny_state_dict
from musubi.lora.formats import save_lora
from musubi.lora.network import LoRANetwork

messages = []
class Collect(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())
logging.getLogger().addHandler(Collect())

results = {}
for arch, preset in (("wan21_t2v", "wan"), ("hunyuan_video", "hunyuan_video")):
    patcher = comfy.sd.load_diffusion_model_state_dict(tiny_state_dict(arch, dtype=torch.float32))
    model = patcher.model.diffusion_model
    network = LoRANetwork(model, preset, network_dim=2, network_alpha=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network.lora_modules:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * 0.1)
    layers = dict(model.named_modules())
    inputs = {p: torch.randn(3, layers[p].in_features, generator=generator) for p in network.module_names()}
    hooked = {p: layers[p](x) for p, x in inputs.items()}
    network.remove()

    path = f"{sys.argv[4]}/{arch}.safetensors"
    save_lora(network, path, format="comfyui")
    del messages[:]
    lora = comfy.utils.load_torch_file(path)
    patched_model, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    patched_keys = sorted(patched_model.patches)
    patched_model.patch_model()
    deviation = max(((layers[p](x) - hooked[p]).abs().max() / hooked[p].abs().max()).item() for p, x in inputs.items())
    patched_model.unpatch_model()

    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    musubi_names = {p: network.preset.musubi_name(p) for p in network.module_names()}
    results[arch] = {
        "targets": network.module_names(),
        "layers": sorted(p for p, m in layers.items() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d))),
        "file_keys": len(lora),
        "patched": patched_keys,
        "not_loaded": [m for m in messages if "not loaded" in m.lower()],
        "deviation": deviation,
        "musubi_names": musubi_names,
        "key_map": {k: v for k, v in key_map.items() if isinstance(v, str)},
    }
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def comfy_lora_results(tmp_path_factory):
    comfy_path = find_comfyui()
    if comfy_path is None:
        pytest.skip("ComfyUI not found: set COMFYUI_PATH or unpack ComfyUI at ~/comfy/ComfyUI")
    folder = tmp_path_factory.mktemp("comfy_lora")
    process = subprocess.run(
        [sys.executable, "-c", COMFY_LORA_SCRIPT, str(comfy_path), str(Path(__file__).parent), str(REPO_ROOT), str(folder)],
        capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULTS ")]
    assert process.returncode == 0 and lines, f"ComfyUI LoRA check failed:\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.comfyui
def test_comfyui_default_targets_are_attention_and_mlp_layers(comfy_lora_results):
    wan = comfy_lora_results["wan21_t2v"]
    block_layers = [p for p in wan["layers"] if p.startswith("blocks.")]
    assert sorted(wan["targets"]) == block_layers  # Wan blocks hold only attention / FFN Linears
    assert {p.split(".", 2)[2] for p in wan["targets"]} == {
        "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
        "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"}
    hunyuan = comfy_lora_results["hunyuan_video"]
    assert {p.split(".", 2)[2] for p in hunyuan["targets"]} == {
        "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
        "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "linear1", "linear2"}
    # Everything else is outside the blocks (embeddings, token refiner, head) or modulation.
    assert {p.split(".")[0] for p in set(wan["layers"]) - set(wan["targets"])} == {
        "patch_embedding", "text_embedding", "time_embedding", "time_projection", "head"}
    left_out = set(hunyuan["layers"]) - set(hunyuan["targets"])
    assert {p.split(".")[0] for p in left_out} == {
        "img_in", "time_in", "vector_in", "guidance_in", "txt_in", "double_blocks", "single_blocks", "final_layer"}
    assert {p.split(".", 2)[2] for p in left_out if p.startswith(("double_blocks.", "single_blocks."))} == {
        "img_mod.lin", "txt_mod.lin", "modulation.lin"}


@pytest.mark.comfyui
@pytest.mark.parametrize("arch", ["wan21_t2v", "hunyuan_video"])
def test_comfyui_lora_loader_applies_every_key_of_a_comfyui_file(comfy_lora_results, arch):
    result = comfy_lora_results[arch]
    assert result["not_loaded"] == []
    assert result["file_keys"] == 3 * len(result["targets"])
    assert result["patched"] == sorted(f"diffusion_model.{p}.weight" for p in result["targets"])
    assert result["deviation"] < 1e-4  # ComfyUI's merged weights compute what the hooks computed


@pytest.mark.comfyui
def test_musubi_names_are_the_ones_comfyui_maps_for_hunyuan_video_loras(comfy_lora_results):
    hunyuan = comfy_lora_results["hunyuan_video"]
    key_map = hunyuan["key_map"]
    for path, musubi in hunyuan["musubi_names"].items():
        weight = f"diffusion_model.{path}.weight"
        # diffusion-pipe / converted musubi layout: the official name under transformer. / diffusion_model.
        assert key_map[f"transformer.{musubi}"] == weight
        assert key_map[f"diffusion_model.{musubi}"] == weight
        kohya = "lora_unet_" + musubi.replace(".", "_")
        if kohya in key_map:  # ComfyUI maps kohya names only where official and ComfyUI names agree
            assert key_map[kohya] == weight
    assert hunyuan["musubi_names"]["double_blocks.0.img_mlp.0"] == "double_blocks.0.img_mlp.fc1"
    wan = comfy_lora_results["wan21_t2v"]
    for path, musubi in wan["musubi_names"].items():
        assert wan["key_map"]["lora_unet_" + musubi.replace(".", "_")] == f"diffusion_model.{path}.weight"
