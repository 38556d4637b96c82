"""Benchmark: MagCache against ComfyUI core's EasyCache — model calls saved against fidelity.

Run from the repository root: ``python bench/magcache.py`` (needs ComfyUI at $COMFYUI_PATH or
~/comfy/ComfyUI). The first run trains the test model (a few minutes on 2 CPU cores) and keeps it
in ``bench/.cache/``; later runs sample only (about a minute). ``--retrain`` trains again,
``--quick`` samples fewer videos with fewer settings, ``--plot FILE.png`` draws the curve,
``--json FILE`` writes the measurements.

The model is a tiny Wan 2.1 T2V network (the real key layout, 4 blocks of width 128) that learned
to make short procedural videos in the 16-channel latent space — a red blob drifting right, a blue
bar falling, a green blob circling, yellow stripes scrolling — each tied to a fixed random text
embedding (its "prompt"), with a fifth embedding as the empty prompt, so classifier-free guidance
matters. It is trained once by this pack's Train LoRA node inside a real ComfyUI server (a LoRA of
full rank on every Linear of the blocks of a random-weight network, high learning rate), and the
LoRA is merged into the checkpoint. The videos live at latent resolution: an RGB video maps to the
latent through a fixed orthonormal 3 → 16 projection (standing in for a VAE), and back through its
transpose, so every result can be judged as a video in [0, 1].

Then, in-process with ComfyUI's own sampling code: the pack's Calibrate MagCache measures the
model's ratios on one extra run (what a user does), and every prompt × seed is sampled with
KSampler (uncached), with MagCache Sampler using that calibration at several thresholds (K 6) and
several K (threshold 0.24), retention_ratio at its default 0.2, and with core's EasyCache node at
several reuse thresholds
(start/end at their defaults). Per setting it reports:

* model calls computed: rows of a batch that entered the last transformer block, counted by a
  forward hook on that block — a cond and an uncond evaluation count one each, whether ComfyUI
  batches them or not, and whichever method skips (MagCache skips the blocks, EasyCache the whole
  diffusion model), so both methods are counted the same way;
* PSNR of the decoded videos against the uncached videos of the same prompt and seed (pooled MSE
  over all videos; the worst single video too) and the relative error of the final latents.

Model calls, not seconds, measure the saving: on so small a network the fixed cost of each sampling
step (the sampler, ComfyUI's wrappers) is as large as the network itself, which hides on a CPU what
the skipped calls save on a real model, where the transformer is nearly all of the time.

Then, for every setting, the other method at matched model calls: its best PSNR at the same
fraction saved (linear between the settings of its Pareto front; "never saves that much" beyond
its last one) and the most it saves at the same PSNR; and which settings of the other method
dominate it (save at least as much at a PSNR at least as high).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / "bench" / ".cache"
if str(REPO_ROOT / "bench") not in sys.path:  # also when loaded by path (tests/test_bench_magcache.py)
    sys.path.insert(0, str(REPO_ROOT / "bench"))

import comfy_inprocess
from comfy_inprocess import CallCounter, pack_module

PROMPTS = ("a red blob drifting right", "a blue bar falling", "a green blob circling", "yellow stripes scrolling")
# The colour of each prompt's object: a video whose most vivid pixels are nearest to it follows the prompt.
PROMPT_COLOURS = ((0.9, 0.15, 0.1), (0.15, 0.25, 0.95), (0.15, 0.85, 0.2), (0.95, 0.85, 0.1))
TEXT_TOKENS = 8
TEXT_WIDTH = 4096  # Wan's text-encoder width, fixed by ComfyUI's model detection
LATENT_CHANNELS = 16
LATENT_GAIN = 6.0  # makes the projected videos' latents roughly unit-variance, like a VAE's
BLOCKS = 4
BASE_NETWORK_VERSION = 1  # bump when base_state_dict() changes, so a cached trained model is rebuilt

DEFAULT_MAGCACHE = dict(threshold=0.24, K=6, retention_ratio=0.2)
# (threshold, K): a threshold sweep at the default K, and a K sweep at the default threshold (on a
# flat ratio curve K, not the threshold, bounds the skipping).
MAGCACHE_SETTINGS = ((0.01, 6), (0.02, 6), (0.04, 6), (0.08, 6), (0.24, 6), (0.5, 6), (0.24, 1), (0.24, 2), (0.24, 3))
EASYCACHE_THRESHOLDS = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.8, 1.5)
QUICK_MAGCACHE_SETTINGS = ((0.02, 6), (0.24, 6), (0.24, 2))
QUICK_EASYCACHE_THRESHOLDS = (0.2, 0.3, 0.5)
EASYCACHE_DEFAULTS = dict(start_percent=0.15, end_percent=0.95)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained model; a cached model is reused only for the same recipe."""

    frames: int = 3
    size: int = 8  # latent height and width
    videos_per_prompt: int = 48
    empty_prompt_videos: int = 32
    train_steps: int = 600
    batch_size: int = 8
    learning_rate: float = 3e-3
    data_seed: int = 0
    train_seed: int = 1

    def key(self) -> str:
        text = json.dumps({**dataclasses.asdict(self), "blocks": BLOCKS, "base": BASE_NETWORK_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SamplingSetup:
    steps: int = 30
    cfg: float = 5.0
    sampler: str = "uni_pc"
    scheduler: str = "simple"
    seeds_per_prompt: int = 3
    calibration_seed: int = 999


@dataclass
class Measurement:
    method: str  # "uncached" | "magcache" | "easycache"
    setting: str
    threshold: float | None
    K: int | None = None
    calls: int = 0
    total_calls: int = 0
    mse: list[float] = field(default_factory=list)  # per video, decoded, against the uncached video
    latent_error: list[float] = field(default_factory=list)  # per video, ‖x − ref‖ / ‖ref‖

    @property
    def saved(self) -> float:
        return 1.0 - self.calls / self.total_calls if self.total_calls else 0.0

    @property
    def psnr(self) -> float:
        return psnr_from_mse(sum(self.mse) / len(self.mse)) if self.mse else math.nan

    @property
    def worst_psnr(self) -> float:
        return psnr_from_mse(max(self.mse)) if self.mse else math.nan


# --- metrics -----------------------------------------------------------------------------------


def psnr_from_mse(mse: float, peak: float = 1.0) -> float:
    """10·log10(peak² / MSE) in dB; infinite for identical signals."""
    if mse < 0 or math.isnan(mse):
        raise ValueError(f"MSE must be ≥ 0, got {mse}")
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def psnr(result: torch.Tensor, reference: torch.Tensor, peak: float = 1.0) -> float:
    """PSNR of ``result`` against ``reference`` (same shape), both on the scale of ``peak``."""
    if result.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(result.shape)} vs {tuple(reference.shape)}")
    return psnr_from_mse(mean_squared_error(result, reference), peak)


def mean_squared_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.mean((result.double() - reference.double()) ** 2))


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((result - reference).double()) / torch.linalg.vector_norm(reference.double()))


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of y at ``x`` over (x, y) points; None outside their range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return max(y0, y1)
            if math.isinf(y0) or math.isinf(y1):
                return y1 if x == x1 else (y0 if x == x0 else min(y0, y1))
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if len(points) == 1 and points[0][0] == x:
        return points[0][1]
    return None


# --- the procedural videos and their latent space ----------------------------------------------


def latent_projection() -> torch.Tensor:
    """A fixed [16, 3] matrix with orthonormal columns: RGB → latent channels (its transpose inverts it)."""
    generator = torch.Generator().manual_seed(1234)
    matrix, _ = torch.linalg.qr(torch.randn(LATENT_CHANNELS, 3, generator=generator, dtype=torch.float64))
    return matrix.float()


def encode_video(rgb: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """[3, T, H, W] in [0, 1] → the model-space latent [16, T, H, W]."""
    return LATENT_GAIN * torch.einsum("lc,cthw->lthw", projection, rgb - 0.5)


def decode_video(latent: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """A model-space latent [..., 16, T, H, W] → RGB in [0, 1] (what lies outside the RGB subspace is dropped)."""
    rgb = torch.einsum("lc,...lthw->...cthw", projection, latent.float()) / LATENT_GAIN + 0.5
    return rgb.clamp(0.0, 1.0)


def render_video(prompt: int, frames: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random video [3, T, H, W] of the kind ``prompt`` describes."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    coordinates = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = coordinates.view(-1, 1), coordinates.view(1, -1)
    background = torch.tensor([0.12, 0.12, 0.14]) + 0.08 * torch.rand(3, generator=generator)
    colour = (torch.tensor(PROMPT_COLOURS[prompt]) + 0.08 * (torch.rand(3, generator=generator) - 0.5)).clamp(0, 1)
    start_x, start_y, speed, radius = uniform(0.15, 0.4), uniform(0.25, 0.75), uniform(0.25, 0.45), uniform(0.12, 0.2)
    phase = uniform(0.0, 2 * math.pi)
    video = torch.empty(3, frames, size, size)
    for frame in range(frames):
        time_ = frame / max(frames - 1, 1)
        if prompt == 0:  # blob drifting right
            mask = torch.exp(-((x - start_x - speed * time_) ** 2 + (y - start_y) ** 2) / (2 * radius**2))
        elif prompt == 1:  # horizontal bar falling
            mask = torch.exp(-((y - start_x - speed * time_) ** 2) / (2 * (0.5 * radius) ** 2)).expand(size, size)
        elif prompt == 2:  # blob circling the centre
            angle = phase + math.pi * time_
            centre_x, centre_y = 0.5 + 0.25 * math.cos(angle), 0.5 + 0.25 * math.sin(angle)
            mask = torch.exp(-((x - centre_x) ** 2 + (y - centre_y) ** 2) / (2 * radius**2))
        else:  # diagonal stripes scrolling
            mask = 0.5 + 0.5 * torch.sin(2 * math.pi * 1.5 * (x + y) - 2 * math.pi * speed * 2 * time_ + phase)
        video[:, frame] = background.view(3, 1, 1) * (1 - mask) + colour.view(3, 1, 1) * mask
    return video


def training_set(recipe: Recipe) -> tuple[torch.Tensor, list[int]]:
    """Model-space latents [N, 16, T, H, W] and each video's prompt (len(PROMPTS) = the empty prompt),
    ordered by prompt."""
    generator = torch.Generator().manual_seed(recipe.data_seed)
    projection = latent_projection()
    latents, prompts = [], []
    for prompt in range(len(PROMPTS)):
        for _ in range(recipe.videos_per_prompt):
            latents.append(encode_video(render_video(prompt, recipe.frames, recipe.size, generator), projection))
            prompts.append(prompt)
    for index in range(recipe.empty_prompt_videos):
        video = render_video(index % len(PROMPTS), recipe.frames, recipe.size, generator)
        latents.append(encode_video(video, projection))
        prompts.append(len(PROMPTS))
    return torch.stack(latents), prompts


def text_embeddings() -> torch.Tensor:
    """[len(PROMPTS) + 1, tokens, 4096]: one fixed random embedding per prompt, the last one empty."""
    generator = torch.Generator().manual_seed(4321)
    return torch.randn(len(PROMPTS) + 1, TEXT_TOKENS, TEXT_WIDTH, generator=generator)


def follows_prompt(rgb: torch.Tensor, prompt: int) -> bool:
    """Whether the most saturated pixels of a decoded video [3, T, H, W] have the prompt's colour."""
    pixels = rgb.reshape(3, -1)
    saturation = pixels.amax(0) - pixels.amin(0)
    vivid = pixels[:, saturation >= saturation.quantile(0.9)].mean(1)
    expected = torch.tensor(PROMPT_COLOURS[prompt])
    distances = [float(torch.linalg.vector_norm(vivid - torch.tensor(colour))) for colour in PROMPT_COLOURS]
    return min(range(len(PROMPT_COLOURS)), key=distances.__getitem__) == prompt and bool(
        torch.linalg.vector_norm(vivid - expected) < 0.5)


# --- ComfyUI ------------------------------------------------------------------------------------


def comfyui_path() -> Path:
    return comfy_inprocess.comfyui_path("bench/magcache.py")


def import_comfyui(path: Path, magcache_folder: str) -> SimpleNamespace:
    """ComfyUI's modules and this pack's, imported in this process (the pack as a package, as
    ComfyUI imports custom nodes), with calibrations going to ``magcache_folder``."""
    comfy_inprocess.import_comfyui(path)
    import comfy.latent_formats
    import comfy.sd
    import comfy.utils
    import comfy_extras.nodes_easycache
    import folder_paths
    import nodes

    comfy.utils.PROGRESS_BAR_ENABLED = False
    folder_paths.folder_names_and_paths["magcache"] = ([magcache_folder], {".json"})
    return SimpleNamespace(
        sd=comfy.sd,
        latent_format=comfy.latent_formats.Wan21(),
        core_nodes=nodes,
        easycache=comfy_extras.nodes_easycache,
        magcache=pack_module("musubi_nodes.magcache"),
        lora_merge=pack_module("musubi.lora.merge"),
        safetensors_io=pack_module("musubi.files"),
        text_embeddings=pack_module("musubi.data.text_embeddings"),
    )


def base_state_dict() -> dict[str, torch.Tensor]:
    """The random-weight tiny Wan 2.1 T2V of tests/tiny_checkpoints.py, deepened to BLOCKS blocks
    (the extra blocks drawn with another seed), with each block's attention and feed-forward gates
    opened (modulation rows 2 and 5 set to 1): a LoRA cannot train the modulation tables, and with
    the random gates (±0.09) the blocks' contributions start ten times too small to learn quickly."""
    from tiny_checkpoints import WAN_TINY, tiny_state_dict

    per_file = WAN_TINY["num_layers"]
    state = tiny_state_dict("wan21_t2v", seed=0, dtype=torch.float32)
    for copy in range(1, math.ceil(BLOCKS / per_file)):
        extra = tiny_state_dict("wan21_t2v", seed=copy, dtype=torch.float32)
        for key, tensor in extra.items():
            if key.startswith("blocks."):
                _, index, rest = key.split(".", 2)
                new_index = copy * per_file + int(index)
                if new_index < BLOCKS:
                    state[f"blocks.{new_index}.{rest}"] = tensor
    for index in range(BLOCKS):
        modulation = state[f"blocks.{index}.modulation"].clone()
        modulation[:, 2] = 1.0
        modulation[:, 5] = 1.0
        state[f"blocks.{index}.modulation"] = modulation
    return state


# --- training (the Train LoRA node in a real ComfyUI server) ------------------------------------


def repeated_conditioning(graph, source, count: int):
    """A CONDITIONING of ``count`` copies of ``source``'s, built by doubling with ConditioningCombine."""
    pieces, power, remaining = [], source, count
    while remaining:
        if remaining & 1:
            pieces.append(power)
        remaining >>= 1
        if remaining:
            power = graph.add("ConditioningCombine", conditioning_1=power[0], conditioning_2=power[0])
    return chain_conditionings(graph, pieces)


def chain_conditionings(graph, pieces: list):
    result = pieces[0]
    for piece in pieces[1:]:
        result = graph.add("ConditioningCombine", conditioning_1=result[0], conditioning_2=piece[0])
    return result


def train_model(comfy_path: Path, modules: SimpleNamespace, recipe: Recipe, cache_dir: Path, threads: int) -> tuple[dict, dict]:
    """Train the LoRA with the Train LoRA node; return (merged state dict, training summary)."""
    import safetensors.torch
    from comfy_server import ComfyServer, Graph

    latents, prompts = training_set(recipe)
    embeddings = text_embeddings()
    with tempfile.TemporaryDirectory(prefix="magcache-bench-") as base_dir:
        server = ComfyServer(comfy_path, Path(base_dir))
        base = base_state_dict()
        safetensors.torch.save_file(base, str(server.models_dir("diffusion_models") / "bench_wan.safetensors"))
        folder = server.models_dir("text_embeddings") / "bench"
        folder.mkdir(parents=True, exist_ok=True)
        TextEmbedding = modules.text_embeddings.TextEmbedding
        for index, context in enumerate(embeddings):
            modules.text_embeddings.save_text_embedding(folder / f"prompt{index}.safetensors",
                                                        TextEmbedding(context=context, architecture="wan"))
        server.input_dir.mkdir(parents=True, exist_ok=True)
        raw = modules.latent_format.process_out(latents)  # what VAE Encode would have given
        safetensors.torch.save_file({"latent_tensor": raw.contiguous(), "latent_format_version_0": torch.tensor([])},
                                    str(server.input_dir / "bench_videos.latent"))

        g = Graph()
        model = g.add("UNETLoader", unet_name="bench_wan.safetensors", weight_dtype="default")
        loaded = [g.add("MusubiLoadTextEmbedding", embedding=f"bench/prompt{index}.safetensors", architecture="wan")
                  for index in range(len(embeddings))]
        counts = [prompts.count(index) for index in range(len(embeddings))]  # videos are ordered by prompt
        conditioning = chain_conditionings(g, [repeated_conditioning(g, loaded[index], count)
                                               for index, count in enumerate(counts) if count])
        videos = g.add("LoadLatent", latent="bench_videos.latent")
        width = 128
        network = g.add("MusubiLoRANetworkSettings", network_dim=width, network_alpha=float(width), network_dropout=0.0,
                        rank_dropout=0.0, module_dropout=0.0, loraplus_lr_ratio=0.0, exclude_patterns="",
                        include_patterns="")
        optimizer = g.add("MusubiOptimizerSettings", optimizer_type="AdamW", custom_optimizer="",
                          learning_rate=recipe.learning_rate, optimizer_args="", lr_scheduler="cosine",
                          lr_warmup_steps="5%", lr_scheduler_num_cycles=1.0, lr_scheduler_power=1.0,
                          lr_scheduler_min_lr_ratio=0.0, lr_scheduler_args="", max_grad_norm=1.0)
        timesteps = g.add("MusubiTimestepSettings", timestep_sampling="shift", discrete_flow_shift=3.0,
                          sigmoid_scale=1.0, logit_mean=0.0, logit_std=1.0, weighting_scheme="none", mode_scale=1.29,
                          min_timestep=0, max_timestep=1000, preserve_distribution_shape=False,
                          num_timestep_buckets=0)
        checkpoints = g.add("MusubiCheckpointSettings", save_every_n_steps=0, save_last_n_checkpoints=0,
                            save_state=False, lora_format="comfyui", save_precision="float32", log_with="none",
                            logging_dir="")
        train = g.add("MusubiTrainLoRA", model=model[0], latents=videos[0], conditioning=conditioning[0],
                      steps=recipe.train_steps, batch_size=recipe.batch_size, gradient_accumulation_steps=1,
                      seed=recipe.train_seed, output_name="bench_wan", resume="no", mixed_precision="no",
                      gradient_checkpointing=False, network_settings=network[0], optimizer_settings=optimizer[0],
                      timestep_settings=timesteps[0], checkpoint_settings=checkpoints[0])
        g.add("PreviewAny", source=train[3])
        previous = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)
        started = time.monotonic()
        try:
            server.start()
            outputs = server.run(g.to_dict(), timeout=3600)
        finally:
            server.stop()
            shutil.copyfile(server.log_path, cache_dir / "training_comfyui.log")
            if previous is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = previous
        seconds = time.monotonic() - started
        summary_text = " ".join(outputs.get(str(train), {}).get("text", []))
        lora_path = server.models_dir("loras") / "bench_wan" / "bench_wan.safetensors"
        lora, _ = modules.lora_merge.load_lora_file(str(lora_path))
        merged, _ = modules.lora_merge.merge_loras_into_state_dict(base, [(lora, 1.0)], "wan")
    return merged, {"seconds": round(seconds, 1), "summary": summary_text.strip(), "videos": len(prompts)}


def trained_checkpoint(comfy_path: Path, modules: SimpleNamespace, recipe: Recipe, cache_dir: Path,
                       retrain: bool, threads: int) -> tuple[Path, dict]:
    """The merged checkpoint for ``recipe``, from the cache unless missing, stale or ``retrain``."""
    path = cache_dir / "tiny_wan21_t2v_trained.safetensors"
    if path.is_file() and not retrain:
        _, metadata = modules.safetensors_io.read_header(str(path))
        if metadata.get("bench_recipe") == recipe.key():
            return path, json.loads(metadata.get("bench_training", "{}"))
    print(f"training the test model ({recipe.train_steps} steps of Train LoRA in a ComfyUI server)…", flush=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    state, training = train_model(comfy_path, modules, recipe, cache_dir, threads)
    metadata = {"bench_recipe": recipe.key(), "bench_recipe_json": json.dumps(dataclasses.asdict(recipe)),
                "bench_training": json.dumps(training)}
    modules.safetensors_io.atomic_save_file({key: value.contiguous() for key, value in state.items()}, str(path), metadata)
    return path, training


def untrained_checkpoint(cache_dir: Path) -> Path:
    import safetensors.torch

    path = cache_dir / "tiny_wan21_t2v_random.safetensors"
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(base_state_dict(), str(path))
    return path


# --- sampling and measuring (in-process) ---------------------------------------------------------


@dataclass
class Sample:
    prompt: int
    seed: int


def conditioning(context: torch.Tensor) -> list:
    return [[context.unsqueeze(0), {}]]


def measure(modules: SimpleNamespace, checkpoint: Path, recipe: Recipe, setup: SamplingSetup,
            magcache_settings, easycache_thresholds) -> tuple[list[Measurement], dict]:
    model = modules.sd.load_diffusion_model(str(checkpoint))
    counter = CallCounter(model)
    embeddings = text_embeddings()
    negative = conditioning(embeddings[len(PROMPTS)])
    projection = latent_projection()
    samples = [Sample(prompt, 1000 * (prompt + 1) + index)
               for prompt in range(len(PROMPTS)) for index in range(setup.seeds_per_prompt)]
    empty = {"samples": torch.zeros(1, LATENT_CHANNELS, recipe.frames, recipe.size, recipe.size)}
    sampling = (setup.steps, setup.cfg, setup.sampler, setup.scheduler)

    def ksampler(patched):
        """KSampler's own code (common_ksampler), on ``patched`` (EasyCache's output) or the model."""
        def run(seed: int, positive: list) -> dict:
            return modules.core_nodes.common_ksampler(patched, seed, *sampling, positive, negative, empty, denoise=1.0)[0]
        return run

    def magcache_sampler(threshold: float, K: int, ratios: str):
        def run(seed: int, positive: list) -> dict:
            return modules.magcache.MusubiMagCacheSampler.execute(
                model, seed, *sampling, positive, negative, empty, 1.0, threshold,
                DEFAULT_MAGCACHE["retention_ratio"], K, ratios, "auto", "").args[0]
        return run

    def sample(run, item: Sample) -> tuple[torch.Tensor, int]:
        """The final latent of one video and the model calls it took."""
        counter.take()
        latent = run(item.seed, conditioning(embeddings[item.prompt]))
        return latent["samples"].float(), counter.take()

    def decoded(raw: torch.Tensor) -> torch.Tensor:
        return decode_video(modules.latent_format.process_in(raw)[0], projection)

    started = time.monotonic()
    # The calibration a user would make: one run of Calibrate MagCache, its saved file picked in 'ratios'.
    calibration = modules.magcache.MusubiCalibrateMagCache.execute(
        model, setup.calibration_seed, *sampling, conditioning(embeddings[0]), negative, empty, 1.0, "bench_tiny_wan")
    ratios_text, calibration_file = calibration.args[1], calibration.args[2]

    uncached = Measurement("uncached", "KSampler", None)
    references = []
    adherence = 0
    for item in samples:
        raw, calls = sample(ksampler(model), item)
        references.append(raw)
        adherence += follows_prompt(decoded(raw), item.prompt)
        uncached.calls += calls
        uncached.mse.append(0.0)
        uncached.latent_error.append(0.0)
    uncached.total_calls = uncached.calls
    results = [uncached]

    def record(measurement: Measurement, run) -> None:
        for item, reference in zip(samples, references):
            raw, calls = sample(run, item)
            measurement.calls += calls
            measurement.mse.append(mean_squared_error(decoded(raw), decoded(reference)))
            measurement.latent_error.append(relative_error(raw, reference))
        measurement.total_calls = uncached.calls
        results.append(measurement)

    for threshold, K in magcache_settings:
        label = f"θ {threshold:g}, K {K}, ρ {DEFAULT_MAGCACHE['retention_ratio']:g}"
        record(Measurement("magcache", label, threshold, K), magcache_sampler(threshold, K, calibration_file))
    for threshold in easycache_thresholds:
        patched = modules.easycache.EasyCacheNode.execute(
            model, threshold, EASYCACHE_DEFAULTS["start_percent"], EASYCACHE_DEFAULTS["end_percent"], False).args[0]
        label = (f"reuse {threshold:g}, start {EASYCACHE_DEFAULTS['start_percent']:g}, "
                 f"end {EASYCACHE_DEFAULTS['end_percent']:g}")
        record(Measurement("easycache", label, threshold), ksampler(patched))
    counter.remove()
    info = {"videos": len(samples), "follows_prompt": adherence, "ratios": ratios_text,
            "seconds": round(time.monotonic() - started, 1)}
    return results, info


# --- report --------------------------------------------------------------------------------------


def format_db(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.2f}"


def is_default(m: Measurement) -> bool:
    return m.method == "magcache" and m.threshold == DEFAULT_MAGCACHE["threshold"] and m.K == DEFAULT_MAGCACHE["K"]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (saved, PSNR) points no other point beats on both, by increasing saving: the best
    fidelity a method reached at each saving with the settings tried."""
    front: list[tuple[float, float]] = []
    for saved, value in sorted(points, key=lambda point: (-point[0], -point[1])):
        if not front or value > front[-1][1]:
            front.append((saved, value))
    return front[::-1]


def saving_at_psnr(front: list[tuple[float, float]], target: float) -> float | None:
    """The largest saving on a front (linear between its points) whose PSNR is still ≥ ``target``."""
    best = None
    for (x0, y0), (x1, y1) in zip(front, front[1:]):
        if y0 >= target >= y1 and math.isfinite(y0):
            best = x0 + (x1 - x0) * (y0 - target) / (y0 - y1) if y0 != y1 else x1
    for saved, value in front:
        if value >= target and (best is None or saved > best):
            best = saved
    return best


def comparisons(results: list[Measurement]) -> list[dict]:
    """Each cached setting against the other method's front at the same fraction of calls saved."""
    fronts = {method: pareto_front([(m.saved, m.psnr) for m in results if m.method in (method, "uncached")])
              for method in ("magcache", "easycache")}
    rows = []
    for m in results:
        if m.method == "uncached":
            continue
        other = "easycache" if m.method == "magcache" else "magcache"
        dominated_by = [o.setting for o in results if o.method == other and o.saved >= m.saved and o.psnr >= m.psnr
                        and (o.saved > m.saved or o.psnr > m.psnr)]
        rows.append({"method": m.method, "setting": m.setting, "threshold": m.threshold, "K": m.K, "saved": m.saved,
                     "psnr": m.psnr, "other": other, "other_psnr": interpolate(fronts[other], m.saved),
                     "other_saving_at_same_psnr": saving_at_psnr(fronts[other], m.psnr),
                     "other_largest_saving": fronts[other][-1][0], "dominated_by": dominated_by,
                     "default": is_default(m)})
    return rows


NAMES = {"magcache": "MagCache", "easycache": "EasyCache"}


def print_report(results: list[Measurement], info: dict, training: dict, recipe: Recipe, setup: SamplingSetup,
                 trained: bool) -> list[dict]:
    print()
    model = (f"tiny Wan 2.1 T2V ({BLOCKS} blocks, width 128), " +
             (f"trained {recipe.train_steps} steps on {training.get('videos', '?')} procedural videos"
              if trained else "random weights (not trained)"))
    print(f"model: {model}")
    print(f"sampling: {setup.steps} steps, {setup.sampler}/{setup.scheduler}, cfg {setup.cfg:g}, latent "
          f"{LATENT_CHANNELS}×{recipe.frames}×{recipe.size}×{recipe.size}, {info['videos']} videos "
          f"({len(PROMPTS)} prompts × {setup.seeds_per_prompt} seeds); "
          f"{info['follows_prompt']}/{info['videos']} uncached videos show their prompt's colour")
    print(f"MagCache ratios (Calibrate MagCache on this model): {info['ratios']}")
    print()
    header = f"{'method':<10} {'setting':<34} {'calls':>6} {'saved':>7} {'PSNR dB':>8} {'worst dB':>9} {'latent err':>11}"
    print(header)
    print("-" * len(header))
    for m in results:
        error = sum(m.latent_error) / len(m.latent_error)
        setting = m.setting + (" (default)" if is_default(m) else "")
        print(f"{m.method:<10} {setting:<34} {m.calls:>6} {m.saved:>7.1%} {format_db(m.psnr):>8} "
              f"{format_db(m.worst_psnr):>9} {error:>11.4f}")
    print()
    rows = comparisons(results)
    print("Matched model calls — per setting: the other method's best PSNR at the same fraction saved "
          "(interpolated on its Pareto front), the most it saves at no lower PSNR, and how many of its "
          "settings dominate this one:")
    for row in rows:
        name, other = NAMES[row["method"]], NAMES[row["other"]]
        if row["other_psnr"] is None:
            at_same_saving = f"never saves {row['saved']:.1%} (at most {row['other_largest_saving']:.1%})"
        else:
            magcache_minus_easycache = (row["psnr"] - row["other_psnr"]) * (1 if row["method"] == "magcache" else -1)
            at_same_saving = f"{format_db(row['other_psnr'])} dB"
            if math.isfinite(magcache_minus_easycache):
                at_same_saving += f" (MagCache − EasyCache {magcache_minus_easycache:+.2f} dB)"
        same = row["other_saving_at_same_psnr"]
        print(f"  {name} {row['setting']}{' (default)' if row['default'] else ''}: {row['saved']:.1%} saved, "
              f"{format_db(row['psnr'])} dB | {other} there: {at_same_saving} | {other} at ≥ {format_db(row['psnr'])} dB "
              f"saves {'nothing' if same is None else f'{same:.1%}'} | dominated by {len(row['dominated_by'])}")
    for row in rows:
        if row["default"]:
            verdict = ("dominated by EasyCache " + ", ".join(row["dominated_by"])) if row["dominated_by"] else \
                "not dominated by any EasyCache setting"
            same = row["other_saving_at_same_psnr"]
            print(f"\nPack default (θ {DEFAULT_MAGCACHE['threshold']:g}, K {DEFAULT_MAGCACHE['K']}, retention "
                  f"{DEFAULT_MAGCACHE['retention_ratio']:g}): saves {row['saved']:.1%} of model calls at "
                  f"{format_db(row['psnr'])} dB, {verdict}; at that PSNR EasyCache saves "
                  f"{'nothing' if same is None else f'{same:.1%}'}.")
    return rows


def save_plot(results: list[Measurement], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    curves = (
        ("MagCache, threshold sweep (K 6)", "o-", lambda m: m.method == "magcache" and m.K == DEFAULT_MAGCACHE["K"],
         lambda m: f"{m.threshold:g}"),
        ("MagCache, K sweep (threshold 0.24)", "^-", lambda m: m.method == "magcache" and m.K != DEFAULT_MAGCACHE["K"],
         lambda m: f"K{m.K}"),
        ("EasyCache (core)", "s--", lambda m: m.method == "easycache", lambda m: f"{m.threshold:g}"),
    )
    for name, style, chosen, label in curves:
        points = sorted((m.saved, m.psnr, label(m)) for m in results if chosen(m) and math.isfinite(m.psnr))
        if not points:
            continue
        axes.plot([100 * p[0] for p in points], [p[1] for p in points], style, label=name)
        for saved, value, text in points:
            axes.annotate(text, (100 * saved, value), textcoords="offset points", xytext=(4, 4), fontsize=7)
    default = [m for m in results if is_default(m)]
    if default and math.isfinite(default[0].psnr):
        axes.plot([100 * default[0].saved], [default[0].psnr], "k*", markersize=12, label="MagCache default")
    axes.set_xlabel("model calls saved (%)")
    axes.set_ylabel("PSNR vs uncached (dB)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer videos (one seed per prompt) and settings")
    parser.add_argument("--retrain", action="store_true", help="train the test model again even if it is cached")
    parser.add_argument("--no-train", action="store_true", help="measure on the random-weight network (a smoke test)")
    parser.add_argument("--train-steps", type=int, default=Recipe.train_steps, help="Train LoRA steps (default %(default)s)")
    parser.add_argument("--steps", type=int, default=SamplingSetup.steps, help="sampling steps (default %(default)s)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per prompt (default 3, 1 with --quick)")
    parser.add_argument("--cache-dir", default=str(CACHE_DIR), help="where the trained model is kept (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s: fastest for tiny models)")
    parser.add_argument("--plot", default=None, help="write the PSNR-vs-saved curve as a PNG here")
    parser.add_argument("--json", default=None, help="write the measurements as JSON here")
    options = parser.parse_args(argv)

    torch.set_num_threads(options.threads)
    logging.getLogger().setLevel(logging.WARNING)
    recipe = Recipe(train_steps=options.train_steps)
    seeds = options.seeds if options.seeds is not None else (1 if options.quick else 3)
    setup = SamplingSetup(steps=options.steps, seeds_per_prompt=seeds)
    magcache_settings = QUICK_MAGCACHE_SETTINGS if options.quick else MAGCACHE_SETTINGS
    easycache_thresholds = QUICK_EASYCACHE_THRESHOLDS if options.quick else EASYCACHE_THRESHOLDS
    cache_dir = Path(options.cache_dir)

    comfy_path = comfyui_path()
    with tempfile.TemporaryDirectory(prefix="magcache-calibration-") as calibrations:
        modules = import_comfyui(comfy_path, calibrations)
        training: dict = {}
        if options.no_train:
            checkpoint = untrained_checkpoint(cache_dir)
        else:
            checkpoint, training = trained_checkpoint(comfy_path, modules, recipe, cache_dir, options.retrain,
                                                      options.threads)
            if training:
                print(f"test model: {checkpoint} (training took {training.get('seconds', '?')} s: "
                      f"{training.get('summary', '').splitlines()[0] if training.get('summary') else ''})")
        with torch.inference_mode():  # as ComfyUI runs nodes
            results, info = measure(modules, checkpoint, recipe, setup, magcache_settings, easycache_thresholds)
    rows = print_report(results, info, training, recipe, setup, trained=not options.no_train)
    print(f"\nsampling and measuring took {info['seconds']} s")
    if options.plot:
        save_plot(results, options.plot, f"tiny Wan 2.1, {setup.steps} steps {setup.sampler}, cfg {setup.cfg:g}, "
                                          f"{info['videos']} videos")
        print(f"plot: {options.plot}")
    if options.json:
        payload = {
            "recipe": dataclasses.asdict(recipe), "sampling": dataclasses.asdict(setup), "info": info,
            "trained": not options.no_train,
            "results": [{"method": m.method, "setting": m.setting, "threshold": m.threshold, "K": m.K, "calls": m.calls,
                         "total_calls": m.total_calls, "saved": m.saved, "psnr": m.psnr, "worst_psnr": m.worst_psnr,
                         "mse": m.mse, "latent_error": m.latent_error} for m in results],
            "comparisons": rows,
        }
        Path(options.json).write_text(json.dumps(payload, indent=1, allow_nan=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
