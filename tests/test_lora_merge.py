"""Merging LoRAs into base weights before fp8 quantization (spec 3.2 "Merging", 4.5)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from musubi import cli
from musubi.errors import MusubiError
from musubi.fp8 import quantize_file, quantize_state_dict
from musubi.lora.merge import LoraMerger, load_lora_file, merge_loras_into_state_dict

torch.set_num_threads(1)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def wan_model(dtype=torch.float32, prefix=""):
    """A Wan-like model whose names contain underscores (self_attn, k_img), the hard case for kohya names."""
    keys = {
        "blocks.0.self_attn.q.weight": (32, 64), "blocks.0.self_attn.q.bias": (32,),
        "blocks.0.cross_attn.k_img.weight": (32, 64), "blocks.0.ffn.0.weight": (48, 64),
        "blocks.0.ffn.2.weight": (64, 48), "blocks.0.self_attn.norm_q.weight": (32,),
        "head.head.weight": (16, 64), "head.modulation": (1, 2, 64),
    }
    return {prefix + key: (randn(*shape, seed=index) * 0.05).to(dtype) for index, (key, shape) in enumerate(keys.items())}


def lora_pair(out_features, in_features, rank, seed):
    return randn(out_features, rank, seed=seed) * 0.1, randn(rank, in_features, seed=seed + 1000) * 0.1


def expected_merge(weight, additions):
    """W + Σ strength · (α/r) · U @ D, in float64, rounded to W's dtype."""
    total = weight.double()
    for up, down, alpha, strength in additions:
        rank = down.shape[0]
        total = total + strength * (alpha / rank) * (up.double() @ down.double())
    return total.to(weight.dtype)


def test_kohya_names_merge_with_alpha_and_strength():
    model = wan_model()
    up_q, down_q = lora_pair(32, 64, 4, seed=1)
    up_k, down_k = lora_pair(32, 64, 8, seed=2)
    lora = {
        "lora_unet_blocks_0_self_attn_q.lora_up.weight": up_q, "lora_unet_blocks_0_self_attn_q.lora_down.weight": down_q,
        "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(2.0),
        "lora_unet_blocks_0_cross_attn_k_img.lora_up.weight": up_k.half(),
        "lora_unet_blocks_0_cross_attn_k_img.lora_down.weight": down_k.half(),
        "lora_unet_blocks_0_cross_attn_k_img.alpha": torch.tensor(16, dtype=torch.int64),
    }
    merged, report = merge_loras_into_state_dict(model, [(lora, 0.7)], "wan")
    torch.testing.assert_close(merged["blocks.0.self_attn.q.weight"],
                               expected_merge(model["blocks.0.self_attn.q.weight"], [(up_q, down_q, 2.0, 0.7)]),
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(merged["blocks.0.cross_attn.k_img.weight"],
                               expected_merge(model["blocks.0.cross_attn.k_img.weight"], [(up_k.half(), down_k.half(), 16.0, 0.7)]),
                               rtol=1e-6, atol=1e-7)
    assert sorted(report.loras[0].merged) == ["blocks.0.cross_attn.k_img.weight", "blocks.0.self_attn.q.weight"]
    assert report.loras[0].unused_keys == [] and report.merged_weights == 2
    for key in ("blocks.0.ffn.0.weight", "blocks.0.self_attn.q.bias", "head.modulation"):
        assert merged[key] is model[key]


def test_comfyui_names_into_a_prefixed_bf16_model():
    model = wan_model(torch.bfloat16, prefix="model.diffusion_model.")
    up, down = lora_pair(48, 64, 4, seed=3)
    lora = {"diffusion_model.blocks.0.ffn.0.lora_up.weight": up, "diffusion_model.blocks.0.ffn.0.lora_down.weight": down,
            "diffusion_model.blocks.0.ffn.0.alpha": torch.tensor(1.0)}
    original = model["model.diffusion_model.blocks.0.ffn.0.weight"].clone()
    merged, report = merge_loras_into_state_dict(model, [(lora, 1.5)])
    result = merged["model.diffusion_model.blocks.0.ffn.0.weight"]
    assert result.dtype == torch.bfloat16
    reference = original.double() + 1.5 * (1.0 / 4) * (up.double() @ down.double())
    # One rounding to bf16 of the float32 sum: at most one bf16 step (2^-8 relative) away from the exact value.
    assert torch.all((result.double() - reference).abs() <= reference.abs() * 2.0 ** -8 + 1e-12)
    assert torch.equal(model["model.diffusion_model.blocks.0.ffn.0.weight"], original)  # input untouched
    assert report.loras[0].merged == ["model.diffusion_model.blocks.0.ffn.0.weight"]


@pytest.mark.parametrize("prefix", ["diffusion_model.", "transformer.", ""])
def test_peft_names_without_alpha_use_alpha_equal_rank(prefix):
    model = wan_model()
    up, down = lora_pair(64, 48, 6, seed=4)
    lora = {f"{prefix}blocks.0.ffn.2.lora_A.weight": down, f"{prefix}blocks.0.ffn.2.lora_B.weight": up}
    merged, _ = merge_loras_into_state_dict(model, [(lora, 0.5)])
    expected = model["blocks.0.ffn.2.weight"].double() + 0.5 * (up.double() @ down.double())
    torch.testing.assert_close(merged["blocks.0.ffn.2.weight"].double(), expected, rtol=1e-6, atol=1e-7)


def test_alpha_zero_means_alpha_equal_rank():
    model = wan_model()
    up, down = lora_pair(48, 64, 4, seed=30)
    lora = {"lora_unet_blocks_0_ffn_0.lora_up.weight": up, "lora_unet_blocks_0_ffn_0.lora_down.weight": down,
            "lora_unet_blocks_0_ffn_0.alpha": torch.tensor(0.0)}
    merged, _ = merge_loras_into_state_dict(model, [(lora, 1.0)])
    torch.testing.assert_close(merged["blocks.0.ffn.0.weight"], expected_merge(model["blocks.0.ffn.0.weight"], [(up, down, 4.0, 1.0)]))


def test_several_loras_add_up_and_unused_keys_are_reported():
    model = wan_model()
    up1, down1 = lora_pair(32, 64, 4, seed=5)
    up2, down2 = lora_pair(32, 64, 2, seed=6)
    first = {
        "lora_unet_blocks_0_self_attn_q.lora_up.weight": up1, "lora_unet_blocks_0_self_attn_q.lora_down.weight": down1,
        "lora_unet_blocks_7_self_attn_q.lora_up.weight": up1, "lora_unet_blocks_7_self_attn_q.lora_down.weight": down1,
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": up1,
        "lora_unet_blocks_0_ffn_0.lora_down.weight": down1,  # its lora_up is missing
        "step": torch.tensor(3),
    }
    second = {"diffusion_model.blocks.0.self_attn.q.lora_up.weight": up2,
              "diffusion_model.blocks.0.self_attn.q.lora_down.weight": down2,
              "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(1.0)}
    merged, report = merge_loras_into_state_dict(model, [(first, 1.0), (second, -2.0)])
    expected = expected_merge(model["blocks.0.self_attn.q.weight"], [(up1, down1, 4.0, 1.0), (up2, down2, 1.0, -2.0)])
    torch.testing.assert_close(merged["blocks.0.self_attn.q.weight"], expected, rtol=1e-6, atol=1e-7)
    assert report.loras[0].unused_keys == sorted([
        "lora_unet_blocks_7_self_attn_q.lora_up.weight", "lora_unet_blocks_7_self_attn_q.lora_down.weight",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", "lora_unet_blocks_0_ffn_0.lora_down.weight", "step"])
    summary = report.summary()
    assert "LoRA 1 (strength 1): merged into 1 layers; 5 keys unused" in summary
    assert "LoRA 2 (strength -2): merged into 1 layers" in summary


def test_conv_lora_is_the_composition_of_the_kernels():
    model = {"blocks.0.conv.weight": randn(8, 4, 3, 3, seed=7)}
    up = randn(8, 2, 1, 1, seed=8)
    down = randn(2, 4, 3, 3, seed=9)
    lora = {"lora_unet_blocks_0_conv.lora_up.weight": up, "lora_unet_blocks_0_conv.lora_down.weight": down,
            "lora_unet_blocks_0_conv.alpha": torch.tensor(1.0)}
    merged, _ = merge_loras_into_state_dict(model, [(lora, 1.0)], "generic")
    delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0].double(), down.double()) * 0.5
    torch.testing.assert_close(merged["blocks.0.conv.weight"].double(), model["blocks.0.conv.weight"].double() + delta,
                               rtol=1e-6, atol=1e-6)


def test_hunyuan_video_loras_in_comfyui_names_reach_the_official_layers():
    model = {
        "txt_in.individual_token_refiner.blocks.0.norm1.weight": torch.ones(32),
        "double_blocks.0.img_attn_qkv.weight": randn(96, 32, seed=10),
        "double_blocks.0.img_mod.linear.weight": randn(192, 32, seed=11),
        "double_blocks.0.img_mlp.fc1.weight": randn(128, 32, seed=12),
        "img_in.proj.weight": randn(32, 16, 1, 2, 2, seed=13),
    }
    up, down = lora_pair(96, 32, 4, seed=14)
    up_mlp, down_mlp = lora_pair(128, 32, 4, seed=15)
    lora = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": up,
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": down,
            "lora_unet_double_blocks_0_img_mlp_fc1.lora_up.weight": up_mlp,  # musubi-trained, official names
            "lora_unet_double_blocks_0_img_mlp_fc1.lora_down.weight": down_mlp}
    merged, report = merge_loras_into_state_dict(model, [(lora, 1.0)])
    assert sorted(report.loras[0].merged) == ["double_blocks.0.img_attn_qkv.weight", "double_blocks.0.img_mlp.fc1.weight"]
    torch.testing.assert_close(merged["double_blocks.0.img_attn_qkv.weight"],
                               expected_merge(model["double_blocks.0.img_attn_qkv.weight"], [(up, down, 4.0, 1.0)]))


def test_hunyuan_video_loras_in_official_names_reach_comfyuis_layers():
    """The reverse direction: a checkpoint in ComfyUI's names, LoRAs in the official (musubi-tuner,
    diffusion-pipe) names, plus a kohya name built from ComfyUI's own names, which ComfyUI also maps."""
    model = {
        "diffusion_model.txt_in.individual_token_refiner.blocks.0.norm1.weight": torch.ones(32),
        "diffusion_model.double_blocks.0.img_attn.qkv.weight": randn(96, 32, seed=40),
        "diffusion_model.double_blocks.0.img_mod.lin.weight": randn(192, 32, seed=41),
        "diffusion_model.double_blocks.0.img_mlp.0.weight": randn(128, 32, seed=42),
        "diffusion_model.double_blocks.0.img_mlp.2.weight": randn(32, 128, seed=43),
        "diffusion_model.single_blocks.0.modulation.lin.weight": randn(96, 32, seed=44),
    }
    pairs = {name: lora_pair(rows, columns, 2, seed=45 + index) for index, (name, rows, columns) in enumerate(
        [("qkv", 96, 32), ("mod", 192, 32), ("fc1", 128, 32), ("fc2", 32, 128), ("single_mod", 96, 32)])}
    lora = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": pairs["qkv"][0],
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": pairs["qkv"][1],
        "lora_unet_double_blocks_0_img_mod_linear.lora_up.weight": pairs["mod"][0],  # musubi-tuner
        "lora_unet_double_blocks_0_img_mod_linear.lora_down.weight": pairs["mod"][1],
        "transformer.double_blocks.0.img_mlp.fc1.lora_B.weight": pairs["fc1"][0],  # diffusion-pipe
        "transformer.double_blocks.0.img_mlp.fc1.lora_A.weight": pairs["fc1"][1],
        "diffusion_model.double_blocks.0.img_mlp.fc2.lora_up.weight": pairs["fc2"][0],  # older official-name files
        "diffusion_model.double_blocks.0.img_mlp.fc2.lora_down.weight": pairs["fc2"][1],
        "lora_unet_single_blocks_0_modulation_lin.lora_up.weight": pairs["single_mod"][0],  # ComfyUI's names
        "lora_unet_single_blocks_0_modulation_lin.lora_down.weight": pairs["single_mod"][1],
    }
    merged, report = merge_loras_into_state_dict(model, [(lora, 0.5)])
    targets = {"qkv": "double_blocks.0.img_attn.qkv", "mod": "double_blocks.0.img_mod.lin", "fc1": "double_blocks.0.img_mlp.0",
               "fc2": "double_blocks.0.img_mlp.2", "single_mod": "single_blocks.0.modulation.lin"}
    assert sorted(report.loras[0].merged) == sorted(f"diffusion_model.{path}.weight" for path in targets.values())
    assert report.loras[0].unused_keys == []
    for name, path in targets.items():
        key = f"diffusion_model.{path}.weight"
        up, down = pairs[name]
        torch.testing.assert_close(merged[key], expected_merge(model[key], [(up, down, 2.0, 0.5)]), rtol=1e-6, atol=1e-7)


def test_unused_keys_keep_their_names_in_the_file():
    """Keys of modules missing their other half, or matching no layer, are listed as written in the file."""
    model = wan_model()
    up, down = lora_pair(64, 48, 2, seed=50)
    lora = {"transformer.blocks.0.ffn.2.lora_B.weight": up, "transformer.blocks.0.ffn.2.lora_A.weight": down,
            "transformer.blocks.0.ffn.0.lora_A.weight": down,  # its lora_B is missing
            "diffusion_model.blocks.3.ffn.2.lora_up.weight": up, "diffusion_model.blocks.3.ffn.2.alpha": torch.tensor(1.0)}
    _, report = merge_loras_into_state_dict(model, [(lora, 1.0)])
    assert report.loras[0].merged == ["blocks.0.ffn.2.weight"]
    assert report.loras[0].unused_keys == ["diffusion_model.blocks.3.ffn.2.alpha", "diffusion_model.blocks.3.ffn.2.lora_up.weight",
                                           "transformer.blocks.0.ffn.0.lora_A.weight"]


def test_fp8_base_weights_are_refused():
    model = wan_model()
    model["blocks.0.self_attn.q.weight"] = model["blocks.0.self_attn.q.weight"].to(torch.float8_e4m3fn)
    up, down = lora_pair(32, 64, 4, seed=16)
    lora = {"lora_unet_blocks_0_self_attn_q.lora_up.weight": up, "lora_unet_blocks_0_self_attn_q.lora_down.weight": down}
    with pytest.raises(MusubiError, match="fp8.*Merge into the bf16/fp16 original, then quantize"):
        merge_loras_into_state_dict(model, [(lora, 1.0)])
    quantized = quantize_state_dict(wan_model(), architecture="wan")
    with pytest.raises(MusubiError, match="fp8"):
        merge_loras_into_state_dict(quantized, [(lora, 1.0)])


def test_mismatched_or_foreign_loras_are_refused():
    model = wan_model()
    up, down = lora_pair(16, 64, 4, seed=17)  # 16 outputs, the layer has 32
    lora = {"lora_unet_blocks_0_self_attn_q.lora_up.weight": up, "lora_unet_blocks_0_self_attn_q.lora_down.weight": down}
    with pytest.raises(MusubiError, match=r"do not fit the weight blocks\.0\.self_attn\.q\.weight of shape \[32, 64\]"):
        merge_loras_into_state_dict(model, [(lora, 1.0)])
    flux_lora = {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
                 "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down}
    with pytest.raises(MusubiError, match="matches no layer"):
        merge_loras_into_state_dict(model, [(flux_lora, 1.0)])
    with pytest.raises(MusubiError, match="strength"):
        merge_loras_into_state_dict(model, [(lora, float("nan"))])


def test_ambiguous_kohya_name_is_an_error_not_a_guess():
    model = {"blocks.0.a.b_c.weight": randn(8, 8, seed=18), "blocks.0.a_b.c.weight": randn(8, 8, seed=19)}
    up, down = lora_pair(8, 8, 2, seed=20)
    lora = {"lora_unet_blocks_0_a_b_c.lora_up.weight": up, "lora_unet_blocks_0_a_b_c.lora_down.weight": down}
    with pytest.raises(MusubiError, match="several layers"):
        merge_loras_into_state_dict(model, [(lora, 1.0)], "generic")
    dotted = {"blocks.0.a_b.c.lora_up.weight": up, "blocks.0.a_b.c.lora_down.weight": down}
    merged, _ = merge_loras_into_state_dict(model, [(dotted, 1.0)], "generic")
    assert merged["blocks.0.a.b_c.weight"] is model["blocks.0.a.b_c.weight"]
    torch.testing.assert_close(merged["blocks.0.a_b.c.weight"], expected_merge(model["blocks.0.a_b.c.weight"], [(up, down, 2.0, 1.0)]))


def test_load_lora_file(tmp_path):
    up, down = lora_pair(32, 64, 4, seed=21)
    path = str(tmp_path / "lora.safetensors")
    save_file({"lora_unet_blocks_0_self_attn_q.lora_up.weight": up, "lora_unet_blocks_0_self_attn_q.lora_down.weight": down},
              path, metadata={"ss_network_dim": "4"})
    state_dict, metadata = load_lora_file(path)
    assert torch.equal(state_dict["lora_unet_blocks_0_self_attn_q.lora_up.weight"], up)
    assert metadata == {"ss_network_dim": "4"}

    model_path = str(tmp_path / "model.safetensors")
    save_file(wan_model(), model_path)
    with pytest.raises(MusubiError, match="not a LoRA"):
        load_lora_file(model_path)
    loha_path = str(tmp_path / "loha.safetensors")
    save_file({"lora_unet_x.hada_w1_a": up, "lora_unet_x.hada_w1_b": down}, loha_path)
    assert set(load_lora_file(loha_path)[0]) == {"lora_unet_x.hada_w1_a", "lora_unet_x.hada_w1_b"}  # LoHa: read
    oft_path = str(tmp_path / "oft.safetensors")
    save_file({"lora_unet_x.oft_blocks": up}, oft_path)
    with pytest.raises(MusubiError, match="OFT"):
        load_lora_file(oft_path)
    with pytest.raises(MusubiError, match="not found"):
        load_lora_file(str(tmp_path / "missing.safetensors"))


def test_merge_then_quantize_equals_merging_by_hand(tmp_path):
    """quantize_file with LoRAs = quantize(merge(W)) (spec 4.5), streamed from the file."""
    model = wan_model(torch.bfloat16)
    model_path = str(tmp_path / "model.safetensors")
    save_file(model, model_path)
    up, down = lora_pair(48, 64, 4, seed=22)
    lora = {"lora_unet_blocks_0_ffn_0.lora_up.weight": up, "lora_unet_blocks_0_ffn_0.lora_down.weight": down,
            "lora_unet_blocks_0_ffn_0.alpha": torch.tensor(4.0), "lora_unet_missing.lora_up.weight": up.clone()}
    lora_path = str(tmp_path / "lora.safetensors")
    save_file(lora, lora_path)

    by_hand = dict(model)
    by_hand["blocks.0.ffn.0.weight"] = expected_merge(model["blocks.0.ffn.0.weight"], [(up, down, 4.0, 0.8)])
    expected = quantize_state_dict(by_hand)

    out_path = str(tmp_path / "out.safetensors")
    report = quantize_file(model_path, out_path, loras=[(load_lora_file(lora_path)[0], 0.8)])
    written = load_file(out_path)
    assert set(written) == set(expected)
    for key in expected:
        assert torch.equal(written[key].view(torch.uint8), expected[key].contiguous().view(torch.uint8)), key
    assert report.lora_report.loras[0].unused_keys == ["lora_unet_missing.lora_up.weight"]

    cli_out = str(tmp_path / "cli.safetensors")
    assert cli.main(["quantize", model_path, "--output_file", cli_out, "--lora_weight", lora_path, "--lora_multiplier", "0.8"]) == 0
    assert torch.equal(load_file(cli_out)["blocks.0.ffn.0.weight"].view(torch.uint8),
                       expected["blocks.0.ffn.0.weight"].view(torch.uint8))
    assert cli.main(["quantize", model_path, "--output_file", cli_out, "--lora_weight", lora_path,
                     "--lora_multiplier", "0.8", "0.5"]) == 2


def test_merger_plans_from_a_header_before_reading_weights():
    header = {"blocks.0.self_attn.q.weight": ("BF16", (32, 64)), "head.modulation": ("F32", (1, 2, 64))}
    up, down = lora_pair(32, 64, 4, seed=23)
    lora = {"lora_unet_blocks_0_self_attn_q.lora_up.weight": up, "lora_unet_blocks_0_self_attn_q.lora_down.weight": down}
    merger = LoraMerger(header, [(lora, 1.0)], "auto")
    assert merger.architecture == "wan"
    weight = randn(32, 64, seed=24).bfloat16()
    assert merger.merge("head.modulation", weight) is weight
    torch.testing.assert_close(merger.merge("blocks.0.self_attn.q.weight", weight),
                               expected_merge(weight, [(up, down, 4.0, 1.0)]))
    with pytest.raises(MusubiError, match="fp8"):
        LoraMerger({"blocks.0.self_attn.q.weight": ("F8_E4M3", (32, 64))}, [(lora, 1.0)], "wan")


def test_non_finite_loras_are_refused_naming_the_file_and_the_first_bad_key(tmp_path, capsys):
    model = wan_model(torch.bfloat16)
    model_path = str(tmp_path / "model.safetensors")
    save_file(model, model_path)
    up, down = lora_pair(48, 64, 4, seed=25)
    broken_up = up.clone()
    broken_up[3, 1] = float("nan")
    broken_down = down.clone()
    broken_down[0, 0] = float("inf")
    lora = {"lora_unet_blocks_0_ffn_0.alpha": torch.tensor(4.0), "lora_unet_blocks_0_ffn_0.lora_down.weight": broken_down,
            "lora_unet_blocks_0_ffn_0.lora_up.weight": broken_up}
    lora_path = str(tmp_path / "diverged.safetensors")
    save_file(lora, lora_path)

    with pytest.raises(MusubiError, match=r"diverged\.safetensors: lora_unet_blocks_0_ffn_0\.lora_down\.weight holds "
                                          r"NaN/inf values \(2 of 3 tensors do\)"):
        load_lora_file(lora_path)
    out_path = str(tmp_path / "out.safetensors")
    assert cli.main(["quantize", model_path, "--output_file", out_path, "--lora_weight", lora_path]) == 2
    error = capsys.readouterr().err
    assert "diverged.safetensors: lora_unet_blocks_0_ffn_0.lora_down.weight holds NaN/inf" in error, error
    assert not os.path.exists(out_path)

    # Given as tensors (no file), the merger itself refuses what it would use.
    with pytest.raises(MusubiError, match=r"LoRA 1: lora_unet_blocks_0_ffn_0\.lora_up\.weight holds NaN/inf"):
        merge_loras_into_state_dict(model, [({"lora_unet_blocks_0_ffn_0.lora_up.weight": broken_up,
                                              "lora_unet_blocks_0_ffn_0.lora_down.weight": down}, 1.0)])


def test_a_merge_that_is_not_finite_names_the_weight():
    # A finite LoRA makes a non-finite weight only when the weight was broken already, or when the
    # sum overflows the weight's dtype (here float16 at a huge strength).
    model = wan_model(torch.float16)
    up, down = lora_pair(48, 64, 4, seed=26)
    lora = {"lora_unet_blocks_0_ffn_0.lora_up.weight": up, "lora_unet_blocks_0_ffn_0.lora_down.weight": down}
    with pytest.raises(MusubiError, match=r"Merging the LoRA\(s\) into blocks\.0\.ffn\.0\.weight gives values beyond "
                                          r"what float16 can hold \(strength 1e\+09\)"):
        merge_loras_into_state_dict(model, [(lora, 1e9)])
    model["blocks.0.ffn.0.weight"][0, 0] = float("nan")
    with pytest.raises(MusubiError, match=r"base weight blocks\.0\.ffn\.0\.weight already holds NaN/inf"):
        merge_loras_into_state_dict(model, [(lora, 1.0)])
    merged, _ = merge_loras_into_state_dict(wan_model(torch.float16), [(lora, 1.0)])
    assert torch.isfinite(merged["blocks.0.ffn.0.weight"]).all()
