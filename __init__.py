"""ComfyUI entry point of the Musubi LoRA Trainer node pack.

ComfyUI imports this package from ``custom_nodes/``; the nodes themselves live in
``musubi_nodes/`` and the algorithms in the standalone library ``musubi/``.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .musubi_nodes import MusubiExtension

    return MusubiExtension()
