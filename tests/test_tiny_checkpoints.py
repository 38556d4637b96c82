"""Tiny checkpoints: real key layouts, seeded values, files ComfyUI and diffusers load."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfy_server import find_comfyui
from tiny_checkpoints import (
    ARCHITECTURES,
    ARCHS,
    ensure_tiny_checkpoint,
    framepack_config,
    tiny_layout,
    tiny_metadata,
    tiny_state_dict,
    write_tiny_checkpoint,
)

SMALL = [arch for arch in ARCHITECTURES if not ARCHS[arch].big]
BIG = [arch for arch in ARCHITECTURES if ARCHS[arch].big]
COMFY_NATIVE = [arch for arch in ARCHITECTURES if ARCHS[arch].comfy_native]


@pytest.fixture(scope="module")
def big_state_dicts():
    """Flux / Qwen-Image state dicts (~400 M parameters each), each built at most once per session.

    Only this module uses them, so they are freed (~1.6 GB) when its tests are done.
    """
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def get(arch: str) -> dict[str, torch.Tensor]:
        if arch not in cache:
            cache[arch] = tiny_state_dict(arch)
        return cache[arch]

    yield get
    cache.clear()


# --- the catalogue ---------------------------------------------------------------------------


def test_catalogue_lists_every_target_architecture():
    assert ARCHITECTURES == (
        "wan21_t2v", "wan21_i2v", "wan22_ti2v_5b", "wan22_a14b_high", "wan22_a14b_low",
        "hunyuan_video", "framepack", "flux_kontext", "qwen_image",
    )
    assert set(ARCHS) == set(ARCHITECTURES)
    for name, info in ARCHS.items():
        assert info.name == name
        assert info.family in {"wan", "hunyuan_video", "framepack", "flux", "qwen_image"}
        assert info.comfy_native == (name != "framepack")
        assert info.big == (name in {"flux_kontext", "qwen_image"})
        assert (info.comfy_model_class is None) == (not info.comfy_native)
        assert info.needs_clip_vision == (info.clip_vision_dim is not None)
    assert ARCHS["wan22_ti2v_5b"].latent_channels == 48
    assert ARCHS["wan22_ti2v_5b"].comfy_config_class == "WAN22_T2V"
    assert ARCHS["wan21_i2v"].clip_vision_dim == 1280 and ARCHS["wan21_i2v"].concat_channels == 20
    assert ARCHS["qwen_image"].text_dim == 3584 and ARCHS["qwen_image"].pooled_dim is None
    assert ARCHS["flux_kontext"].latent_dims == 4 and ARCHS["hunyuan_video"].latent_dims == 5


def test_unknown_architecture_and_dtype_are_rejected_with_the_choices():
    with pytest.raises(ValueError, match="wan21_t2v"):
        tiny_layout("wan3")
    with pytest.raises(ValueError, match="dtype"):
        tiny_state_dict("wan21_t2v", dtype=torch.int8)


# --- layouts: checked against the real files' names and ComfyUI's detection rules -------------

# A few (key, shape) pairs of each real file, at the tiny sizes (Wan dim 128, HunyuanVideo
# hidden 128, FramePack hidden 64) or at the sizes detection fixes (Flux, Qwen-Image).
LANDMARKS = {
    "wan21_t2v": {
        "patch_embedding.weight": (128, 16, 1, 2, 2),
        "text_embedding.0.weight": (128, 4096),
        "time_projection.1.weight": (768, 128),
        "blocks.0.self_attn.q.weight": (128, 128),
        "blocks.0.cross_attn.norm_k.weight": (128,),
        "blocks.1.modulation": (1, 6, 128),
        "blocks.1.norm3.bias": (128,),
        "head.head.weight": (64, 128),
        "head.modulation": (1, 2, 128),
    },
    "wan21_i2v": {
        "patch_embedding.weight": (128, 36, 1, 2, 2),
        "blocks.0.cross_attn.k_img.weight": (128, 128),
        "blocks.1.cross_attn.norm_k_img.weight": (128,),
        "img_emb.proj.0.bias": (1280,),
        "img_emb.proj.1.weight": (1280, 1280),
        "img_emb.proj.3.weight": (128, 1280),
        "img_emb.proj.4.weight": (128,),
        "head.head.weight": (64, 128),
    },
    "wan22_ti2v_5b": {
        "patch_embedding.weight": (128, 48, 1, 2, 2),
        "head.head.weight": (192, 128),
    },
    "hunyuan_video": {
        "img_in.proj.weight": (128, 16, 1, 2, 2),
        "txt_in.input_embedder.weight": (128, 4096),
        "txt_in.c_embedder.linear_1.weight": (128, 4096),
        "txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight": (384, 128),
        "txt_in.individual_token_refiner.blocks.0.norm1.weight": (128,),
        "vector_in.in_layer.weight": (128, 768),
        "guidance_in.mlp.0.weight": (128, 256),
        "double_blocks.0.img_attn_q_norm.weight": (128,),
        "double_blocks.1.txt_mlp.fc2.weight": (128, 512),
        "single_blocks.1.linear1.weight": (896, 128),
        "single_blocks.0.linear2.weight": (128, 640),
        "single_blocks.0.modulation.linear.weight": (384, 128),
        "final_layer.linear.weight": (64, 128),
    },
    "framepack": {
        "x_embedder.proj.weight": (64, 16, 1, 2, 2),
        "clean_x_embedder.proj_2x.weight": (64, 16, 2, 4, 4),
        "clean_x_embedder.proj_4x.weight": (64, 16, 4, 8, 8),
        "image_projection.up.weight": (192, 1152),
        "context_embedder.proj_in.weight": (64, 4096),
        "time_text_embed.text_embedder.linear_1.weight": (64, 768),
        "time_text_embed.guidance_embedder.linear_1.weight": (64, 256),
        "transformer_blocks.1.attn.to_q.weight": (64, 64),
        "transformer_blocks.0.attn.norm_added_k.weight": (32,),
        "single_transformer_blocks.1.proj_mlp.weight": (256, 64),
        "proj_out.weight": (64, 64),
    },
    "flux_kontext": {
        "img_in.weight": (3072, 64),
        "txt_in.weight": (3072, 4096),
        "time_in.in_layer.weight": (3072, 256),
        "vector_in.in_layer.weight": (3072, 768),
        "guidance_in.in_layer.weight": (3072, 256),
        "double_blocks.0.img_mod.lin.weight": (18432, 3072),
        "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
        "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
        "double_blocks.0.txt_mlp.0.weight": (12288, 3072),
        "final_layer.linear.weight": (64, 3072),
        "final_layer.adaLN_modulation.1.weight": (6144, 3072),
    },
    "qwen_image": {
        "img_in.weight": (3072, 64),
        "txt_norm.weight": (3584,),
        "txt_in.weight": (3072, 3584),
        "time_text_embed.timestep_embedder.linear_1.weight": (3072, 256),
        "transformer_blocks.0.img_mod.1.weight": (18432, 3072),
        "transformer_blocks.0.attn.add_k_proj.bias": (3072,),
        "transformer_blocks.0.attn.norm_added_q.weight": (128,),
        "transformer_blocks.0.attn.to_out.0.weight": (3072, 3072),
        "transformer_blocks.0.txt_mlp.net.0.proj.weight": (12288, 3072),
        "norm_out.linear.weight": (6144, 3072),
        "proj_out.weight": (64, 3072),
    },
}
LANDMARKS["wan22_a14b_high"] = LANDMARKS["wan22_a14b_low"] = LANDMARKS["wan21_t2v"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layout_has_the_real_key_names_and_shapes(arch):
    layout = tiny_layout(arch)
    for key, shape in LANDMARKS[arch].items():
        assert key in layout, f"{arch}: {key} missing"
        assert layout[key].shape == shape, f"{arch}: {key} is {layout[key].shape}, expected {shape}"
    assert not any(key.startswith(("model.", "diffusion_model.")) for key in layout)


def _wan_t2v_keys(layers: int) -> set[str]:
    keys = {"patch_embedding.weight", "patch_embedding.bias", "head.head.weight", "head.head.bias", "head.modulation"}
    for name in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1"):
        keys |= {f"{name}.weight", f"{name}.bias"}
    for i in range(layers):
        b = f"blocks.{i}"
        keys |= {f"{b}.modulation", f"{b}.norm3.weight", f"{b}.norm3.bias"}
        keys |= {f"{b}.ffn.{j}.{p}" for j in (0, 2) for p in ("weight", "bias")}
        for attn in ("self_attn", "cross_attn"):
            keys |= {f"{b}.{attn}.{proj}.{p}" for proj in "qkvo" for p in ("weight", "bias")}
            keys |= {f"{b}.{attn}.norm_q.weight", f"{b}.{attn}.norm_k.weight"}
    return keys


def test_wan_key_sets_are_exactly_the_original_wan_names():
    t2v = _wan_t2v_keys(layers=2)
    for arch in ("wan21_t2v", "wan22_ti2v_5b", "wan22_a14b_high", "wan22_a14b_low"):
        assert set(tiny_layout(arch)) == t2v, arch
    i2v_extra = {f"blocks.{i}.cross_attn.{n}" for i in range(2) for n in (
        "k_img.weight", "k_img.bias", "v_img.weight", "v_img.bias", "norm_k_img.weight")}
    i2v_extra |= {f"img_emb.proj.{j}.{p}" for j in (0, 1, 3, 4) for p in ("weight", "bias")}
    assert set(tiny_layout("wan21_i2v")) == t2v | i2v_extra


@pytest.mark.parametrize("arch", COMFY_NATIVE)
def test_layout_meets_comfyui_detection_rules(arch):
    """The rules ComfyUI v0.3.64's model detection applies, restated plainly."""
    layout = tiny_layout(arch)
    keys = set(layout)
    info = ARCHS[arch]
    if info.family == "wan":
        dim = layout["head.modulation"].shape[-1]
        assert dim % 128 == 0  # heads = dim // 128
        assert layout["head.head.weight"].shape[0] // 4 == info.latent_channels
        in_dim = layout["patch_embedding.weight"].shape[1]
        assert in_dim == info.latent_channels + info.concat_channels
        assert ("img_emb.proj.0.bias" in keys) == (arch == "wan21_i2v")
        assert layout["text_embedding.0.weight"].shape[1] == 4096
    elif info.family == "hunyuan_video":
        assert "txt_in.individual_token_refiner.blocks.0.norm1.weight" in keys
        assert layout["img_in.proj.weight"].shape[0] % 128 == 0  # heads = hidden // 128
        assert any(key.startswith("vector_in.") for key in keys)  # else HunyuanImage 2.1
        assert layout["img_in.proj.weight"].shape[1] == 16  # 32 or 33 would be an I2V class
        assert any(key.startswith("guidance_in.") for key in keys)
        assert layout["txt_in.input_embedder.weight"].shape[1] == info.text_dim
    elif info.family == "flux":
        assert {"double_blocks.0.img_attn.norm.key_norm.scale", "img_in.weight", "guidance_in.in_layer.weight"} <= keys
        assert layout["img_in.weight"].shape == (3072, 64)  # in_channels 16, not 96 (inpaint)
        assert not any(key.startswith("single_blocks.") for key in keys)
        assert not any("distilled_guidance_layer" in key for key in keys)  # that is Chroma
    elif info.family == "qwen_image":
        assert "txt_norm.weight" in keys and layout["img_in.weight"].shape[1] == 64
        assert layout["txt_in.weight"].shape == (3072, 3584)


def test_big_layouts_are_the_smallest_detection_allows():
    hidden, mlp, context, pooled = 3072, 4 * 3072, 4096, 768
    linear = lambda i, o: i * o + o  # noqa: E731
    flux = (
        linear(64, hidden) + linear(256, hidden) + linear(hidden, hidden)  # img_in, time_in
        + linear(pooled, hidden) + linear(hidden, hidden)  # vector_in
        + linear(256, hidden) + linear(hidden, hidden)  # guidance_in
        + linear(context, hidden)  # txt_in
        + 2 * (linear(hidden, 6 * hidden) + linear(hidden, 3 * hidden) + 2 * 128 + linear(hidden, hidden)
               + linear(hidden, mlp) + linear(mlp, hidden))  # one double block, img + txt
        + linear(hidden, 64) + linear(hidden, 2 * hidden)  # final layer
    )
    qwen = (
        linear(64, hidden) + 3584 + linear(3584, hidden) + linear(256, hidden) + linear(hidden, hidden)
        + 2 * linear(hidden, 6 * hidden) + 8 * linear(hidden, hidden) + 4 * 128
        + 2 * (linear(hidden, mlp) + linear(mlp, hidden))
        + linear(hidden, 2 * hidden) + linear(hidden, 64)
    )
    count = lambda arch: sum(math.prod(s.shape) for s in tiny_layout(arch).values())  # noqa: E731
    assert count("flux_kontext") == flux
    assert count("qwen_image") == qwen
    assert 400e6 < flux < 410e6 and 375e6 < qwen < 385e6


@pytest.mark.parametrize("arch", SMALL)
def test_small_architectures_stay_small(arch):
    assert sum(math.prod(s.shape) for s in tiny_layout(arch).values()) < 4_000_000


# --- values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", SMALL)
def test_state_dict_is_deterministic_bf16_and_finite(arch):
    first = tiny_state_dict(arch, seed=3)
    second = tiny_state_dict(arch, seed=3)
    other_seed = tiny_state_dict(arch, seed=4)
    layout = tiny_layout(arch)
    assert list(first) == list(layout)
    for key, tensor in first.items():
        assert tensor.dtype == torch.bfloat16
        assert tuple(tensor.shape) == layout[key].shape
        assert torch.isfinite(tensor).all()
        assert torch.equal(tensor, second[key])
    drawn = [key for key, spec in layout.items() if spec.init not in ("ones", "zeros")]
    assert all(not torch.equal(first[key], other_seed[key]) for key in drawn)


def test_same_layout_architectures_get_different_weights():
    t2v, high, low = (tiny_state_dict(a) for a in ("wan21_t2v", "wan22_a14b_high", "wan22_a14b_low"))
    key = "blocks.0.self_attn.q.weight"
    assert not torch.equal(t2v[key], high[key])
    assert not torch.equal(high[key], low[key])
    assert torch.equal(high["blocks.0.norm3.weight"], low["blocks.0.norm3.weight"])  # both ones


def test_values_have_the_intended_scales():
    sd = {k: v.float() for k, v in tiny_state_dict("hunyuan_video", seed=1).items()}
    # Linear weights ~ N(0, 1/fan_in): a 128 x 4096 matrix pins its std to within ~1 %.
    weight = sd["txt_in.input_embedder.weight"]
    assert abs(weight.std().item() - 4096**-0.5) < 0.03 * 4096**-0.5
    assert abs(weight.mean().item()) < 0.05 * 4096**-0.5
    # adaLN modulation: a quarter of that, so shifts, scales and gates start small.
    modulation = sd["double_blocks.0.img_mod.linear.weight"]
    assert abs(modulation.std().item() - 0.25 * 128**-0.5) < 0.03 * 0.25 * 128**-0.5
    assert abs(sd["double_blocks.0.img_attn_qkv.bias"].std().item() - 0.01) < 0.002
    assert torch.equal(sd["double_blocks.0.img_attn_q_norm.weight"], torch.ones(128))
    assert torch.equal(sd["txt_in.individual_token_refiner.blocks.0.norm1.weight"], torch.ones(128))
    assert torch.equal(sd["txt_in.individual_token_refiner.blocks.0.norm1.bias"], torch.zeros(128))
    wan = tiny_state_dict("wan21_t2v")
    table = wan["blocks.0.modulation"].float()
    assert abs(table.std().item() - 128**-0.5) < 0.15 * 128**-0.5  # only 768 values


def test_a_wider_dtype_holds_the_same_values_before_rounding():
    full = tiny_state_dict("wan21_i2v", seed=7, dtype=torch.float32)
    bf16 = tiny_state_dict("wan21_i2v", seed=7)
    for key in full:
        assert full[key].dtype == torch.float32
        assert torch.equal(full[key].to(torch.bfloat16), bf16[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("arch", BIG)
def test_big_state_dicts_match_their_layout(arch, big_state_dicts):
    sd = big_state_dicts(arch)
    layout = tiny_layout(arch)
    assert list(sd) == list(layout)
    for key, tensor in sd.items():
        assert tensor.dtype == torch.bfloat16
        assert tuple(tensor.shape) == layout[key].shape
    # The widest matrices of each model: finite, N(0, 1/fan_in).
    widest = max((k for k in layout if layout[k].init == "weight"), key=lambda k: math.prod(layout[k].shape))
    values = sd[widest].float()
    fan_in = layout[widest].shape[1]
    assert torch.isfinite(values).all()
    assert abs(values.std().item() - fan_in**-0.5) < 0.01 * fan_in**-0.5


# --- files ---------------------------------------------------------------------------------------


def test_write_round_trips_with_metadata_and_leaves_no_temp_files(tmp_path):
    path = write_tiny_checkpoint("wan21_i2v", tmp_path / "sub" / "wan.safetensors", seed=2)
    assert path == tmp_path / "sub" / "wan.safetensors"
    expected = tiny_state_dict("wan21_i2v", seed=2)
    loaded = load_file(path)
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["tiny_arch"] == "wan21_i2v" and metadata["tiny_seed"] == "2"
    assert metadata["tiny_dtype"] == "bfloat16" and "config" not in metadata
    # overwrite in place
    write_tiny_checkpoint("wan21_t2v", path, seed=2)
    assert "img_emb.proj.1.weight" not in load_file(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["wan.safetensors"]


def test_ensure_reuses_a_matching_file_and_replaces_a_stale_one(tmp_path):
    path = ensure_tiny_checkpoint("wan21_t2v", tmp_path, seed=5)
    assert path.name == "tiny_wan21_t2v_s5.safetensors"
    stamp = path.stat().st_mtime_ns
    os.utime(path, ns=(stamp - 10**9, stamp - 10**9))
    assert ensure_tiny_checkpoint("wan21_t2v", tmp_path, seed=5).stat().st_mtime_ns == stamp - 10**9
    save_file({"x": torch.zeros(1)}, str(path), metadata={"tiny_arch": "something else"})
    ensure_tiny_checkpoint("wan21_t2v", tmp_path, seed=5)
    assert set(load_file(path)) == set(tiny_layout("wan21_t2v"))
    path.write_bytes(b"truncated")
    ensure_tiny_checkpoint("wan21_t2v", tmp_path, seed=5)
    assert set(load_file(path)) == set(tiny_layout("wan21_t2v"))


def test_framepack_file_loads_strictly_into_diffusers_and_runs(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    path = write_tiny_checkpoint("framepack", tmp_path / "framepack.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        config = json.loads(handle.metadata()["config"])
    assert config == framepack_config()
    assert config["_class_name"] == "HunyuanVideoFramepackTransformer3DModel"
    assert config["rope_axes_dim"] == [8, 12, 12] and config["has_image_proj"] and config["has_clean_x_embedder"]
    assert sum(config["rope_axes_dim"]) == config["attention_head_dim"]

    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    kwargs["rope_axes_dim"] = tuple(kwargs["rope_axes_dim"])
    model = HunyuanVideoFramepackTransformer3DModel(**kwargs)
    result = model.load_state_dict(load_file(path), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model = model.to(torch.float32).eval()

    generator = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    inputs = dict(
        hidden_states=randn(1, 16, 2, 8, 8), timestep=torch.tensor([700.0]),
        encoder_hidden_states=randn(1, 5, 4096), encoder_attention_mask=torch.ones(1, 5, dtype=torch.bool),
        pooled_projections=randn(1, 768), image_embeds=randn(1, 729, 1152),
        indices_latents=torch.tensor([1, 2]), guidance=torch.tensor([10_000.0]),
        latents_clean=randn(1, 16, 2, 8, 8), indices_latents_clean=torch.tensor([0, 3]),
        latents_history_2x=randn(1, 16, 2, 8, 8), indices_latents_history_2x=torch.tensor([4, 5]),
        latents_history_4x=randn(1, 16, 4, 8, 8), indices_latents_history_4x=torch.tensor([6, 7, 8, 9]),
        return_dict=False,
    )
    with torch.no_grad():
        out = model(**inputs)[0]
        out_other_image = model(**{**inputs, "image_embeds": randn(1, 729, 1152)})[0]
    assert out.shape == (1, 16, 2, 8, 8)
    assert torch.isfinite(out).all() and 0.1 < out.std().item() < 10
    assert (out - out_other_image).abs().max().item() > 1e-3  # the image embedding is wired in


# --- inside a real ComfyUI ------------------------------------------------------------------------

# Runs in a subprocess so ComfyUI's import-time global state stays out of the test process.
# For each file: detect, load through comfy.sd.load_diffusion_model (what UNETLoader calls),
# compare the loaded weights with the file, build conditioning through the model's own
# extra_conds and run apply_model twice (two different text contexts).
COMFY_CHECK_SCRIPT = r"""
import json, sys, time, types
comfy_path, tests_dir = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_path)
sys.path.insert(0, tests_dir)
import torch
import comfy.cli_args
if not torch.cuda.is_available():
    comfy.cli_args.args.cpu = True
import comfy.model_detection, comfy.sd, comfy.utils
from tiny_checkpoints import ARCHS


def same_values(loaded, stored):
    # Whole tensors for the small models; the first rows of the ~100 M-value Flux/Qwen matrices.
    if stored.numel() > 4_000_000:
        loaded, stored = loaded[:4], stored[:4]
    return torch.equal(loaded.to(stored.dtype).cpu(), stored)


results = {}
for line in sys.stdin:  # one job per line, sent as each file is written (imports above run meanwhile)
    arch, path = json.loads(line)
    info = ARCHS[arch]
    started = time.perf_counter()
    sd = comfy.utils.load_torch_file(path)
    config = comfy.model_detection.model_config_from_unet(sd, "")
    result = {"config_class": type(config).__name__ if config is not None else None}
    results[arch] = result
    if config is None:
        continue
    file_sd = config.process_unet_state_dict(dict(sd))
    patcher = comfy.sd.load_diffusion_model(path)
    model = patcher.model
    loaded = model.diffusion_model.state_dict()
    result["model_class"] = type(model).__name__
    result["missing"] = sorted(set(loaded) - set(file_sd))
    result["unexpected"] = sorted(set(file_sd) - set(loaded))
    result["mismatched"] = sorted(k for k in set(file_sd) & set(loaded) if not same_values(loaded[k], file_sd[k]))
    result["load_s"] = time.perf_counter() - started

    generator = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=generator)
    frames = 1 if info.family == "qwen_image" else 2
    spatial = (8, 8)
    shape = (1, info.latent_channels, frames, *spatial) if info.latent_dims == 5 else (1, info.latent_channels, *spatial)
    x = randn(*shape)
    conds = dict(noise=x, device=patcher.load_device, cross_attn=randn(1, 6, info.text_dim))
    if info.pooled_dim:
        conds["pooled_output"] = randn(1, info.pooled_dim)
    if info.needs_clip_vision:
        conds["clip_vision_output"] = types.SimpleNamespace(
            penultimate_hidden_states=randn(1, info.clip_vision_tokens, info.clip_vision_dim))
    if info.concat_channels:
        conds["concat_latent_image"] = randn(1, info.latent_channels, frames, *spatial)
    if info.family == "flux":
        conds["reference_latents"] = [randn(1, info.latent_channels, *spatial)]
    sigma = torch.tensor([0.7])
    outputs = []
    started = time.perf_counter()
    for _ in range(2):
        extra = {k: v.cond for k, v in model.extra_conds(**conds).items()}
        with torch.no_grad():
            denoised = model.apply_model(x.to(patcher.load_device), sigma.to(patcher.load_device), **extra)
        outputs.append(((x - denoised.cpu().float()) / sigma).float())
        conds["cross_attn"] = randn(1, 6, info.text_dim)
    result["forward_s"] = (time.perf_counter() - started) / 2
    result["cond_shapes"] = {k: list(v.shape) for k, v in extra.items() if hasattr(v, "shape")}
    result["out_shape"] = list(outputs[0].shape)
    result["finite"] = bool(torch.isfinite(outputs[0]).all())
    result["out_std"] = outputs[0].std().item()
    result["text_effect"] = (outputs[0] - outputs[1]).abs().max().item()
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def comfy_checks(tmp_path_factory, big_state_dicts):
    comfy_path = find_comfyui()
    if comfy_path is None:
        pytest.skip("ComfyUI not found: set COMFYUI_PATH or unpack ComfyUI at ~/comfy/ComfyUI")
    folder = tmp_path_factory.mktemp("tiny_for_comfy")
    # ComfyUI's imports take seconds: start them first and hand over each file once written.
    process = subprocess.Popen(
        [sys.executable, "-c", COMFY_CHECK_SCRIPT, str(comfy_path), str(Path(__file__).parent)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for arch in COMFY_NATIVE:
            path = folder / f"{arch}.safetensors"
            if ARCHS[arch].big:  # reuse the session's state dict rather than drawing 400 M values again
                save_file(big_state_dicts(arch), str(path), metadata=tiny_metadata(arch))
            else:
                write_tiny_checkpoint(arch, path)
            try:
                process.stdin.write(json.dumps([arch, str(path)]) + "\n")
                process.stdin.flush()
            except BrokenPipeError:  # it died: its output below says why
                break
        stdout, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for job_path in folder.iterdir():  # ~1.6 GB: do not leave it to pytest's tmp retention
            job_path.unlink()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULTS ")]
    assert process.returncode == 0 and lines, f"ComfyUI check failed:\n{stdout[-4000:]}\n{stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.comfyui
@pytest.mark.slow
@pytest.mark.parametrize("arch", COMFY_NATIVE)
def test_comfyui_detects_loads_and_runs_the_tiny_checkpoint(arch, comfy_checks):
    info = ARCHS[arch]
    result = comfy_checks[arch]
    assert result["config_class"] == info.comfy_config_class
    assert result["model_class"] == info.comfy_model_class
    assert result["missing"] == [] and result["unexpected"] == [] and result["mismatched"] == []
    frames = 1 if info.family == "qwen_image" else 2
    latent = [1, info.latent_channels, frames, 8, 8] if info.latent_dims == 5 else [1, info.latent_channels, 8, 8]
    assert result["out_shape"] == latent
    assert result["finite"]
    assert 0.1 < result["out_std"] < 10
    assert result["text_effect"] > 1e-3
    shapes = result["cond_shapes"]
    assert shapes["c_crossattn"] == [1, 6, info.text_dim]
    if info.pooled_dim:
        assert shapes["y"] == [1, info.pooled_dim]
    if info.guidance_embed:
        assert "guidance" in shapes
    if info.concat_channels:
        assert shapes["c_concat"][1] == info.concat_channels
    if info.needs_clip_vision:
        assert shapes["clip_fea"] == [1, info.clip_vision_tokens, info.clip_vision_dim]
