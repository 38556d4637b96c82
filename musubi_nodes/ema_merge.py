"""Post-Hoc EMA Merge: average a run's saved LoRA checkpoints into a smoother LoRA."""

from __future__ import annotations

import logging
import os

import comfy.model_management
import safetensors.torch
import torch
from comfy_api.latest import io, ui

from ..musubi.lora.ema import post_hoc_ema_merge, select_run_checkpoints
from ..musubi.errors import MusubiError
from ..musubi.training.ema_selection import best_of, candidate_merge_options, parse_candidates, score_candidates, score_table
from ..musubi.training.loss_plot import render_candidate_losses
from ..musubi.training.timesteps import TimestepSettings
from ..musubi.training.validation import ValidationSet
from .adapters import prepare_training
from .paths import new_output_path, resolve_patterns
from .timesteps import TimestepSettingsType
from .validation_data import ValidationType, unique_items

NODE = "Post-Hoc EMA Merge"
EMACandidatesType = io.Custom("MUSUBI_EMA_CANDIDATES")
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
                EMACandidatesType.Input("candidates", optional=True,
                                        tooltip="From EMA Candidates: merge with each candidate value, score every merge on validation data with the model, and write the one with the lowest validation loss. Without it the node merges with beta / sigma_rel as set."),
            ],
            outputs=[
                io.LoraModel.Output("lora", tooltip="The merged LoRA, for Load LoRA Model (LoraModelLoader)."),
                io.String.Output("path", tooltip="Where the merged file was written."),
                io.String.Output("chosen", display_name="chosen", tooltip="Which profile was merged, e.g. 'sigma_rel 0.1' (with its validation loss when candidates were scored)."),
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
                sigma_rel: float, order: str, candidates: dict | None = None) -> io.NodeOutput:
        choice = select_run_checkpoints(*checkpoint_lines(checkpoints))
        if len(choice.files) < 2 and choice.left_out:
            raise MusubiError(f"{NODE}: need at least two step checkpoints of one run, found {len(choice.files)}; "
                              f"left out: {left_out_text(choice.left_out)}.")
        no_sort = order == "as listed"
        scores = best = None
        merge_options = {"beta": beta, "beta2": beta2 if mode == "beta_to_beta2" else None,
                         "sigma_rel": sigma_rel if mode == "sigma_rel" else None}
        if candidates is not None:
            scores = score_by_validation(choice.files, mode, beta, beta2, no_sort, candidates)
            best = best_of(scores)
            merge_options = candidate_merge_options(mode, best.value, beta, beta2)
        output_file = new_output_path(NODE, "loras", output_name, option="output_name", example="ema/my_lora_ema")
        result = post_hoc_ema_merge(choice.files, output_file, no_sort=no_sort, **merge_options)
        lora = safetensors.torch.load_file(result.output_file)
        report = weight_report(result.files, result.weights, result.output_file)
        if choice.left_out:
            report += f"\nleft out: {left_out_text(choice.left_out)}"
        if scores is None:
            chosen = f"sigma_rel {sigma_rel:g}" if mode == "sigma_rel" else f"beta {beta:g}"
            return io.NodeOutput(lora, result.output_file, chosen, ui=ui.PreviewText(report))
        chosen = f"{best.label} (validation loss {best.loss:.5f})"
        report = (f"validation loss of each candidate ({best.result.items} item(s) × {len(best.result.per_row[0])} noise "
                  f"levels; columns: noise-level bands)\n{score_table(scores, best)}\n\nmerged the best: {chosen}\n\n{report}")
        return io.NodeOutput(lora, result.output_file, chosen, ui=candidate_ui(cls, scores, best, mode, report))

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


class MusubiEMACandidates(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiEMACandidates",
            display_name="EMA Candidates (by validation loss)",
            category="musubi/lora",
            description="For Post-Hoc EMA Merge: the EMA profiles to try and what to score them with (the training model and Validation Data). The merge node merges with each, scores every merge with the same fixed validation plan as Train LoRA, shows a table and a plot, and writes the best.",
            inputs=[
                io.Model.Input("model", tooltip="The model the LoRA was trained on (Wan 2.2 A14B: the low-noise expert)."),
                ValidationType.Input("validation", tooltip="From Validation Data (a dataset or latents + conditioning, not a held-out fraction): what each merge is scored on."),
                io.String.Input("values", default="0.05, 0.1, 0.2, 0.28", placeholder="0.05, 0.1, 0.2, 0.28",
                                tooltip="Values of the merge mode's parameter to try, separated by commas: sigma_rel values in sigma_rel mode, betas in the beta modes (e.g. 0.9, 0.95, 0.99)."),
                TimestepSettingsType.Input("timestep_settings", optional=True,
                                           tooltip="The training's Timestep Settings: validation noise levels are quantiles of that schedule (default: musubi's sigma sampling)."),
                io.Model.Input("model_high_noise", optional=True, tooltip="Wan 2.2 A14B: the high-noise expert, as in Train LoRA."),
                io.Float.Input("timestep_boundary", default=0.875, min=0.01, max=0.99, step=0.005, optional=True,
                               tooltip="Wan 2.2 A14B: noise level where the high-noise expert takes over (t2v 0.875, i2v 0.9). Only used with model_high_noise."),
            ],
            outputs=[EMACandidatesType.Output("candidates", display_name="candidates", tooltip="For Post-Hoc EMA Merge's candidates input.")],
        )

    @classmethod
    def execute(cls, model, validation, values, timestep_settings=None, model_high_noise=None,
                timestep_boundary=0.875) -> io.NodeOutput:
        where = "EMA Candidates"
        if validation.get("data") is None:
            raise MusubiError(f"{where}: Validation Data's held_out_fraction needs training data, which a merge does not "
                              "have; connect a dataset or latents + conditioning to Validation Data instead.")
        parse_candidates(values, "beta", f"{where}: values")  # numbers in [0, 1]; the merge checks them for its mode
        return io.NodeOutput({"values": values, "model": model, "validation": validation, "timestep_settings": timestep_settings,
                              "model_high_noise": model_high_noise, "timestep_boundary": float(timestep_boundary)})


def score_by_validation(files, mode, beta, beta2, no_sort, candidates: dict):
    """Each candidate's merge scored on the validation data with the model (Train LoRA's adapter)."""
    values = parse_candidates(candidates["values"], mode, f"{NODE}: candidates")
    validation, model, model_high_noise = candidates["validation"], candidates["model"], candidates["model_high_noise"]
    timestep_boundary, timestep_settings = candidates["timestep_boundary"], candidates["timestep_settings"]
    with torch.inference_mode(False):
        model = model.clone()
        high = model_high_noise.clone() if model_high_noise is not None else None
        adapter, view = prepare_training(model, unique_items(validation["data"]), None, high, timestep_boundary)
        plan = ValidationSet(view, validation["num_timesteps"], validation["num_bands"], validation["seed"],
                             where=f"{NODE}: validation")
        try:
            return score_candidates(files, values, mode, adapter, plan, timestep_settings or TimestepSettings(),
                                    beta=beta, beta2=beta2, no_sort=no_sort,
                                    device=comfy.model_management.get_torch_device())
        except MusubiError as error:
            raise MusubiError(f"{NODE}: {error}") from error


def candidate_ui(cls, scores, best, mode: str, report: str) -> dict:
    """The table as text and the losses as a small plot (a plot that cannot be drawn costs only the picture)."""
    shown = ui.PreviewText(report).as_dict()
    try:
        pixels = render_candidate_losses([score.value for score in scores], [score.loss for score in scores],
                                         scores.index(best), "sigma_rel" if mode == "sigma_rel" else "beta")
        image = torch.from_numpy(pixels).float().div(255.0).unsqueeze(0)
        return ui.PreviewImage(image, cls=cls).as_dict() | shown
    except Exception as error:  # noqa: BLE001
        logging.warning("%s: no candidate plot (%s)", NODE, error)
        return shown
