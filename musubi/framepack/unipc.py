"""UniPC with the B(h) = h ("bh1") variant for flow-matching models, in data (x0) prediction.

UniPC (Zhao et al., NeurIPS 2023, arXiv 2302.04867) is a multistep predictor-corrector solver of
the diffusion ODE. FramePack's sampler (lllyasviel's flow-matching UniPC, which musubi-tuner
copies) runs it in the variable ``λ = −log σ`` on the model's clean-sample prediction ``m(x, σ)``:
with ``h = λ_t − λ_s`` the first-order step from ``σ_s`` to ``σ_t`` is
``x_t = (σ_t/σ_s)·x_s + (1 − σ_t/σ_s)·m_s`` — exactly the Euler step of the flow ODE — and
higher orders add finite differences of earlier predictions with coefficients from a small linear
system (the paper's ``R·ρ = b`` with ``φ``-functions of ``−h``). Every step evaluates the model
once, at the predicted point, and that evaluation also corrects the step (UniC) before it is
reused by the next predictor (UniP).

Two details follow FramePack rather than the paper's reference code: the order ramps up
1, 2, 3 over the first steps and stays at ``min(3, steps − 1)``, and the loop never evaluates
the model at ``σ = 0`` — the result is the model's clean-sample prediction at the last non-zero
level, so ``steps`` steps cost exactly ``steps`` model evaluations. Coefficients are computed in
float64 (FramePack uses float32); the latents keep their own dtype.

This is a small implementation of the formulas, not diffusers' ``UniPCMultistepScheduler``: that
scheduler builds its own σ grid and takes a final solver step to σ = 0, so it does not reproduce
FramePack's results.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..errors import MusubiError

MAX_ORDER = 3
# predict(x, sigma, step_index) -> clean-sample prediction, same shape as x
Predictor = Callable[[torch.Tensor, float, int], torch.Tensor]


def _phi_coefficients(neg_h: float, order: int) -> list[float]:
    """``b_k = k!·φ_{k+1}(−h)/B(h)`` for k = 1..order with B(h) = −h (bh1), φ by their recursion."""
    phi = math.expm1(neg_h) / neg_h - 1.0
    factorial = 1
    coefficients = []
    for k in range(1, order + 1):
        coefficients.append(phi * factorial / neg_h)
        factorial *= k + 1
        phi = phi / neg_h - 1.0 / factorial
    return coefficients


def _solve(rows: list[list[float]], rhs: list[float]) -> list[float]:
    matrix = torch.tensor(rows, dtype=torch.float64)
    vector = torch.tensor(rhs, dtype=torch.float64)
    return torch.linalg.solve(matrix, vector).tolist()


def unipc_update(x: torch.Tensor, previous: Sequence[torch.Tensor], previous_sigmas: Sequence[float],
                 sigma: float, order: int, predict: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One UniPC step from ``previous_sigmas[-1]`` to ``sigma`` using the last ``order`` predictions.

    Returns the corrected latent at ``sigma`` and the model's prediction there.
    """
    sigma_s = previous_sigmas[-1]
    model_s = previous[-1]
    h = math.log(sigma_s) - math.log(sigma)  # λ_t − λ_s with λ = −log σ
    neg_h = -h
    # Finite differences to the earlier predictions, each divided by its relative position r_i.
    positions, differences = [], []
    for back in range(1, order):
        sigma_i = previous_sigmas[-(back + 1)]
        r = (math.log(sigma_s) - math.log(sigma_i)) / h
        positions.append(r)
        differences.append((previous[-(back + 1)] - model_s) / r)
    powers = positions + [1.0]
    b = _phi_coefficients(neg_h, order)
    rows = [[p ** k for p in powers] for k in range(order)]

    base = (sigma / sigma_s) * x - math.expm1(neg_h) * model_s
    if differences:
        rho_p = [0.5] if order == 2 else _solve([row[:-1] for row in rows[:-1]], b[:-1])
        predicted_change = sum(weight * diff for weight, diff in zip(rho_p, differences))
        x_predicted = base - neg_h * predicted_change
    else:
        x_predicted = base
    model_t = predict(x_predicted)

    rho_c = [0.5] if order == 1 else _solve(rows, b)
    correction = model_t - model_s
    corrected_change = rho_c[-1] * correction
    for weight, diff in zip(rho_c[:-1], differences):
        corrected_change = corrected_change + weight * diff
    return base - neg_h * corrected_change, model_t


def sample_unipc(predict: Predictor, x: torch.Tensor, sigmas: Sequence[float],
                 on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Integrate from ``sigmas[0]`` to ``sigmas[-1]``; returns the clean-sample prediction.

    ``sigmas`` descend and end at 0 (never evaluated); ``predict(x, σ, i)`` is called once per step
    ``i`` = 0 … len(sigmas) − 2. ``on_step(i, prediction)`` runs after each evaluation.
    """
    sigmas = [float(value) for value in sigmas]
    steps = len(sigmas) - 1
    if steps < 1 or any(later >= earlier for earlier, later in zip(sigmas, sigmas[1:])) or sigmas[-2] <= 0:
        raise MusubiError("UniPC needs at least two strictly descending noise levels, all but the last above 0.")
    max_order = min(MAX_ORDER, steps - 1)
    model = predict(x, sigmas[0], 0)
    if on_step is not None:
        on_step(0, model)
    history, history_sigmas = [model], [sigmas[0]]
    for i in range(1, steps):
        order = min(i, max_order)
        x, model = unipc_update(x, history, history_sigmas, sigmas[i], order,
                                lambda point, i=i: predict(point, sigmas[i], i))
        history = (history + [model])[-max_order:]
        history_sigmas = (history_sigmas + [sigmas[i]])[-max_order:]
        if on_step is not None:
            on_step(i, model)
    return history[-1]
