"""What the frontend gets from a real ComfyUI: Train LoRA's live-view events name their prompt and
go only to the client that queued it (Cancel, resume and new-name messages included); a missing
file in any of the pack's model pickers is refused when the prompt is queued, together with core
loaders' missing files; and the pack's own model folders keep models/<name> and their file filter
when extra_model_paths.yaml names them too."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from comfy_server import ComfyExecutionError, ComfyServer, Graph, find_comfyui, adamw_constant
from tiny_checkpoints import ARCHS

pytestmark = pytest.mark.comfyui

ARCH = "wan21_t2v"
TRAIN_EVENTS = "musubi.train."


def _latent_file(comfy, count: int = 2) -> str:
    tiny = ARCHS[ARCH]
    name = f"live_view_{ARCH}_{count}.latent"
    path = comfy.input_dir / name
    if not path.exists():
        latents = torch.randn((count, tiny.latent_channels, 1, 4, 4), generator=torch.Generator().manual_seed(0))
        safetensors.torch.save_file({"latent_tensor": latents, "latent_format_version_0": torch.tensor([])}, path)
    return name


def _train_graph(comfy, tiny_model_file, text_embedding_file, *, steps, output_name, resume="no", seed=3):
    g = Graph()
    model = g.add("UNETLoader", unet_name=tiny_model_file(ARCH), weight_dtype="default")
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(ARCH), architecture="auto")
    latents = g.add("LoadLatent", latent=_latent_file(comfy))
    optimizer = adamw_constant(g, 1e-2)
    network = g.add("MusubiLoRANetworkSettings", network_dim=4, network_alpha=4.0, network_dropout=0.0, rank_dropout=0.0,
                    module_dropout=0.0, loraplus_lr_ratio=0.0, exclude_patterns="", include_patterns="")
    train = g.add("MusubiTrainLoRA", model=model[0], latents=latents[0], conditioning=positive[0], steps=steps,
                  batch_size=1, gradient_accumulation_steps=1, seed=seed, output_name=output_name, resume=resume,
                  mixed_precision="no", gradient_checkpointing=False, network_settings=network[0],
                  optimizer_settings=optimizer[0])
    return g, train


def _finished(listener, prompt_id: str, timeout: float = 300) -> None:
    """Wait until the listener saw the prompt end (ComfyUI's last message of a run to its client)."""
    listener.wait_for(lambda kind, data: kind in ("execution_success", "execution_error", "execution_interrupted")
                      and data.get("prompt_id") == prompt_id, timeout, f"the end of prompt {prompt_id}")


def _of(listener, kind: str, prompt_id: str) -> list[dict]:
    return [data for data in listener.events(TRAIN_EVENTS + kind) if data.get("prompt_id") == prompt_id]


def test_progress_events_carry_the_prompt_id_and_reach_only_the_queuing_client(comfy, tiny_model_file, text_embedding_file):
    with comfy.listen() as queuing, comfy.listen() as other:
        g, train = _train_graph(comfy, tiny_model_file, text_embedding_file, steps=2, output_name="live_view_two_steps")
        prompt_id = comfy.queue_from(queuing.client_id, g.to_dict())
        _finished(queuing, prompt_id)
        assert comfy.wait(prompt_id)["status"]["status_str"] == "success"

        progress = _of(queuing, "progress", prompt_id)
        assert [event["step"] for event in progress] == [1, 2]
        for event in progress:
            assert event["node"] == str(train) and event["client_id"] == queuing.client_id
            assert isinstance(event["loss"], float) and event["lrs"]
        [finished] = _of(queuing, "status", prompt_id)
        assert finished["kind"] == "finished" and finished["text"].startswith("trained steps 1–2 of 2"), finished
        # Every Train LoRA event this client got belongs to its prompt; the other client got none.
        assert all(event.get("prompt_id") == prompt_id for event in queuing.events(prefix=TRAIN_EVENTS))
        time.sleep(0.5)
        assert other.events(prefix=TRAIN_EVENTS) == [], other.types()

        # A prompt queued without a client id (an API script) sends no live-view events to anybody.
        g, _ = _train_graph(comfy, tiny_model_file, text_embedding_file, steps=2, output_name="live_view_api", seed=4)
        anonymous = comfy.queue_from(None, g.to_dict())
        assert comfy.wait(anonymous)["status"]["status_str"] == "success"
        time.sleep(0.5)
        for listener in (queuing, other):
            assert [e for e in listener.events(prefix=TRAIN_EVENTS) if e.get("prompt_id") == anonymous] == []


def test_cancel_resume_and_new_name_messages_reach_the_node(comfy, tiny_model_file, text_embedding_file):
    name = "live_view_cancelled"
    with comfy.listen() as tab:
        g, train = _train_graph(comfy, tiny_model_file, text_embedding_file, steps=100_000, output_name=name,
                                resume="latest")
        prompt_id = comfy.queue_from(tab.client_id, g.to_dict())
        tab.wait_for(lambda kind, data: kind == TRAIN_EVENTS + "progress" and data["prompt_id"] == prompt_id
                     and data["step"] >= 2, 180, "training steps")
        comfy.interrupt()
        _finished(tab, prompt_id, 180)
        assert comfy.wait(prompt_id)["status"]["status_str"] == "error"  # an interrupted prompt

        [stopped] = _of(tab, "status", prompt_id)
        last_step = _of(tab, "progress", prompt_id)[-1]["step"]
        assert stopped["kind"] == "stopped" and stopped["node"] == str(train)
        match = re.match(r"Stopped at step (\d+) on request; resume from (\S+): queue again with resume = latest", stopped["text"])
        assert match, stopped["text"]
        stopped_at = int(match.group(1))
        assert stopped_at == last_step
        assert Path(match.group(2)).is_dir() and match.group(2).endswith(f"{name}-step{stopped_at:06d}-state")
        assert "resume states: " in stopped["text"]

        # Queued again: the node says it resumed, from which step.
        g, _ = _train_graph(comfy, tiny_model_file, text_embedding_file, steps=stopped_at + 2, output_name=name,
                            resume="latest")
        resumed_id = comfy.queue_from(tab.client_id, g.to_dict())
        _finished(tab, resumed_id)
        started, finished = _of(tab, "status", resumed_id)
        assert started["kind"] == "started"
        assert f"resumed '{name}' from its state of step {stopped_at}" in started["text"], started["text"]
        assert finished["kind"] == "finished"
        assert f"resumed '{name}' from its state of step {stopped_at}: " in finished["text"], finished["text"]
        assert [event["step"] for event in _of(tab, "progress", resumed_id)] == [stopped_at + 1, stopped_at + 2]

        # A fresh run into the used name: the node says which new name it took.
        g, _ = _train_graph(comfy, tiny_model_file, text_embedding_file, steps=1, output_name=name, resume="no", seed=5)
        fresh_id = comfy.queue_from(tab.client_id, g.to_dict())
        _finished(tab, fresh_id)
        started = _of(tab, "status", fresh_id)[0]
        assert started["kind"] == "started" and started["text"].startswith(f"new run '{name}_2': '{name}' already holds"), started


def _node_errors(comfy, graph: dict) -> dict[str, list[dict]]:
    """node id → errors that POST /prompt answers for a graph. ComfyUI refuses the prompt (HTTP 400)
    when no output is valid, else queues the valid outputs and still lists the others' errors."""
    try:
        answer = comfy.post_json("/prompt", {"prompt": graph, "client_id": comfy.client_id})
    except ComfyExecutionError as error:
        answer = error.details or {}
    else:
        comfy.wait(answer["prompt_id"])
    return {node: entry["errors"] for node, entry in (answer.get("node_errors") or {}).items()}


def test_missing_files_of_the_pack_pickers_are_refused_with_core_ones_when_queued(comfy, tiny_model_file, text_embedding_file):
    g = Graph()
    core = g.add("UNETLoader", unet_name="no_such_core_unet.safetensors", weight_dtype="default")
    fp8 = g.add("MusubiLoadDiTFP8Scaled", unet_name="no_such_fp8_source.safetensors", fp8_format="e4m3fn", mode="block",
                block_size=4, compute_dtype="default", architecture="auto")  # block_size below its min, too
    framepack = g.add("MusubiLoadFramePack", model_name="no_such_framepack", weight_dtype="bf16", fp8_scaled=False,
                      compute_dtype="default")
    text = g.add("MusubiLoadTextEmbedding", embedding="no_such_prompt.safetensors", architecture="auto")
    image = g.add("MusubiLoadImageEmbedding", embedding="no_such_image.safetensors")
    patched = g.add("MusubiMagCache", model=core[0], threshold=0.24, retention_ratio=0.2, K=6,
                    ratios="no_such_calibration.json", expert="auto")
    ema = g.add("MusubiPostHocEMAMerge", checkpoints="no_such_run/*.safetensors", output_name="ema/none", mode="beta",
                beta=0.95, beta2=0.95, sigma_rel=0.2, order="modified time")
    sampler = g.add("MusubiFramePackSampler", model=framepack[0], direction="vanilla", total_seconds=1.0, fps=30, sections=0,
                    latent_window_size=9, steps=4, cfg=1.0, distilled_guidance=10.0, shift=0.0, seed=0, magcache="on",
                    magcache_threshold=0.1, magcache_K=3, magcache_retention_ratio=0.2,
                    magcache_ratios="no_such_framepack_calibration.json")
    for node in (core, fp8, framepack, text, image, patched):
        g.add("PreviewAny", source=node[0])
    g.add("PreviewAny", source=sampler[1])
    # Found files pass: an existing text embedding and pasted ratios (which replace a missing pick).
    fine = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(ARCH), architecture="auto")
    model = g.add("UNETLoader", unet_name=tiny_model_file(ARCH), weight_dtype="default")
    pasted = g.add("MusubiMagCache", model=model[0], threshold=0.24, retention_ratio=0.2, K=6,
                   ratios="no_such_calibration.json", expert="auto", pasted_ratios="1.0,0.99,0.98")
    g.add("PreviewAny", source=fine[0])
    g.add("PreviewAny", source=pasted[0])

    errors = _node_errors(comfy, g.to_dict())
    text_of = {node: " | ".join(f"{e['type']}: {e['details']}" for e in found) for node, found in errors.items()}
    assert "no_such_core_unet.safetensors" in text_of[str(core)] and "value_not_in_list" in text_of[str(core)]
    for node, name, folder in ((fp8, "no_such_fp8_source.safetensors", "diffusion_models"),
                               (framepack, "no_such_framepack", "diffusion_models"),
                               (text, "no_such_prompt.safetensors", "text_embeddings"),
                               (image, "no_such_image.safetensors", "image_embeddings"),
                               (patched, "no_such_calibration.json", "magcache"),
                               (sampler, "no_such_framepack_calibration.json", "magcache")):
        assert str(node) in text_of, f"node {node} has no error: {text_of}"
        assert "custom_validation_failed" in text_of[str(node)] and repr(name) in text_of[str(node)], text_of[str(node)]
        assert f"the {folder} folders (" in text_of[str(node)], text_of[str(node)]
    assert "no_such_run/*.safetensors" in text_of[str(ema)] and "matches no file in the loras folders" in text_of[str(ema)]
    # validate_inputs takes only the picker: ComfyUI still checks the node's other inputs itself.
    assert "value_smaller_than_min" in text_of[str(fp8)] and "block_size" in text_of[str(fp8)], text_of[str(fp8)]
    assert str(fine) not in errors and str(pasted) not in errors, text_of


# --- folders named in extra_model_paths.yaml ---------------------------------------------------

PACK_FOLDERS = {"text_embeddings": ".safetensors", "image_embeddings": ".safetensors", "magcache": ".json"}


@pytest.fixture(scope="module")
def configured_comfy(tmp_path_factory):
    """A second server whose extra_model_paths.yaml names the pack's three folders elsewhere."""
    comfy_path = find_comfyui()
    if comfy_path is None:
        pytest.skip("ComfyUI not found (COMFYUI_PATH or ~/comfy/ComfyUI)")
    base = tmp_path_factory.mktemp("comfyui_configured")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    config = base / "extra_model_paths.yaml"
    config.write_text("mine:\n" + "".join(f"    {name}: {elsewhere / name}\n" for name in PACK_FOLDERS))
    for name, extension in PACK_FOLDERS.items():
        for folder, stem in ((elsewhere / name, "configured"), (base / "models" / name, "default")):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{stem}{extension}").write_text("{}")
            (folder / f"{stem}_notes.txt").write_text("not a model file")
    server = ComfyServer(comfy_path, base, extra_args=("--extra-model-paths-config", str(config)))
    server.start()
    server.elsewhere = elsewhere
    try:
        yield server
    finally:
        server.stop()


def test_configured_pack_folders_keep_models_folder_and_filter(configured_comfy):
    comfy = configured_comfy
    folders = {entry["name"]: entry["folders"] for entry in comfy.get_json("/experiment/models")}
    for name, extension in PACK_FOLDERS.items():
        configured, default = str(comfy.elsewhere / name), str(comfy.base_dir / "models" / name)
        assert [Path(p).resolve() for p in folders[name]] == [Path(configured).resolve(), Path(default).resolve()], folders[name]
    listed = {
        "text_embeddings": comfy.object_info("MusubiLoadTextEmbedding")["MusubiLoadTextEmbedding"]["input"]["required"]["embedding"],
        "image_embeddings": comfy.object_info("MusubiLoadImageEmbedding")["MusubiLoadImageEmbedding"]["input"]["required"]["embedding"],
        "magcache": comfy.object_info("MusubiMagCache")["MusubiMagCache"]["input"]["required"]["ratios"],
    }
    for name, extension in PACK_FOLDERS.items():
        options = listed[name][1]["options"] if isinstance(listed[name][1], dict) and "options" in listed[name][1] else listed[name][0]
        assert f"configured{extension}" in options and f"default{extension}" in options, (name, options)
        assert not any(option.endswith(".txt") for option in options), (name, options)
