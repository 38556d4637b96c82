"""Training samples cut into FramePack sections, one training item per section.

A FramePack LoRA trains on sections of a video, as FramePack samples it (see
:mod:`.training_sections` for the layouts). This view turns any source of whole samples — each a
HunyuanVideo-VAE latent ``[16, T, H, W]`` with its conditioning — into one item per section, cutting
a section's latents only when a batch needs them.
"""

from __future__ import annotations

import collections

import torch

from ..errors import MusubiError
from . import training_sections as sections

# HunyuanVideo VAE latents have this many channels.
LATENT_CHANNELS = 16
RECENT_SECTIONS = 16  # sections kept cut (and samples' conditionings kept converted) between batches

DEFAULT_SETTINGS = {
    "layout": "vanilla",
    "latent_window_size": sections.LATENT_WINDOW_SIZE,
    "one_frame_target_index": sections.LATENT_WINDOW_SIZE,
    "one_frame_clean_indices": (0,),
    "one_frame_no_post": False,
    "guidance_scale": 1.0,
    "clip_vision_output": None,
}


class FramePackSections:
    """Whole samples cut into FramePack sections: one training item per section.

    Takes and offers the interface of Train LoRA's training sources (``__len__``, ``latent_shape``,
    ``latent``, ``conditioning``); a section's target latents are its item's latent, and
    :meth:`section_tensors` gives its context latents and frame indices too.
    """

    def __init__(self, data, settings: dict | None, where: str = "Train LoRA"):
        self.data = data
        self.where = where
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        layout, window = self.settings["layout"], self.settings["latent_window_size"]
        options = {}
        if layout == "one_frame":
            options = {"target_index": self.settings["one_frame_target_index"],
                       "clean_indices": self.settings["one_frame_clean_indices"], "no_post": self.settings["one_frame_no_post"]}
        self.entries: list[tuple[int, sections.Section]] = []
        for sample in range(len(data)):
            shape = tuple(data.latent_shape(sample))
            if len(shape) != 4 or shape[0] != LATENT_CHANNELS:
                raise MusubiError(
                    f"{self.where}: sample {sample} has a latent of shape {list(shape)}; FramePack trains on HunyuanVideo VAE "
                    f"latents [{LATENT_CHANNELS}, T, H, W] (VAE Encode of the video with the HunyuanVideo VAE)."
                )
            try:
                cut = sections.sections_for(shape[1], layout, window, **options)
            except MusubiError as error:
                raise MusubiError(f"{self.where}: sample {sample}: {error}") from None
            self.entries.extend((sample, section) for section in cut)
        self._recent: collections.OrderedDict[int, dict[str, torch.Tensor]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def latent_shape(self, index: int) -> tuple[int, ...]:
        sample, section = self.entries[index]
        channels, _, height, width = self.data.latent_shape(sample)
        return (channels, len(section.target_frames), height, width)

    def section_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """The target, context latents and frame indices of section ``index`` (VAE latent space)."""
        if index in self._recent:
            self._recent.move_to_end(index)
            return self._recent[index]
        sample, section = self.entries[index]
        self._recent[index] = sections.cut_section(self.data.latent(sample).float(), section)
        while len(self._recent) > RECENT_SECTIONS:
            self._recent.popitem(last=False)
        return self._recent[index]

    def latent(self, index: int) -> torch.Tensor:
        return self.section_tensors(index)[sections.TARGET_KEY]

    def conditioning(self, index: int) -> list:
        return self.data.conditioning(self.entries[index][0])
