"""Tiny FramePack checkpoints in the layouts users download, and files that must be refused.

Built on ``tiny_checkpoints`` (arch ``"framepack"``: the diffusers
``HunyuanVideoFramepackTransformer3DModel`` key layout, its config in the file metadata):

* :func:`write_framepack_folder` — lllyasviel's diffusers layout: ``config.json``, the weights
  split over ``diffusion_pytorch_model-0000N-of-00003.safetensors`` and the weight index;
* :func:`write_framepack_file` — a single-file conversion (same unprefixed names);
* :func:`write_plain_fp8_file` — a "fp8" cast without scales, as the Kijai fp8 files are;
* :func:`write_framepack_lora` — a LoRA in ComfyUI's ``diffusion_model.<module>`` layout;
* :func:`framepack_conditioning` — text, pooled and SigLIP-shaped tensors for the tiny model.
"""

from __future__ import annotations

import json
import pathlib

import torch
from safetensors.torch import save_file

from tiny_checkpoints import framepack_config, tiny_metadata, tiny_state_dict, write_tiny_checkpoint

SHARDS = 3


def write_framepack_file(path, seed: int = 0) -> pathlib.Path:
    return write_tiny_checkpoint("framepack", path, seed=seed)


def write_framepack_folder(folder, seed: int = 0) -> pathlib.Path:
    """``folder`` as the diffusers download: config.json, three shards and their index."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = tiny_state_dict("framepack", seed=seed)
    keys = list(state_dict)
    per_shard = -(-len(keys) // SHARDS)
    weight_map = {}
    for shard in range(SHARDS):
        name = f"diffusion_pytorch_model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors"
        part = {key: state_dict[key] for key in keys[shard * per_shard:(shard + 1) * per_shard]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = {**framepack_config(), "_diffusers_version": "0.33.0.dev0"}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def write_plain_fp8_file(path, seed: int = 0) -> pathlib.Path:
    """Every floating tensor cast to float8_e4m3fn, no scales (the "FramePack fp8" single files)."""
    state_dict = {key: tensor.to(torch.float8_e4m3fn) for key, tensor in tiny_state_dict("framepack", seed=seed).items()}
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(path), metadata=tiny_metadata("framepack", seed))
    return path


def write_unprefixed_without_metadata(path, seed: int = 0) -> pathlib.Path:
    """The tiny model as a single file with no config metadata (its head width is not 128)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_state_dict("framepack", seed=seed), str(path), metadata={"format": "pt"})
    return path


def write_framepack_lora(path, rank: int = 4, seed: int = 7, scale: float = 1.0) -> pathlib.Path:
    """A LoRA on two block layers of the tiny model in ComfyUI's ``diffusion_model.`` layout."""
    hidden = 64
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in {
        "transformer_blocks.0.attn.to_q": (hidden, hidden),
        "single_transformer_blocks.1.proj_mlp": (4 * hidden, hidden),
    }.items():
        prefix = f"diffusion_model.{module}"
        tensors[f"{prefix}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * scale
        tensors[f"{prefix}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * scale
        tensors[f"{prefix}.alpha"] = torch.tensor(float(rank))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def framepack_conditioning(seed: int = 1, tokens: int = 7) -> dict[str, torch.Tensor]:
    """Random text states [1, L, 4096], pooled [1, 768] and a SigLIP-shaped embedding [1, 729, 1152]."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "context": torch.randn(1, tokens, 4096, generator=generator),
        "pooled": torch.randn(1, 768, generator=generator),
        "image_embeds": torch.randn(1, 729, 1152, generator=generator),
    }




# --- the example workflow's headless run (see test_workflows.py) ---------------------------------

WORKFLOW_MODEL_FOLDER = "FramePackI2V_HY"
IMAGE_EMBEDDING_STAND_IN = "framepack_siglip_stand_in.safetensors"


def prepare_framepack_workflow(stand_ins, graph: dict, prepare_named_files) -> None:
    """The FramePack folder under its real name, a SigLIP-shaped stand-in embedding, and whatever
    else the graph names (VAE, input image) through ``prepare_named_files(stand_ins, graph)``."""
    from musubi.data.image_embeddings import save_image_embedding

    comfy = stand_ins.comfy
    folder = comfy.models_dir("diffusion_models") / WORKFLOW_MODEL_FOLDER
    if not (folder / "config.json").exists():
        write_framepack_folder(folder)
    embedding = comfy.models_dir("image_embeddings") / IMAGE_EMBEDDING_STAND_IN
    if not embedding.exists():
        save_image_embedding(embedding, framepack_conditioning()["image_embeds"])
    prepare_named_files(stand_ins, graph)


def clip_vision_stand_in(graph, node_id, node, embedding_file):
    """CLIPVisionEncode feeding FramePack Sampler (a required input) becomes Load Image Embedding of
    the stand-in; feeding anything else it is removed."""
    feeds_framepack = any(
        other["class_type"] == "MusubiFramePackSampler" and other["inputs"].get("clip_vision_output", [None])[0] == node_id
        for other in graph.values()
    )
    if not feeds_framepack:
        return None
    return {"class_type": "MusubiLoadImageEmbedding", "inputs": {"embedding": IMAGE_EMBEDDING_STAND_IN, "path": ""}}


def short_framepack_run(graph, node_id, node, embedding_file):
    """One section of two latent frames in two steps (the decode of a 5 s video takes minutes on a CPU)."""
    inputs = dict(node["inputs"], steps=2, sections=1, latent_window_size=2)
    return {**node, "inputs": inputs}
