"""The models ``python -m musubi train`` knows by name, and where a model's adapter factory is found.

A name stands for an import path ``module:factory`` that is imported only when that model trains,
so this library itself never imports ComfyUI. Paths starting with ``.`` lie in this library; paths
starting with ``musubi_nodes.`` lie in the ComfyUI node pack around it (the repository this library
ships in), whose node modules use ComfyUI's model code as a library, without a server.

The pack's modules import this library as their sibling (``from ...musubi import …``), so they
must be imported as part of the pack's package. On the command line the library is the top-level
package ``musubi``; the pack's folder (the one holding ``musubi/``) is then imported under the
fixed name :data:`PACK_MODULE`, with ``<PACK_MODULE>.musubi.*`` mapped onto the already imported
``musubi.*`` modules, so there is one copy of the library (one ``MusubiError``, one trainer).
Inside ComfyUI the library is already a sub-package of the pack and the pack is used as it is.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from ..errors import MusubiError

PACK_MODULE = "musubi_lora_trainer"  # the pack's package name on the command line
PACK_PACKAGE = "musubi_nodes"  # the pack's node package, beside this library
_LIBRARY = __name__.rsplit(".", 2)[0]  # this library's package name: "musubi", or "<pack>.musubi" inside ComfyUI


@dataclass(frozen=True)
class BuiltinModel:
    """A model name the command line accepts."""

    name: str
    target: str  # "module:factory"; a leading "." means inside this library
    help: str
    options: dict[str, Any] = field(default_factory=dict)  # fixed keyword arguments for the factory

    @property
    def needs_comfyui(self) -> bool:
        return self.target.startswith(PACK_PACKAGE + ".")


_COMFYUI = f"{PACK_PACKAGE}.adapters.headless:from_checkpoint"

BUILTIN_MODELS: dict[str, BuiltinModel] = {model.name: model for model in (
    BuiltinModel("comfyui", _COMFYUI, "the family detected from --dit: Wan 2.1/2.2 t2v, i2v, TI2V-5B or A14B with "
                 "--dit_high_noise, HunyuanVideo, FLUX.1 Kontext, Qwen-Image or Qwen-Image-Edit, loaded by ComfyUI's own "
                 "model code; ComfyUI must be importable or at COMFYUI_PATH"),
    BuiltinModel("wan", _COMFYUI, "Wan 2.1/2.2 through ComfyUI, the family checked", {"architecture": "wan"}),
    BuiltinModel("hunyuan_video", _COMFYUI, "HunyuanVideo through ComfyUI", {"architecture": "hunyuan_video"}),
    BuiltinModel("flux", _COMFYUI, "FLUX.1 Kontext through ComfyUI", {"architecture": "flux"}),
    BuiltinModel("qwen_image", _COMFYUI, "Qwen-Image or Qwen-Image-Edit through ComfyUI", {"architecture": "qwen_image"}),
    BuiltinModel("framepack", ".framepack.adapter:from_checkpoint",
                 "FramePack or FramePack-F1 from a diffusers folder or a single file, with this library's loader"),
    BuiltinModel("toy", ".training.adapter:ToyAdapter", "a tiny random DiT for smoke tests"),
)}


def model_choices_help() -> str:
    """One line per built-in model name, for the command line's help."""
    names = "; ".join(f"{model.name} ({model.help})" for model in BUILTIN_MODELS.values())
    return f"the model to train: {names}; or any adapter factory 'package.module:factory' (required)"


def find_factory(spec: str) -> tuple[Any, dict[str, Any], str]:
    """``(factory, fixed options, description)`` of a model name or an import path ``module:factory``."""
    builtin = BUILTIN_MODELS.get(spec)
    target = builtin.target if builtin else spec
    module_name, colon, factory_name = target.partition(":")
    if not colon or not module_name or not factory_name:
        raise MusubiError(
            f"model {spec!r} is not a built-in model ({', '.join(BUILTIN_MODELS)}) nor an import path "
            "'package.module:factory' (a callable that returns a model adapter)."
        )
    source = f"model {spec!r}"
    if module_name.startswith("."):
        module = importlib.import_module(module_name, _LIBRARY)
    elif module_name == PACK_PACKAGE or module_name.startswith(PACK_PACKAGE + "."):
        module = import_pack_module(module_name, source)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise MusubiError(f"{source}: cannot import {module_name} ({error}); is the package installed?") from error
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise MusubiError(f"{source}: {module_name} has no callable named {factory_name}.")
    return factory, dict(builtin.options) if builtin else {}, source


# --- the node pack as a library ------------------------------------------------------------------


def pack_folder() -> str:
    """The folder holding this library's package: the node pack's folder in a clone of the repository."""
    return os.path.dirname(os.path.dirname(os.path.abspath(sys.modules[_LIBRARY].__file__)))


def import_pack_module(module_name: str, source: str = "the model"):
    """Import ``musubi_nodes.<…>`` of the pack around this library, ComfyUI prepared first."""
    if "." in _LIBRARY:  # inside ComfyUI: the library is "<pack>.musubi", the pack is imported already
        return importlib.import_module(f"{_LIBRARY.rpartition('.')[0]}.{module_name}")
    root = pack_folder()
    if not (os.path.isfile(os.path.join(root, "__init__.py")) and os.path.isdir(os.path.join(root, PACK_PACKAGE))):
        raise MusubiError(
            f"{source} trains through the ComfyUI node pack, which is not beside this library ({root} has no "
            f"{PACK_PACKAGE}/): run from a clone of the repository (the pip wheel holds the library only)."
        )
    package = sys.modules.get(PACK_MODULE)
    if package is None:
        sys.meta_path.insert(0, _LibraryAlias(f"{PACK_MODULE}.{_LIBRARY}", _LIBRARY))
        spec = importlib.util.spec_from_file_location(PACK_MODULE, os.path.join(root, "__init__.py"),
                                                      submodule_search_locations=[root])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = package
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules[PACK_MODULE]
            raise
    try:
        package.prepare_headless()
    except ImportError as error:
        raise MusubiError(f"{source}: {error}") from error
    return importlib.import_module(f"{PACK_MODULE}.{module_name}")


class _LibraryAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``<alias>.x`` the already imported (or now imported) module ``<library>.x``: the pack's
    relative imports of its sibling library then reach the one copy the command line runs."""

    def __init__(self, alias: str, library: str):
        self.alias, self.library = alias, library
        self.original_specs: dict[str, Any] = {}

    def _real_name(self, fullname: str) -> str | None:
        if fullname == self.alias or fullname.startswith(self.alias + "."):
            return self.library + fullname[len(self.alias):]
        return None

    def find_spec(self, fullname, path=None, target=None):
        real = self._real_name(fullname)
        if real is None:
            return None
        module = importlib.import_module(real)
        return importlib.util.spec_from_loader(fullname, self, is_package=hasattr(module, "__path__"))

    def create_module(self, spec):
        module = importlib.import_module(self._real_name(spec.name))
        self.original_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # The import system gave the module the alias's spec; it keeps its own (it is already executed).
        module.__spec__ = self.original_specs.pop(module.__spec__.name)
