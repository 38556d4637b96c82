"""How MagCache hooks into a ComfyUI model: block patches and sampler wrappers, no forward replaced.

MagCache's residual is ``(image tokens leaving the last transformer block) − (image tokens
entering the first)``. Every architecture here lets a patch stand in for any single block
(``transformer_options["patches_replace"]["dit"][(kind, index)]``), so each block gets one:

* the first block remembers the image tokens entering the blocks;
* on a computed step every block runs as usual (through another pack's block patch when one was
  there before) and the last block caches the residual, or hands it to a calibration recorder;
* on a skipped step every block returns its inputs untouched and the last block returns the
  remembered input plus the cached residual.

Two ``WrappersMP`` wrappers bracket the work: ``OUTER_SAMPLE`` starts and finishes a run (its
sigmas give the number of steps), and ``CALC_COND_BATCH`` turns each model evaluation's sigma into
a step index and asks the step decision once. ``CALC_COND_BATCH`` is the level that sees one
sampler evaluation as a whole — before ComfyUI splits cond and uncond into forward calls, with
the same ``(model, conds, x, sigma, model_options)`` arguments for every architecture — so one
decision serves cond, uncond, area conds and context windows alike. Residuals are cached per
forward call, keyed by the call's ``cond_or_uncond`` (and context window), so cond and uncond run
unbatched keep their own residual.

Nothing here decides or measures: :mod:`musubi.magcache.state` and :mod:`musubi.magcache.recorder` do,
and :mod:`musubi.magcache.steps` places an evaluation's sigma on its step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import comfy.ldm.flux.model
import comfy.ldm.hunyuan_video.model
import comfy.ldm.qwen_image.model
import comfy.ldm.wan.model
import comfy.model_patcher
import comfy.patcher_extension
import torch

from ..musubi.errors import MusubiError
from ..musubi.magcache.choice import RunFacts
from ..musubi.magcache.recorder import CalibrationRecorder
from ..musubi.magcache.state import MagCacheState
from ..musubi.magcache.steps import is_descending, step_for_sigma

RUN_KEY = "musubi_magcache_run"
WRAPPER_KEY = "musubi_magcache"
# Our block patches remember the patch they stand in front of, so patching twice replaces ours.
_ORIGINAL_ATTRIBUTE = "musubi_magcache_original"


# ---------------------------------------------------------------------------------------------
# Which blocks a model has
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockLayout:
    """The model's transformer blocks in execution order, as block-patch keys.

    ``image_first_stream`` tells how the single-stream blocks order their tokens:
    ``cat(image, text)`` (HunyuanVideo) or ``cat(text, image)`` (FLUX).
    """

    family: str
    blocks: tuple[tuple[str, int], ...]
    image_first_stream: bool = False


def block_layout(model_patcher, node: str) -> BlockLayout:
    """The block layout of a ComfyUI MODEL, or a MusubiError for models MagCache cannot patch."""
    diffusion_model = model_patcher.model.diffusion_model
    if isinstance(diffusion_model, comfy.ldm.wan.model.WanModel):
        layout = BlockLayout("wan", _blocks("double_block", diffusion_model.blocks))
    elif isinstance(diffusion_model, comfy.ldm.flux.model.Flux):
        layout = BlockLayout(
            "flux",
            _blocks("double_block", diffusion_model.double_blocks) + _blocks("single_block", diffusion_model.single_blocks),
        )
    elif isinstance(diffusion_model, comfy.ldm.hunyuan_video.model.HunyuanVideo):
        layout = BlockLayout(
            "hunyuan_video",
            _blocks("double_block", diffusion_model.double_blocks) + _blocks("single_block", diffusion_model.single_blocks),
            image_first_stream=True,
        )
    elif isinstance(diffusion_model, comfy.ldm.qwen_image.model.QwenImageTransformer2DModel):
        layout = BlockLayout("qwen_image", _blocks("double_block", diffusion_model.transformer_blocks))
    elif type(diffusion_model).__name__ == "HunyuanVideoFramepackTransformer3DModel":
        raise MusubiError(f"{node}: this is a FramePack model; sample it with FramePack Sampler, which has MagCache built in.")
    else:
        raise MusubiError(
            f"{node}: MagCache cannot patch a {type(diffusion_model).__name__} model; it supports Wan 2.1/2.2, "
            "HunyuanVideo, FLUX.1 (Kontext included) and Qwen-Image."
        )
    if not layout.blocks or layout.blocks[0][0] != "double_block":
        raise MusubiError(f"{node}: this {layout.family} model has no transformer blocks MagCache can patch.")
    return layout


def _blocks(kind: str, modules) -> tuple[tuple[str, int], ...]:
    return tuple((kind, index) for index in range(len(modules)))


# ---------------------------------------------------------------------------------------------
# What a run needs from the node that set it up
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunContext:
    """What is known when a sampling run starts, for choosing its ratios: the model and the run."""

    model_patcher: Any
    family: str
    run: RunFacts


@dataclass
class RunPlan:
    """A run either skips (``state``) or calibrates (``recorder``); ``label`` names its ratios."""

    label: str
    state: MagCacheState | None = None
    recorder: CalibrationRecorder | None = None


class RunOwner(Protocol):
    def plan_run(self, context: RunContext) -> RunPlan: ...

    def run_finished(self, run: "MagCacheRun") -> None: ...


# ---------------------------------------------------------------------------------------------
# One sampling run
# ---------------------------------------------------------------------------------------------


@dataclass
class _Call:
    """One forward call of the model inside one evaluation."""

    key: tuple
    step: int
    entering: torch.Tensor | None  # image tokens entering the first block; None when not needed
    skip: bool


@dataclass
class _Cached:
    latent_shape: tuple[int, ...]
    residual: torch.Tensor


@dataclass(frozen=True)
class _BlockRole:
    kind: str
    first: bool
    last: bool
    image_first_stream: bool


@dataclass
class MagCacheRun:
    """State of one sampling run: the step decisions, the cached residuals and what happened."""

    plan: RunPlan
    layout: BlockLayout
    num_steps: int
    schedule: tuple[float, ...]
    notes: list[str] = field(default_factory=list)
    evaluations: int = 0
    computed_calls: int = 0
    skipped_calls: int = 0
    uncached_calls: int = 0
    block_calls: int = 0
    blocks_run: int = 0

    def __post_init__(self) -> None:
        self._cache: dict[tuple, _Cached] = {}
        self._recorded: set[tuple] = set()
        self._call: _Call | None = None
        self._step: int | None = None
        self._last_step = -1
        self._skip_step = False
        self._latent_shape: tuple[int, ...] = ()
        self._disabled = False
        self._sample_sigmas: torch.Tensor | None = None
        self._sample_schedule: tuple[float, ...] = self.schedule
        if not is_descending(self.schedule):
            self._disable("the sigma schedule rises somewhere, so steps cannot be told apart by noise level; nothing was cached")

    @property
    def state(self) -> MagCacheState | None:
        return self.plan.state

    @property
    def recorder(self) -> CalibrationRecorder | None:
        return self.plan.recorder

    @property
    def disabled(self) -> bool:
        return self._disabled

    def _disable(self, reason: str) -> None:
        self._disabled = True
        self._cache.clear()
        self.notes.append(reason)

    # -- evaluations (CALC_COND_BATCH) ---------------------------------------------------------

    def begin_evaluation(self, sigma: torch.Tensor, sample_sigmas: torch.Tensor | None, x: torch.Tensor) -> None:
        """One sampler evaluation at ``sigma`` starts: find its step and decide it (once per step)."""
        self.evaluations += 1
        self._call = None
        self._step = None
        if self._disabled:
            return
        step = step_for_sigma(float(sigma.reshape(-1)[0]), self._schedule_of(sample_sigmas))
        if step < self._last_step:
            self._disable("the sampler went back to a higher noise level (a restart-style sampler); "
                          "nothing was cached from there on")
            return
        self._step, self._last_step = step, step
        self._latent_shape = tuple(x.shape)
        self._skip_step = False
        if self.recorder is None and self.state is not None:
            ready = bool(self._cache) and all(entry.latent_shape == self._latent_shape for entry in self._cache.values())
            self._skip_step = self.state.decide(step, ready)

    def _schedule_of(self, sample_sigmas: torch.Tensor | None) -> tuple[float, ...]:
        """The sampler's sigmas (``transformer_options["sample_sigmas"]``) as floats, converted once."""
        if sample_sigmas is None:
            return self.schedule
        if self._sample_sigmas is not sample_sigmas:
            self._sample_sigmas = sample_sigmas
            self._sample_schedule = tuple(float(value) for value in sample_sigmas.reshape(-1).tolist())
        return self._sample_schedule

    def end_evaluation(self) -> None:
        self._call = None
        self._step = None

    # -- forward calls (block patches) ---------------------------------------------------------

    def block(self, role: _BlockRole, args: dict, run_block: Callable[[], dict]) -> dict:
        if role.first:
            self._begin_call(args)
        call = self._call
        if call is None:
            return run_block()
        self.block_calls += 1
        if call.skip:
            if not role.last:
                return _pass_through(args)
            self._call = None
            return self._skipped_output(role, args, call)
        output = run_block()
        self.blocks_run += 1
        if role.last:
            self._call = None
            self._keep_residual(role, output, call)
        return output

    def _begin_call(self, args: dict) -> None:
        self._call = None
        if self._step is None:
            return
        options = args["transformer_options"]
        window = options.get("context_window")
        key = (tuple(options.get("cond_or_uncond", ())), tuple(getattr(window, "index_list", ())) or None)
        entering = None
        if self._uses_residuals:
            # A copy: on skipped steps nothing runs between the blocks, and code after a block
            # (VACE hints, ControlNet) adds to the tensor it got back in place.
            entering = args["img"].clone()
        skip = False
        if self._skip_step:
            cached = self._cache.get(key)
            skip = cached is not None and cached.residual.shape == entering.shape
            if not skip:
                self.uncached_calls += 1
        if skip:
            self.skipped_calls += 1
        else:
            self.computed_calls += 1
        self._call = _Call(key, self._step, entering, skip)

    @property
    def _uses_residuals(self) -> bool:
        """Whether residuals are measured at all (not while nothing can be skipped)."""
        return self.recorder is not None or (self.state is not None and self.state.settings.caching_enabled)

    def _keep_residual(self, role: _BlockRole, output: dict, call: _Call) -> None:
        if call.entering is None:
            return
        leaving = _image_tokens(role, output["img"], call.entering.shape[1])
        residual = leaving - call.entering
        if self.recorder is not None:
            # One record per cond/uncond call and step: a second evaluation at the same step
            # (Heun's corrector) would otherwise count as an extra model call of that step.
            if (call.step, call.key) not in self._recorded:
                self._recorded.add((call.step, call.key))
                self.recorder.record(residual, call.step)
        else:
            self._cache[call.key] = _Cached(self._latent_shape, residual)

    def _skipped_output(self, role: _BlockRole, args: dict, call: _Call) -> dict:
        image = call.entering + self._cache[call.key].residual
        if role.kind == "single_block":
            stream = args["img"]
            length = image.shape[1]
            if role.image_first_stream:
                return {"img": torch.cat((image, stream[:, length:]), dim=1)}
            return {"img": torch.cat((stream[:, : stream.shape[1] - length], image), dim=1)}
        output = {"img": image}
        if "txt" in args:
            output["txt"] = args["txt"]
        return output

    # -- the end -------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the cached tensors; the counters stay for the report."""
        self._cache.clear()
        self._call = None
        if self.evaluations and self.computed_calls + self.skipped_calls == 0 and not self._disabled:
            self.notes.append("the model's transformer blocks were never reached (this model variant does not pass "
                              "ComfyUI's block patches their options), so nothing was cached")

    def report(self) -> str:
        """What the run did, for the node's text output and the log."""
        lines = [f"MagCache {self.plan.label}, {self.num_steps} steps"]
        state = self.state
        if self.recorder is not None:
            lines.append(f"calibration: {self.recorder.steps_recorded} of {self.num_steps} steps recorded")
        elif state is not None:
            settings = state.settings
            lines[0] += f", threshold {settings.threshold:g}, K {settings.K}, retention_ratio {settings.retention_ratio:g}"
            lines.append(state.summary())
        lines.append(f"model calls: {self.computed_calls} computed, {self.skipped_calls} skipped"
                     + (f" ({self.uncached_calls} computed on skipped steps: no residual cached for them)"
                        if self.uncached_calls else ""))
        lines.append(f"transformer blocks run: {self.blocks_run} of {self.block_calls}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def _image_tokens(role: _BlockRole, stream: torch.Tensor, length: int) -> torch.Tensor:
    if role.kind != "single_block":
        return stream
    if role.image_first_stream:
        return stream[:, :length]
    return stream[:, stream.shape[1] - length:]


def _pass_through(args: dict) -> dict:
    output = {"img": args["img"]}
    if "txt" in args:
        output["txt"] = args["txt"]
    return output


# ---------------------------------------------------------------------------------------------
# Installing the patches
# ---------------------------------------------------------------------------------------------


def _block_patch(role: _BlockRole, original: Callable | None) -> Callable:
    def magcache_block(args: dict, extra: dict) -> dict:
        def run_block() -> dict:
            if original is not None:
                return original(args, extra)
            return extra["original_block"](args)

        options = args.get("transformer_options")
        run = options.get(RUN_KEY) if isinstance(options, dict) else None
        if run is None:
            return run_block()
        return run.block(role, args, run_block)

    setattr(magcache_block, _ORIGINAL_ATTRIBUTE, original)
    return magcache_block


def install(model_patcher, owner: RunOwner, node: str):
    """A clone of ``model_patcher`` with MagCache's block patches and wrappers.

    An existing patch of a block (another pack's) is kept and called as the block; a MagCache
    patch from an earlier node is replaced, so patching twice does not cache twice.
    """
    layout = block_layout(model_patcher, node)
    patched = model_patcher.clone()
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    last = len(layout.blocks) - 1
    for position, (kind, index) in enumerate(layout.blocks):
        original = existing.get((kind, index))
        if hasattr(original, _ORIGINAL_ATTRIBUTE):
            original = getattr(original, _ORIGINAL_ATTRIBUTE)
        role = _BlockRole(kind, first=position == 0, last=position == last, image_first_stream=layout.image_first_stream)
        patched.set_model_patch_replace(_block_patch(role, original), "dit", kind, index)
    wrappers = comfy.patcher_extension.WrappersMP
    for wrapper_type, wrapper in (
        (wrappers.OUTER_SAMPLE, functools.partial(_outer_sample_wrapper, owner, layout)),
        (wrappers.CALC_COND_BATCH, _calc_cond_batch_wrapper),
    ):
        patched.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
        patched.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, wrapper)
    return patched


def _argument(args: tuple, kwargs: dict, position: int, name: str):
    return args[position] if len(args) > position else kwargs.get(name)


def _outer_sample_wrapper(owner: RunOwner, layout: BlockLayout, executor, *args, **kwargs):
    """Starts a run for this sampling call (fresh state, ratios for its step count) and ends it."""
    guider = executor.class_obj
    sigmas = _argument(args, kwargs, 3, "sigmas")
    latent = _argument(args, kwargs, 1, "latent_image")
    schedule = tuple(float(value) for value in sigmas.reshape(-1).tolist())
    if len(schedule) < 2:  # no step to take
        return executor(*args, **kwargs)
    conds = getattr(guider, "conds", None) or getattr(guider, "original_conds", {}) or {}
    facts = RunFacts(
        num_steps=len(schedule) - 1,
        sigmas=schedule,
        sigma_max=float(guider.model_patcher.get_model_object("model_sampling").sigma_max),
        latent_shape=tuple(latent.shape),
        has_denoise_mask=_argument(args, kwargs, 4, "denoise_mask") is not None,
        has_reference_latents=any(
            isinstance(cond, dict) and bool(cond.get("reference_latents"))
            for group in conds.values() for cond in (group or [])
        ),
    )
    context = RunContext(model_patcher=guider.model_patcher, family=layout.family, run=facts)
    run = MagCacheRun(owner.plan_run(context), layout, facts.num_steps, schedule)
    original_options = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
    guider.model_options.setdefault("transformer_options", {})[RUN_KEY] = run
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original_options
        run.close()
        owner.run_finished(run)


def _calc_cond_batch_wrapper(executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
    """One sampler evaluation: map its sigma to a step and decide that step once."""
    options = model_options.get("transformer_options", {})
    run = options.get(RUN_KEY)
    if run is None:
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
    run.begin_evaluation(timestep, options.get("sample_sigmas"), x_in)
    try:
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
    finally:
        run.end_evaluation()


