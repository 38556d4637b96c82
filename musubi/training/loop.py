"""The LoRA training loop: flow matching on cached latents, with checkpoints that resume exactly.

One optimizer step: for each of ``gradient_accumulation_steps`` batches, draw noise ε and noise
levels t (seeded), build ``x_t = (1 − t)·x0 + t·ε``, let the adapter predict the velocity, take
the per-sample mean squared error against ``ε − x0`` in float32, weight each sample
(``weighting_scheme``) and average; then clip, step the optimizer and the lr schedule once.

Everything that decides what happens next is part of a checkpoint's state folder: LoRA weights,
optimizer, lr schedule, all random states (torch, CUDA, python, numpy and the trainer's noise-level
generator), and the position in the data. The batch order of an epoch is drawn from a generator
seeded by (seed, epoch) and each sample's noise ε from one seeded by (seed, step, batch, row), so
training 2N steps gives the same LoRA as N steps, a resume, and N more.
A state is read completely before anything is restored; ``resume_from="latest"`` falls back past
states that do not read to the newest one that does, and the result names what it skipped.

Several processes (``accelerate launch --num_processes N``, data parallel): a batch holds
``batch_size × N`` items, and each process trains its shard of every batch (rows r, r + N, …).
What a batch draws — its items, noise levels and each sample's noise — depends on the batch and
the seed alone, never on which process trains a row, and each process's loss is its rows' share of
the batch mean, so the summed gradients are exactly the gradient of the whole batch: N processes ×
batch_size B train the same LoRA as one process × batch_size N·B (up to float rounding). Only the
main process writes files, logs and reports progress; a state saved by N processes resumes in any
number of them.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..lora import formats as lora_formats
from ..compile import compile_for_training
from ..errors import MusubiError
from ..files import write_folder_atomically
from .expert_pair import same_expert_noise_levels
from .schedulers import build_lr_scheduler
from .adapter import check_adapter
from .checkpoints import (
    NETWORK_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    SCALER_FILE,
    SCHEDULER_FILE,
    STATE_FORMAT,
    TRAINER_STATE_FILE,
    SavedState,
    checkpoint_path,
    final_lora_path,
    last_good_checkpoint,
    prune_checkpoints,
    read_newest_state,
    read_state,
    state_dir_path,
    state_root,
    state_roots,
    write_json,
)
from .settings import DEFAULT_TRACKER_NAME, TrainSettings, plain_value
from .optimizers import build_optimizer, eval_mode, group_learning_rates, is_schedule_free, set_train_mode
from .timesteps import apply_loss_weights, loss_weights, sample_noise_levels, stratified_uniforms
from .validation import ValidationSet

logger = logging.getLogger(__name__)

HISTOGRAM_EVERY_N_STEPS = 50  # timestep histogram cadence (and once at the end)


# --- results and callbacks ---------------------------------------------------------------------


@dataclass
class TrainResult:
    """What one call of :meth:`Trainer.train` did."""

    global_step: int  # optimizer steps done in total, including those before a resume
    start_step: int  # the step this call started from (0, or the resumed state's step)
    total_steps: int
    losses: list[float] = field(default_factory=list)  # one per step of this call
    checkpoints: list[str] = field(default_factory=list)  # LoRA files saved by this call
    state_dirs: list[str] = field(default_factory=list)  # state folders saved by this call
    final_lora_path: str | None = None
    interrupted: bool = False
    is_main_process: bool = True  # False on the other processes of a multi-GPU run (they write nothing)
    resumed_from: str | None = None  # the state folder this call continued from
    skipped_states: list[str] = field(default_factory=list)  # newer states that could not be read, and why
    resume_changes: list[str] = field(default_factory=list)  # "name old → new" of what differs from that state
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step (saving excluded)
    sync_seconds: list[float] = field(default_factory=list)  # of that, time in collective calls (several processes)
    validation: list[dict] = field(default_factory=list)  # ValidationResult.as_dict() of each evaluation, in order
    validation_seconds: float = 0.0  # wall time of those evaluations (not part of step_seconds)

    @property
    def last_state_dir(self) -> str | None:
        return self.state_dirs[-1] if self.state_dirs else None


class TrainCallbacks:
    """Hooks into a run; override what you need.

    ``should_stop`` is asked after every optimizer step (on every process; the main process's
    answer counts). The others are called on the main process only.
    """

    def on_start(self, start_step: int, total_steps: int) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def on_step(self, step: int, loss: float, lrs: dict[str, float]) -> None:
        """After optimizer step ``step`` (from 1): its loss and the learning rates it used."""

    def on_checkpoint(self, path: str) -> None:
        """After a LoRA file (a checkpoint or the final LoRA) was written."""

    def on_validation(self, step: int, result) -> None:
        """After the validation data was scored with the LoRA of step ``step`` (a ValidationResult)."""


@dataclass
class _Progress:
    global_step: int = 0
    epoch: int = 0  # epochs completed
    position: int = 0  # batches of the current epoch consumed (by all processes together)


# --- the trainer -------------------------------------------------------------------------------


class Trainer:
    """Trains ``network`` (a LoRA attached to ``adapter.lora_root()``) on ``dataset``."""

    def __init__(self, adapter, network, dataset, settings: TrainSettings, callbacks: TrainCallbacks | None = None,
                 validation_data=None):
        self.adapter = check_adapter(adapter)
        self.network = network
        self.dataset = dataset
        self.settings = settings.validate()
        self.callbacks = callbacks if callbacks is not None else TrainCallbacks()
        if len(dataset) == 0:
            raise MusubiError("the dataset has no items.")
        dataset_architecture = getattr(dataset, "architecture", None)
        if dataset_architecture and dataset_architecture != adapter.architecture:
            raise MusubiError(
                f"the latent cache was made for '{dataset_architecture}' but the model is '{adapter.architecture}'; "
                "cache the latents with this model's VAE and text encoder."
            )
        if not list(network.parameters()):
            raise MusubiError("the LoRA network has no trainable parameters.")
        if getattr(network, "loraplus_lr_ratio", None) == 0:
            raise MusubiError(
                "loraplus_lr_ratio is 0: the lora_up weights would get learning rate 0 and stay at zero, so the LoRA "
                "would never change; leave it unset (no LoRA+) or use e.g. 4 to 16."
            )
        self.validation = None
        if validation_data is not None:  # scored with its own fixed plan; never touches what training draws
            self.validation = ValidationSet(validation_data, self.settings.validation_timesteps,
                                            self.settings.validation_bands, self.settings.validation_seed)
            self.validation.check_matches(dataset, adapter.architecture)
        elif self.settings.validate_every_n_steps:
            raise MusubiError("validate_every_n_steps is set but there is no validation data; give validation data "
                              "(validation_data_dir, or Validation Data in ComfyUI) or unset it.")
        twin_roots = getattr(adapter, "twin_lora_roots", None)
        for root in twin_roots() if callable(twin_roots) else []:
            network.attach_twin(root)  # e.g. Wan 2.2 A14B: one LoRA shared by both experts

    # --- public ---------------------------------------------------------------------------------

    def train(self, resume_from: str | None = None) -> TrainResult:
        """Train until the step budget is spent or a callback asks to stop.

        ``resume_from``: a state folder, or ``"latest"`` for the newest one of this output_name in
        state_dir or output_dir that reads completely (training starts fresh when there is none).
        Folders are created when their first file is written, so a run that fails early leaves none.
        """
        accelerator = _make_accelerator(self.settings)
        try:
            return self._train(accelerator, resume_from)
        finally:
            if getattr(self, "compiled", None) is not None:
                self.compiled.remove()  # the model computes eagerly again
            accelerator.end_training()

    # --- the loop -------------------------------------------------------------------------------

    def _train(self, accelerator, resume_from: str | None) -> TrainResult:
        settings, network, adapter = self.settings, self.network, self.adapter
        self.accelerator = accelerator
        rank, world = accelerator.process_index, accelerator.num_processes
        device = accelerator.device

        loaded, skipped = self._resolve_resume(resume_from)
        self.resumed_from = None if loaded is None else os.path.abspath(loaded.folder)
        self.resumed_step = None if loaded is None else loaded.step
        self.state_saved_at = None
        saved = loaded.trainer_state if loaded is not None else None
        seed = self._choose_seed(saved)
        self.seed = seed
        if saved is None:
            _seed_global_rngs(seed, rank)

        self.global_batch_size = settings.batch_size * world  # every process trains its shard of each batch
        batches_per_epoch = self.dataset.num_batches(self.global_batch_size)
        self.steps_per_epoch = -(-batches_per_epoch // settings.gradient_accumulation_steps)
        if settings.max_train_epochs is not None:
            total_steps = settings.max_train_epochs * self.steps_per_epoch
        else:
            total_steps = settings.max_train_steps
        self.total_steps = total_steps
        self.batches_per_epoch = batches_per_epoch

        mover = getattr(adapter, "to_device", None)
        if callable(mover):
            mover(device)
        adapter.lora_root().requires_grad_(False)
        adapter.set_gradient_checkpointing(settings.gradient_checkpointing)
        network.to(device)
        network.train()
        if loaded is not None:
            self._restore_network(loaded)
        self.compiled = compile_for_training(adapter, network, settings)  # LoRA hooks attached: they are traced too

        optimizer, self.optimizer_description = build_optimizer(
            settings.optimizer_type, network.param_groups(settings.learning_rate), settings.learning_rate, settings.optimizer_args
        )
        scheduler = build_lr_scheduler(
            settings.lr_scheduler, optimizer, total_steps, settings.lr_warmup_steps, settings.lr_decay_steps,
            settings.lr_scheduler_num_cycles, settings.lr_scheduler_power, settings.lr_scheduler_min_lr_ratio,
            settings.lr_scheduler_args, settings.lr_scheduler_timescale,
        )
        # Draws the noise levels of every batch; seeded alike on every process, so all draw the same.
        noise_generator = torch.Generator().manual_seed(_derive_seed(seed, "noise", 0))
        progress = _Progress()
        recent_losses: collections.deque[float] = collections.deque(maxlen=max(1, self.steps_per_epoch))
        resume_changes: list[str] = []
        if loaded is not None:
            resume_changes = self._resume_changes(loaded)
            progress = self._restore(loaded, optimizer, scheduler, noise_generator, recent_losses)
            del loaded  # the state's tensors now live in the network and the optimizer
        self.optimizer, self.scheduler, self.noise_generator = optimizer, scheduler, noise_generator
        prepared = accelerator.prepare(optimizer)
        set_train_mode(optimizer)

        self.started_at = time.time()
        self.session_id = random.Random().randrange(2**31)
        result = TrainResult(global_step=progress.global_step, start_step=progress.global_step, total_steps=total_steps,
                             is_main_process=accelerator.is_main_process, resumed_from=self.resumed_from,
                             skipped_states=skipped, resume_changes=resume_changes)
        if accelerator.is_main_process:
            _init_trackers(accelerator, settings, self._hyperparameters())
            _call(self.callbacks, "on_start", progress.global_step, total_steps)
        if self.validation is not None and progress.global_step == 0:
            self._validate(0, result)  # the baseline the trained LoRA is measured against

        trainable = [param for param in network.parameters() if param.requires_grad]
        histogram: list[torch.Tensor] = []
        planned_epoch = None
        while progress.global_step < total_steps:
            if planned_epoch != progress.epoch:
                plan, uniforms = self._epoch_plan(progress.epoch)
                planned_epoch = progress.epoch
            if progress.position >= len(plan):  # the data shrank since the state was saved
                progress.epoch, progress.position = progress.epoch + 1, 0
                continue
            step_epoch = progress.epoch + 1
            group = plan[progress.position: progress.position + settings.gradient_accumulation_steps]
            step = progress.global_step + 1
            micro_losses = []
            step_started, self.sync_time = time.perf_counter(), 0.0
            for micro, (batch_number, indices) in enumerate(group):
                u = None if uniforms is None else uniforms[batch_number][: len(indices)]
                loss, loss_value, noise_levels = self._micro_step(indices, u, noise_generator, step, micro)
                if loss is not None:  # None: this process has no row of a short batch
                    accelerator.backward(loss / len(group))
                micro_losses.append(loss_value)
                if accelerator.is_main_process and accelerator.trackers:
                    histogram.append(noise_levels)
            step_loss = sum(micro_losses) / len(micro_losses)
            self._optimizer_step(prepared, trainable, step)
            lrs = group_learning_rates(optimizer)
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            prepared.zero_grad(set_to_none=True)
            result.step_seconds.append(time.perf_counter() - step_started)
            result.sync_seconds.append(self.sync_time)

            progress.global_step = step
            progress.position += len(group)
            epoch_done = progress.position >= len(plan)
            if epoch_done:
                progress.epoch, progress.position = progress.epoch + 1, 0
            result.global_step = step
            result.losses.append(step_loss)
            recent_losses.append(step_loss)
            self._log_step(step, step_loss, recent_losses, lrs, histogram)
            every = settings.validate_every_n_steps
            if self.validation is not None and (step == total_steps or (every and step % every == 0)):
                self._validate(step, result)

            periodic = bool(settings.save_every_n_steps and step % settings.save_every_n_steps == 0)
            periodic |= bool(epoch_done and settings.save_every_n_epochs and progress.epoch % settings.save_every_n_epochs == 0)
            stop = step < total_steps and self._stop_requested()
            if periodic or stop:
                self._save_checkpoint(progress, recent_losses, result, step_epoch, with_state=settings.save_state or stop)
            if stop:
                self._flush_histogram(histogram, step)
                result.interrupted = True
                logger.info("Stopped at step %d on request; resume from %s.", step, result.last_state_dir)
                return result

        self._flush_histogram(histogram, progress.global_step)
        self._save_final(progress, recent_losses, result)
        return result

    def _micro_step(self, indices: list[int], u, noise_generator: torch.Generator, step: int, micro: int):
        """Forward this process's shard of one batch; returns its loss (its rows' share of the batch's
        weighted float32 mean; None when it has no row), the batch's loss summed over the processes
        as a float, and the batch's noise levels."""
        accelerator, settings = self.accelerator, self.settings
        world, rank = accelerator.num_processes, accelerator.process_index
        count = len(indices)
        rows = list(range(rank, count, world))
        shard = self.dataset.collate([self.dataset[indices[row]] for row in rows]) if rows else {}
        shard = {key: value.to(accelerator.device) for key, value in shard.items()}
        latents = shard.pop("latents").float() if rows else None
        latent_hw = self._latent_hw(indices[0], latents)
        noise_levels = sample_noise_levels(settings.timesteps, count, latent_hw=latent_hw, generator=noise_generator, u=u)
        boundary = getattr(self.adapter, "expert_boundary", None)
        if boundary is not None and count > 1:  # one expert per batch (Wan 2.2 A14B)
            noise_levels = same_expert_noise_levels(
                noise_levels, boundary, lambda: sample_noise_levels(settings.timesteps, 1, latent_hw=latent_hw, generator=noise_generator)
            )
        loss = None
        contribution = torch.zeros((), device=accelerator.device)
        if rows:
            noise = torch.stack([self._sample_noise(latents.shape[1:], step, micro, row) for row in rows]).to(accelerator.device)
            t = noise_levels[rows].to(accelerator.device)
            noisy = noisy_latents(latents, noise, t)
            target = self.adapter.velocity_target(latents, noise)
            with accelerator.autocast():
                prediction = self.adapter.predict_velocity(noisy, t, shard)
            loss = flow_matching_loss(prediction, target, loss_weights(settings.timesteps, noise_levels[rows]).to(accelerator.device))
            if len(rows) != count:
                loss = loss * (len(rows) / count)  # this shard's share of the batch mean
            contribution = loss.detach()
        loss_value = self._sum_over_processes(contribution.reshape(1)).item()
        if not math.isfinite(loss_value):
            self._raise_not_finite(step, "loss")
        return loss, loss_value, noise_levels

    def _validate(self, step: int, result: TrainResult) -> None:
        """Score the validation data with the LoRA as it is after ``step`` (main process; the others wait)."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            with self.evaluating():
                scored = self.validation.evaluate(self.adapter, self.settings.timesteps, step, self.settings.batch_size,
                                                  accelerator.device, accelerator.autocast)
            result.validation.append(scored.as_dict())
            result.validation_seconds += scored.seconds
            if accelerator.trackers:
                logs = {"validation/mean": scored.mean}
                logs.update({f"validation/band_{number}": value for number, value in enumerate(scored.bands, 1)})
                accelerator.log(logs, step=step)
            _call(self.callbacks, "on_validation", step, scored)
        if accelerator.num_processes > 1:
            accelerator.wait_for_everyone()

    def _latent_hw(self, index: int, latents: torch.Tensor | None) -> tuple[int, int]:
        """The batch's latent height and width (the resolution-dependent shifts use them), from the
        dataset's plan where it tells them, so a process without a row of the batch knows them too."""
        shape_of = getattr(self.dataset, "latent_shape", None)
        if callable(shape_of):
            return tuple(shape_of(index)[-2:])
        if latents is None:
            raise MusubiError("the dataset does not tell its items' latent shapes (latent_shape(index)), which a "
                              "multi-process run needs; use a LatentCacheDataset.")
        return tuple(latents.shape[-2:])

    def _sample_noise(self, shape, step: int, micro: int, row: int) -> torch.Tensor:
        """The noise ε of row ``row`` of batch ``micro`` of optimizer step ``step``: the same on any process."""
        generator = torch.Generator().manual_seed(_derive_seed(self.seed, "noise", step, micro, row))
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)

    def _sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor.float().sum()
        started = time.perf_counter()
        total = self.accelerator.reduce(tensor.float(), reduction="sum").sum()
        self.sync_time += time.perf_counter() - started
        return total

    def _optimizer_step(self, prepared, trainable: list[torch.nn.Parameter], step: int) -> None:
        accelerator = self.accelerator
        if accelerator.num_processes > 1:
            started = time.perf_counter()
            for param in trainable:
                if param.grad is None:  # e.g. a process without a row in this step's batches
                    param.grad = torch.zeros_like(param)
            # Each process's loss is its share of the batch mean, so the sum is the whole batch's gradient.
            for bucket in _gradient_buckets(trainable):
                flat = accelerator.reduce(torch.cat([param.grad.reshape(-1) for param in bucket]), reduction="sum")
                offset = 0
                for param in bucket:
                    param.grad.copy_(flat[offset: offset + param.numel()].view_as(param.grad))
                    offset += param.numel()
            self.sync_time += time.perf_counter() - started
        norm = None
        if self.settings.max_grad_norm > 0:
            norm = accelerator.clip_grad_norm_(trainable, self.settings.max_grad_norm)
        if accelerator.scaler is None:  # with a grad scaler, steps with inf/nan gradients are skipped instead
            if norm is None:
                grads = [param.grad.detach().float().norm() for param in trainable if param.grad is not None]
                norm = torch.stack(grads).norm() if grads else torch.zeros(())
            if not math.isfinite(float(norm)):
                self._raise_not_finite(step, "gradient")
        prepared.step()

    def _raise_not_finite(self, step: int, what: str) -> None:
        last = last_good_checkpoint(self.settings, step)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
        raise MusubiError(
            f"the {what} became NaN/inf at step {step}; training stopped before the weights were changed "
            f"({where}). Lower learning_rate, or train in full precision (mixed_precision = 'no') or "
            "with bf16 instead of fp16 (fp16 overflows easily), or lower max_grad_norm."
        )

    def _stop_requested(self) -> bool:
        stop = bool(_call(self.callbacks, "should_stop", default=False))
        if self.accelerator.num_processes > 1:  # the main process's answer counts
            flag = torch.tensor([1.0 if stop and self.accelerator.is_main_process else 0.0], device=self.accelerator.device)
            stop = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        return stop

    # --- data -----------------------------------------------------------------------------------

    def _epoch_plan(self, epoch: int) -> tuple[list[tuple[int, list[int]]], torch.Tensor | None]:
        """An epoch's (batch number, item indices) list — the same on every process, which each
        trains its shard of — and the epoch's stratified uniforms (row j for batch number j) when
        num_timestep_buckets is set."""
        generator = torch.Generator().manual_seed(_derive_seed(self.seed, "epoch", epoch))
        batches = self.dataset.batches(self.global_batch_size, generator)
        uniforms = None
        buckets = self.settings.timesteps.num_timestep_buckets
        if buckets:
            size = self.global_batch_size
            uniforms = stratified_uniforms(buckets, len(batches) * size, generator).reshape(len(batches), size)
        return list(enumerate(batches)), uniforms

    # --- logging --------------------------------------------------------------------------------

    def _log_step(self, step: int, loss: float, recent_losses, lrs: dict[str, float], histogram: list[torch.Tensor]) -> None:
        accelerator = self.accelerator
        if not accelerator.is_main_process:
            return
        if accelerator.trackers:
            logs = {"loss/current": loss, "loss/average": sum(recent_losses) / len(recent_losses)}
            logs.update({f"lr/{name}": value for name, value in lrs.items()})
            accelerator.log(logs, step=step)
            if step % HISTOGRAM_EVERY_N_STEPS == 0:
                self._flush_histogram(histogram, step)
        _call(self.callbacks, "on_step", step, loss, lrs)

    def _flush_histogram(self, histogram: list[torch.Tensor], step: int) -> None:
        if not histogram or not self.accelerator.is_main_process:
            return
        timesteps = (torch.cat(histogram) * 1000).numpy()
        histogram.clear()
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.tracker.add_histogram("timesteps", timesteps, global_step=step)
            elif tracker.name == "wandb":
                import wandb

                tracker.tracker.log({"timesteps": wandb.Histogram(timesteps)}, step=step)

    def _hyperparameters(self) -> dict[str, Any]:
        values = {}
        for key, value in _flatten(self.settings.to_dict()).items():
            if value is None:
                continue
            values[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
        values["seed"] = self.seed
        values["total_steps"] = self.total_steps
        return values

    # --- saving ---------------------------------------------------------------------------------

    def _save_checkpoint(self, progress: _Progress, recent_losses, result: TrainResult, step_epoch: int, with_state: bool) -> None:
        """A LoRA file ``<name>-stepNNNNNN.safetensors`` and (with_state) its state folder."""
        settings, step = self.settings, progress.global_step
        rng_states = self._gather_rng_states() if with_state else None
        if with_state:
            self.state_saved_at = step  # known to every process, unlike the paths in result
        if self.accelerator.is_main_process:
            try:
                if with_state:
                    path = state_dir_path(state_root(settings), settings.output_name, step)
                    self._write_state(path, progress, recent_losses, rng_states)
                    result.state_dirs.append(path)
                lora_path = checkpoint_path(settings.output_dir, settings.output_name, step)
                os.makedirs(settings.output_dir, exist_ok=True)
                self._write_lora(lora_path, step, step_epoch)
                result.checkpoints.append(lora_path)
            except OSError as error:
                raise MusubiError(f"could not write the checkpoint of step {step} in {settings.output_dir} "
                                  f"(states in {state_root(settings)}): {error}. "
                                  "Free disk space or check the folder's permissions.") from error
            if settings.save_last_n_checkpoints:
                prune_checkpoints(settings.output_dir, settings.output_name, settings.save_last_n_checkpoints, step,
                                  state_roots(settings))
            _call(self.callbacks, "on_checkpoint", lora_path)
        self.accelerator.wait_for_everyone()

    def _save_final(self, progress: _Progress, recent_losses, result: TrainResult) -> None:
        settings, step = self.settings, progress.global_step
        path = state_dir_path(state_root(settings), settings.output_name, step)
        need_state = settings.save_state and self.state_saved_at != step and self.resumed_step != step
        rng_states = self._gather_rng_states() if need_state else None
        if self.accelerator.is_main_process:
            final = final_lora_path(settings.output_dir, settings.output_name)
            try:
                if need_state:
                    self._write_state(path, progress, recent_losses, rng_states)
                    result.state_dirs.append(path)
                os.makedirs(settings.output_dir, exist_ok=True)
                self._write_lora(final, step, max(1, math.ceil(step / max(1, self.steps_per_epoch))))
            except OSError as error:
                raise MusubiError(f"could not write the final LoRA to {settings.output_dir}: {error}. "
                                  "Free disk space or check the folder's permissions.") from error
            if settings.save_last_n_checkpoints and need_state:
                prune_checkpoints(settings.output_dir, settings.output_name, settings.save_last_n_checkpoints, step,
                                  state_roots(settings))
            result.final_lora_path = final
            _call(self.callbacks, "on_checkpoint", final)
        self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def evaluating(self):
        """The LoRA as a saved file would hold it now, for a callback that evaluates it (samples):
        network in eval mode (no dropout), schedule-free averaged weights, no autograd, and
        afterwards the training weights, modes and every random stream exactly as they were."""
        was_training = self.network.training
        saved = None
        if is_schedule_free(self.optimizer):
            saved = {key: value.detach().clone() for key, value in self.network.state_dict().items()}
        switch = eval_mode(self.optimizer) if saved is not None else contextlib.nullcontext()
        try:
            with preserved_random_state(), torch.no_grad(), switch:
                self.network.eval()
                yield self.network
        finally:
            self.network.train(was_training)
            if saved is not None:
                with torch.no_grad():
                    for key, value in self.network.state_dict(keep_vars=True).items():
                        value.copy_(saved[key])

    def _write_lora(self, path: str, step: int, epoch: int) -> None:
        """The LoRA as inference sees it: schedule-free optimizers switch to their averaged weights
        for the write, and the training weights are put back exactly afterwards."""
        settings = self.settings
        metadata = self._metadata(step, epoch)
        if is_schedule_free(self.optimizer):
            training_weights = {key: value.detach().clone() for key, value in self.network.state_dict().items()}
            with eval_mode(self.optimizer):
                lora_formats.save_lora(self.network, path, format=settings.lora_format, dtype=settings.save_dtype, metadata=metadata)
            with torch.no_grad():
                for key, value in self.network.state_dict(keep_vars=True).items():
                    value.copy_(training_weights[key])
        else:
            lora_formats.save_lora(self.network, path, format=settings.lora_format, dtype=settings.save_dtype, metadata=metadata)

    def _write_state(self, path: str, progress: _Progress, recent_losses, rng_states: list[dict]) -> None:
        settings = self.settings
        trainer_state = {
            "format": STATE_FORMAT,
            "global_step": progress.global_step,
            "epoch": progress.epoch,
            "position": progress.position,
            "seed": self.seed,
            "total_steps": self.total_steps,
            "num_processes": self.accelerator.num_processes,
            "global_batch_size": self.global_batch_size,
            "dataset_size": len(self.dataset),
            "batches_per_epoch": self.batches_per_epoch,
            "settings": settings.to_dict(),
            "settings_hash": settings.settings_hash(),
            "recent_losses": list(recent_losses),
            "saved_at": time.time(),
        }
        files: dict[str, Callable[[str], None]] = {
            NETWORK_FILE: lambda file: save_file(
                {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in self.network.state_dict().items()}, file
            ),
            OPTIMIZER_FILE: lambda file: torch.save(self.optimizer.state_dict(), file),
            SCHEDULER_FILE: lambda file: torch.save(self.scheduler.state_dict(), file),
            RNG_FILE: lambda file: torch.save(rng_states, file),
        }
        if self.accelerator.scaler is not None:
            files[SCALER_FILE] = lambda file: torch.save(self.accelerator.scaler.state_dict(), file)
        files[TRAINER_STATE_FILE] = lambda file: write_json(file, trainer_state)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_folder_atomically(path, files)

    def _metadata(self, step: int, epoch: int) -> dict[str, str]:
        settings, network, timesteps = self.settings, self.network, self.settings.timesteps
        values = {
            "session_id": self.session_id,
            "training_started_at": self.started_at,
            "output_name": settings.output_name,
            "learning_rate": settings.learning_rate,
            "num_train_items": len(self.dataset),
            "num_batches_per_epoch": self.batches_per_epoch,
            "num_epochs": math.ceil(self.total_steps / max(1, self.steps_per_epoch)),
            "gradient_checkpointing": settings.gradient_checkpointing,
            "gradient_accumulation_steps": settings.gradient_accumulation_steps,
            "max_train_steps": self.total_steps,
            "lr_warmup_steps": settings.lr_warmup_steps,
            "lr_scheduler": settings.lr_scheduler,
            "network_dropout": getattr(network, "dropout", None),
            "mixed_precision": settings.mixed_precision,
            "seed": self.seed,
            "training_comment": settings.training_comment,
            "optimizer": self.optimizer_description,
            "max_grad_norm": settings.max_grad_norm,
            "batch_size": settings.batch_size,
            "weighting_scheme": timesteps.weighting_scheme,
            "logit_mean": timesteps.logit_mean,
            "logit_std": timesteps.logit_std,
            "mode_scale": timesteps.mode_scale,
            "timestep_sampling": timesteps.timestep_sampling,
            "sigmoid_scale": timesteps.sigmoid_scale,
            "discrete_flow_shift": timesteps.discrete_flow_shift,
            "training_finished_at": time.time(),
            "steps": step,
            "epoch": epoch,
        }
        timestep_range = None
        if timesteps.min_timestep is not None or timesteps.max_timestep is not None:
            low = 0 if timesteps.min_timestep is None else timesteps.min_timestep
            high = 1000 if timesteps.max_timestep is None else timesteps.max_timestep
            timestep_range = (low, high)
        return lora_formats.training_metadata(
            network.preset, network.network_dim, network.network_alpha,
            network_args=lora_formats.network_args_of(network), network_module=getattr(network, "network_module", None),
            values=values, title=settings.metadata_title or settings.output_name, timestamp=self.started_at,
            author=settings.metadata_author, description=settings.metadata_description,
            license=settings.metadata_license, tags=settings.metadata_tags, timestep_range=timestep_range,
        )

    def _gather_rng_states(self) -> list[dict]:
        from accelerate.utils import gather_object

        return gather_object([_capture_rng_state(self.noise_generator)])

    # --- resuming -------------------------------------------------------------------------------

    def _resolve_resume(self, resume_from: str | None) -> tuple[SavedState | None, list[str]]:
        """The state to continue from, read completely, and a line for each newer state skipped.

        ``"latest"`` takes the newest state that reads (state_dir first, then states an older layout
        left in output_dir); a state folder given by name must read, or the error names its file.
        """
        settings = self.settings
        if resume_from is None or resume_from == "":
            return None, []
        if resume_from == "latest":
            loaded, skipped = read_newest_state(settings.output_dir, settings.output_name, state_roots(settings))
            if loaded is None:
                logger.info("resume = 'latest': no state of '%s' in %s yet; starting fresh.", settings.output_name,
                            " or ".join(state_roots(settings)))
            elif skipped:
                logger.warning("resume = 'latest': continuing from %s (step %d); skipped newer states: %s",
                               loaded.folder, loaded.step, "; ".join(skipped))
            return loaded, skipped
        if os.path.isfile(resume_from):
            raise MusubiError(f"resume: {resume_from} is a file; give its state folder '<name>-stepNNNNNN-state' or 'latest'.")
        if not os.path.isdir(resume_from):
            raise MusubiError(f"resume: state folder {resume_from} not found; give a '<name>-stepNNNNNN-state' folder or 'latest'.")
        if not os.path.isfile(os.path.join(resume_from, TRAINER_STATE_FILE)):
            raise MusubiError(f"resume: {resume_from} is not a complete training state (no {TRAINER_STATE_FILE}).")
        return read_state(resume_from), []

    def _choose_seed(self, saved: dict | None) -> int:
        requested = self.settings.seed
        if saved is not None:
            if requested is not None and requested != saved["seed"]:
                warnings.warn(f"resume: the state was trained with seed {saved['seed']}; it is kept (seed {requested} ignored).", stacklevel=4)
            return int(saved["seed"])
        return requested if requested is not None else random.SystemRandom().randrange(2**32)

    def _restore_network(self, loaded: SavedState) -> None:
        weights = loaded.network
        current = {key: tuple(value.shape) for key, value in self.network.state_dict().items()}
        stored = {key: tuple(value.shape) for key, value in weights.items()}
        if current != stored:
            differing = sorted(set(current) ^ set(stored)) or sorted(k for k in current if current[k] != stored[k])
            raise MusubiError(
                f"resume: the state in {loaded.folder} holds a LoRA of another layout ({', '.join(differing[:4])} …); "
                "network_type, network_dim, network_args and the model must be those of the interrupted run."
            )
        self.network.load_state_dict(weights)

    def _restore(self, loaded: SavedState, optimizer, scheduler, noise_generator, recent_losses) -> _Progress:
        accelerator, state_dir, saved = self.accelerator, loaded.folder, loaded.trainer_state
        try:
            optimizer.load_state_dict(loaded.optimizer)
        except (ValueError, KeyError, RuntimeError, TypeError) as error:
            raise MusubiError(f"resume: the optimizer state in {state_dir} does not fit this optimizer ({error}); "
                              "optimizer_type, optimizer_args and network_args must be those of the interrupted run.") from error
        scheduler_state = dict(loaded.scheduler)
        if "lr_lambdas" in scheduler_state:
            # The schedule's shape comes from the current settings (a longer run may have been asked for).
            scheduler_state["lr_lambdas"] = [None] * len(scheduler_state["lr_lambdas"])
        scheduler.load_state_dict(scheduler_state)
        if accelerator.scaler is not None and loaded.scaler is not None:
            accelerator.scaler.load_state_dict(loaded.scaler)
        rank = accelerator.process_index
        _restore_rng_state(loaded.rng[rank % len(loaded.rng)], noise_generator)
        recent_losses.extend(saved.get("recent_losses", []))
        logger.info("Resumed from %s at step %d.", state_dir, saved["global_step"])
        position = int(saved["position"])
        before = saved.get("batches_per_epoch")
        if position and before and before != self.batches_per_epoch:
            # Batches of another size (another number of processes, say): continue at the same share of the epoch.
            position = min(self.batches_per_epoch, position * self.batches_per_epoch // int(before))
        return _Progress(int(saved["global_step"]), int(saved["epoch"]), position)

    def _resume_changes(self, loaded: SavedState) -> list[str]:
        """What differs between the state's run and this one ("name old → new"), also warned about."""
        saved, changes = loaded.trainer_state, []
        saved_global = saved.get("global_batch_size")
        if saved_global is None:  # states written before batches were sharded: each process had whole batches
            saved_global = saved.get("settings", {}).get("batch_size")
        facts = {
            "dataset_size": len(self.dataset),
            "global_batch_size": self.global_batch_size,  # batch_size × processes
            "batches_per_epoch": self.batches_per_epoch,
        }
        saved_facts = {**saved, "global_batch_size": saved_global}
        for name, now in facts.items():
            if saved_facts.get(name) != now:
                changes.append(f"{name} {saved_facts.get(name)} → {now}")
        if saved.get("num_processes", 1) != self.accelerator.num_processes:
            logger.info("resume: the state was saved by %s process(es), this run has %d.", saved.get("num_processes", 1),
                        self.accelerator.num_processes)
        if saved.get("settings_hash") != self.settings.settings_hash():
            before = _flatten(saved.get("settings", {}))
            after = _flatten(self.settings.result_settings())
            for key, value in after.items():
                if key == "seed" and value is None:
                    continue  # no seed asked for: the state's seed is used
                if key == "batch_size" and saved_global == self.global_batch_size:
                    continue  # the same batches, split over another number of processes
                if key in before and before[key] != plain_value(value):
                    note = " (the state's seed is kept)" if key == "seed" else ""
                    changes.append(f"{key} {before[key]!r} → {value!r}{note}")
        if changes:
            warnings.warn(
                f"resume from {loaded.folder}: {'; '.join(changes)}. Training continues, but it will not match an "
                "uninterrupted run.",
                stacklevel=4,
            )
        return changes


# --- flow matching -----------------------------------------------------------------------------


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x0 + t·ε, with one t per sample."""
    t = noise_level.to(latents.dtype).reshape(-1, *([1] * (latents.dim() - 1)))
    return (1 - t) * latents + t * noise


def flow_matching_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over samples of (per-sample mean squared error × the sample's weight), in float32."""
    error = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_sample = error.reshape(error.shape[0], -1).mean(dim=1)
    return apply_loss_weights(per_sample, weights.float()).mean()


GRADIENT_BUCKET_ELEMENTS = 1 << 25  # 128 MiB of float32 per all-reduce call


def _gradient_buckets(params: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """The parameters in groups of one dtype and device, each up to GRADIENT_BUCKET_ELEMENTS: one
    all-reduce per group instead of one per tensor (a LoRA has hundreds of small tensors, and each
    collective call costs a round of latency)."""
    buckets: list[list[torch.nn.Parameter]] = []
    open_buckets: dict[tuple, tuple[list, int]] = {}
    for param in params:
        key = (param.grad.dtype, param.grad.device)
        bucket, size = open_buckets.get(key, (None, 0))
        if bucket is None or size + param.numel() > GRADIENT_BUCKET_ELEMENTS:
            bucket, size = [], 0
            buckets.append(bucket)
        bucket.append(param)
        open_buckets[key] = (bucket, size + param.numel())
    return buckets


def _flatten(values: dict) -> dict[str, Any]:
    """Settings values with the nested timestep options lifted to the top level."""
    flat = {key: value for key, value in values.items() if key != "timesteps"}
    flat.update(values.get("timesteps", {}))
    return flat


# --- random state ------------------------------------------------------------------------------


def _derive_seed(seed: int, *parts: Any) -> int:
    """A seed for one purpose (noise of process r, data order of epoch e) from the run's seed."""
    digest = hashlib.sha256(repr((int(seed),) + parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _seed_global_rngs(seed: int, rank: int) -> None:
    value = _derive_seed(seed, "global", rank)
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)


@contextlib.contextmanager
def preserved_random_state():
    """Every global random stream (torch CPU and CUDA, Python, NumPy) is put back afterwards:
    samplers reseed the global torch generator, and training must draw exactly what it would have."""
    state = _capture_rng_state()
    try:
        yield
    finally:
        _restore_rng_state(state)


def _capture_rng_state(noise_generator: torch.Generator | None = None) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if noise_generator is not None:
        state["noise"] = noise_generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(state: dict[str, Any], noise_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if noise_generator is not None:
        noise_generator.set_state(state["noise"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)


# --- accelerate --------------------------------------------------------------------------------


def tracker_names(settings: TrainSettings) -> list[str]:
    """The trackers a run logs to: log_with, or TensorBoard when only logging_dir is given."""
    log_with = settings.log_with or ("tensorboard" if settings.logging_dir else None)
    return {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"], None: []}[log_with]


def _make_accelerator(settings: TrainSettings):
    """An Accelerator for this run. In a single process the shared accelerate state is reset
    first, so several runs in one process (ComfyUI, tests) may differ in mixed precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    trackers = tracker_names(settings)
    if "tensorboard" in trackers and importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        raise MusubiError("TensorBoard logging needs the tensorboard package: pip install tensorboard (or unset log_with/logging_dir).")
    if "wandb" in trackers and importlib.util.find_spec("wandb") is None:
        raise MusubiError(f"log_with {settings.log_with!r} needs the wandb package: pip install wandb, or use log_with = 'tensorboard'.")
    project_dir = None
    if settings.logging_dir:
        project_dir = os.path.join(settings.logging_dir, (settings.log_prefix or "") + time.strftime("%Y%m%d%H%M%S"))
        os.makedirs(project_dir, exist_ok=True)
        if "wandb" in trackers:
            os.environ.setdefault("WANDB_DIR", project_dir)
    if PartialState._shared_state.get("num_processes", 1) == 1:  # never initialises the state itself
        AcceleratorState._reset_state()
        GradientState._reset_state()
    try:
        return Accelerator(mixed_precision=settings.mixed_precision, log_with=trackers or None, project_dir=project_dir,
                           cpu=multi_process_cpu())
    except (ValueError, RuntimeError) as error:
        raise MusubiError(f"cannot set up training with mixed_precision {settings.mixed_precision!r}: {error}") from error


def multi_process_cpu() -> bool:
    """Several processes launched (``accelerate launch``, ``torchrun``) on a machine without CUDA:
    they train on the CPU with gloo, which accelerate only does when told to."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _init_trackers(accelerator, settings: TrainSettings, hyperparameters: dict[str, Any]) -> None:
    if not accelerator.log_with:
        return
    accelerator.init_trackers(settings.log_tracker_name or DEFAULT_TRACKER_NAME, config=hyperparameters)


def _call(callbacks, name: str, *args, default=None):
    method = getattr(callbacks, name, None)
    return method(*args) if callable(method) else default
