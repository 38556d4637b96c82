"""Names a hostile API client gives to the writing nodes, inside a real ComfyUI: every node refuses
what would land outside ComfyUI's folders or fail in the file system, with one kind of message
(a MusubiError naming the node and the option), and creates nothing; leftovers of killed saves
are cleared on the next run."""

from __future__ import annotations

import os
import time

import pytest
import safetensors.torch
import torch
from PIL import Image

from comfy_server import Graph
from fixture_files import write_wan_lora_checkpoints
from tiny_checkpoints import ARCHS

pytestmark = pytest.mark.comfyui

ARCH = "wan21_t2v"
HOSTILE_NAMES = {
    "absolute": "/tmp/musubi_paths_probe/evil",
    "dot": ".",
    "dotdot": "../../musubi_paths_escape",
    "backslashes": "..\\..\\musubi_paths_escape",
    "drive": "C:\\musubi_paths_escape",
    "trailing slash": "dir/",
    "300 characters": "x" * 300,
    "NUL": "bad\x00name",
    "hidden": ".musubi-tmp-0123abcd-x",
}


def failure(comfy, graph: dict) -> dict:
    """The execution_error of a prompt that must fail, read from /history."""
    entry = comfy.wait(comfy.queue(graph), timeout=300)
    status = entry.get("status", {})
    assert status.get("status_str") == "error", status
    [error] = [data for kind, data in status["messages"] if kind == "execution_error"]
    return error


def assert_refused(error: dict, node: str, option: str, *phrases: str) -> str:
    message = error["exception_message"]
    assert error["exception_type"].endswith("MusubiError"), error["exception_type"]  # not a raw OSError
    assert message.startswith(f"{node}: {option} "), message
    assert "Write a name inside " in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


def snapshot(*folders) -> set:
    return {path for folder in folders for path in folder.rglob("*")}


def escape_targets(comfy) -> list:
    """Where the hostile names would land if they were not refused."""
    return [comfy.base_dir.parent / "musubi_paths_escape", comfy.base_dir / "musubi_paths_escape",
            comfy.base_dir / "models" / "musubi_paths_escape", "/tmp/musubi_paths_probe"]


def assert_nothing_escaped(comfy) -> None:
    for target in escape_targets(comfy):
        assert not os.path.lexists(target), target


# --- Training Dataset's cache folder --------------------------------------------------------------

@pytest.fixture(scope="module")
def one_image_folder(comfy):
    folder = comfy.input_dir / "paths_one_image"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (32, 32), (120, 30, 200)).save(folder / "a.png")
    (folder / "a.txt").write_text("a purple square")
    return folder


def dataset_graph(source: str, cache_folder: str) -> dict:
    g = Graph()
    dataset = g.add("MusubiDataset", source=source, architecture="wan", width=32, height=32, enable_bucket=False,
                    bucket_no_upscale=False, num_repeats=1, caption_extension=".txt", target_frames="1",
                    frame_extraction="head", frame_stride=1, frame_sample=1, max_frames=129, cache_folder=cache_folder,
                    reencode=False, image_to_video=False)
    g.add("PreviewAny", source=dataset[1])
    return g.to_dict()


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "backslashes", "drive", "NUL", "300 characters", "dot"])
def test_a_cache_folder_outside_the_output_folder_is_refused(comfy, one_image_folder, kind):
    before = snapshot(comfy.output_dir, comfy.input_dir)
    error = failure(comfy, dataset_graph("paths_one_image", HOSTILE_NAMES[kind]))
    assert_refused(error, "Training Dataset (images/videos)", "cache_folder", str(comfy.output_dir))
    assert snapshot(comfy.output_dir, comfy.input_dir) == before
    assert_nothing_escaped(comfy)


def test_an_absolute_cache_folder_is_refused_even_where_it_exists(comfy, one_image_folder, tmp_path):
    elsewhere = tmp_path / "cache_elsewhere"
    elsewhere.mkdir()
    error = failure(comfy, dataset_graph("paths_one_image", str(elsewhere)))
    assert_refused(error, "Training Dataset (images/videos)", "cache_folder", "is an absolute path")
    assert list(elsewhere.iterdir()) == []


def test_a_dataset_toml_caches_only_inside_comfyuis_folders(comfy, one_image_folder, tmp_path):
    outside = tmp_path / "toml_cache"
    toml = comfy.input_dir / "paths_outside_cache.toml"
    toml.write_text(f'[general]\nresolution = [32, 32]\n\n[[datasets]]\nimage_directory = "paths_one_image"\n'
                    f'cache_directory = "{outside.as_posix()}"\n')
    message = failure(comfy, dataset_graph(toml.name, ""))["exception_message"]
    assert message.startswith("Training Dataset (images/videos): ") and "[[datasets]] #1 caches into" in message, message
    assert "outside ComfyUI's output folder" in message and "any API client" in message and "cache_directory =" in message
    assert not outside.exists()

    # Without cache_directory the cache would go next to the images, here a folder outside ComfyUI.
    images = tmp_path / "images"
    images.mkdir()
    (images / "b.png").write_bytes((one_image_folder / "a.png").read_bytes())
    (images / "b.txt").write_text("b")
    toml.write_text(f'[general]\nresolution = [32, 32]\n\n[[datasets]]\nimage_directory = "{images.as_posix()}"\n')
    message = failure(comfy, dataset_graph(toml.name, ""))["exception_message"]
    assert "its image folder (no cache_directory given)" in message, message
    assert sorted(p.name for p in images.iterdir()) == ["b.png", "b.txt"]

    # Relative to the TOML, inside the input folder: the cache place is fine (the run then stops at
    # the missing VAE, after the check).
    toml.write_text('[general]\nresolution = [32, 32]\n\n[[datasets]]\nimage_directory = "paths_one_image"\n'
                    'cache_directory = "paths_caches/one"\n')
    message = failure(comfy, dataset_graph(toml.name, ""))["exception_message"]
    assert "outside ComfyUI" not in message and "VAE" in message, message


# --- Train LoRA's output_name ---------------------------------------------------------------------

def latent_file(comfy) -> str:
    tiny = ARCHS[ARCH]
    name = "paths_latents.latent"
    path = comfy.input_dir / name
    if not path.exists():
        latents = torch.randn((2, tiny.latent_channels, 1, 4, 4), generator=torch.Generator().manual_seed(0))
        safetensors.torch.save_file({"latent_tensor": latents, "latent_format_version_0": torch.tensor([])}, path)
    return name


def train_graph(comfy, tiny_model_file, text_embedding_file, output_name: str) -> dict:
    g = Graph()
    model = g.add("UNETLoader", unet_name=tiny_model_file(ARCH), weight_dtype="default")
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(ARCH), architecture=ARCHS[ARCH].family)
    latents = g.add("LoadLatent", latent=latent_file(comfy))
    train = g.add("MusubiTrainLoRA", model=model[0], latents=latents[0], conditioning=positive[0], steps=1,
                  batch_size=1, gradient_accumulation_steps=1, seed=1, output_name=output_name, resume="no",
                  mixed_precision="no", gradient_checkpointing=False)
    g.add("PreviewAny", source=train[3])
    return g.to_dict()


@pytest.mark.parametrize("kind, reason", [
    ("absolute", "is an absolute path"),
    ("dot", "'.' part"),
    ("dotdot", "'..' part"),
    ("backslashes", "'..' part"),
    ("drive", "drive letter"),
    ("trailing slash", "ends in '/'"),
    ("300 characters", "has a name of 300 bytes"),
    ("NUL", "control character '\\x00'"),
    ("hidden", "hidden name"),
])
def test_train_lora_refuses_bad_output_names(comfy, tiny_model_file, text_embedding_file, kind, reason):
    loras = comfy.models_dir("loras")
    before = snapshot(loras)
    error = failure(comfy, train_graph(comfy, tiny_model_file, text_embedding_file, HOSTILE_NAMES[kind]))
    assert_refused(error, "Train LoRA", "output_name", reason, str(loras), "'my_lora'")
    assert snapshot(loras) == before
    assert_nothing_escaped(comfy)


def test_train_lora_clears_what_a_killed_run_left(comfy, tiny_model_file, text_embedding_file):
    folder = comfy.models_dir("loras") / "paths_leftovers"
    folder.mkdir(exist_ok=True)
    old = {
        ".musubi-tmp-0123abcd-paths_leftovers-step000004.safetensors": "file",
        ".musubi-tmp-89abcdef-paths_leftovers-step000004-state": "folder",
        ".paths_leftovers.safetensors.deadbeef.tmp": "file",
        ".paths_leftovers-step000002-state.tmp-0badf00d": "folder",
        ".paths_leftovers-step000002-state.old-12345678": "folder",
    }
    kept = {".musubi-tmp-fedcba98-young.safetensors": "file", ".my_notes.tmp": "file", ".git": "folder"}
    for name, kind in {**old, **kept}.items():
        path = folder / name
        if kind == "folder":
            path.mkdir()
            (path / "inside.bin").write_bytes(b"half")
        else:
            path.write_bytes(b"half")
    past = time.time() - 3600
    for name in [*old, ".my_notes.tmp", ".git"]:
        for inner in (folder / name).rglob("*"):
            os.utime(inner, (past, past))
        os.utime(folder / name, (past, past))

    comfy.run(train_graph(comfy, tiny_model_file, text_embedding_file, "paths_leftovers"), timeout=600)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*kept, "paths_leftovers.safetensors"])


# --- the other savers -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, reason", [
    ("NUL", "control character '\\x00'"),
    ("300 characters", "has a name of 300 bytes"),
    ("absolute", "is an absolute path"),
    ("trailing slash", "ends in '/'"),
])
def test_save_text_embedding_refuses_bad_names(comfy, text_embedding_file, kind, reason):
    folder = comfy.models_dir("text_embeddings")
    before = snapshot(folder)
    g = Graph()
    loaded = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(ARCH), architecture=ARCHS[ARCH].family)
    g.add("MusubiSaveTextEmbedding", conditioning=loaded[0], architecture=ARCHS[ARCH].family,
          filename=HOSTILE_NAMES[kind], caption="")
    assert_refused(failure(comfy, g.to_dict()), "Save Text Embedding", "filename", reason, str(folder))
    assert snapshot(folder) == before
    assert_nothing_escaped(comfy)


@pytest.mark.parametrize("kind, reason", [("NUL", "control character"), ("300 characters", "300 bytes")])
def test_fp8_save_as_is_checked_before_quantizing(comfy, tiny_model_file, kind, reason):
    folder = comfy.models_dir("diffusion_models")
    before = snapshot(folder)
    g = Graph()
    model = g.add("MusubiLoadDiTFP8Scaled", unet_name=tiny_model_file(ARCH), fp8_format="e4m3fn", mode="block",
                  block_size=64, compute_dtype="default", architecture="auto", loras="", save_as=HOSTILE_NAMES[kind])
    g.add("PreviewAny", source=model[0])
    assert_refused(failure(comfy, g.to_dict()), "Load DiT (fp8 scaled)", "save_as", reason)
    assert snapshot(folder) == before


def test_ema_merge_globs_stay_inside_one_folder(comfy):
    loras = comfy.models_dir("loras")
    write_wan_lora_checkpoints(loras / "paths_glob", count=2)
    write_wan_lora_checkpoints(loras / "paths_glob" / "older", count=3)
    g = Graph()
    merge = g.add("MusubiPostHocEMAMerge", checkpoints="paths_glob/*.safetensors", output_name="paths_glob_ema/one_level",
                  mode="beta", beta=0.95, beta2=0.95, sigma_rel=0.2, order="as listed")
    g.add("PreviewAny", source=merge[1])
    report = comfy.run(g.to_dict())[str(merge)]["text"][0]
    assert report.count("step_") == 2, report  # not the three in older/

    g = Graph()
    merge = g.add("MusubiPostHocEMAMerge", checkpoints="paths_glob/**/*.safetensors", output_name="paths_glob_ema/all",
                  mode="beta", beta=0.95, beta2=0.95, sigma_rel=0.2, order="as listed")
    g.add("PreviewAny", source=merge[1])
    report = comfy.run(g.to_dict())[str(merge)]["text"][0]
    assert report.count("step_") == 5, report

    g = Graph()
    g.add("MusubiPostHocEMAMerge", checkpoints="paths_glob/*.safetensors", output_name="a\x00b",
          mode="beta", beta=0.95, beta2=0.95, sigma_rel=0.2, order="as listed")
    assert_refused(failure(comfy, g.to_dict()), "Post-Hoc EMA Merge", "output_name", "control character")


@pytest.mark.parametrize("kind, reason", [("NUL", "control character"), ("300 characters", "300 bytes"),
                                          ("dotdot", "'..' part")])
def test_calibrate_magcache_refuses_bad_names(comfy, tiny_model_file, text_embedding_file, kind, reason):
    folder = comfy.models_dir("magcache")
    before = snapshot(folder)
    g = Graph()
    model = g.add("UNETLoader", unet_name=tiny_model_file(ARCH), weight_dtype="default")
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(ARCH), architecture=ARCHS[ARCH].family)
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    g.add("MusubiCalibrateMagCache", model=model[0], positive=positive[0], negative=positive[0], latent_image=latent[0],
          seed=5, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0, filename=HOSTILE_NAMES[kind])
    assert_refused(failure(comfy, g.to_dict()), "Calibrate MagCache", "filename", reason, str(folder))
    assert snapshot(folder) == before
    assert_nothing_escaped(comfy)


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "NUL"])
def test_a_logging_dir_outside_the_output_folder_is_refused(comfy, kind):
    """The trainer writes TensorBoard logs there, so it follows the same rule as every written folder."""
    g = Graph()
    g.add("PreviewAny", source=g.add("MusubiCheckpointSettings", save_every_n_steps=0, save_last_n_checkpoints=0,
                                     save_state=True, lora_format="comfyui", save_precision="float32",
                                     log_with="tensorboard", logging_dir=HOSTILE_NAMES[kind])[0])
    assert_refused(failure(comfy, g.to_dict()), "Checkpoint + Logging Settings", "logging_dir", str(comfy.output_dir))
    assert_nothing_escaped(comfy)
