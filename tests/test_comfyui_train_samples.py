"""Samples during training inside a real ComfyUI: Train LoRA samples its prompts with the LoRA of
that step through ComfyUI's sampler, and the result equals core KSampler + LoraLoaderModelOnly on
the checkpoint saved at that step; sampling never changes the trained weights."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import safetensors.torch
from comfy_server import Graph
from PIL import Image
from test_comfyui_dataset import wan_vae  # noqa: F401 — the tiny real-layout Wan 2.1 VAE fixture
from test_comfyui_train import _training_graph
from tiny_checkpoints import ARCHS

pytestmark = pytest.mark.comfyui

SAMPLE = {"width": 32, "height": 32, "length": 1, "steps": 3, "cfg": 2.0, "sampler_name": "euler",
          "scheduler": "simple", "seed": 11}


def _samples_node(g, positive, vae, every_n_steps=2, at_checkpoints=False, at_start=False, **options):
    settings = {**SAMPLE, **options}
    return g.add("MusubiTrainingSamples", positive=positive, vae=vae, every_n_steps=every_n_steps,
                 at_checkpoints=at_checkpoints, at_start=at_start, **settings)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_wan_samples_equal_core_ksampler_on_the_saved_checkpoint_and_leave_training_unchanged(
        comfy, tiny_model_file, text_embedding_file, wan_vae):  # noqa: F811
    arch, steps = "wan21_t2v", 4
    g, _model, positive, train = _training_graph(comfy, arch, tiny_model_file, text_embedding_file, steps=steps,
                                                output_name="samples_on", save_every=2)
    vae = g.add("VAELoader", vae_name=wan_vae)
    samples = _samples_node(g, positive[0], vae[0])
    g.nodes[str(train)]["inputs"]["samples"] = samples[0]
    g.add("SaveImage", images=train[5], filename_prefix="samples_on/output")
    outputs = comfy.run(g.to_dict(), timeout=900)
    summary = outputs[str(train)]["text"][0]
    assert re.search(r"time: training [\d.]+ s, sampling [\d.]+ s", summary), summary
    folder = comfy.models_dir("loras") / "samples_on" / "samples"
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["samples_on-step000002-p1.png", "samples_on-step000004-p1.png"]
    assert all(name in summary for name in files)
    [output_png] = (comfy.output_dir / "samples_on").glob("output_*.png")
    assert np.array_equal(_pixels(output_png), _pixels(folder / files[-1]))  # the output holds the newest sample

    # Core: the step-2 checkpoint loaded by LoraLoaderModelOnly, KSampler at the same seed, VAE Decode.
    g = Graph()
    base = g.add("UNETLoader", unet_name=tiny_model_file(arch), weight_dtype="default")
    cond = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(arch), architecture=ARCHS[arch].family)
    negative = g.add("ConditioningZeroOut", conditioning=cond[0])
    latent = g.add("EmptyHunyuanLatentVideo", width=32, height=32, length=1, batch_size=1)
    core_vae = g.add("VAELoader", vae_name=wan_vae)
    for step in (2, 4):
        lora = g.add("LoraLoaderModelOnly", model=base[0], lora_name=f"samples_on/samples_on-step{step:06d}.safetensors",
                     strength_model=1.0)
        sampled = g.add("KSampler", model=lora[0], positive=cond[0], negative=negative[0], latent_image=latent[0],
                        seed=SAMPLE["seed"], steps=SAMPLE["steps"], cfg=SAMPLE["cfg"], sampler_name="euler",
                        scheduler="simple", denoise=1.0)
        decoded = g.add("VAEDecode", samples=sampled[0], vae=core_vae[0])
        g.add("SaveImage", images=decoded[0], filename_prefix=f"samples_core/step{step}")
    comfy.run(g.to_dict(), timeout=600)
    core = {step: _pixels(next((comfy.output_dir / "samples_core").glob(f"step{step}_*.png"))) for step in (2, 4)}
    ours = {step: _pixels(folder / f"samples_on-step{step:06d}-p1.png") for step in (2, 4)}
    for step in (2, 4):
        assert np.abs(core[step] - ours[step]).max() <= 2, f"step {step}: the training sample differs from core KSampler"
    # The comparison can tell the steps apart: the LoRA of step 4 samples visibly differently.
    assert np.abs(core[2] - core[4]).max() > 8

    # The same run without samples trains bit-identical weights.
    g, *_ = _training_graph(comfy, arch, tiny_model_file, text_embedding_file, steps=steps, output_name="samples_off",
                            save_every=2)
    comfy.run(g.to_dict(), timeout=900)
    with_samples = safetensors.torch.load_file(comfy.models_dir("loras") / "samples_on" / "samples_on.safetensors")
    without = safetensors.torch.load_file(comfy.models_dir("loras") / "samples_off" / "samples_off.safetensors")
    assert with_samples.keys() == without.keys()
    for key in with_samples:
        assert (with_samples[key] == without[key]).all(), key


def _frames(path) -> tuple[int, tuple[int, int]]:
    with Image.open(path) as picture:
        return getattr(picture, "n_frames", 1), picture.size


@pytest.mark.parametrize("arch, length", [("wan21_i2v", 5), ("hunyuan_video", 5),
                                          pytest.param("qwen_image", 1, marks=pytest.mark.slow)])
def test_every_family_samples_at_the_start_and_at_checkpoints(comfy, tiny_model_file, text_embedding_file, wan_vae,  # noqa: F811
                                                              arch, length):
    # The tiny Wan 2.1 VAE decodes every 16-channel video latent (Qwen-Image's own VAE is Wan 2.1's).
    name = f"samples_{arch}"
    g, _model, positive, train = _training_graph(comfy, arch, tiny_model_file, text_embedding_file, steps=1,
                                                output_name=name)
    vae = g.add("VAELoader", vae_name=wan_vae)
    samples = _samples_node(g, positive[0], vae[0], every_n_steps=0, at_checkpoints=True, at_start=True, steps=2,
                            length=length, cfg=1.0)
    g.nodes[str(train)]["inputs"]["samples"] = samples[0]
    outputs = comfy.run(g.to_dict(), timeout=900)
    folder = comfy.models_dir("loras") / name / "samples"
    extension = "webp" if length > 1 else "png"
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"{name}-step000000-p1.{extension}", f"{name}-step000001-p1.{extension}"]
    for file in files:
        assert _frames(folder / file) == (length, (32, 32))
    assert "sampling" in outputs[str(train)]["text"][0]


def test_wan22_a14b_samples_switch_experts_like_two_ksampler_advanced(comfy, tiny_model_file, text_embedding_file,
                                                                       wan_vae):  # noqa: F811
    g, _low, positive, train = _training_graph(comfy, "wan22_a14b_low", tiny_model_file, text_embedding_file, steps=2,
                                              output_name="samples_a14b", batch_size=2, latent_count=4)
    high = g.add("UNETLoader", unet_name=tiny_model_file("wan22_a14b_high"), weight_dtype="default")
    vae = g.add("VAELoader", vae_name=wan_vae)
    samples = _samples_node(g, positive[0], vae[0], every_n_steps=0, at_checkpoints=True, steps=4)
    g.nodes[str(train)]["inputs"].update(model_high_noise=high[0], timestep_boundary=0.9, samples=samples[0])
    comfy.run(g.to_dict(), timeout=900)
    ours = _pixels(comfy.models_dir("loras") / "samples_a14b" / "samples" / "samples_a14b-step000002-p1.png")

    # Wan's shift 8 and the simple schedule give noise levels 1, 0.96, 0.89, 0.73 for 4 steps: below
    # the boundary 0.9 from step 2, so the high-noise expert runs steps 0–2 and the low-noise one 2–4.
    g = Graph()
    cond = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file("wan22_a14b_low"), architecture="wan")
    negative = g.add("ConditioningZeroOut", conditioning=cond[0])
    latent = g.add("EmptyHunyuanLatentVideo", width=32, height=32, length=1, batch_size=1)
    experts = {}
    for expert in ("high", "low"):
        base = g.add("UNETLoader", unet_name=tiny_model_file(f"wan22_a14b_{expert}"), weight_dtype="default")
        experts[expert] = g.add("LoraLoaderModelOnly", model=base[0], lora_name="samples_a14b/samples_a14b.safetensors",
                                strength_model=1.0)
    common = {"positive": cond[0], "negative": negative[0], "noise_seed": SAMPLE["seed"], "steps": 4, "cfg": SAMPLE["cfg"],
              "sampler_name": "euler", "scheduler": "simple"}
    first = g.add("KSamplerAdvanced", model=experts["high"][0], latent_image=latent[0], add_noise="enable", start_at_step=0,
                  end_at_step=2, return_with_leftover_noise="enable", **common)
    second = g.add("KSamplerAdvanced", model=experts["low"][0], latent_image=first[0], add_noise="disable", start_at_step=2,
                   end_at_step=10000, return_with_leftover_noise="disable", **common)
    decoded = g.add("VAEDecode", samples=second[0], vae=g.add("VAELoader", vae_name=wan_vae)[0])
    g.add("SaveImage", images=decoded[0], filename_prefix="samples_a14b_core/pair")
    only_low = g.add("KSampler", model=experts["low"][0], latent_image=latent[0], seed=SAMPLE["seed"], denoise=1.0,
                     **{key: value for key, value in common.items() if key != "noise_seed"})
    low_decoded = g.add("VAEDecode", samples=only_low[0], vae=g.add("VAELoader", vae_name=wan_vae)[0])
    g.add("SaveImage", images=low_decoded[0], filename_prefix="samples_a14b_core/low")
    comfy.run(g.to_dict(), timeout=600)
    core = _pixels(next((comfy.output_dir / "samples_a14b_core").glob("pair_*.png")))
    low_only = _pixels(next((comfy.output_dir / "samples_a14b_core").glob("low_*.png")))
    assert np.abs(core - ours).max() <= 2
    assert np.abs(low_only - ours).max() > 8  # the high-noise expert really took part


def test_framepack_samples_a_section_from_the_start_image(comfy, tiny_model_file, text_embedding_file, wan_vae):  # noqa: F811
    from test_comfyui_framepack_train import _graph
    from test_comfyui_framepack_train import _latent_file as framepack_latent

    g, _model, positive, train = _graph(comfy, tiny_model_file, text_embedding_file, output_name="samples_framepack",
                                       steps=1, batch_size=1)
    start = g.add("LoadLatent", latent=framepack_latent(comfy, "framepack_start_1.latent", 1, seed=5))
    vae = g.add("VAELoader", vae_name=wan_vae)
    samples = _samples_node(g, positive[0], vae[0], every_n_steps=1, at_checkpoints=False, steps=2, cfg=1.0,
                            latent=start[0])
    g.nodes[str(train)]["inputs"]["samples"] = samples[0]
    comfy.run(g.to_dict(), timeout=900)
    [file] = (comfy.models_dir("loras") / "samples_framepack" / "samples").iterdir()
    assert file.name == "samples_framepack-step000001-p1.webp"
    frames, size = _frames(file)
    assert size == (32, 32) and frames == 1 + 9 * 4  # the start frame and one section of 9 latent frames


def test_a_vae_or_size_that_does_not_fit_is_named_before_training(comfy, tiny_model_file, text_embedding_file,
                                                                 wan_vae):  # noqa: F811
    g, _model, positive, train = _training_graph(comfy, "wan22_ti2v_5b", tiny_model_file, text_embedding_file, steps=1,
                                                output_name="samples_bad_vae")
    vae = g.add("VAELoader", vae_name=wan_vae)
    g.nodes[str(train)]["inputs"]["samples"] = _samples_node(g, positive[0], vae[0])[0]
    error = comfy.run_error(g.to_dict())
    assert "Training Samples" in error and "VAE" in error and "48-channel" in error, error

    g, _model, positive, train = _training_graph(comfy, "wan21_t2v", tiny_model_file, text_embedding_file, steps=1,
                                                output_name="samples_bad_width")
    vae = g.add("VAELoader", vae_name=wan_vae)
    g.nodes[str(train)]["inputs"]["samples"] = _samples_node(g, positive[0], vae[0], width=40)[0]
    error = comfy.run_error(g.to_dict())
    assert "Training Samples" in error and "width 40" in error and "multiple of 16" in error, error
    assert not (comfy.models_dir("loras") / "samples_bad_width").exists()


def test_cancel_while_sampling_stops_with_a_resumable_checkpoint(comfy, tiny_model_file, text_embedding_file,
                                                                 wan_vae):  # noqa: F811
    # A sample of 1000 steps after step 1 takes many seconds: Cancel lands inside ComfyUI's sampler.
    g, _model, positive, train = _training_graph(comfy, "wan21_t2v", tiny_model_file, text_embedding_file, steps=3,
                                                output_name="samples_cancel")
    vae = g.add("VAELoader", vae_name=wan_vae)
    g.nodes[str(train)]["inputs"]["samples"] = _samples_node(g, positive[0], vae[0], every_n_steps=1, steps=1000,
                                                                width=64, height=64, length=5)[0]
    with comfy.listen() as listener:
        prompt_id = comfy.queue_from(listener.client_id, g.to_dict())
        listener.wait_for(lambda kind, data: kind == "musubi.train.progress" and data.get("step") == 1, timeout=300,
                          what="step 1")
        time.sleep(1.0)
        comfy.interrupt()
        entry = comfy.wait(prompt_id, timeout=120)
        stopped = listener.wait_for(lambda kind, data: kind == "musubi.train.status" and data.get("kind") == "stopped",
                                    timeout=30, what="the stopped message")
    assert entry["status"]["status_str"] == "error"  # an interrupted prompt
    assert stopped["text"].startswith("Stopped at step 1 on request; resume from "), stopped["text"]
    state = comfy.output_dir / "musubi_training_states" / "samples_cancel" / "samples_cancel-step000001-state"
    assert state.is_dir(), "Cancel during sampling left no resumable state"
    assert not (comfy.models_dir("loras") / "samples_cancel" / "samples").exists()  # the sample never finished

    # Resumed without samples: it continues from step 1.
    g, *_ = _training_graph(comfy, "wan21_t2v", tiny_model_file, text_embedding_file, steps=3,
                            output_name="samples_cancel", resume="latest")
    outputs = comfy.run(g.to_dict(), timeout=300)
    summary = next(node["text"][0] for node in outputs.values() if "text" in node)
    assert summary.startswith("trained steps 2–3 of 3"), summary


def test_samples_are_logged_to_tensorboard(comfy, tiny_model_file, text_embedding_file, wan_vae):  # noqa: F811
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    g, _model, positive, train = _training_graph(comfy, "wan21_t2v", tiny_model_file, text_embedding_file, steps=2,
                                                output_name="samples_tensorboard")
    g.nodes[str(next(node for node, spec in g.nodes.items() if spec["class_type"] == "MusubiCheckpointSettings"))][
        "inputs"].update(log_with="tensorboard", logging_dir="samples_tb")
    vae = g.add("VAELoader", vae_name=wan_vae)
    g.nodes[str(train)]["inputs"]["samples"] = _samples_node(g, positive[0], vae[0], every_n_steps=1, steps=1)[0]
    comfy.run(g.to_dict(), timeout=300)
    [run] = (comfy.output_dir / "samples_tb").iterdir()
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    for folder in [run, *[p for p in run.rglob("*") if p.is_dir()]]:
        if list(folder.glob("events.out.tfevents.*")):
            events = EventAccumulator(str(folder), size_guidance={"images": 0}).Reload()
            if events.Tags()["images"]:
                break
    assert "samples/p1" in events.Tags()["images"], events.Tags()
    assert [image.step for image in events.Images("samples/p1")] == [1, 2]
