"""Inputs the pack refuses inside a real ComfyUI before they reach a model, each with a message
that says what to do: non-finite FLOAT inputs of any node (one check at registration) and a LoRA
full of NaN/inf merged by Load DiT (fp8 scaled). Each prompt is read back from /history."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from comfy_server import Graph
from musubi.data.image_embeddings import save_image_embedding
from musubi.fp8 import selects_key
from tiny_checkpoints import tiny_state_dict
from tiny_framepack import framepack_conditioning, write_framepack_file

pytestmark = pytest.mark.comfyui

NAN = float("nan")


@pytest.fixture(scope="module")
def framepack(comfy, text_embedding_file):
    """A tiny FramePack file and its conditioning, under names of this module only."""
    model = "input_checks_framepack.safetensors"
    write_framepack_file(comfy.models_dir("diffusion_models") / model)
    image = "input_checks_siglip.safetensors"
    save_image_embedding(comfy.models_dir("image_embeddings") / image, framepack_conditioning()["image_embeds"])
    return {"model": model, "text": text_embedding_file("framepack"), "image": image}


def _framepack_graph(files: dict, **options):
    g = Graph()
    model = g.add("MusubiLoadFramePack", model_name=files["model"], weight_dtype="bf16", fp8_scaled=False,
                  compute_dtype="fp32")
    positive = g.add("MusubiLoadTextEmbedding", embedding=files["text"], architecture="framepack")
    image = g.add("MusubiLoadImageEmbedding", embedding=files["image"])
    start = g.add("EmptyHunyuanLatentVideo", width=64, height=64, length=1, batch_size=1)
    settings = dict(direction="vanilla", total_seconds=5.0, fps=30, sections=1, latent_window_size=3, steps=2,
                    cfg=1.0, distilled_guidance=10.0, shift=0.0, seed=3, magcache="off", magcache_threshold=0.1,
                    magcache_K=3, magcache_retention_ratio=0.2, magcache_ratios="auto")
    settings.update(options)
    sampler = g.add("MusubiFramePackSampler", model=model[0], positive=positive[0], clip_vision_output=image[0],
                    start_latent=start[0], **settings)
    g.add("SaveLatent", samples=sampler[0], filename_prefix="input_checks/framepack")
    return g, sampler


@pytest.mark.parametrize("name", ["cfg", "distilled_guidance"])
def test_framepack_sampler_refuses_nan_settings_before_sampling(comfy, framepack, name):
    # ComfyUI's min/max check lets NaN through; the sampler used to return an all-NaN video.
    g, sampler = _framepack_graph(framepack, **{name: NAN})
    error = comfy.run_error(g.to_dict())
    assert error.strip() == f"MusubiFramePackSampler (node {sampler}): FramePack Sampler: {name} is NaN; give a finite number.", error
    assert not list((comfy.output_dir / "input_checks").glob("framepack_*.latent"))


def test_a_nan_typed_or_linked_into_another_node_is_refused(comfy):
    def graph(inputs):
        g = Graph()
        settings = dict(timestep_sampling="sigma", discrete_flow_shift=3.0, sigmoid_scale=1.0, logit_mean=0.0,
                        logit_std=1.0, weighting_scheme="none", mode_scale=1.29, min_timestep=0, max_timestep=1000,
                        preserve_distribution_shape=False, num_timestep_buckets=0)
        settings.update(inputs(g))
        timesteps = g.add("MusubiTimestepSettings", **settings)
        g.add("MusubiTimestepDistributionPreview", timestep_settings=timesteps[0], latent_width=16, latent_height=16,
              num_samples=1000, seed=0)
        return g, timesteps

    g, node = graph(lambda g: {"discrete_flow_shift": NAN})
    error = comfy.run_error(g.to_dict())
    assert error.strip() == f"MusubiTimestepSettings (node {node}): Timestep Settings: discrete_flow_shift is NaN; give a finite number."

    # A value computed by another node is not range-checked by ComfyUI at all.
    g, node = graph(lambda g: {"logit_std": g.add("PrimitiveFloat", value=NAN)[0]})
    error = comfy.run_error(g.to_dict())
    assert error.strip() == f"MusubiTimestepSettings (node {node}): Timestep Settings: logit_std is NaN; give a finite number."

    g, _ = graph(lambda g: {})
    comfy.run(g.to_dict())  # finite values run as before


def test_load_dit_fp8_refuses_a_lora_full_of_nan(comfy, tiny_model_file):
    arch = "wan21_t2v"
    generator = torch.Generator().manual_seed(11)
    tensors = {}
    for key, weight in tiny_state_dict(arch).items():
        if weight.dim() == 2 and selects_key(key, "wan"):
            module = key[: -len(".weight")]
            tensors[f"diffusion_model.{module}.lora_down.weight"] = torch.randn(4, weight.shape[1], generator=generator)
            tensors[f"diffusion_model.{module}.lora_up.weight"] = torch.full((weight.shape[0], 4), NAN)
    safetensors.torch.save_file(tensors, comfy.models_dir("loras") / "input_checks_nan.safetensors")
    first_bad = min(key for key in tensors if key.endswith("lora_up.weight"))

    g = Graph()
    model = g.add("MusubiLoadDiTFP8Scaled", unet_name=tiny_model_file(arch), fp8_format="e4m3fn", mode="block",
                  block_size=64, compute_dtype="default", architecture="auto", loras="input_checks_nan.safetensors:1.0",
                  save_as="")
    g.add("PreviewAny", source=model[0])
    error = comfy.run_error(g.to_dict())
    assert error.startswith(f"MusubiLoadDiTFP8Scaled (node {model}): Load DiT (fp8 scaled): "), error
    assert f"input_checks_nan.safetensors: {first_bad} holds NaN/inf values" in error, error
