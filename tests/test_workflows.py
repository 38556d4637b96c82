"""Every shipped workflow is valid against the live node definitions and runs headless.

``workflows/<name>.json`` is the UI format (what ComfyUI offers as a template, with a thumbnail
``<name>.jpg`` beside it); ``workflows/api/<name>.api.json`` is its API-format twin, which must
equal the conversion of the UI form.

A workflow names the files users download. For the headless run each one is replaced by a
tiny stand-in written under the same name (``FIXTURES``: workflow → how to prepare the server):

==========================  ================================================================
file in the workflow        stand-in written under its name
==========================  ================================================================
diffusion model             tiny checkpoint with the real key layout (``DIFFUSION_MODELS``)
LoRA                        rank-4 LoRA on a few layers of that tiny model
VAE                         ComfyUI's own VAE of that kind, random weights (``VAES``)
Load Image input            a 64×48 noise picture
Load Video input            a 5-frame 64×48 noise video
==========================  ================================================================

Text encoders and CLIP vision cannot be stand-ins: ComfyUI builds them at their full size
(billions of parameters) whatever the file holds. Those nodes, and sizes and step counts that
would take minutes on a CPU, are replaced in the API graph before it is queued
(``HEADLESS_SUBSTITUTIONS``, applied by ``headless_graph``):

====================================  ==========================================================
node (or widget) in the workflow      in the headless run
====================================  ==========================================================
CLIPLoader, DualCLIPLoader            removed (umt5-xxl, llava-llama-3, T5-XXL, Qwen2.5-VL: GBs)
CLIPTextEncode                        Load Text Embedding (cached) of a random embedding of the
                                      text width (and pooled width) its loader's ``type`` gives
CLIPVisionLoader, CLIPVisionEncode    removed; the ``clip_vision_output`` they fed stays empty
                                      (CLIP ViT-H is 632 M parameters) — except for FramePack
                                      Sampler, which needs it: Load Image Embedding of a random
                                      SigLIP-shaped embedding (``tiny_framepack``), which then also
                                      feeds the FramePack Training Settings it fed
FluxKontextImageScale                 core ImageScale to 64×64 (it scales to ~1 megapixel)
width/height/length of latent makers  at most 64×64, 1 frame (EmptyHunyuanLatentVideo, EmptySD3-
and ImageScale                        LatentImage, WanImageToVideo, Wan22ImageToVideoLatent, ImageScale;
                                      decoding frames with the full-size video VAEs takes seconds each)
steps                                 MagCache Sampler 1; KSamplerAdvanced and Calibrate MagCache 2
                                      (an A14B switch step becomes 1); Train LoRA 2
Training Dataset                      64×64 buckets; its ``clip``/``clip_vision`` stay empty: the
                                      captions are pre-encoded in the cache folder it is pointed to
Train LoRA ``mixed_precision``        no (bf16 autocast is very slow on CPUs)
Post-Hoc EMA Merge ``checkpoints``    the same glob inside ``headless_ema/``, where three stand-in step
                                      checkpoints wait (the real folder is the one the training
                                      workflow's own headless run writes)
FramePack Sampler                     1 section of 2 latent frames, 2 steps
FramePack Training Settings           latent window 1 (the 5-frame stand-in clip is 2 latent frames:
                                      one section)
Training Samples                      at most 64×64, 1 frame, 1 step (sampled once, with the final
                                      LoRA: the workflows sample at every checkpoint)
====================================  ==========================================================
"""

from __future__ import annotations

import copy
import json
import re
import urllib.request
from pathlib import Path

import pytest
import torch

from comfy_server import PACK_NAME, REPO_ROOT
from fixture_files import write_wan_lora_checkpoints
from musubi.data.plan import ARCHITECTURE_CODES
from musubi.data.text_embeddings import TextEmbedding, save_text_embedding
from render_thumbnails import THUMBNAIL_MAX_BYTES, THUMBNAIL_WIDTH, workflow_digest
from tiny_checkpoints import ARCHS, ensure_tiny_checkpoint
from tiny_framepack import clip_vision_stand_in, prepare_framepack_workflow, short_framepack_run
from workflow_fixtures import write_noise_image, write_noise_video, write_random_vaes, write_tiny_lora
from workflow_tools import check_ui_workflow, ui_to_api

pytestmark = pytest.mark.comfyui

WORKFLOWS = REPO_ROOT / "workflows"
API_WORKFLOWS = WORKFLOWS / "api"
UI_WORKFLOWS = sorted(WORKFLOWS.glob("*.json"))

# Real file name → tiny architecture (tiny_checkpoints.ARCHS) written under that name.
DIFFUSION_MODELS = {
    "wan2.1_t2v_1.3B_fp16.safetensors": "wan21_t2v",
    "wan2.1_i2v_480p_14B_fp16.safetensors": "wan21_i2v",
    "wan2.2_ti2v_5B_fp16.safetensors": "wan22_ti2v_5b",
    "wan2.2_t2v_high_noise_14B_fp16.safetensors": "wan22_a14b_high",
    "wan2.2_t2v_low_noise_14B_fp16.safetensors": "wan22_a14b_low",
    "hunyuan_video_t2v_720p_bf16.safetensors": "hunyuan_video",
    "flux1-kontext-dev.safetensors": "flux_kontext",
    "qwen_image_bf16.safetensors": "qwen_image",
}
# Real file name → the ComfyUI VAE kind (workflow_fixtures.VAE_DETECTION_KEYS) written under it.
VAES = {
    "wan_2.1_vae.safetensors": "wan21",
    "qwen_image_vae.safetensors": "wan21",  # Qwen-Image's VAE has the Wan 2.1 layout
    "wan2.2_vae.safetensors": "wan22",
    "hunyuan_video_vae_bf16.safetensors": "hunyuan_video",
    "ae.safetensors": "flux",
}
# Text-encoder loader ``type`` → the tiny architecture whose text width the stand-in embedding has.
TEXT_ENCODER_TYPES = {"wan": "wan21_t2v", "hunyuan_video": "hunyuan_video", "flux": "flux_kontext", "qwen_image": "qwen_image"}
HEADLESS_SIZE = {"width": 64, "height": 64, "length": 1}
HEADLESS_SAMPLING_STEPS = 1  # a Flux/Qwen-Image stand-in step takes ~5 s on a CPU
HEADLESS_TRAINING_STEPS = 2  # a loss curve of two points, not one


# --- preparing the server's folders ----------------------------------------------------------

class StandIns:
    """Writes stand-in files into the server's folders. The big ones (tiny Flux/Qwen-Image
    checkpoints, VAEs) are made once into a cache folder that outlives the session (pytest's
    cache, keyed by ComfyUI's version) and linked from there."""

    def __init__(self, comfy, cache: Path):
        self.comfy = comfy
        self.cache = cache

    def _link(self, source: Path, target: Path) -> None:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)

    def diffusion_model(self, name: str) -> None:
        self._link(ensure_tiny_checkpoint(DIFFUSION_MODELS[name], self.cache), self.comfy.models_dir("diffusion_models") / name)

    def vaes(self, names: list[str]) -> None:
        version = _comfyui_version(self.comfy.comfy_path)
        cached = {kind: self.cache / f"random_vae_{kind}_comfyui{version}_v{VAE_FIXTURE_VERSION}.safetensors"
                  for kind in set(VAES.values())}
        missing = {kind: path for kind, path in cached.items() if not path.is_file()}
        if missing and any(VAES[name] in missing for name in names):
            write_random_vaes(missing, self.comfy.comfy_path)  # every kind at once: one ComfyUI import
        for name in names:
            self._link(cached[VAES[name]], self.comfy.models_dir("vae") / name)


VAE_FIXTURE_VERSION = 1  # bump when workflow_fixtures changes how VAEs are made


def _comfyui_version(comfy_path: Path) -> str:
    version_file = comfy_path / "comfyui_version.py"
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", version_file.read_text()) if version_file.is_file() else None
    return match.group(1) if match else "unknown"


@pytest.fixture(scope="session")
def stand_ins(comfy, request, tmp_path_factory) -> StandIns:
    try:
        cache = request.config.cache.mkdir("musubi-workflow-stand-ins")
    except AttributeError:  # the cache plugin is off (-p no:cacheprovider)
        cache = tmp_path_factory.mktemp("stand-ins")
    return StandIns(comfy, Path(cache))

def api_twin(name: str) -> Path:
    return API_WORKFLOWS / f"{name}.api.json"


HEADLESS_EMA_FOLDER = "headless_ema"


def _prepare_calibrate_magcache(stand_ins):
    """The Wan 2.1 T2V 1.3B file and the two cached prompts (what cache_prompts writes), as stand-ins."""
    comfy = stand_ins.comfy
    _prepare_named_files(stand_ins, json.loads(api_twin("calibrate_magcache").read_text()))
    for seed, name in enumerate(("magcache_positive", "magcache_negative")):
        path = comfy.models_dir("text_embeddings") / "prompts" / f"{name}.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            context = torch.randn(7, 4096, generator=torch.Generator().manual_seed(seed))
            save_text_embedding(path, TextEmbedding(context=context, architecture="wan", extra={}))


def _prepare_ema_merge(stand_ins):
    """Three step checkpoints of a run, named as Train LoRA names them, under ``headless_ema/``
    in the folder the workflow's glob names (see ``_headless_ema``)."""
    [merge] = [n for n in json.loads(api_twin("post_hoc_ema_merge").read_text()).values()
               if n["class_type"] == "MusubiPostHocEMAMerge"]
    run = Path(merge["inputs"]["checkpoints"]).parent.name
    folder = stand_ins.comfy.models_dir("loras") / HEADLESS_EMA_FOLDER / run
    if not folder.exists():
        written = write_wan_lora_checkpoints(folder, count=3)
        for step, path in enumerate(written, 1):
            path.rename(folder / f"{run}-step{step * 100:06d}.safetensors")  # rename keeps the order by mtime


def _model_arch_of(graph: dict, link) -> str:
    """The tiny architecture of the diffusion model a MODEL link comes from."""
    node = graph[link[0]]
    while "unet_name" not in node["inputs"]:
        node = graph[node["inputs"]["model"][0]]
    return DIFFUSION_MODELS[node["inputs"]["unet_name"]]


def _prepare_named_files(stand_ins: StandIns, graph: dict) -> None:
    """Writes a stand-in for every model, LoRA, VAE and input image the API graph names."""
    comfy, vaes = stand_ins.comfy, []
    for node in graph.values():
        inputs = node["inputs"]
        if "unet_name" in inputs:
            stand_ins.diffusion_model(inputs["unet_name"])
        if node["class_type"] == "LoraLoaderModelOnly":
            path = comfy.models_dir("loras") / inputs["lora_name"]
            if not path.exists():
                write_tiny_lora(_model_arch_of(graph, inputs["model"]), path)
        if "vae_name" in inputs:
            vaes.append(inputs["vae_name"])
        for key in ("clip_name", "clip_name1", "clip_name2", "clip_name3"):
            if key in inputs:  # listed for the widget check only: headless runs drop these loaders
                folder = "clip_vision" if node["class_type"] == "CLIPVisionLoader" else "text_encoders"
                path = comfy.models_dir(folder) / inputs[key]
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(b"")
        if node["class_type"] == "LoadImage":
            path = comfy.input_dir / inputs["image"]
            if not path.exists():
                write_noise_image(path)
        if node["class_type"] == "LoadVideo":
            path = comfy.input_dir / inputs["file"]
            if not path.exists():
                write_noise_video(path)
        if node["class_type"] == "MusubiDataset":
            _prepare_dataset(comfy, graph, node)
    stand_ins.vaes(vaes)


# Training Dataset stand-in: two noise images with captions (and control images) in its source
# folder; their captions pre-encoded (random embeddings of the model's text width) in the cache
# folder the headless run points it to, so it needs no text encoder.
DATASET_ITEMS = {"fox_wide": (64, 48), "fox_tall": (48, 64)}
DATASET_TEXT_ARCH = {"wan": "wan21_t2v", "hunyuan_video": "hunyuan_video", "flux": "flux_kontext", "qwen_image": "qwen_image"}


def _headless_dataset_cache(graph: dict, node: dict) -> str:
    """Cache folder (inside output/) of a dataset node in the headless run: one per model family and VAE."""
    vae = graph[node["inputs"]["vae"][0]]["inputs"]["vae_name"]
    return f"headless_datasets/{node['inputs']['architecture']}_{Path(vae).stem}"


def _prepare_dataset(comfy, graph: dict, node: dict) -> None:
    inputs = node["inputs"]
    source, controls = comfy.input_dir / inputs["source"], inputs.get("control_folder", "")
    cache = comfy.output_dir / _headless_dataset_cache(graph, node)
    tiny = ARCHS[DATASET_TEXT_ARCH[inputs["architecture"]]]
    for seed, (name, (width, height)) in enumerate(DATASET_ITEMS.items()):
        caption = f"sks fox, test pattern {seed}"
        if not (source / f"{name}.png").exists():
            write_noise_image(source / f"{name}.png", width, height, seed=seed)
            (source / f"{name}{inputs['caption_extension']}").write_text(caption)
        if controls and not (comfy.input_dir / controls / f"{name}.png").exists():
            write_noise_image(comfy.input_dir / controls / f"{name}.png", width, height, seed=seed + 10)
        text_cache = cache / f"{name}_{ARCHITECTURE_CODES[inputs['architecture']][0]}_te.safetensors"
        if not text_cache.exists():
            cache.mkdir(parents=True, exist_ok=True)
            generator = torch.Generator().manual_seed(seed)
            context = torch.randn(6, tiny.text_dim, generator=generator)
            pooled = None if tiny.pooled_dim is None else torch.randn(tiny.pooled_dim, generator=generator)
            save_text_embedding(text_cache, TextEmbedding(context, pooled, tiny.family, {}), caption=caption)


def _prepare_from_workflow(name: str):
    def prepare(stand_ins):
        _prepare_named_files(stand_ins, json.loads(api_twin(name).read_text()))
    prepare.__doc__ = f"Stand-ins for the files {name} names."
    return prepare


ARCHITECTURE_WORKFLOWS = [
    f"{arch}_{kind}"
    for arch in ("wan21_t2v", "wan21_i2v", "wan22_ti2v_5b", "wan22_a14b", "hunyuan_video", "flux_kontext", "qwen_image")
    for kind in ("inference", "training")
]

FIXTURES = {
    "post_hoc_ema_merge": _prepare_ema_merge,
    "calibrate_magcache": _prepare_calibrate_magcache,
    "cache_prompts": _prepare_from_workflow("cache_prompts"),
    "timestep_distribution_preview": lambda stand_ins: None,
    **{name: _prepare_from_workflow(name) for name in ARCHITECTURE_WORKFLOWS},
    "framepack_i2v": lambda stand_ins: prepare_framepack_workflow(
        stand_ins, json.loads(api_twin("framepack_i2v").read_text()), _prepare_named_files),
    "framepack_training": lambda stand_ins: prepare_framepack_workflow(
        stand_ins, json.loads(api_twin("framepack_training").read_text()), _prepare_named_files),
}


# --- the headless graph ----------------------------------------------------------------------

def _text_encoder_type(graph: dict, clip_link) -> str:
    return graph[clip_link[0]]["inputs"]["type"]


def _text_embedding(graph, node_id, node, embedding_file):
    arch = TEXT_ENCODER_TYPES[_text_encoder_type(graph, node["inputs"]["clip"])]
    return {"class_type": "MusubiLoadTextEmbedding",
            "inputs": {"embedding": embedding_file(arch), "architecture": "auto", "path": ""}}


def _removed(graph, node_id, node, embedding_file):
    return None


def _small_image(graph, node_id, node, embedding_file):
    return {"class_type": "ImageScale",
            "inputs": {"image": node["inputs"]["image"], "upscale_method": "bilinear", "crop": "center",
                       "width": HEADLESS_SIZE["width"], "height": HEADLESS_SIZE["height"]}}


def _small_size(graph, node_id, node, embedding_file):
    inputs = dict(node["inputs"])
    inputs.update({key: min(value, inputs[key]) for key, value in HEADLESS_SIZE.items() if key in inputs})
    return {**node, "inputs": inputs}


def _cached_dataset(graph, node_id, node, embedding_file):
    small = _small_size(graph, node_id, node, embedding_file)
    small["inputs"]["cache_folder"] = _headless_dataset_cache(graph, node)
    return small


def _cpu_training(graph, node_id, node, embedding_file):
    inputs = {**node["inputs"], "steps": HEADLESS_TRAINING_STEPS, "mixed_precision": "no"}
    return {**node, "inputs": inputs}


def _headless_ema(graph, node_id, node, embedding_file):
    lines = [f"{HEADLESS_EMA_FOLDER}/{line.strip()}" if line.strip() else line
             for line in node["inputs"]["checkpoints"].splitlines()]
    return {**node, "inputs": {**node["inputs"], "checkpoints": "\n".join(lines)}}


def _one_latent_frame_window(graph, node_id, node, embedding_file):
    return {**node, "inputs": {**node["inputs"], "latent_window_size": 1}}


def _small_training_samples(graph, node_id, node, embedding_file):
    small = _small_size(graph, node_id, node, embedding_file)
    small["inputs"]["steps"] = HEADLESS_SAMPLING_STEPS
    return small


def _one_step(graph, node_id, node, embedding_file):
    return {**node, "inputs": {**node["inputs"], "steps": HEADLESS_SAMPLING_STEPS}}


def _two_steps(graph, node_id, node, embedding_file):
    """2 steps; a KSamplerAdvanced switch step moves to 1 (0 and "to the end" stay)."""
    inputs = {**node["inputs"], "steps": 2}
    for key in ("start_at_step", "end_at_step"):
        if key in inputs and 0 < inputs[key] < 10000:
            inputs[key] = 1
    return {**node, "inputs": inputs}


# class_type → (stand-in builder, why). The builder returns the new node, or None to remove it.
HEADLESS_SUBSTITUTIONS = {
    "CLIPLoader": (_removed, "text encoders are built at full size whatever the file holds"),
    "DualCLIPLoader": (_removed, "text encoders are built at full size whatever the file holds"),
    "CLIPTextEncode": (_text_embedding, "a random cached embedding of the encoder's width replaces encoding"),
    "CLIPVisionLoader": (_removed, "CLIP vision ViT-H is built at full size (632 M parameters)"),
    "CLIPVisionEncode": (clip_vision_stand_in, "CLIP vision is built at full size; FramePack gets a cached SigLIP stand-in"),
    "FluxKontextImageScale": (_small_image, "it scales to ~1 megapixel"),
    "EmptyHunyuanLatentVideo": (_small_size, "tiny latents"),
    "EmptySD3LatentImage": (_small_size, "tiny latents"),
    "WanImageToVideo": (_small_size, "tiny latents"),
    "Wan22ImageToVideoLatent": (_small_size, "tiny latents"),
    "ImageScale": (_small_size, "tiny training images"),
    "MusubiDataset": (_cached_dataset, "64×64 buckets; captions pre-encoded in its cache (no text encoder)"),
    "MusubiMagCacheSampler": (_one_step, "seconds per step for the ~400 M-parameter Flux/Qwen stand-ins"),
    "MusubiCalibrateMagCache": (_two_steps, "ratios need two steps"),
    "KSamplerAdvanced": (_two_steps, "one step per Wan 2.2 A14B expert"),
    "MusubiTrainLoRA": (_cpu_training, "2 steps, no bf16 autocast (very slow on CPUs)"),
    "MusubiPostHocEMAMerge": (_headless_ema, "stand-in checkpoints under headless_ema/: the training run writes the real folder"),
    "MusubiFramePackSampler": (short_framepack_run, "decoding a 5 s video with the full-size VAE takes minutes"),
    "MusubiTrainingSamples": (_small_training_samples, "full-size VAEs decode for seconds per frame on a CPU"),
    "MusubiFramePackTrainingSettings": (_one_latent_frame_window, "window 9 needs a 37-frame clip; the stand-in has 5 (full-size VAE on a CPU)"),
}


def headless_graph(graph: dict, embedding_file) -> dict:
    """The API graph with ``HEADLESS_SUBSTITUTIONS`` applied; links to removed nodes are dropped
    (only optional inputs may lose their link: those the removed CLIP-vision nodes feed, and
    the Training Dataset's text encoder and CLIP vision)."""
    result = {}
    for node_id, node in graph.items():
        rule = HEADLESS_SUBSTITUTIONS.get(node["class_type"])
        replaced = copy.deepcopy(node) if rule is None else rule[0](graph, node_id, node, embedding_file)
        if replaced is not None:
            result[node_id] = replaced
    for node in result.values():
        for name, value in list(node["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in result:
                assert graph[value[0]]["class_type"] in ("CLIPVisionEncode",) or node["class_type"] == "MusubiDataset", (
                    f"{node['class_type']}.{name} lost its link")
                del node["inputs"][name]
    return result


# --- tests -------------------------------------------------------------------------------------

def _api_twin(ui_path: Path) -> Path:
    return api_twin(ui_path.stem)


def test_every_ui_workflow_has_an_api_twin_and_a_fixture():
    assert UI_WORKFLOWS, "no workflows shipped"
    for path in UI_WORKFLOWS:
        assert "nodes" in json.loads(path.read_text()), f"{path.name} is not in UI format: ComfyUI offers it as a template"
        assert _api_twin(path).is_file(), f"{path.name} has no API-format twin in workflows/api/"
        assert path.stem in FIXTURES, f"{path.name} has no fixture mapping for the headless run"
    for path in API_WORKFLOWS.iterdir():
        assert path.name.endswith(".api.json") and (WORKFLOWS / path.name.replace(".api.json", ".json")).is_file(), (
            f"workflows/api/{path.name} is no twin of a UI workflow")
    assert {path.name for path in WORKFLOWS.iterdir()} == (
        {path.name for path in UI_WORKFLOWS} | {f"{path.stem}.jpg" for path in UI_WORKFLOWS} | {"api"}), (
        "workflows/ holds only UI workflows, their thumbnails and api/")


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_every_workflow_groups_its_stages(path):
    """Groups name the stages (models, data, training, sampling, saving); tests/test_browser.py checks
    that every node but the notes lies inside one, as the frontend lays it out."""
    groups = json.loads(path.read_text())["groups"]
    assert groups and all(group["title"] for group in groups)


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_every_ui_workflow_has_a_current_thumbnail(path):
    from PIL import Image

    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), f"{thumbnail.name} is missing: run python3 tests/render_thumbnails.py {path.stem}"
    assert thumbnail.stat().st_size <= THUMBNAIL_MAX_BYTES
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG" and image.width == THUMBNAIL_WIDTH
        recorded = image.info.get("comment", b"").decode()
    assert recorded == workflow_digest(path), (
        f"{thumbnail.name} shows an older {path.name}: run python3 tests/render_thumbnails.py {path.stem}")


# Where loaders take each model file from (properties.models "directory"), by node type and input.
MODEL_FOLDERS = {("MusubiLoadDiTFP8Scaled", "unet_name"): "diffusion_models", ("UNETLoader", "unet_name"): "diffusion_models",
                 ("CLIPLoader", "clip_name"): "text_encoders", ("DualCLIPLoader", "clip_name1"): "text_encoders",
                 ("DualCLIPLoader", "clip_name2"): "text_encoders", ("VAELoader", "vae_name"): "vae",
                 ("CLIPVisionLoader", "clip_name"): "clip_vision"}


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_model_download_entries_name_the_loaded_file_in_its_folder(path):
    """properties.models (read by the frontend's missing-models dialog): each entry is a file this
    node loads, in the folder it loads it from, downloaded from Comfy-Org's own Hugging Face repositories."""
    workflow = json.loads(path.read_text())
    twin = json.loads(_api_twin(path).read_text())
    for node in workflow["nodes"]:
        for model in node.get("properties", {}).get("models", []):
            assert set(model) == {"name", "url", "directory"}, model
            inputs = twin[str(node["id"])]["inputs"]
            loaded = {value: MODEL_FOLDERS[node["type"], key] for key, value in inputs.items() if (node["type"], key) in MODEL_FOLDERS}
            assert loaded.get(model["name"]) == model["directory"], f"node {node['id']}: {model} is not what it loads ({loaded})"
            assert re.fullmatch(r"https://huggingface\.co/Comfy-Org/[\w.-]+/resolve/main/([\w.-]+/)*" + re.escape(model["name"]),
                                model["url"]), model["url"]


def test_the_ema_workflow_merges_what_a_training_workflow_writes():
    """Its glob names a training workflow's output folder, and the weights its note quotes are those
    its settings give to the checkpoints the training workflows keep."""
    from musubi.lora.ema import effective_weights, merge_decays

    ema = json.loads(api_twin("post_hoc_ema_merge").read_text())
    [merge] = [n["inputs"] for n in ema.values() if n["class_type"] == "MusubiPostHocEMAMerge"]
    trained = {n["inputs"]["output_name"] for name in ARCHITECTURE_WORKFLOWS + ["framepack_training"] if name.endswith("_training")
               for n in json.loads(api_twin(name).read_text()).values() if n["class_type"] == "MusubiTrainLoRA"}
    assert merge["checkpoints"] in {f"{name}/*.safetensors" for name in trained}
    kept = {n["inputs"]["save_last_n_checkpoints"] for name in ARCHITECTURE_WORKFLOWS + ["framepack_training"] if name.endswith("_training")
            for n in json.loads(api_twin(name).read_text()).values() if n["class_type"] == "MusubiCheckpointSettings"}
    assert len(kept) == 1, kept
    mode = {"beta": {"beta": merge["beta"]}, "beta_to_beta2": {"beta": merge["beta"], "beta2": merge["beta2"]},
            "sigma_rel": {"sigma_rel": merge["sigma_rel"]}}[merge["mode"]]
    weights = effective_weights(merge_decays(kept.pop(), **mode))
    assert max(weights) < 0.6 and weights[0] < 0.1, f"the merge should spread its weight over the newer checkpoints: {weights}"
    quoted = ", ".join(f"{w:.2f}" for w in weights)
    notes = [n["widgets_values"][0] for n in json.loads((WORKFLOWS / "post_hoc_ema_merge.json").read_text())["nodes"] if n["type"] == "Note"]
    assert any(quoted in note for note in notes), f"the EMA note should quote the weights {quoted}"


def test_cache_prompts_writes_the_prompts_calibrate_magcache_loads():
    saved = sorted(n["inputs"]["filename"] + ".safetensors" for n in json.loads(api_twin("cache_prompts").read_text()).values()
                   if n["class_type"] == "MusubiSaveTextEmbedding")
    loaded = sorted(n["inputs"]["embedding"] for n in json.loads(api_twin("calibrate_magcache").read_text()).values()
                    if n["class_type"] == "MusubiLoadTextEmbedding")
    assert saved == loaded
    [calibrate] = [n for n in json.loads(api_twin("calibrate_magcache").read_text()).values() if n["class_type"] == "MusubiCalibrateMagCache"]
    assert calibrate["inputs"]["filename"] == "", "an empty filename names the file after the run's steps, sampler and scheduler"


def test_inference_notes_say_how_to_sample_without_the_lora():
    """ComfyUI validates the LoRA file whatever the strength: the notes say to train first or bypass."""
    for name in ARCHITECTURE_WORKFLOWS:
        if name.endswith("_inference"):
            notes = " ".join(n["widgets_values"][0] for n in json.loads((WORKFLOWS / f"{name}.json").read_text())["nodes"]
                             if n["type"] == "Note")
            assert "Ctrl+B" in notes and "strength 0" not in notes, name


@pytest.mark.comfyui
def test_comfyui_offers_every_ui_workflow_as_a_template_with_its_thumbnail(comfy):
    listed = comfy.get_json("/workflow_templates")[PACK_NAME]
    assert sorted(listed) == [path.stem for path in UI_WORKFLOWS]
    for name in listed:
        with urllib.request.urlopen(f"{comfy.url}/api/workflow_templates/{PACK_NAME}/{name}.json", timeout=10) as answer:
            assert "nodes" in json.loads(answer.read()), f"{name}: the frontend cannot load a template without nodes"
        with urllib.request.urlopen(f"{comfy.url}/api/workflow_templates/{PACK_NAME}/{name}.jpg", timeout=10) as answer:
            assert answer.read() == (WORKFLOWS / f"{name}.jpg").read_bytes()


def test_every_architecture_has_inference_and_training_workflows():
    shipped = {path.stem for path in UI_WORKFLOWS}
    assert set(ARCHITECTURE_WORKFLOWS) <= shipped, sorted(set(ARCHITECTURE_WORKFLOWS) - shipped)


def test_headless_graph_swaps_text_encoders_and_shrinks_sizes():
    graph = json.loads(api_twin("wan21_i2v_inference").read_text())
    headless = headless_graph(graph, lambda arch: f"random_{arch}.safetensors")
    classes = {node["class_type"] for node in headless.values()}
    assert not classes & {"CLIPLoader", "DualCLIPLoader", "CLIPTextEncode", "CLIPVisionLoader", "CLIPVisionEncode"}
    assert "MusubiLoadTextEmbedding" in classes
    [i2v] = [node for node in headless.values() if node["class_type"] == "WanImageToVideo"]
    assert "clip_vision_output" not in i2v["inputs"] and "start_image" in i2v["inputs"]
    assert (i2v["inputs"]["width"], i2v["inputs"]["height"], i2v["inputs"]["length"]) == (64, 64, 1)
    assert graph == json.loads(api_twin("wan21_i2v_inference").read_text()), "the input graph was changed"


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_matches_live_nodes_and_its_api_twin(comfy, stand_ins, path):
    FIXTURES[path.stem](stand_ins)  # the files a workflow names must be listed for its widgets to be valid
    info = comfy.object_info()
    workflow = json.loads(path.read_text())
    assert check_ui_workflow(workflow, info) == []
    assert any(node["type"] in ("Note", "MarkdownNote") for node in workflow["nodes"]), "explain the steps in a Note"
    assert ui_to_api(workflow, info) == json.loads(_api_twin(path).read_text())


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_api_twin_runs_headless(comfy, stand_ins, path, text_embedding_file):
    FIXTURES[path.stem](stand_ins)
    graph = headless_graph(json.loads(_api_twin(path).read_text()), text_embedding_file)
    outputs = comfy.run(graph, timeout=600)
    assert outputs, "the workflow produced no output"
    for node_id, node in graph.items():
        if node["class_type"] in ("SaveImage", "SaveVideo", "MusubiMagCacheSampler", "MusubiTrainLoRA"):
            assert node_id in outputs, f"{node['class_type']} (node {node_id}) showed nothing"
        if node["class_type"] in ("SaveImage", "SaveVideo"):
            for item in outputs[node_id]["images"]:
                saved = comfy.output_dir / item["subfolder"] / item["filename"]
                assert saved.is_file() and saved.stat().st_size > 0, saved
        if node["class_type"] == "MusubiTrainLoRA":
            name = node["inputs"]["output_name"]
            assert (comfy.models_dir("loras") / name / f"{name}.safetensors").is_file()
            if "samples" in node["inputs"]:  # Training Samples: at least the final LoRA's sample was drawn
                summary = outputs[node_id]["text"][0]  # the run may have taken a new name: its summary says where
                folder = re.search(r"\nsamples: \d+ file\(s\) in (.+?): ", summary)
                assert folder and list(Path(folder.group(1)).glob("*-step*-p1.*")), f"no training sample: {summary}"


def test_frontend_extensions_are_served(comfy):
    for script in (REPO_ROOT / "web").glob("*.js"):
        url = f"{comfy.url}/extensions/{PACK_NAME}/{script.name}"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200 and response.read() == script.read_bytes()
