"""Which sampling step a model evaluation belongs to, told from its noise level.

A sampler that hooks in at the level of model evaluations sees noise levels, not step numbers,
and several evaluations per step with multi-stage solvers (Heun, dpmpp_2s, Runge–Kutta). MagCache
decides per step, so each evaluation is first placed on its step of the descending schedule.
"""

from __future__ import annotations

import math
from typing import Sequence

# Relative tolerance when matching an evaluation's sigma against the schedule.
_SIGMA_TOLERANCE = 1e-4


def step_for_sigma(sigma: float, schedule: Sequence[float]) -> int:
    """The sampling step a model evaluation at ``sigma`` belongs to (schedule descending).

    Step ``i`` goes from ``schedule[i]`` down to ``schedule[i+1]``: an evaluation at ``schedule[i]``
    opens it, and one strictly inside the interval (the midpoint of dpmpp_2s, a Runge–Kutta stage)
    belongs to it too. Heun's corrector at ``schedule[i+1]`` shares the noise level, and so the
    step, of the evaluation that opens step ``i+1``; past the last sigma it stays on the last step.
    """
    steps = len(schedule) - 1
    step = 0
    for index in range(steps):
        level = schedule[index]
        if level >= sigma or math.isclose(level, sigma, rel_tol=_SIGMA_TOLERANCE, abs_tol=1e-9):
            step = index
        else:
            break
    return step


def is_descending(schedule: Sequence[float]) -> bool:
    """Whether the noise levels never rise, so that a level names one step."""
    return all(later <= earlier for earlier, later in zip(schedule, schedule[1:]))


def repeated_levels(schedule: Sequence[float]) -> int:
    """How many steps start at the same noise level as the step before them.

    A schedule asked for more steps than the model has distinct timesteps (``simple`` with
    thousands of steps) repeats levels; such steps cannot be told apart, so a calibration, which
    must measure every step, cannot run on it.
    """
    steps = schedule[:-1]
    return sum(1 for earlier, later in zip(steps, steps[1:])
               if math.isclose(earlier, later, rel_tol=_SIGMA_TOLERANCE, abs_tol=1e-9))
