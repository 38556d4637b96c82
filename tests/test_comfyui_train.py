"""Train LoRA inside a real ComfyUI: every native architecture trains, the saved LoRA works in
core loaders, a tiny model learns, and Cancel leaves a checkpoint that training resumes from."""

from __future__ import annotations

import json
import re
import time

import pytest
import safetensors.torch
import torch

from comfy_server import Graph, adamw_constant
from tiny_checkpoints import ARCHS

pytestmark = pytest.mark.comfyui

NATIVE = [name for name, arch in ARCHS.items() if arch.comfy_native]
STEPS = 200


def _latent_file(comfy, arch: str, count: int = 2, seed: int = 0) -> str:
    """Random latents of the architecture's layout in input/, for core LoadLatent."""
    tiny = ARCHS[arch]
    shape = (count, tiny.latent_channels, 1, 4, 4) if tiny.latent_dims == 5 else (count, tiny.latent_channels, 4, 4)
    name = f"train_{arch}_{count}_{seed}.latent"
    path = comfy.input_dir / name
    if not path.exists():
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        safetensors.torch.save_file({"latent_tensor": latents, "latent_format_version_0": torch.tensor([])}, path)
    return name


def _training_graph(comfy, arch, tiny_model_file, text_embedding_file, *, steps, output_name, learning_rate=1e-2,
                    resume="no", save_every=0, timestep_sampling="uniform", latent_count=2, min_timestep=0, rank=8,
                    mixed_precision="no", gradient_checkpointing=False, batch_size=1, seed=3, network_type="lora",
                    lokr_factor=-1, lora_format="comfyui", network_weights=None):
    g = Graph()
    # LoHa / LoKr (and a warm start) add optional inputs; LoRA graphs stay as they were.
    network_options = {} if network_type == "lora" else {"network_type": network_type, "lokr_factor": lokr_factor}
    train_options = {} if network_weights is None else {"network_weights": network_weights}
    model = g.add("UNETLoader", unet_name=tiny_model_file(arch), weight_dtype="default")
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(arch), architecture=ARCHS[arch].family)
    latents = g.add("LoadLatent", latent=_latent_file(comfy, arch, latent_count))
    network = g.add("MusubiLoRANetworkSettings", network_dim=rank, network_alpha=float(rank), network_dropout=0.0, rank_dropout=0.0,
                    module_dropout=0.0, loraplus_lr_ratio=0.0, exclude_patterns="", include_patterns="", **network_options)
    optimizer = adamw_constant(g, learning_rate)
    timesteps = g.add("MusubiTimestepSettings", timestep_sampling=timestep_sampling, discrete_flow_shift=1.0,
                      sigmoid_scale=1.0, logit_mean=0.0, logit_std=1.0, weighting_scheme="none", mode_scale=1.29,
                      min_timestep=min_timestep, max_timestep=1000, preserve_distribution_shape=False,
                      num_timestep_buckets=0)
    checkpoints = g.add("MusubiCheckpointSettings", save_every_n_steps=save_every, save_last_n_checkpoints=0,
                        save_state=True, lora_format=lora_format, save_precision="float32", log_with="none", logging_dir="")
    train = g.add("MusubiTrainLoRA", model=model[0], latents=latents[0], conditioning=positive[0], steps=steps,
                  batch_size=batch_size, gradient_accumulation_steps=1, seed=seed, output_name=output_name, resume=resume,
                  mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, network_settings=network[0],
                  optimizer_settings=optimizer[0], timestep_settings=timesteps[0], checkpoint_settings=checkpoints[0],
                  **train_options)
    return g, model, positive, train


@pytest.mark.parametrize("arch", NATIVE)
def test_every_architecture_trains_and_the_saved_lora_changes_core_sampling(comfy, arch, tiny_model_file, text_embedding_file):
    steps = 2
    g, model, positive, train = _training_graph(comfy, arch, tiny_model_file, text_embedding_file, steps=steps,
                                                output_name=f"arch_{arch}", save_every=1)
    g.add("PreviewAny", source=train[3])
    outputs = comfy.run(g.to_dict(), timeout=900)
    folder = comfy.models_dir("loras") / f"arch_{arch}"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        f"arch_{arch}-step000001.safetensors", f"arch_{arch}-step000002.safetensors", f"arch_{arch}.safetensors"]
    assert (comfy.output_dir / "musubi_training_states" / f"arch_{arch}" / f"arch_{arch}-step000002-state").is_dir()
    assert not list(folder.glob("*-state"))  # resume states stay out of the LoRA folder
    summary = outputs[str(train)]["text"][0]
    loss = float(re.search(r"final loss ([\d.]+)", summary).group(1))
    assert 0 < loss < 100

    g = Graph()
    base = g.add("UNETLoader", unet_name=tiny_model_file(arch), weight_dtype="default")
    patched = g.add("LoraLoaderModelOnly", model=base[0], lora_name=f"arch_{arch}/arch_{arch}.safetensors", strength_model=1.0)
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(arch), architecture=ARCHS[arch].family)
    latent = g.add("EmptyLatentImage", width=32, height=32, batch_size=1)
    for name, source in (("base", base), ("lora", patched)):
        sampled = g.add("KSampler", model=source[0], positive=positive[0], negative=positive[0], latent_image=latent[0],
                        seed=0, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
        g.add("SaveLatent", samples=sampled[0], filename_prefix=f"train/{arch}_{name}")
    comfy.run(g.to_dict(), timeout=600)
    [base_file] = (comfy.output_dir / "train").glob(f"{arch}_base_*.latent")
    [lora_file] = (comfy.output_dir / "train").glob(f"{arch}_lora_*.latent")
    difference = safetensors.torch.load_file(base_file)["latent_tensor"] - safetensors.torch.load_file(lora_file)["latent_tensor"]
    assert difference.abs().max() > 1e-4, "the trained LoRA did not change core sampling"


@pytest.mark.parametrize("network_type", ["lora", "loha", "lokr"])
def test_a_lora_on_tiny_wan_learns_a_fixed_target(comfy, tiny_model_file, text_embedding_file, network_type):
    # One latent and one caption, noise levels from 0.5 up. The tiny model's frozen random head and
    # norms cap how well any LoRA can fit the noise part of the target (the loss settles near 1.3
    # from about 2), so the loss bar is a clear, repeatable fall; the sampling check below is the
    # point: from pure noise, the trained model lands about twice as near the training latent.
    # LoHa and LoKr must learn it too, with the same settings.
    folder = "learns" if network_type == "lora" else f"learns_{network_type}"
    g, model, positive, train = _training_graph(comfy, "wan21_t2v", tiny_model_file, text_embedding_file, steps=STEPS,
                                                output_name=folder, learning_rate=1e-2, latent_count=1,
                                                min_timestep=500, rank=32, network_type=network_type)
    if network_type == "lora":  # validated on the training latent: its validation loss must fall too
        held = g.add("LoadLatent", latent=_latent_file(comfy, "wan21_t2v", 1))
        validation = g.add("MusubiValidationData", latents=held[0], conditioning=positive[0], held_out_fraction=0.0,
                           every_n_steps=50, num_timesteps=8, num_bands=4, seed=0)
        g.nodes[str(train)]["inputs"]["validation"] = validation[0]
    shown = g.add("PreviewAny", source=train[2])
    latent = g.add("EmptyHunyuanLatentVideo", width=32, height=32, length=1, batch_size=1)
    for name, source in (("base", model), ("trained", train)):
        sampled = g.add("KSampler", model=source[0], positive=positive[0], negative=positive[0], latent_image=latent[0],
                        seed=7, steps=8, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
        g.add("SaveLatent", samples=sampled[0], filename_prefix=f"{folder}/{name}")
    outputs = comfy.run(g.to_dict(), timeout=600)
    losses = json.loads(outputs[str(shown)]["text"][0])["loss"]
    assert len(losses) == STEPS
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.8 * first, f"loss went from {first:.4f} to {last:.4f}"
    if network_type == "lora":
        validation = json.loads(outputs[str(shown)]["text"][0])["validation"]
        assert json.loads(outputs[str(shown)]["text"][0])["validation_steps"] == [0, 50, 100, 150, 200]
        assert validation[-1] < 0.8 * validation[0], validation

    target = safetensors.torch.load_file(comfy.input_dir / _latent_file(comfy, "wan21_t2v", 1))["latent_tensor"]
    distance = {}
    for name in ("base", "trained"):
        [path] = (comfy.output_dir / folder).glob(f"{name}_*.latent")
        sample = safetensors.torch.load_file(path)["latent_tensor"]
        distance[name] = (sample - target).pow(2).mean().item()
    assert distance["trained"] < 0.6 * distance["base"], distance


def test_cancel_keeps_a_resumable_checkpoint_and_training_resumes(comfy, tiny_model_file, text_embedding_file):
    folder = comfy.models_dir("loras") / "cancelled"
    g, _, _, train = _training_graph(comfy, "wan21_t2v", tiny_model_file, text_embedding_file, steps=100_000,
                                     output_name="cancelled", resume="latest")
    g.add("PreviewAny", source=train[3])
    started = comfy.log_text().count("LoRA (wan)")
    prompt_id = comfy.queue(g.to_dict())
    deadline = time.monotonic() + 120
    while comfy.log_text().count("LoRA (wan)") == started:
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    time.sleep(1.5)
    comfy.interrupt()
    entry = comfy.wait(prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "error"  # ComfyUI reports an interrupted prompt as not successful
    states = sorted((comfy.output_dir / "musubi_training_states" / "cancelled").glob("cancelled-step*-state"))
    assert states, "Cancel left no resumable state"
    assert not list(folder.glob("*-state"))  # resume states stay out of the LoRA folder
    stopped_at = int(re.search(r"step(\d+)", states[-1].name).group(1))
    assert 0 < stopped_at < 100_000
    assert (folder / f"cancelled-step{stopped_at:06d}.safetensors").is_file()

    # Queue it again with a reachable end: training resumes where Cancel stopped.
    end = stopped_at + 3
    g, _, _, train = _training_graph(comfy, "wan21_t2v", tiny_model_file, text_embedding_file, steps=end,
                                     output_name="cancelled", resume="latest")
    outputs = comfy.run(g.to_dict(), timeout=300)
    summary = outputs[str(train)]["text"][0]
    assert summary.startswith(f"trained steps {stopped_at + 1}–{end} of {end}"), summary
    assert (folder / "cancelled.safetensors").is_file()


def _losses(comfy, g, train) -> list[float]:
    shown = g.add("PreviewAny", source=train[2])
    outputs = comfy.run(g.to_dict(), timeout=900)
    return json.loads(outputs[str(shown)]["text"][0])["loss"]


# Flux/HunyuanVideo blocks are recomputed through ComfyUI's block wrappers, which read their block
# from a loop variable: a wrong recompute would give other gradients, so the second step's loss
# (after one update) must match the run without checkpointing.
@pytest.mark.parametrize("arch", ["wan21_t2v", "hunyuan_video", "flux_kontext", "qwen_image"])
def test_gradient_checkpointing_trains_exactly_as_without_and_bf16_trains(comfy, arch, tiny_model_file, text_embedding_file):
    runs = {}
    variants = [("plain", "no", False), ("checkpointed", "no", True)]
    if arch not in ("flux_kontext", "qwen_image"):  # their tiny steps take seconds on a CPU; bf16 is shared code
        variants.append(("bf16", "bf16", True))
    for name, precision, checkpointing in variants:
        g, _, _, train = _training_graph(comfy, arch, tiny_model_file, text_embedding_file, steps=2,
                                         output_name=f"ckpt_{arch}_{name}", mixed_precision=precision,
                                         gradient_checkpointing=checkpointing)
        runs[name] = _losses(comfy, g, train)
    assert len(runs["plain"]) == 2
    assert runs["checkpointed"] == pytest.approx(runs["plain"], rel=1e-4, abs=1e-6)
    if "bf16" in runs:
        assert all(0 < loss < 100 for loss in runs["bf16"])
        assert runs["bf16"] == pytest.approx(runs["plain"], rel=0.05)
    assert "not available" not in comfy.log_text()


def test_wan22_a14b_trains_one_lora_on_both_experts_in_one_run(comfy, tiny_model_file, text_embedding_file):
    g, low, positive, train = _training_graph(comfy, "wan22_a14b_low", tiny_model_file, text_embedding_file, steps=6,
                                              output_name="a14b_pair", batch_size=2, latent_count=4)
    high = g.add("UNETLoader", unet_name=tiny_model_file("wan22_a14b_high"), weight_dtype="default")
    g.nodes[str(train)]["inputs"].update(model_high_noise=high[0], timestep_boundary=0.5)
    outputs = comfy.run(g.to_dict(), timeout=600)
    summary = outputs[str(train)]["text"][0]
    batches = {name: int(count) for count, name in re.findall(r"(\d+) batches? on the (high|low)-noise expert", summary)}
    assert batches.get("high", 0) > 0 and batches.get("low", 0) > 0, summary
    assert batches["high"] + batches["low"] == 6

    # The one LoRA changes both experts' sampling when loaded with core nodes.
    g = Graph()
    latent = g.add("EmptyHunyuanLatentVideo", width=32, height=32, length=1, batch_size=1)
    for expert in ("low", "high"):
        base = g.add("UNETLoader", unet_name=tiny_model_file(f"wan22_a14b_{expert}"), weight_dtype="default")
        patched = g.add("LoraLoaderModelOnly", model=base[0], lora_name="a14b_pair/a14b_pair.safetensors", strength_model=1.0)
        positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file("wan22_a14b_low"), architecture="wan")
        for name, source in (("base", base), ("lora", patched)):
            sampled = g.add("KSampler", model=source[0], positive=positive[0], negative=positive[0], latent_image=latent[0],
                            seed=0, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
            g.add("SaveLatent", samples=sampled[0], filename_prefix=f"a14b/{expert}_{name}")
    comfy.run(g.to_dict(), timeout=600)
    for expert in ("low", "high"):
        [base_file] = (comfy.output_dir / "a14b").glob(f"{expert}_base_*.latent")
        [lora_file] = (comfy.output_dir / "a14b").glob(f"{expert}_lora_*.latent")
        difference = safetensors.torch.load_file(base_file)["latent_tensor"] - safetensors.torch.load_file(lora_file)["latent_tensor"]
        assert difference.abs().max() > 1e-4, f"the LoRA did not change the {expert}-noise expert"


def test_missing_training_data_and_a_doubled_expert_get_clear_errors(comfy, tiny_model_file, text_embedding_file):
    g, model, positive, train = _training_graph(comfy, "wan21_t2v", tiny_model_file, text_embedding_file, steps=1,
                                                output_name="no_data")
    del g.nodes[str(train)]["inputs"]["latents"]
    assert "connect training data" in comfy.run_error(g.to_dict())

    g, model, positive, train = _training_graph(comfy, "wan22_a14b_low", tiny_model_file, text_embedding_file, steps=1,
                                                output_name="same_expert")
    g.nodes[str(train)]["inputs"]["model_high_noise"] = model[0]
    assert "same model" in comfy.run_error(g.to_dict())


def test_captions_of_different_lengths_train_in_one_batch(comfy, tiny_model_file, text_embedding_file):
    # HunyuanVideo's text enters as a plain tensor that ComfyUI cannot concatenate across lengths;
    # such items of a batch run as separate model calls.
    from musubi.data.text_embeddings import TextEmbedding, save_text_embedding

    generator = torch.Generator().manual_seed(5)
    save_text_embedding(comfy.models_dir("text_embeddings") / "hunyuan_11_tokens.safetensors",
                        TextEmbedding(context=torch.randn(11, 4096, generator=generator),
                                      pooled=torch.randn(768, generator=generator), architecture="hunyuan_video", extra={}))
    g, _, positive, train = _training_graph(comfy, "hunyuan_video", tiny_model_file, text_embedding_file, steps=2,
                                            output_name="mixed_lengths", batch_size=2)
    longer = g.add("MusubiLoadTextEmbedding", embedding="hunyuan_11_tokens.safetensors", architecture="hunyuan_video")
    both = g.add("ConditioningCombine", conditioning_1=positive[0], conditioning_2=longer[0])
    g.nodes[str(train)]["inputs"]["conditioning"] = both[0]
    losses = _losses(comfy, g, train)
    assert len(losses) == 2 and all(0 < loss < 100 for loss in losses)


def test_conditioning_of_another_architecture_is_refused_before_the_first_step(comfy, tiny_model_file, text_embedding_file):
    # Qwen-Image's 3584-wide text into Wan used to fail inside the model with a matrix-shape error.
    g, _, positive, train = _training_graph(comfy, "wan21_t2v", tiny_model_file, text_embedding_file, steps=1,
                                            output_name="foreign_text")
    g.nodes[str(positive)]["inputs"].update(embedding=text_embedding_file("qwen_image"), architecture="qwen_image")
    error = comfy.run_error(g.to_dict())
    assert error.startswith(f"MusubiTrainLoRA (node {train})"), error
    assert "sample 0's conditioning is 3584 wide, as Qwen-Image's, but this Wan 2.1/2.2 model takes 4096-wide text" in error
    assert "Encode the captions with the Wan text encoder (umt5_xxl" in error
    assert "mat1 and mat2" not in error

    # Wan's text (no pooled output) into HunyuanVideo used to fail with KeyError: 'pooled_output'.
    g, _, positive, train = _training_graph(comfy, "hunyuan_video", tiny_model_file, text_embedding_file, steps=1,
                                            output_name="no_pooled")
    g.nodes[str(positive)]["inputs"].update(embedding=text_embedding_file("wan21_t2v"), architecture="wan")
    error = comfy.run_error(g.to_dict())
    assert error.startswith(f"MusubiTrainLoRA (node {train})"), error
    assert "sample 0's conditioning has no pooled output, which this HunyuanVideo model needs (768 wide, from clip_l)" in error
    assert "as Wan 2.1/2.2's" in error and "the HunyuanVideo text encoders (llava_llama3 + clip_l" in error
    assert "pooled_output'" not in error
    assert not (comfy.models_dir("loras") / "no_pooled").exists()
