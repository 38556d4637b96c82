"""Text-encoder outputs kept on disk, so a prompt is encoded once and reused.

The text encoders of these models (UMT5-XXL, LLaVA-Llama3, T5-XXL, Qwen2.5-VL-7B) weigh 8 to 16 GB;
loading one just to turn a fixed prompt into states costs more than the sampling or training step
that uses them. Files are written in musubi-tuner's own text-encoder cache layout
(``<item>_<arch>_te.safetensors``), so caches move both ways: musubi-tuner's caches load here, and
files written here are caches musubi-tuner's trainers read.

musubi-tuner's layouts (one item per file; ``<dtype>`` is the torch dtype name of the tensor, e.g.
``bfloat16``, ``float16``, ``float8_e4m3fn``; metadata ``architecture``, ``caption1`` and
``format_version`` = ``1.0.1``):

============== ========================= =====================================================
architecture   metadata ``architecture`` tensors
============== ========================= =====================================================
Wan 2.1/2.2    ``wan``                   ``varlen_t5_<dtype>`` [L, 4096], L <= 512 valid tokens
HunyuanVideo   ``hunyuan_video``         ``llm_<dtype>`` [256, 4096], ``llm_mask`` int64 [256],
                                         ``clipL_<dtype>`` [768] pooled, ``clipL_mask`` int64 [77]
FramePack      ``framepack``             ``llama_vec_<dtype>`` [512, 4096] zero-padded,
                                         ``llama_attention_mask`` bool [512],
                                         ``clip_l_pooler_<dtype>`` [768]
FLUX.1 Kontext ``flux_kontext``          ``t5_vec_<dtype>`` [512, 4096] (padding tokens included,
                                         no mask), ``clip_l_pooler_<dtype>`` [768]
Qwen-Image(s)  ``qwen_image``            ``varlen_vl_embed_<dtype>`` [L, 3584] valid tokens
============== ========================= =====================================================

Files without an architecture (``TextEmbedding.architecture`` None) use a plain layout of
``context`` [L, D] and optional ``pooled`` [P].
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .. import files
from ..architectures import FAMILY_NAMES
from ..errors import MusubiError

ARCHITECTURES = FAMILY_NAMES

MUSUBI_FORMAT_VERSION = "1.0.1"
CAPTION_KEY = "caption1"
ARCHITECTURE_KEY = "architecture"
PLAIN_CONTEXT_KEY = "context"
PLAIN_POOLED_KEY = "pooled"


@dataclass
class TextEmbedding:
    """What a text encoder produced for one prompt.

    ``context`` [L, D] holds only tokens the model attends to (padding already removed, except for
    FLUX, whose padding tokens are attended to and so are part of the conditioning).
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    architecture: str | None = None
    extra: dict = field(default_factory=dict)
    source: str | None = None  # the file it was loaded from, for error messages


@dataclass(frozen=True)
class _CacheLayout:
    """Where one architecture's musubi-tuner cache keeps context, padding mask and pooled output."""

    architecture: str
    text_encoder: str
    context_width: int
    pooled_width: int | None
    musubi_names: tuple[str, ...]  # values of musubi's "architecture" metadata; the first is written
    context_stem: str  # tensor key without the "_<dtype>" suffix
    pooled_stem: str | None = None
    mask_key: str | None = None
    mask_dtype: torch.dtype = torch.bool
    padded_length: int | None = None  # musubi pads the context to this many tokens (and writes the mask)

    def describe(self) -> str:
        keys = [f"'{self.context_stem}_<dtype>'"]
        if self.mask_key:
            keys.append(f"'{self.mask_key}'")
        if self.pooled_stem:
            keys.append(f"'{self.pooled_stem}_<dtype>'")
        return f"{self.architecture}: {' + '.join(keys)}"


_LAYOUTS = {
    layout.architecture: layout
    for layout in (
        _CacheLayout("wan", "UMT5-XXL", 4096, None, ("wan",), "varlen_t5"),
        _CacheLayout(
            "hunyuan_video", "LLaVA-Llama3 + CLIP-L", 4096, 768, ("hunyuan_video",), "llm",
            pooled_stem="clipL", mask_key="llm_mask", mask_dtype=torch.int64, padded_length=256,
        ),
        _CacheLayout(
            "framepack", "LLaVA-Llama3 + CLIP-L", 4096, 768, ("framepack",), "llama_vec",
            pooled_stem="clip_l_pooler", mask_key="llama_attention_mask", mask_dtype=torch.bool, padded_length=512,
        ),
        _CacheLayout("flux", "T5-XXL + CLIP-L", 4096, 768, ("flux_kontext",), "t5_vec", pooled_stem="clip_l_pooler"),
        _CacheLayout(
            "qwen_image", "Qwen2.5-VL-7B", 3584, None,
            ("qwen_image", "qwen_image_edit", "qwen_image_layered"), "varlen_vl_embed",
        ),
    )
}

# Canonical torch dtype names, longest first so "float8_e4m3fn" wins over any shorter ending.
_DTYPE_NAMES = sorted(
    {str(value).removeprefix("torch.") for value in vars(torch).values() if isinstance(value, torch.dtype)},
    key=len,
    reverse=True,
)


def expected_widths(architecture: str) -> tuple[int, int | None]:
    """``(context width, pooled width or None)`` the architecture's model takes."""
    layout = _layout(architecture)
    return layout.context_width, layout.pooled_width


def validate_for_architecture(embedding: TextEmbedding, architecture: str) -> None:
    """Refuse an embedding the model could not use, before sampling fails deep inside it."""
    layout = _layout(architecture)
    where = embedding.source or "text embedding"
    context = embedding.context
    if context.dim() != 2:
        raise MusubiError(f"{where}: the context must be [tokens, width], got shape {list(context.shape)}.")
    width = context.shape[-1]
    if width != layout.context_width:
        made_for = _guess_architectures(width, embedding.pooled)
        raise MusubiError(
            f"{where}: context width {width} does not fit {architecture}, which needs {layout.context_width} "
            f"({layout.text_encoder}). {made_for}Encode the prompt with the {layout.text_encoder} text encoder "
            f"of {architecture}, or choose the architecture the file was made for."
        )
    if embedding.architecture is not None and embedding.architecture in _LAYOUTS:
        source_layout = _LAYOUTS[embedding.architecture]
        if source_layout.text_encoder != layout.text_encoder:
            raise MusubiError(
                f"{where}: encoded for {embedding.architecture} ({source_layout.text_encoder}); "
                f"{architecture} needs {layout.text_encoder} states of the same width but a different meaning. "
                f"Encode the prompt with the {layout.text_encoder} text encoder, or choose {embedding.architecture}."
            )
    if layout.pooled_width is not None:
        pooled = embedding.pooled
        if pooled is None:
            raise MusubiError(
                f"{where}: {architecture} needs a pooled CLIP-L output of width {layout.pooled_width}, "
                f"but the embedding has none. Encode the prompt with {layout.text_encoder} (both encoders)."
            )
        if pooled.dim() != 1 or pooled.shape[0] != layout.pooled_width:
            raise MusubiError(
                f"{where}: pooled output of shape {list(pooled.shape)} does not fit {architecture}, which "
                f"needs [{layout.pooled_width}] (CLIP-L). Encode the prompt with {layout.text_encoder}."
            )


def load_text_embedding(path: str | os.PathLike) -> TextEmbedding:
    """Read one cache file, ours or musubi-tuner's, telling the layout from its metadata and keys."""
    path = os.fspath(path)
    tensor_infos, metadata = files.read_header(path)
    keys = list(tensor_infos)
    caption = metadata.get(CAPTION_KEY)
    extra = {} if caption is None else {"caption": caption}

    if PLAIN_CONTEXT_KEY in tensor_infos and set(keys) <= {PLAIN_CONTEXT_KEY, PLAIN_POOLED_KEY}:
        tensors = dict(files.iter_tensors(path))
        architecture = metadata.get(ARCHITECTURE_KEY)
        architecture = architecture if architecture in ARCHITECTURES else None
        context = _as_context(path, PLAIN_CONTEXT_KEY, tensors[PLAIN_CONTEXT_KEY])
        pooled = tensors.get(PLAIN_POOLED_KEY)
        pooled = None if pooled is None else _as_pooled(path, PLAIN_POOLED_KEY, pooled)
        return TextEmbedding(context, pooled, architecture, extra, source=path)

    layout = _detect_layout(path, keys, metadata)
    context_key = _key_for_stem(path, layout, layout.context_stem, keys, "context")
    pooled_key = None if layout.pooled_stem is None else _key_for_stem(path, layout, layout.pooled_stem, keys, "pooled")
    wanted = [key for key in (context_key, pooled_key, layout.mask_key) if key is not None and key in tensor_infos]
    tensors = dict(files.iter_tensors(path, wanted))

    context = _as_context(path, context_key, tensors[context_key])
    if layout.mask_key in tensors:
        context = _remove_padding(path, context, tensors[layout.mask_key], layout.mask_key)
    pooled = None if pooled_key is None else _as_pooled(path, pooled_key, tensors[pooled_key])
    return TextEmbedding(context, pooled, layout.architecture, extra, source=path)


def load_text_embeddings(paths: Iterable[str | os.PathLike]) -> list[TextEmbedding]:
    """Load several files that are meant to condition the same model, refusing a mixed set."""
    embeddings = [load_text_embedding(path) for path in paths]
    if embeddings:
        first = embeddings[0]
        for other in embeddings[1:]:
            if other.context.shape[-1] != first.context.shape[-1] or _text_encoder(other) != _text_encoder(first):
                raise MusubiError(
                    f"{other.source}: {other.architecture or 'unknown architecture'} states of width "
                    f"{other.context.shape[-1]}, but {first.source} holds {first.architecture or 'unknown architecture'} "
                    f"states of width {first.context.shape[-1]}; use caches made for one model only."
                )
    return embeddings


def save_text_embedding(path: str | os.PathLike, embedding: TextEmbedding, caption: str | None = None) -> None:
    """Write ``embedding`` atomically in musubi-tuner's cache layout for its architecture.

    ``caption`` (else ``embedding.extra["caption"]``) is stored as musubi's ``caption1`` metadata.
    A pooled output is dropped for architectures whose models take none (Wan, Qwen-Image).
    """
    path = os.fspath(path)
    if caption is None:
        caption = embedding.extra.get("caption")
    context = _as_context(path, "context", embedding.context)
    pooled = None if embedding.pooled is None else _as_pooled(path, "pooled", embedding.pooled)
    for name, tensor in (("context", context), ("pooled", pooled)):
        if tensor is not None and not torch.isfinite(tensor.float()).all():
            raise MusubiError(
                f"{path}: the {name} holds NaN or infinite values, so it would condition nothing useful; "
                "re-encode the prompt (in float32 or bfloat16 if the encoder overflowed in float16)."
            )

    architecture = embedding.architecture
    if architecture is None:
        tensors = {PLAIN_CONTEXT_KEY: context}
        if pooled is not None:
            tensors[PLAIN_POOLED_KEY] = pooled
        metadata = {} if caption is None else {CAPTION_KEY: caption}
    else:
        validate_for_architecture(
            TextEmbedding(context, pooled, architecture, source=embedding.source or path), architecture
        )
        tensors = _musubi_tensors(_LAYOUTS[architecture], context, pooled)
        metadata = {
            ARCHITECTURE_KEY: _LAYOUTS[architecture].musubi_names[0],
            CAPTION_KEY: caption or "",
            "format_version": MUSUBI_FORMAT_VERSION,
        }

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    files.atomic_save_file(tensors, path, metadata)


def _musubi_tensors(layout: _CacheLayout, context: torch.Tensor, pooled: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The tensors musubi-tuner's caching script would write for these states.

    Contexts longer than musubi's padded length are kept whole rather than cut.
    """
    tokens = context.shape[0]
    tensors = {}
    if layout.padded_length is None:
        tensors[f"{layout.context_stem}_{_dtype_name(context.dtype)}"] = context
    else:
        length = max(tokens, layout.padded_length)
        padded = context.new_zeros((length, context.shape[1]))
        padded[:tokens] = context
        mask = torch.zeros(length, dtype=layout.mask_dtype)
        mask[:tokens] = 1
        tensors[f"{layout.context_stem}_{_dtype_name(context.dtype)}"] = padded
        tensors[layout.mask_key] = mask
    if layout.pooled_stem is not None and pooled is not None:
        tensors[f"{layout.pooled_stem}_{_dtype_name(pooled.dtype)}"] = pooled
    return tensors


def _layout(architecture: str) -> _CacheLayout:
    if architecture not in _LAYOUTS:
        raise MusubiError(f"architecture {architecture!r} is not known; choose one of {', '.join(ARCHITECTURES)}.")
    return _LAYOUTS[architecture]


def _detect_layout(path: str, keys: list[str], metadata: dict[str, str]) -> _CacheLayout:
    named = metadata.get(ARCHITECTURE_KEY)
    if named:
        for layout in _LAYOUTS.values():
            if named in layout.musubi_names or named == layout.architecture:
                return layout
        raise MusubiError(
            f"{path}: a text-encoder cache for architecture {named!r}, which is not supported here "
            f"(supported: {', '.join(ARCHITECTURES)}). Keys found: {_list_keys(keys)}."
        )
    stems = {_split_dtype(key)[0] for key in keys}
    for layout in _LAYOUTS.values():
        if layout.context_stem in stems:
            return layout
    known = "; ".join(layout.describe() for layout in _LAYOUTS.values())
    raise MusubiError(
        f"{path}: not a text-encoder cache this library reads. Keys found: {_list_keys(keys)}. "
        f"Expected musubi-tuner's layout ({known}) or '{PLAIN_CONTEXT_KEY}' [+ '{PLAIN_POOLED_KEY}']. "
        "Pick a *_te.safetensors cache or a file written by save_text_embedding."
    )


def _key_for_stem(path: str, layout: _CacheLayout, stem: str, keys: list[str], role: str) -> str:
    matches = [key for key in keys if _split_dtype(key)[0] == stem and _split_dtype(key)[1] is not None]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise MusubiError(
            f"{path}: a {layout.architecture} text-encoder cache without its {role} tensor '{stem}_<dtype>'. "
            f"Keys found: {_list_keys(keys)}. The caching run probably stopped early; run musubi-tuner's "
            "text-encoder caching again for this item (without --skip_existing)."
        )
    raise MusubiError(
        f"{path}: holds several copies of '{stem}' in different dtypes ({', '.join(matches)}); "
        "delete the file and cache the text-encoder outputs again."
    )


def _split_dtype(key: str) -> tuple[str, str | None]:
    """``"llama_vec_float16"`` -> ``("llama_vec", "float16")``; keys without a dtype suffix unchanged."""
    for name in _DTYPE_NAMES:
        if key.endswith("_" + name):
            return key[: -len(name) - 1], name
    return key, None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_context(path: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 2 or not tensor.is_floating_point():
        raise MusubiError(
            f"{path}: '{key}' must be floating-point states of shape [tokens, width], got {tensor.dtype} "
            f"{list(tensor.shape)}."
        )
    if tensor.shape[0] == 0:
        raise MusubiError(f"{path}: '{key}' holds no tokens; encode a prompt (even an empty one gives tokens).")
    return _computable(tensor).detach().cpu().contiguous()


def _as_pooled(path: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 1 or not tensor.is_floating_point():
        raise MusubiError(
            f"{path}: '{key}' must be a floating-point pooled vector [width], got {tensor.dtype} {list(tensor.shape)}."
        )
    return _computable(tensor).detach().cpu().contiguous()


def _computable(tensor: torch.Tensor) -> torch.Tensor:
    """float8 states (from an fp8 text encoder) cannot enter a matmul; widen them to bfloat16."""
    return tensor.to(torch.bfloat16) if tensor.element_size() == 1 else tensor


def _remove_padding(path: str, context: torch.Tensor, mask: torch.Tensor, mask_key: str) -> torch.Tensor:
    if mask.dim() == 2 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 1 or mask.shape[0] != context.shape[0]:
        raise MusubiError(
            f"{path}: '{mask_key}' of shape {list(mask.shape)} does not match the {context.shape[0]} context "
            "tokens; the file is damaged, cache the text-encoder outputs again."
        )
    valid = context[mask.bool()]
    if valid.shape[0] == 0:
        raise MusubiError(f"{path}: '{mask_key}' marks no token as valid; cache the text-encoder outputs again.")
    return valid.contiguous()


def _text_encoder(embedding: TextEmbedding) -> str | None:
    layout = _LAYOUTS.get(embedding.architecture or "")
    return None if layout is None else layout.text_encoder


def _guess_architectures(width: int, pooled: torch.Tensor | None) -> str:
    pooled_width = None if pooled is None else pooled.shape[-1]
    fits = [
        layout.architecture
        for layout in _LAYOUTS.values()
        if layout.context_width == width and layout.pooled_width in (None, pooled_width)
    ]
    return f"The file fits {', '.join(fits)}. " if fits else ""


def _list_keys(keys: list[str]) -> str:
    return ", ".join(sorted(keys)) if keys else "(none)"
