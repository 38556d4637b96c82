"""The per-run MagCache controller: for each sampling step, skip the transformer blocks or not.

The skip rule (as in musubi-tuner): the first ``max(floor(ρ·n), 1)`` steps and the last step are
always computed. Any other step multiplies the accumulated ratio ``A`` by its ratio, adds
``|1 − A|`` to the accumulated error ``E`` and counts one more step in a row ``J``; it is skipped
when ``E ≤ θ`` and ``J ≤ K``, otherwise ``A, E, J`` return to ``1, 0, 0`` and the step is computed
(which refreshes the cache). ``≤`` is musubi's comparison (and that of the authors' HunyuanVideo,
FLUX and FramePack code); some of their other scripts use ``<``, which only differs when ``E`` lands
exactly on θ.

Only decisions live here; whoever runs the model keeps the residuals (see the ComfyUI patch and
:mod:`musubi.framepack.block_cache`).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from ..errors import MusubiError
from .calibration import Calibration
from .resampling import calibrated_to_run_step, ratios_for_run, resample_ratios, run_switch_step
from .settings import MagCacheSettings, check_whole

# floor(ρ·n) of a product meant to be whole (0.29·100 = 28.999999999999996) must not lose a step.
_FLOOR_TOLERANCE = 1e-9


class MagCacheState:
    """Decides, step by step, whether a sampling run may skip the transformer blocks.

    Ask :meth:`decide` once per sampling *step* (not per model call): asking again for the same
    step returns the same answer without counting it twice, so a sampler that calls the model
    once for cond and once for uncond shares one decision. A step index lower than the last one
    starts a new run (as does :meth:`reset`). A step that jumps ahead (steps never asked about)
    accumulates the product of the ratios it passes over.

    With ``expert_switch_step`` s, steps ``[0, s)`` and ``[s, n)`` belong to two different networks
    (Wan 2.2 A14B): the accumulators restart at s, step s is always computed (the cached residual
    belongs to the other network), the retention applies to each expert's stretch, and
    ``cache_first_expert=False`` computes every step before s. ``always_compute_steps`` lists run
    steps never skipped.

    ``ratios`` (one per step, resampled with ``resample_method`` when their count differs from
    ``num_steps``) default to ``settings.ratios``; :meth:`for_run` builds them from a calibration.
    """

    def __init__(
        self,
        settings: MagCacheSettings,
        num_steps: int,
        ratios: Sequence[float] | None = None,
        *,
        resample_method: str = "log",
        expert_switch_step: int | None = None,
        cache_first_expert: bool = True,
        always_compute_steps: Iterable[int] = (),
    ) -> None:
        self.settings = settings.validate()
        self.num_steps = check_whole(num_steps, "number of sampling steps", 1)
        if ratios is None:
            ratios = settings.ratios
        if ratios is None:
            raise MusubiError("MagCache needs ratios: pick a calibration or paste the ratios of one.")
        self.ratios = resample_ratios(ratios, num_steps, resample_method)
        if expert_switch_step is not None:
            check_whole(expert_switch_step, "expert_switch_step", 0)
            if expert_switch_step > num_steps:
                raise MusubiError(f"expert_switch_step {expert_switch_step} is past the run's {num_steps} steps.")
        self.expert_switch_step = expert_switch_step
        self.cache_first_expert = bool(cache_first_expert)
        self.always_compute_steps = frozenset(
            check_whole(step, "always_compute_steps entry", 0) for step in always_compute_steps
        )
        self._first_skippable = self._skippable_starts()
        self.reset()

    @classmethod
    def for_run(
        cls,
        settings: MagCacheSettings,
        num_steps: int,
        calibration: Calibration | None = None,
        *,
        resample_method: str = "log",
        branch: str = "mean",
        expert_switch_step: int | None = None,
    ) -> "MagCacheState":
        """A controller for one run: ratios from ``settings.ratios`` when given, else from ``calibration``.

        A two-expert calibration resamples each expert's stretch onto its part of the run (switch
        at ``expert_switch_step``, or at the same fraction of the run as in the calibration) and
        brings its ``cache_first_expert``; a calibration's never-skipped steps are mapped onto the
        run. Pasted ratios bring nothing but the curve.
        """
        if settings.ratios is not None:
            return cls(settings, num_steps, settings.ratios, resample_method=resample_method,
                       expert_switch_step=expert_switch_step)
        if calibration is None:
            raise MusubiError("MagCache needs ratios: pick a calibration or paste the ratios of one.")
        switch = expert_switch_step
        if calibration.expert_switch_step is not None or expert_switch_step is not None:
            switch = run_switch_step(calibration, num_steps, expert_switch_step)
        forced = {calibrated_to_run_step(step, calibration.calibrated_steps, num_steps)
                  for step in calibration.always_compute_steps}
        ratios = ratios_for_run(calibration, num_steps, resample_method, branch, switch)
        return cls(settings, num_steps, ratios, resample_method=resample_method, expert_switch_step=switch,
                   cache_first_expert=calibration.cache_first_expert, always_compute_steps=forced)

    # -- run bookkeeping ------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the run: accumulators, cache validity and counters start afresh."""
        self.accumulated_ratio = 1.0
        self.accumulated_error = 0.0
        self.skips_in_a_row = 0
        self._last_step = -1
        self._last_skip = False
        self.computed_step_indices: list[int] = []
        self.skipped_step_indices: list[int] = []

    @property
    def computed_steps(self) -> int:
        return len(self.computed_step_indices)

    @property
    def skipped_steps(self) -> int:
        return len(self.skipped_step_indices)

    def summary(self) -> str:
        """One line for the log: how many steps were skipped, and which."""
        decided = self.computed_steps + self.skipped_steps
        if not self.skipped_step_indices:
            return f"MagCache: no step skipped ({decided} of {self.num_steps} steps computed)."
        listed = ", ".join(str(step) for step in self.skipped_step_indices)
        return (f"MagCache: skipped {self.skipped_steps} of {decided} steps ({listed}); "
                f"{self.computed_steps} full passes.")

    # -- the decision ---------------------------------------------------------------------------

    def decide(self, step_index: int, cache_ready: bool = True) -> bool:
        """True when step ``step_index`` may skip the blocks and reuse the cached residual.

        ``cache_ready=False`` tells that no usable residual is cached (for instance the batch shape
        changed): the step is then computed and the accumulators restart.
        """
        if isinstance(step_index, bool) or not isinstance(step_index, int) or not 0 <= step_index < self.num_steps:
            raise MusubiError(
                f"MagCache step index {step_index!r} is outside the run's {self.num_steps} steps (0–{self.num_steps - 1})."
            )
        if step_index == self._last_step:
            return self._last_skip
        if step_index < self._last_step:
            self.reset()
        skip = self._decide_new_step(step_index, cache_ready)
        (self.skipped_step_indices if skip else self.computed_step_indices).append(step_index)
        self._last_step, self._last_skip = step_index, skip
        return skip

    def _decide_new_step(self, step: int, cache_ready: bool) -> bool:
        previous = self._last_step
        if previous < 0 or not self._is_candidate(step) or self._crosses_switch(previous, step):
            return self._compute()
        step_ratio = math.prod(self.ratios[previous + 1:step + 1])
        self.accumulated_ratio *= step_ratio
        self.accumulated_error += abs(1.0 - self.accumulated_ratio)
        self.skips_in_a_row += 1
        settings = self.settings
        skip = (cache_ready
                and self.accumulated_error <= settings.threshold
                and self.skips_in_a_row <= settings.K)
        if skip and settings.max_step_deviation is not None:
            skip = abs(1.0 - step_ratio) <= settings.max_step_deviation
        return True if skip else self._compute()

    def _compute(self) -> bool:
        self.accumulated_ratio = 1.0
        self.accumulated_error = 0.0
        self.skips_in_a_row = 0
        return False

    def _skippable_starts(self) -> list[tuple[int, int]]:
        """(first skippable step, end of stretch) per expert stretch that may skip at all."""
        switch = self.expert_switch_step
        segments = [(0, self.num_steps)] if switch is None else [(0, switch), (switch, self.num_steps)]
        starts = []
        for index, (start, end) in enumerate(segments):
            if end <= start or (index == 0 and switch is not None and not self.cache_first_expert):
                continue
            retained = max(math.floor(self.settings.retention_ratio * (end - start) + _FLOOR_TOLERANCE), 1)
            starts.append((start + retained, end))
        return starts

    def _is_candidate(self, step: int) -> bool:
        if not self.settings.caching_enabled or step == self.num_steps - 1 or step in self.always_compute_steps:
            return False
        return any(first <= step < end for first, end in self._first_skippable)

    def _crosses_switch(self, previous: int, step: int) -> bool:
        switch = self.expert_switch_step
        return switch is not None and previous < switch <= step
