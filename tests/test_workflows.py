"""Every shipped workflow is valid against the live node definitions and runs headless.

Model files named in a workflow are what users download; for the headless run each one is
replaced by a tiny fixture according to ``FIXTURES`` (workflow → how to prepare the server).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import torch

from comfy_server import PACK_NAME, REPO_ROOT
from fixture_files import write_wan_lora_checkpoints
from musubi.text_embeddings import TextEmbedding, save_text_embedding
from tiny_checkpoints import write_tiny_checkpoint
from workflow_tools import check_ui_workflow, ui_to_api

pytestmark = pytest.mark.comfyui

WORKFLOWS = REPO_ROOT / "workflows"
UI_WORKFLOWS = sorted(path for path in WORKFLOWS.glob("*.json") if not path.name.endswith(".api.json"))


def _prepare_ema_merge(comfy):
    """``my_lora/*.safetensors``: three checkpoints of a run."""
    folder = comfy.models_dir("loras") / "my_lora"
    if not folder.exists():
        write_wan_lora_checkpoints(folder, count=3)


def _prepare_calibrate_magcache(comfy):
    """The Wan 2.1 T2V 1.3B file and two cached prompts, as tiny stand-ins under the real names."""
    model = comfy.models_dir("diffusion_models") / "wan2.1_t2v_1.3B_fp16.safetensors"
    if not model.exists():
        write_tiny_checkpoint("wan21_t2v", model)
    for seed, name in enumerate(("magcache_positive", "magcache_negative")):
        path = comfy.models_dir("text_embeddings") / "prompts" / f"{name}.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            context = torch.randn(7, 4096, generator=torch.Generator().manual_seed(seed))
            save_text_embedding(path, TextEmbedding(context=context, architecture="wan", extra={}))


FIXTURES = {
    "post_hoc_ema_merge": _prepare_ema_merge,
    "calibrate_magcache": _prepare_calibrate_magcache,
    "timestep_distribution_preview": lambda comfy: None,
}


def _api_twin(ui_path: Path) -> Path:
    return ui_path.with_name(ui_path.stem + ".api.json")


def test_every_ui_workflow_has_an_api_twin_and_a_fixture():
    assert UI_WORKFLOWS, "no workflows shipped"
    for path in UI_WORKFLOWS:
        assert _api_twin(path).is_file(), f"{path.name} has no API-format twin"
        assert path.stem in FIXTURES, f"{path.name} has no fixture mapping for the headless run"
    for path in WORKFLOWS.glob("*.api.json"):
        assert path.with_name(path.name.replace(".api.json", ".json")).is_file(), f"{path.name} has no UI twin"


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_matches_live_nodes_and_its_api_twin(comfy, path):
    FIXTURES[path.stem](comfy)  # the files a workflow names must be listed for its widgets to be valid
    info = comfy.object_info()
    workflow = json.loads(path.read_text())
    assert check_ui_workflow(workflow, info) == []
    assert any(node["type"] in ("Note", "MarkdownNote") for node in workflow["nodes"]), "explain the steps in a Note"
    assert ui_to_api(workflow, info) == json.loads(_api_twin(path).read_text())


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_api_twin_runs_headless(comfy, path):
    FIXTURES[path.stem](comfy)
    outputs = comfy.run(json.loads(_api_twin(path).read_text()))
    assert outputs, "the workflow produced no output"


def test_frontend_extensions_are_served(comfy):
    for script in (REPO_ROOT / "web").glob("*.js"):
        url = f"{comfy.url}/extensions/{PACK_NAME}/{script.name}"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200 and response.read() == script.read_bytes()
