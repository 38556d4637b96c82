"""``python -m musubi train``: end to end in a subprocess, overrides, exit codes, Ctrl-C."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from musubi.cli import main
from musubi.data.latent_cache import write_latent_cache_item
from musubi.lora.formats import load_lora_state_dict
from musubi.lora.network import LoRANetwork
from musubi.training.adapter import ToyAdapter
from musubi.files import read_header
from musubi.training.cli import ConsoleProgress, _stop_on_ctrl_c, add_cli_arguments

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_cache(folder, count=3):
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        write_latent_cache_item(folder, f"item{index}", torch.randn(4, 4, 4, generator=generator),
                                context=torch.randn(2 + index, 8, generator=generator))


def config_file(tmp_path, extra=""):
    path = tmp_path / "train.toml"
    path.write_text(textwrap.dedent(f"""
        model = "toy"
        data_dir = "{(tmp_path / 'data').as_posix()}"
        [network]
        network_dim = 4
        [optimizer]
        learning_rate = 1e-3
        [training]
        max_train_steps = 100
        batch_size = 2
        seed = 1
        save_state = true
        [output]
        output_dir = "{(tmp_path / 'out').as_posix()}"
        output_name = "toy"
    """) + extra)
    return str(path)


def test_cli_trains_a_lora_in_a_subprocess(tmp_path):
    toy_cache(tmp_path / "data")
    command = [
        sys.executable, "-m", "musubi", "train", "--config_file", config_file(tmp_path),
        "--max_train_steps", "6", "--lora_format", "musubi", "--no-save_state",
        "--network_args", "loraplus_lr_ratio=2", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "50%",
    ]
    environment = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr
    assert "Done: 6 steps" in completed.stdout
    final = tmp_path / "out" / "toy.safetensors"
    assert sorted(os.listdir(tmp_path / "out")) == ["toy.safetensors"]  # --no-save_state beat the file's true
    network = LoRANetwork(ToyAdapter().lora_root(), "generic", network_dim=4)
    lora, metadata, layout = load_lora_state_dict(str(final), module_names=network.module_names())
    assert layout == "musubi"
    assert set(lora) == set(network.state_dict())
    assert metadata["ss_steps"] == "6" and metadata["ss_max_train_steps"] == "6"
    assert metadata["ss_network_args"] == '{"loraplus_lr_ratio": "2"}'
    assert metadata["ss_lr_scheduler"] == "constant_with_warmup" and metadata["ss_seed"] == "1"
    assert any(float(lora[key].abs().max()) > 0 for key in lora if key.endswith("lora_up.weight"))


def test_cli_in_process_overrides_and_tables(tmp_path, capsys):
    toy_cache(tmp_path / "data", count=2)
    code = main(["train", "--config_file", config_file(tmp_path), "--max_train_steps", "2",
                 "--model_args", "width=16", "seed=4", "--save_every_n_steps", "1", "--save_last_n_checkpoints", "1"])
    assert code == 0
    output = capsys.readouterr().out
    assert "step 2/2" in output and "saved" in output
    assert sorted(os.listdir(tmp_path / "out")) == ["toy-step000002-state", "toy-step000002.safetensors", "toy.safetensors"]
    tensors, _ = read_header(str(tmp_path / "out" / "toy.safetensors"))
    assert tensors["diffusion_model.blocks.0.fc1.lora_down.weight"][1] == (4, 16)  # the width of model_args


def test_cli_errors_exit_with_code_2_and_name_the_key(tmp_path, capsys):
    toy_cache(tmp_path / "data", count=1)
    code = main(["train", "--config_file", config_file(tmp_path, 'learning_rat = 1e-4\n')])
    assert code == 2
    assert "unknown option 'learning_rat'; did you mean 'learning_rate'?" in capsys.readouterr().err
    code = main(["train", "--config_file", config_file(tmp_path), "--model", "nowhere.mod:make"])
    assert code == 2
    assert "cannot import nowhere.mod" in capsys.readouterr().err


def test_every_boolean_can_be_switched_off_and_numbers_are_converted():
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(["--no-save_state", "--gradient_checkpointing", "--learning_rate", "2e-4",
                              "--lr_warmup_steps", "10%", "--lr_decay_steps", "0.25", "--min_timestep", "100"])
    assert args.save_state is False and args.gradient_checkpointing is True
    assert args.learning_rate == 2e-4 and args.lr_warmup_steps == "10%" and args.lr_decay_steps == 0.25
    assert args.min_timestep == 100
    assert not hasattr(args, "max_train_steps")  # options not given stay unset, so the file decides
    args = parser.parse_args(["--no-preserve_distribution_shape"])
    assert args.preserve_distribution_shape is False


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name == "nt", reason="POSIX signals")
def test_first_ctrl_c_requests_a_stop_and_the_second_aborts():
    progress = ConsoleProgress()
    with _stop_on_ctrl_c(progress):
        os.kill(os.getpid(), signal.SIGINT)
        assert progress.should_stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_fresh_run_into_the_same_output_is_refused_and_resume_continues(tmp_path, capsys):
    toy_cache(tmp_path / "data", count=2)
    assert main(["train", "--config_file", config_file(tmp_path), "--max_train_steps", "2", "--save_every_n_steps", "1"]) == 0
    out = tmp_path / "out"
    before = {name: (out / name / "trainer_state.json" if (out / name).is_dir() else out / name).read_bytes()
              for name in os.listdir(out)}
    capsys.readouterr()

    code = main(["train", "--config_file", config_file(tmp_path), "--max_train_steps", "3", "--learning_rate", "1e-2"])
    assert code == 2
    error = capsys.readouterr().err
    assert "already holds files of a run named 'toy'" in error and "resume = 'latest'" in error and "output_name" in error
    after = {name: (out / name / "trainer_state.json" if (out / name).is_dir() else out / name).read_bytes()
             for name in os.listdir(out)}
    assert after == before  # nothing was touched

    assert main(["train", "--config_file", config_file(tmp_path), "--max_train_steps", "3", "--resume", "latest"]) == 0
    output = capsys.readouterr().out
    assert f"Resumed from {out / 'toy-step000002-state'} (step 2)." in output and "Done: 3 steps" in output


@pytest.mark.parametrize("command", ["train", "ema-merge", "timesteps", "quantize"])
def test_command_help_says_each_default_once_in_plain_text(command):
    result = subprocess.run([sys.executable, "-m", "musubi", command, "--help"], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert not re.search(r"\(default[^)]*\) \(default", text), text
    assert "``" not in text


def test_top_level_help_is_plain_text_and_the_learning_rate_default_is_explained():
    top = subprocess.run([sys.executable, "-m", "musubi", "--help"], capture_output=True, text=True, cwd=REPO_ROOT,
                         timeout=120)
    assert "``" not in top.stdout and "one sub-command per feature" in top.stdout
    train = " ".join(subprocess.run([sys.executable, "-m", "musubi", "train", "--help"], capture_output=True, text=True,
                                    cwd=REPO_ROOT, timeout=120).stdout.split())
    assert "the default is musubi-tuner's" in train and "(default: 2e-06)" in train
