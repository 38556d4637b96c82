"""FramePack LoRA training inside a real ComfyUI: Train LoRA on a FramePack MODEL cuts the video into
sections, saves a LoRA core LoRA loaders apply, and the LoRA changes FramePack Sampler's output."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from comfy_server import Graph, adamw_constant
from musubi.data.image_embeddings import save_image_embedding
from tiny_checkpoints import ARCHS

pytestmark = pytest.mark.comfyui

# Linear layers of one block that get a LoRA (every Linear but the AdaLN modulation).
DOUBLE_BLOCK_LINEARS = 12
SINGLE_BLOCK_LINEARS = 5


def _latent_file(comfy, name: str, frames: int, seed: int) -> str:
    """A random HunyuanVideo-VAE-shaped latent [1, 16, frames, 4, 4] in input/, for core LoadLatent."""
    path = comfy.input_dir / name
    if not path.exists():
        latents = torch.randn((1, 16, frames, 4, 4), generator=torch.Generator().manual_seed(seed))
        safetensors.torch.save_file({"latent_tensor": latents, "latent_format_version_0": torch.tensor([])}, path)
    return name


def _image_embedding(comfy) -> str:
    path = comfy.models_dir("image_embeddings") / "framepack_start.safetensors"
    if not path.exists():
        tiny = ARCHS["framepack"]
        save_image_embedding(path, torch.randn(tiny.clip_vision_tokens, tiny.clip_vision_dim, generator=torch.Generator().manual_seed(4)))
    return path.name


def _graph(comfy, tiny_model_file, text_embedding_file, *, output_name, layout="vanilla", with_image=True,
           model_source="framepack", steps=2, batch_size=2, frames=19, weight_dtype="fp32", gradient_checkpointing=False,
           fp8_scaled=False, network_type="lora"):
    g = Graph()
    network_options = {} if network_type == "lora" else {"network_type": network_type, "lokr_factor": -1}
    if model_source == "framepack":
        model = g.add("MusubiLoadFramePack", model_name=tiny_model_file("framepack"), weight_dtype=weight_dtype,
                      fp8_scaled=fp8_scaled, compute_dtype=weight_dtype)
    else:
        model = g.add("UNETLoader", unet_name=tiny_model_file(model_source), weight_dtype="default")
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file("framepack"), architecture="framepack")
    latents = g.add("LoadLatent", latent=_latent_file(comfy, f"framepack_video_{frames}.latent", frames, seed=0))
    settings = {"layout": layout, "latent_window_size": 9, "one_frame_target_index": 9, "one_frame_clean_indices": "0",
                "one_frame_no_post": False, "guidance_scale": 1.0}
    if with_image:
        image = g.add("MusubiLoadImageEmbedding", embedding=_image_embedding(comfy))
        settings["clip_vision_output"] = image[0]
    framepack = g.add("MusubiFramePackTrainingSettings", **settings)
    network = g.add("MusubiLoRANetworkSettings", network_dim=4, network_alpha=4.0, network_dropout=0.0, rank_dropout=0.0,
                    module_dropout=0.0, loraplus_lr_ratio=0.0, exclude_patterns="", include_patterns="", **network_options)
    optimizer = adamw_constant(g, 1e-2)
    checkpoints = g.add("MusubiCheckpointSettings", save_every_n_steps=0, save_last_n_checkpoints=0,
                        save_state=False, lora_format="comfyui", save_precision="float32", log_with="none", logging_dir="")
    train = g.add("MusubiTrainLoRA", model=model[0], latents=latents[0], conditioning=positive[0], steps=steps,
                  batch_size=batch_size, gradient_accumulation_steps=1, seed=3, output_name=output_name, resume="no",
                  mixed_precision="no", gradient_checkpointing=gradient_checkpointing, network_settings=network[0],
                  optimizer_settings=optimizer[0], checkpoint_settings=checkpoints[0], framepack_settings=framepack[0])
    return g, model, positive, train


def test_framepack_lora_trains_by_sections_and_changes_framepack_sampling(comfy, tiny_model_file, text_embedding_file):
    # 19 latent frames = two vanilla sections with different paddings, trained together in batches of 2.
    g, _, _, train = _graph(comfy, tiny_model_file, text_embedding_file, output_name="framepack_vanilla")
    shown = g.add("PreviewAny", source=train[2])
    outputs = comfy.run(g.to_dict(), timeout=600)
    assert '"loss"' in outputs[str(shown)]["text"][0]

    path = comfy.models_dir("loras") / "framepack_vanilla" / "framepack_vanilla.safetensors"
    lora = safetensors.torch.load_file(path)
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in lora}
    assert all(module.startswith(("diffusion_model.transformer_blocks.", "diffusion_model.single_transformer_blocks."))
               for module in modules)
    assert len(modules) == 2 * DOUBLE_BLOCK_LINEARS + 2 * SINGLE_BLOCK_LINEARS
    assert not any("norm" in module for module in modules)
    assert all(torch.isfinite(tensor).all() for tensor in lora.values())
    assert any(float(lora[key].abs().max()) > 0 for key in lora if key.endswith("lora_up.weight"))

    g = Graph()
    base = g.add("MusubiLoadFramePack", model_name=tiny_model_file("framepack"), weight_dtype="fp32", fp8_scaled=False,
                 compute_dtype="fp32")
    patched = g.add("LoraLoaderModelOnly", model=base[0], lora_name="framepack_vanilla/framepack_vanilla.safetensors",
                    strength_model=1.0)
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file("framepack"), architecture="framepack")
    image = g.add("MusubiLoadImageEmbedding", embedding=_image_embedding(comfy))
    start = g.add("LoadLatent", latent=_latent_file(comfy, "framepack_start_1.latent", 1, seed=5))
    for name, source in (("base", base), ("lora", patched)):
        sampled = g.add("MusubiFramePackSampler", model=source[0], positive=positive[0], clip_vision_output=image[0],
                        start_latent=start[0], direction="vanilla", total_seconds=1.0, fps=30, sections=1,
                        latent_window_size=9, steps=2, cfg=1.0, distilled_guidance=10.0, shift=0.0, seed=0,
                        magcache="off", magcache_threshold=0.1, magcache_K=3, magcache_retention_ratio=0.2,
                        magcache_ratios="auto")
        g.add("SaveLatent", samples=sampled[0], filename_prefix=f"framepack_train/{name}")
    comfy.run(g.to_dict(), timeout=600)
    [base_file] = (comfy.output_dir / "framepack_train").glob("base_*.latent")
    [lora_file] = (comfy.output_dir / "framepack_train").glob("lora_*.latent")
    base_video = safetensors.torch.load_file(base_file)["latent_tensor"]
    lora_video = safetensors.torch.load_file(lora_file)["latent_tensor"]
    assert base_video.shape == lora_video.shape and torch.isfinite(lora_video).all()
    assert (base_video - lora_video).abs().max() > 1e-5, "the trained FramePack LoRA did not change FramePack sampling"


@pytest.mark.parametrize("layout,frames,weight_dtype,checkpointing,fp8", [
    ("f1", 19, "bf16", True, False), ("one_frame", 2, "fp32", False, False), ("vanilla", 10, "bf16", False, True)])
def test_framepack_layouts_dtypes_and_checkpointing_train(comfy, tiny_model_file, text_embedding_file, layout, frames,
                                                           weight_dtype, checkpointing, fp8):
    name = f"framepack_{layout}_{weight_dtype}{'_fp8' if fp8 else ''}"
    g, _, _, train = _graph(comfy, tiny_model_file, text_embedding_file, output_name=name, layout=layout, frames=frames,
                            weight_dtype=weight_dtype, gradient_checkpointing=checkpointing, fp8_scaled=fp8)
    g.add("PreviewAny", source=train[3])
    comfy.run(g.to_dict(), timeout=600)
    lora = safetensors.torch.load_file(comfy.models_dir("loras") / name / f"{name}.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in lora.values())
    assert any(float(lora[key].abs().max()) > 0 for key in lora if key.endswith("lora_up.weight"))


def test_framepack_training_errors_name_the_fix(comfy, tiny_model_file, text_embedding_file):
    g, _, _, _ = _graph(comfy, tiny_model_file, text_embedding_file, output_name="framepack_no_image", with_image=False)
    assert "SigLIP embedding" in comfy.run_error(g.to_dict(), timeout=300)
    g, _, _, _ = _graph(comfy, tiny_model_file, text_embedding_file, output_name="framepack_on_wan", model_source="wan21_t2v")
    assert "not a FramePack model" in comfy.run_error(g.to_dict(), timeout=300)
