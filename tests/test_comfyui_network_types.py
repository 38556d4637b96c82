"""LoHa and LoKr in a real ComfyUI: on every architecture Train LoRA trains them, saves files that
core LoraLoaderModelOnly applies with no key left unloaded, the weight change ComfyUI computes from
the file equals the one the pack's hooks applied while training, and the file changes sampling.
Also: ComfyUI's own LoHa/LoKr weight adapters agree with the library's modules, warm starts, the
type refusals of the nodes, Post-Hoc EMA Merge and Load DiT (fp8 scaled) with these files.

The weight changes are compared in a helper process that imports ComfyUI (kept out of the test
process): it loads the same tiny checkpoint with ComfyUI's loader, hands the saved file to core's
LoRA loading (``comfy.sd.load_lora_for_models``, what LoraLoaderModelOnly calls), and asks
``comfy.lora.calculate_weight`` for each patched weight's change (on a zero weight, so the change
itself is compared, not a rounded sum). The pack's change is read from its hooks: a network of the
same type on ComfyUI's model, loaded from the file, fed the identity matrix.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from comfy_server import Graph, find_comfyui, preview_text
from test_comfyui_framepack_train import _graph as framepack_graph, _image_embedding, _latent_file as framepack_latent
from test_comfyui_train import _training_graph
from tiny_checkpoints import ARCHS

pytestmark = pytest.mark.comfyui

REPO_ROOT = Path(__file__).resolve().parent.parent
NATIVE = [name for name, arch in ARCHS.items() if arch.comfy_native]
TYPES = ["loha", "lokr"]
# ‖pack change − ComfyUI change‖∞ allowed, relative to ‖ComfyUI change‖∞ of the same weight.
DELTA_TOLERANCE = 1e-5

CHECKER = r"""
import json, logging, sys, types
comfy_path, tests_dir, repo_root = sys.argv[1:4]
sys.path[:0] = [comfy_path, tests_dir, repo_root]
import torch
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.lora, comfy.model_management, comfy.sd, comfy.utils
import comfy.weight_adapter as weight_adapter
from musubi.lora.network import create_network
from tiny_checkpoints import build_framepack_model, framepack_config

messages = []
class Collect(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())
logging.getLogger().addHandler(Collect())
torch.set_num_threads(1)
cache = {}


def comfy_model(arch, path):
    # The tiny checkpoint as ComfyUI loads it: UNETLoader's loader, or FramePack's diffusers tree.
    if cache.get("path") != path:
        cache.clear()
        if arch == "framepack":
            transformer = build_framepack_model(framepack_config())
            transformer.load_state_dict(comfy.utils.load_torch_file(path), strict=True)
            holder = torch.nn.Module()
            holder.diffusion_model = transformer.float()
            holder.model_config = types.SimpleNamespace(unet_config={})
            cache.update(path=path, root=transformer, holder=holder, patcher=None)
        else:
            patcher = comfy.sd.load_diffusion_model(path)
            cache.update(path=path, root=patcher.model.diffusion_model, holder=patcher.model, patcher=patcher)
    return cache


def comfy_patches(model, lora):
    # {weight key: patch list} exactly as core LoRA loading builds it.
    if model["patcher"] is not None:
        patched, _ = comfy.sd.load_lora_for_models(model["patcher"], None, lora, 1.0, 0)
        return dict(patched.patches)
    key_map = comfy.lora.model_lora_keys_unet(model["holder"], {})
    loaded = comfy.lora.load_lora(lora, key_map)
    return {key: [(1.0, adapter, 1.0, None, None)] for key, adapter in loaded.items()}


def pack_change(module):
    # The change the hook adds, read back column block by column block: branch(I) = ΔWᵀ.
    width = module.layer_shape.in_features
    rows = []
    with torch.no_grad():
        for start in range(0, width, 1024):
            eye = torch.eye(width)[start:start + 1024]
            rows.append(module.branch(eye))
    return torch.cat(rows).T


def check_file(job):
    model = comfy_model(job["arch"], job["model"])
    lora = comfy.utils.load_torch_file(job["lora"])
    del messages[:]
    patches = comfy_patches(model, lora)
    network = create_network(job["network_type"], model["root"], job["preset"], network_dim=job["rank"])
    network.eval()
    report = network.load_weights(job["lora"])
    worst, compared = 0.0, 0
    for path, module in network.modules_by_name().items():
        key = f"diffusion_model.{path}.weight"
        weight = model["root"].get_submodule(path).weight
        comfy_delta = comfy.lora.calculate_weight(patches[key], torch.zeros(weight.shape, dtype=torch.float32), key)
        pack_delta = pack_change(module).reshape(weight.shape)
        scale = comfy_delta.abs().max().item()
        worst = max(worst, (pack_delta - comfy_delta).abs().max().item() / max(scale, 1e-30))
        compared += int(scale > 0)
    network.remove()
    return {
        "not_loaded": [m for m in messages if "not loaded" in m.lower() or m.startswith("ERROR")],
        "file_keys": len(lora), "patched": sorted(patches), "modules": sorted(network.module_names()),
        "unmatched": report.unmatched_keys, "worst": worst, "nonzero": compared,
        "full_w2": sum(bool(getattr(m, "full", False)) for m in network.lora_modules),
    }


def check_adapters(job):
    # ComfyUI's own LoHa/LoKr adapters against the library's modules, on Linear and conv layers.
    torch.manual_seed(0)
    results = []
    cases = [("loha", torch.nn.Linear(24, 40), 3, -1), ("lokr", torch.nn.Linear(24, 40), 2, -1),
             ("lokr", torch.nn.Linear(24, 40), 8, -1), ("lokr", torch.nn.Linear(24, 40), 2, 4),
             ("loha", torch.nn.Conv2d(6, 10, 3), 2, -1), ("lokr", torch.nn.Conv2d(6, 10, 3), 1, -1),
             ("lokr", torch.nn.Conv2d(6, 10, 1), 4, -1)]
    for network_type, layer, rank, factor in cases:
        holder = torch.nn.Sequential()
        block = torch.nn.Module()
        block.__class__ = type("TestBlock", (torch.nn.Module,), {})
        torch.nn.Module.__init__(block)
        block.layer = layer
        holder.append(block)
        options = {"factor": factor} if network_type == "lokr" else {}
        network = create_network(network_type, holder, "generic", network_dim=rank, network_alpha=1.5, conv_dim=rank, **options)
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.normal_()
        module = network.lora_modules[0]
        tensors = {f"x.{name}": value.detach() for name, value in module.state_dict().items()}
        alpha = tensors.pop("x.alpha").item()
        adapter = None
        for adapter_class in weight_adapter.adapters:
            adapter = adapter_class.load("x", tensors, alpha, None)
            if adapter is not None:
                break
        weight = torch.zeros(layer.weight.shape)
        comfy_delta = adapter.calculate_weight(weight, "x", 1.0, 1.0, None, lambda a: a, torch.float32)
        ours = module.delta_weight().detach()
        results.append({"case": f"{network_type} {type(layer).__name__} rank {rank} factor {factor}",
                        "adapter": adapter.name, "full": bool(getattr(module, "full", False)),
                        "error": ((ours - comfy_delta).abs().max() / comfy_delta.abs().max()).item()})
    return results


for line in sys.stdin:
    job = json.loads(line)
    try:
        result = check_adapters(job) if job["kind"] == "adapters" else check_file(job)
        print("RESULT " + json.dumps(result), flush=True)
    except Exception as error:  # report and keep serving
        import traceback
        print("RESULT " + json.dumps({"exception": traceback.format_exc()}), flush=True)
"""


class Checker:
    """The helper process: one JSON job per line in, one ``RESULT`` line out."""

    def __init__(self, comfy_path: Path):
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHECKER, str(comfy_path), str(Path(__file__).parent), str(REPO_ROOT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.output: list[str] = []

    def ask(self, **job) -> dict | list:
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("the ComfyUI checker died:\n" + "".join(self.output[-80:]))
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
                if isinstance(result, dict) and "exception" in result:
                    raise RuntimeError(result["exception"])
                return result
            self.output.append(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def checker():
    comfy_path = find_comfyui()
    if comfy_path is None:
        pytest.skip("ComfyUI not found")
    helper = Checker(comfy_path)
    yield helper
    helper.close()


def test_comfyuis_weight_adapters_compute_the_modules_weight_change(checker):
    results = checker.ask(kind="adapters")
    assert [r["adapter"] for r in results] == ["loha", "lokr", "lokr", "lokr", "loha", "lokr", "lokr"]
    assert [r["full"] for r in results] == [False, False, True, False, False, False, True]
    for result in results:
        assert result["error"] < 1e-5, result


def _train(comfy, arch, network_type, tiny_model_file, text_embedding_file, name, **options):
    if arch == "framepack":
        g, _, _, train = framepack_graph(comfy, tiny_model_file, text_embedding_file, output_name=name,
                                         network_type=network_type, **options)
    else:
        g, _, _, train = _training_graph(comfy, arch, tiny_model_file, text_embedding_file, steps=2, output_name=name,
                                         network_type=network_type, rank=4, **options)
    shown = g.add("PreviewAny", source=train[3])
    outputs = comfy.run(g.to_dict(), timeout=900)
    return outputs[str(train)]["text"][0], preview_text(outputs, shown)


def _sampling_changes(comfy, arch, lora_name, tiny_model_file, text_embedding_file, prefix) -> float:
    """Largest difference between sampling with and without the file through core LoraLoaderModelOnly."""
    g = Graph()
    if arch == "framepack":
        base = g.add("MusubiLoadFramePack", model_name=tiny_model_file("framepack"), weight_dtype="fp32", fp8_scaled=False,
                     compute_dtype="fp32")
    else:
        base = g.add("UNETLoader", unet_name=tiny_model_file(arch), weight_dtype="default")
    patched = g.add("LoraLoaderModelOnly", model=base[0], lora_name=lora_name, strength_model=1.0)
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(arch), architecture=ARCHS[arch].family)
    if arch == "framepack":
        image = g.add("MusubiLoadImageEmbedding", embedding=_image_embedding(comfy))
        start = g.add("LoadLatent", latent=framepack_latent(comfy, "framepack_start_1.latent", 1, seed=5))
    else:
        latent = g.add("EmptyLatentImage", width=32, height=32, batch_size=1)
    for name, source in (("base", base), ("lora", patched)):
        if arch == "framepack":
            sampled = g.add("MusubiFramePackSampler", model=source[0], positive=positive[0], clip_vision_output=image[0],
                            start_latent=start[0], direction="vanilla", total_seconds=1.0, fps=30, sections=1,
                            latent_window_size=9, steps=2, cfg=1.0, distilled_guidance=10.0, shift=0.0, seed=0,
                            magcache="off", magcache_threshold=0.1, magcache_K=3, magcache_retention_ratio=0.2,
                            magcache_ratios="auto")
        else:
            sampled = g.add("KSampler", model=source[0], positive=positive[0], negative=positive[0], latent_image=latent[0],
                            seed=0, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
        g.add("SaveLatent", samples=sampled[0], filename_prefix=f"types/{prefix}_{name}")
    comfy.run(g.to_dict(), timeout=600)
    base_latent = comfy.saved_latent("types", f"{prefix}_base")
    lora_latent = comfy.saved_latent("types", f"{prefix}_lora")
    assert torch.isfinite(lora_latent).all()
    return float((base_latent - lora_latent).abs().max())


CASES = [(arch, network_type) for arch in [*NATIVE, "framepack"] for network_type in TYPES]


@pytest.mark.parametrize("arch, network_type", CASES)
def test_every_architecture_trains_the_type_and_core_loaders_apply_the_same_change(
        comfy, checker, tiny_model_file, text_embedding_file, arch, network_type):
    name = f"types_{arch}_{network_type}"
    summary, path = _train(comfy, arch, network_type, tiny_model_file, text_embedding_file, name)
    assert path.endswith(f"{name}.safetensors")
    title = {"loha": "LoHa", "lokr": "LoKr"}[network_type]
    assert f"{title} on " in summary, summary  # the report names the type (and LoKr's full-W2 layers)
    tensors = safetensors.torch.load_file(path)
    marks = {"loha": ".hada_w", "lokr": ".lokr_w"}[network_type]
    assert all(key.startswith("diffusion_model.") and (marks in key or key.endswith(".alpha")) for key in tensors)

    result = checker.ask(kind="file", arch=arch, model=str(comfy.models_dir("diffusion_models") / tiny_model_file(arch)),
                         lora=path, network_type=network_type, preset=ARCHS[arch].family, rank=4)
    assert result["not_loaded"] == []
    assert result["unmatched"] == []
    assert result["patched"] == [f"diffusion_model.{module}.weight" for module in result["modules"]]
    # Two steps move the change of every layer the loss depends on off zero (in the tiny Flux and
    # Qwen-Image, whose only block is the last, the text stream's output layers feed nothing).
    assert result["nonzero"] >= len(result["modules"]) - (4 if ARCHS[arch].big else 0)
    print(f"{arch} {network_type}: largest relative difference of the weight change {result['worst']:.2e}")
    assert result["worst"] <= DELTA_TOLERANCE, result["worst"]
    if network_type == "lokr" and result["full_w2"]:
        assert "full lokr_w2" in summary

    assert _sampling_changes(comfy, arch, f"{name}/{name}.safetensors", tiny_model_file, text_embedding_file, name) > 1e-5


@pytest.mark.parametrize("network_type", TYPES)
def test_musubi_layout_files_load_in_core_and_warm_start_continues(comfy, checker, tiny_model_file, text_embedding_file,
                                                                   network_type):
    arch = "wan21_t2v"
    name = f"types_musubi_{network_type}"
    g, _, _, train = _training_graph(comfy, arch, tiny_model_file, text_embedding_file, steps=2, output_name=name,
                                     network_type=network_type, rank=4, lora_format="musubi")
    comfy.run(g.to_dict(), timeout=600)
    path = comfy.models_dir("loras") / name / f"{name}.safetensors"
    tensors = safetensors.torch.load_file(path)
    assert all(key.startswith("lora_unet_blocks_") for key in tensors)
    result = checker.ask(kind="file", arch=arch, model=str(comfy.models_dir("diffusion_models") / tiny_model_file(arch)),
                         lora=str(path), network_type=network_type, preset="wan", rank=4)
    assert result["not_loaded"] == [] and result["worst"] <= DELTA_TOLERANCE

    # Warm start: a new run begins from that file. With a negligible learning rate its saved
    # weights are the file's (in ComfyUI's layout now), so the run continued from them.
    warm = f"types_warm_{network_type}"
    g, _, _, train = _training_graph(comfy, arch, tiny_model_file, text_embedding_file, steps=1, output_name=warm,
                                     network_type=network_type, rank=4, learning_rate=1e-12,
                                     network_weights=f"{name}/{name}.safetensors")
    outputs = comfy.run(g.to_dict(), timeout=600)
    assert f"warm start from {name}/{name}.safetensors" in outputs[str(train)]["text"][0]
    continued = safetensors.torch.load_file(comfy.models_dir("loras") / warm / f"{warm}.safetensors")
    as_musubi = {}
    for key, value in continued.items():
        module, tensor = key[len("diffusion_model."):].rsplit(".", 1)
        as_musubi["lora_unet_" + module.replace(".", "_") + "." + tensor] = value
    assert set(as_musubi) == set(tensors)
    for key, value in tensors.items():
        torch.testing.assert_close(as_musubi[key], value, rtol=1e-6, atol=1e-9)

    # A file of the other type, or another rank, is refused before training with the fix named.
    other = "lokr" if network_type == "loha" else "loha"
    g, _, _, _ = _training_graph(comfy, arch, tiny_model_file, text_embedding_file, steps=1, output_name=f"{warm}_bad",
                                 network_type=other, rank=4, network_weights=f"{name}/{name}.safetensors")
    error = comfy.run_error(g.to_dict(), timeout=300)
    assert "network_weights" in error and f"set the network type to {network_type}" in error
    g, _, _, _ = _training_graph(comfy, arch, tiny_model_file, text_embedding_file, steps=1, output_name=f"{warm}_rank",
                                 network_type=network_type, rank=8, network_weights=f"{name}/{name}.safetensors")
    error = comfy.run_error(g.to_dict(), timeout=300)
    assert "rank 4 in the file, 8 in the settings" in error


@pytest.mark.parametrize("network_type", TYPES)
def test_loraplus_with_loha_or_lokr_is_refused_by_the_settings_node(comfy, network_type):
    g = Graph()
    network = g.add("MusubiLoRANetworkSettings", network_dim=4, network_alpha=4.0, network_dropout=0.0, rank_dropout=0.0,
                    module_dropout=0.0, loraplus_lr_ratio=4.0, exclude_patterns="", include_patterns="",
                    network_type=network_type, lokr_factor=-1)
    g.add("PreviewAny", source=network[0])
    error = comfy.run_error(g.to_dict(), timeout=120)
    assert "loraplus_lr_ratio" in error and "LoRA Network Settings" in error


@pytest.mark.parametrize("network_type", TYPES)
def test_ema_merge_and_fp8_loading_take_the_type(comfy, tiny_model_file, text_embedding_file, network_type):
    arch = "wan21_t2v"
    name = f"types_ema_{network_type}"
    g, _, _, _ = _training_graph(comfy, arch, tiny_model_file, text_embedding_file, steps=3, output_name=name,
                                 network_type=network_type, rank=4, save_every=1)
    comfy.run(g.to_dict(), timeout=600)

    g = Graph()
    merged = g.add("MusubiPostHocEMAMerge", checkpoints=f"{name}/*.safetensors", output_name=f"ema/{name}", mode="beta",
                   beta=0.5, beta2=0.5, sigma_rel=0.2, order="as listed")
    g.add("PreviewAny", source=merged[1])
    comfy.run(g.to_dict(), timeout=300)
    ema = safetensors.torch.load_file(comfy.models_dir("loras") / "ema" / f"{name}.safetensors")
    steps = [safetensors.torch.load_file(comfy.models_dir("loras") / name / f"{name}-step{s:06d}.safetensors") for s in (1, 2, 3)]
    assert set(ema) == set(steps[0])
    for key, value in ema.items():
        if not key.endswith(".alpha"):
            torch.testing.assert_close(value, 0.25 * steps[0][key] + 0.25 * steps[1][key] + 0.5 * steps[2][key])

    # Load DiT (fp8 scaled): the file merged into the bf16 weights before quantizing, and the file
    # applied at full precision on top of the fp8 weights by core LoraLoaderModelOnly, both change the
    # fp8 model's sampling as the file changes the bf16 model's (strength 8 lifts the change of a
    # 3-step run well above fp8's quantization noise).
    lora, strength = f"{name}/{name}.safetensors", 8.0
    g = Graph()
    fp8_merged = g.add("MusubiLoadDiTFP8Scaled", unet_name=tiny_model_file(arch), fp8_format="e4m3fn", mode="block",
                       block_size=64, compute_dtype="default", architecture="auto", loras=f"{lora}:{strength}", save_as="")
    fp8 = g.add("MusubiLoadDiTFP8Scaled", unet_name=tiny_model_file(arch), fp8_format="e4m3fn", mode="block",
                block_size=64, compute_dtype="default", architecture="auto", loras="", save_as="")
    fp8_patched = g.add("LoraLoaderModelOnly", model=fp8[0], lora_name=lora, strength_model=strength)
    bf16 = g.add("UNETLoader", unet_name=tiny_model_file(arch), weight_dtype="default")
    bf16_patched = g.add("LoraLoaderModelOnly", model=bf16[0], lora_name=lora, strength_model=strength)
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(arch), architecture="wan")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    models = {"fp8_merged": fp8_merged, "fp8_patched": fp8_patched, "fp8": fp8, "bf16_lora": bf16_patched, "bf16": bf16}
    for prefix, model in models.items():
        sampled = g.add("KSampler", model=model[0], positive=positive[0], negative=positive[0], latent_image=latent[0],
                        seed=1, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
        g.add("SaveLatent", samples=sampled[0], filename_prefix=f"types_fp8/{network_type}_{prefix}")
    outputs = comfy.run(g.to_dict(), timeout=900)
    assert "merged into" in outputs[str(fp8_merged)]["text"][0]
    latents = {prefix: comfy.saved_latent("types_fp8", f"{network_type}_{prefix}").float() for prefix in models}

    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    effect = latents["bf16_lora"] - latents["bf16"]
    noise = distance(latents["fp8"], latents["bf16"])
    assert distance(latents["bf16_lora"], latents["bf16"]) > 3 * noise
    for path in ("fp8_merged", "fp8_patched"):
        assert distance(latents[path] - latents["fp8"], effect) < 0.25, path


def _losses(comfy, g, train) -> list[float]:
    shown = g.add("PreviewAny", source=train[2])
    outputs = comfy.run(g.to_dict(), timeout=900)
    return json.loads(preview_text(outputs, shown))["loss"]


@pytest.mark.parametrize("network_type", TYPES)
def test_checkpointing_compile_fp8_weights_and_both_wan22_experts_train_the_type(comfy, tiny_model_file,
                                                                                 text_embedding_file, network_type):
    """The same hooks as LoRA: checkpointed and compiled runs train exactly as plain ones, fp8-scaled
    frozen weights train, and one network trains on both Wan 2.2 A14B experts."""
    arch, runs = "wan21_t2v", {}
    for variant in ("plain", "checkpointed", "compiled", "fp8"):
        g, model, _, train = _training_graph(comfy, arch, tiny_model_file, text_embedding_file, steps=2, rank=4,
                                             output_name=f"types_{variant}_{network_type}", network_type=network_type,
                                             gradient_checkpointing=variant == "checkpointed")
        if variant == "compiled":
            settings = g.add("MusubiCompileSettings", dynamo_backend="EAGER", dynamo_mode="default",
                             dynamo_fullgraph=False, dynamo_dynamic=False)
            g.nodes[str(train)]["inputs"]["compile_settings"] = settings[0]
        if variant == "fp8":
            g.nodes[str(model)] = {"class_type": "MusubiLoadDiTFP8Scaled", "inputs": dict(
                unet_name=tiny_model_file(arch), fp8_format="e4m3fn", mode="block", block_size=64,
                compute_dtype="default", architecture="auto", loras="", save_as="")}
        runs[variant] = _losses(comfy, g, train)
    assert runs["checkpointed"] == pytest.approx(runs["plain"], rel=1e-4, abs=1e-6)
    assert runs["compiled"] == pytest.approx(runs["plain"], rel=1e-5)
    assert all(0 < loss < 100 for loss in runs["fp8"]) and runs["fp8"] == pytest.approx(runs["plain"], rel=0.1)

    g, _, _, train = _training_graph(comfy, "wan22_a14b_low", tiny_model_file, text_embedding_file, steps=6, rank=4,
                                     output_name=f"types_a14b_{network_type}", batch_size=2, latent_count=4,
                                     network_type=network_type)
    high = g.add("UNETLoader", unet_name=tiny_model_file("wan22_a14b_high"), weight_dtype="default")
    g.nodes[str(train)]["inputs"].update(model_high_noise=high[0], timestep_boundary=0.5)
    summary = comfy.run(g.to_dict(), timeout=600)[str(train)]["text"][0]
    batches = {name: int(count) for count, name in re.findall(r"(\d+) batches? on the (high|low)-noise expert", summary)}
    assert batches.get("high", 0) > 0 and batches.get("low", 0) > 0 and sum(batches.values()) == 6, summary
