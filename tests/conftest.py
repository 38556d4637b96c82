"""Shared fixtures: the real ComfyUI server and the marker that needs it."""

from __future__ import annotations

import os

import pytest
import torch

from comfy_server import ComfyServer, find_comfyui
from tiny_checkpoints import ARCHS, write_tiny_checkpoint

COMFYUI_PATH = find_comfyui()
SKIP_REASON = (
    "ComfyUI not found: set COMFYUI_PATH to a ComfyUI v0.3.64+ checkout "
    "(or unpack one at ~/comfy/ComfyUI) to run the real-ComfyUI tests"
)

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if COMFYUI_PATH is not None:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if "comfyui" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if SKIP_REASON in str(r.longrepr)]
    if skipped:
        terminalreporter.write_sep("!", f"{len(skipped)} real-ComfyUI tests SKIPPED", red=True, bold=True)
        terminalreporter.write_line(SKIP_REASON, red=True)
    browser = [r for r in terminalreporter.stats.get("skipped", []) if "headless Chromium not found" in str(r.longrepr)]
    if browser:
        terminalreporter.write_sep("!", f"{len(browser)} browser tests SKIPPED", red=True, bold=True)
        terminalreporter.write_line(str(browser[0].longrepr[-1]), red=True)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """One real ComfyUI server for the whole test session."""
    if COMFYUI_PATH is None:
        pytest.skip(SKIP_REASON)
    server = ComfyServer(COMFYUI_PATH, tmp_path_factory.mktemp("comfyui"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_model_file(comfy):
    """Writes each tiny checkpoint into the server's diffusion_models folder once per session."""
    written: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in written:
            name = f"tiny_{arch}.safetensors"
            write_tiny_checkpoint(arch, comfy.models_dir("diffusion_models") / name, seed=0)
            written[arch] = name
        return written[arch]

    return get


@pytest.fixture(scope="session")
def text_embedding_file(comfy):
    """Random text-encoder outputs of the right widths, saved in the pack's cache format."""
    from musubi.data.text_embeddings import TextEmbedding, save_text_embedding

    written: dict[str, str] = {}

    def get(arch: str) -> str:
        tiny = ARCHS[arch]
        if tiny.family not in written:
            generator = torch.Generator().manual_seed(1)
            context = torch.randn(7, tiny.text_dim, generator=generator)
            pooled = None if tiny.pooled_dim is None else torch.randn(tiny.pooled_dim, generator=generator)
            name = f"random_{tiny.family}.safetensors"
            save_text_embedding(
                comfy.models_dir("text_embeddings") / name,
                TextEmbedding(context=context, pooled=pooled, architecture=tiny.family, extra={}),
            )
            written[tiny.family] = name
        return written[tiny.family]

    return get
