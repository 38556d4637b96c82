"""Training datasets without ComfyUI: musubi-tuner's bucket and frame-extraction rules (expected
values worked out by hand from the rules), the dataset TOML's errors, and the on-disk cache
(reuse, invalidation, musubi-tuner's names) read back by the headless trainer."""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from musubi.cli import main
from musubi.data.buckets import BucketSelector, bucket_resolutions, resize_plan
from musubi.data.cache import CachedDataset, Encoders, build_cache
from musubi.data.config import DatasetSpec, load_dataset_config, parse_dataset_config
from musubi.data.plan import plan_items
from musubi.errors import MusubiError
from musubi.data.frames import extract_windows, normalize_target_frames, resample_frame_indices
from musubi.data.musubi_cache import open_cache_folder
from musubi.training.adapter import ToyAdapter
from musubi.data.text_embeddings import TextEmbedding

torch.set_num_threads(1)


# --- buckets ---------------------------------------------------------------------------------------

def test_buckets_of_musubis_default_resolution():
    # A = 960·544 = 522240, r = 722, w runs 352, 368, …, 736 (< 722 + 16).
    buckets = bucket_resolutions((960, 544))
    assert buckets == sorted(set(buckets))
    assert {w for w, _ in buckets} >= set(range(352, 737, 16))  # the 25 widths of the loop (and their swaps)
    assert min(w for w, _ in buckets) == 352 and max(w for w, _ in buckets) == 1472
    for expected in [(352, 1472), (1472, 352), (544, 960), (960, 544), (720, 720), (736, 704), (704, 736)]:
        assert expected in buckets  # e.g. w=352: 522240//352 = 1483 → 16·92 = 1472
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 522240 for w, h in buckets)


def test_nearest_aspect_ratio_and_no_upscale():
    selector = BucketSelector((960, 544), enable_bucket=True)
    assert selector.bucket_for(1920, 1080) == (960, 544)  # 1.778: 960/544 = 1.765 beats 976/528 = 1.848
    assert selector.bucket_for(2000, 1000) == (1008, 512)  # 2.0: 1.969 beats 1040/496 = 2.097
    assert selector.bucket_for(1000, 1000) == (720, 720)
    no_upscale = BucketSelector((960, 544), enable_bucket=True, bucket_no_upscale=True)
    assert no_upscale.bucket_for(500, 300) == (496, 288)  # smaller than the area: own size floored to 16
    assert no_upscale.bucket_for(2000, 1000) == (1008, 512)  # larger: the nearest bucket as usual
    assert BucketSelector((960, 544)).bucket_for(100, 3000) == (960, 544)  # no bucketing: the resolution


def test_resize_covers_the_bucket_and_crops_the_center():
    plan = resize_plan(1920, 1080, (960, 544))
    # k = max(960/1920, 544/1080) = 0.503704; 1920k = 967.1 → 967, 1080k = 544 → 544; left = (967 − 960) // 2 = 3
    assert plan.size == (967, 544) and plan.crop == (3, 0, 963, 544) and not plan.upscale
    plan = resize_plan(30, 20, (48, 48))
    assert plan.size == (72, 48) and plan.crop == (12, 0, 60, 48) and plan.upscale


# --- frame extraction -----------------------------------------------------------------------------

def test_target_frames_round_down_to_4k_plus_1():
    assert normalize_target_frames([45, 1, 25, 24, 25]) == [1, 21, 25, 45]


def _starts(windows):
    return [(window[0], len(window)) for window in windows]


def test_every_frame_extraction_mode():
    assert _starts(extract_windows(30, "head", [1, 25, 45])) == [(0, 1), (0, 25)]
    assert _starts(extract_windows(30, "chunk", [9])) == [(0, 9), (9, 9), (18, 9)]
    assert _starts(extract_windows(30, "slide", [25], frame_stride=2)) == [(0, 25), (2, 25), (4, 25)]
    assert _starts(extract_windows(30, "uniform", [9], frame_sample=3)) == [(0, 9), (10, 9), (21, 9)]  # linspace(0, 21, 3)
    assert _starts(extract_windows(30, "uniform", [9], frame_sample=1)) == [(0, 9)]
    assert _starts(extract_windows(30, "full", max_frames=129)) == [(0, 29)]
    assert _starts(extract_windows(200, "full", max_frames=129)) == [(0, 129)]
    assert extract_windows(4, "head", [5]) == []
    assert extract_windows(10, "slide", [5], frame_stride=3)[1] == [3, 4, 5, 6, 7]
    with pytest.raises(MusubiError, match="frame_extraction"):
        extract_windows(10, "middle", [5])


def test_source_fps_keeps_frames_where_the_whole_part_changes():
    # Δ = 16/30: sums before adding 0, .53, 1.07, 1.6, 2.13, 2.67, 3.2, 3.73, 4.27, 4.8
    assert resample_frame_indices(10, 30.0, 16.0) == [0, 2, 4, 6, 8]
    assert resample_frame_indices(4, 16.0, 16.0) == [0, 1, 2, 3]


# --- dataset TOML ---------------------------------------------------------------------------------

def _parse(text: str, base="/data"):
    import toml

    return parse_dataset_config(toml.loads(textwrap.dedent(text)), base)


def test_toml_values_resolve_dataset_then_general_then_defaults():
    specs = _parse("""
        [general]
        resolution = [512, 384]
        enable_bucket = true
        [[datasets]]
        image_directory = "images"
        num_repeats = 3
        flux_kontext_no_resize_control = true
        [[datasets]]
        video_directory = "/abs/videos"
        cache_directory = "cache/videos"
        resolution = 256
        target_frames = [1, 24, 25]
        frame_extraction = "chunk"
        source_fps = 30
    """)
    image, video = specs
    assert image.kind == "image" and image.directory == os.path.normpath("/data/images")
    assert image.resolution == (512, 384) and image.enable_bucket and image.num_repeats == 3
    assert image.no_resize_control and image.cache_folder == image.directory
    assert video.resolution == (256, 256) and video.target_frames == (1, 21, 25) and video.frame_extraction == "chunk"
    assert video.source_fps == 30.0 and video.cache_folder == os.path.normpath("/data/cache/videos")


@pytest.mark.parametrize("text, message", [
    ("[[datasets]]\nimage_directory = 'a'\nresolutoin = 512", "unknown key 'resolutoin'"),
    ("[[datasets]]\nimage_directory = 'a'\nframe_extraction = 'head'", "belongs to video datasets"),
    ("[[datasets]]\nimage_directory = 'a'\nvideo_directory = 'b'", "both image and video"),
    ("[[datasets]]\nnum_repeats = 2", "needs image_directory"),
    ("[general]\ncache_directory = 'x'\n[[datasets]]\nimage_directory = 'a'", "not allowed here"),
    ("[[datasets]]\nimage_directory = 'a'\nnum_repeats = '2'", "num_repeats must be a whole number"),
    ("[[datasets]]\nimage_directory = 'a'\nresolution = [512]", "resolution"),
    ("[[datasets]]\nimage_directory = 'a'\nnum_repeats = 0", "at least 1"),
    ("[[datasets]]\nimage_jsonl_file = 'a.jsonl'", "needs a cache_directory"),
    ("[[datasets]]\nimage_directory = 'a'\n[[datasets]]\nimage_directory = 'a'", "share the cache directory"),
    ("[[datasets]]\nvideo_directory = 'a'\ntarget_frames = [0]", "target_frames"),
    ("[[datasets]]\nvideo_directory = 'a'\nframe_extraction = 'all'", "frame_extraction 'all' is unknown"),
    ("title = 'x'", "unknown top-level"),
    ("[general]\nresolution = 512", "no [[datasets]]"),
])
def test_toml_errors_name_the_key(text, message):
    with pytest.raises(MusubiError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _parse(text)


def test_toml_file_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[[datasets]\n")
    with pytest.raises(MusubiError, match="bad.toml: cannot be parsed"):
        load_dataset_config(str(path))


# --- plan and cache -------------------------------------------------------------------------------

def _image(path, width, height, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def _video(path, width, height, frames):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=16)
        stream.width, stream.height, stream.pix_fmt = width, height, "bgr0"
        for index in range(frames):
            array = np.full((height, width, 3), index * 20, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


class CountingEncoders(Encoders):
    """A stand-in VAE (8×8 average pool, time /4 like Wan) and text encoder that count their calls."""

    def __init__(self, vae_id="vae-a", text_id="te-a"):
        super().__init__(encode_pixels=self._pixels, vae_id=vae_id, encode_text=self._text, text_encoder_id=text_id)
        self.pixel_calls, self.text_calls = 0, 0

    def _pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        self.pixel_calls += 1
        frames = pixels.permute(3, 0, 1, 2)  # [3, T, H, W]
        pooled = torch.nn.functional.avg_pool3d(frames.unsqueeze(0), (1, 8, 8))[0]
        kept = pooled[:, ::4]  # 1 + (T − 1)/4 latent frames
        return torch.cat([kept] * 5 + [kept[:1]])[:16]

    def _text(self, caption: str) -> TextEmbedding:
        self.text_calls += 1
        generator = torch.Generator().manual_seed(len(caption))
        return TextEmbedding(torch.randn(3, 4096, generator=generator), torch.randn(768, generator=generator), None, {})


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _image(data / "wide.png", 64, 32)
    _image(data / "square.png", 48, 48, seed=1)
    _video(data / "clip.mkv", 32, 64, 6)
    for name in ("wide", "square", "clip"):
        (data / f"{name}.txt").write_text(f"caption of {name}")
    return data


def _specs(folder, cache):
    common = dict(directory=str(folder), resolution=(48, 48), enable_bucket=True, cache_directory=str(cache))
    return [DatasetSpec(kind="image", num_repeats=2, **common),
            DatasetSpec(kind="video", target_frames=(1, 5), **common)]


def test_cache_is_written_once_and_reused_until_a_source_changes(folder, tmp_path):
    cache = tmp_path / "cache"
    items = plan_items(_specs(folder, cache), "wan")
    encoders = CountingEncoders()
    cached, report = build_cache(items, "wan", encoders)
    assert sorted(os.listdir(cache)) == sorted([
        "clip_00000-001_0032x0064_wan.safetensors", "clip_00000-005_0032x0064_wan.safetensors", "clip_wan_te.safetensors",
        "square_0048x0048_wan.safetensors", "square_wan_te.safetensors",
        "wide_0064x0032_wan.safetensors", "wide_wan_te.safetensors"])
    assert (encoders.pixel_calls, encoders.text_calls) == (4, 3)
    data = CachedDataset(cached, "wan")
    assert len(data) == 2 + 2 + 2  # two images repeated twice, two video windows
    shapes = sorted({data.latent_shape(i) for i in range(len(data))})
    assert shapes == [(16, 1, 4, 8), (16, 1, 6, 6), (16, 1, 8, 4), (16, 2, 8, 4)]
    square = next(i for i in range(len(data)) if data.latent_shape(i) == (16, 1, 6, 6))
    pixels = torch.from_numpy(np.array(Image.open(folder / "square.png"))).float().div(255)
    expected = torch.nn.functional.avg_pool2d(pixels.permute(2, 0, 1), 8)  # 48x48 needs no resize
    torch.testing.assert_close(data.model_latent(square)[:3, 0], expected)
    assert data.text(square).extra["caption"] == "caption of square"

    again = CountingEncoders()
    build_cache(items, "wan", again)
    assert (again.pixel_calls, again.text_calls) == (0, 0)

    os.utime(folder / "wide.png", (1, 1))  # touched, same content: still valid (hash)
    (folder / "square.txt").write_text("a new caption")
    _image(folder / "clip.png", 8, 8)  # unrelated file type in an image dataset → new item needing a caption
    os.remove(folder / "clip.png")
    changed = CountingEncoders()
    _, report = build_cache(plan_items(_specs(folder, cache), "wan"), "wan", changed)
    assert (changed.pixel_calls, changed.text_calls) == (0, 1), report.describe()

    _image(folder / "wide.png", 64, 32, seed=7)  # new content
    new_vae = CountingEncoders(vae_id="vae-b")
    build_cache(plan_items(_specs(folder, cache), "wan"), "wan", new_vae)
    assert new_vae.pixel_calls == 4  # another VAE re-encodes everything
    assert new_vae.text_calls == 0

    # Without encoders a complete cache is enough; a missing item asks for the VAE.
    build_cache(plan_items(_specs(folder, cache), "wan"), "wan", Encoders())
    os.remove(cache / "square_0048x0048_wan.safetensors")
    with pytest.raises(MusubiError, match="connect the VAE"):
        build_cache(plan_items(_specs(folder, cache), "wan"), "wan", Encoders())


def test_plan_errors_list_every_problem(folder, tmp_path):
    (folder / "wide.txt").unlink()
    _image(folder / "extra.png", 32, 32)
    with pytest.raises(MusubiError, match=r"2 file\(s\).*extra.png, wide.png"):
        plan_items(_specs(folder, tmp_path / "c"), "wan")
    (folder / "wide.txt").write_text("x")
    (folder / "extra.txt").write_text("y")
    specs = [DatasetSpec(kind="video", directory=str(folder), target_frames=(9,), cache_directory=str(tmp_path / "c"))]
    with pytest.raises(MusubiError, match=r"shorter than the shortest target_frames \(9\): clip.mkv \(6 frames\)"):
        plan_items(specs, "wan")
    with pytest.raises(MusubiError, match="trains on images only"):
        plan_items(specs, "flux")
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "broken.txt").write_text("z")
    with pytest.raises(MusubiError, match=r"1 file\(s\) cannot be read — .*broken.png: cannot read this image"):
        plan_items(_specs(folder, tmp_path / "c")[:1], "wan")
    (folder / "broken.mp4").write_bytes(b"not a video either")
    with pytest.raises(MusubiError, match=r"broken.mp4: cannot read this video"):
        plan_items(_specs(folder, tmp_path / "c")[1:], "wan")


def test_every_unreadable_file_of_a_folder_is_listed_in_one_error(folder, tmp_path):
    # A folder's images and videos are two datasets; a broken video used to go unlisted when an
    # image was broken too, because the image dataset reported first.
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "broken.mp4").write_bytes(b"not a video either")
    for name in ("broken.txt",):
        (folder / name).write_text("caption")
    with pytest.raises(MusubiError) as raised:
        plan_items(_specs(folder, tmp_path / "c"), "wan")
    message = str(raised.value)
    assert message.startswith("dataset: 2 file(s) cannot be read — "), message
    assert "broken.png: cannot read this image" in message and "broken.mp4: cannot read this video" in message

    # Many broken files: the first ten are listed, the rest counted.
    for index in range(11):
        (folder / f"bad{index:02d}.png").write_bytes(b"junk")
        (folder / f"bad{index:02d}.txt").write_text("caption")
    with pytest.raises(MusubiError, match=r"^dataset: 13 file\(s\) cannot be read — .* … and 3 more\.$"):
        plan_items(_specs(folder, tmp_path / "c"), "wan")


def test_files_that_fail_to_decode_are_all_listed_after_the_rest_is_cached(folder, tmp_path):
    # Headers that read but pixel data that does not: found only when the items are encoded.
    for name, seed in (("cut_a", 3), ("cut_b", 4)):
        _image(folder / f"{name}.png", 48, 48, seed=seed)
        data = (folder / f"{name}.png").read_bytes()
        (folder / f"{name}.png").write_bytes(data[: len(data) // 2])
        (folder / f"{name}.txt").write_text(f"caption of {name}")
    cache = tmp_path / "cache"
    items = plan_items(_specs(folder, cache), "wan")
    encoders = CountingEncoders()
    with pytest.raises(MusubiError) as raised:
        build_cache(items, "wan", encoders)
    message = str(raised.value)
    assert message.startswith("dataset: 2 file(s) cannot be read — "), message
    assert "cut_a.png: cannot read this image" in message and "cut_b.png: cannot read this image" in message
    assert "The other items are encoded and cached" in message
    assert encoders.pixel_calls == 4 and encoders.text_calls == 5  # every readable item, every caption
    assert (cache / "square_0048x0048_wan.safetensors").is_file()


def wan_toy(**options):
    """The toy model dressed as Wan (16 channels, text 4096, blocks of the class name the Wan LoRA
    preset targets), to train on a Wan-layout cache."""
    from musubi.training.adapter import ToyBlock

    class WanAttentionBlock(ToyBlock):
        pass

    adapter = ToyAdapter(latent_channels=16, context_dim=4096, width=16, depth=1)
    for block in adapter.model.blocks:
        block.__class__ = WanAttentionBlock
    adapter.architecture = "wan"
    return adapter


def test_the_headless_trainer_reads_the_cache_folder(folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    build_cache(plan_items(_specs(folder, cache), "wan"), "wan", CountingEncoders())
    dataset = open_cache_folder(str(cache))
    assert type(dataset).__name__ == "MusubiCacheFolder" and dataset.architecture == "wan"
    assert len(dataset) == 4
    item = dataset[0]
    assert item["latents"].dim() == 4 and item["context"].shape == (3, 4096)
    config = tmp_path / "train.toml"
    config.write_text(textwrap.dedent(f"""
        model = "test_dataset:wan_toy"
        data_dir = "{cache.as_posix()}"
        [training]
        max_train_steps = 2
        batch_size = 1
        seed = 1
        [output]
        output_dir = "{(tmp_path / 'out').as_posix()}"
        output_name = "from_cache"
    """))
    assert main(["train", "--config_file", str(config)]) == 0
    assert (tmp_path / "out" / "from_cache.safetensors").is_file()


def test_control_images_are_cached_as_numbered_control_latents(tmp_path):
    data, controls = tmp_path / "edit", tmp_path / "controls"
    data.mkdir()
    controls.mkdir()
    _image(data / "a.png", 32, 32)
    _image(data / "b.png", 32, 32, seed=1)
    (data / "a.txt").write_text("make it red")
    (data / "b.txt").write_text("make it blue")
    _image(controls / "a.png", 64, 64, seed=2)  # one control, resized to the item's bucket
    _image(controls / "b_1.png", 32, 32, seed=3)  # numbered controls, in number order
    _image(controls / "b_0.png", 32, 32, seed=4)
    spec = DatasetSpec(kind="image", directory=str(data), resolution=(32, 32), control_directory=str(controls),
                       cache_directory=str(tmp_path / "cache"))
    items = plan_items([spec], "flux")
    assert [[os.path.basename(c) for c in item.controls] for item in items] == [["a.png"], ["b_0.png", "b_1.png"]]
    cached, _ = build_cache(items, "flux", CountingEncoders())
    assert sorted(os.listdir(tmp_path / "cache")) == ["a_0032x0032_fk.safetensors", "a_fk_te.safetensors",
                                                      "b_0032x0032_fk.safetensors", "b_fk_te.safetensors"]
    with safe_open(str(tmp_path / "cache" / "a_0032x0032_fk.safetensors"), "pt") as file:
        assert sorted(file.keys()) == ["latents_1x4x4_float32", "latents_control_1x4x4_float32"]  # musubi's Kontext names
    with safe_open(str(tmp_path / "cache" / "b_0032x0032_fk.safetensors"), "pt") as file:
        assert sorted(file.keys()) == ["latents_1x4x4_float32", "latents_control_0_1x4x4_float32",
                                       "latents_control_1_1x4x4_float32"]
    data_view = CachedDataset(cached, "flux")
    first, second = data_view.model_controls(1)
    expected = torch.from_numpy(np.array(Image.open(controls / "b_0.png"))).float().div(255)
    torch.testing.assert_close(first[:3, 0], torch.nn.functional.avg_pool2d(expected.permute(2, 0, 1), 8))
    assert not torch.equal(first, second)
    (controls / "a.png").unlink()
    with pytest.raises(MusubiError, match="no control image for a.png"):
        plan_items([spec], "flux")


def test_image_to_video_conditioning_is_cached_and_part_of_the_key(folder, tmp_path):
    cache = tmp_path / "cache"
    items = plan_items(_specs(folder, cache)[1:], "wan")  # the video's windows of 1 and 5 frames
    encoders = CountingEncoders()
    seen = []

    def first_frame(pixels):
        seen.append(pixels.shape[0])
        return {"latents_image": encoders._pixels(pixels[:1].expand_as(pixels).contiguous()), "clip": torch.ones(257, 1280)}

    encoders.encode_image_condition, encoders.image_condition_id = first_frame, "i2v"
    cached, _ = build_cache(items, "wan", encoders)
    data = CachedDataset(cached, "wan")
    condition = data.model_image_condition(1)
    assert seen == [1, 5] and condition["latents_image"].shape == data.latent_shape(1) == (16, 2, 8, 4)
    assert condition["clip"].shape == (257, 1280)
    plain = CountingEncoders()  # image-to-video turned off: the items are encoded again, without it
    cached, _ = build_cache(items, "wan", plain)
    assert plain.pixel_calls == 2 and CachedDataset(cached, "wan").model_image_condition(1) == {}


def test_musubi_tuners_own_caches_are_used_while_no_encoder_checks_them(tmp_path):
    from musubi.files import atomic_save_file
    from musubi.data.text_embeddings import save_text_embedding

    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    cache.mkdir()
    _image(data / "photo.png", 64, 32)
    (data / "photo.txt").write_text("a photo")
    # What musubi-tuner's caching scripts write: bf16 latent named by the original size, no key of ours.
    latent = torch.randn(16, 1, 4, 8).to(torch.bfloat16)
    atomic_save_file({"latents_1x4x8_bfloat16": latent}, str(cache / "photo_0064x0032_wan.safetensors"),
                     {"architecture": "wan", "width": "64", "height": "32", "format_version": "1.0.1"})
    save_text_embedding(cache / "photo_wan_te.safetensors", TextEmbedding(torch.randn(4, 4096), None, "wan", {}), caption="a photo")
    spec = DatasetSpec(kind="image", directory=str(data), resolution=(48, 48), enable_bucket=True, cache_directory=str(cache))
    cached, report = build_cache(plan_items([spec], "wan"), "wan", Encoders())
    assert (report.reused_latents, report.reused_texts) == (1, 1)
    assert torch.equal(CachedDataset(cached, "wan").model_latent(0), latent)
    encoders = CountingEncoders()
    build_cache(plan_items([spec], "wan"), "wan", encoders)  # with encoders connected they are made anew
    assert (encoders.pixel_calls, encoders.text_calls) == (1, 1)


def test_jsonl_datasets_resolve_paths_next_to_the_file(tmp_path):
    (tmp_path / "img").mkdir()
    _image(tmp_path / "img" / "x.png", 32, 32)
    _image(tmp_path / "img" / "x_ref.png", 32, 32, seed=3)
    (tmp_path / "list.jsonl").write_text(
        '{"image_path": "img/x.png", "caption": " a cat ", "control_path": "img/x_ref.png"}\n\n')
    specs = _parse(f"""
        [[datasets]]
        image_jsonl_file = "{(tmp_path / 'list.jsonl').as_posix()}"
        cache_directory = "{(tmp_path / 'cache').as_posix()}"
    """)
    [item] = plan_items(specs, "flux")
    assert item.caption == "a cat" and item.controls == (str(tmp_path / "img" / "x_ref.png"),)
    (tmp_path / "list.jsonl").write_text('{"image_path": "img/missing.png", "caption": "x"}\n')
    with pytest.raises(MusubiError, match="line 1: img/missing.png does not exist"):
        plan_items(specs, "flux")
