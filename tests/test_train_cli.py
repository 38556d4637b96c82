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
from musubi.data.cache import latent_tensor_key
from musubi.data.latent_cache import write_latent_cache_item
from musubi.data.musubi_cache import open_training_data
from musubi.data.text_embeddings import TextEmbedding, save_text_embedding
from musubi.lora.formats import load_lora_state_dict
from musubi.lora.network import LoRANetwork
from musubi.training.adapter import ToyAdapter
from musubi.files import atomic_save_file, read_header
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


# --- built-in models, musubi-tuner's dataset configs, repeats -------------------------------------


def musubi_cache(folder, names, seed=0, shape=(16, 1, 4, 4)):
    """Caches in musubi-tuner's layout (as its caching scripts and the Training Dataset node write
    them): ``<name>_0032x0032_wan.safetensors`` latents and ``<name>_wan_te.safetensors`` texts."""
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        latent = torch.randn(shape, generator=generator)
        atomic_save_file({latent_tensor_key(latent): latent}, os.path.join(folder, f"{name}_0032x0032_wan.safetensors"),
                         {"architecture": "wan", "width": "32", "height": "32", "format_version": "1.0.1"})
        save_text_embedding(os.path.join(folder, f"{name}_wan_te.safetensors"),
                            TextEmbedding(torch.randn(3, 4096, generator=generator), None, "wan", {}), caption=name)
    return str(folder)


WAN_TOY = ["--model", "test_dataset:wan_toy"]  # the toy model dressed as Wan


def test_train_help_lists_the_models_by_name_and_musubis_options():
    result = subprocess.run([sys.executable, "-m", "musubi", "train", "--help"], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120)
    text = " ".join(result.stdout.split())
    for name in ("comfyui", "wan", "hunyuan_video", "flux", "qwen_image", "framepack", "toy"):
        assert f"{name} (" in text, name
    for option in ("--dit", "--dit_high_noise", "--timestep_boundary", "--fp8_scaled", "--dataset_config", "--num_repeats"):
        assert option in text, option


def test_a_dataset_config_trains_on_its_cache_directories_with_their_repeats(tmp_path, capsys):
    musubi_cache(tmp_path / "cache_a", ["a0", "a1"])
    musubi_cache(tmp_path / "cache_b", ["b0"], seed=1)
    (tmp_path / "images_a").mkdir()
    (tmp_path / "dataset.toml").write_text(textwrap.dedent("""
        [general]
        resolution = [32, 32]
        [[datasets]]
        image_directory = "images_a"
        cache_directory = "cache_a"
        num_repeats = 3
        [[datasets]]
        image_directory = "images_b"
        cache_directory = "cache_b"
    """))
    dataset = open_training_data(dataset_config=str(tmp_path / "dataset.toml"))
    assert len(dataset) == 2 * 3 + 1  # the images themselves are not needed: musubi-tuner trains from the caches
    assert [item.name for item in dataset.items[:4]] == ["a0_0032x0032_wan"] * 3 + ["a1_0032x0032_wan"]
    code = main(["train", *WAN_TOY, "--dataset_config", str(tmp_path / "dataset.toml"), "--output_dir", str(tmp_path / "out"),
                 "--max_train_epochs", "2", "--learning_rate", "1e-3", "--seed", "1"])
    assert code == 0, capsys.readouterr().err
    assert "Done: 14 steps" in capsys.readouterr().out  # 7 items with repeats, batch 1, 2 epochs
    _, metadata = read_header(str(tmp_path / "out" / "lora.safetensors"))
    assert metadata["ss_num_batches_per_epoch"] == "7"

    # data_dir takes num_repeats for all of its items.
    assert len(open_training_data(data_dir=str(tmp_path / "cache_a"), num_repeats=2)) == 4
    toy_cache(tmp_path / "plain", count=2)
    assert len(open_training_data(data_dir=str(tmp_path / "plain"), num_repeats=3)) == 6


def test_data_and_expert_option_errors_name_the_fix(tmp_path, capsys):
    musubi_cache(tmp_path / "cache", ["x"])
    (tmp_path / "dataset.toml").write_text('[[datasets]]\nimage_directory = "img"\ncache_directory = "cache"\nbatch_size = 4\n')
    common = [*WAN_TOY, "--output_dir", str(tmp_path / "out"), "--learning_rate", "1e-3"]
    cases = [
        (["--data_dir", str(tmp_path / "cache"), "--dataset_config", str(tmp_path / "dataset.toml")], "give one of them"),
        ([], "the training data is required: data_dir"),
        (["--data_dir", str(tmp_path / "cache"), "--timestep_boundary", "0.9"], "set dit_high_noise too"),
        (["--dataset_config", str(tmp_path / "dataset.toml")], "sets batch_size = 4 but the run's batch_size is 1"),
        (["--dataset_config", str(tmp_path / "dataset.toml"), "--batch_size", "4", "--num_repeats", "2"],
         "with dataset_config set num_repeats in each [[datasets]] entry"),
    ]
    for extra, message in cases:
        assert main(["train", *common, *extra]) == 2, extra
        assert message in capsys.readouterr().err, (extra, message)
    toy_cache(tmp_path / "plain", count=1)
    assert main(["train", "--model", "toy", "--data_dir", str(tmp_path / "plain"), "--output_dir", str(tmp_path / "out"),
                 "--learning_rate", "1e-3", "--fp8_scaled"]) == 2
    assert "model 'toy' does not take fp8_scaled" in capsys.readouterr().err


def test_comfyui_models_say_how_to_find_comfyui(tmp_path):
    musubi_cache(tmp_path / "cache", ["x"])
    environment = {key: value for key, value in os.environ.items() if key != "COMFYUI_PATH"}
    environment["PYTHONPATH"] = REPO
    command = [sys.executable, "-m", "musubi", "train", "--model", "wan", "--dit", str(tmp_path / "missing.safetensors"),
               "--data_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--learning_rate", "1e-3"]
    completed = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 2
    assert "model 'wan': needs ComfyUI" in completed.stderr and "COMFYUI_PATH is not set" in completed.stderr


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name == "nt", reason="POSIX signals")
def test_sigterm_requests_the_same_stop_and_never_aborts():
    progress = ConsoleProgress()
    with _stop_on_ctrl_c(progress):
        os.kill(os.getpid(), signal.SIGTERM)
        assert progress.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher's repeated SIGTERM: still the one stop, no abort
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_validation_data_dir_and_every_n_steps_from_the_command_line_and_toml(tmp_path, capsys):
    toy_cache(tmp_path / "data", count=3)
    generator = torch.Generator().manual_seed(4)
    write_latent_cache_item(tmp_path / "val", "held", torch.randn(4, 4, 4, generator=generator),
                            context=torch.randn(3, 8, generator=generator))
    code = main(["train", "--config_file", config_file(tmp_path), "--max_train_steps", "4",
                 "--validation_data_dir", str(tmp_path / "val"), "--validate_every_n_steps", "2"])
    assert code == 0, capsys.readouterr().err
    printed = re.findall(r"step (\d+)/4  validation loss ([0-9.]+) \(noise-level bands (.*)\)", capsys.readouterr().out)
    assert [int(step) for step, _, _ in printed] == [0, 2, 4]
    assert all(len(bands.split(", ")) == 4 for _, _, bands in printed)

    # the same as TOML keys, in a second output: the same numbers (fixed noise and levels)
    extra = f'[validation]\nvalidation_data_dir = "{(tmp_path / "val").as_posix()}"\nvalidate_every_n_steps = 2\n'
    path = config_file(tmp_path, extra)
    assert main(["train", "--config_file", path, "--max_train_steps", "4", "--output_dir", str(tmp_path / "out2")]) == 0
    again = re.findall(r"step (\d+)/4  validation loss ([0-9.]+) \(noise-level bands (.*)\)", capsys.readouterr().out)
    assert again == printed

    # errors name the option and the fix
    assert main(["train", "--config_file", config_file(tmp_path), "--validate_every_n_steps", "2",
                 "--output_dir", str(tmp_path / "out3")]) == 2
    assert "validate_every_n_steps is set but validation_data_dir is not" in capsys.readouterr().err
    write_latent_cache_item(tmp_path / "wide", "other", torch.randn(8, 4, 4), context=torch.randn(3, 8))
    assert main(["train", "--config_file", config_file(tmp_path), "--validation_data_dir", str(tmp_path / "wide"),
                 "--output_dir", str(tmp_path / "out4")]) == 2
    assert "validation item 0 has a latent of shape [8, 4, 4]" in capsys.readouterr().err
    assert main(["train", "--config_file", config_file(tmp_path), "--validation_data_dir", str(tmp_path / "nowhere"),
                 "--output_dir", str(tmp_path / "out5")]) == 2
    assert "validation_data_dir: data_dir" in capsys.readouterr().err
