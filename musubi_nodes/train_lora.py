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
from ..musubi.lora.network import LoRANetwork
from ..musubi.training.timesteps import TimestepSettings
from ..musubi.training.loop import TrainCallbacks, Trainer
from ..musubi.training.checkpoints import plan_run
from ..musubi.training.settings import TrainSettings
from .timesteps import TimestepSettingsType
from .paths import folder_inside, model_folder_root
from .adapters import prepare_training
from .adapters.training_data import training_data_from_inputs
from .framepack_train import FramePackTrainingSettings
from .train_settings import CheckpointSettings, CompileSettingsType, DatasetType, NetworkSettings, OptimizerSettings

NODE = "Train LoRA"
PROGRESS_EVENT = "musubi.train.progress"
STATES_FOLDER = "musubi_training_states"  # under ComfyUI's output folder


class MusubiTrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiTrainLoRA",
            display_name=NODE,
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
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip="Recompute block activations in the backward pass: much less memory, ~30 % slower."),
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
            ],
            outputs=[
                io.Model.Output("trained_model", display_name="model", tooltip="The input model with the trained LoRA applied."),
                io.LoraModel.Output("lora", tooltip="The trained LoRA, for Load LoRA Model / Save LoRA."),
                io.LossMap.Output("loss", tooltip="Loss per step, for Plot Loss Graph."),
                io.String.Output("path", tooltip="The saved LoRA file."),
                io.Model.Output("trained_model_high_noise", display_name="model_high_noise",
                                tooltip="Wan 2.2 A14B: the high-noise expert with the trained LoRA applied (empty without model_high_noise)."),
            ],
        )

    @classmethod
    def execute(cls, model, steps, batch_size, gradient_accumulation_steps, seed, output_name,
                resume, mixed_precision, gradient_checkpointing, network_settings=None, optimizer_settings=None,
                timestep_settings=None, checkpoint_settings=None, latents=None, conditioning=None,
                dataset=None, model_high_noise=None, timestep_boundary=0.875, framepack_settings=None,
                compile_settings=None) -> io.NodeOutput:
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

        with torch.inference_mode(False), torch.enable_grad():
            data = training_data_from_inputs(latents, conditioning, dataset)
            model = model.clone()
            if model_high_noise is not None:
                model_high_noise = model_high_noise.clone()
            adapter, dataset_view = prepare_training(model, data, framepack_settings, model_high_noise, timestep_boundary)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # the LoRA's initial weights follow the seed too
                network = LoRANetwork(adapter.lora_root(), adapter.architecture, **network_options)
            try:
                progress = ProgressReporter(cls.hidden.unique_id, steps)
                trainer = Trainer(adapter, network, dataset_view, settings, callbacks=progress)
                result = trainer.train(resume_from=plan.resume_from)
                lora = from_canonical({k: v.detach().float().cpu() for k, v in network.state_dict().items()}, "comfyui",
                                      adapter.architecture)
            finally:
                network.remove()
        if result.interrupted:
            logging.warning("%s: stopped at step %d (state %s); queue again with resume = latest to continue.%s", NODE,
                            result.global_step, result.last_state_dir, run_report(plan, result, settings).replace("\n", "\n  "))
            comfy.model_management.interrupt_current_processing(False)
            raise comfy.model_management.InterruptProcessingException()
        trained, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
        trained_high = None
        if model_high_noise is not None:
            trained_high, _ = comfy.sd.load_lora_for_models(model_high_noise, None, lora, 1.0, 0)
        losses = {"loss": list(result.losses)}
        summary = (f"trained steps {result.start_step + 1}–{result.global_step} of {result.total_steps}; "
                   f"final loss {result.losses[-1]:.5f}\n{result.final_lora_path}" if result.losses else
                   f"nothing left to train (resumed at step {result.global_step})\n{result.final_lora_path}")
        report = run_report(plan, result, settings)
        if report:
            logging.info("%s:%s", NODE, report.replace("\n", "\n  "))
        summary += report
        if isinstance(adapter, ExpertPairAdapter):
            calls = adapter.calls
            summary += (f"\n{calls['high_noise']} batches on the high-noise expert, "
                        f"{calls['low_noise']} batches on the low-noise expert (boundary {adapter.expert_boundary:g})")
        return io.NodeOutput(trained, lora, losses, result.final_lora_path or "", trained_high, ui=loss_ui(cls, result, summary, settings.output_name))


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
        pixels = render_loss_curve(result.losses, 768, 384, title, first_step=result.start_step + 1)
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


class ProgressReporter(TrainCallbacks):
    """ComfyUI's progress bar, Cancel, and the live loss curve of the web extension.

    ComfyUI's progress hook raises (and clears the interrupt flag) when Cancel was pressed; the
    request is remembered here so the trainer can save a resumable checkpoint before stopping.
    """

    def __init__(self, node_id, total_steps: int):
        self.node_id = node_id
        self.bar = comfy.utils.ProgressBar(total_steps, node_id=node_id)
        self.losses: list[float] = []
        self.cancelled = False

    def _update_bar(self, step: int, total: int | None = None) -> None:
        if self.should_stop():
            return
        try:
            self.bar.update_absolute(step, total)
        except comfy.model_management.InterruptProcessingException:
            self.cancelled = True

    def on_start(self, start_step: int, total_steps: int) -> None:
        self._update_bar(start_step, total_steps)

    def should_stop(self) -> bool:
        self.cancelled = self.cancelled or comfy.model_management.processing_interrupted()
        return self.cancelled

    def on_step(self, step: int, loss: float, lrs: dict[str, float]) -> None:
        self.losses.append(loss)
        self._update_bar(step)
        try:
            from server import PromptServer

            PromptServer.instance.send_sync(PROGRESS_EVENT, {"node": self.node_id, "step": step, "loss": loss, "lrs": lrs})
        except Exception:  # no server (headless use of the node class) — the bar is enough
            pass
