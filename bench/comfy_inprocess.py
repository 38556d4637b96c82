"""ComfyUI's code and this pack's nodes imported into a bench's own process, shared by the benches.

Some measurements cannot go through a server: a forward hook on a block, or the CUDA allocator's
peak, must live in the process that runs the model. These helpers import ComfyUI (found as the
tests find it: $COMFYUI_PATH or ~/comfy/ComfyUI) and the repository as a package, the way ComfyUI
imports a custom node, so the benches call the very node classes a graph would run.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_MODULE = "musubi_pack_bench"  # the repository imported as a package, as ComfyUI does


def comfyui_path(script: str) -> Path:
    """ComfyUI's folder, or exit with what ``script`` needs."""
    if str(REPO_ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
    from comfy_server import find_comfyui

    path = find_comfyui()
    if path is None:
        raise SystemExit(f"{script} needs ComfyUI: set COMFYUI_PATH to a ComfyUI v0.3.64+ checkout "
                         "(or unpack one at ~/comfy/ComfyUI), with its requirements installed in this Python.")
    return path


def import_comfyui(path: Path, base_directory: str | None = None, pytorch_attention: bool = False) -> None:
    """Put ComfyUI on sys.path and set its command-line options before its modules read them: the
    CPU unless CUDA is there, an optional base directory (models/, output/, temp/ of the run) and
    PyTorch attention (ComfyUI's CPU default reads free memory inside every attention call, which
    splits compiled graphs)."""
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    from comfy.cli_args import args

    args.cpu = args.cpu or not torch.cuda.is_available()
    if base_directory is not None:
        if "folder_paths" in sys.modules:
            raise RuntimeError("ComfyUI's folder_paths was imported before its base directory was set")
        args.base_directory = base_directory
    if pytorch_attention:
        args.use_pytorch_cross_attention = True


def import_pack() -> ModuleType:
    """The repository as the package ``PACK_MODULE`` (its nodes import ComfyUI: call
    :func:`import_comfyui` first)."""
    if PACK_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_MODULE, REPO_ROOT / "__init__.py",
                                                      submodule_search_locations=[str(REPO_ROOT)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = package
        spec.loader.exec_module(package)
    return sys.modules[PACK_MODULE]


def pack_module(name: str) -> ModuleType:
    """A module of the imported pack, e.g. ``pack_module("musubi_nodes.magcache")``."""
    import_pack()
    return importlib.import_module(f"{PACK_MODULE}.{name}")


class CallCounter:
    """Counts the batch rows (cond or uncond evaluations) that reach the last transformer block,
    so a method that skips blocks and one that skips the whole model are counted alike."""

    def __init__(self, model_patcher):
        block = model_patcher.model.diffusion_model.blocks[-1]
        self.rows = 0
        self._handle = block.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["x"]
        self.rows += hidden.shape[0]

    def take(self) -> int:
        rows, self.rows = self.rows, 0
        return rows

    def remove(self) -> None:
        self._handle.remove()
