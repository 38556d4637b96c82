"""Validation Data + Train LoRA in a real ComfyUI: the loss output carries the validation loss,
validating changes no trained weight, two identical runs score identically, a held-out fraction
leaves training, and bad validation data gets an error naming the node and the fix."""

from __future__ import annotations

import json
import re

import pytest
import safetensors.torch

from comfy_server import Graph
from test_comfyui_train import _latent_file, _training_graph

pytestmark = pytest.mark.comfyui


def _validation(g, latents=None, conditioning=None, held_out_fraction=0.0, every_n_steps=2):
    inputs = {"held_out_fraction": held_out_fraction, "every_n_steps": every_n_steps, "num_timesteps": 8, "num_bands": 4,
              "seed": 0}
    if latents is not None:
        inputs.update(latents=latents, conditioning=conditioning)
    return g.add("MusubiValidationData", **inputs)


def _run(comfy, tiny_model_file, text_embedding_file, name, with_validation, **options):
    g, _, positive, train = _training_graph(comfy, "wan21_t2v", tiny_model_file, text_embedding_file, steps=6,
                                            output_name=name, **options)
    if with_validation == "latents":
        held = g.add("LoadLatent", latent=_latent_file(comfy, "wan21_t2v", 2, seed=1))
        validation = _validation(g, held[0], positive[0])
        g.nodes[str(train)]["inputs"]["validation"] = validation[0]
    elif with_validation == "held_out":
        validation = _validation(g, held_out_fraction=0.25, every_n_steps=3)
        g.nodes[str(train)]["inputs"]["validation"] = validation[0]
    shown = g.add("PreviewAny", source=train[2])
    outputs = comfy.run(g.to_dict(), timeout=600)
    lora = safetensors.torch.load_file(comfy.models_dir("loras") / name / f"{name}.safetensors")
    assert outputs[str(train)].get("images"), "no loss plot"  # drawn with the validation line when there is one
    return json.loads(outputs[str(shown)]["text"][0]), outputs[str(train)]["text"][0], lora


def test_validation_from_latents_is_in_the_loss_output_and_changes_no_weight(comfy, tiny_model_file, text_embedding_file):
    plain, plain_summary, plain_lora = _run(comfy, tiny_model_file, text_embedding_file, "val_plain", None)
    first, summary, first_lora = _run(comfy, tiny_model_file, text_embedding_file, "val_first", "latents")
    second, _, second_lora = _run(comfy, tiny_model_file, text_embedding_file, "val_second", "latents")
    assert "validation" not in plain and "validation" not in plain_summary
    assert first["validation_steps"] == [0, 2, 4, 6]
    assert len(first["validation"]) == 4 and all(len(bands) == 4 for bands in first["validation_bands"])
    assert first["validation"] == second["validation"]  # exactly reproducible
    assert first["loss"] == plain["loss"]
    assert set(first_lora) == set(plain_lora)
    for key, value in plain_lora.items():
        assert value.equal(first_lora[key]) and value.equal(second_lora[key]), key
    assert "validation loss" in summary and "on 2 item(s)" in summary, summary
    assert "time: training" in summary and "validation" in summary.split("time:")[1], summary


def test_a_held_out_fraction_validates_on_items_left_out_of_training(comfy, tiny_model_file, text_embedding_file):
    losses, summary, _ = _run(comfy, tiny_model_file, text_embedding_file, "val_held", "held_out", latent_count=4)
    assert losses["validation_steps"] == [0, 3, 6]
    assert "on 1 item(s)" in summary, summary


def test_bad_validation_data_gets_clear_errors(comfy, tiny_model_file, text_embedding_file):
    # latents of another VAE (TI2V-5B's 48 channels) for a Wan 2.1 model
    g, _, positive, train = _training_graph(comfy, "wan21_t2v", tiny_model_file, text_embedding_file, steps=1,
                                            output_name="val_bad_shape")
    other = g.add("LoadLatent", latent=_latent_file(comfy, "wan22_ti2v_5b", 1))
    g.nodes[str(train)]["inputs"]["validation"] = _validation(g, other[0], positive[0])[0]
    error = comfy.run_error(g.to_dict())
    assert "validation (from Validation Data): validation item 0 has a latent of shape [48, 1, 4, 4]" in error, error
    assert "encode the validation data with the same VAE" in error

    # a held-out fraction of a single item leaves nothing to train on
    g, _, _, train = _training_graph(comfy, "wan21_t2v", tiny_model_file, text_embedding_file, steps=1,
                                     output_name="val_empty", latent_count=1)
    g.nodes[str(train)]["inputs"]["validation"] = _validation(g, held_out_fraction=0.5)[0]
    error = comfy.run_error(g.to_dict())
    assert "held_out_fraction 0.5 of 1 item(s) leaves nothing to hold out" in error, error

    # nothing to validate on
    g, _, _, train = _training_graph(comfy, "wan21_t2v", tiny_model_file, text_embedding_file, steps=1,
                                     output_name="val_nothing")
    g.nodes[str(train)]["inputs"]["validation"] = _validation(g)[0]
    error = comfy.run_error(g.to_dict())
    assert "Validation Data: nothing to validate on" in error, error


def _timesteps(g):
    return g.add("MusubiTimestepSettings", timestep_sampling="uniform", discrete_flow_shift=1.0, sigmoid_scale=1.0,
                 logit_mean=0.0, logit_std=1.0, weighting_scheme="none", mode_scale=1.29, min_timestep=0,
                 max_timestep=1000, preserve_distribution_shape=False, num_timestep_buckets=0)


def _merge(g, name, output_name, **extra):
    return g.add("MusubiPostHocEMAMerge", checkpoints=f"{name}/*.safetensors", output_name=output_name, mode="beta",
                 beta=0.9, beta2=0.95, sigma_rel=0.2, order="as listed", **extra)


def test_post_hoc_ema_picks_the_candidate_with_the_lowest_validation_loss(comfy, tiny_model_file, text_embedding_file):
    from musubi.lora.ema import post_hoc_ema_merge

    name = "ema_val"
    g, model, positive, train = _training_graph(comfy, "wan21_t2v", tiny_model_file, text_embedding_file, steps=8,
                                                output_name=name, save_every=2, learning_rate=3e-2)
    held = g.add("LoadLatent", latent=_latent_file(comfy, "wan21_t2v", 2, seed=1))
    g.nodes[str(train)]["inputs"]["validation"] = _validation(g, held[0], positive[0], every_n_steps=0)[0]
    shown = g.add("PreviewAny", source=train[2])
    trained = json.loads(comfy.run(g.to_dict(), timeout=600)[str(shown)]["text"][0])
    assert trained["validation_steps"] == [0, 8]
    folder = comfy.models_dir("loras") / name
    steps = sorted(folder.glob(f"{name}-step*.safetensors"))
    assert len(steps) == 4

    # Scored: every candidate listed, the lowest merged, and beta 0 (the last checkpoint alone) scores what
    # Train LoRA's own validation gave its final LoRA (the same plan, two code paths).
    g, model, positive, _ = _training_graph(comfy, "wan21_t2v", tiny_model_file, text_embedding_file, steps=1,
                                            output_name="unused")
    held = g.add("LoadLatent", latent=_latent_file(comfy, "wan21_t2v", 2, seed=1))
    candidates = g.add("MusubiEMACandidates", model=model[0], validation=_validation(g, held[0], positive[0])[0],
                       values="0.0, 0.5, 0.9", timestep_settings=_timesteps(g)[0])
    merge = _merge(g, name, "ema/ema_val_best", candidates=candidates[0])
    chosen = g.add("PreviewAny", source=merge[2])
    graph = {key: node for key, node in g.to_dict().items() if node["class_type"] != "MusubiTrainLoRA"}
    outputs = comfy.run(graph, timeout=600)
    text = outputs[str(merge)]["text"][0]
    rows = {float(value): float(loss) for value, loss in re.findall(r"^beta ([0-9.]+)\s+([0-9.]+)", text, flags=re.M)}
    assert sorted(rows) == [0.0, 0.5, 0.9], text
    pick = min(rows, key=rows.get)
    assert outputs[str(chosen)]["text"][0].startswith(f"beta {pick:g} (validation loss"), outputs[str(chosen)]
    assert text.count("← best") == 1 and outputs[str(merge)].get("images"), outputs[str(merge)].keys()
    assert rows[0.0] == pytest.approx(trained["validation"][-1], rel=1e-4, abs=1e-5)
    best = safetensors.torch.load_file(comfy.models_dir("loras") / "ema" / "ema_val_best.safetensors")
    expected = post_hoc_ema_merge(steps, comfy.base_dir / "expected_best.safetensors", beta=pick, no_sort=True)
    reference = safetensors.torch.load_file(expected.output_file)
    assert set(best) == set(reference) and all(best[key].equal(reference[key]) for key in reference)

    # Without validation the node merges as before: the file is today's merge with the beta as set.
    g = Graph()
    plain = _merge(g, name, "ema/ema_val_plain")
    comfy.run(g.to_dict(), timeout=300)
    written = safetensors.torch.load_file(comfy.models_dir("loras") / "ema" / "ema_val_plain.safetensors")
    today = safetensors.torch.load_file(post_hoc_ema_merge(steps, comfy.base_dir / "today.safetensors", beta=0.9,
                                                           no_sort=True).output_file)
    assert set(written) == set(today) and all(written[key].equal(today[key]) for key in today)
    assert str(plain)

    # Bad input: unparsable candidates name the node and the option
    g, model, positive, _ = _training_graph(comfy, "wan21_t2v", tiny_model_file, text_embedding_file, steps=1,
                                            output_name="unused")
    held = g.add("LoadLatent", latent=_latent_file(comfy, "wan21_t2v", 2, seed=1))
    candidates = g.add("MusubiEMACandidates", model=model[0], validation=_validation(g, held[0], positive[0])[0],
                       values="0.5, high")
    _merge(g, name, "ema/never", candidates=candidates[0])
    graph = {key: node for key, node in g.to_dict().items() if node["class_type"] != "MusubiTrainLoRA"}
    error = comfy.run_error(graph)
    assert "EMA Candidates: values: 'high' is not a number" in error, error
    # a value the merge's mode refuses (sigma_rel above about 0.3) names the node and the value
    g, model, positive, _ = _training_graph(comfy, "wan21_t2v", tiny_model_file, text_embedding_file, steps=1,
                                            output_name="unused")
    held = g.add("LoadLatent", latent=_latent_file(comfy, "wan21_t2v", 2, seed=1))
    candidates = g.add("MusubiEMACandidates", model=model[0], validation=_validation(g, held[0], positive[0])[0],
                       values="0.1, 0.5")
    merge = _merge(g, name, "ema/never", candidates=candidates[0])
    g.nodes[str(merge)]["inputs"]["mode"] = "sigma_rel"
    graph = {key: node for key, node in g.to_dict().items() if node["class_type"] != "MusubiTrainLoRA"}
    error = comfy.run_error(graph)
    assert "Post-Hoc EMA Merge: candidates: 0.5:" in error, error
