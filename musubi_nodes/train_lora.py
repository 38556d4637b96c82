"""Train LoRA: musubi-style LoRA training on a ComfyUI MODEL, as an ordinary graph node."""

from __future__ import annotations

import dataclasses
import logging
import os

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..musubi.errors import MusubiError
from ..musubi.files import remove_leftovers
from ..musubi.training.expert_pair import ExpertPairAdapter
from ..musubi.lora.formats import from_canonical
from ..musubi.training.loss_plot import render_loss_curve
from ..musubi.lora.network import create_network
from ..musubi.training.timesteps import TimestepSettings
from ..musubi.training.loop import TrainCallbacks, Trainer
from ..musubi.training.checkpoints import plan_run
from ..musubi.training.settings import TrainSettings
from .timesteps import TimestepSettingsType
from .paths import folder_inside, model_folder_root
from .adapters import prepare_training_with_validation
from .validation_data import ValidationType, split_validation
from .adapters.training_data import training_data_from_inputs
from .framepack_train import FramePackTrainingSettings
from .adapters.sampling import check_specs
from .training_samples import SampleRunner, TrainingSamplesType
from .train_settings import CheckpointSettings, CompileSettingsType, DatasetType, NetworkSettings, OptimizerSettings

NODE = "Train LoRA"
PROGRESS_EVENT = "musubi.train.progress"
VALIDATION_EVENT = "musubi.train.validation"  # a validation loss (mean and bands) of one step
STATUS_EVENT = "musubi.train.status"  # the run's messages (new name, resume, where Cancel stopped), for the node
STATES_FOLDER = "musubi_training_states"  # under ComfyUI's output folder


class MusubiTrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiTrainLoRA",
            display_name="Train LoRA (musubi)",
            category="musubi/training",
            description="Trains a LoRA on a diffusion MODEL with musubi-tuner's method (flow-matching velocity loss, its timestep samplers, optimizers and schedules), saving checkpoints into models/loras/<output_name>/ and resume states into output/musubi_training_states/. Cancel keeps a resumable checkpoint. The MODEL output has the LoRA applied.",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=[
                io.Model.Input("model", tooltip="The model to train on (core Load Diffusion Model or Load DiT (fp8 scaled)); it stays frozen."),
                io.Latent.Input("latents", optional=True,
                                tooltip="Training samples: a batch of VAE-encoded images or videos (one per sample). Not needed with a dataset."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Captions: one conditioning for all samples, or one per sample (a batch of the same size, or that many combined conditionings). Not needed with a dataset."),
                io.Int.Input("steps", default=500, min=1, max=1_000_000, tooltip="Optimizer steps to train."),
                io.Int.Input("batch_size", default=1, min=1, max=256, tooltip="Samples per batch (samples of one batch share a latent size)."),
                io.Int.Input("gradient_accumulation_steps", default=1, min=1, max=1024, tooltip="Batches per optimizer step."),
                io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of noise, timesteps, data order and LoRA initialisation (kept between runs: an unchanged graph does not train again)."),
                io.String.Input("output_name", default="my_lora", tooltip="Name of the LoRA; its files go to models/loras/<output_name>/ (resume states to output/musubi_training_states/<output_name>/)."),
                io.Combo.Input("resume", options=["no", "latest"], default="latest",
                               tooltip="latest: continue from the newest resumable state of this output_name that loads, if there is one (after a Cancel, say); the report says from which step and what changed. no: start fresh. A fresh run never overwrites another run: when output_name already holds one, it becomes <output_name>_2 (…_3, …)."),
                io.Combo.Input("mixed_precision", options=["no", "bf16", "fp16"], default="no", tooltip="Autocast of the forward pass."),
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip="Recompute block activations in the backward pass: much less memory, about one more forward pass per step (~25 % slower)."),
                NetworkSettings.Input("network_settings", optional=True, tooltip="From LoRA Network Settings (default: rank 32, alpha 16)."),
                OptimizerSettings.Input("optimizer_settings", optional=True, tooltip="From Optimizer + LR Schedule (default: AdamW 1e-4, constant)."),
                TimestepSettingsType.Input("timestep_settings", optional=True, tooltip="From Timestep Settings (default: musubi's sigma sampling)."),
                CheckpointSettings.Input("checkpoint_settings", optional=True, tooltip="From Checkpoint + Logging Settings (default: save at the end)."),
                DatasetType.Input("dataset", optional=True,
                                  tooltip="A training dataset (images/videos with captions, encoded and cached) instead of latents + conditioning."),
                io.Model.Input("model_high_noise", optional=True,
                               tooltip="Wan 2.2 A14B: the high-noise expert (connect the low-noise expert to model). One LoRA is trained on both; each batch trains the expert its noise level belongs to."),
                io.Float.Input("timestep_boundary", default=0.875, min=0.01, max=0.99, step=0.005, optional=True,
                               tooltip="Wan 2.2 A14B: noise level where the high-noise expert takes over (t2v 0.875, i2v 0.9). Only used with model_high_noise."),
                FramePackTrainingSettings.Input("framepack_settings", optional=True,
                                                tooltip="FramePack models: from FramePack Training Settings (layout vanilla/F1/one-frame, SigLIP image embedding)."),
                CompileSettingsType.Input("compile_settings", optional=True,
                                          tooltip="From Compile Settings: torch.compile of the transformer blocks while training (default: off)."),
                io.Combo.Input("network_weights", options=["none", *folder_paths.get_filename_list("loras")], default="none",
                               optional=True,
                               tooltip="Warm start: begin from this LoRA/LoHa/LoKr file instead of a fresh one (its type and rank must match LoRA Network Settings). A resumable state of this output_name (resume = latest) wins over it."),
                TrainingSamplesType.Input("samples", optional=True,
                                          tooltip="From Training Samples: prompts sampled with the LoRA as it is while training (shown live here, written to models/loras/<output_name>/samples/)."),
                ValidationType.Input("validation", optional=True,
                                     tooltip="From Validation Data: score the LoRA on held-back data every N steps with fixed noise (validation loss in the live chart, the loss output and TensorBoard)."),
            ],
            outputs=[
                io.Model.Output("trained_model", display_name="model", tooltip="The input model with the trained LoRA applied."),
                io.LoraModel.Output("lora", tooltip="The trained LoRA, for Load LoRA Model / Save LoRA."),
                io.LossMap.Output("loss", tooltip="Loss per step, for Plot Loss Graph."),
                io.String.Output("path", tooltip="The saved LoRA file."),
                io.Model.Output("trained_model_high_noise", display_name="model_high_noise",
                                tooltip="Wan 2.2 A14B: the high-noise expert with the trained LoRA applied (empty without model_high_noise)."),
                io.Image.Output("sample_images", display_name="samples", tooltip="The newest training sample of every prompt (frames of videos in order; empty without samples)."),
            ],
        )

    @classmethod
    def execute(cls, model, steps, batch_size, gradient_accumulation_steps, seed, output_name,
                resume, mixed_precision, gradient_checkpointing, network_settings=None, optimizer_settings=None,
                timestep_settings=None, checkpoint_settings=None, latents=None, conditioning=None,
                dataset=None, model_high_noise=None, timestep_boundary=0.875, framepack_settings=None,
                compile_settings=None, network_weights="none", samples=None, validation=None) -> io.NodeOutput:
        output_dir = lora_output_dir(output_name)
        network_options = {"network_dim": 32, "network_alpha": 16.0, **(network_settings or {})}
        settings = TrainSettings(**{
            "learning_rate": 1e-4,
            "lr_scheduler": "constant",
            **(optimizer_settings or {}),
            **(checkpoint_settings or {}),
            **(compile_settings or {}),
            "output_dir": output_dir,
            "output_name": os.path.basename(output_dir),
            "max_train_steps": steps,
            "batch_size": batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "seed": seed,
            "mixed_precision": mixed_precision,
            "gradient_checkpointing": gradient_checkpointing,
            "timesteps": timestep_settings or TimestepSettings(),
            "training_comment": "trained with the Train LoRA node",
        })
        if settings.logging_dir is None and settings.log_with:
            settings = dataclasses.replace(settings, logging_dir=os.path.join(folder_paths.get_output_directory(), "musubi_logs"))
        # Resume states live where no LoRA list shows them; a new run never overwrites another run's files.
        settings = dataclasses.replace(settings, state_dir=training_state_dir(settings.output_dir))
        remove_leftovers(settings.state_dir)  # what a killed earlier save left there
        plan = plan_run(settings, "latest" if resume == "latest" else None, on_existing="new_name")
        settings = plan.settings
        if validation is not None:
            settings = dataclasses.replace(settings, validate_every_n_steps=validation["every_n_steps"] or None,
                                           validation_timesteps=validation["num_timesteps"],
                                           validation_bands=validation["num_bands"], validation_seed=validation["seed"])

        with torch.inference_mode(False), torch.enable_grad():
            data, validation_data = split_validation(validation, training_data_from_inputs(latents, conditioning, dataset), NODE)
            model = model.clone()
            if model_high_noise is not None:
                model_high_noise = model_high_noise.clone()
            adapter, dataset_view, validation_view = prepare_training_with_validation(
                model, data, validation_data, framepack_settings, model_high_noise, timestep_boundary)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # the LoRA's initial weights follow the seed too
                network_type = network_options.pop("network_type", "lora")
                network = create_network(network_type, adapter.lora_root(), adapter.architecture, **network_options)
            try:
                network_lines = network_report(network, network_type, network_weights)
                progress = ProgressReporter(cls.hidden.unique_id, steps, plan)
                if samples:
                    check_specs(adapter, samples, framepack_settings)  # a wrong VAE or size fails now, not at the first sample
                    progress.samples = SampleRunner(progress, adapter, samples, settings.output_dir, settings.output_name,
                                                    framepack_settings)
                trainer = Trainer(adapter, network, dataset_view, settings, callbacks=progress, validation_data=validation_view)
                if progress.samples is not None:
                    progress.samples.trainer = trainer
                result = trainer.train(resume_from=plan.resume_from)
                lora = from_canonical({k: v.detach().float().cpu() for k, v in network.state_dict().items()}, "comfyui",
                                      adapter.architecture)
            finally:
                network.remove()
        sample_lines = progress.samples.report() if progress.samples is not None else ""
        if result.interrupted or (progress.samples is not None and progress.samples.interrupted):
            stopped = (f"Stopped at step {result.global_step} on request; resume from {result.last_state_dir}: "
                       "queue again with resume = latest to continue.")
            if not result.interrupted:  # Cancel while sampling after the last step: the run itself is complete
                stopped = f"Stopped while sampling after the last step; the trained LoRA is saved: {result.final_lora_path}"
            report = run_report(plan, result, settings) + sample_lines
            logging.warning("%s: %s%s", NODE, stopped, report.replace("\n", "\n  "))
            progress.status("stopped", stopped + report)  # the node shows it: an interrupted run has no output
            comfy.model_management.interrupt_current_processing(False)
            raise comfy.model_management.InterruptProcessingException()
        trained, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
        trained_high = None
        if model_high_noise is not None:
            trained_high, _ = comfy.sd.load_lora_for_models(model_high_noise, None, lora, 1.0, 0)
        losses = {"loss": list(result.losses)}
        if result.validation:  # core Plot Loss Graph reads "loss" only; these ride along
            losses["validation"] = [entry["mean"] for entry in result.validation]
            losses["validation_steps"] = [entry["step"] for entry in result.validation]
            losses["validation_bands"] = [list(entry["bands"]) for entry in result.validation]
        summary = (f"trained steps {result.start_step + 1}–{result.global_step} of {result.total_steps}; "
                   f"final loss {result.losses[-1]:.5f}\n{result.final_lora_path}" if result.losses else
                   f"nothing left to train (resumed at step {result.global_step})\n{result.final_lora_path}")
        report = run_report(plan, result, settings)
        if report:
            logging.info("%s:%s", NODE, report.replace("\n", "\n  "))
        progress.status("finished", summary.split("\n", 1)[0] + report
                        + (progress.samples.report(short=True) if progress.samples is not None else "")
                        + validation_report(result))
        if result.resumed_from and network_weights not in (None, "", "none"):
            network_lines += "\nthe resumed state's weights replaced those of the warm start"
        summary += report + network_lines + sample_lines + validation_report(result) + time_report(progress.durations(result))
        if isinstance(adapter, ExpertPairAdapter):
            calls = adapter.calls
            summary += (f"\n{calls['high_noise']} batches on the high-noise expert, "
                        f"{calls['low_noise']} batches on the low-noise expert (boundary {adapter.expert_boundary:g})")
        sampled = progress.samples.images() if progress.samples is not None else None
        return io.NodeOutput(trained, lora, losses, result.final_lora_path or "", trained_high, sampled,
                             ui=loss_ui(cls, result, summary, settings.output_name))


def network_report(network, network_type: str, network_weights: str | None) -> str:
    """Warm-starts ``network`` from ``network_weights`` (a loras name, or none) and returns the
    summary lines about the network: its type, and for LoKr the layers that keep a full W2."""
    lines = [] if network_type == "lora" else [network.describe()]
    if network_weights and network_weights != "none":
        path = folder_paths.get_full_path_or_raise("loras", network_weights)
        try:
            loaded = network.warm_start(path)
        except MusubiError as error:
            raise MusubiError(f"{NODE}: network_weights {network_weights}: {error}") from error
        line = f"warm start from {network_weights}: {len(loaded.loaded_modules)} layers"
        if loaded.modules_not_in_file:
            line += f" ({len(loaded.modules_not_in_file)} more layers start fresh)"
        lines.append(line + "".join(f"; {note}" for note in loaded.notes))
    for line in lines:
        logging.info("%s: %s", NODE, line)
    return "".join("\n" + line for line in lines)


def validation_report(result) -> str:
    """The validation loss at the first and last evaluation, and per noise-level band at the last."""
    if not result.validation:
        return ""
    first, last = result.validation[0], result.validation[-1]
    bands = ", ".join(f"{low:.2f}–{high:.2f} {value:.5f}" for value, (low, high) in zip(last["bands"], last["band_levels"]))
    line = f"\nvalidation loss {last['mean']:.5f} at step {last['step']} on {last['items']} item(s)"
    if first is not last:
        line += f" (step {first['step']}: {first['mean']:.5f})"
    return line + f"; by noise level at step {last['step']}: {bands}"


def time_report(durations: dict[str, float]) -> str:
    """One summary line of where the run's time went, e.g. "time: training 41.2 s, sampling 6.3 s"
    (named durations in seconds, so other phases add a name, not a format)."""
    parts = [f"{name} {seconds:.1f} s" for name, seconds in durations.items() if seconds or name == "training"]
    return "\ntime: " + ", ".join(parts) if parts else ""


def run_report(plan, result, settings) -> str:
    """Lines for the summary: a new name taken, the state resumed from (and what was skipped or
    changed since), and where the resume states are — nothing about a run happens unsaid."""
    lines = []
    if plan.renamed_from is not None:
        name = os.path.relpath(settings.output_dir, model_folder_root("loras")).replace(os.sep, "/")
        lines.append(f"{plan.describe()}; continue this run with output_name {name}")
    if result.resumed_from:
        lines.append(f"resumed '{settings.output_name}' from its state of step {result.start_step}: {result.resumed_from}")
    lines.extend(f"skipped an unreadable newer state: {line}" for line in result.skipped_states)
    if result.resume_changes:
        lines.append("settings differ from that state: " + "; ".join(result.resume_changes))
    if result.state_dirs:
        lines.append(f"resume states: {os.path.dirname(result.state_dirs[-1])}")
    return "".join("\n" + line for line in lines)


def training_state_dir(output_dir: str) -> str:
    """output/musubi_training_states/<output_name>/: resume states (optimizer.pt, rng.pt, …) kept out
    of models/loras, where every LoRA picker would list them as LoRAs."""
    relative = os.path.relpath(output_dir, model_folder_root("loras"))
    if relative == os.curdir or relative.startswith(os.pardir):
        relative = os.path.basename(os.path.normpath(output_dir))
    return os.path.join(folder_paths.get_output_directory(), STATES_FOLDER, relative)


def loss_ui(cls, result, summary: str, name: str) -> dict:
    """The summary text plus the loss curve as a picture, for runs without the live chart (API, headless).
    A plot that cannot be drawn only costs the picture, never the trained result."""
    shown = ui.PreviewText(summary).as_dict()
    if not result.losses:
        return shown
    try:
        title = f"{name}: steps {result.start_step + 1}–{result.global_step}"
        validation = ([entry["step"] for entry in result.validation], [entry["mean"] for entry in result.validation])
        pixels = render_loss_curve(result.losses, 768, 384, title, first_step=result.start_step + 1,
                                   validation=validation if result.validation else None)
        image = torch.from_numpy(pixels).float().div(255.0).unsqueeze(0)
        return ui.PreviewImage(image, cls=cls).as_dict() | shown
    except Exception as error:  # noqa: BLE001
        logging.warning("%s: no loss plot (%s)", NODE, error)
        return shown


def lora_output_dir(output_name: str) -> str:
    """models/loras/<output_name>/ — where core Load LoRA finds the checkpoints (the name follows the
    pack's one rule set for written names). What a killed earlier run left there is cleared first."""
    output_dir = folder_inside(NODE, "output_name", model_folder_root("loras"), output_name, example="my_lora")
    remove_leftovers(output_dir)
    return output_dir


def executing_prompt() -> tuple[str | None, str | None]:
    """(prompt id, client id) of the prompt ComfyUI executes now.

    The prompt id comes from ComfyUI's execution context (``comfy_execution.utils``, set around
    every node call), else from the server's ``last_prompt_id``; the client id is what the
    executor took from the queued prompt's ``client_id`` (``PromptServer.instance.client_id``, the
    address ComfyUI's own progress messages go to). Either is None where there is none (no
    server, or a prompt queued without a client id).
    """
    prompt_id = client_id = None
    try:
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
        prompt_id = context.prompt_id if context is not None else None
    except Exception:  # noqa: BLE001 — an older ComfyUI: the server's record below
        pass
    try:
        from server import PromptServer

        server = PromptServer.instance
        prompt_id = prompt_id or getattr(server, "last_prompt_id", None)
        client_id = getattr(server, "client_id", None)
    except Exception:  # noqa: BLE001 — no server (headless use of the node class)
        pass
    return prompt_id, client_id


class ProgressReporter(TrainCallbacks):
    """ComfyUI's progress bar, Cancel, and the live view of the web extension.

    ComfyUI's progress hook raises (and clears the interrupt flag) when Cancel was pressed; the
    request is remembered here so the trainer can save a resumable checkpoint before stopping.

    Every event names the node, the prompt and the client that queued it, and goes to that
    client only: the extension draws only prompts its tab queued. A prompt queued without a
    client id (an API script) gets no events; the node's outputs report the run.
    """

    def __init__(self, node_id, total_steps: int, plan=None):
        self.node_id = node_id
        self.plan = plan
        self.prompt_id, self.client_id = executing_prompt()
        self.bar = comfy.utils.ProgressBar(total_steps, node_id=node_id)
        self.losses: list[float] = []
        self.cancelled = False
        self.samples = None  # a SampleRunner when Training Samples is connected
        self.last_step = 0

    def send(self, event: str, data: dict) -> None:
        if self.client_id is None:
            return
        try:
            from server import PromptServer

            message = {"node": self.node_id, "prompt_id": self.prompt_id, "client_id": self.client_id, **data}
            PromptServer.instance.send_sync(event, message, self.client_id)
        except Exception:  # noqa: BLE001 — no server (headless use of the node class): the bar is enough
            pass

    def status(self, kind: str, text: str) -> None:
        """Lines the node shows under its loss curve: ``kind`` is started, stopped or finished."""
        self.send(STATUS_EVENT, {"kind": kind, "text": text.strip()})

    def _update_bar(self, step: int, total: int | None = None) -> None:
        if self.should_stop():
            return
        try:
            self.bar.update_absolute(step, total)
        except comfy.model_management.InterruptProcessingException:
            self.cancelled = True

    def on_start(self, start_step: int, total_steps: int) -> None:
        lines = []
        if self.plan is not None and self.plan.renamed_from is not None:
            lines.append(self.plan.describe())
        if start_step > 0:
            name = self.plan.settings.output_name if self.plan is not None else "the run"
            lines.append(f"resumed '{name}' from its state of step {start_step}; training to step {total_steps}")
        if lines:
            self.status("started", "\n".join(lines))
        self._update_bar(start_step, total_steps)
        self.last_step = start_step
        if self.samples is not None:
            self.samples.at_start(start_step)

    def should_stop(self) -> bool:
        self.cancelled = self.cancelled or comfy.model_management.processing_interrupted()
        return self.cancelled

    def on_step(self, step: int, loss: float, lrs: dict[str, float]) -> None:
        self.losses.append(loss)
        self._update_bar(step)
        self.send(PROGRESS_EVENT, {"step": step, "loss": loss, "lrs": lrs})
        self.last_step = step
        if self.samples is not None:
            self.samples.after_step(step)

    def on_checkpoint(self, path: str) -> None:
        if self.samples is not None:
            self.samples.at_checkpoint(self.last_step)

    def durations(self, result) -> dict[str, float]:
        """Seconds spent per phase of the run: optimizer steps, and sampling when samples are on."""
        durations = {"training": sum(result.step_seconds)}
        if self.samples is not None:
            durations["sampling"] = self.samples.seconds
        if result.validation:
            durations["validation"] = result.validation_seconds
        return durations

    def on_validation(self, step: int, result) -> None:
        self.send(VALIDATION_EVENT, {"step": step, **result.as_dict()})
