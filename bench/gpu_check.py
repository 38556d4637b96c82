"""GPU check: what only a CUDA machine can measure, in one table, in under 8 minutes on an H100/H200.

Run from the repository root on a machine with a CUDA GPU: ``python bench/gpu_check.py`` (needs
ComfyUI at $COMFYUI_PATH or ~/comfy/ComfyUI, with its requirements, in this Python). Progress goes
to stderr, the table to stdout; ``--json FILE`` also writes the rows.

The model is Wan 2.1 T2V 1.3B at its real size and key layout (dim 1536, 30 blocks, 12 heads,
ffn 8960, text width 4096, 16 latent channels, patch (1, 2, 2)), with seeded random bf16 weights
written on the fly into a temporary folder (tests/tiny_checkpoints.py at full width: nothing is
downloaded). Everything runs in this process with ComfyUI's own code and the very node classes a
graph would run, because the CUDA allocator's peak (``torch.cuda.max_memory_allocated``, reset
before each case after unloading every model) can only be read where the tensors live.

Rows (A and B are measured in the same process, each cell a median with min–max):

* train <bf16|fp8> ckpt <off|on>: seconds per optimizer step and peak VRAM of Train LoRA (this
  pack) against core's TrainLoraNode, on the model loaded by core's Load Diffusion Model (bf16) or
  by this pack's Load DiT (fp8 scaled) (E4M3, block 64, bf16 compute), with and without gradient
  checkpointing. Two latents of 1 frame at 480×832, batch 1, LoRA rank 16, AdamW 1e-4 constant,
  bf16 compute. A step lasts from one optimizer step to the next (a global optimizer hook, after
  a CUDA synchronize); the first intervals (set-up, warm-up) are dropped. Each trainer keeps its
  own method: core trains every weight plus norm and bias offsets, Train LoRA the Linears of the
  blocks.
* fp8 forward: one sampling step of KSampler at cfg 1 (one forward pass plus the sampler's
  arithmetic) on the same weights loaded both ways: the cost of dequantizing FP8 in every matmul.
* MagCache: wall time of a whole sample (30 steps uni_pc, cfg 5) with core KSampler against this
  pack's MagCache Sampler at its defaults (threshold 0.24, K 6, retention 0.2, the published
  1.3B ratios), beside the model calls each made (counted at the last block): the skipping is
  decided by the ratios alone, so a random-weight model skips what the real one does.
* compile train / compile sample: Train LoRA without and with Compile Settings (inductor), and
  KSampler at cfg 1 on the model without and with Compile Model (regional); the one-off compile
  time is the first step's extra time.

A case that fails prints its error in its cell; the rest of the table still runs. ``--budget``
(seconds, default 450) skips the cases left when it runs out.

Without CUDA (or with ``--smoke``) it says so and runs every case once, with 1–2 steps each, on
the tests' tiny Wan (width 128, 2 blocks) and small latents, and compile backends that only trace
(eager): the same code path, kept working by tests/test_bench_gpu_check.py. Its numbers are not
measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(Path(__file__).resolve().parent))

import comfy_inprocess

CHECKPOINT = "gpu_check_wan21_t2v.safetensors"
WAN_1_3B = {"dim": 1536, "ffn_dim": 8960, "num_layers": 30, "freq_dim": 256, "text_dim": 4096}
RANK = 16
LEARNING_RATE = 1e-4
MAGCACHE = {"threshold": 0.24, "retention_ratio": 0.2, "K": 6}  # the node's defaults
GIB = 1024**3


@dataclass(frozen=True)
class Plan:
    """Sizes and counts of one run: the real check or the smoke run."""

    smoke: bool
    wan: dict  # overrides of tests/tiny_checkpoints.py's WAN_TINY ({} = the tests' tiny Wan)
    width: int  # pixels; latents are 1/8
    height: int
    text_tokens: int
    train_latents: int
    train_steps: int  # optimizer steps per training run
    train_skip: int  # first step intervals dropped (set-up, warm-up, compiling)
    sample_steps: int  # KSampler steps per timed sampling run (cfg 1)
    sample_runs: int  # timed runs per side, alternating
    sample_skip: int
    magcache_steps: int
    magcache_cfg: float
    magcache_runs: int  # timed samples per side, alternating, after one warm-up each
    train_backend: str  # Compile Settings' dynamo_backend
    sample_backend: str  # Compile Model (regional)'s backend


REAL = Plan(smoke=False, wan=WAN_1_3B, width=832, height=480, text_tokens=512, train_latents=2, train_steps=14,
            train_skip=3, sample_steps=12, sample_runs=2, sample_skip=2, magcache_steps=30, magcache_cfg=5.0,
            magcache_runs=3, train_backend="INDUCTOR", sample_backend="inductor")
SMOKE = Plan(smoke=True, wan={}, width=64, height=64, text_tokens=16, train_latents=2, train_steps=2, train_skip=1,
             sample_steps=2, sample_runs=1, sample_skip=1, magcache_steps=6, magcache_cfg=5.0, magcache_runs=1,
             train_backend="EAGER", sample_backend="eager")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- timing ---------------------------------------------------------------------------------


class StepClock:
    """Timestamps of step ends, after a CUDA synchronize: every optimizer step (any trainer, via
    torch's global optimizer hook) or every sampler step (ComfyUI's global progress-bar hook)."""

    def __init__(self, comfy_utils, cuda: bool):
        self.cuda = cuda
        self.kind: str | None = None
        self.marks: list[float] = []
        register_optimizer_step_post_hook(self._optimizer_step)
        comfy_utils.set_progress_bar_global_hook(self._progress)

    def _mark(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())

    def _optimizer_step(self, optimizer, args, kwargs) -> None:
        if self.kind == "optimizer":
            self._mark()

    def _progress(self, value, total, preview=None, node_id=None) -> None:
        if self.kind == "sampler":
            self._mark()

    @contextlib.contextmanager
    def watching(self, kind: str, expected: int):
        """Collect the marks of one run (the first is its start); check that every step was seen."""
        self.kind, self.marks = kind, []
        self._mark()
        try:
            yield self
        finally:
            self.kind = None
        if len(self.marks) != expected + 1:
            raise RuntimeError(f"expected {expected} {kind} steps, the hook saw {len(self.marks) - 1}")

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


@dataclass
class Measured:
    """Seconds of each kept step (or run), the peak allocated bytes, and the first interval
    (set-up plus first step: where compiling shows)."""

    seconds: list[float] = field(default_factory=list)
    peak: int | None = None
    first: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    graphs: int = 0  # graphs Dynamo compiled during the case
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def duration(values: list[float]) -> str:
    """Median with min–max, in ms below a second."""
    if not values:
        return "no step kept"
    median, low, high = statistics.median(values), min(values), max(values)
    if median < 1:
        return f"{median * 1e3:.1f} ms ({low * 1e3:.1f}–{high * 1e3:.1f})"
    return f"{median:.2f} s ({low:.2f}–{high:.2f})"


def failure(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"FAILED: {type(error).__name__}: {text[0][:140] if text else ''}"


# --- ComfyUI, the pack, the model -------------------------------------------------------------


def load_modules(cuda: bool) -> SimpleNamespace:
    import comfy.model_management
    import comfy.utils
    import comfy_extras.nodes_train
    import nodes

    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm bars in the output
    pack = comfy_inprocess.pack_module
    return SimpleNamespace(
        cuda=cuda,
        mm=comfy.model_management,
        utils=comfy.utils,
        core_nodes=nodes,
        core_train=comfy_extras.nodes_train,
        train_lora=pack("musubi_nodes.train_lora"),
        settings=pack("musubi_nodes.train_settings"),
        fp8=pack("musubi_nodes.load_dit_fp8"),
        magcache=pack("musubi_nodes.magcache"),
        compile=pack("musubi_nodes.compile"),
        clock=StepClock(comfy.utils, cuda),
    )


def write_checkpoint(folder: Path, plan: Plan) -> Path:
    """The Wan 2.1 T2V checkpoint (real key layout; real 1.3B widths unless smoke), seeded, bf16."""
    import tiny_checkpoints  # tests/, on sys.path once ComfyUI was found

    tiny_checkpoints.WAN_TINY.update(plan.wan)
    return tiny_checkpoints.write_tiny_checkpoint("wan21_t2v", folder / CHECKPOINT, dtype=torch.bfloat16)


def fresh_device(env: SimpleNamespace) -> None:
    """Every model unloaded and the allocator's peak reset, so a case's peak is its own."""
    env.mm.unload_all_models()
    gc.collect()
    env.mm.soft_empty_cache()
    if env.cuda:
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(env: SimpleNamespace) -> int | None:
    return torch.cuda.max_memory_allocated() if env.cuda else None


@dataclass
class Inputs:
    latents: dict  # training LATENT
    positive: list  # CONDITIONING
    negative: list
    empty: dict  # the LATENT sampling starts from

    @classmethod
    def make(cls, plan: Plan) -> Inputs:
        generator = torch.Generator().manual_seed(0)
        side = (plan.height // 8, plan.width // 8)
        context = torch.randn(1, plan.text_tokens, 4096, generator=generator)
        uncond = torch.randn(1, plan.text_tokens, 4096, generator=generator)
        return cls(latents={"samples": torch.randn(plan.train_latents, 16, 1, *side, generator=generator)},
                   positive=[[context, {}]], negative=[[uncond, {}]], empty={"samples": torch.zeros(1, 16, 1, *side)})


# --- cases ------------------------------------------------------------------------------------


class Runner:
    """Runs the cases, each into a Measured that holds its numbers or its error."""

    def __init__(self, env: SimpleNamespace, plan: Plan, inputs: Inputs, budget: float):
        self.env, self.plan, self.inputs = env, plan, inputs
        self.started = time.monotonic()
        self.budget = budget
        settings = env.settings
        self.network = settings.MusubiLoRANetworkSettings.execute(
            network_dim=RANK, network_alpha=float(RANK), network_dropout=0.0, rank_dropout=0.0, module_dropout=0.0,
            loraplus_lr_ratio=0.0, exclude_patterns="", include_patterns="").args[0]
        self.optimizer = settings.MusubiOptimizerSettings.execute(
            optimizer_type="AdamW", custom_optimizer="", learning_rate=LEARNING_RATE, optimizer_args="",
            lr_scheduler="constant", lr_warmup_steps="0", lr_scheduler_num_cycles=1.0, lr_scheduler_power=1.0,
            lr_scheduler_min_lr_ratio=0.0, lr_scheduler_args="", max_grad_norm=0.0).args[0]

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def guarded(self, label: str, work, result: Measured | None = None) -> Measured:
        """``work(result)`` fills ``result``; an error (or the budget spent) goes into its cell."""
        result = result if result is not None else Measured()
        if self.elapsed() > self.budget:
            result.error = f"skipped: the {self.budget:.0f} s budget was spent"
            return result
        log(f"[{self.elapsed():5.0f} s] {label}")
        try:
            work(result)
        except Exception as error:  # noqa: BLE001 — the table reports it and goes on
            log(traceback.format_exc())
            result.error = failure(error)
        finally:
            self.env.clock.kind = None
        return result

    # training

    def train(self, trainer: str, model, checkpointing: bool, compile_settings: dict | None = None,
              precision: str = "bf16") -> Measured:
        """``precision``: bf16 (mixed precision for Train LoRA, training_dtype for core) or fp32."""
        plan, env, inputs = self.plan, self.env, self.inputs

        def work(result: Measured) -> None:
            fresh_device(env)
            with env.clock.watching("optimizer", plan.train_steps) as clock, torch.inference_mode():
                if trainer == "ours":
                    node = env.train_lora.MusubiTrainLoRA.PREPARE_CLASS_CLONE({"UNIQUE_ID": "gpu_check"})
                    node.execute(model=model, steps=plan.train_steps, batch_size=1, gradient_accumulation_steps=1,
                                 seed=1, output_name="gpu_check", resume="no",
                                 mixed_precision="bf16" if precision == "bf16" else "no",
                                 gradient_checkpointing=checkpointing, network_settings=self.network,
                                 optimizer_settings=self.optimizer, latents=inputs.latents,
                                 conditioning=inputs.positive, compile_settings=compile_settings)
                else:
                    env.core_train.TrainLoraNode().train(
                        model, inputs.latents, inputs.positive, batch_size=1, steps=plan.train_steps,
                        grad_accumulation_steps=1, learning_rate=LEARNING_RATE, rank=RANK, optimizer="AdamW",
                        loss_function="MSE", seed=1, training_dtype=precision, lora_dtype="fp32", algorithm="LoRA",
                        gradient_checkpointing=checkpointing, existing_lora="[None]")
            intervals = clock.intervals()
            result.first.append(intervals[0])
            result.seconds.extend(intervals[plan.train_skip:])
            result.peak = peak_bytes(env)

        label = {"ours": "Train LoRA", "core": "core TrainLoraNode"}[trainer]
        return self.guarded(f"{label}, checkpointing {'on' if checkpointing else 'off'}"
                            f"{', compiled' if compile_settings else ''}", work)

    # sampling

    def sample_steps(self, model, result: Measured) -> None:
        """One KSampler run at cfg 1; its step times go into ``result``."""
        plan, env, inputs = self.plan, self.env, self.inputs
        with env.clock.watching("sampler", plan.sample_steps) as clock, torch.inference_mode():
            env.core_nodes.common_ksampler(model, 0, plan.sample_steps, 1.0, "euler", "simple", inputs.positive,
                                           inputs.negative, inputs.empty, denoise=1.0)
        intervals = clock.intervals()
        result.first.append(intervals[0])
        result.seconds.extend(intervals[plan.sample_skip:])

    def alternate_sampling(self, label: str, models: tuple, results: tuple[Measured, Measured]) -> None:
        """A warm-up run of each model (for a compiled model: the run that compiles; its first
        interval is kept in ``first``), then runs of the two alternately, so a slow spell of the
        machine hits both alike."""
        for index, (model, result) in enumerate(zip(models, results)):
            self.guarded(f"{label}: warm-up {'AB'[index]}", lambda r, m=model: self.sample_steps(m, r), result)
            result.seconds.clear()
        for run in range(self.plan.sample_runs):
            for index, (model, result) in enumerate(zip(models, results)):
                if not result.error:
                    self.guarded(f"{label}: run {run + 1} {'AB'[index]}", lambda r, m=model: self.sample_steps(m, r),
                                 result)

    def magcache(self, model) -> tuple[Measured, Measured]:
        plan, env, inputs = self.plan, self.env, self.inputs
        plain, cached = Measured(), Measured()
        counter = comfy_inprocess.CallCounter(model)
        sampling = (plan.magcache_steps, plan.magcache_cfg, "uni_pc", "simple", inputs.positive, inputs.negative,
                    inputs.empty)

        def ksampler() -> None:
            env.core_nodes.common_ksampler(model, 0, *sampling, denoise=1.0)

        def magcache_sampler() -> None:
            env.magcache.MusubiMagCacheSampler.execute(model, 0, *sampling, 1.0, MAGCACHE["threshold"],
                                                       MAGCACHE["retention_ratio"], MAGCACHE["K"], "auto", "auto", "")

        def timed(run, record: bool):
            def work(result: Measured) -> None:
                if env.cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                with torch.inference_mode():
                    run()
                if env.cuda:
                    torch.cuda.synchronize()
                seconds, calls = time.perf_counter() - start, counter.take()
                if record:
                    result.seconds.append(seconds)
                    result.calls.append(calls)
            return work

        try:
            for run in range(plan.magcache_runs + 1):  # the first round warms up
                for name, job, result in (("KSampler", ksampler, plain), ("MagCache Sampler", magcache_sampler, cached)):
                    if not result.error:
                        self.guarded(f"MagCache: {name} {'warm-up' if run == 0 else f'run {run}'}",
                                     timed(job, record=run > 0), result)
        finally:
            counter.remove()
        return plain, cached


# --- the table --------------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    compares: str
    a: str
    b: str
    ratio: str


def training_cell(result: Measured, label: str) -> str:
    if result.error:
        return result.error
    memory = f", peak {result.peak / GIB:.2f} GiB" if result.peak is not None else ""
    return f"{label} {duration(result.seconds)}{memory}"


def training_ratio(ours: Measured, core: Measured) -> str:
    if ours.error or core.error or not ours.seconds or not core.seconds:
        return "–"
    text = f"core/ours time {core.median / ours.median:.2f}×"
    if ours.peak and core.peak:
        text += f", VRAM {core.peak / ours.peak:.2f}×"
    return text


def speed_row(case: str, compares: str, a: Measured, b: Measured, a_label: str, b_label: str, ratio_text) -> Row:
    cells = [result.error or f"{label} {duration(result.seconds)}" for result, label in ((a, a_label), (b, b_label))]
    ratio = "–"
    if not a.error and not b.error and a.seconds and b.seconds:
        ratio = ratio_text(a, b)
    return Row(case, compares, cells[0], cells[1], ratio)


def fp8_overhead(a: Measured, b: Measured) -> str:
    return f"fp8/bf16 time {b.median / a.median:.2f}× ({b.median / a.median - 1:+.0%})"


def compile_speedup(a: Measured, b: Measured) -> str:
    """Eager over compiled time, and B's first interval (set-up, compiling, first step) over A's
    latest one (set-up, first step): the one-off compile time."""
    text = f"speed-up eager/compiled {a.median / b.median:.2f}×"
    if a.first and b.first:
        text += f", compile once ≈ {max(b.first[0] - a.first[-1], 0.0):.1f} s"
    return text + f", {b.graphs} graph(s) compiled"


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (private counter; 0 where it is missing)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001
        return 0


def check_compiled(result: Measured, before: int) -> None:
    """A compiled case whose compiling silently fell back to eager would pass for a 1× speed-up."""
    result.graphs = compiled_graphs() - before
    if not result.error and result.graphs == 0:
        result.error = "FAILED: nothing was compiled (the compile path fell back to eager; see stderr)"


def magcache_row(plain: Measured, cached: Measured, plan: Plan) -> Row:
    cells = []
    for result, label in ((plain, "KSampler"), (cached, "MagCache")):
        calls = f", {statistics.median(result.calls):.0f} calls" if result.calls else ""
        cells.append(result.error or f"{label} {duration(result.seconds)}{calls}")
    ratio = "–"
    if not plain.error and not cached.error and plain.seconds and cached.seconds:
        made, total = statistics.median(cached.calls), statistics.median(plain.calls)
        calls = f"{total / made:.2f}× fewer calls ({1 - made / total:.0%} saved)" if made else "no calls made"
        ratio = f"speed-up {plain.median / cached.median:.2f}× for {calls}"
    return Row("MagCache", f"whole sample ({plan.magcache_steps} steps uni_pc, cfg {plan.magcache_cfg:g}): core "
               f"KSampler (A) vs MagCache Sampler θ {MAGCACHE['threshold']:g} K {MAGCACHE['K']} (B)",
               cells[0], cells[1], ratio)


def print_table(rows: list[Row], header: list[str]) -> None:
    columns = ("case", "A", "B", "B vs A", "compares")
    table = [(row.case, row.a, row.b, row.ratio, row.compares) for row in rows]
    widths = [max(len(column), *(len(cells[index]) for cells in table)) for index, column in enumerate(columns)]
    print()
    for line in header:
        print(line)
    print()
    print(" | ".join(column.ljust(width) for column, width in zip(columns, widths)).rstrip())
    print("-+-".join("-" * width for width in widths))
    for cells in table:
        print(" | ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip())
    print()
    print("Cells: median (min–max) of the kept steps (training: optimizer step to optimizer step; sampling: "
          "sampler step to sampler step) or of whole samples (MagCache); peak = torch.cuda.max_memory_allocated "
          "during the run, weights included, after every model was unloaded.")


# --- main -------------------------------------------------------------------------------------


def run(plan: Plan, base: Path, env: SimpleNamespace, budget: float) -> tuple[list[Row], list[str]]:
    import folder_paths

    for folder in ("input", "output", "temp"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    models_folder = Path(folder_paths.get_folder_paths("diffusion_models")[-1])
    models_folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log(f"writing the Wan 2.1 checkpoint ({'tiny' if plan.smoke else '1.3B'}, bf16) into {models_folder}…")
    path = write_checkpoint(models_folder, plan)
    log(f"written in {time.monotonic() - started:.0f} s ({path.stat().st_size / GIB:.2f} GiB)")
    inputs = Inputs.make(plan)
    runner = Runner(env, plan, inputs, budget)

    models: dict[str, object] = {}
    errors: dict[str, str] = {}

    def load(name: str, loader) -> None:
        def work(result: Measured) -> None:
            models[name] = loader()
        result = runner.guarded(f"loading the {name} model", work)
        if result.error:
            errors[name] = result.error

    load("bf16", lambda: env.core_nodes.UNETLoader().load_unet(path.name, "default")[0])
    load("fp8", lambda: env.fp8.MusubiLoadDiTFP8Scaled.execute(path.name, "e4m3fn", "block", 64, "bf16", "auto").args[0])

    def missing(name: str) -> Measured:
        return Measured(error=errors.get(name, "FAILED: model not loaded"))

    rows: list[Row] = []
    for precision, loader_name in (("bf16", "core Load Diffusion Model"), ("fp8", "Load DiT (fp8 scaled)")):
        for checkpointing in (False, True):
            model = models.get(precision)
            ours = runner.train("ours", model, checkpointing) if model is not None else missing(precision)
            core = runner.train("core", model, checkpointing) if model is not None else missing(precision)
            rows.append(Row(f"train {precision} ckpt {'on' if checkpointing else 'off'}",
                            f"s/step and peak VRAM: Train LoRA (A) vs core TrainLoraNode (B), model from "
                            f"{loader_name}, gradient checkpointing {'on' if checkpointing else 'off'}",
                            training_cell(ours, "Train LoRA"), training_cell(core, "core"), training_ratio(ours, core)))

    bf16_forward, fp8_forward = Measured(), Measured()
    if "bf16" in models and "fp8" in models:
        fresh_device(env)
        runner.alternate_sampling("fp8 forward", (models["bf16"], models["fp8"]), (bf16_forward, fp8_forward))
    else:
        bf16_forward, fp8_forward = missing("bf16"), missing("fp8")
    rows.append(speed_row("fp8 forward", "one KSampler step at cfg 1 (one forward pass), same weights: "
                          "core loader bf16 (A) vs Load DiT (fp8 scaled) (B)", bf16_forward, fp8_forward, "bf16", "fp8",
                          fp8_overhead))

    plain, cached = runner.magcache(models["bf16"]) if "bf16" in models else (missing("bf16"), missing("bf16"))
    rows.append(magcache_row(plain, cached, plan))

    eager_train, compiled_train = missing("bf16"), missing("bf16")
    if "bf16" in models:
        compile_settings = env.settings.MusubiCompileSettings.execute(plan.train_backend, "default", False, False).args[0]
        eager_train = runner.train("ours", models["bf16"], False)
        before = compiled_graphs()
        compiled_train = runner.train("ours", models["bf16"], False, compile_settings)
        check_compiled(compiled_train, before)
    rows.append(speed_row("compile train", f"Train LoRA step (bf16, ckpt off): eager (A) vs Compile Settings "
                          f"{plan.train_backend} (B)", eager_train, compiled_train, "eager", "compiled",
                          compile_speedup))

    eager_sample, compiled_sample = Measured(), Measured()
    if "bf16" in models:
        def compile_model(result: Measured) -> None:
            models["compiled"] = env.compile.MusubiCompileModel.execute(models["bf16"], plan.sample_backend, "default",
                                                                        False).args[0]
        made = runner.guarded("Compile Model (regional)", compile_model)
        if made.error:
            eager_sample, compiled_sample = Measured(error=made.error), made
        else:
            fresh_device(env)
            before = compiled_graphs()
            runner.alternate_sampling("compile sample", (models["bf16"], models["compiled"]),
                                      (eager_sample, compiled_sample))
            check_compiled(compiled_sample, before)
    else:
        eager_sample, compiled_sample = missing("bf16"), missing("bf16")
    rows.append(speed_row("compile sample", f"one KSampler step at cfg 1: eager (A) vs Compile Model (regional) "
                          f"{plan.sample_backend} (B)", eager_sample, compiled_sample, "eager", "compiled",
                          compile_speedup))

    model = models.get("bf16")
    parameters = sum(p.numel() for p in model.model.diffusion_model.parameters()) if model is not None else 0
    import tiny_checkpoints

    wan = tiny_checkpoints.WAN_TINY  # as the checkpoint was written
    model_line = (f"model: Wan 2.1 T2V key layout, dim {wan['dim']}, {wan['num_layers']} blocks, {wan['dim'] // 128} "
                  f"heads, ffn {wan['ffn_dim']}, {parameters / 1e9:.3f} B parameters, seeded random bf16 weights")
    sizes_line = (f"latents: 16×1×{plan.height // 8}×{plan.width // 8} (1 frame, {plan.width}×{plan.height} px), "
                  f"{plan.text_tokens} text tokens; training: {plan.train_latents} latents, batch 1, rank {RANK}, "
                  f"AdamW {LEARNING_RATE:g} constant, bf16 compute, {plan.train_steps} steps per run, first "
                  f"{plan.train_skip} interval(s) dropped; sampling rows: {plan.sample_steps} steps × "
                  f"{plan.sample_runs} run(s) per side after a warm-up, first {plan.sample_skip} interval(s) dropped")
    header = [model_line, sizes_line, f"took {runner.elapsed():.0f} s after writing the checkpoint"]
    return rows, header


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny CPU-style smoke run, even with CUDA")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds after the checkpoint is written; cases left then are skipped (default 450)")
    options = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    plan = SMOKE if options.smoke or not cuda else REAL
    if not cuda:
        print("No CUDA device: nothing here can be measured. Running the CPU smoke run instead (tiny Wan, "
              "1–2 steps per case, every case exercised, no timing claims).", flush=True)
    elif plan.smoke:
        print("--smoke: the smoke run on the GPU (tiny Wan, 1–2 steps per case, no timing claims).", flush=True)
    comfy_path = comfy_inprocess.comfyui_path("bench/gpu_check.py")
    logging.getLogger().setLevel(logging.WARNING)
    if not cuda:
        torch.set_num_threads(1)  # tiny models on a few cores: thread contention costs more than it gives
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as base:
        comfy_inprocess.import_comfyui(comfy_path, base_directory=base, pytorch_attention=not cuda)
        env = load_modules(cuda)
        rows, header = run(plan, Path(base), env, options.budget)
    device = torch.cuda.get_device_name() if cuda else "CPU"
    title = (f"GPU check — {device}, torch {torch.__version__}"
             + (f", CUDA {torch.version.cuda}" if cuda else "")
             + (" — SMOKE RUN: the code path only, the numbers are not measurements" if plan.smoke else ""))
    print_table(rows, [title, *header])
    if options.json:
        payload = {"smoke": plan.smoke, "device": device, "header": [title, *header],
                   "rows": [row.__dict__ for row in rows]}
        Path(options.json).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
