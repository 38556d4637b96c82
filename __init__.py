"""ComfyUI entry point of the Musubi LoRA Trainer node pack.

ComfyUI imports this package from ``custom_nodes/``; the nodes themselves live in
``musubi_nodes/`` and the algorithms in the standalone library ``musubi/``.

``python -m musubi train`` also imports this package (as ``musubi_lora_trainer``) to train with
ComfyUI's model code without a server; it calls :func:`prepare_headless` before importing any
node module.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .musubi_nodes import MusubiExtension

    return MusubiExtension()


def prepare_headless() -> None:
    """Make ComfyUI's modules importable and usable without its server, once per process.

    ComfyUI comes from ``COMFYUI_PATH`` unless it is importable already; its settings stay at the
    defaults of ``main.py`` except ``--cpu`` on a machine without CUDA. Under a multi-process
    launch (``LOCAL_RANK`` set) each process computes on its own GPU. Raises ImportError saying
    what to set when ComfyUI cannot be found.
    """
    import importlib.util
    import os
    import sys

    import torch

    if importlib.util.find_spec("comfy") is None or importlib.util.find_spec("comfy.model_management") is None:
        path = os.environ.get("COMFYUI_PATH")
        if not path or not os.path.isfile(os.path.join(path, "comfy", "model_management.py")):
            where = f"COMFYUI_PATH={path} holds no ComfyUI" if path else "COMFYUI_PATH is not set"
            raise ImportError(f"needs ComfyUI (v0.3.64 or newer) and {where}: set COMFYUI_PATH to ComfyUI's folder "
                              "(the one with main.py), with ComfyUI's requirements installed in this Python.")
        sys.path.insert(0, os.path.abspath(path))
    if "comfy.model_management" in sys.modules:
        return  # ComfyUI is set up already (inside ComfyUI, or prepared before)
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True
    elif os.environ.get("LOCAL_RANK") is not None:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
