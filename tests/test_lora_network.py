"""LoRA network: layer selection per architecture, the LoRA math, dropouts, hooks, LoRA+ groups.

The module trees below copy the class names and layer paths of the real models (ComfyUI v0.3.64's
Wan, HunyuanVideo, FLUX and Qwen-Image, diffusers' FramePack, and the official HunyuanVideo
code that musubi-tuner uses) with tiny widths, so selection is tested on the real names without
loading any real model.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from musubi.errors import MusubiError
from musubi.lora.network import LoRAModule, LoRANetwork, network_from_args
from musubi.lora.presets import PRESETS, get_preset

torch.set_num_threads(1)

D = 8  # hidden width of the mirrored trees


def linear(i=D, o=D):
    return nn.Linear(i, o)


# --- Wan (comfy/ldm/wan/model.py) ----------------------------------------------------------------


class WanSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = linear(), linear(), linear(), linear()
        self.norm_q, self.norm_k = nn.RMSNorm(D), nn.RMSNorm(D)


class WanI2VCrossAttention(WanSelfAttention):
    def __init__(self):
        super().__init__()
        self.k_img, self.v_img = linear(), linear()
        self.norm_k_img = nn.RMSNorm(D)


class WanAttentionBlock(nn.Module):
    def __init__(self, i2v=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False)
        self.self_attn = WanSelfAttention()
        self.norm3 = nn.LayerNorm(D)
        self.cross_attn = WanI2VCrossAttention() if i2v else WanSelfAttention()
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False)
        self.ffn = nn.Sequential(linear(D, 2 * D), nn.GELU(approximate="tanh"), linear(2 * D, D))
        self.modulation = nn.Parameter(torch.zeros(1, 6, D))


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.head = linear(D, 4)
        self.modulation = nn.Parameter(torch.zeros(1, 2, D))


class MLPProj(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(D), linear(), nn.GELU(), linear(), nn.LayerNorm(D))


class WanModel(nn.Module):
    def __init__(self, i2v=False, blocks=2):
        super().__init__()
        self.patch_embedding = nn.Conv3d(4, D, (1, 2, 2), stride=(1, 2, 2))
        self.text_embedding = nn.Sequential(linear(), nn.GELU(approximate="tanh"), linear())
        self.time_embedding = nn.Sequential(linear(), nn.SiLU(), linear())
        self.time_projection = nn.Sequential(nn.SiLU(), linear(D, 6 * D))
        self.blocks = nn.ModuleList([WanAttentionBlock(i2v) for _ in range(blocks)])
        self.head = Head()
        if i2v:
            self.img_emb = MLPProj()


# --- HunyuanVideo / FLUX as ComfyUI builds them (comfy/ldm/flux/layers.py) -----------------------


class Modulation(nn.Module):
    def __init__(self, double):
        super().__init__()
        self.lin = linear(D, (6 if double else 3) * D)


class QKNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.query_norm, self.key_norm = nn.RMSNorm(4), nn.RMSNorm(4)


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = linear(D, 3 * D)
        self.norm = QKNorm()
        self.proj = linear()


class DoubleStreamBlock(nn.Module):
    def __init__(self):
        super().__init__()
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(double=True))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(D, elementwise_affine=False))
            setattr(self, f"{stream}_attn", SelfAttention())
            setattr(self, f"{stream}_norm2", nn.LayerNorm(D, elementwise_affine=False))
            setattr(self, f"{stream}_mlp", nn.Sequential(linear(D, 4 * D), nn.GELU(approximate="tanh"), linear(4 * D, D)))


class SingleStreamBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = linear(D, 3 * D + 4 * D)
        self.linear2 = linear(D + 4 * D, D)
        self.norm = QKNorm()
        self.pre_norm = nn.LayerNorm(D, elementwise_affine=False)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(double=False)


class MLPEmbedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_layer, self.silu, self.out_layer = linear(), nn.SiLU(), linear()


class LastLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False)
        self.linear = linear(D, 4)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), linear(D, 2 * D))


class SelfAttentionRef(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = linear(D, 3 * D), linear()


class TokenRefinerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), linear(D, 2 * D))
        self.norm1 = nn.LayerNorm(D)
        self.self_attn = SelfAttentionRef()
        self.norm2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(linear(), nn.SiLU(), linear())


class IndividualTokenRefiner(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([TokenRefinerBlock() for _ in range(2)])


class TokenRefiner(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_embedder = linear()
        self.t_embedder, self.c_embedder = MLPEmbedder(), MLPEmbedder()
        self.individual_token_refiner = IndividualTokenRefiner()


class PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv3d(4, D, (1, 2, 2), stride=(1, 2, 2))


class HunyuanVideo(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_in = PatchEmbed()
        self.time_in, self.vector_in, self.guidance_in = MLPEmbedder(), MLPEmbedder(), MLPEmbedder()
        self.txt_in = TokenRefiner()
        self.double_blocks = nn.ModuleList([DoubleStreamBlock() for _ in range(2)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock() for _ in range(2)])
        self.final_layer = LastLayer()


class Flux(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_in, self.txt_in = linear(), linear()
        self.time_in, self.vector_in, self.guidance_in = MLPEmbedder(), MLPEmbedder(), MLPEmbedder()
        self.double_blocks = nn.ModuleList([DoubleStreamBlock()])
        self.single_blocks = nn.ModuleList([SingleStreamBlock()])
        self.final_layer = LastLayer()


# --- HunyuanVideo with the official names (musubi-tuner's own model) ------------------------------


class ModulateDiT(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.act, self.linear = nn.SiLU(), linear(D, factor * D)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = linear(D, 4 * D), nn.GELU(), linear(4 * D, D)


class MMDoubleStreamBlock(nn.Module):
    def __init__(self):
        super().__init__()
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", ModulateDiT(6))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(D))
            setattr(self, f"{stream}_attn_qkv", linear(D, 3 * D))
            setattr(self, f"{stream}_attn_q_norm", nn.RMSNorm(4))
            setattr(self, f"{stream}_attn_proj", linear())
            setattr(self, f"{stream}_norm2", nn.LayerNorm(D))
            setattr(self, f"{stream}_mlp", MLP())


class MMSingleStreamBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1, self.linear2 = linear(D, 7 * D), linear(5 * D, D)
        self.q_norm, self.pre_norm = nn.RMSNorm(4), nn.LayerNorm(D)
        self.modulation = ModulateDiT(3)


class HYVideoDiffusionTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.double_blocks = nn.ModuleList([MMDoubleStreamBlock()])
        self.single_blocks = nn.ModuleList([MMSingleStreamBlock()])


# --- Qwen-Image (comfy/ldm/qwen_image/model.py) --------------------------------------------------


class GELU(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.proj = linear(i, o)


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.ModuleList([GELU(D, 4 * D), nn.Dropout(0.0), linear(4 * D, D)])


class Attention(nn.Module):
    def __init__(self, joint=True):
        super().__init__()
        self.norm_q, self.norm_k = nn.RMSNorm(4), nn.RMSNorm(4)
        self.to_q, self.to_k, self.to_v = linear(), linear(), linear()
        if joint:
            self.norm_added_q, self.norm_added_k = nn.RMSNorm(4), nn.RMSNorm(4)
            self.add_q_proj, self.add_k_proj, self.add_v_proj = linear(), linear(), linear()
            self.to_out = nn.ModuleList([linear(), nn.Dropout(0.0)])
            self.to_add_out = linear()


class QwenImageTransformerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), linear(D, 6 * D))
        self.img_norm1 = nn.LayerNorm(D, elementwise_affine=False)
        self.img_norm2 = nn.LayerNorm(D, elementwise_affine=False)
        self.img_mlp = FeedForward()
        self.txt_mod = nn.Sequential(nn.SiLU(), linear(D, 6 * D))
        self.txt_norm1 = nn.LayerNorm(D, elementwise_affine=False)
        self.txt_norm2 = nn.LayerNorm(D, elementwise_affine=False)
        self.txt_mlp = FeedForward()
        self.attn = Attention()


class QwenTimestepProjEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.timestep_embedder = nn.Module()
        self.timestep_embedder.linear_1, self.timestep_embedder.linear_2 = linear(), linear()


class QwenLastLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.silu, self.linear, self.norm = nn.SiLU(), linear(D, 2 * D), nn.LayerNorm(D)


class QwenImageTransformer2DModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.time_text_embed = QwenTimestepProjEmbeddings()
        self.txt_norm = nn.RMSNorm(D)
        self.img_in, self.txt_in = linear(), linear()
        self.transformer_blocks = nn.ModuleList([QwenImageTransformerBlock() for _ in range(2)])
        self.norm_out = QwenLastLayer()
        self.proj_out = linear(D, 4)


# --- FramePack (diffusers HunyuanVideoFramepackTransformer3DModel) --------------------------------


class AdaNorm(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.silu, self.linear = nn.SiLU(), linear(D, factor * D)
        self.norm = nn.LayerNorm(D)


class HunyuanVideoTransformerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm1_context = AdaNorm(6), AdaNorm(6)
        self.attn = Attention()
        self.norm2, self.norm2_context = nn.LayerNorm(D), nn.LayerNorm(D)
        self.ff, self.ff_context = FeedForward(), FeedForward()


class HunyuanVideoSingleTransformerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention(joint=False)
        self.norm = AdaNorm(3)
        self.proj_mlp, self.act_mlp, self.proj_out = linear(D, 4 * D), nn.GELU(), linear(5 * D, D)


class HunyuanVideoIndividualTokenRefinerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention(joint=False)
        self.ff = FeedForward()
        self.norm_out = nn.Module()
        self.norm_out.linear = linear(D, 2 * D)


class HunyuanVideoFramepackTransformer3DModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.x_embedder = PatchEmbed()
        self.context_embedder = nn.Module()
        self.context_embedder.proj_in = linear()
        self.context_embedder.token_refiner = nn.Module()
        self.context_embedder.token_refiner.refiner_blocks = nn.ModuleList([HunyuanVideoIndividualTokenRefinerBlock()])
        self.image_projection = nn.Module()
        self.image_projection.up, self.image_projection.down = linear(), linear()
        self.transformer_blocks = nn.ModuleList([HunyuanVideoTransformerBlock()])
        self.single_transformer_blocks = nn.ModuleList([HunyuanVideoSingleTransformerBlock()])
        self.norm_out = AdaNorm(2)
        self.proj_out = linear(D, 4)


# --- expected default targets, written out per block ---------------------------------------------

WAN_BLOCK = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
             "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]
WAN_I2V_BLOCK = WAN_BLOCK[:8] + ["cross_attn.k_img", "cross_attn.v_img"] + WAN_BLOCK[8:]
COMFY_DOUBLE = ["img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
                "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2"]
SINGLE = ["linear1", "linear2"]
OFFICIAL_DOUBLE = ["img_attn_qkv", "img_attn_proj", "img_mlp.fc1", "img_mlp.fc2",
                   "txt_attn_qkv", "txt_attn_proj", "txt_mlp.fc1", "txt_mlp.fc2"]
QWEN_BLOCK = ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
              "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out"]
FRAMEPACK_DOUBLE = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
FRAMEPACK_SINGLE = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]


def under(prefix, names):
    return {f"{prefix}.{name}" for name in names}


DEFAULT_TARGETS = {
    "wan": (WanModel, under("blocks.0", WAN_BLOCK) | under("blocks.1", WAN_BLOCK)),
    "hunyuan_video": (
        HunyuanVideo,
        under("double_blocks.0", COMFY_DOUBLE) | under("double_blocks.1", COMFY_DOUBLE)
        | under("single_blocks.0", SINGLE) | under("single_blocks.1", SINGLE),
    ),
    "flux": (Flux, under("double_blocks.0", COMFY_DOUBLE) | under("single_blocks.0", SINGLE)),
    "qwen_image": (
        QwenImageTransformer2DModel, under("transformer_blocks.0", QWEN_BLOCK) | under("transformer_blocks.1", QWEN_BLOCK)
    ),
    "framepack": (
        HunyuanVideoFramepackTransformer3DModel,
        under("transformer_blocks.0", FRAMEPACK_DOUBLE) | under("single_transformer_blocks.0", FRAMEPACK_SINGLE),
    ),
}


def linear_paths(model):
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}


@pytest.mark.parametrize("arch", sorted(DEFAULT_TARGETS))
def test_default_targets_are_the_attention_and_mlp_layers(arch):
    model_class, expected = DEFAULT_TARGETS[arch]
    network = LoRANetwork(model_class(), arch)
    assert set(network.module_names()) == expected
    assert len(network.module_names()) == len(expected)


def test_wan_i2v_trains_the_image_cross_attention_and_no_embedding_or_head():
    model = WanModel(i2v=True)
    network = LoRANetwork(model, "wan")
    assert set(network.module_names()) == under("blocks.0", WAN_I2V_BLOCK) | under("blocks.1", WAN_I2V_BLOCK)
    untouched = linear_paths(model) - set(network.module_names())
    assert {"text_embedding.0", "time_projection.1", "head.head", "img_emb.proj.1"} <= untouched


@pytest.mark.parametrize("arch, model_class, modulation", [
    ("hunyuan_video", HunyuanVideo, {"double_blocks.0.img_mod.lin", "double_blocks.1.txt_mod.lin", "single_blocks.0.modulation.lin"}),
    ("hunyuan_video", HYVideoDiffusionTransformer, {"double_blocks.0.img_mod.linear", "double_blocks.0.txt_mod.linear", "single_blocks.0.modulation.linear"}),
    ("flux", Flux, {"double_blocks.0.img_mod.lin", "double_blocks.0.txt_mod.lin", "single_blocks.0.modulation.lin"}),
    ("qwen_image", QwenImageTransformer2DModel, {"transformer_blocks.0.img_mod.1", "transformer_blocks.1.txt_mod.1"}),
    ("framepack", HunyuanVideoFramepackTransformer3DModel, {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear", "single_transformer_blocks.0.norm.linear"}),
])
def test_modulation_layers_are_excluded_by_default(arch, model_class, modulation):
    model = model_class()
    assert modulation <= linear_paths(model)  # the names are real layers of the tree
    names = set(LoRANetwork(model, arch).module_names())
    assert names and not modulation & names


def test_hunyuan_video_official_tree_targets_the_official_layer_names():
    network = LoRANetwork(HYVideoDiffusionTransformer(), "hunyuan_video")
    assert set(network.module_names()) == under("double_blocks.0", OFFICIAL_DOUBLE) | under("single_blocks.0", SINGLE)


def test_flux_keeps_its_modulation_exclusion_when_the_user_adds_patterns():
    network = LoRANetwork(Flux(), "flux", exclude_patterns=[r".*linear2"])
    assert set(network.module_names()) == under("double_blocks.0", COMFY_DOUBLE) | {"single_blocks.0.linear1"}


def test_include_patterns_only_rescue_excluded_layers():
    # An include pattern alone does not narrow the selection ...
    only_include = LoRANetwork(WanModel(blocks=1), "wan", include_patterns=[r".*ffn\.0"])
    assert set(only_include.module_names()) == under("blocks.0", WAN_BLOCK)
    # ... it rescues what an exclude pattern removed: exclude everything, include a subset.
    subset = LoRANetwork(WanModel(blocks=1), "wan", exclude_patterns=[".*"], include_patterns=[r".*self_attn\.(q|k)"])
    assert subset.module_names() == ["blocks.0.self_attn.q", "blocks.0.self_attn.k"]
    # It can also rescue a default exclusion (train FLUX's modulation on purpose).
    rescued = LoRANetwork(Flux(), "flux", include_patterns=[r".*img_mod\.lin"])
    assert "double_blocks.0.img_mod.lin" in rescued.module_names()


def test_patterns_must_match_the_whole_path():
    network = LoRANetwork(WanModel(blocks=1), "wan", exclude_patterns=["ffn"])  # no .* around: matches nothing
    assert set(network.module_names()) == under("blocks.0", WAN_BLOCK)
    network = LoRANetwork(WanModel(blocks=1), "wan", exclude_patterns=[r"blocks\.0\.ffn\.\d"])
    assert set(network.module_names()) == under("blocks.0", WAN_BLOCK[:8])


def test_an_invalid_regex_is_an_error_that_names_it():
    with pytest.raises(MusubiError, match=r"exclude_patterns.*\(unclosed"):
        LoRANetwork(WanModel(blocks=1), "wan", exclude_patterns=["(unclosed"])
    with pytest.raises(MusubiError, match=r"include_patterns.*\[z-a\]"):
        LoRANetwork(WanModel(blocks=1), "wan", include_patterns=["[z-a]"])


def test_an_empty_selection_says_which_preset_and_patterns_matched_nothing():
    with pytest.raises(MusubiError, match=r"'wan'.*\['\.\*'"):
        LoRANetwork(WanModel(blocks=1), "wan", exclude_patterns=[".*"])
    with pytest.raises(MusubiError, match=r"'qwen_image'.*QwenImageTransformerBlock"):
        LoRANetwork(WanModel(blocks=1), "qwen_image")
    with pytest.raises(MusubiError, match="unknown LoRA architecture 'sdxl'.*wan"):
        LoRANetwork(WanModel(blocks=1), "sdxl")


class CollidingBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.x = nn.Module()
        self.x.y_z = linear()
        self.x_y = nn.Module()
        self.x_y.z = linear()


def test_paths_that_collide_in_musubi_names_are_an_error():
    with pytest.raises(MusubiError, match=r"'0\.x\.y_z' and '0\.x_y\.z'.*lora_unet_0_x_y_z"):
        LoRANetwork(nn.Sequential(CollidingBlock()), "generic")
    # Excluding one of them resolves it.
    network = LoRANetwork(nn.Sequential(CollidingBlock()), "generic", exclude_patterns=[r".*x_y\.z"])
    assert network.module_names() == ["0.x.y_z"]


@pytest.mark.parametrize("spelling", [True, "true", "True", 1, "yes"])
def test_verbose_accepts_every_true_spelling_and_logs_the_selection(spelling, caplog):
    with caplog.at_level(logging.INFO, logger="musubi.lora.network"):
        LoRANetwork(Flux(), "flux", verbose=spelling)
    assert "excluded double_blocks.0.img_mod.lin" in caplog.text
    assert "created double_blocks.0.img_attn.qkv" in caplog.text


def test_verbose_off_logs_no_layer_names_and_nonsense_is_an_error(caplog):
    with caplog.at_level(logging.INFO, logger="musubi.lora.network"):
        LoRANetwork(Flux(), "flux", verbose="false")
    assert "img_mod.lin" not in caplog.text
    with pytest.raises(MusubiError, match="verbose"):
        LoRANetwork(Flux(), "flux", verbose="maybe")


def test_generic_preset_takes_every_linear_inside_blocks():
    model = HunyuanVideoFramepackTransformer3DModel()
    names = set(LoRANetwork(model, "generic").module_names())
    inside_blocks = {p for p in linear_paths(model) if ".refiner_blocks." in p or "transformer_blocks." in p}
    assert names == inside_blocks


def test_presets_carry_musubi_module_names_and_model_spec():
    expected = {
        "wan": ("networks.lora_wan", "wan2.1", "1280x720"),
        "hunyuan_video": ("networks.lora", "hunyuan-video", "1280x720"),
        "framepack": ("networks.lora_framepack", "framepack", "1280x720"),
        "flux": ("networks.lora_flux", "Flux.1-dev", "1280x720"),
        "qwen_image": ("networks.lora_qwen_image", "Qwen-Image", "1328x1328"),
    }
    for name, (module, spec, resolution) in expected.items():
        preset = get_preset(name)
        assert (preset.network_module, preset.modelspec_architecture, preset.resolution) == (module, spec, resolution)
    assert set(PRESETS) == set(expected) | {"generic"}


def test_hunyuan_video_names_map_both_ways_between_comfyui_and_musubi():
    preset = get_preset("hunyuan_video")
    pairs = {
        "double_blocks.0.img_mlp.0": "double_blocks.0.img_mlp.fc1",
        "double_blocks.3.txt_mlp.2": "double_blocks.3.txt_mlp.fc2",
        "double_blocks.0.img_mod.lin": "double_blocks.0.img_mod.linear",
        "double_blocks.0.img_attn.qkv": "double_blocks.0.img_attn_qkv",
        "double_blocks.0.txt_attn.proj": "double_blocks.0.txt_attn_proj",
        "single_blocks.7.modulation.lin": "single_blocks.7.modulation.linear",
        "single_blocks.7.linear1": "single_blocks.7.linear1",
    }
    for comfy, official in pairs.items():
        assert preset.musubi_name(comfy) == official
        assert preset.tree_name(official) == comfy
        assert preset.musubi_name(official) == official  # already official: unchanged
    assert get_preset("wan").musubi_name("blocks.0.ffn.0") == "blocks.0.ffn.0"


# --- the LoRA math --------------------------------------------------------------------------------


class ToyBlock(nn.Module):
    def __init__(self, features=6, out=5):
        super().__init__()
        self.proj = nn.Linear(features, out)

    def forward(self, x):
        return self.proj(x)


def toy(features=6, out=5, dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(ToyBlock(features, out)).to(dtype)
    model.requires_grad_(False)
    return model


def randomize_up(network, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.lora_modules:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator))


def test_down_is_kaiming_uniform_and_up_is_zero_so_the_output_starts_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(ToyBlock(features=400, out=3))
    x = torch.randn(2, 400)
    before = model(x)
    network = LoRANetwork(model, "generic", network_dim=16)
    down = network.lora_modules[0].lora_down.weight
    bound = 1 / math.sqrt(400)
    assert down.abs().max() <= bound and down.abs().max() > 0.95 * bound
    assert abs(down.mean().item()) < 0.1 * bound
    assert torch.equal(network.lora_modules[0].lora_up.weight, torch.zeros(3, 16))
    assert torch.equal(model(x), before)


# alpha 0 means α = r; an unset network alpha is musubi-tuner's default 1.0.
@pytest.mark.parametrize("alpha, multiplier, expected_scale", [(2.0, 0.7, 0.5), (0, 1.0, 1.0), (None, 1.0, 0.25), (8.0, 1.0, 2.0)])
def test_output_is_base_plus_multiplier_times_alpha_over_rank_up_down(alpha, multiplier, expected_scale):
    model = toy()
    network = LoRANetwork(model, "generic", network_dim=4, network_alpha=alpha)
    randomize_up(network)
    network.set_multiplier(multiplier)
    module = network.lora_modules[0]
    assert module.scale == expected_scale
    x = torch.randn(3, 7, 6)
    layer = model[0].proj
    base = x.double() @ layer.weight.double().T + layer.bias.double()
    lora = (x.double() @ module.lora_down.weight.double().T) @ module.lora_up.weight.double().T
    expected = base + multiplier * expected_scale * lora
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_multiplier_zero_is_exactly_the_base_model():
    model = toy()
    x = torch.randn(2, 6)
    base = model(x)
    network = LoRANetwork(model, "generic")
    randomize_up(network)
    network.set_multiplier(0.0)
    assert torch.equal(model(x), base)


def test_lora_runs_in_its_own_dtype_and_the_output_keeps_the_layer_dtype():
    model = toy(dtype=torch.bfloat16)
    x = torch.randn(4, 6).to(torch.bfloat16)
    base = model(x)
    network = LoRANetwork(model, "generic", network_dim=3, network_alpha=3)
    randomize_up(network)
    module = network.lora_modules[0]
    assert module.lora_down.weight.dtype == torch.float32
    out = model(x)
    assert out.dtype == torch.bfloat16
    delta = (x.float() @ module.lora_down.weight.T) @ module.lora_up.weight.T
    torch.testing.assert_close(out, (base.float() + delta).to(torch.bfloat16), rtol=0, atol=0.02)


class ScaledFp8Linear(nn.Linear):
    """Like ComfyUI's fp8 ops: the stored weight is float8 with a scale; forward dequantizes it."""

    def __init__(self, source: nn.Linear):
        super().__init__(source.in_features, source.out_features, device="meta")
        scale = source.weight.abs().max() / 448
        self.weight = nn.Parameter((source.weight / scale).to(torch.float8_e4m3fn), requires_grad=False)
        self.bias = nn.Parameter(source.bias.detach().clone(), requires_grad=False)
        self.register_buffer("scale_weight", scale.detach().reshape(()))

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.scale_weight, self.bias)


def test_hooks_work_on_layers_whose_weights_are_fp8():
    model = toy()
    model[0].proj = ScaledFp8Linear(model[0].proj)
    x = torch.randn(2, 6)
    base = model(x)
    network = LoRANetwork(model, "generic", network_dim=2, network_alpha=2)
    randomize_up(network)
    module = network.lora_modules[0]
    expected = base + (x @ module.lora_down.weight.T) @ module.lora_up.weight.T
    torch.testing.assert_close(model(x), expected)
    assert model[0].proj.weight.dtype == torch.float8_e4m3fn  # the layer itself is untouched


def test_gradients_reach_only_the_lora_weights():
    model = toy()
    network = LoRANetwork(model, "generic", network_dim=2)
    randomize_up(network)
    model(torch.randn(3, 6)).square().sum().backward()
    assert all(p.grad is None for p in model.parameters())
    for module in network.lora_modules:
        assert module.lora_down.weight.grad.abs().sum() > 0
        assert module.lora_up.weight.grad.abs().sum() > 0


def test_remove_detaches_every_hook_and_attach_restores_them():
    model = WanModel(blocks=1)
    network = LoRANetwork(model, "wan")
    targets = dict(model.named_modules())
    assert all(len(targets[p]._forward_hooks) == 1 for p in network.module_names())
    network.remove()
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert not network.attached
    network.attach()
    assert all(len(targets[p]._forward_hooks) == 1 for p in network.module_names())


def test_remove_gives_back_the_exact_base_output():
    model = toy()
    x = torch.randn(2, 6)
    base = model(x)
    network = LoRANetwork(model, "generic")
    randomize_up(network)
    assert not torch.equal(model(x), base)
    network.remove()
    assert torch.equal(model(x), base)


def test_the_model_is_not_part_of_the_network():
    model = toy()
    network = LoRANetwork(model, "generic", network_dim=2)
    assert sum(p.numel() for p in network.parameters()) == 2 * 6 + 5 * 2
    network.to(torch.bfloat16)
    assert network.lora_modules[0].lora_up.weight.dtype == torch.bfloat16
    assert model[0].proj.weight.dtype == torch.float32
    assert set(network.state_dict()) == {"0.proj.lora_down.weight", "0.proj.lora_up.weight", "0.proj.alpha"}


def test_hooks_trace_through_torch_compile():
    model = toy()
    network = LoRANetwork(model, "generic", network_dim=2)
    randomize_up(network)
    x = torch.randn(2, 6)
    eager = model(x)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)


# --- dropouts -------------------------------------------------------------------------------------


def identity_lora(**dropouts):
    """A 4→4 layer whose LoRA is D = U = I with α = r, so the LoRA term equals the (dropped) input."""
    model = toy(features=4, out=4)
    network = LoRANetwork(model, "generic", network_dim=4, network_alpha=4, **dropouts)
    with torch.no_grad():
        network.lora_modules[0].lora_down.weight.copy_(torch.eye(4))
        network.lora_modules[0].lora_up.weight.copy_(torch.eye(4))
    return model, network


def lora_term(model, network, x):
    network.remove()
    base = model(x)
    network.attach()
    return model(x) - base


def test_rank_dropout_drops_whole_ranks_per_sample_and_rescales_the_rest():
    torch.manual_seed(3)
    p = 0.25
    model, network = identity_lora(rank_dropout=p)
    x = torch.rand(256, 5, 4) + 0.5
    network.train()
    ratio = lora_term(model, network, x) / x  # [batch, tokens, rank]: 0 or 1/(1-p)
    kept = ratio[:, :1, :]
    assert torch.allclose(ratio, kept.expand_as(ratio), atol=1e-5)  # same mask for every token of a sample
    is_zero, is_kept = kept.abs() < 1e-5, (kept - 1 / (1 - p)).abs() < 1e-4
    assert bool((is_zero | is_kept).all())
    assert abs(is_kept.float().mean().item() - (1 - p)) < 0.05
    network.eval()
    torch.testing.assert_close(lora_term(model, network, x), x, rtol=1e-5, atol=1e-5)


def test_neuron_dropout_drops_single_values_and_is_off_in_eval():
    torch.manual_seed(4)
    p = 0.5
    model, network = identity_lora(dropout=p)
    x = torch.rand(64, 5, 4) + 0.5
    network.train()
    ratio = lora_term(model, network, x) / x
    is_zero, is_kept = ratio.abs() < 1e-5, (ratio - 1 / (1 - p)).abs() < 1e-4
    assert bool((is_zero | is_kept).all())
    assert abs(is_kept.float().mean().item() - (1 - p)) < 0.05
    assert not torch.equal(is_kept[:, 0], is_kept[:, 1])  # not a per-sample mask
    network.eval()
    torch.testing.assert_close(lora_term(model, network, x), x, rtol=1e-5, atol=1e-5)


def test_module_dropout_skips_the_whole_branch_with_its_probability():
    torch.manual_seed(5)
    model, network = identity_lora(module_dropout=0.5)
    x = torch.rand(2, 4) + 0.5
    network.train()
    applied = [bool(lora_term(model, network, x).abs().max() > 1e-5) for _ in range(200)]
    assert 70 < sum(applied) < 130
    network.eval()
    assert all(bool(lora_term(model, network, x).abs().max() > 1e-5) for _ in range(20))


def test_rank_dropout_masks_channels_of_convolutions():
    torch.manual_seed(6)
    block = ToyBlock()
    block.proj = nn.Conv2d(4, 4, 1)
    model = nn.Sequential(block)
    network = LoRANetwork(model, "generic", network_dim=4, network_alpha=4, rank_dropout=0.5)
    with torch.no_grad():
        network.lora_modules[0].lora_down.weight.copy_(torch.eye(4).reshape(4, 4, 1, 1))
        network.lora_modules[0].lora_up.weight.copy_(torch.eye(4).reshape(4, 4, 1, 1))
    x = torch.rand(32, 4, 3, 3) + 0.5
    network.train()
    ratio = lora_term(model, network, x) / x  # [batch, rank, h, w]
    per_channel = ratio[:, :, :1, :1]
    assert torch.allclose(ratio, per_channel.expand_as(ratio), atol=1e-5)
    assert bool(((per_channel.abs() < 1e-5) | ((per_channel - 2).abs() < 1e-4)).all())


# --- convolutions ---------------------------------------------------------------------------------


class ConvBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.pointwise = nn.Conv2d(3, 5, 1)
        self.spatial = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.pointwise3d = nn.Conv3d(3, 5, 1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)


def test_pointwise_convs_get_network_dim_and_spatial_ones_need_conv_dim():
    model = nn.Sequential(ConvBlock())
    without = LoRANetwork(model, "generic", network_dim=4)
    assert without.module_names() == ["0.pointwise", "0.pointwise3d"]
    without.remove()
    with_conv = LoRANetwork(model, "generic", network_dim=4, conv_dim=2, conv_alpha=1)
    ranks = {m.path: (m.rank, m.scale) for m in with_conv.lora_modules}
    assert ranks == {"0.pointwise": (4, 0.25), "0.spatial": (2, 0.5), "0.pointwise3d": (4, 0.25)}


def test_spatial_conv_lora_equals_a_conv_with_the_product_kernel():
    torch.manual_seed(7)
    model = nn.Sequential(ConvBlock())
    network = LoRANetwork(model, "generic", conv_dim=2, conv_alpha=1, exclude_patterns=[".*pointwise.*"])
    randomize_up(network)
    module = network.lora_modules[0]
    assert module.path == "0.spatial"
    x = torch.randn(2, 3, 7, 7)
    layer = model[0].spatial
    network.remove()
    base = layer(x)
    network.attach()
    # ΔW[o, i, kh, kw] = Σ_r U[o, r] · D[r, i, kh, kw], applied with the layer's stride and padding.
    up = module.lora_up.weight[:, :, 0, 0].double()
    down = module.lora_down.weight.double()
    delta_kernel = torch.einsum("or,rijk->oijk", up, down)
    expected = base.double() + 0.5 * F.conv2d(x.double(), delta_kernel, stride=2, padding=1)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


# --- LoRA+ and optimizer groups -------------------------------------------------------------------


def test_param_groups_without_loraplus_is_one_group():
    network = LoRANetwork(WanModel(blocks=1), "wan", network_dim=2)
    groups = network.param_groups(1e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4)]
    assert len(groups[0]["params"]) == 2 * len(network.module_names())


def test_loraplus_puts_up_weights_in_a_group_with_a_scaled_learning_rate():
    network = LoRANetwork(WanModel(blocks=1), "wan", network_dim=2, loraplus_lr_ratio=16)
    groups = network.param_groups(1e-4)
    assert [g["name"] for g in groups] == ["unet", "unet plus"]
    assert groups[0]["lr"] == 1e-4 and groups[1]["lr"] == pytest.approx(1.6e-3)
    ups = {id(m.lora_up.weight) for m in network.lora_modules}
    downs = {id(m.lora_down.weight) for m in network.lora_modules}
    assert {id(p) for p in groups[0]["params"]} == downs
    assert {id(p) for p in groups[1]["params"]} == ups
    torch.optim.AdamW(groups)  # the groups are valid optimizer input


def test_loraplus_without_trainable_up_weights_warns(caplog):
    network = LoRANetwork(WanModel(blocks=1), "wan", loraplus_lr_ratio=4)
    for module in network.lora_modules:
        module.lora_up.weight.requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="musubi.lora.network"):
        groups = network.param_groups(1e-4)
    assert "loraplus_lr_ratio" in caplog.text
    assert [g["name"] for g in groups] == ["unet"]


# --- network_args ---------------------------------------------------------------------------------


def test_network_from_args_reads_musubi_network_args():
    network = network_from_args(
        WanModel(blocks=1), "wan", network_dim=8, network_alpha=4, network_dropout=0.1,
        network_args=[
            "exclude_patterns=[r'.*ffn.*']",
            r"include_patterns=[r'.*ffn\.0']",
            "conv_dim=4", "conv_alpha=2", "rank_dropout=0.2", "module_dropout=0.3",
            "loraplus_lr_ratio=8", "verbose=true",
        ],
    )
    assert set(network.module_names()) == under("blocks.0", WAN_BLOCK[:8] + ["ffn.0"])
    module = network.lora_modules[0]
    assert (module.rank, module.scale) == (8, 0.5)
    assert (module.dropout, module.rank_dropout, module.module_dropout) == (0.1, 0.2, 0.3)
    assert (network.conv_dim, network.conv_alpha, network.loraplus_lr_ratio, network.verbose) == (4, 2.0, 8.0, True)
    assert network.network_args["conv_dim"] == "4"
    assert network.network_args["exclude_patterns"] == "[r'.*ffn.*']"


def test_network_args_values_may_contain_an_equals_sign():
    # A regex lookahead has "=" in it; musubi-tuner splits on every "=" and breaks.
    network = network_from_args(WanModel(blocks=1), "wan", network_args=["exclude_patterns=['.*(?=ffn).*']"])
    assert set(network.module_names()) == under("blocks.0", WAN_BLOCK[:8])


def test_unknown_network_args_key_lists_the_known_ones():
    with pytest.raises(MusubiError, match=r"unknown key.*use_dora.*known keys:.*exclude_patterns.*loraplus_lr_ratio"):
        network_from_args(WanModel(blocks=1), "wan", network_args=["use_dora=True"])


@pytest.mark.parametrize("args, option", [
    (["rank_dropout=1.0"], "rank_dropout"),
    (["conv_dim=2.5"], "conv_dim"),
    (["exclude_patterns=[1, 2]"], "exclude_patterns"),
    (["loraplus_lr_ratio='many'"], "loraplus_lr_ratio"),
])
def test_bad_network_args_values_name_the_option(args, option):
    with pytest.raises(MusubiError, match=option):
        network_from_args(WanModel(blocks=1), "wan", network_args=args)


def test_lora_module_can_be_built_on_its_own():
    module = LoRAModule("x", nn.Linear(3, 2), rank=2, alpha=1)
    assert module.lora_down.weight.shape == (2, 3) and module.lora_up.weight.shape == (2, 2)
    assert module.alpha.dim() == 0 and float(module.alpha) == 1.0
    with pytest.raises(MusubiError, match="rank"):
        LoRAModule("x", nn.Linear(3, 2), rank=0)
