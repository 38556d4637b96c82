"""torch.compile (Dynamo) for training and sampling: per transformer block, never at the cost of a run.

musubi-tuner's ``--dynamo_backend``, ``--dynamo_mode``, ``--dynamo_fullgraph`` and
``--dynamo_dynamic`` compile the whole transformer through accelerate. Here each transformer block
is compiled on its own (*regional* compilation): the blocks of one model are alike, so one
compiled graph serves them all and compiling takes seconds instead of minutes, while the Python
between the blocks (ComfyUI's block patches, MagCache's skip decisions) stays ordinary Python.
``fullgraph`` compiles the whole model as one graph instead, as musubi-tuner does.

A block is compiled in place through the slot ``nn.Module.compile()`` uses (the module's
``_compiled_call_impl``), so its weights, names, hooks and ``state_dict`` stay those of the
eager block: LoRA forward hooks on the layers inside are traced with the block and change its
output exactly as they do uncompiled, and their weights receive gradients. Removing the
compilation puts the eager call back.

Compiling happens at the first call of a block, in the middle of a run. A compiler failure there
(an unsupported operation with ``fullgraph``, a backend that is missing or raises, a C++ compiler
error) never ends the run: the failing call is repeated uncompiled, one warning names the cause,
and everything runs eagerly from then on. In training the backward graph is compiled together
with the forward one, so its failures are caught the same way.

Each new input shape (another bucket resolution or frame count) compiles the blocks anew unless
``dynamic`` is set. After :data:`MAX_SHAPES` shapes per block class, further new shapes run
uncompiled, with one warning, instead of recompiling for ever. Recompiling for inputs of a shape
already compiled (a guard on a Python value that changes from call to call) is reported with
one warning too; Dynamo gives up on such code after its recompile limit and runs it uncompiled.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .errors import MusubiError
from .lora.presets import get_preset

logger = logging.getLogger(__name__)

# accelerate's DynamoBackend names (musubi-tuner's choices); any other backend registered with
# torch._dynamo is accepted too, in any letter case.
BACKENDS = (
    "NO", "EAGER", "AOT_EAGER", "INDUCTOR", "AOT_TS_NVFUSER", "NVPRIMS_NVFUSER", "CUDAGRAPHS", "OFI", "FX2TRT",
    "ONNXRT", "TENSORRT", "AOT_TORCHXLA_TRACE_ONCE", "TORCHXLA_TRACE_ONCE", "IPEX", "TVM", "HPU_BACKEND",
)
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Input shapes compiled per block class before new shapes run uncompiled (without dynamic).
MAX_SHAPES = 8
# Dynamo's own limit of compiled variants per function, raised while our regions run so that
# MAX_SHAPES (times the variants of one shape: the first block's input needs no gradient, the
# others' do) decides instead.
_RECOMPILE_LIMIT = 2 * MAX_SHAPES
# Calls of one block class that compiled again although their input shapes were compiled before,
# tolerated before the warning (variants of one shape recompile a few times legitimately).
_RECOMPILES_BEFORE_WARNING = 4

BACKEND_HELP = "torch.compile backend: NO (off), INDUCTOR, CUDAGRAPHS, AOT_EAGER, EAGER … (accelerate's names, any case)"
MODE_HELP = "torch.compile mode of the inductor backend: default, reduce-overhead, max-autotune"
FULLGRAPH_HELP = "compile the whole model as one graph (musubi-tuner's way) instead of each transformer block"
DYNAMIC_HELP = ("compile for symbolic shapes, so new bucket sizes do not recompile; off by default because it is "
                "reported fragile (slower kernels, failures on some models)")


@dataclass(frozen=True)
class CompileSettings:
    """The four Dynamo options. ``backend`` "NO" (the default) turns compilation off."""

    backend: str = "NO"
    mode: str | None = None
    fullgraph: bool = False
    dynamic: bool = False

    @property
    def enabled(self) -> bool:
        return self.backend.upper() != "NO"

    @property
    def torch_backend(self) -> str:
        return self.backend.lower()

    def validate(self, where: str = "", prefix: str = "dynamo_") -> "CompileSettings":
        """Raise MusubiError naming the option; return the settings with the mode normalised."""
        at = f"{where}: " if where else ""
        if not isinstance(self.backend, str) or not self.backend.strip():
            raise MusubiError(f"{at}{prefix}backend must be a backend name such as INDUCTOR (or NO), got {self.backend!r}.")
        for name in ("fullgraph", "dynamic"):
            if not isinstance(getattr(self, name), bool):
                raise MusubiError(f"{at}{prefix}{name} must be true or false, got {getattr(self, name)!r}.")
        mode = None if self.mode in (None, "", "default") else self.mode
        if mode is not None and mode not in MODES:
            raise MusubiError(f"{at}{prefix}mode {self.mode!r} is not a choice; choose one of {', '.join(MODES)}.")
        if not self.enabled:
            return CompileSettings("NO", mode, self.fullgraph, self.dynamic)
        if self.torch_backend not in available_backends(everything=True):
            known = "" if self.backend.upper() not in BACKENDS else " (an accelerate name, but not available in this PyTorch)"
            raise MusubiError(
                f"{at}{prefix}backend {self.backend!r}{known} is not a torch.compile backend here; "
                f"choose one of NO, {', '.join(name.upper() for name in available_backends())}."
            )
        if mode is not None and self.torch_backend != "inductor":
            raise MusubiError(f"{at}{prefix}mode {mode!r} only applies to the INDUCTOR backend; "
                              f"leave it at default for {self.backend.upper()}.")
        return CompileSettings(self.torch_backend, mode, self.fullgraph, self.dynamic)

    def compile_arguments(self) -> dict[str, Any]:
        arguments: dict[str, Any] = {"backend": self.torch_backend, "fullgraph": self.fullgraph, "dynamic": self.dynamic}
        if self.mode is not None:
            arguments["mode"] = self.mode
        return arguments

    def describe(self) -> str:
        extras = [f"mode {self.mode}"] if self.mode else []
        extras += ["fullgraph"] * self.fullgraph + ["dynamic"] * self.dynamic
        return self.torch_backend + (f" ({', '.join(extras)})" if extras else "")


def available_backends(everything: bool = False) -> list[str]:
    """Names of the torch.compile backends registered in this process (lower case); without
    ``everything``, PyTorch's debugging and experimental ones are left out (but eager and aot_eager)."""
    import torch._dynamo

    registered = set(torch._dynamo.list_backends(exclude_tags=()))
    if everything:
        return sorted(registered)
    return sorted(set(torch._dynamo.list_backends()) | ({"eager", "aot_eager"} & registered))


def settings_from_options(options: Any) -> CompileSettings:
    """The compile settings of an object with ``dynamo_backend``/``_mode``/``_fullgraph``/``_dynamic``
    attributes (a TrainSettings); missing ones keep their defaults."""
    return CompileSettings(
        backend=getattr(options, "dynamo_backend", "NO") or "NO",
        mode=getattr(options, "dynamo_mode", None),
        fullgraph=getattr(options, "dynamo_fullgraph", False),
        dynamic=getattr(options, "dynamo_dynamic", False),
    )


# --- what a compiled run shares ------------------------------------------------------------------


@dataclass
class CompileState:
    """Shared by the regions of one compilation: the failure (once set, everything runs eagerly),
    the input shapes seen per block class, and the warnings already given."""

    settings: CompileSettings
    where: str
    failure: str | None = None
    shapes: dict[type, set] = field(default_factory=dict)
    shape_limit_warned: bool = False
    recompiles: dict[type, int] = field(default_factory=dict)
    recompiles_warned: bool = False

    def fail(self, error: BaseException) -> None:
        if self.failure is not None:
            return
        self.failure = f"{type(error).__name__}: {_first_lines(error)}"
        logger.warning(
            "%s: torch.compile (%s) failed, so this run continues uncompiled (eager): %s. "
            "Results are unaffected; set the backend to NO to skip compiling, or try AOT_EAGER to tell a "
            "backend problem from a tracing one.", self.where, self.settings.describe(), self.failure,
        )

    def admit(self, module: nn.Module, signature: tuple) -> bool:
        """Whether a call may run compiled: always with dynamic shapes; otherwise while its
        input shapes are known or fewer than MAX_SHAPES were compiled for this block class."""
        seen = self.shapes.setdefault(type(module), set())
        if self.settings.dynamic or signature in seen:
            return True
        if len(seen) < MAX_SHAPES:
            seen.add(signature)
            return True
        if not self.shape_limit_warned:
            self.shape_limit_warned = True
            logger.warning(
                "%s: torch.compile has compiled %s for %d different input shapes; new shapes now run "
                "uncompiled (the known ones stay compiled). Use fewer bucket sizes, or set dynamic to "
                "compile for any shape.", self.where, type(module).__name__, MAX_SHAPES,
            )
        return False

    def note_recompile(self, module: nn.Module) -> None:
        """A call with input shapes compiled before compiled again."""
        count = self.recompiles[type(module)] = self.recompiles.get(type(module), 0) + 1
        if count > _RECOMPILES_BEFORE_WARNING and not self.recompiles_warned:
            self.recompiles_warned = True
            logger.warning(
                "%s: torch.compile keeps recompiling %s for inputs of unchanged shape (a guard on a value that "
                "changes between calls); Dynamo runs such parts uncompiled after %d tries. Run with "
                "TORCH_LOGS=recompiles to see the guard.", self.where, type(module).__name__, _RECOMPILE_LIMIT,
            )

    def config(self) -> contextlib.AbstractContextManager:
        """Dynamo settings while a region runs: guards on module hooks, our shape limit instead
        of Dynamo's recompile limit and, when gradients are recorded, the backward graph compiled
        with the forward one (so that its failures surface here, where they can be caught)."""
        import torch._dynamo.config as dynamo_config
        import torch._functorch.config as functorch_config

        stack = contextlib.ExitStack()
        if getattr(dynamo_config, "recompile_limit", _RECOMPILE_LIMIT) < _RECOMPILE_LIMIT:
            stack.enter_context(dynamo_config.patch(recompile_limit=_RECOMPILE_LIMIT))
        if getattr(dynamo_config, "skip_nnmodule_hook_guards", False):
            # Dynamo's default ignores hooks added or removed after compiling: a LoRA attached
            # later would silently not act. Guarding on them recompiles instead.
            stack.enter_context(dynamo_config.patch(skip_nnmodule_hook_guards=False))
        if torch.is_grad_enabled() and hasattr(functorch_config, "force_non_lazy_backward_lowering"):
            stack.enter_context(functorch_config.patch(force_non_lazy_backward_lowering=True))
        return stack


def _first_lines(error: BaseException, limit: int = 400) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " / ".join(lines[:3]) or "no message"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shape_signature(args: tuple, kwargs: dict) -> tuple:
    """The shapes and dtypes of the tensors among a call's arguments (one level into containers)."""

    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return tuple(value.shape), value.dtype
        if isinstance(value, (list, tuple)):
            return tuple(describe(item) for item in value if isinstance(item, torch.Tensor))
        return None

    return tuple(describe(value) for value in args) + tuple(
        (key, describe(value)) for key, value in sorted(kwargs.items(), key=lambda item: item[0])
    )


# --- compiled regions ----------------------------------------------------------------------------


class _CompiledCall:
    """Stands in a module's ``_compiled_call_impl``: the compiled call, or the eager one after a
    failure, for new shapes past the limit, or when compiling raised."""

    def __init__(self, module: nn.Module, state: CompileState):
        self.module = module
        self.state = state
        self.compiled: Callable | None = None

    def __call__(self, *args, **kwargs):
        state = self.state
        eager = self.module._call_impl
        if state.failure is not None:
            return eager(*args, **kwargs)
        signature = None if state.settings.dynamic else _shape_signature(args, kwargs)
        known = signature in state.shapes.get(type(self.module), ())
        if not state.admit(self.module, signature):
            return eager(*args, **kwargs)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(eager, **state.settings.compile_arguments())
            compiles = _compile_count()
            with state.config():
                output = self.compiled(*args, **kwargs)
            if known and _compile_count() != compiles:
                state.note_recompile(self.module)
            return output
        except Exception as error:  # noqa: BLE001 - only compiler errors are swallowed, see below
            if not _is_compiler_error(error):
                raise
            state.fail(error)
        # Outside the except block, so that an error of the model itself is not reported as
        # "during handling of" the compiler's.
        return eager(*args, **kwargs)


def _compile_count() -> int:
    """How many frames Dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["frames"]["ok"]


def _is_compiler_error(error: BaseException) -> bool:
    """Errors of Dynamo, AOTAutograd and the backends (the backends' own are wrapped by Dynamo).
    An error of the model itself is one too when raised while tracing; the eager retry then
    raises it again, unwrapped."""
    from torch._dynamo.exc import TorchDynamoException

    if isinstance(error, TorchDynamoException):
        return True
    module = type(error).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch._functorch", "torch.fx"))


class CompiledRegions:
    """The modules of one compilation. :meth:`install` puts the compiled calls in place,
    :meth:`remove` restores what was there before (the eager call)."""

    def __init__(self, modules: list[nn.Module], state: CompileState):
        self.modules = modules
        self.state = state
        self._calls = [_CompiledCall(module, state) for module in modules]
        self._previous: list[Any] | None = None

    @property
    def failure(self) -> str | None:
        """Why compilation was given up (the run went on eagerly), or None."""
        return self.state.failure

    @property
    def installed(self) -> bool:
        return self._previous is not None

    def install(self) -> "CompiledRegions":
        if self._previous is None:
            self._previous = [getattr(module, "_compiled_call_impl", None) for module in self.modules]
            for module, call in zip(self.modules, self._calls):
                module._compiled_call_impl = call
        return self

    def remove(self) -> None:
        if self._previous is None:
            return
        for module, previous in zip(self.modules, self._previous):
            module._compiled_call_impl = previous
        self._previous = None

    def __enter__(self) -> "CompiledRegions":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()


def select_regions(roots: Iterable[nn.Module], is_block: Callable[[nn.Module], bool], fullgraph: bool) -> list[nn.Module]:
    """What to compile: the roots themselves with ``fullgraph``, otherwise the outermost modules
    inside them for which ``is_block`` holds (a block inside a selected block is part of it)."""
    roots = list(dict.fromkeys(roots))
    if fullgraph:
        return roots
    selected: list[nn.Module] = []
    seen: set[int] = set()
    for root in roots:
        _collect_blocks(root, is_block, selected, seen)
    return selected


def _collect_blocks(module: nn.Module, is_block, selected: list[nn.Module], seen: set[int]) -> None:
    for child in module.children():
        if id(child) in seen:
            continue
        seen.add(id(child))
        if is_block(child):
            selected.append(child)
        else:
            _collect_blocks(child, is_block, selected, seen)


def compile_regions(roots: Iterable[nn.Module], is_block: Callable[[nn.Module], bool], settings: CompileSettings,
                    where: str = "model") -> CompiledRegions | None:
    """Compiled regions for ``roots`` (not yet installed), or None when compiling is off.

    Without ``fullgraph`` each transformer block (``is_block``) is compiled on its own; a model
    without such blocks is compiled whole, with a warning.
    """
    settings = settings.validate(where)
    if not settings.enabled:
        return None
    roots = list(roots)
    modules = select_regions(roots, is_block, settings.fullgraph)
    if not modules:
        logger.warning("%s: no transformer blocks found to compile one by one; compiling the whole model.", where)
        modules = select_regions(roots, is_block, True)
    state = CompileState(settings, where)
    logger.info("%s: compiling %d %s with %s (at the first call).", where, len(modules),
                "model" if settings.fullgraph else "blocks", settings.describe())
    return CompiledRegions(modules, state)


def compile_for_training(adapter: Any, network: Any, options: Any) -> CompiledRegions | None:
    """Compile the model a LoRA trains on (every expert of a pair) per the ``dynamo_*`` options of
    ``options``; installed, or None when compiling is off. Call after the LoRA is attached."""
    settings = settings_from_options(options)
    if not settings.enabled:
        return None
    preset = getattr(network, "preset", None) or get_preset(getattr(adapter, "architecture", "generic"))
    roots = [adapter.lora_root()]
    twins = getattr(adapter, "twin_lora_roots", None)
    if callable(twins):
        roots += list(twins())
    regions = compile_regions(roots, preset.is_target_block, settings, where="training")
    return regions.install() if regions is not None else None
