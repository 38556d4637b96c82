"""Post-Hoc EMA Merge: average a run's saved LoRA checkpoints into a smoother LoRA."""

from __future__ import annotations

import os

import safetensors.torch
from comfy_api.latest import io, ui

from ..musubi.lora.ema import post_hoc_ema_merge, select_run_checkpoints
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
                                tooltip="LoRA files from the loras folders, one per line: names as Load LoRA lists them, globs such as my_lora/*.safetensors, or absolute paths. At least two. A glob takes the step checkpoints (<name>-stepNNNNNN.safetensors) of one training run and leaves out its final LoRA and resume states."),
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
    def validate_inputs(cls, checkpoints: str | None = None) -> bool | str:
        """Names and globs that find no LoRA file are reported when the prompt is queued."""
        if checkpoints is None:  # linked: checked when it arrives
            return True
        try:
            resolve_patterns(NODE, "loras", checkpoints)
        except MusubiError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, checkpoints: str, output_name: str, mode: str, beta: float, beta2: float,
                sigma_rel: float, order: str) -> io.NodeOutput:
        choice = select_run_checkpoints(*checkpoint_lines(checkpoints))
        if len(choice.files) < 2 and choice.left_out:
            raise MusubiError(f"{NODE}: need at least two step checkpoints of one run, found {len(choice.files)}; "
                              f"left out: {left_out_text(choice.left_out)}.")
        output_file = new_output_path(NODE, "loras", output_name, option="output_name", example="ema/my_lora_ema")
        result = post_hoc_ema_merge(
            choice.files, output_file,
            beta=beta,
            beta2=beta2 if mode == "beta_to_beta2" else None,
            sigma_rel=sigma_rel if mode == "sigma_rel" else None,
            no_sort=(order == "as listed"),
        )
        lora = safetensors.torch.load_file(result.output_file)
        report = weight_report(result.files, result.weights, result.output_file)
        if choice.left_out:
            report += f"\nleft out: {left_out_text(choice.left_out)}"
        return io.NodeOutput(lora, result.output_file, ui=ui.PreviewText(report))

    @classmethod
    def fingerprint_inputs(cls, checkpoints: str, **settings):
        """Merge again when a matched file appears, disappears or changes, not on every queue."""
        try:
            paths = resolve_patterns(NODE, "loras", checkpoints)
        except MusubiError:
            return float("nan")
        return [(path, os.path.getmtime(path)) for path in paths]


def checkpoint_lines(checkpoints: str) -> tuple[list[str], list[str]]:
    """Every file the lines give, in order, and those named one by one (not through a glob)."""
    paths, named = [], []
    for line in (raw.strip() for raw in checkpoints.splitlines()):
        if not line or line.startswith("#"):
            continue
        matches = resolve_patterns(NODE, "loras", line)
        if os.path.isabs(line) or not any(char in line for char in "*?["):
            named.extend(matches)
        paths.extend(path for path in matches if path not in paths)
    return paths, named


def left_out_text(left_out) -> str:
    """``folder/file (why)`` for each file: a state's network.safetensors says which state it is."""
    return "; ".join(f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)} ({why})" for path, why in left_out)


def weight_report(files, weights, output_file) -> str:
    lines = [f"{weight:8.4f}  {os.path.basename(path)}" for path, weight in zip(files, weights)]
    return "weight  checkpoint (oldest first)\n" + "\n".join(lines) + f"\n→ {output_file}"
