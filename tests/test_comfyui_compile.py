"""torch.compile inside a real ComfyUI: Train LoRA with Compile Settings, and Compile Model (regional)
with core LoRAs, fp8 weights with forward-time LoRA patches, and MagCache.

The compiled runs use the eager backend: Dynamo traces the blocks (with the guards that decide
when a compiled graph is reused) and runs the traced graph as it is, so any LoRA, patch or hook
lost by compiling shows as a difference, while the arithmetic stays that of eager PyTorch.
AOTAutograd and inductor are tested in test_compile.py.
"""

from __future__ import annotations

import json
import re

import pytest
import safetensors.torch
import torch

from comfy_server import Graph, adamw_constant
from fixture_files import write_wan_lora_checkpoints
from tiny_checkpoints import ARCHS

pytestmark = pytest.mark.comfyui

ARCH = "wan21_t2v"
LORA = "compile_lora/step_000.safetensors"


def _lora_file(comfy) -> str:
    folder = comfy.models_dir("loras") / "compile_lora"
    if not folder.exists():
        write_wan_lora_checkpoints(folder, count=1)
    return LORA


def _latent_file(comfy) -> str:
    name = "compile_train_wan.latent"
    path = comfy.input_dir / name
    if not path.exists():
        latents = torch.randn((2, ARCHS[ARCH].latent_channels, 1, 4, 4), generator=torch.Generator().manual_seed(0))
        safetensors.torch.save_file({"latent_tensor": latents, "latent_format_version_0": torch.tensor([])}, path)
    return name


def _sample(g: Graph, model, positive, name: str, steps: int = 2):
    latent = g.add("EmptyLatentImage", width=32, height=32, batch_size=1)
    sampled = g.add("KSampler", model=model[0], positive=positive[0], negative=positive[0], latent_image=latent[0],
                    seed=1, steps=steps, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    g.add("SaveLatent", samples=sampled[0], filename_prefix=f"compile/{name}")


def _latent(comfy, name: str) -> torch.Tensor:
    return comfy.saved_latent("compile", name)


def _compile(g: Graph, model, backend: str = "eager"):
    return g.add("MusubiCompileModel", model=model[0], backend=backend, mode="default", dynamic=False)


def test_train_lora_with_compile_settings_trains_as_without(comfy, tiny_model_file, text_embedding_file):
    g = Graph()
    model = g.add("UNETLoader", unet_name=tiny_model_file(ARCH), weight_dtype="default")
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(ARCH), architecture="wan")
    latents = g.add("LoadLatent", latent=_latent_file(comfy))
    optimizer = adamw_constant(g, 1e-2)
    shown = {}
    for name, backend in (("eager", "NO"), ("compiled", "EAGER")):
        settings = g.add("MusubiCompileSettings", dynamo_backend=backend, dynamo_mode="default", dynamo_fullgraph=False,
                         dynamo_dynamic=False)
        train = g.add("MusubiTrainLoRA", model=model[0], latents=latents[0], conditioning=positive[0], steps=2,
                      batch_size=1, gradient_accumulation_steps=1, seed=3, output_name=f"compile_{name}", resume="no",
                      mixed_precision="no", gradient_checkpointing=False, optimizer_settings=optimizer[0],
                      compile_settings=settings[0])
        shown[name] = g.add("PreviewAny", source=train[2])
    offset = len(comfy.log_text())
    outputs = comfy.run(g.to_dict(), timeout=600)
    losses = {name: json.loads(outputs[str(node)]["text"][0])["loss"] for name, node in shown.items()}
    assert len(losses["compiled"]) == 2 and all(0 < loss < 100 for loss in losses["compiled"])
    # The same LoRA learned: an equal loss at step 2 means an equal update before it.
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
    log = comfy.log_text()[offset:]
    assert re.search(r"training: compiling 2 blocks with eager", log), log[-3000:]
    assert "failed, so this run continues uncompiled" not in log


def test_core_and_fp8_loras_act_on_a_compiled_model_exactly_as_on_an_eager_one(comfy, tiny_model_file, text_embedding_file):
    lora = _lora_file(comfy)
    g = Graph()
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(ARCH), architecture="wan")
    base = g.add("UNETLoader", unet_name=tiny_model_file(ARCH), weight_dtype="default")
    with_lora = g.add("LoraLoaderModelOnly", model=base[0], lora_name=lora, strength_model=1.0)
    compiled = _compile(g, base)
    compiled_then_lora = g.add("LoraLoaderModelOnly", model=compiled[0], lora_name=lora, strength_model=1.0)
    fp8 = g.add("MusubiLoadDiTFP8Scaled", unet_name=tiny_model_file(ARCH), fp8_format="e4m3fn", mode="block",
                block_size=64, compute_dtype="default", architecture="auto", loras="", save_as="")
    fp8_lora = g.add("LoraLoaderModelOnly", model=fp8[0], lora_name=lora, strength_model=1.0)
    fp8_lora_compiled = _compile(g, fp8_lora)
    for name, model in (("base", base), ("lora", with_lora), ("compiled", compiled), ("compiled_lora", compiled_then_lora),
                        ("fp8_lora", fp8_lora), ("fp8_lora_compiled", fp8_lora_compiled)):
        _sample(g, model, positive, name)
    offset = len(comfy.log_text())
    comfy.run(g.to_dict(), timeout=600)
    log = comfy.log_text()[offset:]
    assert len(re.findall(r"Compile Model \(regional\): compiling 2 blocks with eager", log)) == 2, log[-3000:]
    assert "failed, so this run continues uncompiled" not in log

    base_latent, lora_latent = _latent(comfy, "base"), _latent(comfy, "lora")
    assert (lora_latent - base_latent).abs().max() > 1e-3  # the LoRA matters
    # A LoRA loaded after compiling is not ignored (the trap of other trainers and nodes).
    assert torch.allclose(_latent(comfy, "compiled_lora"), lora_latent, rtol=1e-5, atol=1e-6)
    assert torch.allclose(_latent(comfy, "compiled"), base_latent, rtol=1e-5, atol=1e-6)
    fp8_lora_latent = _latent(comfy, "fp8_lora")
    assert (fp8_lora_latent - base_latent).abs().max() > 1e-3
    assert torch.allclose(_latent(comfy, "fp8_lora_compiled"), fp8_lora_latent, rtol=1e-5, atol=1e-6)


def _magcache_reports(log: str) -> list[str]:
    return re.findall(r"^MagCache .*?^transformer blocks run: .*?$", log, re.S | re.M)


def test_magcache_on_a_compiled_model_skips_and_reuses_as_on_an_eager_one(comfy, tiny_model_file, text_embedding_file):
    g = Graph()
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(ARCH), architecture="wan")
    base = g.add("UNETLoader", unet_name=tiny_model_file(ARCH), weight_dtype="default")
    magcache = dict(threshold=0.1, retention_ratio=0.2, K=20, ratios="auto", expert="auto", pasted_ratios="1, 1")
    eager = g.add("MusubiMagCache", model=base[0], **magcache)
    compiled = g.add("MusubiMagCache", model=_compile(g, base)[0], **magcache)
    _sample(g, eager, positive, "magcache_eager", steps=6)
    _sample(g, compiled, positive, "magcache_compiled", steps=6)
    offset = len(comfy.log_text())
    comfy.run(g.to_dict(), timeout=600)
    log = comfy.log_text()[offset:]
    reports = _magcache_reports(log)
    assert len(reports) == 2, log[-3000:]
    skipped = [re.search(r"skipped \d+ of \d+ steps \(([\d, ]+)\)", report) for report in reports]
    assert all(skipped) and skipped[0].group(1) == skipped[1].group(1) == "1, 2, 3, 4", reports
    blocks = [re.search(r"transformer blocks run: (\d+ of \d+)", report).group(1) for report in reports]
    assert blocks[0] == blocks[1], reports
    # Skipped steps reuse the residual the compiled blocks produced: the results agree.
    assert torch.allclose(_latent(comfy, "magcache_compiled"), _latent(comfy, "magcache_eager"), rtol=1e-5, atol=1e-6)
