"""The trainable module of one layer, one class per network type, sharing the hook machinery.

Every type adds a weight change ``ΔW`` to a frozen Linear / Conv layer ``y = f(x)`` through a
forward hook, ``y + m · (ΔW ⋆ x)`` with ``m`` the multiplier (``⋆`` the layer's own operation):

* :class:`LoRAModule` (``lora``): ``ΔW = (α/r) · U·D`` with ``D`` "lora_down" (r×in) and ``U``
  "lora_up" (out×r), computed as ``U(D(x))`` without ever forming ``ΔW``;
* :class:`LoHaModule` (``loha``, the Hadamard product of two low-rank matrices):
  ``ΔW = (α/r) · (W1a·W1b) ⊙ (W2a·W2b)``, tensors ``hada_w1_a`` (out×r), ``hada_w1_b`` (r×in),
  ``hada_w2_a`` (out×r), ``hada_w2_b`` (r×in);
* :class:`LoKrModule` (``lokr``, a Kronecker product): ``ΔW = s · W1 ⊗ W2`` with ``lokr_w1``
  (out_l×in_m) and either ``W2 = lokr_w2_a·lokr_w2_b`` (out_k×r · r×in_n, ``s = α/r``) or a full
  ``lokr_w2`` (out_k×in_n, ``s = 1``), where ``out = out_l·out_k`` and ``in = in_m·in_n`` come from
  :func:`lokr_factors`.

For a convolution ``in`` is the input channels times the kernel size: the weight is handled as
the matrix ``[out, in·k…]`` and reshaped to the kernel at the end, the way ComfyUI's loaders
reshape these products.

The hook only sees the layer's input and output: the layer, its ``forward`` and its weights are
never touched or read, so the modules work on ComfyUI's cast / fp8 layers and compiled blocks.
Every module keeps a 0-dim ``alpha`` buffer; its ``state_dict()`` holds exactly the tensors of
its type's file layout (``lora_down.weight`` … / ``hada_w1_a`` … / ``lokr_w1`` …, ``alpha``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MusubiError

NETWORK_TYPES = ("lora", "loha", "lokr")
TYPE_TITLES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}


@dataclass(frozen=True)
class LayerShape:
    """What a LoRA needs from its target layer: kind, widths and, for convolutions, the geometry."""

    kind: str  # "linear", "conv2d" or "conv3d"
    in_features: int
    out_features: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: Any = ()
    dilation: tuple[int, ...] = ()
    padding_mode: str = "zeros"

    @classmethod
    def of(cls, layer: nn.Module) -> LayerShape:
        kind = layer_kind(layer)
        if kind == "linear":
            return cls(kind, layer.in_features, layer.out_features)
        if kind is None:
            raise MusubiError(f"a LoRA needs a Linear, Conv2d or Conv3d layer, got {type(layer).__name__}.")
        return cls(
            kind, layer.in_channels, layer.out_channels, tuple(layer.kernel_size), tuple(layer.stride),
            layer.padding, tuple(layer.dilation), layer.padding_mode,
        )

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel_size) if self.kernel_size else 1

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the layer's weight: ``[out, in]`` or ``[out, in, *kernel]``."""
        return (self.out_features, self.in_features) + tuple(self.kernel_size)

    def make_down_up(self, rank: int) -> tuple[nn.Module, nn.Module]:
        """D with the layer's own geometry, U a plain (or 1×1 conv) projection back to its width."""
        if self.kind == "linear":
            return nn.Linear(self.in_features, rank, bias=False), nn.Linear(rank, self.out_features, bias=False)
        conv = nn.Conv3d if self.kind == "conv3d" else nn.Conv2d
        down = conv(
            self.in_features, rank, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, padding_mode=self.padding_mode, bias=False,
        )
        return down, conv(rank, self.out_features, 1, bias=False)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x`` through a layer of this geometry whose weight is ``weight`` (no bias)."""
        if self.kind == "linear":
            return F.linear(x, weight)
        conv = F.conv3d if self.kind == "conv3d" else F.conv2d
        return conv(x, weight, None, self.stride, self.padding, self.dilation)


def layer_kind(module: nn.Module) -> str | None:
    """"linear", "conv2d", "conv3d", or None for layers a LoRA does not target."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv3d):
        return "conv3d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def network_type_title(network_type: str) -> str:
    return TYPE_TITLES.get(network_type, network_type)


# --- the shared machinery ------------------------------------------------------------------------


class NetworkModule(nn.Module):
    """What every type shares: path, target geometry, multiplier, alpha and scale, module dropout
    and the forward hook. A type provides :meth:`branch` (its term for an input), :meth:`delta_weight`
    (its ``ΔW``, for merging and checks) and how it reads its tensors from a file."""

    network_type = ""
    tensor_names: tuple[str, ...] = ()  # the tensors of one module in a file, besides "alpha"

    def __init__(self, path: str, target: nn.Module | LayerShape, rank: int, multiplier: float = 1.0,
                 rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__()
        if rank < 1:
            raise MusubiError(f"{path}: the {network_type_title(self.network_type)} rank must be at least 1, got {rank}.")
        self.path = path
        self.layer_shape = target if isinstance(target, LayerShape) else LayerShape.of(target)
        self.multiplier = float(multiplier)
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.rank = 0
        self.scale = 1.0

    def _init_alpha(self, alpha: float | None) -> None:
        alpha = float(self.rank) if alpha is None or float(alpha) == 0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self._refresh_scale()
        self.register_load_state_dict_post_hook(_refresh_scale_after_load)

    @property
    def is_conv(self) -> bool:
        return self.layer_shape.kind != "linear"

    def branch(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - every type overrides it
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - every type overrides it
        """``ΔW`` with the module's scale (not the multiplier), shaped like the layer's weight."""
        raise NotImplementedError

    def hook(self, target: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Forward hook on the target layer: returns ``output + branch(input)``."""
        if self.multiplier == 0 or not isinstance(output, torch.Tensor):
            return output
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return output
        x = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
        delta = self.branch(x).to(device=output.device)
        # One rounding to the layer's output dtype, after the sum.
        return (output + delta).to(output.dtype)

    def _refresh_scale(self) -> None:
        alpha = float(self.alpha)
        self.scale = (alpha if alpha != 0 else self.rank) / self.rank

    def _input_like(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x`` on the module's device, and in its dtype unless autocast decides the dtypes."""
        if torch.is_autocast_enabled(x.device.type):
            return x.to(device=weight.device)
        return x.to(device=weight.device, dtype=weight.dtype)

    def _output_keep_mask(self, y: torch.Tensor) -> torch.Tensor:
        """Rank dropout of a weight-change type: whole output rows of ``ΔW`` are dropped, one mask of
        ``out_features`` per call shared by the batch, broadcast over ``y``'s layout."""
        keep = (torch.rand(self.layer_shape.out_features, device=y.device) >= self.rank_dropout).to(y.dtype)
        if self.is_conv:  # [B, out, *spatial]
            return keep.reshape((-1,) + (1,) * (y.dim() - 2))
        return keep

    def file_rank(self, tensors: dict[str, torch.Tensor]) -> int | None:
        """The rank the file's tensors of this module have (None when they have none)."""
        raise NotImplementedError  # pragma: no cover

    def rank_mismatch(self, tensors: dict[str, torch.Tensor]) -> str | None:
        """Why the file's tensors (already checked to fit the layer) do not have the rank the
        settings gave this module, or None."""
        rank = self.file_rank(tensors)
        if rank is not None and rank != self.rank:
            return f"rank {rank} in the file, {self.rank} in the settings"
        return None

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"{self.path}, rank={self.rank}, alpha={float(self.alpha):g}"


def _refresh_scale_after_load(module: NetworkModule, incompatible_keys) -> None:
    module._refresh_scale()


# --- LoRA ------------------------------------------------------------------------------------------


class LoRAModule(NetworkModule):
    """The low-rank branch of one Linear / Conv layer: ``m · s · U(drop(D(x)))`` with ``s = α / r``."""

    network_type = "lora"
    tensor_names = ("lora_down.weight", "lora_up.weight")

    def __init__(
        self,
        path: str,
        target: nn.Module | LayerShape,
        rank: int,
        alpha: float | None = None,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__(path, target, rank, multiplier, rank_dropout, module_dropout)
        self.dropout = dropout
        self._build(rank)
        self._init_alpha(alpha)

    def _build(self, rank: int, like: torch.Tensor | None = None) -> None:
        self.rank = int(rank)
        down, up = self.layer_shape.make_down_up(self.rank)
        if like is not None:
            down, up = down.to(device=like.device, dtype=like.dtype), up.to(device=like.device, dtype=like.dtype)
        # kaiming_uniform with a=√5 is Uniform(±1/√fan_in), fan_in = in (× kernel size for convs).
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(up.weight)
        self.lora_down, self.lora_up = down, up

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA term for input ``x``, computed in the LoRA's dtype (dropouts only in training)."""
        weight = self.lora_down.weight
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(device=weight.device)
        else:
            x = x.to(device=weight.device, dtype=weight.dtype)
        hidden = self.lora_down(x)
        scale = self.scale
        if self.training:
            if self.dropout:
                hidden = F.dropout(hidden, p=self.dropout, training=True)
            if self.rank_dropout:
                hidden = hidden * self._rank_keep_mask(hidden)
                scale = scale / (1.0 - self.rank_dropout)  # as if the rank itself were smaller
        return self.lora_up(hidden) * (self.multiplier * scale)

    def _rank_keep_mask(self, hidden: torch.Tensor) -> torch.Tensor:
        """A keep-mask per (sample, rank), shared by all tokens / pixels of that sample."""
        batch = hidden.shape[0] if hidden.dim() > 1 else 1
        keep = (torch.rand(batch, self.rank, device=hidden.device) >= self.rank_dropout).to(hidden.dtype)
        if hidden.dim() == 1:
            return keep[0]
        if self.is_conv:  # [B, r, *spatial]
            return keep.reshape((batch, self.rank) + (1,) * (hidden.dim() - 2))
        return keep.reshape((batch,) + (1,) * (hidden.dim() - 2) + (self.rank,))  # [B, ..., r]

    def delta_weight(self) -> torch.Tensor:
        up = self.lora_up.weight.reshape(self.layer_shape.out_features, self.rank)
        down = self.lora_down.weight.reshape(self.rank, -1)
        return (up @ down).reshape(self.layer_shape.weight_shape) * self.scale

    def resize(self, rank: int) -> None:
        """Re-create D and U with another rank (freshly initialised), keeping dtype and device."""
        if rank != self.rank:
            self._build(rank, like=self.lora_down.weight)
            self._refresh_scale()

    # -- files --

    def file_rank(self, tensors: dict[str, torch.Tensor]) -> int | None:
        down = tensors.get(".lora_down.weight")
        return int(down.shape[0]) if down is not None and down.dim() >= 1 else None

    def file_problem(self, tensors: dict[str, torch.Tensor], path: str) -> str | None:
        if ".lora_down.weight" not in tensors or ".lora_up.weight" not in tensors:
            present = ", ".join(path + s for s in tensors)
            return f"{present} (its lora_down/lora_up partner is missing)"
        problem = _lora_shape_problem(self, tensors[".lora_down.weight"], tensors[".lora_up.weight"])
        return f"{path}: {problem}" if problem else None

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        down, up = tensors[".lora_down.weight"], tensors[".lora_up.weight"]
        self.resize(down.shape[0])
        rank = down.shape[0]
        alpha = tensors.get(".alpha")
        alpha_value = float(rank) if alpha is None or float(alpha) == 0 else float(alpha)
        with torch.no_grad():
            self.lora_down.weight.copy_(down.reshape(self.lora_down.weight.shape))
            self.lora_up.weight.copy_(up.reshape(self.lora_up.weight.shape))
            self.alpha.fill_(alpha_value)
        self._refresh_scale()


def _lora_shape_problem(module: LoRAModule, down: torch.Tensor, up: torch.Tensor) -> str | None:
    """Why a (down, up) pair cannot sit on this module's layer, or None when it fits."""
    if down.dim() < 2 or up.dim() < 2:
        return f"lora_down {list(down.shape)} / lora_up {list(up.shape)} are not weight matrices"
    rank = down.shape[0]
    expected_down = (rank,) + tuple(module.lora_down.weight.shape[1:])
    expected_up = (module.lora_up.weight.shape[0], rank) + tuple(module.lora_up.weight.shape[2:])
    down_ok = tuple(down.shape) == expected_down or (
        not module.is_conv and down.dim() == 2 and tuple(down.shape) == expected_down[:2]
    )
    up_ok = tuple(up.shape) == expected_up or tuple(up.shape) == expected_up[:2] + (1,) * (up.dim() - 2)
    if down_ok and up_ok and up.shape[1] == rank:
        return None
    return (
        f"lora_down {list(down.shape)} / lora_up {list(up.shape)} do not match the layer "
        f"(expected {list(expected_down)} / {list(expected_up)})"
    )


# --- weight-change types (LoHa, LoKr) ----------------------------------------------------------------


class _WeightChangeModule(NetworkModule):
    """A type whose term is a weight change: LoHa and LoKr. Works on Linear layers and on
    convolutions (handled as the matrix ``[out, in·kernel]``) with zero padding."""

    def __init__(self, path, target, rank, multiplier=1.0, rank_dropout=None, module_dropout=None):
        super().__init__(path, target, rank, multiplier, rank_dropout, module_dropout)
        if self.is_conv and self.layer_shape.padding_mode != "zeros":
            raise MusubiError(
                f"{path}: {network_type_title(self.network_type)} supports convolutions with zero padding only "
                f"(this one pads with '{self.layer_shape.padding_mode}'); exclude it with exclude_patterns."
            )
        self.dropout = None  # LoHa/LoKr have no inner features to drop (see the network's check)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``ΔW`` as a matrix: ``[out, in · kernel size]``."""
        return self.layer_shape.out_features, self.layer_shape.in_features * self.layer_shape.kernel_numel

    def _finish_branch(self, y: torch.Tensor) -> torch.Tensor:
        scale = self.scale
        if self.training and self.rank_dropout:
            y = y * self._output_keep_mask(y)
            scale = scale / (1.0 - self.rank_dropout)
        return y * (self.multiplier * scale)

    def _weight_term(self, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """``x`` through the layer geometry with the unscaled ``ΔW`` (formed in full)."""
        x = self._input_like(x, reference)
        return self.layer_shape.apply_weight(x, self.unscaled_delta().reshape(self.layer_shape.weight_shape))

    def unscaled_delta(self) -> torch.Tensor:  # pragma: no cover - every type overrides it
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        return self.unscaled_delta().reshape(self.layer_shape.weight_shape) * self.scale

    def _copy_parameter(self, name: str, value: torch.Tensor) -> None:
        current = getattr(self, name)
        with torch.no_grad():
            current.copy_(value.reshape(current.shape).to(dtype=current.dtype, device=current.device))



def _new_parameter(shape: tuple[int, ...], like: torch.Tensor | None) -> nn.Parameter:
    """An uninitialised parameter, in ``like``'s dtype and device (float32 on the CPU without one)."""
    if like is None:
        return nn.Parameter(torch.empty(shape, dtype=torch.float32))
    return nn.Parameter(torch.empty(shape, dtype=like.dtype, device=like.device))


# -- LoHa --


def loha_product(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor) -> torch.Tensor:
    """``(W1a·W1b) ⊙ (W2a·W2b)``: LoHa's unscaled weight change as an ``[out, in]`` matrix."""
    return (w1a @ w1b) * (w2a @ w2b)


class LoHaModule(_WeightChangeModule):
    """``ΔW = (α/r) · (W1a·W1b) ⊙ (W2a·W2b)``; W2a starts at zero, so ΔW starts at zero."""

    network_type = "loha"
    tensor_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, path: str, target: nn.Module | LayerShape, rank: int, alpha: float | None = None,
                 multiplier: float = 1.0, rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__(path, target, rank, multiplier, rank_dropout, module_dropout)
        self._build(int(rank))
        self._init_alpha(alpha)

    def _build(self, rank: int, like: torch.Tensor | None = None) -> None:
        self.rank = rank
        out, width = self.matrix_shape
        for name, shape in (("hada_w1_a", (out, rank)), ("hada_w1_b", (rank, width)),
                            ("hada_w2_a", (out, rank)), ("hada_w2_b", (rank, width))):
            self._parameters.pop(name, None)
            self.register_parameter(name, _new_parameter(shape, like))
        with torch.no_grad():
            nn.init.normal_(self.hada_w1_a, std=0.1)
            nn.init.normal_(self.hada_w1_b, std=1.0)
            nn.init.zeros_(self.hada_w2_a)
            nn.init.normal_(self.hada_w2_b, std=1.0)

    def unscaled_delta(self) -> torch.Tensor:
        return loha_product(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish_branch(self._weight_term(x, self.hada_w1_a))

    # -- files --

    def file_rank(self, tensors: dict[str, torch.Tensor]) -> int | None:
        w1b = tensors.get(".hada_w1_b")
        return int(w1b.shape[0]) if w1b is not None and w1b.dim() == 2 else None

    def file_problem(self, tensors: dict[str, torch.Tensor], path: str) -> str | None:
        missing = [name for name in self.tensor_names if "." + name not in tensors]
        if missing:
            return f"{path}: the LoHa tensors {', '.join(missing)} are missing"
        extra = [suffix for suffix in tensors if suffix not in (".alpha",) + tuple("." + n for n in self.tensor_names)]
        if extra:
            return (f"{path}: {', '.join(s.lstrip('.') for s in extra)} (a Tucker-decomposed convolution) cannot be "
                    "trained here; only the plain hada_w1/w2 form can")
        rank = self.file_rank(tensors)
        out, width = self.matrix_shape
        expected = {"hada_w1_a": (out, rank), "hada_w1_b": (rank, width), "hada_w2_a": (out, rank), "hada_w2_b": (rank, width)}
        found = {name: tuple(tensors["." + name].shape) for name in self.tensor_names}
        if rank is None or found != expected:
            shapes = ", ".join(f"{name} {list(shape)}" for name, shape in found.items())
            return f"{path}: {shapes} do not match the layer [{out}, {width}] (expected hada_w1_b/hada_w2_b [r, {width}], hada_w1_a/hada_w2_a [{out}, r])"
        return None

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        rank = self.file_rank(tensors)
        if rank != self.rank:
            self._build(rank, like=self.hada_w1_a.detach())
        for name in self.tensor_names:
            self._copy_parameter(name, tensors["." + name])
        alpha = tensors.get(".alpha")
        with torch.no_grad():
            self.alpha.fill_(float(rank) if alpha is None or float(alpha) == 0 else float(alpha))
        self._refresh_scale()


# -- LoKr --


def lokr_factors(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(small, large)`` with ``small · large = dimension``.

    ``factor`` > 0 that divides the dimension is used as one part; otherwise the split is the most
    balanced pair of divisors whose smaller part is at most ``factor`` (−1: no limit, so the largest
    divisor ≤ √dimension: 3072 → 48 × 64, a prime p → 1 × p); 0 gives ``(1, dimension)``.
    """
    if factor > 0 and dimension % factor == 0:
        other = dimension // factor
        return min(factor, other), max(factor, other)
    if factor == 0:
        return 1, dimension
    limit = dimension if factor < 0 else factor
    small = 1
    for candidate in range(1, math.isqrt(dimension) + 1):
        if candidate > limit:
            break
        if dimension % candidate == 0:
            small = candidate
    return small, dimension // small


def lokr_uses_full_w2(rank: int, out_k: int, in_n: int) -> bool:
    """A rank of at least half the larger side of W2 gains nothing from a low-rank W2: W2 is kept whole."""
    return rank >= max(out_k, in_n) / 2


def lokr_product(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``W1 ⊗ W2``: LoKr's unscaled weight change as an ``[out_l·out_k, in_m·in_n]`` matrix."""
    return torch.kron(w1, w2)


class LoKrModule(_WeightChangeModule):
    """``ΔW = s · W1 ⊗ W2``; W2 = W2a·W2b (``s = α/r``) or a full W2 (``s = 1``) when the rank is at
    least half of W2's larger side. W2b (or the full W2) starts at zero, so ΔW starts at zero."""

    network_type = "lokr"
    tensor_names = ("lokr_w1", "lokr_w2_a", "lokr_w2_b")  # or lokr_w1 + lokr_w2 (full)
    full_tensor_names = ("lokr_w1", "lokr_w2")

    def __init__(self, path: str, target: nn.Module | LayerShape, rank: int, alpha: float | None = None,
                 factor: int = -1, multiplier: float = 1.0, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        super().__init__(path, target, rank, multiplier, rank_dropout, module_dropout)
        self.factor = int(factor)
        out_l, out_k = lokr_factors(self.layer_shape.out_features, self.factor)
        in_m, in_n = lokr_factors(self.layer_shape.in_features, self.factor)
        self._build(int(rank), (out_l, out_k, in_m, in_n), None)
        self._init_alpha(float(self.rank) if self.full else alpha)

    @property
    def factors(self) -> tuple[int, int, int, int]:
        """``(out_l, out_k, in_m, in_n)``: W1 is out_l×in_m, W2 out_k×(in_n·kernel)."""
        return self._factors

    def _build(self, rank: int, factors: tuple[int, int, int, int], full: bool | None,
               like: torch.Tensor | None = None) -> None:
        self.rank = rank
        self._factors = factors
        out_l, out_k, in_m, in_n = factors
        self.full = lokr_uses_full_w2(rank, out_k, in_n) if full is None else full
        width = in_n * self.layer_shape.kernel_numel
        for name in ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
            self._parameters.pop(name, None)
        self.lokr_w1 = _new_parameter((out_l, in_m), like)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))  # Uniform(±1/√in_m)
            if self.full:
                self.lokr_w2 = _new_parameter((out_k, width), like)
                nn.init.zeros_(self.lokr_w2)
            else:
                self.lokr_w2_a = _new_parameter((out_k, rank), like)
                self.lokr_w2_b = _new_parameter((rank, width), like)
                nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))  # Uniform(±1/√rank)
                nn.init.zeros_(self.lokr_w2_b)

    def _refresh_scale(self) -> None:
        if self.full:
            self.scale = 1.0  # a full W2 carries its own scale: every loader applies it as it is
        else:
            super()._refresh_scale()

    def w2(self) -> torch.Tensor:
        return self.lokr_w2 if self.full else self.lokr_w2_a @ self.lokr_w2_b

    def unscaled_delta(self) -> torch.Tensor:
        return lokr_product(self.lokr_w1, self.w2())

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return self._finish_branch(self._weight_term(x, self.lokr_w1))
        # (W1 ⊗ W2)·x without forming ΔW: with x viewed as X [in_m, in_n], the result is W1·X·W2ᵀ.
        x = self._input_like(x, self.lokr_w1)
        out_l, out_k, in_m, in_n = self._factors
        lead = x.shape[:-1]
        grid = x.reshape(*lead, in_m, in_n)
        if self.full:
            mixed = grid @ self.lokr_w2.transpose(0, 1)
        else:
            mixed = (grid @ self.lokr_w2_b.transpose(0, 1)) @ self.lokr_w2_a.transpose(0, 1)
        y = torch.matmul(self.lokr_w1.to(mixed.dtype), mixed)  # [..., out_l, out_k]
        return self._finish_branch(y.reshape(*lead, out_l * out_k))

    # -- files --

    def file_rank(self, tensors: dict[str, torch.Tensor]) -> int | None:
        w2b = tensors.get(".lokr_w2_b")
        return int(w2b.shape[0]) if w2b is not None and w2b.dim() == 2 else None

    def file_problem(self, tensors: dict[str, torch.Tensor], path: str) -> str | None:
        names = {suffix.lstrip(".") for suffix in tensors} - {"alpha"}
        if names not in (set(self.tensor_names), set(self.full_tensor_names)):
            if names & {"lokr_w1_a", "lokr_w1_b", "lokr_t2"}:
                return (f"{path}: {', '.join(sorted(names))}: a LoKr with a decomposed lokr_w1 or a Tucker-decomposed "
                        "lokr_w2 cannot be trained here; only lokr_w1 with lokr_w2 or lokr_w2_a/lokr_w2_b can")
            return f"{path}: incomplete LoKr tensors ({', '.join(sorted(names))}); expected lokr_w1 with lokr_w2 or lokr_w2_a + lokr_w2_b"
        factors = self._file_factors(tensors)
        if factors is None:
            shapes = ", ".join(f"{suffix.lstrip('.')} {list(tensor.shape)}" for suffix, tensor in tensors.items() if tensor.dim())
            out, width = self.matrix_shape
            return f"{path}: {shapes} do not make the layer's [{out}, {width}] as lokr_w1 ⊗ lokr_w2"
        return None

    def _file_factors(self, tensors: dict[str, torch.Tensor]) -> tuple[int, int, int, int] | None:
        """``(out_l, out_k, in_m, in_n)`` the file's shapes give on this layer, or None when they do not fit."""
        w1 = tensors[".lokr_w1"]
        if w1.dim() != 2:
            return None
        kernel = self.layer_shape.kernel_numel
        if ".lokr_w2" in tensors:
            w2 = tensors[".lokr_w2"]
            if w2.dim() < 2:
                return None
            out_k, width = w2.shape[0], math.prod(w2.shape[1:])
        else:
            w2a, w2b = tensors[".lokr_w2_a"], tensors[".lokr_w2_b"]
            if w2a.dim() != 2 or w2b.dim() != 2 or w2a.shape[1] != w2b.shape[0]:
                return None
            out_k, width = w2a.shape[0], w2b.shape[1]
        if width % kernel:
            return None
        out_l, in_m, in_n = w1.shape[0], w1.shape[1], width // kernel
        if out_l * out_k != self.layer_shape.out_features or in_m * in_n != self.layer_shape.in_features:
            return None
        return out_l, out_k, in_m, in_n

    def rank_mismatch(self, tensors: dict[str, torch.Tensor]) -> str | None:
        if ".lokr_w2" in tensors:
            _, out_k, _, in_n = self._file_factors(tensors)
            if not lokr_uses_full_w2(self.rank, out_k, in_n):
                return (f"a full lokr_w2 [{out_k}, {in_n}] in the file, but rank {self.rank} makes it low-rank "
                        f"(W2 stays full from rank {math.ceil(max(out_k, in_n) / 2)})")
            return None
        return super().rank_mismatch(tensors)

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        factors = self._file_factors(tensors)
        full = ".lokr_w2" in tensors
        rank = self.file_rank(tensors) if not full else self.rank
        if factors != self._factors or full != self.full or rank != self.rank:
            self._build(rank, factors, full, like=self.lokr_w1.detach())
        for name in (self.full_tensor_names if full else self.tensor_names):
            self._copy_parameter(name, tensors["." + name])
        alpha = tensors.get(".alpha")
        alpha_value = float(rank) if full or alpha is None or float(alpha) == 0 else float(alpha)
        with torch.no_grad():
            self.alpha.fill_(alpha_value)
        self._refresh_scale()

    def extra_repr(self) -> str:
        out_l, out_k, in_m, in_n = self._factors
        w2 = "full" if self.full else f"rank {self.rank}"
        return f"{self.path}, W1 {out_l}x{in_m} ⊗ W2 {out_k}x{in_n} ({w2}), alpha={float(self.alpha):g}"


MODULE_CLASSES: dict[str, type[NetworkModule]] = {"lora": LoRAModule, "loha": LoHaModule, "lokr": LoKrModule}


# --- weight changes from file tensors (merging) ----------------------------------------------------


def file_weight_change(network_type: str, tensors: dict[str, torch.Tensor], weight_shape: tuple[int, ...],
                       device: torch.device | str | None = None) -> torch.Tensor:
    """The unscaled ``ΔW`` of one LoHa / LoKr module of a file, in float32, shaped like the weight.

    ``tensors`` are the module's canonical tensors (``.hada_w1_a`` …, ``.lokr_w1`` …); a LoKr's W1
    may be ``lokr_w1`` or ``lokr_w1_a·lokr_w1_b``, its W2 ``lokr_w2`` (2-D or a conv kernel) or
    ``lokr_w2_a·lokr_w2_b``. Call :func:`file_weight_change_problem` first.
    """
    def get(name):
        return tensors["." + name].to(device=device, dtype=torch.float32)

    if network_type == "loha":
        change = loha_product(get("hada_w1_a"), get("hada_w1_b"), get("hada_w2_a"), get("hada_w2_b"))
    elif network_type == "lokr":
        w1 = get("lokr_w1") if ".lokr_w1" in tensors else get("lokr_w1_a") @ get("lokr_w1_b")
        w2 = get("lokr_w2").flatten(1) if ".lokr_w2" in tensors else get("lokr_w2_a") @ get("lokr_w2_b")
        change = lokr_product(w1, w2)
    else:
        raise MusubiError(f"no weight change rule for network type {network_type!r}.")
    return change.reshape(weight_shape)


def file_weight_change_problem(network_type: str, tensors: dict[str, torch.Tensor], weight_shape: tuple[int, ...]) -> str | None:
    """Why one LoHa / LoKr module of a file cannot be applied to a weight of ``weight_shape`` (None if it can)."""
    names = {suffix.lstrip(".") for suffix in tensors} - {"alpha"}
    shapes = ", ".join(f"{suffix.lstrip('.')} {list(tensor.shape)}" for suffix, tensor in sorted(tensors.items()) if suffix != ".alpha")
    if len(weight_shape) < 2:
        return f"the weight {list(weight_shape)} is no matrix or kernel"
    out, width = weight_shape[0], math.prod(weight_shape[1:])

    def matrix(name):
        tensor = tensors["." + name]
        return tuple(tensor.shape) if tensor.dim() == 2 else None

    if network_type == "loha":
        if names & {"hada_t1", "hada_t2"}:
            return "a Tucker-decomposed LoHa (hada_t1/hada_t2) is not supported"
        if names != {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}:
            return f"incomplete LoHa ({shapes})"
        w1a, w1b, w2a, w2b = (matrix(name) for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        if None in (w1a, w1b, w2a, w2b) or not (w1a[0] == w2a[0] == out and w1b[1] == w2b[1] == width
                                                and w1a[1] == w1b[0] and w2a[1] == w2b[0]):
            return f"{shapes} do not make a [{out}, {width}] weight change"
        return None
    if network_type == "lokr":
        if "lokr_t2" in names:
            return "a Tucker-decomposed LoKr (lokr_t2) is not supported"
        has_w1 = "lokr_w1" in names or {"lokr_w1_a", "lokr_w1_b"} <= names
        has_w2 = "lokr_w2" in names or {"lokr_w2_a", "lokr_w2_b"} <= names
        if not (has_w1 and has_w2):
            return f"incomplete LoKr ({shapes})"
        if "lokr_w1" in names:
            w1 = matrix("lokr_w1")
        else:
            a, b = matrix("lokr_w1_a"), matrix("lokr_w1_b")
            w1 = (a[0], b[1]) if a and b and a[1] == b[0] else None
        if "lokr_w2" in names:
            w2_tensor = tensors[".lokr_w2"]
            w2 = (w2_tensor.shape[0], math.prod(w2_tensor.shape[1:])) if w2_tensor.dim() >= 2 else None
        else:
            a, b = matrix("lokr_w2_a"), matrix("lokr_w2_b")
            w2 = (a[0], b[1]) if a and b and a[1] == b[0] else None
        if w1 is None or w2 is None or (w1[0] * w2[0], w1[1] * w2[1]) != (out, width):
            return f"{shapes} do not make a [{out}, {width}] weight change as lokr_w1 ⊗ lokr_w2"
        return None
    return f"network type {network_type!r} cannot be merged"
