"""Per-architecture LoRA presets: which layers a LoRA trains by default and how they are named.

A preset answers four questions for one diffusion transformer family:

* which modules are *target blocks* (by class name; every Linear/Conv inside one is a candidate);
* which candidates are excluded by default (regexes fully matched against the module path);
* what musubi-tuner writes into the metadata (``ss_network_module``, modelspec strings);
* how a module path of the tree we train maps to the name musubi-tuner uses in its files.

The last point only matters for HunyuanVideo: ComfyUI renames the official checkpoint's layers
on load (``img_mlp.fc1`` becomes ``img_mlp.0``, ``img_attn_qkv`` becomes ``img_attn.qkv`` …), while
musubi-tuner and its LoRA files keep the official names. Every other family has the same names
in ComfyUI, diffusers and musubi-tuner.

The default exclusions are written against the real module names of both ComfyUI's and the
official trees, so that they really remove the layers they are meant to (modulation, norms,
embeddings), unlike some of musubi-tuner's patterns that never match.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import MusubiError

GENERIC = "generic"


@dataclass(frozen=True)
class LoraPreset:
    """What a LoRA needs to know about one model family."""

    name: str
    # Class names of the blocks whose Linear/Conv layers are candidates; None = every module whose
    # class name ends in "Block" (for unknown models and small test networks).
    target_block_classes: tuple[str, ...] | None
    # Exclusions always applied, on top of the user's own exclude patterns.
    default_exclude_patterns: tuple[str, ...]
    network_module: str  # musubi-tuner's --network_module, stored as ss_network_module
    base_model_version: str  # musubi-tuner's full architecture name, stored as ss_base_model_version
    modelspec_architecture: str  # SAI model-spec architecture, without the "/lora" suffix
    implementation: str  # modelspec.implementation: the reference implementation's repository
    resolution: str  # modelspec.resolution placeholder when the caller gives none
    # (name on the tree we train, musubi-tuner's name) pairs of path endings, applied only under
    # the listed top-level containers; empty when both name the layers alike.
    renames: tuple[tuple[str, str], ...] = ()
    rename_roots: tuple[str, ...] = ()

    def is_target_block(self, module: nn.Module) -> bool:
        class_name = type(module).__name__
        if self.target_block_classes is None:
            return class_name.endswith("Block")
        return class_name in self.target_block_classes

    def describe_targets(self) -> str:
        if self.target_block_classes is None:
            return "modules whose class name ends in 'Block'"
        return "blocks of class " + " / ".join(self.target_block_classes)

    def musubi_name(self, path: str) -> str:
        """musubi-tuner's (official) dotted name of the module at ``path``; unchanged when not renamed."""
        return self._rename(path, to_musubi=True)

    def tree_name(self, musubi_name: str) -> str:
        """Inverse of :meth:`musubi_name`: the path a musubi-tuner name has on the trained tree."""
        return self._rename(musubi_name, to_musubi=False)

    def _rename(self, path: str, to_musubi: bool) -> str:
        if not path.startswith(self.rename_roots) or not self.renames:
            return path
        for tree_ending, musubi_ending in self.renames:
            old, new = (tree_ending, musubi_ending) if to_musubi else (musubi_ending, tree_ending)
            if path.endswith(old):
                return path[: -len(old)] + new
        return path


# HunyuanVideo: ComfyUI's name (left) and the official / musubi-tuner name (right) of each layer
# inside double_blocks.N / single_blocks.N that is renamed on load (ComfyUI's
# HunyuanVideo.process_unet_state_dict). The leading "." anchors each ending at a name boundary.
_HUNYUAN_VIDEO_RENAMES = (
    (".img_mod.lin", ".img_mod.linear"),
    (".txt_mod.lin", ".txt_mod.linear"),
    (".modulation.lin", ".modulation.linear"),
    (".img_attn.qkv", ".img_attn_qkv"),
    (".txt_attn.qkv", ".txt_attn_qkv"),
    (".img_attn.proj", ".img_attn_proj"),
    (".txt_attn.proj", ".txt_attn_proj"),
    (".img_mlp.0", ".img_mlp.fc1"),
    (".img_mlp.2", ".img_mlp.fc2"),
    (".txt_mlp.0", ".txt_mlp.fc1"),
    (".txt_mlp.2", ".txt_mlp.fc2"),
)

_DEFAULT_RESOLUTION = "1280x720"

PRESETS: dict[str, LoraPreset] = {
    preset.name: preset
    for preset in (
        LoraPreset(
            name="wan",
            target_block_classes=("WanAttentionBlock",),
            default_exclude_patterns=(
                r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head).*",
            ),
            network_module="networks.lora_wan",
            base_model_version="wan",
            modelspec_architecture="wan2.1",
            implementation="https://github.com/Wan-Video/Wan2.1",
            resolution=_DEFAULT_RESOLUTION,
        ),
        LoraPreset(
            name="hunyuan_video",
            # ComfyUI builds HunyuanVideo from FLUX's block classes; the official code names them MM*.
            target_block_classes=("DoubleStreamBlock", "SingleStreamBlock", "MMDoubleStreamBlock", "MMSingleStreamBlock"),
            # Matches the modulation layers in both namings: img_mod.lin / img_mod.linear,
            # txt_mod.*, modulation.lin / modulation.linear.
            default_exclude_patterns=(r".*(img_mod|txt_mod|modulation).*",),
            network_module="networks.lora",
            base_model_version="hunyuan_video",
            modelspec_architecture="hunyuan-video",
            implementation="https://github.com/Tencent/HunyuanVideo",
            resolution=_DEFAULT_RESOLUTION,
            renames=_HUNYUAN_VIDEO_RENAMES,
            rename_roots=("double_blocks.", "single_blocks."),
        ),
        LoraPreset(
            name="framepack",
            target_block_classes=("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"),
            # The AdaLN modulation layers are norm1.linear, norm1_context.linear and norm.linear.
            default_exclude_patterns=(r".*(norm).*",),
            network_module="networks.lora_framepack",
            base_model_version="framepack",
            modelspec_architecture="framepack",
            implementation="https://github.com/lllyasviel/FramePack",
            resolution=_DEFAULT_RESOLUTION,
        ),
        LoraPreset(
            name="flux",
            target_block_classes=("DoubleStreamBlock", "SingleStreamBlock"),
            # Kept even when the user adds exclude patterns (include patterns can still rescue them).
            default_exclude_patterns=(r".*(img_mod\.lin|txt_mod\.lin|modulation\.lin).*", r".*(norm).*"),
            network_module="networks.lora_flux",
            base_model_version="flux_kontext",
            modelspec_architecture="Flux.1-dev",
            implementation="https://github.com/black-forest-labs/flux",
            resolution=_DEFAULT_RESOLUTION,
        ),
        LoraPreset(
            name="qwen_image",
            target_block_classes=("QwenImageTransformerBlock",),
            # The modulation layers are img_mod.1 and txt_mod.1 (dotted), which musubi-tuner's
            # ".*(_mod_).*" never matches.
            default_exclude_patterns=(r".*(img_mod|txt_mod).*",),
            network_module="networks.lora_qwen_image",
            base_model_version="qwen_image",
            modelspec_architecture="Qwen-Image",
            implementation="https://github.com/QwenLM/Qwen-Image",
            resolution="1328x1328",
        ),
        LoraPreset(
            name=GENERIC,
            target_block_classes=None,
            default_exclude_patterns=(),
            network_module="networks.lora",
            base_model_version="unknown",
            modelspec_architecture="unknown",
            implementation="https://github.com/kohya-ss/musubi-tuner",
            resolution=_DEFAULT_RESOLUTION,
        ),
    )
}


def get_preset(preset_or_name: LoraPreset | str) -> LoraPreset:
    """The preset itself, or the one registered under that name (MusubiError listing the names)."""
    if isinstance(preset_or_name, LoraPreset):
        return preset_or_name
    preset = PRESETS.get(preset_or_name) if isinstance(preset_or_name, str) else None
    if preset is None:
        raise MusubiError(
            f"unknown LoRA architecture {preset_or_name!r}; choose one of: {', '.join(PRESETS)}."
        )
    return preset
