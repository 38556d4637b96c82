"""Tiny, seeded diffusion-transformer checkpoints with the key layout of the real files.

Each architecture the pack targets gets a state dict whose key names, tensor ranks and
detection-relevant sizes match the single files users download (Comfy-Org repackaged
Wan files, the official HunyuanVideo file, BFL's FLUX.1 Kontext file, the Qwen-Image
single file, and the diffusers layout of FramePack).  Everything that ComfyUI's model
detection does not pin down is made as small as possible, so the files load through the
real loaders and run a forward pass in milliseconds (Flux and Qwen-Image cannot shrink
below ~400 M parameters, because detection fixes their width).

Values are drawn from a ``torch.Generator`` seeded per tensor from (architecture, seed,
key), so a file is identical across runs and machines, two architectures never share
weights, and generating one tensor never depends on any other.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pathlib
import tempfile
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

# Bump when the layouts or the value recipe change, so cached files are regenerated.
GENERATOR_VERSION = "1"

ARCHITECTURES: tuple[str, ...] = (
    "wan21_t2v",
    "wan21_i2v",
    "wan22_ti2v_5b",
    "wan22_a14b_high",
    "wan22_a14b_low",
    "hunyuan_video",
    "framepack",
    "flux_kontext",
    "qwen_image",
)


@dataclass(frozen=True)
class TinyArch:
    """What a test needs to know to condition and sample a tiny checkpoint."""

    name: str
    family: str  # "wan" | "hunyuan_video" | "framepack" | "flux" | "qwen_image"
    comfy_native: bool  # ComfyUI's UNETLoader can load it
    latent_channels: int  # channels of the LATENT the model denoises
    latent_dims: int  # rank of that latent inside the model: 5 = [B, C, T, H, W], 4 = [B, C, H, W]
    text_dim: int  # width of the cross-attention context (CONDITIONING tensor's last dim)
    pooled_dim: int | None  # width of "pooled_output", when the model needs one
    needs_clip_vision: bool  # whether the model has an image-embedding input
    clip_vision_dim: int | None  # width of that image embedding
    comfy_model_class: str | None  # ComfyUI model_base class, e.g. "WAN21"
    big: bool  # detection pins a ~400 M-parameter minimum (Flux, Qwen-Image)
    comfy_config_class: str | None = None  # ComfyUI supported_models class detection picks
    concat_channels: int = 0  # extra input channels concatenated to the latent (i2v mask + image)
    guidance_embed: bool = False  # model embeds a distilled guidance scale
    clip_vision_tokens: int | None = None  # tokens of the image embedding (257 CLIP-H, 729 SigLIP)


def _arch(name: str, family: str, **fields) -> TinyArch:
    defaults = dict(
        comfy_native=True, latent_channels=16, latent_dims=5, text_dim=4096, pooled_dim=None,
        needs_clip_vision=False, clip_vision_dim=None, big=False,
    )
    return TinyArch(name=name, family=family, **{**defaults, **fields})


ARCHS: dict[str, TinyArch] = {
    arch.name: arch
    for arch in (
        _arch("wan21_t2v", "wan", comfy_model_class="WAN21", comfy_config_class="WAN21_T2V"),
        _arch(
            "wan21_i2v", "wan", comfy_model_class="WAN21", comfy_config_class="WAN21_I2V",
            needs_clip_vision=True, clip_vision_dim=1280, clip_vision_tokens=257, concat_channels=20,
        ),
        _arch("wan22_ti2v_5b", "wan", latent_channels=48, comfy_model_class="WAN22", comfy_config_class="WAN22_T2V"),
        _arch("wan22_a14b_high", "wan", comfy_model_class="WAN21", comfy_config_class="WAN21_T2V"),
        _arch("wan22_a14b_low", "wan", comfy_model_class="WAN21", comfy_config_class="WAN21_T2V"),
        _arch(
            "hunyuan_video", "hunyuan_video", pooled_dim=768, guidance_embed=True,
            comfy_model_class="HunyuanVideo", comfy_config_class="HunyuanVideo",
        ),
        _arch(
            "framepack", "framepack", comfy_native=False, pooled_dim=768, guidance_embed=True,
            needs_clip_vision=True, clip_vision_dim=1152, clip_vision_tokens=729, comfy_model_class=None,
        ),
        _arch(
            "flux_kontext", "flux", latent_dims=4, pooled_dim=768, guidance_embed=True, big=True,
            comfy_model_class="Flux", comfy_config_class="Flux",
        ),
        # Qwen-Image uses the Wan 2.1 VAE: its latents are [B, 16, 1, H, W] inside the model.
        _arch("qwen_image", "qwen_image", text_dim=3584, big=True, comfy_model_class="QwenImage", comfy_config_class="QwenImage"),
    )
}


# --- layout description ------------------------------------------------------------------

# How a tensor's values are drawn:
#   "weight"     Linear / Conv weight, N(0, 1/fan_in): activations keep their scale
#   "modulation" adaLN modulation Linear weight, N(0, 0.25²/fan_in): shifts, scales and gates stay small
#   "table"      Wan's learned modulation table, N(0, 1/dim) like the original init
#   "bias"       N(0, 0.01²)
#   "ones"       norm scales
#   "zeros"      norm biases
INIT_KINDS = ("weight", "modulation", "table", "bias", "ones", "zeros")


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    init: str


class _Layout:
    """Ordered key -> TensorSpec, with helpers named after the layers they describe."""

    def __init__(self) -> None:
        self.specs: dict[str, TensorSpec] = {}

    def add(self, key: str, shape, init: str) -> None:
        assert init in INIT_KINDS, init
        assert key not in self.specs, key
        self.specs[key] = TensorSpec(tuple(int(s) for s in shape), init)

    def linear(self, name: str, in_features: int, out_features: int, bias: bool = True, modulation: bool = False) -> None:
        self.add(f"{name}.weight", (out_features, in_features), "modulation" if modulation else "weight")
        if bias:
            self.add(f"{name}.bias", (out_features,), "bias")

    def conv(self, name: str, in_channels: int, out_channels: int, kernel: tuple[int, ...]) -> None:
        self.add(f"{name}.weight", (out_channels, in_channels, *kernel), "weight")
        self.add(f"{name}.bias", (out_channels,), "bias")

    def layer_norm(self, name: str, dim: int) -> None:
        self.add(f"{name}.weight", (dim,), "ones")
        self.add(f"{name}.bias", (dim,), "zeros")

    def rms_norm(self, name: str, dim: int, param: str = "weight") -> None:
        self.add(f"{name}.{param}", (dim,), "ones")


# --- Wan 2.1 / 2.2 (original Wan names, as in the Comfy-Org repackaged files) -------------

WAN_TINY = {"dim": 128, "ffn_dim": 256, "num_layers": 2, "freq_dim": 256, "text_dim": 4096}
WAN_CLIP_VISION_DIM = 1280


def _wan_layout(in_dim: int, out_dim: int, image_cross_attention: bool) -> _Layout:
    # ComfyUI derives heads as dim // 128, so dim 128 is one head of the real head width.
    dim, ffn, freq, text = WAN_TINY["dim"], WAN_TINY["ffn_dim"], WAN_TINY["freq_dim"], WAN_TINY["text_dim"]
    lay = _Layout()
    lay.conv("patch_embedding", in_dim, dim, (1, 2, 2))
    lay.linear("text_embedding.0", text, dim)
    lay.linear("text_embedding.2", dim, dim)
    lay.linear("time_embedding.0", freq, dim)
    lay.linear("time_embedding.2", dim, dim)
    lay.linear("time_projection.1", dim, 6 * dim, modulation=True)
    for i in range(WAN_TINY["num_layers"]):
        block = f"blocks.{i}"
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                lay.linear(f"{block}.{attn}.{proj}", dim, dim)
            lay.rms_norm(f"{block}.{attn}.norm_q", dim)
            lay.rms_norm(f"{block}.{attn}.norm_k", dim)
        if image_cross_attention:
            lay.linear(f"{block}.cross_attn.k_img", dim, dim)
            lay.linear(f"{block}.cross_attn.v_img", dim, dim)
            lay.rms_norm(f"{block}.cross_attn.norm_k_img", dim)
        lay.layer_norm(f"{block}.norm3", dim)
        lay.linear(f"{block}.ffn.0", dim, ffn)
        lay.linear(f"{block}.ffn.2", ffn, dim)
        lay.add(f"{block}.modulation", (1, 6, dim), "table")
    lay.linear("head.head", dim, 4 * out_dim)  # patch (1, 2, 2) -> 4 values per channel
    lay.add("head.modulation", (1, 2, dim), "table")
    if image_cross_attention:
        clip = WAN_CLIP_VISION_DIM
        lay.layer_norm("img_emb.proj.0", clip)
        lay.linear("img_emb.proj.1", clip, clip)
        lay.linear("img_emb.proj.3", clip, dim)
        lay.layer_norm("img_emb.proj.4", dim)
    return lay


# --- HunyuanVideo (official names, as in the released single file) ----------------------

HUNYUAN_VIDEO_TINY = {"hidden": 128, "double_blocks": 2, "single_blocks": 2, "text_dim": 4096, "pooled_dim": 768}
HUNYUAN_HEAD_DIM = 128  # ComfyUI derives heads as hidden // 128 and fixes rope axes (16, 56, 56)


def _hunyuan_video_layout() -> _Layout:
    h = HUNYUAN_VIDEO_TINY["hidden"]
    text = HUNYUAN_VIDEO_TINY["text_dim"]
    mlp = 4 * h
    lay = _Layout()
    lay.conv("img_in.proj", 16, h, (1, 2, 2))
    # text: linear input projection + a 2-block token refiner conditioned on time and mean text
    lay.linear("txt_in.input_embedder", text, h)
    lay.linear("txt_in.t_embedder.mlp.0", 256, h)
    lay.linear("txt_in.t_embedder.mlp.2", h, h)
    lay.linear("txt_in.c_embedder.linear_1", text, h)
    lay.linear("txt_in.c_embedder.linear_2", h, h)
    for i in range(2):
        block = f"txt_in.individual_token_refiner.blocks.{i}"
        lay.layer_norm(f"{block}.norm1", h)
        lay.linear(f"{block}.self_attn_qkv", h, 3 * h)
        lay.linear(f"{block}.self_attn_proj", h, h)
        lay.layer_norm(f"{block}.norm2", h)
        lay.linear(f"{block}.mlp.fc1", h, mlp)
        lay.linear(f"{block}.mlp.fc2", mlp, h)
        lay.linear(f"{block}.adaLN_modulation.1", h, 2 * h, modulation=True)
    lay.linear("time_in.mlp.0", 256, h)
    lay.linear("time_in.mlp.2", h, h)
    lay.linear("vector_in.in_layer", HUNYUAN_VIDEO_TINY["pooled_dim"], h)
    lay.linear("vector_in.out_layer", h, h)
    lay.linear("guidance_in.mlp.0", 256, h)
    lay.linear("guidance_in.mlp.2", h, h)
    for i in range(HUNYUAN_VIDEO_TINY["double_blocks"]):
        block = f"double_blocks.{i}"
        for stream in ("img", "txt"):
            lay.linear(f"{block}.{stream}_mod.linear", h, 6 * h, modulation=True)
            lay.linear(f"{block}.{stream}_attn_qkv", h, 3 * h)
            lay.rms_norm(f"{block}.{stream}_attn_q_norm", HUNYUAN_HEAD_DIM)
            lay.rms_norm(f"{block}.{stream}_attn_k_norm", HUNYUAN_HEAD_DIM)
            lay.linear(f"{block}.{stream}_attn_proj", h, h)
            lay.linear(f"{block}.{stream}_mlp.fc1", h, mlp)
            lay.linear(f"{block}.{stream}_mlp.fc2", mlp, h)
    for i in range(HUNYUAN_VIDEO_TINY["single_blocks"]):
        block = f"single_blocks.{i}"
        lay.linear(f"{block}.linear1", h, 3 * h + mlp)
        lay.linear(f"{block}.linear2", h + mlp, h)
        lay.rms_norm(f"{block}.q_norm", HUNYUAN_HEAD_DIM)
        lay.rms_norm(f"{block}.k_norm", HUNYUAN_HEAD_DIM)
        lay.linear(f"{block}.modulation.linear", h, 3 * h, modulation=True)
    lay.linear("final_layer.linear", h, 1 * 2 * 2 * 16)
    lay.linear("final_layer.adaLN_modulation.1", h, 2 * h, modulation=True)
    return lay


# --- FLUX.1 Kontext (BFL names) ----------------------------------------------------------

FLUX_SIZES = {"hidden": 3072, "heads": 24, "context_dim": 4096, "pooled_dim": 768, "double_blocks": 1, "single_blocks": 0}


def _flux_layout() -> _Layout:
    h = FLUX_SIZES["hidden"]
    head_dim = h // FLUX_SIZES["heads"]
    mlp = 4 * h
    lay = _Layout()
    lay.linear("img_in", 16 * 2 * 2, h)  # 2x2 patches of the 16-channel latent
    lay.linear("time_in.in_layer", 256, h)
    lay.linear("time_in.out_layer", h, h)
    lay.linear("vector_in.in_layer", FLUX_SIZES["pooled_dim"], h)
    lay.linear("vector_in.out_layer", h, h)
    lay.linear("guidance_in.in_layer", 256, h)
    lay.linear("guidance_in.out_layer", h, h)
    lay.linear("txt_in", FLUX_SIZES["context_dim"], h)
    for i in range(FLUX_SIZES["double_blocks"]):
        block = f"double_blocks.{i}"
        for stream in ("img", "txt"):
            lay.linear(f"{block}.{stream}_mod.lin", h, 6 * h, modulation=True)
            lay.linear(f"{block}.{stream}_attn.qkv", h, 3 * h)
            lay.rms_norm(f"{block}.{stream}_attn.norm.query_norm", head_dim, param="scale")
            lay.rms_norm(f"{block}.{stream}_attn.norm.key_norm", head_dim, param="scale")
            lay.linear(f"{block}.{stream}_attn.proj", h, h)
            lay.linear(f"{block}.{stream}_mlp.0", h, mlp)
            lay.linear(f"{block}.{stream}_mlp.2", mlp, h)
    for i in range(FLUX_SIZES["single_blocks"]):
        block = f"single_blocks.{i}"
        lay.linear(f"{block}.linear1", h, 3 * h + mlp)
        lay.linear(f"{block}.linear2", h + mlp, h)
        lay.rms_norm(f"{block}.norm.query_norm", head_dim, param="scale")
        lay.rms_norm(f"{block}.norm.key_norm", head_dim, param="scale")
        lay.linear(f"{block}.modulation.lin", h, 3 * h, modulation=True)
    lay.linear("final_layer.linear", h, 2 * 2 * 16)
    lay.linear("final_layer.adaLN_modulation.1", h, 2 * h, modulation=True)
    return lay


# --- Qwen-Image (names of the official single file) --------------------------------------

QWEN_IMAGE_SIZES = {"inner": 3072, "head_dim": 128, "text_dim": 3584, "blocks": 1}


def _qwen_image_layout() -> _Layout:
    d = QWEN_IMAGE_SIZES["inner"]
    head_dim = QWEN_IMAGE_SIZES["head_dim"]
    text = QWEN_IMAGE_SIZES["text_dim"]
    lay = _Layout()
    lay.linear("img_in", 16 * 2 * 2, d)
    lay.rms_norm("txt_norm", text)
    lay.linear("txt_in", text, d)
    lay.linear("time_text_embed.timestep_embedder.linear_1", 256, d)
    lay.linear("time_text_embed.timestep_embedder.linear_2", d, d)
    for i in range(QWEN_IMAGE_SIZES["blocks"]):
        block = f"transformer_blocks.{i}"
        lay.linear(f"{block}.img_mod.1", d, 6 * d, modulation=True)
        lay.linear(f"{block}.txt_mod.1", d, 6 * d, modulation=True)
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            lay.linear(f"{block}.attn.{proj}", d, d)
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            lay.rms_norm(f"{block}.attn.{norm}", head_dim)
        lay.linear(f"{block}.attn.to_out.0", d, d)
        lay.linear(f"{block}.attn.to_add_out", d, d)
        for stream in ("img", "txt"):
            lay.linear(f"{block}.{stream}_mlp.net.0.proj", d, 4 * d)
            lay.linear(f"{block}.{stream}_mlp.net.2", 4 * d, d)
    lay.linear("norm_out.linear", d, 2 * d, modulation=True)
    lay.linear("proj_out", d, 2 * 2 * 16)
    return lay


# --- FramePack (diffusers HunyuanVideoFramepackTransformer3DModel) -----------------------

FRAMEPACK_CLASS_NAME = "HunyuanVideoFramepackTransformer3DModel"
FRAMEPACK_TINY_CONFIG: dict = {
    "in_channels": 16,
    "out_channels": 16,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "num_layers": 2,
    "num_single_layers": 2,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "guidance_embeds": True,
    "text_embed_dim": 4096,
    "pooled_projection_dim": 768,
    "rope_theta": 256.0,
    "rope_axes_dim": [8, 12, 12],
    "image_condition_type": None,
    "has_image_proj": True,
    "image_proj_dim": 1152,
    "has_clean_x_embedder": True,
}


def framepack_config() -> dict:
    """The diffusers config of the tiny FramePack model, as stored in its file metadata."""
    return {"_class_name": FRAMEPACK_CLASS_NAME, **json.loads(json.dumps(FRAMEPACK_TINY_CONFIG))}


def build_framepack_model(config: dict | None = None):
    """A diffusers FramePack model of the given (default: tiny) config, with diffusers' own init."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel  # heavy import, FramePack only

    config = dict(config or FRAMEPACK_TINY_CONFIG)
    config.pop("_class_name", None)
    config["rope_axes_dim"] = tuple(config["rope_axes_dim"])
    return HunyuanVideoFramepackTransformer3DModel(**config)


def _framepack_layout() -> _Layout:
    # The key set comes from the diffusers class itself; the kind of each tensor from the
    # layer that owns it, so a diffusers release that renames a layer changes the keys here too.
    model = build_framepack_model()
    lay = _Layout()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}"
            lay.add(key, param.shape, _framepack_init(module_name, module, param_name))
    return lay


def _framepack_init(module_name: str, module: torch.nn.Module, param_name: str) -> str:
    if isinstance(module, (torch.nn.Linear, torch.nn.Conv3d)):
        if param_name == "bias":
            return "bias"
        # AdaLN layers: norm1.linear, norm1_context.linear, norm.linear, norm_out.linear
        is_modulation = module_name.rsplit(".", 1)[-1] == "linear" and ".norm" in f".{module_name}"
        return "modulation" if is_modulation else "weight"
    if param_name == "bias":
        return "zeros"
    return "ones"


# --- public API ----------------------------------------------------------------------------

_LAYOUT_BUILDERS = {
    "wan21_t2v": lambda: _wan_layout(in_dim=16, out_dim=16, image_cross_attention=False),
    "wan21_i2v": lambda: _wan_layout(in_dim=16 + 20, out_dim=16, image_cross_attention=True),
    "wan22_ti2v_5b": lambda: _wan_layout(in_dim=48, out_dim=48, image_cross_attention=False),
    "wan22_a14b_high": lambda: _wan_layout(in_dim=16, out_dim=16, image_cross_attention=False),
    "wan22_a14b_low": lambda: _wan_layout(in_dim=16, out_dim=16, image_cross_attention=False),
    "hunyuan_video": _hunyuan_video_layout,
    "framepack": _framepack_layout,
    "flux_kontext": _flux_layout,
    "qwen_image": _qwen_image_layout,
}


def _check_arch(arch: str) -> TinyArch:
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    return ARCHS[arch]


@functools.lru_cache(maxsize=None)
def _cached_layout(arch: str) -> dict[str, TensorSpec]:
    return _LAYOUT_BUILDERS[arch]().specs


def tiny_layout(arch: str) -> dict[str, TensorSpec]:
    """Key -> (shape, init kind) of an architecture, without drawing any values."""
    _check_arch(arch)
    return dict(_cached_layout(arch))


def parameter_count(arch: str) -> int:
    return sum(math.prod(spec.shape) for spec in tiny_layout(arch).values())


def _tensor_seed(arch: str, seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{arch}|{seed}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _draw(arch: str, seed: int, key: str, spec: TensorSpec, dtype: torch.dtype, scratch: torch.Tensor) -> torch.Tensor:
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=dtype)
    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=dtype)
    if spec.init == "bias":
        std = 0.01
    elif spec.init == "table":
        std = spec.shape[-1] ** -0.5
    else:
        fan_in = math.prod(spec.shape[1:])
        std = fan_in**-0.5 * (0.25 if spec.init == "modulation" else 1.0)
    generator = torch.Generator().manual_seed(_tensor_seed(arch, seed, key))
    # Drawn in float32 and rounded, so every dtype holds the same values up to rounding;
    # one reused float32 buffer keeps the ~400 M-parameter layouts at a few seconds.
    values = scratch[: math.prod(spec.shape)].view(spec.shape).normal_(0.0, std, generator=generator)
    return torch.empty(spec.shape, dtype=dtype).copy_(values)


def tiny_state_dict(arch: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Seeded tensors with the real key layout of ``arch`` (see ``ARCHITECTURES``)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    layout = tiny_layout(arch)
    scratch = torch.empty(max(math.prod(spec.shape) for spec in layout.values()), dtype=torch.float32)
    return {key: _draw(arch, int(seed), key, spec, dtype, scratch) for key, spec in layout.items()}


def tiny_metadata(arch: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """The safetensors metadata written with a tiny checkpoint."""
    info = _check_arch(arch)
    metadata = {
        "format": "pt",
        "tiny_arch": arch,
        "tiny_family": info.family,
        "tiny_seed": str(int(seed)),
        "tiny_dtype": str(dtype).removeprefix("torch."),
        "tiny_generator_version": GENERATOR_VERSION,
    }
    if arch == "framepack":
        metadata["config"] = json.dumps(framepack_config())
    return metadata


def write_tiny_checkpoint(arch: str, path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> pathlib.Path:
    """Write a tiny checkpoint as .safetensors, atomically (temp file + rename)."""
    path = pathlib.Path(path)
    state_dict = tiny_state_dict(arch, seed=seed, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(state_dict, temp_name, metadata=tiny_metadata(arch, seed, dtype))
        os.replace(temp_name, path)
    except BaseException:
        if os.path.exists(temp_name):
            os.remove(temp_name)
        raise
    return path


def ensure_tiny_checkpoint(arch: str, directory, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> pathlib.Path:
    """Path of ``<directory>/tiny_<arch>_s<seed>.safetensors``, written only if missing or stale.

    Lets several tests (or test sessions sharing a cache folder) reuse one big file.
    """
    from safetensors import safe_open

    path = pathlib.Path(directory) / f"tiny_{arch}_s{int(seed)}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                if handle.metadata() == tiny_metadata(arch, seed, dtype):
                    return path
        except Exception:  # unreadable or truncated: rewrite it
            pass
    return write_tiny_checkpoint(arch, path, seed=seed, dtype=dtype)
