"""Small settings nodes for Train LoRA, so a training graph stays readable.

Each returns a plain dict of musubi option names; Train LoRA merges them into one
``TrainSettings`` and the library validates the result.
"""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..musubi.errors import MusubiError
from ..musubi.lora.modules import NETWORK_TYPES
from ..musubi.lora.network import check_type_options
from ..musubi.training.schedulers import SCHEDULER_NAMES
from ..musubi.training.optimizers import BUILTIN_OPTIMIZERS
from .paths import folder_inside

NetworkSettings = io.Custom("MUSUBI_NETWORK_SETTINGS")
OptimizerSettings = io.Custom("MUSUBI_OPTIMIZER_SETTINGS")
CheckpointSettings = io.Custom("MUSUBI_CHECKPOINT_SETTINGS")
CompileSettingsType = io.Custom("MUSUBI_COMPILE_SETTINGS")
# A Training Dataset node's output, accepted by Train LoRA's ``dataset`` input.
DatasetType = io.Custom("MUSUBI_DATASET")
CATEGORY = "musubi/training"


def _lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


class MusubiLoRANetworkSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiLoRANetworkSettings",
            display_name="LoRA Network Settings",
            category=CATEGORY,
            description="Network type (LoRA, LoHa, LoKr), rank, alpha, dropouts, LoRA+ and which layers get it (musubi-tuner's --network_module/--network_dim/--network_alpha/--network_args).",
            inputs=[
                io.Int.Input("network_dim", default=32, min=1, max=1024, tooltip="LoRA rank: capacity of the LoRA (16–64 is typical)."),
                io.Float.Input("network_alpha", default=16.0, min=0.0, max=1024.0, step=0.5,
                               tooltip="The LoRA output is scaled by alpha/rank; 0 means alpha = rank (scale 1)."),
                io.Float.Input("network_dropout", default=0.0, min=0.0, max=0.99, step=0.01, tooltip="Dropout on the LoRA's inner activations (0 = off)."),
                io.Float.Input("rank_dropout", default=0.0, min=0.0, max=0.99, step=0.01, tooltip="Drops whole ranks per sample (0 = off)."),
                io.Float.Input("module_dropout", default=0.0, min=0.0, max=0.99, step=0.01, tooltip="Skips a whole LoRA module per call with this probability (0 = off)."),
                io.Float.Input("loraplus_lr_ratio", default=0.0, min=0.0, max=64.0, step=0.5,
                               tooltip="LoRA+: the up weights learn this many times faster (4–16 is typical; 0 = off)."),
                io.String.Input("exclude_patterns", default="", multiline=True,
                                tooltip="Regexes (one per line, full match on the layer path such as blocks.0.self_attn.q) of layers NOT to train, added to the architecture's defaults (modulation, norms, embeddings)."),
                io.String.Input("include_patterns", default="", multiline=True,
                                tooltip="Regexes of excluded layers to train anyway (include wins over exclude)."),
                io.Combo.Input("network_type", options=list(NETWORK_TYPES), default="lora", optional=True,
                               tooltip="lora: ΔW = up·down. loha: Hadamard product of two low-rank pairs (more capacity per parameter). lokr: Kronecker product W1 ⊗ W2 (far fewer parameters). Core LoRA loaders apply all three. LoRA+ and network_dropout are LoRA only."),
                io.Int.Input("lokr_factor", default=-1, min=-1, max=8192, optional=True,
                             tooltip="LoKr only: how each layer width is split into W1 ⊗ W2. -1: the most balanced split (3072 = 48 × 64); N: N as one part when it divides the width. A rank of at least half of W2's larger side keeps W2 full (scale 1; the report says so)."),
            ],
            outputs=[NetworkSettings.Output("network_settings", tooltip="For Train LoRA.")],
        )

    @classmethod
    def execute(cls, network_dim, network_alpha, network_dropout, rank_dropout, module_dropout,
                loraplus_lr_ratio, exclude_patterns, include_patterns, network_type="lora", lokr_factor=-1) -> io.NodeOutput:
        try:
            check_type_options(network_type, loraplus_lr_ratio or None, network_dropout or None)
        except MusubiError as error:
            raise MusubiError(f"LoRA Network Settings: {error}") from error
        type_options = {"network_type": network_type}
        if network_type == "lokr":
            type_options["factor"] = lokr_factor
        return io.NodeOutput({
            **type_options,
            "network_dim": network_dim,
            "network_alpha": network_alpha,
            "dropout": network_dropout or None,
            "rank_dropout": rank_dropout or None,
            "module_dropout": module_dropout or None,
            "loraplus_lr_ratio": loraplus_lr_ratio or None,
            "exclude_patterns": _lines(exclude_patterns) or None,
            "include_patterns": _lines(include_patterns) or None,
        })


class MusubiOptimizerSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiOptimizerSettings",
            display_name="Optimizer + LR Schedule",
            category=CATEGORY,
            description="Optimizer and learning-rate schedule, with musubi-tuner's names (Rex included).",
            inputs=[
                io.Combo.Input("optimizer_type", options=list(BUILTIN_OPTIMIZERS), default="AdamW",
                               tooltip="AdamW is the safe default; AdamW8bit needs bitsandbytes; Prodigy wants learning_rate 1.0; *ScheduleFree ignore the schedule."),
                io.String.Input("custom_optimizer", default="",
                                tooltip="Optional: any optimizer class as package.module.Class (or a torch.optim name); overrides optimizer_type."),
                io.Float.Input("learning_rate", default=1e-4, min=0.0, max=10.0, step=1e-5,
                               tooltip="Peak learning rate (1e-4 is typical for LoRA with AdamW)."),
                io.String.Input("optimizer_args", default="", multiline=True,
                                tooltip="key=value per line, values as Python literals, e.g. weight_decay=0.01 or betas=(0.9,0.99)."),
                io.Combo.Input("lr_scheduler", options=list(SCHEDULER_NAMES), default="constant_with_warmup",
                               tooltip="Learning-rate schedule; rex decays fast then slowly (no first-step spike here)."),
                io.String.Input("lr_warmup_steps", default="0",
                                tooltip="Warmup as a step count (100), a ratio of the run below 1 (0.05) or a percentage (5%)."),
                io.Float.Input("lr_scheduler_num_cycles", default=1.0, min=0.0, max=100.0, step=0.5, tooltip="Restarts of cosine_with_restarts."),
                io.Float.Input("lr_scheduler_power", default=1.0, min=0.0, max=10.0, step=0.1, tooltip="Power of the polynomial schedule."),
                io.Float.Input("lr_scheduler_min_lr_ratio", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Lowest lr as a ratio of the peak (rex, cosine_with_min_lr, warmup_stable_decay; 0 = their default)."),
                io.String.Input("lr_scheduler_args", default="", multiline=True, tooltip="key=value per line, e.g. rex_alpha=0.1."),
                io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=100.0, step=0.1, tooltip="Clip the gradient norm (0 = no clipping)."),
            ],
            outputs=[OptimizerSettings.Output("optimizer_settings", tooltip="For Train LoRA.")],
        )

    @classmethod
    def execute(cls, optimizer_type, custom_optimizer, learning_rate, optimizer_args, lr_scheduler, lr_warmup_steps,
                lr_scheduler_num_cycles, lr_scheduler_power, lr_scheduler_min_lr_ratio, lr_scheduler_args,
                max_grad_norm) -> io.NodeOutput:
        return io.NodeOutput({
            "optimizer_type": custom_optimizer.strip() or optimizer_type,
            "learning_rate": learning_rate,
            "optimizer_args": _lines(optimizer_args) or None,
            "lr_scheduler": lr_scheduler,
            "lr_warmup_steps": lr_warmup_steps.strip() or "0",
            "lr_scheduler_num_cycles": lr_scheduler_num_cycles,
            "lr_scheduler_power": lr_scheduler_power,
            "lr_scheduler_min_lr_ratio": lr_scheduler_min_lr_ratio or None,
            "lr_scheduler_args": _lines(lr_scheduler_args) or None,
            "max_grad_norm": max_grad_norm,
        })


class MusubiCheckpointSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiCheckpointSettings",
            display_name="Checkpoint + Logging Settings",
            category=CATEGORY,
            description="When Train LoRA saves checkpoints (LoRA files in models/loras/<output_name>/, resumable states in output/musubi_training_states/<output_name>/), in which format, and where it logs.",
            inputs=[
                io.Int.Input("save_every_n_steps", default=0, min=0, max=1_000_000, tooltip="Save a checkpoint every N steps (0 = only at the end and on Cancel)."),
                io.Int.Input("save_last_n_checkpoints", default=0, min=0, max=1000, tooltip="Keep only the newest N checkpoints (0 = keep all)."),
                io.Boolean.Input("save_state", default=True, tooltip="Save a resumable state (optimizer, scheduler, RNG, data order) with each checkpoint."),
                io.Combo.Input("lora_format", options=["comfyui", "musubi"], default="comfyui",
                               tooltip="comfyui: diffusion_model.* keys that every ComfyUI LoRA loader applies fully. musubi: lora_unet_* keys for musubi-tuner."),
                io.Combo.Input("save_precision", options=["float32", "bfloat16", "float16"], default="float32", tooltip="Dtype of the saved LoRA files."),
                io.Combo.Input("log_with", options=["none", "tensorboard"], default="none", tooltip="Log loss, learning rates and timesteps for TensorBoard."),
                io.String.Input("logging_dir", default="", tooltip="Folder for logs inside ComfyUI's output folder, e.g. my_logs (default: output/musubi_logs); used only when log_with is not none."),
            ],
            outputs=[CheckpointSettings.Output("checkpoint_settings", tooltip="For Train LoRA.")],
        )

    @classmethod
    def execute(cls, save_every_n_steps, save_last_n_checkpoints, save_state, lora_format, save_precision,
                log_with, logging_dir) -> io.NodeOutput:
        if logging_dir.strip():  # written to by the trainer: it must stay inside ComfyUI's output folder
            logging_dir = folder_inside("Checkpoint + Logging Settings", "logging_dir", folder_paths.get_output_directory(),
                                        logging_dir, example="my_logs")
        return io.NodeOutput({
            "save_every_n_steps": save_every_n_steps or None,
            "save_last_n_checkpoints": save_last_n_checkpoints or None,
            "save_state": save_state,
            "lora_format": lora_format,
            "save_precision": save_precision,
            "log_with": None if log_with == "none" else log_with,
            # log_with none means no logs: a folder alone would make the trainer log to TensorBoard.
            "logging_dir": (logging_dir.strip() or None) if log_with != "none" else None,
        })


class MusubiCompileSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiCompileSettings",
            display_name="Compile Settings",
            category=CATEGORY,
            description="torch.compile for Train LoRA (musubi-tuner's --dynamo_* options), one transformer block at a time "
                        "unless fullgraph is on. The LoRA trains exactly as uncompiled; a compiler failure trains "
                        "uncompiled with one warning in the console.",
            inputs=[
                io.Combo.Input("dynamo_backend", options=["NO", "INDUCTOR", "CUDAGRAPHS", "AOT_EAGER", "EAGER"], default="INDUCTOR",
                               tooltip="INDUCTOR: fused kernels (needs a C++ compiler; Triton on GPU). NO: off. AOT_EAGER/EAGER: no speed-up, for finding problems."),
                io.Combo.Input("dynamo_mode", options=["default", "reduce-overhead", "max-autotune"], default="default",
                               tooltip="INDUCTOR only: reduce-overhead uses CUDA graphs, max-autotune searches faster kernels (compiles much longer)."),
                io.Boolean.Input("dynamo_fullgraph", default=False,
                                 tooltip="Compile the whole model as one graph (musubi-tuner's way) instead of each block: slower to compile, fails on models with Python between blocks."),
                io.Boolean.Input("dynamo_dynamic", default=False,
                                 tooltip="Compile for any latent size at once. Off: each new bucket size compiles again (up to 8, then runs uncompiled). Reported fragile; leave off unless sizes vary a lot."),
            ],
            outputs=[CompileSettingsType.Output("compile_settings", tooltip="For Train LoRA.")],
        )

    @classmethod
    def execute(cls, dynamo_backend, dynamo_mode, dynamo_fullgraph, dynamo_dynamic) -> io.NodeOutput:
        return io.NodeOutput({
            "dynamo_backend": dynamo_backend,
            "dynamo_mode": None if dynamo_mode == "default" else dynamo_mode,
            "dynamo_fullgraph": dynamo_fullgraph,
            "dynamo_dynamic": dynamo_dynamic,
        })
