"""Compile Model (regional): torch.compile of a MODEL's transformer blocks, as a model patch.

The compiled blocks are put in place by an ``APPLY_MODEL`` wrapper for the duration of each model
call and taken out afterwards, so only this patched MODEL (and its clones) runs compiled; the
same weights loaded elsewhere in the graph run eagerly. Weight patches (core LoRA loaders, this
pack's fp8 layers with forward-time LoRA patches), block patches (MagCache) and sampler wrappers
work as usual, in any order of the nodes, because a block is compiled as a whole with whatever
its layers do at call time. Compiler failures fall back to eager with one warning
(:mod:`musubi.compile`).
"""

from __future__ import annotations

import comfy.patcher_extension
from comfy_api.latest import io

from ..musubi.compile import CompiledRegions, CompileSettings, compile_regions
from ..musubi.errors import MusubiError
from ..musubi.lora.presets import GENERIC, get_preset
from .adapters.comfy_model import architecture_of

NODE = "Compile Model (regional)"
WRAPPER_KEY = "musubi_compile"
BACKEND_OPTIONS = ["inductor", "cudagraphs", "aot_eager", "eager"]
MODE_OPTIONS = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class RegionalCompileWrapper:
    """APPLY_MODEL wrapper: the diffusion model's blocks run compiled during the call."""

    def __init__(self, settings: CompileSettings, is_block):
        self.settings = settings
        self.is_block = is_block
        # Per diffusion model (clones of the patched MODEL share one).
        self.regions: dict[int, tuple[object, CompiledRegions]] = {}

    def __call__(self, executor, *args, **kwargs):
        diffusion_model = executor.class_obj.diffusion_model
        entry = self.regions.get(id(diffusion_model))
        if entry is None or entry[0] is not diffusion_model:
            entry = diffusion_model, compile_regions([diffusion_model], self.is_block, self.settings, where=NODE)
            self.regions[id(diffusion_model)] = entry
        regions = entry[1]
        if regions.installed:  # a nested call (another wrapper calls the model again)
            return executor(*args, **kwargs)
        with regions:
            return executor(*args, **kwargs)


def target_blocks(model):
    """The transformer-block test of the model's LoRA preset (class names ending in Block otherwise)."""
    try:
        return get_preset(architecture_of(model)).is_target_block
    except MusubiError:
        return get_preset(GENERIC).is_target_block


class MusubiCompileModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiCompileModel",
            display_name=NODE,
            category="musubi/sampling",
            description=(
                "torch.compile for sampling, one transformer block at a time: compiles in seconds instead of minutes, "
                "keeps LoRAs working (core LoRA loaders, Load DiT (fp8 scaled)) and MagCache skipping. Compiling happens "
                "at the first sampling step; a compiler failure samples uncompiled with one warning in the console. "
                "Order: load → LoRA → Compile Model → MagCache (patch model) → sampler; other orders give the same "
                "result, since each node adds its own kind of patch. Train LoRA ignores this node: use Compile Settings there."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with compiled transformer blocks."),
                io.Combo.Input("backend", options=BACKEND_OPTIONS, default="inductor",
                               tooltip="inductor: fused kernels (needs a C++ compiler; Triton on GPU). cudagraphs: CUDA graphs only. aot_eager/eager: no speed-up, for finding problems."),
                io.Combo.Input("mode", options=MODE_OPTIONS, default="default",
                               tooltip="inductor only: reduce-overhead uses CUDA graphs, max-autotune searches faster kernels (compiles much longer)."),
                io.Boolean.Input("dynamic", default=False,
                                 tooltip="Compile for any latent size at once. Off: each new size compiles again (up to 8, then runs uncompiled). Reported fragile; leave off unless sizes change often."),
            ],
            outputs=[io.Model.Output(tooltip="The model, sampling with compiled blocks.")],
        )

    @classmethod
    def execute(cls, model, backend, mode, dynamic) -> io.NodeOutput:
        settings = CompileSettings(backend, None if mode == "default" else mode, False, dynamic).validate(NODE, prefix="")
        patched = model.clone()
        patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                     RegionalCompileWrapper(settings, target_blocks(patched)))
        return io.NodeOutput(patched)
