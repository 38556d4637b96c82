"""File names the nodes read and write, resolved through ComfyUI's model folders."""

from __future__ import annotations

import fnmatch
import os

import folder_paths

from ..musubi.errors import MusubiError

TEXT_EMBEDDINGS = "text_embeddings"


def register_text_embeddings_folder() -> None:
    """``models/text_embeddings`` holds cached text-encoder outputs (ours and musubi-tuner's)."""
    if TEXT_EMBEDDINGS not in folder_paths.folder_names_and_paths:
        folder = os.path.join(folder_paths.models_dir, TEXT_EMBEDDINGS)
        folder_paths.folder_names_and_paths[TEXT_EMBEDDINGS] = ([folder], {".safetensors"})


def list_files(folder: str) -> list[str]:
    return folder_paths.get_filename_list(folder)


def resolve_patterns(node: str, folder: str, lines: str) -> list[str]:
    """Full paths for names or globs (one per line) from a model folder, in the order given.

    A line is a name as the folder's file list shows it (``my_lora/step_100.safetensors``),
    a glob over those names (``my_lora/*.safetensors``) or an absolute path.
    """
    names = [name.replace("\\", "/") for name in list_files(folder)]
    found: list[str] = []
    for line in (raw.strip() for raw in lines.splitlines()):
        if not line or line.startswith("#"):
            continue
        if os.path.isabs(line):
            if not os.path.isfile(line):
                raise MusubiError(f"{node}: the file {line!r} does not exist.")
            matches = [line]
        elif any(char in line for char in "*?["):
            matches = [folder_paths.get_full_path(folder, name) for name in sorted(fnmatch.filter(names, line))]
        else:
            path = folder_paths.get_full_path(folder, line)
            matches = [path] if path else []
        if not matches:
            roots = ", ".join(folder_paths.get_folder_paths(folder))
            raise MusubiError(
                f"{node}: {line!r} matches no file in the {folder} folders ({roots}). "
                f"Write names as the {folder} list shows them, or a glob such as 'my_lora/*.safetensors'."
            )
        for path in matches:
            if path not in found:
                found.append(path)
    return found


def model_folder_root(folder: str) -> str:
    """The folder new files of this kind go to: models/<folder> itself (for diffusion_models not
    its legacy alias models/unet, which ComfyUI lists first), else the first one listed."""
    roots = [os.path.abspath(path) for path in folder_paths.get_folder_paths(folder)]
    return next((path for path in roots if os.path.basename(path) == folder), roots[0])


def new_output_path(node: str, folder: str, name: str, extension: str = ".safetensors") -> str:
    """A path for ``name`` inside the model folder ``folder`` that never overwrites a file.

    ``name`` may contain sub-folders but must stay inside the model folder; when the file
    exists, ``_00001``, ``_00002``… is appended.
    """
    root = model_folder_root(folder)
    name = name.strip().replace("\\", "/")
    if name.endswith(extension):
        name = name[: -len(extension)]
    target = os.path.abspath(os.path.join(root, name))
    if not name or os.path.isabs(name) or os.path.commonpath([root, target]) != root or target == root:
        raise MusubiError(
            f"{node}: the output name {name!r} must be a relative file name inside {root} "
            f"(sub-folders are fine, '..' and absolute paths are not)."
        )
    candidate, counter = target + extension, 0
    while os.path.exists(candidate):
        counter += 1
        candidate = f"{target}_{counter:05d}{extension}"
    os.makedirs(os.path.dirname(candidate), exist_ok=True)
    return candidate
