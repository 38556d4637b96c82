"""The pack inside a real ComfyUI: clean start-up, well-described nodes, every tiny architecture samples."""

from __future__ import annotations

import re

import pytest
import safetensors.torch
import torch

from comfy_server import PACK_NAME, Graph
from tiny_checkpoints import ARCHS

pytestmark = pytest.mark.comfyui

PACK_NODES = {
    "MusubiLoadTextEmbedding",
    "MusubiSaveTextEmbedding",
    "MusubiPostHocEMAMerge",
    "MusubiTimestepSettings",
    "MusubiTimestepDistributionPreview",
    "MusubiMagCacheSampler",
    "MusubiCalibrateMagCache",
    "MusubiMagCache",
    "MusubiLoadDiTFP8Scaled",
    "MusubiTrainLoRA",
    "MusubiLoRANetworkSettings",
    "MusubiOptimizerSettings",
    "MusubiCheckpointSettings",
    "MusubiCompileSettings",
    "MusubiCompileModel",
    "MusubiDataset",
    "MusubiLoadFramePack",
    "MusubiFramePackSampler",
    "MusubiFramePackTrainingSettings",
    "MusubiSaveImageEmbedding",
    "MusubiLoadImageEmbedding",
}


def test_pack_starts_without_import_errors_or_warnings(comfy):
    log = comfy.startup_log
    assert "custom_nodes/" + PACK_NAME in log.replace("\\", "/"), "the pack was not among the loaded custom nodes"
    problems = [
        line for line in log.splitlines()
        if PACK_NAME in line and re.search(r"IMPORT FAILED|Cannot import|Traceback|warning|error", line, re.I)
    ]
    assert not problems, "\n".join(problems)


def test_every_node_is_listed_with_category_and_tooltips(comfy):
    info = comfy.object_info()
    ours = {name: spec for name, spec in info.items() if name.startswith("Musubi")}
    assert PACK_NODES <= set(ours), f"missing: {PACK_NODES - set(ours)}"
    for name, spec in ours.items():
        assert spec["category"].startswith("musubi"), name
        assert spec["description"], f"{name} has no description"
        for section in ("required", "optional"):
            for input_name, (_type, *options) in spec["input"].get(section, {}).items():
                assert options and options[0].get("tooltip"), f"{name}.{input_name} has no tooltip"


NATIVE = [name for name, arch in ARCHS.items() if arch.comfy_native]


@pytest.mark.parametrize("arch", NATIVE)
def test_tiny_architecture_is_detected_and_samples_with_core_ksampler(comfy, arch, tiny_model_file, text_embedding_file):
    tiny = ARCHS[arch]
    g = Graph()
    model = g.add("UNETLoader", unet_name=tiny_model_file(arch), weight_dtype="default")
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(arch), architecture=tiny.family)
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampled = g.add("KSampler", model=model[0], positive=positive[0], negative=positive[0], latent_image=latent[0],
                    seed=0, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    g.add("SaveLatent", samples=sampled[0], filename_prefix=f"latents/{arch}")
    comfy.run(g.to_dict(), timeout=600)

    [saved] = sorted((comfy.output_dir / "latents").glob(f"{arch}_*.latent"))
    samples = safetensors.torch.load_file(saved)["latent_tensor"]
    # The output layout proves which model family ComfyUI detected.
    assert samples.shape[1] == tiny.latent_channels
    assert samples.ndim == tiny.latent_dims
    assert torch.isfinite(samples).all()
    assert samples.abs().sum() > 0
