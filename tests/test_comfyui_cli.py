"""``python -m musubi train`` with ComfyUI's model code as a library, checked in a real ComfyUI.

Every architecture Train LoRA trains is trained from the shell on its tiny checkpoint and cache
folder (musubi-tuner's layout), and the LoRA is loaded by core LoraLoaderModelOnly in the server,
where it must change what KSampler makes. On tiny Wan the node and the command line, given the same
model, data, settings and seed, must write the same LoRA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from comfy_server import Graph
from musubi.data.cache import Encoders, build_cache, latent_tensor_key
from musubi.data.config import DatasetSpec
from musubi.data.plan import ARCHITECTURE_CODES, plan_items
from musubi.data.text_embeddings import TextEmbedding, save_text_embedding
from musubi.files import atomic_save_file
from tiny_checkpoints import ARCHS

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (dit, dit_high_noise); A14B trains its two experts as one run.
CASES = {
    "wan21_t2v": ("wan21_t2v", None),
    "wan21_i2v": ("wan21_i2v", None),
    "wan22_ti2v_5b": ("wan22_ti2v_5b", None),
    "wan22_a14b": ("wan22_a14b_low", "wan22_a14b_high"),
    "hunyuan_video": ("hunyuan_video", None),
    "flux_kontext": ("flux_kontext", None),  # with a reference latent per item, as Kontext trains
    "qwen_image": ("qwen_image", None),  # with two reference latents per item (Qwen-Image-Edit)
}
CONTROLS = {"flux_kontext": 1, "qwen_image": 2}


def write_cache(folder, arch: str, count: int = 2, seed: int = 0) -> str:
    """``count`` cached items for the tiny ``arch`` in musubi-tuner's layout (latents in the model's
    space, text caches of the family's text encoder widths, control latents for edit models, Wan
    i2v's image latents and CLIP-vision states)."""
    tiny = ARCHS[arch]
    code, full = ARCHITECTURE_CODES[tiny.family]
    shape = (tiny.latent_channels, 1, 4, 4) if tiny.latent_dims == 5 else (tiny.latent_channels, 4, 4)
    generator = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    for index in range(count):
        name = f"item{index}"
        latent = torch.randn(shape, generator=generator)
        tensors = {latent_tensor_key(latent): latent}
        controls = CONTROLS.get(arch, 0)
        for number in range(controls):
            control = torch.randn(shape, generator=generator)
            prefix = "latents_control" if controls == 1 else f"latents_control_{number}"
            tensors[latent_tensor_key(control, prefix)] = control
        if tiny.needs_clip_vision:
            given = torch.zeros((4, *shape[1:]))
            given[:, :1] = 1.0
            image = torch.cat([given, torch.randn(shape, generator=generator)])
            tensors[latent_tensor_key(image, "latents_image")] = image
            tensors["clip_float32"] = torch.randn(tiny.clip_vision_tokens, tiny.clip_vision_dim, generator=generator)
        atomic_save_file(tensors, os.path.join(folder, f"{name}_0032x0032_{code}.safetensors"),
                         {"architecture": full, "width": "32", "height": "32", "format_version": "1.0.1"})
        pooled = None if tiny.pooled_dim is None else torch.randn(tiny.pooled_dim, generator=generator)
        save_text_embedding(os.path.join(folder, f"{name}_{code}_te.safetensors"),
                            TextEmbedding(torch.randn(5, tiny.text_dim, generator=generator), pooled, tiny.family, {}),
                            caption=f"caption {index}")
    return str(folder)


def run_cli(comfy, cwd, *arguments, processes: int = 1) -> str:
    environment = {**os.environ, "COMFYUI_PATH": str(comfy.comfy_path), "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "2"}
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [sys.executable, *launcher, "-m", "musubi", "train", *arguments]
    completed = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=1500)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    return completed.stdout


def training_options(output_dir, output_name, steps=2, seed=3):
    return ["--output_dir", str(output_dir), "--output_name", output_name, "--max_train_steps", str(steps),
            "--network_dim", "8", "--network_alpha", "8", "--learning_rate", "1e-2", "--max_grad_norm", "0",
            "--timestep_sampling", "uniform", "--seed", str(seed), "--no-save_state"]


def sampled_with_lora(comfy, arch, tiny_model_file, text_embedding_file, lora_name, prefix):
    """(base, with the LoRA) latents of one KSampler step from the same noise."""
    g = Graph()
    base = g.add("UNETLoader", unet_name=tiny_model_file(arch), weight_dtype="default")
    patched = g.add("LoraLoaderModelOnly", model=base[0], lora_name=lora_name, strength_model=1.0)
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(arch), architecture=ARCHS[arch].family)
    latent = g.add("EmptyLatentImage", width=32, height=32, batch_size=1)
    for name, source in (("base", base), ("lora", patched)):
        sampled = g.add("KSampler", model=source[0], positive=positive[0], negative=positive[0], latent_image=latent[0],
                        seed=0, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
        g.add("SaveLatent", samples=sampled[0], filename_prefix=f"{prefix}/{name}")
    comfy.run(g.to_dict(), timeout=900)
    return comfy.saved_latent(prefix, "base"), comfy.saved_latent(prefix, "lora")


@pytest.mark.parametrize("case", list(CASES))
def test_every_architecture_trains_from_the_shell_and_its_lora_works_in_comfyui(comfy, case, tiny_model_file,
                                                                                text_embedding_file, tmp_path):
    dit, high_noise = CASES[case]
    cache = write_cache(tmp_path / "cache", dit)
    name = f"cli_{case}"
    arguments = ["--model", "comfyui", "--dit", str(comfy.models_dir("diffusion_models") / tiny_model_file(dit)),
                 "--data_dir", cache, *training_options(comfy.models_dir("loras") / name, name)]
    if high_noise:
        arguments += ["--dit_high_noise", str(comfy.models_dir("diffusion_models") / tiny_model_file(high_noise)),
                      "--timestep_boundary", "0.5"]  # both experts train within two steps of uniform noise levels
    output = run_cli(comfy, tmp_path, *arguments)
    assert "Done: 2 steps" in output, output
    assert "data: 2 items" in output, output
    if high_noise:
        assert "experts split at t = 0.5" in output, output
    lora = safetensors.torch.load_file(comfy.models_dir("loras") / name / f"{name}.safetensors")
    assert all(key.startswith("diffusion_model.") for key in lora)
    assert any(float(value.abs().max()) > 0 for key, value in lora.items() if key.endswith("lora_up.weight"))

    for arch in filter(None, (dit, high_noise)):
        base, patched = sampled_with_lora(comfy, arch, tiny_model_file, text_embedding_file, f"{name}/{name}.safetensors",
                                          f"cli_{arch}")
        assert (base - patched).abs().max() > 1e-4, f"the LoRA trained from the shell did not change {arch}'s sampling"


def test_fp8_scaled_from_the_shell_trains_on_block_scaled_weights(comfy, tiny_model_file, text_embedding_file, tmp_path):
    cache = write_cache(tmp_path / "cache", "wan21_t2v")
    name = "cli_fp8"
    output = run_cli(comfy, tmp_path, "--model", "wan", "--fp8_scaled",
                     "--dit", str(comfy.models_dir("diffusion_models") / tiny_model_file("wan21_t2v")),
                     "--data_dir", cache, *training_options(comfy.models_dir("loras") / name, name))
    assert "block-scaled fp8" in output and "Done: 2 steps" in output, output
    base, patched = sampled_with_lora(comfy, "wan21_t2v", tiny_model_file, text_embedding_file, f"{name}/{name}.safetensors",
                                      "cli_fp8")
    assert (base - patched).abs().max() > 1e-4


# --- the node and the command line train the same LoRA --------------------------------------------


def _stand_in_encoders() -> Encoders:
    """A stand-in Wan VAE (8×8 average pool, channels repeated to 16) and text encoder, to make the
    cache both trainers read (the node reuses a valid cache without any encoder connected)."""

    def pixels(frames: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool3d(frames.permute(3, 0, 1, 2).unsqueeze(0), (1, 8, 8))[0][:, ::4]
        return torch.cat([pooled] * 6)[:16] * 2.0 - 1.0

    def text(caption: str) -> TextEmbedding:
        generator = torch.Generator().manual_seed(sum(map(ord, caption)))
        return TextEmbedding(torch.randn(4 + len(caption) % 3, 4096, generator=generator), None, None, {})

    return Encoders(encode_pixels=pixels, vae_id="stand-in-vae", encode_text=text, text_encoder_id="stand-in-te")


def test_the_node_and_the_command_line_train_the_same_lora_on_tiny_wan(comfy, tiny_model_file, tmp_path):
    source = comfy.input_dir / "cli_same"
    source.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(source / f"photo{index}.png")
        (source / f"photo{index}.txt").write_text(f"a photo number {index}")
    cache = comfy.output_dir / "cli_same_cache"
    spec = DatasetSpec(kind="image", directory=str(source), resolution=(32, 32), enable_bucket=True, cache_directory=str(cache))
    build_cache(plan_items([spec], "wan"), "wan", _stand_in_encoders())
    steps, seed, repeats = 4, 11, 2

    g = Graph()
    model = g.add("UNETLoader", unet_name=tiny_model_file("wan21_t2v"), weight_dtype="default")
    dataset = g.add("MusubiDataset", source="cli_same", architecture="wan", width=32, height=32, enable_bucket=True,
                    bucket_no_upscale=False, num_repeats=repeats, caption_extension=".txt", target_frames="1",
                    frame_extraction="head", frame_stride=1, frame_sample=1, max_frames=129,
                    cache_folder="cli_same_cache", reencode=False, image_to_video=False)
    network = g.add("MusubiLoRANetworkSettings", network_dim=8, network_alpha=4.0, network_dropout=0.0, rank_dropout=0.0,
                    module_dropout=0.0, loraplus_lr_ratio=0.0, exclude_patterns="", include_patterns="")
    optimizer = g.add("MusubiOptimizerSettings", optimizer_type="AdamW", custom_optimizer="", learning_rate=5e-3,
                      optimizer_args="weight_decay=0.01", lr_scheduler="cosine", lr_warmup_steps="1",
                      lr_scheduler_num_cycles=1.0, lr_scheduler_power=1.0, lr_scheduler_min_lr_ratio=0.0,
                      lr_scheduler_args="", max_grad_norm=1.0)
    timesteps = g.add("MusubiTimestepSettings", timestep_sampling="shift", discrete_flow_shift=3.0, sigmoid_scale=1.0,
                      logit_mean=0.0, logit_std=1.0, weighting_scheme="none", mode_scale=1.29, min_timestep=0,
                      max_timestep=1000, preserve_distribution_shape=False, num_timestep_buckets=0)
    checkpoints = g.add("MusubiCheckpointSettings", save_every_n_steps=0, save_last_n_checkpoints=0, save_state=False,
                        lora_format="comfyui", save_precision="float32", log_with="none", logging_dir="")
    train = g.add("MusubiTrainLoRA", model=model[0], dataset=dataset[0], steps=steps, batch_size=2,
                  gradient_accumulation_steps=1, seed=seed, output_name="same_node", resume="no", mixed_precision="no",
                  gradient_checkpointing=False, network_settings=network[0], optimizer_settings=optimizer[0],
                  timestep_settings=timesteps[0], checkpoint_settings=checkpoints[0])
    g.add("PreviewAny", source=train[3])
    comfy.run(g.to_dict(), timeout=900)
    node_lora = safetensors.torch.load_file(comfy.models_dir("loras") / "same_node" / "same_node.safetensors")

    output = run_cli(comfy, tmp_path, "--model", "comfyui", "--dit", str(comfy.models_dir("diffusion_models") / tiny_model_file("wan21_t2v")),
                     "--data_dir", str(cache), "--num_repeats", str(repeats), "--output_dir", str(tmp_path / "cli"),
                     "--output_name", "same_cli", "--max_train_steps", str(steps), "--batch_size", "2", "--seed", str(seed),
                     "--network_dim", "8", "--network_alpha", "4", "--learning_rate", "5e-3", "--optimizer_type", "AdamW",
                     "--optimizer_args", "weight_decay=0.01", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
                     "--max_grad_norm", "1.0", "--timestep_sampling", "shift", "--discrete_flow_shift", "3.0",
                     "--no-save_state")
    assert "data: 6 items" in output, output
    cli_lora = safetensors.torch.load_file(tmp_path / "cli" / "same_cli.safetensors")
    assert set(cli_lora) == set(node_lora)
    assert any(float(value.abs().max()) > 1e-4 for key, value in node_lora.items() if key.endswith("lora_up.weight"))
    for key, value in node_lora.items():
        torch.testing.assert_close(cli_lora[key], value, rtol=0, atol=0, msg=f"{key} differs between the node and the shell")


def test_two_processes_of_batch_1_train_what_one_process_of_batch_2_trains_on_tiny_wan(comfy, tiny_model_file, tmp_path):
    cache = write_cache(tmp_path / "cache", "wan21_t2v", count=3)  # batches of 2 and 1 rows: one process idles in the second
    dit = str(comfy.models_dir("diffusion_models") / tiny_model_file("wan21_t2v"))
    common = ["--model", "comfyui", "--dit", dit, "--data_dir", cache, "--timestep_sampling", "sigmoid"]
    run_cli(comfy, tmp_path, *common, *training_options(tmp_path / "one", "one", steps=4), "--batch_size", "2")
    two = run_cli(comfy, tmp_path, *common, *training_options(tmp_path / "two", "two", steps=4), "--batch_size", "1",
                  processes=2)
    assert two.count("Training to step 4.") == 1 and two.count("data: 3 items") == 1, two
    one_lora = safetensors.torch.load_file(tmp_path / "one" / "one.safetensors")
    two_lora = safetensors.torch.load_file(tmp_path / "two" / "two.safetensors")
    # Equal up to float rounding (one batched matmul against two single ones; Adam amplifies such differences
    # in elements whose gradient is near zero): compared as the relative error of all weights together.
    difference = torch.cat([(two_lora[key] - value).flatten() for key, value in one_lora.items()])
    reference = torch.cat([value.flatten() for value in one_lora.values()])
    assert float(difference.norm() / reference.norm()) < 1e-4, float(difference.norm() / reference.norm())
    assert os.listdir(tmp_path / "two") == ["two.safetensors"]


def test_a_model_of_another_family_than_the_caches_is_refused_before_it_loads(comfy, tiny_model_file, tmp_path):
    cache = write_cache(tmp_path / "cache", "hunyuan_video")
    wan = str(comfy.models_dir("diffusion_models") / tiny_model_file("wan21_t2v"))
    environment = {**os.environ, "COMFYUI_PATH": str(comfy.comfy_path), "PYTHONPATH": REPO_ROOT}
    for model, message in (("comfyui", "is a Wan 2.1/2.2 checkpoint, but the caches hold HunyuanVideo latents"),
                           ("flux", "the caches hold HunyuanVideo latents, not FLUX.1 Kontext")):
        completed = subprocess.run([sys.executable, "-m", "musubi", "train", "--model", model, "--dit", wan, "--data_dir", cache,
                                    "--output_dir", str(tmp_path / "out"), "--learning_rate", "1e-3"],
                                   cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
        assert completed.returncode == 2 and message in completed.stderr, completed.stderr[-3000:]
