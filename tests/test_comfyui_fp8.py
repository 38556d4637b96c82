"""Load DiT (fp8 scaled) inside a real ComfyUI: every native architecture samples close to bf16,
takes LoRAs through core loaders at full precision, and holds about half the bf16 bytes."""

from __future__ import annotations

import re

import pytest
import safetensors.torch
import torch

from comfy_server import Graph
from musubi.fp8 import selects_key
from tiny_checkpoints import ARCHS, tiny_state_dict

pytestmark = pytest.mark.comfyui

NATIVE = [name for name, arch in ARCHS.items() if arch.comfy_native]
# Relative L2 distance allowed between the latents sampled with the fp8 and the bf16 model
# (2 Euler steps, fp32 compute). E4M3 block-64 weights carry ~2.5 % relative error each.
TOLERANCE = 0.08


def _lora_for(arch: str, folder) -> str:
    """A rank-4 LoRA on every quantized layer of the tiny model, strong enough to see."""
    name = f"fp8_test_{arch}.safetensors"
    path = folder / name
    if path.exists():
        return name
    family = ARCHS[arch].family
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for key, weight in tiny_state_dict(arch).items():
        if weight.dim() != 2 or not selects_key(key, family):
            continue
        module = key[: -len(".weight")]
        out_features, in_features = weight.shape
        down = torch.randn(4, in_features, generator=generator) / in_features**0.5
        up = torch.randn(out_features, 4, generator=generator) * weight.float().std() * 8
        tensors[f"diffusion_model.{module}.lora_down.weight"] = down
        tensors[f"diffusion_model.{module}.lora_up.weight"] = up
        tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(4.0)
    safetensors.torch.save_file(tensors, path)
    return name


def _sample(g: Graph, model, positive, latent, prefix: str):
    sampled = g.add("KSampler", model=model[0], positive=positive[0], negative=positive[0], latent_image=latent[0],
                    seed=1, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    g.add("SaveLatent", samples=sampled[0], filename_prefix=f"fp8/{prefix}")


def _latent(comfy, prefix: str) -> torch.Tensor:
    return comfy.saved_latent("fp8", prefix).float()


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", NATIVE)
def test_fp8_model_samples_like_bf16_takes_loras_and_halves_weight_bytes(comfy, arch, tiny_model_file, text_embedding_file):
    lora = _lora_for(arch, comfy.models_dir("loras"))
    g = Graph()
    bf16 = g.add("UNETLoader", unet_name=tiny_model_file(arch), weight_dtype="default")
    fp8 = g.add("MusubiLoadDiTFP8Scaled", unet_name=tiny_model_file(arch), fp8_format="e4m3fn", mode="block",
                block_size=64, compute_dtype="default", architecture="auto", loras="", save_as="")
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(arch), architecture=ARCHS[arch].family)
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    for name, model in (("bf16", bf16), ("fp8", fp8)):
        _sample(g, model, positive, latent, f"{arch}_{name}")
        patched = g.add("LoraLoaderModelOnly", model=model[0], lora_name=lora, strength_model=1.0)
        _sample(g, patched, positive, latent, f"{arch}_{name}_lora")
    outputs = comfy.run(g.to_dict(), timeout=900)

    bf16_plain, fp8_plain = _latent(comfy, f"{arch}_bf16"), _latent(comfy, f"{arch}_fp8")
    bf16_lora, fp8_lora = _latent(comfy, f"{arch}_bf16_lora"), _latent(comfy, f"{arch}_fp8_lora")
    assert _distance(fp8_plain, bf16_plain) < TOLERANCE
    # The LoRA changes the fp8 model's output, and exactly as it changes the bf16 model's.
    effect = _distance(bf16_lora, bf16_plain)
    assert effect > 5 * _distance(fp8_plain, bf16_plain)
    assert _distance(fp8_lora, bf16_lora) < TOLERANCE
    assert _distance(fp8_lora - fp8_plain, bf16_lora - bf16_plain) < 0.25

    report = outputs[str(fp8)]["text"][0]
    ratio = float(re.search(r"([\d.]+)x of bf16", report).group(1))
    assert ratio <= 0.53, report


def test_lora_merged_before_quantizing_and_saved_file_reload_identically(comfy, tiny_model_file, text_embedding_file):
    arch = "wan21_t2v"
    lora = _lora_for(arch, comfy.models_dir("loras"))
    g = Graph()
    merged = g.add("MusubiLoadDiTFP8Scaled", unet_name=tiny_model_file(arch), fp8_format="e4m3fn", mode="block",
                   block_size=64, compute_dtype="default", architecture="auto", loras=f"{lora}:1.0",
                   save_as="saved/wan_merged_fp8")
    bf16 = g.add("UNETLoader", unet_name=tiny_model_file(arch), weight_dtype="default")
    bf16_lora = g.add("LoraLoaderModelOnly", model=bf16[0], lora_name=lora, strength_model=1.0)
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(arch), architecture="wan")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    _sample(g, merged, positive, latent, "merged_fp8")
    _sample(g, bf16_lora, positive, latent, "merged_reference")
    comfy.run(g.to_dict())
    assert (comfy.models_dir("diffusion_models") / "saved" / "wan_merged_fp8.safetensors").is_file()
    assert _distance(_latent(comfy, "merged_fp8"), _latent(comfy, "merged_reference")) < TOLERANCE

    g = Graph()
    reloaded = g.add("MusubiLoadDiTFP8Scaled", unet_name="saved/wan_merged_fp8.safetensors", fp8_format="e4m3fn",
                     mode="block", block_size=64, compute_dtype="default", architecture="auto", loras="", save_as="")
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(arch), architecture="wan")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    _sample(g, reloaded, positive, latent, "reloaded_fp8")
    comfy.run(g.to_dict())
    assert torch.equal(_latent(comfy, "reloaded_fp8"), _latent(comfy, "merged_fp8"))


def _write_prequantized(folder, kind: str) -> str:
    state_dict = tiny_state_dict("wan21_t2v")
    if kind == "plain_fp8":
        state_dict = {k: v.to(torch.float8_e4m3fn) if "blocks" in k and v.dim() == 2 else v for k, v in state_dict.items()}
    else:  # ComfyUI's own scaled_fp8 layout: per-tensor scale_weight and a scaled_fp8 marker
        quantized = {}
        for key, value in state_dict.items():
            if "blocks" in key and value.dim() == 2:
                quantized[key] = value.to(torch.float8_e4m3fn)
                quantized[key[: -len(".weight")] + ".scale_weight"] = torch.tensor(1.0)
            else:
                quantized[key] = value
        quantized["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
        state_dict = quantized
    name = f"prequantized_{kind}.safetensors"
    safetensors.torch.save_file(state_dict, folder / name)
    return name


@pytest.mark.parametrize("kind, expected", [("plain_fp8", "bf16/fp16 original"), ("comfy_scaled", "Load Diffusion Model")])
def test_prequantized_inputs_are_refused_with_what_to_load_instead(comfy, kind, expected):
    name = _write_prequantized(comfy.models_dir("diffusion_models"), kind)
    g = Graph()
    model = g.add("MusubiLoadDiTFP8Scaled", unet_name=name, fp8_format="e4m3fn", mode="block", block_size=64,
                  compute_dtype="default", architecture="auto", loras="", save_as="")
    g.add("PreviewAny", source=model[0])
    error = comfy.run_error(g.to_dict())
    assert "MusubiLoadDiTFP8Scaled" in error and expected in error
