"""Save / Load Image Embedding: a CLIP-vision (SigLIP) output kept on disk, reused without the encoder."""

from __future__ import annotations

import os

import comfy.clip_vision
import folder_paths
from comfy_api.latest import io, ui

from ..musubi.errors import MusubiError
from ..musubi.data.image_embeddings import load_image_embedding, save_image_embedding
from .paths import missing_file_message, new_output_path, register_model_folder

IMAGE_EMBEDDINGS = "image_embeddings"
SAVE_NODE = "Save Image Embedding"
LOAD_NODE = "Load Image Embedding (cached)"


def register_image_embeddings_folder() -> None:
    """``models/image_embeddings`` holds cached image-encoder outputs (ours and musubi-tuner's latent caches)."""
    register_model_folder(IMAGE_EMBEDDINGS, {".safetensors"})


register_image_embeddings_folder()


class MusubiSaveImageEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiSaveImageEmbedding",
            display_name=SAVE_NODE,
            category="musubi/conditioning",
            description="Saves the last hidden state of a CLIP-vision encode (SigLIP for FramePack) to models/image_embeddings, so later runs load it with Load Image Embedding (cached) instead of loading the image encoder.",
            is_output_node=True,
            inputs=[
                io.ClipVisionOutput.Input("clip_vision_output", tooltip="CLIPVisionEncode's output."),
                io.String.Input("filename", default="start_image", tooltip="Name inside models/image_embeddings (sub-folders allowed); never overwrites."),
            ],
            outputs=[io.String.Output("embedding", tooltip="The saved file's name, as Load Image Embedding lists it.")],
        )

    @classmethod
    def execute(cls, clip_vision_output, filename: str) -> io.NodeOutput:
        state = getattr(clip_vision_output, "last_hidden_state", None)
        if state is None:
            raise MusubiError(f"{SAVE_NODE}: the CLIP-vision output has no last hidden state; connect CLIPVisionEncode.")
        path = new_output_path(SAVE_NODE, IMAGE_EMBEDDINGS, filename, example="start_image")
        try:
            save_image_embedding(path, state[:1])
        except MusubiError as error:
            raise MusubiError(f"{SAVE_NODE}: {error}") from None
        roots = [os.path.abspath(root) for root in folder_paths.get_folder_paths(IMAGE_EMBEDDINGS)]
        root = next((r for r in roots if os.path.commonpath([r, os.path.abspath(path)]) == r), os.path.dirname(path))
        listed = os.path.relpath(path, root).replace(os.sep, "/")
        return io.NodeOutput(listed, ui=ui.PreviewText(f"saved {path} {list(state[:1].shape)}"))


class MusubiLoadImageEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiLoadImageEmbedding",
            display_name=LOAD_NODE,
            category="musubi/conditioning",
            description="Turns a saved image embedding (Save Image Embedding, or a musubi-tuner FramePack latent cache's image_embeddings) back into a CLIP_VISION_OUTPUT for FramePack Sampler, without loading the image encoder. Only the last hidden state is carried.",
            inputs=[
                io.Combo.Input("embedding", options=folder_paths.get_filename_list(IMAGE_EMBEDDINGS),
                               tooltip="A file in models/image_embeddings."),
                io.String.Input("path", default="", optional=True,
                                tooltip="Optional absolute path (e.g. a musubi-tuner *_fp.safetensors latent cache); wins over 'embedding'."),
            ],
            outputs=[io.ClipVisionOutput.Output(tooltip="A CLIP-vision output with last_hidden_state [1, tokens, width].")],
        )

    @classmethod
    def validate_inputs(cls, embedding: str | None = None, path: str | None = "") -> bool | str:
        """A missing file is reported when the prompt is queued; a given path replaces the picked name."""
        if path is not None and path.strip():
            return True if os.path.isfile(path.strip()) else f"{LOAD_NODE}: path {path.strip()!r} is not a file."
        if path is None:  # linked: what arrives decides, at execution
            return True
        return missing_file_message(LOAD_NODE, "embedding", IMAGE_EMBEDDINGS, embedding) or True

    @classmethod
    def execute(cls, embedding: str, path: str = "") -> io.NodeOutput:
        full = path.strip() or folder_paths.get_full_path(IMAGE_EMBEDDINGS, embedding)
        if not full or not os.path.isfile(full):
            raise MusubiError(f"{LOAD_NODE}: {path.strip() or embedding!r} is not a file; pick one in models/{IMAGE_EMBEDDINGS} or give an absolute path.")
        try:
            state = load_image_embedding(full)
        except MusubiError as error:
            raise MusubiError(f"{LOAD_NODE}: {error}") from None
        output = comfy.clip_vision.Output()
        output["last_hidden_state"] = state
        output["image_embeds"] = state
        return io.NodeOutput(output)
