"""musubi: LoRA training and inference tricks for diffusion transformers.

A self-contained PyTorch library. It never imports ComfyUI; the node pack in
``musubi_nodes/`` adapts ComfyUI types to it.
"""

__version__ = "0.1.0"
