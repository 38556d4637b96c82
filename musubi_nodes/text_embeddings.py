"""Cached text-encoder outputs as CONDITIONING: encode a prompt once, reuse it forever."""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

from ..musubi.errors import MusubiError
from ..musubi.data.text_embeddings import (
    ARCHITECTURES,
    TextEmbedding,
    load_text_embedding,
    save_text_embedding,
    validate_for_architecture,
)
from .paths import TEXT_EMBEDDINGS, list_files, missing_file_message, new_output_path, register_text_embeddings_folder

register_text_embeddings_folder()
CATEGORY = "musubi/conditioning"


class MusubiLoadTextEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiLoadTextEmbedding",
            display_name="Load Text Embedding (cached)",
            category=CATEGORY,
            description="Turns a saved text-encoder output into CONDITIONING without loading the text encoder. Reads files written by Save Text Embedding and musubi-tuner's *_te.safetensors caches.",
            inputs=[
                io.Combo.Input("embedding", options=list_files(TEXT_EMBEDDINGS),
                               tooltip="A file from models/text_embeddings."),
                io.Combo.Input("architecture", options=["auto", *ARCHITECTURES], default="auto",
                               tooltip="The model the conditioning is for; its text width is checked so a wrong file fails here, not deep inside sampling. auto: taken from the file."),
                io.String.Input("path", default="", optional=True,
                                tooltip="Optional absolute path of a cache file elsewhere (e.g. a musubi-tuner cache directory); overrides 'embedding'."),
            ],
            outputs=[io.Conditioning.Output(tooltip="Conditioning with the pooled output where the architecture uses one.")],
        )

    @classmethod
    def validate_inputs(cls, embedding: str | None = None, path: str | None = "") -> bool | str:
        """A missing file is reported when the prompt is queued; a given path replaces the picked name."""
        if path is not None and path.strip():
            return True if os.path.isfile(path.strip()) else f"Load Text Embedding (cached): path {path.strip()!r} is not a file."
        if path is None:  # linked: what arrives decides, at execution
            return True
        return missing_file_message("Load Text Embedding (cached)", "embedding", TEXT_EMBEDDINGS, embedding) or True

    @classmethod
    def execute(cls, embedding: str, architecture: str, path: str = "") -> io.NodeOutput:
        file = path.strip() or _full_path(embedding)
        loaded = load_text_embedding(file)
        if architecture != "auto":
            validate_for_architecture(loaded, architecture)
        return io.NodeOutput(to_conditioning(loaded))

    @classmethod
    def fingerprint_inputs(cls, embedding: str, architecture: str, path: str = ""):
        file = path.strip() or _full_path(embedding)
        return os.path.getmtime(file) if os.path.isfile(file) else float("nan")


class MusubiSaveTextEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiSaveTextEmbedding",
            display_name="Save Text Embedding",
            category=CATEGORY,
            description="Saves the output of a text encoder (e.g. CLIP Text Encode) to models/text_embeddings, in musubi-tuner's cache format, so later graphs and training runs load it with Load Text Embedding instead of the text encoder.",
            is_output_node=True,
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="Output of a text-encode node."),
                io.Combo.Input("architecture", options=list(ARCHITECTURES),
                               tooltip="The model family the text encoder belongs to; decides the file layout."),
                io.String.Input("filename", default="prompts/my_prompt",
                                tooltip="Name inside models/text_embeddings (sub-folders allowed); never overwrites, appends _00001… instead."),
                io.String.Input("caption", default="", optional=True, multiline=True,
                                tooltip="Optional: the prompt text, stored in the file for reference."),
            ],
            outputs=[io.String.Output("path", tooltip="The file written.")],
        )

    @classmethod
    def execute(cls, conditioning, architecture: str, filename: str, caption: str = "") -> io.NodeOutput:
        embedding = from_conditioning(conditioning, architecture)
        validate_for_architecture(embedding, architecture)
        target = new_output_path("Save Text Embedding", TEXT_EMBEDDINGS, filename, example="prompts/my_prompt")
        save_text_embedding(target, embedding, caption=caption or None)
        return io.NodeOutput(target, ui=ui.PreviewText(target))


def _full_path(name: str) -> str:
    import folder_paths

    full = folder_paths.get_full_path(TEXT_EMBEDDINGS, name)
    if full is None:
        raise MusubiError(
            f"Load Text Embedding: {name!r} is not in models/text_embeddings; "
            "save one with Save Text Embedding or give an absolute path."
        )
    return full


def to_conditioning(embedding: TextEmbedding) -> list:
    options = {}
    if embedding.pooled is not None:
        options["pooled_output"] = embedding.pooled.unsqueeze(0)
    return [[embedding.context.unsqueeze(0), options]]


def from_conditioning(conditioning: list, architecture: str) -> TextEmbedding:
    if not conditioning:
        raise MusubiError("Save Text Embedding: the conditioning is empty; connect a text-encode node.")
    context, options = conditioning[0]
    if context.shape[0] != 1 or len(conditioning) != 1:
        raise MusubiError(
            "Save Text Embedding: expected the conditioning of one prompt (batch 1, no combined "
            f"prompts), got {len(conditioning)} entries of batch {context.shape[0]}."
        )
    pooled = options.get("pooled_output")
    return TextEmbedding(
        context=context[0].detach().cpu(),
        pooled=None if pooled is None else pooled[0].detach().cpu(),
        architecture=architecture,
        extra={},
    )
