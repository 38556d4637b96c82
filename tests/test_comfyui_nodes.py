"""The pack's nodes through POST /prompt on a real ComfyUI server."""

from __future__ import annotations

import math
import os

import pytest
import safetensors.torch
import torch
from PIL import Image

from comfy_server import Graph
from fixture_files import write_wan_lora_checkpoints

pytestmark = pytest.mark.comfyui


def _text_of(outputs: dict, node) -> str:
    return "".join(outputs[str(node)]["text"])


# --- Timestep Distribution Preview ------------------------------------------------------

def test_timestep_preview_plots_the_configured_distribution(comfy):
    g = Graph()
    settings = g.add("MusubiTimestepSettings", timestep_sampling="shift", discrete_flow_shift=3.0,
                     sigmoid_scale=1.0, logit_mean=0.0, logit_std=1.0, weighting_scheme="none",
                     mode_scale=1.29, min_timestep=0, max_timestep=1000,
                     preserve_distribution_shape=False, num_timestep_buckets=0)
    preview = g.add("MusubiTimestepDistributionPreview", timestep_settings=settings[0],
                    latent_width=64, latent_height=64, num_samples=20000, seed=3)
    text = g.add("PreviewAny", source=preview[1])
    outputs = comfy.run(g.to_dict())

    [image] = outputs[str(preview)]["images"]
    with Image.open(comfy.base_dir / image["type"] / image["subfolder"] / image["filename"]) as png:
        assert png.size[0] >= 512 and png.size[1] >= 384
        assert len(set(png.convert("L").tobytes())) > 8, "the plot is blank"

    lines = _text_of(outputs, text).splitlines()
    assert lines[0].startswith("Sampled timesteps: max count=")
    bars = [line.split(": ", 1)[1].count("#") for line in lines[1:41]]
    # shift 3 moves mass to high noise: the upper half holds clearly more draws.
    assert sum(bars[20:]) > 1.5 * sum(bars[:20])


def test_timestep_settings_reject_an_inverted_range(comfy):
    g = Graph()
    settings = g.add("MusubiTimestepSettings", timestep_sampling="uniform", discrete_flow_shift=1.0,
                     sigmoid_scale=1.0, logit_mean=0.0, logit_std=1.0, weighting_scheme="none",
                     mode_scale=1.29, min_timestep=800, max_timestep=200,
                     preserve_distribution_shape=False, num_timestep_buckets=0)
    g.add("MusubiTimestepDistributionPreview", timestep_settings=settings[0],
          latent_width=64, latent_height=64, num_samples=1000, seed=0)
    error = comfy.run_error(g.to_dict())
    assert "MusubiTimestepSettings" in error and "min_timestep" in error


# --- Post-Hoc EMA Merge -------------------------------------------------------------------

def test_ema_merge_writes_weights_and_feeds_core_lora_loader(comfy, tiny_model_file, text_embedding_file):
    loras = comfy.models_dir("loras")
    paths = write_wan_lora_checkpoints(loras / "run_a", count=3)

    g = Graph()
    merge = g.add("MusubiPostHocEMAMerge", checkpoints="run_a/*.safetensors", output_name="ema/run_a",
                  mode="beta", beta=0.5, beta2=0.5, sigma_rel=0.2, order="modified time")
    g.add("PreviewAny", source=merge[1])
    model = g.add("UNETLoader", unet_name=tiny_model_file("wan21_t2v"), weight_dtype="default")
    patched = g.add("LoraModelLoader", model=model[0], lora=merge[0], strength_model=1.0)
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file("wan21_t2v"), architecture="wan")
    latent = g.add("EmptyHunyuanLatentVideo", width=32, height=32, length=1, batch_size=1)
    for name, source in (("plain", model), ("lora", patched)):
        sampled = g.add("KSampler", model=source[0], positive=positive[0], negative=positive[0],
                        latent_image=latent[0], seed=0, steps=1, cfg=1.0, sampler_name="euler",
                        scheduler="simple", denoise=1.0)
        g.add("SaveLatent", samples=sampled[0], filename_prefix=f"latents/ema_{name}")
    outputs = comfy.run(g.to_dict())

    written = loras / "ema" / "run_a.safetensors"
    assert written.is_file()
    # beta 0.5 over three files: weights 0.25, 0.25, 0.5 (spec: w0 = β², w1 = (1−β)β, w2 = 1−β).
    report = outputs[str(merge)]["text"][0]
    assert [float(line.split()[0]) for line in report.splitlines()[1:4]] == [0.25, 0.25, 0.5]
    merged = safetensors.torch.load_file(written)
    key = "diffusion_model.blocks.0.self_attn.q.lora_up.weight"
    inputs = [safetensors.torch.load_file(p)[key].float() for p in paths]
    expected = inputs[0] * 0.25 + inputs[1] * 0.25 + inputs[2] * 0.5
    torch.testing.assert_close(merged[key].float(), expected, rtol=1e-2, atol=1e-2)

    plain = safetensors.torch.load_file(next((comfy.output_dir / "latents").glob("ema_plain_*.latent")))["latent_tensor"]
    with_lora = safetensors.torch.load_file(next((comfy.output_dir / "latents").glob("ema_lora_*.latent")))["latent_tensor"]
    assert (plain - with_lora).abs().max() > 1e-3, "the merged LoRA had no effect through LoraModelLoader"


def test_ema_merge_never_overwrites_and_reruns_when_checkpoints_change(comfy):
    loras = comfy.models_dir("loras")
    paths = write_wan_lora_checkpoints(loras / "run_b", count=2)
    g = Graph()
    merge = g.add("MusubiPostHocEMAMerge", checkpoints="run_b/step_000.safetensors\nrun_b/step_001.safetensors",
                  output_name="ema/run_b", mode="sigma_rel", beta=0.95, beta2=0.95, sigma_rel=0.29,
                  order="as listed")
    g.add("PreviewAny", source=merge[1])
    first = comfy.run(g.to_dict())
    assert (loras / "ema" / "run_b.safetensors").is_file()

    comfy.run(g.to_dict())  # nothing changed: cached, no second file
    assert not (loras / "ema" / "run_b_00001.safetensors").exists()

    os.utime(paths[1], (1_800_000_000, 1_800_000_000))
    second = comfy.run(g.to_dict())
    assert (loras / "ema" / "run_b_00001.safetensors").is_file()
    assert first != second
    # sigma_rel 0.29 lies beyond musubi's crash point (1/√12): γ < 0, and the oldest file keeps
    # its weight w0 = 1/2^(γ+1) (> 1/2 since γ < 0); recover γ from w0 and check its width.
    weights = [float(line.split()[0]) for line in second[str(merge)]["text"][0].splitlines()[1:3]]
    assert abs(sum(weights) - 1) < 1e-3 and weights[0] > 0.5
    gamma = math.log2(1 / weights[0]) - 1
    assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(0.29, abs=2e-3)


@pytest.mark.parametrize(
    "checkpoints, output_name, expected",
    [
        ("run_c/step_000.safetensors", "ema/one", "at least two"),
        ("run_c/nothing_*.safetensors", "ema/none", "matches no file"),
        ("run_c/*.safetensors", "../escape", "inside"),
    ],
)
def test_ema_merge_bad_input_is_explained_and_writes_nothing(comfy, checkpoints, output_name, expected):
    loras = comfy.models_dir("loras")
    write_wan_lora_checkpoints(loras / "run_c", count=2)
    before = sorted(p for p in loras.rglob("*") if p.is_file())
    g = Graph()
    g.add("MusubiPostHocEMAMerge", checkpoints=checkpoints, output_name=output_name, mode="beta",
          beta=0.95, beta2=0.95, sigma_rel=0.2, order="modified time")
    error = comfy.run_error(g.to_dict())
    assert expected in error
    assert sorted(p for p in loras.rglob("*") if p.is_file()) == before
    assert not (comfy.base_dir / "models" / "escape.safetensors").exists()


# --- Text embeddings ----------------------------------------------------------------------

def test_saved_text_embedding_loads_back_identically(comfy, text_embedding_file):
    g = Graph()
    loaded = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file("hunyuan_video"), architecture="hunyuan_video")
    saved = g.add("MusubiSaveTextEmbedding", conditioning=loaded[0], architecture="hunyuan_video",
                  filename="roundtrip/hv", caption="a cat")
    g.add("PreviewAny", source=saved[0])
    outputs = comfy.run(g.to_dict())
    path = outputs[str(saved)]["text"][0]
    assert path.endswith("roundtrip/hv.safetensors") and os.path.isfile(path)

    from musubi.data.text_embeddings import load_text_embedding

    original = load_text_embedding(comfy.models_dir("text_embeddings") / text_embedding_file("hunyuan_video"))
    again = load_text_embedding(path)
    torch.testing.assert_close(again.context.float(), original.context.float())
    torch.testing.assert_close(again.pooled.float(), original.pooled.float())


def test_text_embedding_of_the_wrong_width_is_refused(comfy, text_embedding_file):
    g = Graph()
    g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file("qwen_image"), architecture="wan")
    g.add("PreviewAny", source=["1", 0])
    error = comfy.run_error(g.to_dict())
    assert "3584" in error and "4096" in error
