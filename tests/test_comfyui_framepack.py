"""FramePack inside a real ComfyUI: load both checkpoint layouts (bf16 and fp8 scaled), sample by
sections with and without MagCache, vanilla and F1, take a core LoRA, refuse unusable files.

Text and image conditioning come from cached embeddings (Load Text Embedding / Load Image
Embedding): the LLaVA-Llama3 and SigLIP encoders cannot be made small in ComfyUI. The start
latent is core EmptyHunyuanLatentVideo's (one frame, 64×64 pixels).
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from comfy_server import Graph, preview_text, relative_error
from musubi.fp8 import quantize_file
from musubi.framepack.sampling import FramePackRun, sample_video
from musubi.data.image_embeddings import load_image_embedding, save_image_embedding
from musubi.data.text_embeddings import load_text_embedding
from tiny_framepack import framepack_conditioning, write_framepack_file, write_framepack_folder, write_framepack_lora, write_plain_fp8_file

pytestmark = pytest.mark.comfyui

WINDOW, STEPS, SECTIONS = 3, 4, 2
HUNYUAN_VIDEO_LATENT_SCALE = 0.476986  # the VAE's latents × this = the model's latents


@pytest.fixture(scope="module")
def framepack(comfy, text_embedding_file, tiny_model_file):
    """Writes the checkpoints, LoRA and embeddings once; returns their names."""
    models = comfy.models_dir("diffusion_models")
    write_framepack_folder(models / "FramePackI2V_tiny")
    write_framepack_file(models / "framepack_tiny_bf16.safetensors")
    quantize_file(str(models / "framepack_tiny_bf16.safetensors"), str(models / "framepack_tiny_fp8_scaled.safetensors"),
                  architecture="framepack")
    write_plain_fp8_file(models / "framepack_tiny_fp8_plain.safetensors")
    write_framepack_lora(comfy.models_dir("loras") / "framepack_tiny_lora.safetensors")
    save_image_embedding(comfy.models_dir("image_embeddings") / "framepack_siglip.safetensors",
                         framepack_conditioning()["image_embeds"])
    return {
        "folder": "FramePackI2V_tiny",
        "file": "framepack_tiny_bf16.safetensors",
        "prequantized": "framepack_tiny_fp8_scaled.safetensors",
        "plain_fp8": "framepack_tiny_fp8_plain.safetensors",
        "hunyuan_video": tiny_model_file("hunyuan_video"),
        "text": text_embedding_file("framepack"),
        "image": "framepack_siglip.safetensors",
        "lora": "framepack_tiny_lora.safetensors",
    }


def _sample(g: Graph, model, files: dict, prefix: str, start_file: str | None = None, **options):
    positive = g.add("MusubiLoadTextEmbedding", embedding=files["text"], architecture="framepack")
    image = g.add("MusubiLoadImageEmbedding", embedding=files["image"])
    if start_file is None:
        start = g.add("EmptyHunyuanLatentVideo", width=64, height=64, length=1, batch_size=1)
    else:
        start = g.add("LoadLatent", latent=start_file)
    settings = dict(direction="vanilla", total_seconds=5.0, fps=30, sections=SECTIONS, latent_window_size=WINDOW,
                    steps=STEPS, cfg=1.0, distilled_guidance=10.0, shift=0.0, seed=3, magcache="off",
                    magcache_threshold=0.1, magcache_K=3, magcache_retention_ratio=0.2, magcache_ratios="auto")
    settings.update(options)
    sampler = g.add("MusubiFramePackSampler", model=model[0], positive=positive[0], clip_vision_output=image[0],
                    start_latent=start[0], **settings)
    g.add("SaveLatent", samples=sampler[0], filename_prefix=f"framepack/{prefix}")
    return sampler


def _load(g: Graph, name: str, fp8: bool = False, weight_dtype: str = "bf16"):
    return g.add("MusubiLoadFramePack", model_name=name, weight_dtype=weight_dtype, fp8_scaled=fp8, compute_dtype="fp32")


def _latent(comfy, prefix: str) -> torch.Tensor:
    return comfy.saved_latent("framepack", prefix)


def test_both_layouts_load_and_magcache_threshold_zero_changes_nothing(comfy, framepack):
    g = Graph()
    folder, single = _load(g, framepack["folder"]), _load(g, framepack["file"])
    _sample(g, folder, framepack, "folder_off")
    _sample(g, single, framepack, "file_off")
    zero = _sample(g, folder, framepack, "folder_zero", magcache="on", magcache_threshold=0.0)
    skipping = _sample(g, folder, framepack, "folder_skip", magcache="on", magcache_threshold=5.0, magcache_K=2,
                       magcache_ratios="framepack_musubi_default")
    outputs = comfy.run(g.to_dict())

    off = _latent(comfy, "folder_off")
    assert off.shape == (1, 16, 1 + SECTIONS * WINDOW, 8, 8)
    assert torch.isfinite(off).all() and off[:, :, 1:].abs().mean() > 0
    assert torch.equal(off[:, :, 0], torch.zeros_like(off[:, :, 0])), "the video starts with the start frame"
    assert torch.equal(_latent(comfy, "file_off"), off), "folder and single file hold the same weights"
    assert torch.equal(_latent(comfy, "folder_zero"), off), "threshold 0 must reproduce the uncached run exactly"
    report = preview_text(outputs, skipping)
    assert report.count("skipped") >= SECTIONS and "0 skipped" not in report, report
    assert not torch.equal(_latent(comfy, "folder_skip"), off)
    assert "0 skipped" in preview_text(outputs, zero)


def test_matches_the_library_loop_on_plain_diffusers(comfy, framepack):
    """The MODEL, its conditioning plumbing and latent scaling add nothing: ComfyUI's result is the
    library's loop run on diffusers' own module with the same weights and inputs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only contend
    try:
        _compare_with_the_library(comfy, framepack)
    finally:
        torch.set_num_threads(threads)


def _compare_with_the_library(comfy, framepack):
    g = Graph()
    _sample(g, _load(g, framepack["file"], weight_dtype="fp32"), framepack, "reference", direction="f1")
    comfy.run(g.to_dict())

    from tiny_checkpoints import build_framepack_model, tiny_state_dict

    model = build_framepack_model()
    model.load_state_dict({key: value.float() for key, value in tiny_state_dict("framepack").items()})
    model.eval()
    text = load_text_embedding(comfy.models_dir("text_embeddings") / framepack["text"])
    image = load_image_embedding(comfy.models_dir("image_embeddings") / framepack["image"]).float()
    context, pooled = text.context[None].float(), text.pooled[None].float()

    def predict(x, sigma, inputs):
        section, index = inputs.section, torch.tensor
        velocity = model(
            hidden_states=x, timestep=torch.tensor([sigma * 1000.0]), encoder_hidden_states=context,
            encoder_attention_mask=torch.ones(1, context.shape[1], dtype=torch.long), pooled_projections=pooled,
            image_embeds=image, indices_latents=index(section.latent_indices), guidance=torch.tensor([10000.0]),
            latents_clean=inputs.clean_latents, indices_latents_clean=index(section.clean_indices),
            latents_history_2x=inputs.history_2x, indices_latents_history_2x=index(section.history_2x_indices),
            latents_history_4x=inputs.history_4x, indices_latents_history_4x=index(section.history_4x_indices),
            return_dict=False)[0]
        return x - sigma * velocity

    run = FramePackRun(sections=SECTIONS, window=WINDOW, steps=STEPS, direction="f1", seed=3)
    with torch.no_grad():
        expected = sample_video(predict, torch.zeros(1, 16, 1, 8, 8), run).video / HUNYUAN_VIDEO_LATENT_SCALE
    assert torch.allclose(_latent(comfy, "reference"), expected, rtol=1e-4, atol=1e-4)


def test_f1_direction_samples_forwards_from_the_start_frame(comfy, framepack):
    g = Graph()
    model = _load(g, framepack["folder"])
    f1 = _sample(g, model, framepack, "f1", direction="f1", magcache="on")
    outputs = comfy.run(g.to_dict())
    video = _latent(comfy, "f1")
    assert video.shape == (1, 16, 1 + SECTIONS * WINDOW, 8, 8)
    assert torch.equal(video[:, :, 0], torch.zeros_like(video[:, :, 0]))
    assert "framepack_f1" in preview_text(outputs, f1), "auto picks the F1 curve for the f1 direction"


def test_fp8_scaled_and_core_lora(comfy, framepack):
    g = Graph()
    bf16, fp8 = _load(g, framepack["file"]), _load(g, framepack["folder"], fp8=True)
    _sample(g, bf16, framepack, "lora_base")
    _sample(g, fp8, framepack, "fp8")
    _sample(g, _load(g, framepack["prequantized"]), framepack, "prequantized")
    for name, model in (("bf16", bf16), ("fp8", fp8)):
        patched = g.add("LoraLoaderModelOnly", model=model[0], lora_name=framepack["lora"], strength_model=1.0)
        _sample(g, patched, framepack, f"lora_{name}")
    outputs = comfy.run(g.to_dict())
    base, quantized = _latent(comfy, "lora_base"), _latent(comfy, "fp8")
    assert 0 < relative_error(quantized, base) < 0.1, "fp8 scaled samples close to bf16, not identically"
    assert "quantized" in preview_text(outputs, fp8)
    assert torch.equal(_latent(comfy, "prequantized"), quantized), "a saved fp8 file loads as quantizing does"
    lora_bf16, lora_fp8 = _latent(comfy, "lora_bf16"), _latent(comfy, "lora_fp8")
    assert relative_error(lora_bf16, base) > 1e-3, "the LoRA changes the output"
    assert relative_error(lora_fp8, quantized) > 1e-3, "the LoRA changes the fp8 model's output too"
    assert relative_error(lora_fp8, lora_bf16) < 0.1


def _latent_file(comfy, name: str, seed: int) -> str:
    """A one-frame 64×64 video latent in ComfyUI's .latent format (input folder, for LoadLatent)."""
    path = comfy.input_dir / name
    if not path.exists():
        latent = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        safetensors.torch.save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])}, str(path))
    return name


def test_start_and_end_images(comfy, framepack):
    start, end = _latent_file(comfy, "framepack_start.latent", 1), _latent_file(comfy, "framepack_end.latent", 2)
    g = Graph()
    model = _load(g, framepack["file"])
    _sample(g, model, framepack, "with_start", start_file=start)
    ended = _sample(g, model, framepack, "with_end", start_file=start)
    g.nodes[ended]["inputs"]["end_latent"] = g.add("LoadLatent", latent=end)[0]
    comfy.run(g.to_dict())
    first = safetensors.torch.load_file(comfy.input_dir / start)["latent_tensor"]
    video = _latent(comfy, "with_start")
    assert torch.allclose(video[:, :, :1], first, rtol=1e-6, atol=1e-6), "the video starts with the start image"
    with_end = _latent(comfy, "with_end")
    assert with_end.shape == video.shape and torch.allclose(with_end[:, :, :1], first, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(with_end, video), "the end image conditions the sections"

    g = Graph()
    f1 = _sample(g, _load(g, framepack["file"]), framepack, "f1_end", start_file=start, direction="f1")
    g.nodes[f1]["inputs"]["end_latent"] = g.add("LoadLatent", latent=end)[0]
    assert "vanilla only" in comfy.run_error(g.to_dict())


def test_calibration_is_saved_and_reused(comfy, framepack):
    g = Graph()
    model = _load(g, framepack["folder"])
    calibrate = _sample(g, model, framepack, "calibrate", magcache="calibrate", calibration_name="framepack_tiny")
    outputs = comfy.run(g.to_dict())
    saved = comfy.models_dir("magcache") / "framepack_tiny.json"
    data = json.loads(saved.read_text())
    assert data["architecture"] == "framepack" and data["steps"] == STEPS and len(data["ratios"]) == STEPS
    assert len(data["extra"]["section_ratios"]) == SECTIONS
    assert "framepack_tiny.json" in preview_text(outputs, calibrate)

    g = Graph()
    model = _load(g, framepack["folder"])
    reused = _sample(g, model, framepack, "calibrated", magcache="on", magcache_ratios="framepack_tiny.json")
    pasted = _sample(g, model, framepack, "pasted", magcache="on", pasted_ratios=",".join(map(str, data["ratios"])))
    outputs = comfy.run(g.to_dict())
    assert "framepack_tiny.json" in preview_text(outputs, reused)
    assert f"pasted ratios ({STEPS} values)" in preview_text(outputs, pasted)


def test_real_cfg_needs_and_uses_the_negative_prompt(comfy, framepack):
    g = Graph()
    _sample(g, _load(g, framepack["file"]), framepack, "cfg_missing", cfg=2.0)
    assert "needs a negative prompt" in comfy.run_error(g.to_dict())

    g = Graph()
    model = _load(g, framepack["file"])
    guided = _sample(g, model, framepack, "cfg_two", cfg=2.0, magcache="on", magcache_threshold=0.0)
    g.nodes[guided]["inputs"]["negative"] = g.add("MusubiLoadTextEmbedding", embedding=framepack["text"], architecture="framepack")[0]
    _sample(g, model, framepack, "cfg_one")
    outputs = comfy.run(g.to_dict())
    assert f"model calls: {2 * SECTIONS * STEPS} computed" in preview_text(outputs, guided)
    # the same prompt as both: x0_u + cfg·(x0_c − x0_u) is x0_c, so cfg changes nothing
    assert torch.allclose(_latent(comfy, "cfg_two"), _latent(comfy, "cfg_one"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind, expected", [
    ("plain_fp8", "fp8_scaled"),
    ("hunyuan_video", "not FramePack"),
])
def test_unusable_files_are_refused_with_what_to_load(comfy, framepack, kind, expected):
    g = Graph()
    model = _load(g, framepack[kind])
    _sample(g, model, framepack, f"refused_{kind}")
    error = comfy.run_error(g.to_dict())
    assert "Load FramePack DiT" in error and expected in error, error


def test_core_ksampler_is_told_to_use_the_framepack_sampler(comfy, framepack):
    g = Graph()
    model = _load(g, framepack["file"])
    positive = g.add("MusubiLoadTextEmbedding", embedding=framepack["text"], architecture="framepack")
    latent = g.add("EmptyHunyuanLatentVideo", width=64, height=64, length=1, batch_size=1)
    sampled = g.add("KSampler", model=model[0], positive=positive[0], negative=positive[0], latent_image=latent[0],
                    seed=0, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    g.add("SaveLatent", samples=sampled[0], filename_prefix="framepack/ksampler")
    error = comfy.run_error(g.to_dict())
    assert "FramePack Sampler" in error, error


def test_image_embedding_round_trip(comfy, framepack):
    g = Graph()
    loaded = g.add("MusubiLoadImageEmbedding", embedding=framepack["image"])
    saved = g.add("MusubiSaveImageEmbedding", clip_vision_output=loaded[0], filename="framepack_round_trip")
    outputs = comfy.run(g.to_dict())
    assert "framepack_round_trip.safetensors" in preview_text(outputs, saved)
    original = load_image_embedding(comfy.models_dir("image_embeddings") / framepack["image"])
    again = load_image_embedding(comfy.models_dir("image_embeddings") / "framepack_round_trip.safetensors")
    assert again.shape == (1, 729, 1152) and torch.equal(again, original)


def test_other_loaders_and_magcache_nodes_point_to_the_framepack_nodes(comfy, framepack):
    def sample_with_magcache_patch(g, model):
        patched = g.add("MusubiMagCache", model=model[0], threshold=0.24, retention_ratio=0.2, K=6, ratios="auto",
                        pasted_ratios="", expert="auto")
        positive = g.add("MusubiLoadTextEmbedding", embedding=framepack["text"], architecture="framepack")
        latent = g.add("EmptyHunyuanLatentVideo", width=64, height=64, length=1, batch_size=1)
        sampled = g.add("KSamplerAdvanced", model=patched[0], add_noise="enable", noise_seed=0, steps=1, cfg=1.0,
                        sampler_name="euler", scheduler="simple", positive=positive[0], negative=positive[0],
                        latent_image=latent[0], start_at_step=0, end_at_step=1, return_with_leftover_noise="disable")
        g.add("SaveLatent", samples=sampled[0], filename_prefix="framepack/magcache_patch")
        return comfy.run_error(g.to_dict())

    g = Graph()
    loaded = g.add("MusubiLoadDiTFP8Scaled", unet_name=framepack["file"], fp8_format="e4m3fn", mode="block", block_size=64,
                   compute_dtype="default", architecture="auto")
    error = sample_with_magcache_patch(g, loaded)
    assert "Load FramePack DiT" in error, error

    g = Graph()
    error = sample_with_magcache_patch(g, _load(g, framepack["file"]))
    assert "FramePack Sampler" in error and "MagCache" in error, error
