"""File names the nodes read and write, resolved through ComfyUI's folders.

Every name a node writes under goes through :func:`musubi.files.path_inside` here (files with
:func:`new_output_path`, folders with :func:`folder_inside`), so each node accepts and refuses the
same names with the same message.
"""

from __future__ import annotations

import os

import folder_paths

from ..musubi.errors import MusubiError
from ..musubi.files import glob_matcher, path_inside

TEXT_EMBEDDINGS = "text_embeddings"


def register_model_folder(name: str, extensions: set[str] | frozenset[str]) -> None:
    """Make ``models/<name>`` a model folder of ComfyUI that lists files with ``extensions``.

    A user may already have named the folder in ``extra_model_paths.yaml`` (ComfyUI reads it
    before custom nodes load, and registers such a folder with no extension filter): their
    folders stay and stay first, ``models/<name>`` is added after them (as
    ``folder_paths.add_model_folder_path`` adds a path), and the extensions are added to
    whatever filter is set, so the lists never offer other kinds of files.
    """
    default = os.path.join(folder_paths.models_dir, name)
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[name] = ([default], set(extensions))
    else:
        paths, known = folder_paths.folder_names_and_paths[name]
        if not any(os.path.normcase(os.path.abspath(path)) == os.path.normcase(os.path.abspath(default)) for path in paths):
            folder_paths.add_model_folder_path(name, default)  # appended: configured folders come first
        folder_paths.folder_names_and_paths[name] = (folder_paths.folder_names_and_paths[name][0], set(known) | set(extensions))
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop(name, None)  # a list made before the change would hide the added folder


def register_text_embeddings_folder() -> None:
    """``models/text_embeddings`` holds cached text-encoder outputs (ours and musubi-tuner's)."""
    register_model_folder(TEXT_EMBEDDINGS, {".safetensors"})


def missing_file_message(node: str, option: str, folder: str, name) -> str | None:
    """Why ``name``, picked in ``option`` of ``node`` from the ``folder`` list, cannot be loaded
    (it is in none of the folder's paths), or None when it is there. For ``validate_inputs``,
    which reports it with ComfyUI's own checks before anything runs. A linked input (None at
    validation) is not checked here; the node's ``execute`` checks what arrives."""
    if name is None or folder_paths.get_full_path(folder, name) is not None:
        return None
    roots = ", ".join(folder_paths.get_folder_paths(folder))
    return (f"{node}: {option} {name!r} is not in the {folder} folders ({roots}); "
            f"put the file there or pick one that the list shows.")


def list_files(folder: str) -> list[str]:
    return folder_paths.get_filename_list(folder)


def resolve_patterns(node: str, folder: str, lines: str) -> list[str]:
    """Full paths for names or globs (one per line) from a model folder, in the order given.

    A line is a name as the folder's file list shows it (``my_lora/step_100.safetensors``),
    a glob over those names (``my_lora/*.safetensors``: ``*`` and ``?`` stay inside one folder,
    ``**`` spans folders) or an absolute path.
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
            matches = [folder_paths.get_full_path(folder, name) for name in sorted(filter(glob_matcher(line), names))]
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


def new_output_path(node: str, folder: str, name: str, extension: str = ".safetensors", *,
                    option: str = "filename", example: str = "my_name") -> str:
    """A path for ``name`` inside the model folder ``folder`` that never overwrites a file.

    ``name`` follows :func:`musubi.files.path_inside` (sub-folders allowed, nothing outside the
    model folder); when the file exists, ``_00001``, ``_00002``… is appended. Missing sub-folders
    are created.
    """
    target = path_inside(model_folder_root(folder), name, where=node, option=option, extension=extension,
                         example=example)
    stem = target[: -len(extension)] if extension else target
    candidate, counter = target, 0
    while os.path.lexists(candidate):
        counter += 1
        candidate = f"{stem}_{counter:05d}{extension}"
    make_folder(node, option, os.path.dirname(candidate))
    return candidate


def folder_inside(node: str, option: str, root: str, name: str, *, example: str = "my_folder") -> str:
    """The folder a user names (``option`` of ``node``) inside ``root``, one of ComfyUI's folders,
    by the same rules as file names (:func:`musubi.files.path_inside`); not created here."""
    return path_inside(root, name, where=node, option=option, example=example)


def make_folder(node: str, option: str, folder: str) -> None:
    """``os.makedirs`` whose failure (a file where a folder should be, no permission) names the option."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise MusubiError(f"{node}: {option}: cannot create the folder {folder} ({error.strerror or error}); "
                          "choose another name.") from None
