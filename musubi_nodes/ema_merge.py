"""Post-Hoc EMA Merge: average a run's saved LoRA checkpoints into a smoother LoRA."""

from __future__ import annotations

import os

import safetensors.torch
from comfy_api.latest import io, ui

from ..musubi.lora.ema import post_hoc_ema_merge
from ..musubi.errors import MusubiError
from .paths import new_output_path, resolve_patterns

NODE = "Post-Hoc EMA Merge"
MODES = ["beta", "beta_to_beta2", "sigma_rel"]


class MusubiPostHocEMAMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiPostHocEMAMerge",
            display_name="Post-Hoc EMA Merge (LoRA)",
            category="musubi/lora",
            description="Merges the checkpoints saved during one training run with an exponential moving average (as musubi-tuner's lora_post_hoc_ema.py). Later checkpoints weigh more; the result is usually smoother and generalises better than the last checkpoint alone.",
            is_output_node=True,
            inputs=[
                io.String.Input("checkpoints", multiline=True, default="",
                                placeholder="my_lora/*.safetensors",
                                tooltip="LoRA files from the loras folders, one per line: names as Load LoRA lists them, globs such as my_lora/*.safetensors, or absolute paths. At least two."),
                io.String.Input("output_name", default="ema/my_lora_ema",
                                tooltip="File name inside the first loras folder (sub-folders allowed). An existing file is never overwritten: _00001, _00002… is appended instead."),
                io.Combo.Input("mode", options=MODES, default="beta",
                               tooltip="beta: one decay for every merge. beta_to_beta2: the decay moves linearly from beta to beta2 across the merges. sigma_rel: power-function EMA of EDM2 (Karras et al. 2024) with relative width sigma_rel."),
                io.Float.Input("beta", default=0.95, min=0.0, max=1.0, step=0.001,
                               tooltip="Decay per merge: the share the running average keeps (0.95: each newer checkpoint adds 5 %)."),
                io.Float.Input("beta2", default=0.95, min=0.0, max=1.0, step=0.001,
                               tooltip="Decay of the last merge in beta_to_beta2 mode."),
                io.Float.Input("sigma_rel", default=0.2, min=0.001, max=0.3, step=0.001,
                               tooltip="Relative EMA width in sigma_rel mode (smaller = later checkpoints dominate). Valid up to about 0.30."),
                io.Combo.Input("order", options=["modified time", "as listed"], default="modified time",
                               tooltip="Merge from the oldest to the newest file by modification time (musubi's default), or in the order the lines list them (--no_sort)."),
            ],
            outputs=[
                io.LoraModel.Output("lora", tooltip="The merged LoRA, for Load LoRA Model (LoraModelLoader)."),
                io.String.Output("path", tooltip="Where the merged file was written."),
            ],
        )

    @classmethod
    def execute(cls, checkpoints: str, output_name: str, mode: str, beta: float, beta2: float,
                sigma_rel: float, order: str) -> io.NodeOutput:
        paths = resolve_patterns(NODE, "loras", checkpoints)
        output_file = new_output_path(NODE, "loras", output_name)
        result = post_hoc_ema_merge(
            paths, output_file,
            beta=beta,
            beta2=beta2 if mode == "beta_to_beta2" else None,
            sigma_rel=sigma_rel if mode == "sigma_rel" else None,
            no_sort=(order == "as listed"),
        )
        lora = safetensors.torch.load_file(result.output_file)
        report = weight_report(result.files, result.weights, result.output_file)
        return io.NodeOutput(lora, result.output_file, ui=ui.PreviewText(report))

    @classmethod
    def fingerprint_inputs(cls, checkpoints: str, **settings):
        """Merge again when a matched file appears, disappears or changes, not on every queue."""
        try:
            paths = resolve_patterns(NODE, "loras", checkpoints)
        except MusubiError:
            return float("nan")
        return [(path, os.path.getmtime(path)) for path in paths]


def weight_report(files, weights, output_file) -> str:
    lines = [f"{weight:8.4f}  {os.path.basename(path)}" for path, weight in zip(files, weights)]
    return "weight  checkpoint (oldest first)\n" + "\n".join(lines) + f"\n→ {output_file}"
