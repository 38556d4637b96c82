"""MagCache on a diffusers FramePack transformer: skip its blocks on steps MagCache decides.

The residual MagCache tracks is ``(image tokens leaving the last single block) − (image tokens
entering the first double block)``, over every image-stream token (target and packed clean /
history tokens alike), as in musubi-tuner. While :class:`BlockCache` is active (a ``with``
block), each block's ``forward`` is routed through it:

* on a computed call every block runs; the first remembers its input, the last stores the
  residual (or hands it to a :class:`~musubi.magcache.recorder.CalibrationRecorder`);
* on a skipped call every block hands its inputs through untouched and the last returns the
  remembered input plus the cached residual; the output norm and projection run as usual.

Decisions come from :class:`~musubi.magcache.state.MagCacheState` — one per section, asked once per
sampling step, shared by the cond and uncond calls of that step; each call keeps its own residual.
Leaving the ``with`` block restores the blocks exactly as they were.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import MusubiError
from ..magcache.recorder import CalibrationRecorder
from ..magcache.state import MagCacheState


class BlockCache:
    """Routes the transformer's block calls through MagCache for one sampling run."""

    def __init__(self, transformer: torch.nn.Module):
        blocks = list(getattr(transformer, "transformer_blocks", [])) + list(getattr(transformer, "single_transformer_blocks", []))
        if not blocks:
            raise MusubiError("MagCache: this FramePack transformer has no transformer blocks to cache.")
        self.blocks = blocks
        self._saved: list[tuple[torch.nn.Module, object]] = []
        self.state: MagCacheState | None = None
        self.recorder: CalibrationRecorder | None = None
        self._residuals: dict[str, torch.Tensor] = {}
        self._step: int | None = None
        self._skip_step = False
        self._call_key: str | None = None
        self._skip_call = False
        self._entering: torch.Tensor | None = None
        self.computed_calls = 0
        self.skipped_calls = 0

    # -- installing -------------------------------------------------------------------------

    def __enter__(self) -> "BlockCache":
        last = len(self.blocks) - 1
        for position, block in enumerate(self.blocks):
            self._saved.append((block, block.__dict__.get("forward")))
            block.forward = self._routed(block.forward, position == 0, position == last)
        return self

    def __exit__(self, *exc) -> None:
        for block, previous in self._saved:
            if previous is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = previous
        self._saved.clear()
        self._residuals.clear()
        self._entering = None

    def _routed(self, original: Callable, first: bool, last: bool) -> Callable:
        def forward(hidden_states, encoder_hidden_states, *args, **kwargs):
            if self._call_key is None:
                return original(hidden_states, encoder_hidden_states, *args, **kwargs)
            if first:
                self._entering = hidden_states.clone() if self._measures else None
            if self._skip_call:
                if last:
                    return self._entering + self._residuals[self._call_key], encoder_hidden_states
                return hidden_states, encoder_hidden_states
            output = original(hidden_states, encoder_hidden_states, *args, **kwargs)
            if last and self._entering is not None:
                self._keep(output[0] - self._entering)
            return output

        return forward

    @property
    def _measures(self) -> bool:
        return self.recorder is not None or (self.state is not None and self.state.settings.caching_enabled)

    # -- the run ------------------------------------------------------------------------------

    def start_section(self, state: MagCacheState | None = None, recorder: CalibrationRecorder | None = None) -> None:
        """A new section: fresh decisions (``state``) or a fresh calibration (``recorder``), no cached residual."""
        self.state, self.recorder = state, recorder
        self._residuals.clear()
        self._step = None

    def begin_step(self, step: int) -> None:
        """Decide the step once; every call of the step follows that decision."""
        self._step = step
        self._skip_step = False
        if self.state is not None and self.recorder is None:
            self._skip_step = self.state.decide(step, cache_ready=bool(self._residuals))

    def begin_call(self, key: str) -> None:
        """One forward of the transformer (``key`` tells cond from uncond) is about to run."""
        self._call_key = key
        self._skip_call = self._skip_step and key in self._residuals
        if self._skip_call:
            self.skipped_calls += 1
        else:
            self.computed_calls += 1

    def end_call(self) -> None:
        self._call_key = None
        self._entering = None

    def _keep(self, residual: torch.Tensor) -> None:
        if self.recorder is not None:
            self.recorder.record(residual.detach(), self._step)
        else:
            self._residuals[self._call_key] = residual.detach()
