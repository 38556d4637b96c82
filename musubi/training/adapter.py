"""The one door between the trainer and a diffusion model: a small adapter object.

The trainer never touches a model directly. It asks an adapter for the module tree the LoRA
attaches to, for a velocity prediction of a noisy batch, and for the flow-matching target. So a
ComfyUI model, a diffusers model and a tiny test network all plug into the same loop.

Every adapter hands the model exactly ``1000 * t`` in the model's own timestep convention, where
``t`` is the noise level of the noisy latents (musubi-tuner hands many models ``1000 * t + 1``).
The velocity target is ``noise - latents`` for every architecture trained here.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..architectures import WITH_GENERIC
from ..errors import MusubiError
from .models import BUILTIN_MODELS, find_factory

ARCHITECTURES = WITH_GENERIC

# What load_adapter checks an adapter object for.
_REQUIRED_METHODS = ("lora_root", "predict_velocity", "velocity_target", "set_gradient_checkpointing")


@runtime_checkable
class ModelAdapter(Protocol):
    """What the trainer needs from a model.

    ``architecture`` picks the LoRA preset (one of :data:`ARCHITECTURES`). The module tree of
    :meth:`lora_root` stays frozen; the LoRA network attaches to it with forward hooks.
    """

    architecture: str

    def lora_root(self) -> nn.Module:
        """The module tree the LoRA network attaches to (its weights are never trained)."""
        ...

    def predict_velocity(self, noisy_latents: torch.Tensor, noise_level: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """The model's velocity for ``noisy_latents`` at noise levels ``noise_level`` (float ``[B]`` in [0, 1]).

        ``batch`` holds the conditioning of the latent cache items (``context``, ``context_mask``,
        ``pooled`` ...). The model must be given exactly ``1000 * noise_level`` as its timestep.
        """
        ...

    def velocity_target(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The training target for clean ``latents`` and the ``noise`` mixed into them."""
        ...

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Trade compute for memory by recomputing block activations in the backward pass."""
        ...


def flow_matching_velocity(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d t for x_t = (1 − t)·x0 + t·ε: the target ``ε − x0`` of every architecture here."""
    return noise - latents


def check_adapter(adapter: Any, source: str = "the adapter") -> Any:
    """Raise MusubiError unless ``adapter`` offers what :class:`ModelAdapter` promises; return it."""
    missing = [name for name in _REQUIRED_METHODS if not callable(getattr(adapter, name, None))]
    if missing:
        raise MusubiError(
            f"{source} ({type(adapter).__name__}) is not a model adapter: it lacks {', '.join(missing)}. "
            "An adapter needs architecture, lora_root(), predict_velocity(), velocity_target() and "
            "set_gradient_checkpointing()."
        )
    architecture = getattr(adapter, "architecture", None)
    if architecture not in ARCHITECTURES:
        raise MusubiError(
            f"{source}: architecture {architecture!r} is unknown; it must be one of {', '.join(ARCHITECTURES)}."
        )
    if not isinstance(adapter.lora_root(), nn.Module):
        raise MusubiError(f"{source}: lora_root() must return a torch.nn.Module, got {type(adapter.lora_root()).__name__}.")
    return adapter


def load_adapter(spec: str, data: Any = None, validation_data: Any = None, **options: Any) -> ModelAdapter:
    """The adapter named by ``spec``: a built-in model name (:data:`.models.BUILTIN_MODELS`: ``"toy"``,
    ``"framepack"``, ``"comfyui"`` …) or an import path ``"package.module:factory"``.

    A factory is any callable returning an adapter; it receives ``options`` as keyword arguments
    (options that are None are left out, so a factory's own defaults apply), and the training
    data as ``data`` when it has a parameter of that name. An adapter that prepared its own view
    of the data (ComfyUI's models read each item's conditioning from its caches) offers it as
    ``training_dataset``; the trainer then trains on that view. Validation data goes to a factory
    with a ``validation_data`` parameter (which offers its view as ``validation_dataset``); others
    score it as it is.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise MusubiError(f"model: name the model: {', '.join(BUILTIN_MODELS)}, or an adapter factory 'package.module:factory'.")
    spec = spec.strip()
    factory, fixed, source = find_factory(spec)
    options = {key: value for key, value in options.items() if value is not None}
    for key, value in fixed.items():  # e.g. model "wan" is the ComfyUI model checked to be Wan
        if key in options and options[key] != value:
            raise MusubiError(f"{source} sets {key} = {value!r}; {options[key]!r} contradicts it (use model 'comfyui' to choose).")
        options[key] = value
    if data is not None and _takes(factory, "data"):
        options["data"] = data
    if validation_data is not None and _takes(factory, "validation_data"):
        options["validation_data"] = validation_data
    return check_adapter(_call_factory(factory, options, source), source)


def _takes(factory, name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _call_factory(factory, options: dict[str, Any], source: str):
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = None
    if parameters is not None and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(options) - set(parameters))
        if unknown:
            accepted = ", ".join(name for name in parameters if name != "self") or "no options"
            raise MusubiError(f"{source} does not take {', '.join(unknown)}; it accepts: {accepted}.")
    return factory(**options)


# --- a tiny DiT-like model for tests and smoke runs -------------------------------------------


def timestep_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of model timesteps in [0, 1000] (cosines then sines)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    angles = timestep.float()[:, None] * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class ToyBlock(nn.Module):
    """A pre-norm MLP block modulated by the conditioning (scale and shift), like a DiT block."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.modulation = nn.Linear(width, 2 * width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, hidden: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(conditioning)).chunk(2, dim=-1)
        x = self.norm(hidden) * (1 + scale[:, None]) + shift[:, None]
        return hidden + self.fc2(F.gelu(self.fc1(x)))


class ToyDiT(nn.Module):
    """Latents ``[B, C, *spatial]`` as tokens of C channels, a few :class:`ToyBlock`, back to latents.

    Conditioned on the model timestep and on the masked mean of a text ``context`` ``[B, L, D]``.
    """

    def __init__(self, latent_channels: int = 4, context_dim: int = 8, width: int = 32, depth: int = 2, frequency_dim: int = 16):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.patch_in = nn.Linear(latent_channels, width)
        self.time_in = nn.Linear(frequency_dim, width)
        self.context_in = nn.Linear(context_dim, width)
        self.blocks = nn.ModuleList(ToyBlock(width) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False)
        self.proj_out = nn.Linear(width, latent_channels)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, channels = x.shape[:2]
        context = context.to(self.context_in.weight.dtype)
        tokens = x.reshape(batch, channels, -1).transpose(1, 2)
        if context_mask is None:
            pooled = context.mean(dim=1)
        else:
            weights = context_mask.to(context.dtype)[..., None]
            pooled = (context * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        conditioning = self.time_in(timestep_embedding(timestep, self.frequency_dim).to(x.dtype)) + self.context_in(pooled)
        hidden = self.patch_in(tokens)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(block, hidden, conditioning, use_reentrant=False)
            else:
                hidden = block(hidden, conditioning)
        out = self.proj_out(self.norm_out(hidden))
        return out.transpose(1, 2).reshape(x.shape)


class ToyAdapter:
    """A frozen :class:`ToyDiT` with random weights from ``seed``, behind the adapter interface.

    Cache items need ``latents`` ``[C, (T,) H, W]`` with C = ``latent_channels`` and ``context``
    ``[L, context_dim]``. Building it does not disturb the global random state.
    """

    architecture = "generic"

    def __init__(self, latent_channels: int = 4, context_dim: int = 8, width: int = 32, depth: int = 2, seed: int = 0):
        for name, value in (("latent_channels", latent_channels), ("context_dim", context_dim), ("width", width), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MusubiError(f"toy model: {name} must be a whole number ≥ 1, got {value!r}.")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.model = ToyDiT(latent_channels, context_dim, width, depth)
        self.model.requires_grad_(False).eval()

    def lora_root(self) -> nn.Module:
        return self.model

    def predict_velocity(self, noisy_latents: torch.Tensor, noise_level: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        if "context" not in batch:
            raise MusubiError("the toy model needs a 'context' tensor [L, D] in every latent cache item.")
        return self.model(noisy_latents, 1000.0 * noise_level, batch["context"], batch.get("context_mask"))

    def velocity_target(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return flow_matching_velocity(latents, noise)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.model.gradient_checkpointing = bool(enabled)

    def to_device(self, device: torch.device | str) -> None:
        self.model.to(device)
