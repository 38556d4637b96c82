"""Post-hoc EMA chosen by measurement: merge the checkpoints with each candidate profile, score
every merge on the same fixed validation plan as training uses, keep the lowest.

Each candidate is a value of the merge mode's own parameter (``beta``, or ``sigma_rel``); the
merged weights are loaded into a LoRA network on the model and scored with
:meth:`.validation.ValidationSet.evaluate`, so a candidate's number is comparable with the
validation losses of the run itself. Also the ``python -m musubi ema-merge`` command: without
``--candidates`` it is the plain merge of :mod:`musubi.lora.ema`, unchanged.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field

import torch

from ..data.musubi_cache import open_training_data
from ..errors import MusubiError
from ..key_value_args import parse_key_value_args
from ..lora import ema
from ..lora.network import create_network
from .adapter import load_adapter
from .models import model_choices_help
from .timesteps import TimestepSettings, add_timestep_arguments, settings_from_args
from .validation import DEFAULT_BANDS, DEFAULT_TIMESTEPS, ValidationResult, ValidationSet

MODES = ("beta", "beta_to_beta2", "sigma_rel")


@dataclass
class CandidateScore:
    """One candidate profile, its files' weights and its validation score."""

    value: float
    label: str
    weights: list[float]
    result: ValidationResult
    files: list[str] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return self.result.mean


def parse_candidates(text: str, mode: str, where: str = "candidates") -> list[float]:
    """``"0.05, 0.1 0.2"`` → ``[0.05, 0.1, 0.2]`` (commas, spaces or lines), each checked for the mode."""
    if mode not in MODES:
        raise MusubiError(f"{where}: mode {mode!r} is unknown; choose one of {', '.join(MODES)}.")
    parts = [part for part in re.split(r"[,;\s]+", text or "") if part]
    if not parts:
        raise MusubiError(f"{where}: no candidates; write the {_parameter(mode)} values to try, e.g. "
                          f"{'0.05, 0.1, 0.2, 0.28' if mode == 'sigma_rel' else '0.9, 0.95, 0.99'}.")
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise MusubiError(f"{where}: {part!r} is not a number; write {_parameter(mode)} values separated by commas, "
                              f"e.g. {'0.05, 0.1, 0.2' if mode == 'sigma_rel' else '0.9, 0.95, 0.99'}.") from None
        if not math.isfinite(value):
            raise MusubiError(f"{where}: {part!r} is not a finite number.")
        try:
            ema.merge_decays(2, **_merge_options(mode, value, 0.95, None))
        except MusubiError as error:
            raise MusubiError(f"{where}: {part}: {error}") from error
        if value not in values:
            values.append(value)
    return values


def _parameter(mode: str) -> str:
    return "sigma_rel" if mode == "sigma_rel" else "beta"


def _merge_options(mode: str, value: float, beta: float, beta2: float | None) -> dict:
    if mode == "sigma_rel":
        return {"beta": beta, "beta2": None, "sigma_rel": value}
    return {"beta": value, "beta2": beta2 if mode == "beta_to_beta2" else None, "sigma_rel": None}


def candidate_merge_options(mode: str, value: float, beta: float = 0.95, beta2: float | None = None) -> dict:
    """The keyword arguments of :func:`musubi.lora.ema.post_hoc_ema_merge` for one candidate."""
    return _merge_options(mode, value, beta, beta2)


def network_type_of(tensors) -> str:
    names = list(tensors)
    if any(".hada_" in name for name in names):
        return "loha"
    if any(".lokr_" in name for name in names):
        return "lokr"
    return "lora"


def score_candidates(paths, candidates: list[float], mode: str, adapter, validation: ValidationSet,
                     timesteps: TimestepSettings, beta: float = 0.95, beta2: float | None = None, no_sort: bool = False,
                     device: torch.device | str = "cpu", batch_size: int = 1) -> list[CandidateScore]:
    """Every candidate's merge scored on ``validation`` with ``adapter``'s model, in the given order.

    One network (every layer a candidate, so no key of the files is left out) carries each merge
    in turn, in eval mode, on the model and on a pair adapter's twin expert."""
    mover = getattr(adapter, "to_device", None)
    if callable(mover):
        mover(device)
    network = None
    scores = []
    try:
        for value in candidates:
            options = _merge_options(mode, value, beta, beta2)
            ordered, decays, merged, _ = ema.merge_in_memory(paths, no_sort=no_sort, **options)
            if network is None:
                network = create_network(network_type_of(merged), adapter.lora_root(), adapter.architecture,
                                         include_patterns=[".*"])
                twins = getattr(adapter, "twin_lora_roots", None)
                for root in twins() if callable(twins) else []:
                    network.attach_twin(root)
            try:
                network.load_weights(merged, strict=True)
            except MusubiError as error:
                raise MusubiError(f"the checkpoints do not fit this model ({error}); give the model they were trained on.") from error
            network.to(device).eval()
            result = validation.evaluate(adapter, timesteps, batch_size=batch_size, device=device)
            label = f"{_parameter(mode)} {value:g}"
            scores.append(CandidateScore(value, label, ema.effective_weights(decays), result, ordered))
    finally:
        if network is not None:
            network.remove()
    return scores


def best_of(scores: list[CandidateScore]) -> CandidateScore:
    """The lowest validation loss (the first of equals)."""
    return min(scores, key=lambda score: score.loss)


def score_table(scores: list[CandidateScore], best: CandidateScore) -> str:
    """A plain-text table: one row per candidate, its loss and per-band losses, the pick marked."""
    bands = best.result.band_levels
    header = f"{'candidate':<16}{'val. loss':>11}" + "".join(f"{f'{low:.2f}–{high:.2f}':>12}" for low, high in bands)
    rows = [header]
    for score in scores:
        mark = "  ← best" if score is best else ""
        rows.append(f"{score.label:<16}{score.loss:>11.5f}" + "".join(f"{value:>12.5f}" for value in score.result.bands) + mark)
    return "\n".join(rows)


# --- python -m musubi ema-merge ------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    ema.add_cli_arguments(parser)
    group = parser.add_argument_group("choosing by validation loss (optional)")
    group.add_argument("--candidates", default=None,
                       help="values to try, e.g. '0.9,0.95,0.99' (betas) or with --sigma_rel given '0.05,0.1,0.2,0.28'; "
                            "the merge with the lowest validation loss is written")
    group.add_argument("--validation_data_dir", default=None, help="cache folder to score the candidates on (needs --candidates)")
    group.add_argument("--model", default=None, help=model_choices_help())
    group.add_argument("--dit", default=None, help="the DiT checkpoint the LoRA was trained on (Wan 2.2 A14B: the low-noise expert)")
    group.add_argument("--dit_high_noise", default=None, help="Wan 2.2 A14B: the high-noise expert")
    group.add_argument("--timestep_boundary", type=float, default=None, help="Wan 2.2 A14B: where the high-noise expert takes over")
    group.add_argument("--model_args", nargs="+", default=None, metavar="KEY=VALUE", help="more keyword arguments for the adapter factory")
    group.add_argument("--validation_timesteps", type=int, default=DEFAULT_TIMESTEPS, help="noise levels per item (default: %(default)s)")
    group.add_argument("--validation_bands", type=int, default=DEFAULT_BANDS, help="bands to report (default: %(default)s)")
    group.add_argument("--validation_seed", type=int, default=0, help="seed of the validation noise (default: %(default)s)")
    add_timestep_arguments(parser)


def run_cli(args: argparse.Namespace) -> int:
    if args.candidates is None:
        if args.validation_data_dir or args.model:
            raise MusubiError("--validation_data_dir and --model score candidates: give --candidates too, e.g. '0.9,0.95,0.99'.")
        return ema.run_cli(args)
    if not args.validation_data_dir or not args.model:
        raise MusubiError("--candidates needs --validation_data_dir (the data to score on) and --model (with --dit: the "
                          "model the LoRA was trained on).")
    mode = "sigma_rel" if args.sigma_rel is not None else ("beta_to_beta2" if args.beta2 is not None else "beta")
    candidates = parse_candidates(args.candidates, mode, "--candidates")
    try:
        data = open_training_data(args.validation_data_dir)
    except MusubiError as error:
        raise MusubiError(f"--validation_data_dir: {error}") from error
    options = dict(parse_key_value_args(args.model_args, "model_args") or {})
    for name in ("dit", "dit_high_noise", "timestep_boundary"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    adapter = load_adapter(args.model, data=data, **options)
    view = getattr(adapter, "training_dataset", None) or data
    validation = ValidationSet(view, args.validation_timesteps, args.validation_bands, args.validation_seed,
                               where="--validation_data_dir")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scores = score_candidates(args.paths, candidates, mode, adapter, validation, settings_from_args(args),
                              beta=args.beta, beta2=args.beta2, no_sort=args.no_sort, device=device)
    best = best_of(scores)
    print(score_table(scores, best))
    result = ema.post_hoc_ema_merge(args.paths, args.output_file, no_sort=args.no_sort, overwrite=True,
                                    **candidate_merge_options(mode, best.value, args.beta, args.beta2))
    print("Merge order (oldest first) and each file's weight in the result:")
    for path, weight in zip(result.files, result.weights):
        print(f"  {weight:10.6f}  {path}")
    print(f"Saved {result.output_file} (the best candidate, {best.label}: validation loss {best.loss:.5f})")
    return 0
