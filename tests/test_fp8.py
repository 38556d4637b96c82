"""Block-scaled FP8 quantization (spec section 4), checked against formulas written out here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from musubi import cli, files as safetensors_io
from musubi.architectures import detect_architecture
from musubi.errors import MusubiError
from musubi.fp8 import (check_not_prequantized, dequantize_state_dict, dequantize_weight,
                        is_scaled_fp8_state_dict, quantize_file, quantize_state_dict, quantize_state_dict_with_report,
                        quantize_checkpoint, quantize_weight, scale_key_for, scale_shape, should_quantize)

torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E4M3_MAX = 448.0
E5M2_MAX = 57344.0


def seeded_randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def weights_with_outliers(seed=0, rows=256, cols=1024):
    """Gaussian weights whose rows span four decades, with a few 100x outliers."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    weight *= 10 ** (torch.rand(rows, 1, generator=generator) * 4 - 4)
    outliers = torch.randint(0, weight.numel(), (rows // 4,), generator=generator)
    weight.view(-1)[outliers] *= 100
    return weight


def relative_error(approximation, reference):
    return float((approximation.double() - reference.double()).norm() / reference.double().norm())


def as_bytes(tensor):
    """The raw bytes of a tensor, to compare fp8 codes exactly."""
    return tensor.contiguous().view(torch.uint8)


# --- one weight: exact scales and codes ---------------------------------------------------


def test_block_scales_are_absmax_over_448_per_block_and_codes_are_exact():
    # Row 0: block 0 has max 224 -> scale 0.5, block 1 max 4.48e-3 -> scale 1e-5 (stored in bf16);
    # row 1: all zeros in block 0, one negative maximum in block 1.
    weight = torch.zeros(2, 128)
    weight[0, :64] = torch.linspace(-100, 100, 64)
    weight[0, 5] = 224.0
    weight[0, 64:] = torch.linspace(-4.48e-3, 4.0e-3, 64)
    weight[1, 64 + 7] = -896.0
    weight[1, 64 + 8] = 3.5
    result = quantize_weight(weight, "e4m3fn", "block", 64)

    assert result.mode == "block"
    assert result.scale.shape == (2, 2, 1) and result.scale.dtype == torch.bfloat16
    blocks = weight.double().reshape(2, 2, 64)
    expected_scale = (blocks.abs().amax(dim=2, keepdim=True) / E4M3_MAX).float()
    expected_scale[1, 0, 0] = torch.finfo(torch.float32).tiny  # an all-zero block never gets scale 0
    expected_scale = expected_scale.to(torch.bfloat16)
    assert torch.equal(result.scale, expected_scale)
    assert float(result.scale[0, 0, 0]) == 0.5 and float(result.scale[1, 1, 0]) == 2.0

    expected_codes = (blocks.float() / expected_scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).reshape(2, 128)
    assert result.q.dtype == torch.float8_e4m3fn and result.q.shape == (2, 128)
    assert torch.equal(as_bytes(result.q), as_bytes(expected_codes))
    # Values that are exact multiples of the scale come back exactly.
    assert float(result.q[0, 5].float()) == 448.0
    assert float(result.q[1, 64 + 7].float()) == -448.0 and float(result.q[1, 64 + 8].float()) == 1.75
    assert torch.all(result.q[1, :64].float() == 0)


@pytest.mark.parametrize("mode", ["block", "channel", "tensor"])
def test_large_weights_match_the_plain_formula(mode):
    """A layer big enough to be processed in several row pieces gives the whole-tensor result."""
    weight = (seeded_randn(1100, 1024, seed=11) * 0.02).to(torch.bfloat16)
    values = weight.float()
    if mode == "block":
        groups = values.reshape(1100, 16, 64)
        scale = groups.abs().amax(dim=2, keepdim=True) / E4M3_MAX
    elif mode == "channel":
        groups, scale = values, values.abs().amax(dim=1, keepdim=True) / E4M3_MAX
    else:
        groups, scale = values, values.abs().max() / E4M3_MAX
    scale = scale.to(torch.bfloat16)
    codes = (groups / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).reshape(1100, 1024)
    result = quantize_weight(weight, "e4m3fn", mode)
    assert torch.equal(result.scale, scale)
    assert torch.equal(as_bytes(result.q), as_bytes(codes))
    restored = (codes.float().reshape(groups.shape) * scale.float()).reshape(1100, 1024).to(torch.bfloat16)
    assert torch.equal(dequantize_weight(result.q, result.scale, torch.bfloat16), restored)


def test_channel_and_tensor_scales():
    weight = torch.tensor([[1.0, -2.0, 0.5, 0.25], [0.0, 0.0, 0.0, 0.0], [-8.96, 1.0, 2.0, 3.0]])
    channel = quantize_weight(weight, mode="channel")
    assert channel.mode == "channel" and channel.scale.shape == (3, 1)
    expected = torch.tensor([[2.0 / 448], [torch.finfo(torch.float32).tiny], [8.96 / 448]], dtype=torch.float64).float().to(torch.bfloat16)
    assert torch.equal(channel.scale, expected)

    tensor = quantize_weight(weight, mode="tensor")
    assert tensor.mode == "tensor" and tensor.scale.shape == () and tensor.scale.dtype == torch.bfloat16
    assert float(tensor.scale) == pytest.approx(8.96 / 448, rel=2**-8)
    assert float(tensor.q[2, 0].float()) == -448.0


def test_e5m2_uses_its_own_maximum():
    weight = seeded_randn(4, 128, seed=3).to(torch.bfloat16)
    result = quantize_weight(weight, "e5m2", "block", 64)
    assert result.q.dtype == torch.float8_e5m2
    expected = (weight.float().reshape(4, 2, 64).abs().amax(dim=2, keepdim=True).double() / E5M2_MAX).float().to(torch.bfloat16)
    assert torch.equal(result.scale, expected)
    assert float(result.q.float().abs().max()) == E5M2_MAX


@pytest.mark.parametrize("fp8_format, mantissa_bits, smallest_subnormal_exponent", [("e4m3fn", 3, -9), ("e5m2", 2, -16)])
@pytest.mark.parametrize("mode", ["block", "channel", "tensor"])
def test_every_value_is_within_half_an_fp8_step(fp8_format, mantissa_bits, smallest_subnormal_exponent, mode):
    """|W - q·s| <= s · max(|W/s| · 2^-(m+1), 2^(e_min-1)): round-to-nearest in the fp8 grid."""
    weight = weights_with_outliers(seed=1, rows=64, cols=256)
    result = quantize_weight(weight, fp8_format, mode, 64)
    restored = dequantize_weight(result.q, result.scale, torch.float32)
    scale = {"block": lambda s: s.repeat_interleave(64, dim=1).reshape(64, 256), "channel": lambda s: s,
             "tensor": lambda s: s}[mode](result.scale).double()
    bound = scale * torch.maximum(
        (weight.double() / scale).abs() * 2.0 ** -(mantissa_bits + 1),
        torch.tensor(2.0 ** (smallest_subnormal_exponent - 1), dtype=torch.float64),
    )
    assert torch.all((restored.double() - weight.double()).abs() <= bound * (1 + 1e-5) + 1e-30)


def gaussian_with_outliers(seed=4):
    """DiT-like N(0, 0.02²) weights with a few 20x outliers."""
    weight = seeded_randn(256, 1024, seed=seed) * 0.02
    weight.view(-1)[torch.randint(0, weight.numel(), (64,), generator=torch.Generator().manual_seed(seed))] *= 20
    return weight


@pytest.mark.parametrize("make_weight", [weights_with_outliers, gaussian_with_outliers])
def test_block_error_below_channel_below_tensor(make_weight):
    weight = make_weight().to(torch.bfloat16)
    errors = {}
    for mode in ("block", "channel", "tensor"):
        result = quantize_weight(weight, "e4m3fn", mode)
        errors[mode] = relative_error(dequantize_weight(result.q, result.scale, torch.float32), weight)
    assert errors["block"] < errors["channel"] < errors["tensor"], errors
    assert errors["block"] < 0.03  # ~2.5 % is typical for E4M3 with block 64 (spec 4.4)


def test_fallbacks_report_the_mode_used():
    not_divisible = quantize_weight(seeded_randn(8, 100), mode="block", block_size=64)
    assert not_divisible.mode == "channel" and not_divisible.scale.shape == (8, 1)
    conv = quantize_weight(seeded_randn(8, 4, 1, 2, 2), mode="block")
    assert conv.mode == "tensor" and conv.scale.shape == () and conv.q.shape == (8, 4, 1, 2, 2)
    vector = quantize_weight(seeded_randn(16), mode="channel")
    assert vector.mode == "tensor"
    smaller_blocks = quantize_weight(seeded_randn(8, 100), mode="block", block_size=20)
    assert smaller_blocks.mode == "block" and smaller_blocks.scale.shape == (8, 5, 1)
    assert scale_shape((8, 100), "block", 64) == (8, 1)
    assert scale_shape((8, 128), "block", 64) == (8, 2, 1)
    assert scale_shape((8, 4, 3), "channel") == ()


def test_small_fp16_rows_never_dequantize_to_zero():
    """musubi computes the scale in fp16: for rows around 1e-6 it underflows to 0 and the row is lost."""
    weight = torch.empty(4, 128, dtype=torch.float16)
    weight[0] = (seeded_randn(128, seed=6) * 0.02).half()
    weight[1] = (seeded_randn(128, seed=7) * 4e-7).half()  # fp16 subnormal range
    weight[2] = torch.full((128,), 6e-8).half()  # the smallest fp16 subnormal
    weight[3] = 0.0
    # The failure this guards against, computed the way musubi does (scale in fp16, floor 1e-8 in fp16):
    musubi_scale = (weight[1].abs().max() / torch.tensor(E4M3_MAX, dtype=torch.float16)).clamp(min=1e-8)
    assert float(musubi_scale) == 0.0

    result = quantize_weight(weight, "e4m3fn", "block", 64)
    assert result.scale.dtype == torch.bfloat16 and torch.all(result.scale > 0)
    restored = dequantize_weight(result.q, result.scale, torch.float16)
    assert restored.dtype == torch.float16
    nonzero = weight != 0
    assert torch.all(restored[nonzero] != 0)
    assert torch.all(restored[3] == 0) and torch.isfinite(restored).all()
    # Within one fp8 step plus the fp16 subnormal step (6e-8).
    assert torch.all((restored.float() - weight.float()).abs() <= weight.float().abs() / 16 + 6e-8)


def test_nan_and_inf_do_not_wipe_their_block():
    weight = seeded_randn(2, 64, seed=8)
    weight[0, 3] = float("nan")
    weight[1, 4] = float("inf")
    result = quantize_weight(weight)
    assert torch.isfinite(result.scale).all()
    assert float(result.q[0, 3].float()) == 0.0 and float(result.q[1, 4].float()) == 448.0
    finite_rows = weight.clone()
    finite_rows[0, 3] = 0.0
    finite_rows[1, 4] = 0.0
    expected_scale = (finite_rows.abs().amax(dim=1).double() / E4M3_MAX).float().reshape(2, 1, 1).to(torch.bfloat16)
    assert torch.equal(result.scale, expected_scale)


def test_input_is_not_modified_and_bad_options_are_refused():
    weight = seeded_randn(4, 64)
    copy = weight.clone()
    quantize_weight(weight)
    assert torch.equal(weight, copy)
    with pytest.raises(MusubiError, match="fp8_format"):
        quantize_weight(weight, fp8_format="e4m3")
    with pytest.raises(MusubiError, match="mode"):
        quantize_weight(weight, mode="row")
    with pytest.raises(MusubiError, match="block_size"):
        quantize_weight(weight, block_size=0)
    with pytest.raises(MusubiError, match="already"):
        quantize_weight(weight.to(torch.float8_e4m3fn))
    with pytest.raises(MusubiError, match="floating"):
        quantize_weight(torch.ones(4, 64, dtype=torch.int64))


# --- dequantization ----------------------------------------------------------------------


def test_dequantize_applies_block_scales_to_their_columns():
    codes = torch.ones(2, 6).to(torch.float8_e4m3fn)
    scale = torch.tensor([[[1.0], [2.0], [3.0]], [[-1.0], [0.5], [4.0]]])  # 3 blocks of 2 columns
    expected = torch.tensor([[1, 1, 2, 2, 3, 3], [-1, -1, 0.5, 0.5, 4, 4]], dtype=torch.float32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        restored = dequantize_weight(codes, scale, dtype)
        assert restored.dtype == dtype and restored.shape == (2, 6)
        assert torch.equal(restored.float(), expected)
    assert torch.equal(dequantize_weight(codes, torch.tensor([[2.0], [3.0]]), torch.float32), torch.tensor([[2.0] * 6, [3.0] * 6]))
    assert torch.equal(dequantize_weight(codes, torch.tensor(0.25), torch.float32), torch.full((2, 6), 0.25))
    # A conv weight quantized per tensor keeps its shape.
    conv = quantize_weight(seeded_randn(4, 2, 1, 2, 2))
    assert dequantize_weight(conv.q, conv.scale, torch.bfloat16).shape == (4, 2, 1, 2, 2)


@pytest.mark.parametrize("fp8_format", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_nan_codes", [False, True])
def test_dequantize_equals_torchs_conversion_for_every_code_and_scale(fp8_format, dtype, with_nan_codes):
    """The CPU's bit-moving widening gives exactly ``codes.to(float32) * scale``: every one of the
    256 codes (subnormals, ±0, E5M2's infinities and NaNs, E4M3FN's NaN codes) against scales from
    tiny to huge, stored in bfloat16 or float32, per tensor, row and block."""
    from musubi.fp8 import fp8_dtype

    all_codes = torch.arange(256, dtype=torch.uint8).repeat(64).reshape(128, 128)
    if fp8_format == "e4m3fn" and not with_nan_codes:
        all_codes[(all_codes & 0x7F) == 0x7F] = 0x7E
    codes = all_codes.view(fp8_dtype(fp8_format))
    scales = [torch.tensor(0.75).bfloat16(), torch.tensor(3e38), torch.logspace(-40, 30, 128).reshape(128, 1).bfloat16(),
              torch.logspace(-44, 37, 256).reshape(128, 2, 1).bfloat16(), torch.logspace(-44, 37, 256).reshape(128, 2, 1)]
    for scale in scales:
        before = scale.clone()
        got = dequantize_weight(codes, scale, dtype)
        grouped = codes.reshape(128, scale.shape[1], -1) if scale.dim() == 3 else codes
        expected = (grouped.to(torch.float32) * scale.float().reshape(scale.shape if scale.dim() else ())).reshape(128, 128)
        width = {4: torch.int32, 2: torch.int16}[dtype.itemsize]
        assert torch.equal(got.view(width), expected.to(dtype).view(width)), (list(scale.shape), scale.dtype)
        assert torch.equal(scale, before)  # the layer's own scale is never changed


def test_dequantize_rejects_scales_that_do_not_fit():
    codes = torch.zeros(4, 64).to(torch.float8_e4m3fn)
    for bad in (torch.ones(3, 1), torch.ones(4, 3, 1), torch.ones(4, 1, 2), torch.ones(2, 2)):
        with pytest.raises(MusubiError, match="does not fit"):
            dequantize_weight(codes, bad)


def test_quantized_linear_output_stays_close():
    weight = (seeded_randn(96, 256, seed=9) / 16).to(torch.bfloat16)
    inputs = seeded_randn(32, 256, seed=10).to(torch.bfloat16)
    result = quantize_weight(weight)
    reference = inputs.float() @ weight.float().T
    output = inputs.float() @ dequantize_weight(result.q, result.scale, torch.bfloat16).float().T
    assert relative_error(output, reference) < 0.035


# --- which keys, per architecture --------------------------------------------------------

# Key lists follow the real single files: (key, rank). Rank 2 are Linear weights.
WAN_KEYS = [
    ("patch_embedding.weight", 5), ("patch_embedding.bias", 1), ("text_embedding.0.weight", 2),
    ("text_embedding.2.weight", 2), ("time_embedding.0.weight", 2), ("time_embedding.2.weight", 2),
    ("time_projection.1.weight", 2), ("time_projection.1.bias", 1),
    ("blocks.0.self_attn.q.weight", 2), ("blocks.0.self_attn.q.bias", 1), ("blocks.0.self_attn.k.weight", 2),
    ("blocks.0.self_attn.v.weight", 2), ("blocks.0.self_attn.o.weight", 2), ("blocks.0.self_attn.norm_q.weight", 1),
    ("blocks.0.self_attn.norm_k.weight", 1), ("blocks.0.cross_attn.q.weight", 2), ("blocks.0.cross_attn.k.weight", 2),
    ("blocks.0.cross_attn.v.weight", 2), ("blocks.0.cross_attn.o.weight", 2), ("blocks.0.cross_attn.k_img.weight", 2),
    ("blocks.0.cross_attn.v_img.weight", 2), ("blocks.0.cross_attn.norm_k_img.weight", 1),
    ("blocks.0.norm3.weight", 1), ("blocks.0.norm3.bias", 1), ("blocks.0.ffn.0.weight", 2),
    ("blocks.0.ffn.0.bias", 1), ("blocks.0.ffn.2.weight", 2), ("blocks.0.modulation", 3),
    ("head.head.weight", 2), ("head.modulation", 3), ("img_emb.proj.0.weight", 1), ("img_emb.proj.1.weight", 2),
    ("img_emb.proj.3.weight", 2), ("img_emb.proj.4.weight", 1),
]
WAN_QUANTIZED = {f"blocks.0.{attn}.{proj}.weight" for attn in ("self_attn", "cross_attn") for proj in "qkvo"} | {
    "blocks.0.cross_attn.k_img.weight", "blocks.0.cross_attn.v_img.weight", "blocks.0.ffn.0.weight", "blocks.0.ffn.2.weight"}

HUNYUAN_VIDEO_KEYS = [
    ("img_in.proj.weight", 5), ("txt_in.input_embedder.weight", 2), ("txt_in.t_embedder.mlp.0.weight", 2),
    ("txt_in.c_embedder.linear_1.weight", 2), ("txt_in.individual_token_refiner.blocks.0.norm1.weight", 1),
    ("txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight", 2),
    ("txt_in.individual_token_refiner.blocks.0.mlp.fc1.weight", 2),
    ("txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.weight", 2), ("time_in.mlp.0.weight", 2),
    ("vector_in.in_layer.weight", 2), ("guidance_in.mlp.0.weight", 2),
] + [
    (f"double_blocks.0.{stream}_{name}", rank) for stream in ("img", "txt") for name, rank in (
        ("mod.linear.weight", 2), ("attn_qkv.weight", 2), ("attn_qkv.bias", 1), ("attn_q_norm.weight", 1),
        ("attn_k_norm.weight", 1), ("attn_proj.weight", 2), ("mlp.fc1.weight", 2), ("mlp.fc2.weight", 2))
] + [
    ("single_blocks.0.linear1.weight", 2), ("single_blocks.0.linear2.weight", 2), ("single_blocks.0.q_norm.weight", 1),
    ("single_blocks.0.k_norm.weight", 1), ("single_blocks.0.modulation.linear.weight", 2),
    ("final_layer.linear.weight", 2), ("final_layer.adaLN_modulation.1.weight", 2),
]
HUNYUAN_VIDEO_QUANTIZED = {f"double_blocks.0.{stream}_{name}.weight" for stream in ("img", "txt")
                           for name in ("attn_qkv", "attn_proj", "mlp.fc1", "mlp.fc2")} | {
    "single_blocks.0.linear1.weight", "single_blocks.0.linear2.weight"}

# The same model in ComfyUI's internal names, as ComfyUI saves it.
HUNYUAN_VIDEO_COMFY_KEYS = [
    ("model.diffusion_model.img_in.proj.weight", 5),
    ("model.diffusion_model.txt_in.individual_token_refiner.blocks.0.norm1.weight", 1),
    ("model.diffusion_model.txt_in.t_embedder.in_layer.weight", 2),
    ("model.diffusion_model.vector_in.in_layer.weight", 2),
    ("model.diffusion_model.double_blocks.0.img_mod.lin.weight", 2),
    ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", 2),
    ("model.diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale", 1),
    ("model.diffusion_model.double_blocks.0.img_attn.proj.weight", 2),
    ("model.diffusion_model.double_blocks.0.img_mlp.0.weight", 2),
    ("model.diffusion_model.double_blocks.0.img_mlp.2.weight", 2),
    ("model.diffusion_model.single_blocks.0.linear1.weight", 2),
    ("model.diffusion_model.single_blocks.0.norm.key_norm.scale", 1),
    ("model.diffusion_model.single_blocks.0.modulation.lin.weight", 2),
    ("model.diffusion_model.final_layer.linear.weight", 2),
]
HUNYUAN_VIDEO_COMFY_QUANTIZED = {"model.diffusion_model." + name for name in (
    "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.proj.weight", "double_blocks.0.img_mlp.0.weight",
    "double_blocks.0.img_mlp.2.weight", "single_blocks.0.linear1.weight")}

FLUX_KEYS = [
    ("img_in.weight", 2), ("img_in.bias", 1), ("time_in.in_layer.weight", 2), ("vector_in.in_layer.weight", 2),
    ("guidance_in.in_layer.weight", 2), ("txt_in.weight", 2), ("txt_in.bias", 1),
] + [
    (f"double_blocks.0.{stream}_{name}", rank) for stream in ("img", "txt") for name, rank in (
        ("mod.lin.weight", 2), ("attn.qkv.weight", 2), ("attn.qkv.bias", 1), ("attn.norm.query_norm.scale", 1),
        ("attn.norm.key_norm.scale", 1), ("attn.proj.weight", 2), ("mlp.0.weight", 2), ("mlp.2.weight", 2))
] + [
    ("single_blocks.0.linear1.weight", 2), ("single_blocks.0.linear2.weight", 2),
    ("single_blocks.0.norm.query_norm.scale", 1), ("single_blocks.0.modulation.lin.weight", 2),
    ("final_layer.linear.weight", 2), ("final_layer.adaLN_modulation.1.weight", 2),
]
FLUX_QUANTIZED = {f"double_blocks.0.{stream}_{name}.weight" for stream in ("img", "txt")
                  for name in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")} | {
    "single_blocks.0.linear1.weight", "single_blocks.0.linear2.weight"}

QWEN_IMAGE_KEYS = [
    ("img_in.weight", 2), ("txt_norm.weight", 1), ("txt_in.weight", 2),
    ("time_text_embed.timestep_embedder.linear_1.weight", 2), ("time_text_embed.timestep_embedder.linear_2.weight", 2),
    ("transformer_blocks.0.img_mod.1.weight", 2), ("transformer_blocks.0.img_mod.1.bias", 1),
    ("transformer_blocks.0.txt_mod.1.weight", 2),
] + [(f"transformer_blocks.0.attn.{name}.weight", 2) for name in (
    "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")] + [
    (f"transformer_blocks.0.attn.{name}.weight", 1) for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")] + [
    ("transformer_blocks.0.img_mlp.net.0.proj.weight", 2), ("transformer_blocks.0.img_mlp.net.2.weight", 2),
    ("transformer_blocks.0.txt_mlp.net.0.proj.weight", 2), ("transformer_blocks.0.txt_mlp.net.2.weight", 2),
    ("norm_out.linear.weight", 2), ("proj_out.weight", 2),
]
QWEN_IMAGE_QUANTIZED = {key for key, rank in QWEN_IMAGE_KEYS
                        if rank == 2 and key.startswith("transformer_blocks.")}  # modulation included, as musubi does

FRAMEPACK_KEYS = [
    ("x_embedder.proj.weight", 5), ("clean_x_embedder.proj.weight", 5), ("clean_x_embedder.proj_2x.weight", 5),
    ("context_embedder.time_text_embed.timestep_embedder.linear_1.weight", 2), ("context_embedder.proj_in.weight", 2),
    ("context_embedder.token_refiner.refiner_blocks.0.norm1.weight", 1),
    ("context_embedder.token_refiner.refiner_blocks.0.attn.to_q.weight", 2),
    ("context_embedder.token_refiner.refiner_blocks.0.ff.net.0.proj.weight", 2),
    ("context_embedder.token_refiner.refiner_blocks.0.norm_out.linear.weight", 2),
    ("image_projection.up.weight", 2), ("image_projection.down.weight", 2),
    ("time_text_embed.timestep_embedder.linear_1.weight", 2), ("time_text_embed.guidance_embedder.linear_1.weight", 2),
    ("transformer_blocks.0.norm1.linear.weight", 2), ("transformer_blocks.0.norm1_context.linear.weight", 2),
    ("transformer_blocks.0.attn.norm_q.weight", 1), ("transformer_blocks.0.attn.norm_added_k.weight", 1),
] + [(f"transformer_blocks.0.{name}.weight", 2) for name in (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")] + [
    ("transformer_blocks.0.attn.to_q.bias", 1),
    ("single_transformer_blocks.0.attn.norm_q.weight", 1), ("single_transformer_blocks.0.attn.to_q.weight", 2),
    ("single_transformer_blocks.0.attn.to_k.weight", 2), ("single_transformer_blocks.0.attn.to_v.weight", 2),
    ("single_transformer_blocks.0.norm.linear.weight", 2), ("single_transformer_blocks.0.proj_mlp.weight", 2),
    ("single_transformer_blocks.0.proj_out.weight", 2), ("norm_out.linear.weight", 2), ("proj_out.weight", 2),
]
FRAMEPACK_QUANTIZED = {key for key, rank in FRAMEPACK_KEYS if rank == 2 and "transformer_blocks." in key and "norm" not in key}

GENERIC_KEYS = [
    ("x_embedder.weight", 2), ("t_embedder.mlp.0.weight", 2), ("cap_embedder.1.weight", 2),
    ("layers.0.attention.qkv.weight", 2), ("layers.0.attention.out.weight", 2), ("layers.0.attention.qkv.bias", 1),
    ("layers.0.attention_norm1.weight", 1), ("layers.0.attention.q_norm.weight", 1),
    ("layers.0.adaLN_modulation.0.weight", 2), ("layers.0.feed_forward.w1.weight", 2),
    ("layers.0.feed_forward.w2.weight", 2), ("noise_refiner.0.attention.qkv.weight", 2),
    ("final_layer.linear.weight", 2), ("final_layer.adaLN_modulation.1.weight", 2),
]
GENERIC_QUANTIZED = {"layers.0.attention.qkv.weight", "layers.0.attention.out.weight", "layers.0.feed_forward.w1.weight",
                     "layers.0.feed_forward.w2.weight"}

LAYOUTS = {
    "wan": (WAN_KEYS, WAN_QUANTIZED),
    "hunyuan_video": (HUNYUAN_VIDEO_KEYS, HUNYUAN_VIDEO_QUANTIZED),
    "flux": (FLUX_KEYS, FLUX_QUANTIZED),
    "qwen_image": (QWEN_IMAGE_KEYS, QWEN_IMAGE_QUANTIZED),
    "framepack": (FRAMEPACK_KEYS, FRAMEPACK_QUANTIZED),
    "generic": (GENERIC_KEYS, GENERIC_QUANTIZED),
}

SHAPES = {1: (16,), 2: (16, 64), 3: (1, 6, 16), 5: (16, 4, 1, 2, 2)}


def tiny_state_dict(keys, dtype=torch.bfloat16, prefix=""):
    return {prefix + key: (seeded_randn(*SHAPES[rank], seed=index) * 0.05).to(dtype) for index, (key, rank) in enumerate(keys)}


@pytest.mark.parametrize("architecture", list(LAYOUTS))
def test_each_architecture_quantizes_exactly_its_block_linears(architecture):
    keys, expected = LAYOUTS[architecture]
    state_dict = tiny_state_dict(keys)
    assert detect_architecture(state_dict) == architecture
    selected = {key for key, tensor in state_dict.items() if should_quantize(key, tensor, architecture)}
    assert selected == expected

    quantized = quantize_state_dict(state_dict, architecture="auto")
    scale_keys = {key for key in quantized if key.endswith(".scale_weight")}
    assert scale_keys == {key[: -len(".weight")] + ".scale_weight" for key in expected}
    assert set(quantized) == set(state_dict) | scale_keys
    for key, tensor in state_dict.items():
        if key in expected:
            assert quantized[key].dtype == torch.float8_e4m3fn
            assert quantized[scale_key_for(key)].shape == (16, 1, 1) and quantized[scale_key_for(key)].dtype == torch.bfloat16
        else:
            assert quantized[key] is tensor


def test_only_non_empty_floating_2d_weights_are_quantized():
    key = "blocks.0.ffn.0.weight"  # picked by Wan's rule by name
    assert should_quantize(key, torch.zeros(16, 64), "wan")
    assert should_quantize(key, ("BF16", (16, 64)), "wan")  # a header entry works too
    assert not should_quantize(key, torch.zeros(16), "wan")
    assert not should_quantize(key, torch.zeros(16, 4, 3), "wan")
    assert not should_quantize(key, torch.zeros(0, 64), "wan")
    assert not should_quantize(key, torch.zeros(16, 64, dtype=torch.int32), "wan")
    assert not should_quantize("blocks.0.ffn.0.bias", torch.zeros(16, 64), "wan")


def test_comfyui_named_hunyuan_video_with_prefix():
    state_dict = tiny_state_dict(HUNYUAN_VIDEO_COMFY_KEYS)
    assert detect_architecture(state_dict) == "hunyuan_video"
    selected = {key for key, tensor in state_dict.items() if should_quantize(key, tensor, "hunyuan_video")}
    assert selected == HUNYUAN_VIDEO_COMFY_QUANTIZED


@pytest.mark.parametrize("prefix", ["diffusion_model.", "model.diffusion_model."])
@pytest.mark.parametrize("architecture", ["wan", "flux", "qwen_image", "framepack"])
def test_prefixed_checkpoints(prefix, architecture):
    keys, expected = LAYOUTS[architecture]
    state_dict = tiny_state_dict(keys, prefix=prefix)
    assert detect_architecture(state_dict) == architecture
    quantized = quantize_state_dict(state_dict)
    assert {key for key in quantized if key.endswith(".scale_weight")} == {
        prefix + key[: -len(".weight")] + ".scale_weight" for key in expected}


def test_flux_is_not_taken_for_hunyuan_video():
    """Both have double_blocks, txt_in and vector_in; only HunyuanVideo has the token refiner."""
    flux_keys = [key for key, _ in FLUX_KEYS]
    assert "txt_in.weight" in flux_keys and "vector_in.in_layer.weight" in flux_keys
    assert detect_architecture(flux_keys) == "flux"
    assert detect_architecture(flux_keys + ["txt_in.individual_token_refiner.blocks.0.norm1.weight"]) == "hunyuan_video"
    # Qwen-Image and FramePack share diffusers attention names; only the embedders tell them apart.
    assert detect_architecture(["transformer_blocks.0.attn.to_q.weight", "img_in.weight"]) == "generic"
    assert detect_architecture(["transformer_blocks.0.attn.to_q.weight", "x_embedder.proj.weight"]) == "framepack"
    assert detect_architecture(["transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.img_mod.1.weight"]) == "qwen_image"
    # diffusers-layout FLUX (Linear x_embedder) is not FramePack.
    assert detect_architecture(["transformer_blocks.0.attn.to_q.weight", "x_embedder.weight", "context_embedder.weight"]) == "generic"


def test_detection_on_the_test_suites_tiny_checkpoint_layouts():
    from tiny_checkpoints import ARCHS, tiny_layout

    for name, info in ARCHS.items():
        if name == "framepack":  # needs diffusers to build; covered by FRAMEPACK_KEYS above
            continue
        assert detect_architecture(tiny_layout(name)) == info.family, name


def test_explicit_architecture_and_unknown_names():
    state_dict = tiny_state_dict(GENERIC_KEYS)
    forced = quantize_state_dict(state_dict, architecture="wan")  # Wan's rule picks nothing without "blocks"
    assert not any(key.endswith(".scale_weight") for key in forced)
    with pytest.raises(MusubiError, match="architecture"):
        quantize_state_dict(state_dict, architecture="sdxl")


# --- state dicts and files ---------------------------------------------------------------


def test_state_dict_layout_fallbacks_and_report():
    state_dict = {
        "blocks.0.self_attn.q.weight": seeded_randn(32, 128, seed=1).to(torch.bfloat16),
        "blocks.0.self_attn.k.weight": seeded_randn(32, 100, seed=2).to(torch.float16),  # not divisible by 64
        "blocks.0.self_attn.q.bias": seeded_randn(32, seed=3),
        "head.modulation": seeded_randn(1, 2, 32, seed=4),
    }
    original = {key: tensor.clone() for key, tensor in state_dict.items()}
    quantized, report = quantize_state_dict_with_report(state_dict, fp8_format="e5m2")
    assert report.architecture == "wan" and report.quantized == 2 and report.kept == 2
    assert report.fallbacks == [("blocks.0.self_attn.k.weight", (32, 100), "channel")]
    assert quantized["blocks.0.self_attn.q.weight"].dtype == torch.float8_e5m2
    assert quantized["blocks.0.self_attn.q.scale_weight"].shape == (32, 2, 1)
    assert quantized["blocks.0.self_attn.k.scale_weight"].shape == (32, 1)
    assert report.bytes_before == 32 * 128 * 2 + 32 * 100 * 2 + 32 * 4 + 64 * 4
    assert report.bytes_after == 32 * 128 + 32 * 2 * 2 + 32 * 100 + 32 * 2 + 32 * 4 + 64 * 4
    for key in state_dict:  # the input is untouched
        assert torch.equal(state_dict[key], original[key])
    restored = dequantize_state_dict(quantized, torch.float32)
    assert set(restored) == set(state_dict)
    assert relative_error(restored["blocks.0.self_attn.q.weight"], state_dict["blocks.0.self_attn.q.weight"]) < 0.06


def test_bytes_are_about_half_of_bf16_at_block_64():
    state_dict = {f"blocks.{i}.ffn.0.weight": torch.zeros(256, 1024, dtype=torch.bfloat16) for i in range(2)}
    _, report = quantize_state_dict_with_report(state_dict, architecture="wan")
    # 1 byte per weight + one bfloat16 scale per 64 weights = 1.03125 / 2
    assert report.bytes_after / report.bytes_before == pytest.approx((1 + 2 / 64) / 2)


def plain_fp8_dict():
    return {"blocks.0.ffn.0.weight": torch.zeros(8, 64).to(torch.float8_e4m3fn), "blocks.0.ffn.0.bias": torch.zeros(8)}


def comfy_scaled_dict():
    return {
        "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
        "blocks.0.ffn.0.weight": torch.zeros(8, 64).to(torch.float8_e4m3fn),
        "blocks.0.ffn.0.scale_weight": torch.tensor(1.0),
        "blocks.0.ffn.0.scale_input": torch.tensor(1.0),
    }


def test_prequantized_inputs_are_refused_with_what_to_load(tmp_path):
    with pytest.raises(MusubiError, match="bf16/fp16 original"):
        check_not_prequantized(plain_fp8_dict(), "kijai_fp8.safetensors")
    with pytest.raises(MusubiError, match="ComfyUI's own fp8 format.*Load Diffusion Model"):
        check_not_prequantized(comfy_scaled_dict(), "comfy.safetensors")
    newer_comfy = {"blocks.0.ffn.0.weight": torch.zeros(8, 64).to(torch.float8_e4m3fn),
                   "blocks.0.ffn.0.weight_scale": torch.tensor(1.0), "blocks.0.ffn.0.comfy_quant": torch.zeros(3, dtype=torch.uint8)}
    with pytest.raises(MusubiError, match="Load Diffusion Model"):
        check_not_prequantized(newer_comfy)

    ours = quantize_state_dict({"blocks.0.ffn.0.weight": seeded_randn(8, 64)}, architecture="wan")
    check_not_prequantized(ours)  # loads as it is
    assert is_scaled_fp8_state_dict(ours)
    assert not is_scaled_fp8_state_dict(comfy_scaled_dict())
    assert not is_scaled_fp8_state_dict({"blocks.0.ffn.0.weight": torch.zeros(1)})

    # The same checks work on a file header, before any tensor is read.
    path = str(tmp_path / "plain.safetensors")
    save_file(plain_fp8_dict(), path)
    header, _ = safetensors_io.read_header(path)
    with pytest.raises(MusubiError, match=r"plain\.safetensors.*plain fp8"):
        check_not_prequantized(header, path)
    with pytest.raises(MusubiError, match="plain fp8"):
        quantize_file(path, str(tmp_path / "out.safetensors"))
    with pytest.raises(MusubiError, match="already quantized"):
        quantize_state_dict(ours)


def write_checkpoint(path, keys=WAN_KEYS, prefix=""):
    state_dict = tiny_state_dict(keys, prefix=prefix)
    state_dict[prefix + "blocks.0.ffn.2.weight"] = seeded_randn(16, 100, seed=99).to(torch.bfloat16)  # channel fallback
    save_file(state_dict, str(path), metadata={"format": "pt", "modelspec.title": "tiny"})
    return state_dict


def test_quantize_file_equals_quantize_state_dict(tmp_path):
    source = tmp_path / "model.safetensors"
    state_dict = write_checkpoint(source, prefix="model.diffusion_model.")
    target = tmp_path / "model_fp8.safetensors"
    report = quantize_file(str(source), str(target), mode="block", block_size=32)

    expected = quantize_state_dict(state_dict, mode="block", block_size=32)
    written = load_file(str(target))
    assert set(written) == set(expected)
    for key in expected:
        assert written[key].dtype == expected[key].dtype and written[key].shape == expected[key].shape
        assert torch.equal(as_bytes(written[key]), as_bytes(expected[key])), key
    assert report.quantized == len(WAN_QUANTIZED) and len(report.fallbacks) == 1
    with safe_open(str(target), "pt") as file:
        metadata = file.metadata()
    assert metadata["modelspec.title"] == "tiny"  # the input's metadata is kept
    assert metadata["musubi.fp8.format"] == "e4m3fn" and metadata["musubi.fp8.mode"] == "block"
    assert metadata["musubi.fp8.block_size"] == "32" and metadata["musubi.fp8.architecture"] == "wan"
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "model_fp8.safetensors"]  # no temporary left
    with pytest.raises(MusubiError, match="input file"):
        quantize_file(str(source), str(source))


def test_quantize_file_reads_one_tensor_at_a_time(tmp_path, monkeypatch):
    source = tmp_path / "model.safetensors"
    write_checkpoint(source)
    reads = []
    real_iter = safetensors_io.iter_tensors

    def counting_iter(path, names=None, **options):
        for name, tensor in real_iter(path, names, **options):
            reads.append(name)
            yield name, tensor

    monkeypatch.setattr(safetensors_io, "iter_tensors", counting_iter)
    quantize_file(str(source), str(tmp_path / "out.safetensors"))
    assert sorted(reads) == sorted(key for key, _ in WAN_KEYS)


def test_cli_quantize(tmp_path):
    source = tmp_path / "model.safetensors"
    write_checkpoint(source)
    target = tmp_path / "out.safetensors"
    completed = subprocess.run(
        [sys.executable, "-m", "musubi", "quantize", str(source), "--output_file", str(target), "--mode", "channel",
         "--fp8_format", "e5m2", "--arch", "wan"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert f"quantized {len(WAN_QUANTIZED)} weights to e5m2 (channel)" in completed.stdout
    assert "tensor bytes:" in completed.stdout
    written = load_file(str(target))
    assert written["blocks.0.ffn.0.weight"].dtype == torch.float8_e5m2
    assert written["blocks.0.ffn.0.scale_weight"].shape == (16, 1)


def test_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    path = str(tmp_path / "plain.safetensors")
    save_file(plain_fp8_dict(), path)
    assert cli.main(["quantize", path, "--output_file", str(tmp_path / "out.safetensors")]) == 2
    assert "bf16/fp16 original" in capsys.readouterr().err
    source = tmp_path / "model.safetensors"
    write_checkpoint(source)
    assert cli.main(["quantize", str(source), "--output_file", str(tmp_path / "x.safetensors"), "--block_size", "0"]) == 2
    assert "block_size" in capsys.readouterr().err


# --- the one-pass kernel and the streamed file ---------------------------------------------------

def reference_quantize(weight: torch.Tensor, fp8_format: str, mode: str, block_size: int):
    """The layout's definition, written plainly: per group, the largest finite |w| in float32 over
    the format's maximum (never below MIN_SCALE) stored in bfloat16; codes w / stored scale."""
    from musubi.fp8 import MIN_SCALE, effective_mode, fp8_dtype, fp8_max

    largest = fp8_max(fp8_format)
    used = effective_mode(weight.shape, mode, block_size)
    values = weight.to(torch.float32)
    if used == "block":
        groups = values.reshape(weight.shape[0], weight.shape[1] // block_size, block_size)
    elif used == "channel":
        groups = values
    else:
        groups = values.reshape(1, -1)
    finite = torch.nan_to_num(groups, nan=0.0, posinf=0.0, neginf=0.0)
    scale = (finite.abs().amax(dim=-1, keepdim=True) / largest).clamp(min=MIN_SCALE).to(torch.bfloat16)
    codes = (groups / scale.to(torch.float32)).nan_to_num(nan=0.0).clamp(-largest, largest).to(fp8_dtype(fp8_format))
    return codes.reshape(weight.shape), scale.reshape(()) if used == "tensor" else scale, used


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["block", "channel", "tensor"])
@pytest.mark.parametrize("fp8_format", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("chunk_elements", [None, 4096])
def test_quantize_weight_is_bit_identical_to_the_definition(dtype, mode, fp8_format, chunk_elements, monkeypatch):
    import musubi.fp8 as fp8_module

    if chunk_elements:  # rows in several chunks: some all finite (the short path), some not
        monkeypatch.setattr(fp8_module, "_CPU_CHUNK_ELEMENTS", chunk_elements)
    generator = torch.Generator().manual_seed(11)
    scales = torch.logspace(-30 if dtype != torch.float16 else -6, 1, 300).unsqueeze(1)  # subnormal groups too
    finite = (torch.randn(300, 256, generator=generator, dtype=torch.float64) * scales).to(dtype)
    spoiled = finite.clone()
    spoiled[7, 3], spoiled[100, 200], spoiled[250, 0] = float("nan"), float("inf"), float("-inf")  # each spoils only its group
    spoiled[40] = 0  # an all-zero row gets the floor scale
    for weight in (finite, spoiled, finite.t()):
        before = weight.clone()
        got = quantize_weight(weight, fp8_format, mode, 64)
        codes, scale, used = reference_quantize(weight, fp8_format, mode, 64)
        assert got.mode == used
        assert torch.equal(got.scale, scale)
        assert torch.equal(got.q.view(torch.uint8), codes.view(torch.uint8))
        assert torch.equal(weight.view(torch.uint8) if weight.is_contiguous() else weight.contiguous().view(torch.uint8),
                           before.contiguous().view(torch.uint8))  # the input is never written to


def test_quantize_file_streams_exactly_what_quantize_checkpoint_holds(tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(5)
    state = {
        "blocks.0.self_attn.q.weight": torch.randn(128, 128, generator=generator).bfloat16(),
        "blocks.0.self_attn.q.bias": torch.randn(128, generator=generator).bfloat16(),
        "blocks.0.ffn.0.weight": torch.randn(96, 100, generator=generator).bfloat16(),  # channel fallback
        "blocks.0.norm3.weight": torch.ones(128).bfloat16(),
        "head.modulation": torch.randn(1, 2, 128, generator=generator),
    }
    source = str(tmp_path / "in.safetensors")
    save_file(state, source, {"origin": "test"})
    in_memory, metadata, _ = quantize_checkpoint(source)
    reads = []
    real = safetensors_io.iter_tensors
    monkeypatch.setattr(safetensors_io, "iter_tensors",
                        lambda *args, **options: (reads.append((args, options)) or real(*args, **options)))
    monkeypatch.setattr(safetensors_io, "atomic_save_file", None)  # the streamed path never builds the whole dict
    report = quantize_file(source, str(tmp_path / "out.safetensors"))
    written = load_file(str(tmp_path / "out.safetensors"))
    assert reads == [((source,), {"borrowed": True})]  # one pass over the input, mapped rather than copied
    assert list(written) and set(written) == set(in_memory)
    for key, tensor in in_memory.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key].view(torch.uint8), tensor.view(torch.uint8)), key
    assert safetensors_io.read_header(str(tmp_path / "out.safetensors"))[1] == metadata
    assert metadata["origin"] == "test" and metadata["musubi.fp8.quantized"] == str(report.quantized) == "2"
