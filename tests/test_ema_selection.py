"""Post-hoc EMA chosen by validation loss (library and ``python -m musubi ema-merge``): every
candidate is listed, the lowest wins, and the numbers agree with an independent computation
(merge weights from the EMA formula, the flow-matching loss by hand); without candidates the
command writes exactly today's merge."""

from __future__ import annotations

import glob
import re

import pytest
import torch
from safetensors.torch import load_file

from musubi.cli import main
from musubi.data.latent_cache import LatentCacheDataset, write_latent_cache_item
from musubi.errors import MusubiError
from musubi.files import read_header
from musubi.lora.ema import post_hoc_ema_merge
from musubi.lora.network import LoRANetwork
from musubi.training.adapter import ToyAdapter
from musubi.training.ema_selection import best_of, parse_candidates, score_candidates, score_table
from musubi.training.loop import Trainer
from musubi.training.settings import TrainSettings
from musubi.training.timesteps import TimestepSettings
from musubi.training.validation import ValidationSet, noise_seed

torch.set_num_threads(1)
UNIFORM = TimestepSettings(timestep_sampling="uniform")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Four checkpoints of a toy run (steps 3, 6, 9, 12) and one validation item."""
    root = tmp_path_factory.mktemp("ema_run")
    generator = torch.Generator().manual_seed(0)
    pattern = torch.tensor([3.0, -3.0, 2.0, -2.0]).reshape(4, 1, 1).expand(4, 4, 4).clone()
    for index in range(2):
        write_latent_cache_item(root / "data", f"item{index}", pattern + 0.1 * torch.randn(4, 4, 4, generator=generator),
                                context=torch.randn(3, 8, generator=generator))
    write_latent_cache_item(root / "val", "held", pattern, context=torch.randn(3, 8, generator=generator))
    adapter = ToyAdapter()
    torch.manual_seed(0)
    network = LoRANetwork(adapter.lora_root(), "generic", network_dim=4, network_alpha=4.0)
    Trainer(adapter, network, LatentCacheDataset(root / "data"), TrainSettings(
        output_dir=str(root / "out"), learning_rate=3e-2, seed=1, max_train_steps=12, save_every_n_steps=3,
        save_state=False, timesteps=UNIFORM)).train()
    network.remove()
    paths = sorted(glob.glob(str(root / "out" / "lora-step*.safetensors")))
    assert len(paths) == 4
    return root, paths


def hand_loss(adapter, merged, data, num_timesteps=8, seed=0) -> float:
    """The validation loss of a LoRA state dict, from the formulas alone."""
    network = LoRANetwork(adapter.lora_root(), "generic", network_dim=4, network_alpha=4.0)
    if merged:  # else a fresh LoRA (lora_up zero): the base model
        network.load_weights(merged)
    network.eval()
    total, count = 0.0, 0
    try:
        for item in range(len(data)):
            entry = data[item]
            for k in range(num_timesteps):
                t = (k + 0.5) / num_timesteps
                noise = torch.randn((4, 4, 4), generator=torch.Generator().manual_seed(noise_seed(seed, item, k)))
                x0 = entry["latents"]
                with torch.no_grad():
                    prediction = adapter.model(((1 - t) * x0 + t * noise)[None], torch.tensor([1000 * t]), entry["context"][None])[0]
                total += ((prediction - (noise - x0)) ** 2).mean().item()
                count += 1
    finally:
        network.remove()
    return total / count


def ema_by_formula(paths, beta):
    """Constant decay β over n files: w_0 = β^(n−1), w_i = (1 − β)·β^(n−1−i)."""
    n = len(paths)
    weights = [beta ** (n - 1)] + [(1 - beta) * beta ** (n - 1 - i) for i in range(1, n)]
    tensors = [load_file(path) for path in paths]
    merged = {}
    for key in tensors[0]:
        if key.endswith(".alpha"):
            merged[key] = tensors[0][key]
        else:
            merged[key] = sum(w * t[key].double() for w, t in zip(weights, tensors)).float()
    return merged


def test_every_candidate_is_scored_and_the_lowest_is_picked(run):
    root, paths = run
    adapter = ToyAdapter()
    data = LatentCacheDataset(root / "val")
    candidates = [0.0, 0.5, 0.8, 0.95]
    scores = score_candidates(paths, candidates, "beta", adapter, ValidationSet(data), UNIFORM, no_sort=True)
    assert [score.value for score in scores] == candidates
    by_hand = {beta: hand_loss(adapter, ema_by_formula(paths, beta), data) for beta in candidates}
    for score in scores:
        assert score.loss == pytest.approx(by_hand[score.value], rel=1e-4), score.label
    assert best_of(scores).value == min(by_hand, key=by_hand.get)
    assert len({round(score.loss, 6) for score in scores}) == len(candidates)  # the profiles really differ
    table = score_table(scores, best_of(scores))
    assert len(table.splitlines()) == 1 + len(candidates) and table.count("← best") == 1
    # no LoRA stays attached to the model: the base model predicts as before
    assert hand_loss(adapter, {}, data) == pytest.approx(hand_loss(ToyAdapter(), {}, data), rel=0, abs=0)


def test_candidate_lists_are_parsed_and_checked():
    assert parse_candidates("0.05, 0.1 0.2\n0.28", "sigma_rel") == [0.05, 0.1, 0.2, 0.28]
    assert parse_candidates("0.9;0.95,0.9", "beta") == [0.9, 0.95]
    with pytest.raises(MusubiError, match="'x' is not a number; write beta values separated by commas"):
        parse_candidates("0.9, x", "beta")
    with pytest.raises(MusubiError, match="no candidates"):
        parse_candidates(" ", "sigma_rel")
    with pytest.raises(MusubiError, match="0.5"):
        parse_candidates("0.1, 0.5", "sigma_rel")  # beyond the largest valid sigma_rel


def test_the_command_writes_the_best_merge_and_without_candidates_todays(run, tmp_path, capsys):
    root, paths = run
    common = ["ema-merge", *paths, "--no_sort"]
    assert main([*common, "--output_file", str(tmp_path / "plain.safetensors"), "--beta", "0.8"]) == 0
    capsys.readouterr()
    today = post_hoc_ema_merge(paths, tmp_path / "today.safetensors", beta=0.8, no_sort=True)
    plain_tensors, today_tensors = load_file(tmp_path / "plain.safetensors"), load_file(today.output_file)
    assert all(plain_tensors[key].equal(today_tensors[key]) for key in today_tensors)
    assert read_header(str(tmp_path / "plain.safetensors"))[1] == read_header(today.output_file)[1]

    code = main([*common, "--output_file", str(tmp_path / "best.safetensors"), "--candidates", "0.0,0.5,0.8,0.95",
                 "--validation_data_dir", str(root / "val"), "--model", "toy", "--timestep_sampling", "uniform"])
    out = capsys.readouterr().out
    assert code == 0
    rows = re.findall(r"^beta ([0-9.]+)\s+([0-9.]+)", out, flags=re.M)
    assert [float(value) for value, _ in rows] == [0.0, 0.5, 0.8, 0.95]
    adapter, data = ToyAdapter(), LatentCacheDataset(root / "val")
    by_hand = {float(value): hand_loss(adapter, ema_by_formula(paths, float(value)), data) for value, _ in rows}
    for value, printed in rows:
        assert float(printed) == pytest.approx(by_hand[float(value)], abs=2e-5)
    pick = min(by_hand, key=by_hand.get)
    assert f"the best candidate, beta {pick:g}" in out
    written = load_file(tmp_path / "best.safetensors")
    expected = post_hoc_ema_merge(paths, tmp_path / "expected.safetensors", beta=pick, no_sort=True)
    assert all(written[key].equal(load_file(expected.output_file)[key]) for key in written)


def test_command_errors_name_the_option(run, tmp_path, capsys):
    root, paths = run
    common = ["ema-merge", *paths, "--output_file", str(tmp_path / "x.safetensors")]
    assert main([*common, "--candidates", "0.9"]) == 2
    assert "--candidates needs --validation_data_dir" in capsys.readouterr().err
    assert main([*common, "--candidates", "0.9,nine", "--validation_data_dir", str(root / "val"), "--model", "toy"]) == 2
    assert "--candidates: 'nine' is not a number" in capsys.readouterr().err
    assert main([*common, "--validation_data_dir", str(root / "val")]) == 2
    assert "give --candidates too" in capsys.readouterr().err
