"""Image-encoder outputs kept on disk: a SigLIP embedding computed once and reused.

FramePack conditions every section on SigLIP's last hidden state of the start image
(``[729, 1152]`` for ``sigclip_vision_patch14_384``). Loading the 0.4 B-parameter image encoder to
recompute it costs more than it saves, so it can be stored in musubi-tuner's latent-cache naming,
``image_embeddings_<dtype>`` ``[tokens, width]`` (the key musubi-tuner's FramePack latent caches
carry, so those caches load here too).
"""

from __future__ import annotations

import os

import torch

from .. import files
from ..errors import MusubiError

KEY_STEM = "image_embeddings"


def save_image_embedding(path: str | os.PathLike, embedding: torch.Tensor) -> None:
    """Write ``embedding`` ``[tokens, width]`` (or ``[1, tokens, width]``) atomically."""
    tensor = embedding.detach().to("cpu")
    if tensor.dim() == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 2 or not tensor.is_floating_point():
        raise MusubiError(f"an image embedding must be a floating [tokens, width] tensor, got {tuple(tensor.shape)} {tensor.dtype}.")
    if not torch.isfinite(tensor).all():
        raise MusubiError("the image embedding holds NaN or infinite values; the image encoder run is broken.")
    dtype = str(tensor.dtype).removeprefix("torch.")
    files.atomic_save_file({f"{KEY_STEM}_{dtype}": tensor.contiguous()}, os.fspath(path),
                                    {"format": "pt", "content": "image_embedding"})


def load_image_embedding(path: str | os.PathLike) -> torch.Tensor:
    """The embedding ``[1, tokens, width]`` of a file written here or a musubi-tuner FramePack latent cache."""
    path = os.fspath(path)
    header, _ = files.read_header(path)
    keys = [key for key in header if key == KEY_STEM or key.startswith(KEY_STEM + "_")]
    if len(keys) != 1:
        raise MusubiError(
            f"{path}: expected one '{KEY_STEM}_<dtype>' tensor (an image embedding or a musubi-tuner FramePack latent "
            f"cache), found {len(keys)} among {', '.join(list(header)[:5]) or 'no tensors'}."
        )
    [(_, tensor)] = list(files.iter_tensors(path, keys))
    if tensor.dim() != 2:
        raise MusubiError(f"{path}: {keys[0]} has shape {tuple(tensor.shape)}, expected [tokens, width].")
    return tensor.unsqueeze(0)
