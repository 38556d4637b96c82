"""Training Dataset (images/videos) inside a real ComfyUI: a folder of mixed-size images and short
videos with captions becomes bucketed, cached training data that Train LoRA trains on.

Cheapest real encoding path (measured on the 2-core CPU machine): ComfyUI's Wan 2.1 VAE has a
fixed architecture (127 M parameters, detected by its key names), so the test writes a seeded
random one with the real layout once per module (shapes taken from ComfyUI's own class on the
meta device, ~4 s) and encodes 48-px images in ~0.4 s and 9-frame clips in ~2 s. No text encoder
that ComfyUI loads is small enough (UMT5-XXL for Wan is fixed at 5.7 B parameters), so the
captions' text-encoder outputs are pre-written as musubi-tuner text caches
(``<name>_wan_te.safetensors`` with the caption in ``caption1``) — the node reuses them, which is
also how musubi-tuner's own caches are brought in; the CLIP path is covered by its error checks.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from comfy_server import Graph

pytestmark = pytest.mark.comfyui

VAE_NAME = "tiny_wan21_vae_real_layout.safetensors"
IMAGES = {"wide": (64, 32), "tall": (32, 64), "square": (48, 48), "squarish": (50, 40)}
VIDEOS = {"clip_wide": (64, 32, 9), "clip_tall": (32, 64, 6)}

_VAE_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import comfy.options, comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.ldm.wan.vae as wan_vae
from safetensors.torch import save_file
with torch.device("meta"):
    model = wan_vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True], dropout=0.0)
generator = torch.Generator().manual_seed(0)
tensors = {}
for name, meta in model.state_dict().items():
    if meta.dim() > 1:
        value = torch.randn(meta.shape, generator=generator) / meta[0].numel() ** 0.5
    else:
        value = torch.ones(meta.shape) if name.endswith("gamma") else torch.zeros(meta.shape)
    tensors[name] = value.to(torch.bfloat16)
save_file(tensors, sys.argv[2])
"""


_CLIP_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import comfy.options, comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.clip_model, comfy.ops
from safetensors.torch import save_file
config = json.load(open(sys.argv[1] + "/comfy/sd1_clip_config.json"))
model = comfy.clip_model.CLIPTextModel(config, torch.float16, "meta", comfy.ops.manual_cast)
generator = torch.Generator().manual_seed(0)
tensors = {}
for name, meta in model.state_dict().items():
    if meta.dim() > 1:
        value = torch.randn(meta.shape, generator=generator) / meta.shape[-1] ** 0.5
    else:
        value = torch.ones(meta.shape) if name.endswith("weight") else torch.zeros(meta.shape)
    tensors[name] = value.to(torch.float16)
save_file(tensors, sys.argv[2])
"""


@pytest.fixture(scope="module")
def wan_vae(comfy):
    path = comfy.models_dir("vae") / VAE_NAME
    if not path.exists():
        subprocess.run([sys.executable, "-c", _VAE_SCRIPT, str(comfy.comfy_path), str(path)], check=True,
                       cwd=comfy.comfy_path, capture_output=True, timeout=300)
    return VAE_NAME


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write_video(path: Path, width: int, height: int, frames: int, seed: int) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=16)
        stream.width, stream.height, stream.pix_fmt = width, height, "bgr0"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(_pattern(width, height, seed * 100 + index), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _captions_and_text_caches(folder: Path, cache: Path) -> dict[str, str]:
    from musubi.data.text_embeddings import TextEmbedding, save_text_embedding

    captions = {}
    cache.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate([*IMAGES, *VIDEOS]):
        caption = f"a {name} test pattern"
        (folder / f"{name}.txt").write_text(caption)
        context = torch.randn(5 + index, 4096, generator=torch.Generator().manual_seed(index))
        save_text_embedding(cache / f"{name}_wan_te.safetensors", TextEmbedding(context, None, "wan", {}), caption=caption)
        captions[name] = caption
    return captions


@pytest.fixture(scope="module")
def dataset_folder(comfy):
    folder = comfy.input_dir / "ds_mixed"
    if not folder.exists():
        folder.mkdir()
        for seed, (name, (width, height)) in enumerate(IMAGES.items()):
            Image.fromarray(_pattern(width, height, seed)).save(folder / f"{name}.png")
        for seed, (name, (width, height, frames)) in enumerate(VIDEOS.items()):
            _write_video(folder / f"{name}.mkv", width, height, frames, seed + 10)
        _captions_and_text_caches(folder, comfy.output_dir / "ds_cache" / "mixed")
    return folder


def _dataset_graph(g: Graph, vae, *, num_repeats: int = 1, source: str = "ds_mixed", cache: str = "ds_cache/mixed"):
    dataset = g.add("MusubiDataset", source=source, architecture="wan", vae=vae[0], width=48, height=48,
                    enable_bucket=True, bucket_no_upscale=False, num_repeats=num_repeats, caption_extension=".txt",
                    target_frames="1, 5, 9", frame_extraction="head", frame_stride=1, frame_sample=1, max_frames=129,
                    cache_folder=cache, reencode=False, image_to_video=False)
    g.add("PreviewAny", source=dataset[1])
    return dataset


def _train(g: Graph, model, dataset, output_name: str, steps: int = 3):
    return g.add("MusubiTrainLoRA", model=model[0], dataset=dataset[0], steps=steps, batch_size=2,
                 gradient_accumulation_steps=1, seed=1, output_name=output_name, resume="no", mixed_precision="no",
                 gradient_checkpointing=False)


def test_a_folder_of_images_and_videos_trains_from_a_cache_made_once(comfy, wan_vae, dataset_folder, tiny_model_file):
    cache = comfy.output_dir / "ds_cache" / "mixed"
    g = Graph()
    vae = g.add("VAELoader", vae_name=wan_vae)
    dataset = _dataset_graph(g, vae)
    shown = str(int(dataset) + 1)
    model = g.add("UNETLoader", unet_name=tiny_model_file("wan21_t2v"), weight_dtype="default")
    train = _train(g, model, dataset, "dataset_slice")
    outputs = comfy.run(g.to_dict(), timeout=600)
    report = outputs[str(shown)]["text"][0]

    # 4 images + clip_wide (9 frames: windows of 1, 5, 9) + clip_tall (6 frames: 1, 5) = 9 items, with
    # buckets of the 48x48 area (step 16): 64x32, 32x64, 48x48 (twice, 50x40 is nearest 1:1).
    names = sorted(p.name for p in cache.glob("*_wan.safetensors"))
    assert names == sorted([
        "clip_tall_00000-001_0032x0064_wan.safetensors", "clip_tall_00000-005_0032x0064_wan.safetensors",
        "clip_wide_00000-001_0064x0032_wan.safetensors", "clip_wide_00000-005_0064x0032_wan.safetensors",
        "clip_wide_00000-009_0064x0032_wan.safetensors", "square_0048x0048_wan.safetensors",
        "squarish_0050x0040_wan.safetensors", "tall_0032x0064_wan.safetensors", "wide_0064x0032_wan.safetensors"])
    shapes = {}
    for name in names:
        with safetensors.safe_open(str(cache / name), "pt") as file:
            [key] = list(file.keys())
            shapes[name] = tuple(file.get_tensor(key).shape)
            assert key == f"latents_{shapes[name][1]}x{shapes[name][2]}x{shapes[name][3]}_float32"
            assert file.metadata()["architecture"] == "wan"
    assert shapes["wide_0064x0032_wan.safetensors"] == (16, 1, 4, 8)
    assert shapes["tall_0032x0064_wan.safetensors"] == (16, 1, 8, 4)
    assert shapes["squarish_0050x0040_wan.safetensors"] == (16, 1, 6, 6)
    assert shapes["clip_wide_00000-009_0064x0032_wan.safetensors"] == (16, 3, 4, 8)  # 9 frames → 1 + 8/4 latent frames
    assert shapes["clip_tall_00000-005_0032x0064_wan.safetensors"] == (16, 2, 8, 4)
    assert "9 items" in report and "6 bucket(s)" in report, report
    assert "encoded 9 latent(s) and 0 caption(s)" in report, report
    assert re.search(r"final loss [\d.]+", outputs[str(train)]["text"][0])

    # A changed setting that does not touch the encoding re-runs the node: everything comes from the cache.
    mtimes = {name: (cache / name).stat().st_mtime_ns for name in names}
    g = Graph()
    vae = g.add("VAELoader", vae_name=wan_vae)
    dataset = _dataset_graph(g, vae, num_repeats=2)
    shown = str(int(dataset) + 1)
    model = g.add("UNETLoader", unet_name=tiny_model_file("wan21_t2v"), weight_dtype="default")
    train = _train(g, model, dataset, "dataset_cached", steps=2)
    outputs = comfy.run(g.to_dict(), timeout=600)
    report = outputs[str(shown)]["text"][0]
    assert "encoded 0 latent(s) and 0 caption(s); reused 9 latent(s) and 6 caption(s)" in report, report
    assert "(18 with repeats)" in report
    assert {name: (cache / name).stat().st_mtime_ns for name in names} == mtimes
    assert re.search(r"final loss [\d.]+", outputs[str(train)]["text"][0])

    # The same images through a musubi-tuner dataset TOML, with no VAE or text encoder at all.
    (comfy.input_dir / "ds_mixed.toml").write_text(
        f'[general]\nresolution = [48, 48]\nenable_bucket = true\n\n[[datasets]]\nimage_directory = "ds_mixed"\n'
        f'cache_directory = "{cache.as_posix()}"\nnum_repeats = 3\n')
    g = Graph()
    dataset = g.add("MusubiDataset", source="ds_mixed.toml", architecture="wan", width=16, height=16, enable_bucket=False,
                    bucket_no_upscale=True, num_repeats=1, caption_extension=".none", target_frames="1",
                    frame_extraction="head", frame_stride=1, frame_sample=1, max_frames=129, cache_folder="",
                    reencode=False, image_to_video=False)
    shown = g.add("PreviewAny", source=dataset[1])
    report = comfy.run(g.to_dict(), timeout=300)[str(shown)]["text"][0]
    assert report.startswith("4 items (12 with repeats) in 3 bucket(s)"), report
    assert "encoded 0 latent(s) and 0 caption(s); reused 4 latent(s) and 4 caption(s)" in report, report


def test_the_cached_latent_is_core_vae_encode_in_the_models_space(comfy, wan_vae, dataset_folder):
    """The 48x48 image needs no resize: its cache must hold core VAE Encode's latent after Wan's
    latent normalisation (musubi-tuner caches latents in the model's space)."""
    sys.path.insert(0, str(comfy.comfy_path))
    try:
        import comfy.latent_formats as formats  # only torch inside
    finally:
        sys.path.remove(str(comfy.comfy_path))
    cache = comfy.output_dir / "ds_cache" / "mixed"
    (comfy.input_dir / "square_probe.png").write_bytes((dataset_folder / "square.png").read_bytes())
    g = Graph()
    vae = g.add("VAELoader", vae_name=wan_vae)
    _dataset_graph(g, vae)
    image = g.add("LoadImage", image="square_probe.png")
    encoded = g.add("VAEEncode", pixels=image[0], vae=vae[0])
    g.add("SaveLatent", samples=encoded[0], filename_prefix="ds_probe/square")
    comfy.run(g.to_dict(), timeout=600)
    [saved] = (comfy.output_dir / "ds_probe").glob("square_*.latent")
    core = safetensors.torch.load_file(saved)["latent_tensor"]
    expected = formats.Wan21().process_in(core.float())[0]
    cached = next(iter(safetensors.torch.load_file(cache / "square_0048x0048_wan.safetensors").values()))
    torch.testing.assert_close(cached, expected, atol=1e-4, rtol=1e-4)


def test_clear_errors_name_the_node(comfy, wan_vae, tmp_path):
    folder = comfy.input_dir / "ds_missing_captions"
    folder.mkdir(exist_ok=True)
    for name in ("a", "b"):
        Image.fromarray(_pattern(32, 32, 1)).save(folder / f"{name}.png")
    (folder / "b.txt").write_text("only b has one")
    g = Graph()
    vae = g.add("VAELoader", vae_name=wan_vae)
    _dataset_graph(g, vae, source="ds_missing_captions", cache="ds_cache/missing")
    error = comfy.run_error(g.to_dict())
    assert "Training Dataset (images/videos)" in error and "a.png" in error and "caption" in error, error

    empty = comfy.input_dir / "ds_empty"
    empty.mkdir(exist_ok=True)
    g = Graph()
    vae = g.add("VAELoader", vae_name=wan_vae)
    _dataset_graph(g, vae, source="ds_empty", cache="ds_cache/empty")
    error = comfy.run_error(g.to_dict())
    assert "Training Dataset (images/videos)" in error and "no images or videos" in error, error

    # A caption without a text cache needs the text encoder.
    folder = comfy.input_dir / "ds_needs_clip"
    folder.mkdir(exist_ok=True)
    Image.fromarray(_pattern(32, 32, 2)).save(folder / "c.png")
    (folder / "c.txt").write_text("never encoded")
    g = Graph()
    vae = g.add("VAELoader", vae_name=wan_vae)
    _dataset_graph(g, vae, source="ds_needs_clip", cache="ds_cache/needs_clip")
    error = comfy.run_error(g.to_dict())
    assert "connect the text encoder" in error and "c.png" in error, error


def test_image_to_video_items_carry_their_first_frame_and_train_wan_i2v(comfy, wan_vae, tiny_model_file):
    folder = comfy.input_dir / "ds_i2v"
    cache = comfy.output_dir / "ds_cache" / "i2v"
    if not folder.exists():
        folder.mkdir()
        Image.fromarray(_pattern(48, 48, 3)).save(folder / "still.png")
        _write_video(folder / "moving.mkv", 32, 64, 6, 4)
        from musubi.data.text_embeddings import TextEmbedding, save_text_embedding

        cache.mkdir(parents=True, exist_ok=True)
        for name in ("still", "moving"):
            (folder / f"{name}.txt").write_text(f"the {name} one")
            save_text_embedding(cache / f"{name}_wan_te.safetensors",
                                TextEmbedding(torch.randn(4, 4096), None, "wan", {}), caption=f"the {name} one")
    g = Graph()
    vae = g.add("VAELoader", vae_name=wan_vae)
    dataset = g.add("MusubiDataset", source="ds_i2v", architecture="wan", vae=vae[0], width=48, height=48,
                    enable_bucket=True, bucket_no_upscale=False, num_repeats=1, caption_extension=".txt",
                    target_frames="1, 5", frame_extraction="head", frame_stride=1, frame_sample=1, max_frames=129,
                    cache_folder="ds_cache/i2v", reencode=False, image_to_video=True)
    model = g.add("UNETLoader", unet_name=tiny_model_file("wan21_i2v"), weight_dtype="default")
    train = _train(g, model, dataset, "dataset_i2v", steps=2)
    outputs = comfy.run(g.to_dict(), timeout=600)
    assert re.search(r"final loss [\d.]+", outputs[str(train)]["text"][0])

    # musubi-tuner's layout: 4 mask channels (1 on the given first latent frame), then the latent.
    still = safetensors.torch.load_file(cache / "still_0048x0048_wan.safetensors")
    assert sorted(still) == ["latents_1x6x6_float32", "latents_image_1x6x6_float32"]
    image = still["latents_image_1x6x6_float32"]
    assert image.shape == (20, 1, 6, 6) and torch.equal(image[:4], torch.ones(4, 1, 6, 6))
    torch.testing.assert_close(image[4:], still["latents_1x6x6_float32"])  # one frame: the item itself
    moving = safetensors.torch.load_file(cache / "moving_00000-005_0032x0064_wan.safetensors")
    image, latent = moving["latents_image_2x8x4_float32"], moving["latents_2x8x4_float32"]
    assert image.shape == (20, 2, 8, 4) and latent.shape == (16, 2, 8, 4)
    assert torch.equal(image[:4, 0], torch.ones(4, 8, 4)) and torch.equal(image[:4, 1], torch.zeros(4, 8, 4))
    assert not torch.allclose(image[4:, 1], latent[:, 1])  # later frames are gray, not the video


def test_captions_go_through_comfyuis_text_encoder_and_its_width_is_checked(comfy, wan_vae):
    """A random CLIP-L with the real layout (123 M parameters, the smallest text encoder CLIPLoader
    builds) encodes the caption through CLIP Text Encode's path; its 768-wide states do not fit Wan."""
    path = comfy.models_dir("text_encoders") / "tiny_clip_l_real_layout.safetensors"
    if not path.exists():
        subprocess.run([sys.executable, "-c", _CLIP_SCRIPT, str(comfy.comfy_path), str(path)], check=True,
                       cwd=comfy.comfy_path, capture_output=True, timeout=300)
    folder = comfy.input_dir / "ds_clip"
    folder.mkdir(exist_ok=True)
    Image.fromarray(_pattern(32, 32, 5)).save(folder / "one.png")
    (folder / "one.txt").write_text("a caption for the text encoder")
    g = Graph()
    vae = g.add("VAELoader", vae_name=wan_vae)
    clip = g.add("CLIPLoader", clip_name=path.name, type="stable_diffusion", device="default")
    dataset = _dataset_graph(g, vae, source="ds_clip", cache="ds_cache/clip")
    g.nodes[str(dataset)]["inputs"]["clip"] = clip[0]
    error = comfy.run_error(g.to_dict())
    assert "Training Dataset (images/videos)" in error and "context width 768 does not fit wan" in error, error
