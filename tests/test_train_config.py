"""Training TOML configs: musubi-tuner's flattening and precedence, with every value checked."""

from __future__ import annotations

import textwrap

import pytest

from musubi.errors import MusubiError
from musubi.training.config import config_options, load_train_config, read_config_file

BASE = """
model = "toy"
data_dir = "cache"
output_dir = "out"
"""


def write(tmp_path, text, name="train.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_tables_are_flattened_and_sub_tables_become_table_values(tmp_path):
    path = write(tmp_path, BASE + """
        [network]
        network_dim = 16
        network_alpha = 8
        [optimizer]
        learning_rate = 2e-4
        lr_warmup_steps = "10%"
        [optimizer.optimizer_args]
        weight_decay = 0.01
        betas = [0.9, 0.99]
        [network_args]
        loraplus_lr_ratio = 4
        [timesteps]
        timestep_sampling = "shift"
        discrete_flow_shift = 3
    """)
    values, source = read_config_file(path)
    assert source == path
    assert values["network_dim"] == 16 and values["learning_rate"] == 2e-4
    assert values["optimizer_args"] == {"weight_decay": 0.01, "betas": [0.9, 0.99]}
    assert values["network_args"] == {"loraplus_lr_ratio": 4}
    config = load_train_config(path)
    assert config.model == "toy" and config.data_dir == "cache" and config.network_dim == 16
    assert config.network_alpha == 8.0 and isinstance(config.network_alpha, float)
    assert config.network_args == {"loraplus_lr_ratio": 4}
    settings = config.settings
    assert settings.learning_rate == 2e-4 and settings.lr_warmup_steps == "10%"
    assert settings.optimizer_args == {"weight_decay": 0.01, "betas": [0.9, 0.99]}
    assert settings.timesteps.timestep_sampling == "shift" and settings.timesteps.discrete_flow_shift == 3.0
    # Defaults where nothing was said (musubi-tuner's, except save_state which is on here).
    assert settings.max_train_steps == 1600 and settings.max_grad_norm == 1.0 and settings.save_state is True
    assert settings.lora_format == "comfyui" and settings.optimizer_type == "AdamW"


def test_command_line_wins_over_the_file_and_the_file_over_defaults(tmp_path):
    path = write(tmp_path, BASE + """
        learning_rate = 1e-3
        save_state = true
        max_train_steps = 100
    """)
    config = load_train_config(path[:-len(".toml")], {"learning_rate": 5e-5, "save_state": False})  # ".toml" is appended
    assert config.settings.learning_rate == 5e-5
    assert config.settings.save_state is False
    assert config.settings.max_train_steps == 100
    assert config.settings.batch_size == 1


def test_unknown_keys_are_errors_with_a_suggestion(tmp_path):
    with pytest.raises(MusubiError, match=r"unknown option 'learning_rat'; did you mean 'learning_rate'\?"):
        load_train_config(write(tmp_path, BASE + "learning_rat = 1e-4\n"))
    with pytest.raises(MusubiError, match="'fp8_base' is a musubi-tuner option.*fp8_scaled"):
        load_train_config(write(tmp_path, BASE + "[extra]\nfp8_base = true\n"))
    with pytest.raises(MusubiError, match="data_dir and dataset_config are both set; give one of them"):
        load_train_config(write(tmp_path, BASE + "[data]\ndataset_config = 'x.toml'\n"))
    with pytest.raises(MusubiError, match="unknown option 'zzz'"):
        load_train_config(write(tmp_path, BASE), {"zzz": 1})


@pytest.mark.parametrize("line, match", [
    ('learning_rate = "1e-4"', r"learning_rate must be a number, got '1e-4' \(str\); write the number without quotes"),
    ("max_train_steps = 1.5", r"max_train_steps must be an integer, got 1.5 \(float\)"),
    ('save_state = "yes"', r"save_state must be true or false, got 'yes'"),
    ("seed = true", r"seed must be an integer \(or unset\), got True"),
    ('mixed_precision = "fp8"', r"mixed_precision = 'fp8' is not a choice; choose one of no, fp16, bf16"),
    ('timestep_sampling = "bogus"', r"timestep_sampling = 'bogus' is not a choice"),
    ("optimizer_args = 3", r"optimizer_args must be a list of 'key=value' strings or a table, got 3"),
    ('lr_warmup_steps = "soon"', r"lr_warmup_steps"),
    ("network_dim = 2.0", r"network_dim must be an integer"),
])
def test_wrong_types_and_choices_name_key_type_and_value(tmp_path, line, match):
    path = write(tmp_path, BASE + line + "\n")
    with pytest.raises(MusubiError, match=match) as error:
        load_train_config(path)
    assert path in str(error.value)


def test_integers_are_accepted_for_number_options(tmp_path):
    config = load_train_config(write(tmp_path, BASE + "learning_rate = 1\nmax_grad_norm = 0\n"))
    assert config.settings.learning_rate == 1.0 and isinstance(config.settings.learning_rate, float)
    assert config.settings.max_grad_norm == 0.0


def test_a_key_set_twice_is_an_error(tmp_path):
    path = write(tmp_path, BASE + "[a]\nseed = 1\n[b]\nseed = 2\n")
    with pytest.raises(MusubiError, match=r"'seed' is set twice \(table \[a\] and table \[b\]\)"):
        read_config_file(path)


def test_file_problems_are_errors_naming_the_file(tmp_path):
    with pytest.raises(MusubiError, match="missing.toml: file not found"):
        load_train_config(str(tmp_path / "missing"))
    bad = write(tmp_path, "model = \n")
    with pytest.raises(MusubiError, match="not valid TOML"):
        load_train_config(bad)


def test_required_options(tmp_path):
    with pytest.raises(MusubiError, match="model is required"):
        load_train_config(write(tmp_path, 'data_dir = "c"\noutput_dir = "o"\n'))
    with pytest.raises(MusubiError, match="the training data is required: data_dir .* or dataset_config"):
        load_train_config(write(tmp_path, 'model = "toy"\noutput_dir = "o"\n'))
    with pytest.raises(MusubiError, match="output_dir is required"):
        load_train_config(write(tmp_path, 'model = "toy"\ndata_dir = "c"\n'))


def test_every_musubi_option_named_in_the_spec_is_known():
    names = set(config_options())
    expected = {
        "dit", "network_dim", "network_alpha", "network_dropout", "network_args", "network_weights", "learning_rate",
        "optimizer_type", "optimizer_args", "lr_scheduler", "lr_warmup_steps", "lr_decay_steps",
        "lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler_min_lr_ratio", "lr_scheduler_args",
        "max_train_steps", "max_train_epochs", "gradient_accumulation_steps", "max_grad_norm", "mixed_precision",
        "gradient_checkpointing", "seed", "output_dir", "output_name", "save_every_n_steps", "save_every_n_epochs",
        "save_last_n_checkpoints", "save_state", "resume", "save_precision", "log_with", "logging_dir", "log_prefix",
        "log_tracker_name", "timestep_sampling", "discrete_flow_shift", "sigmoid_scale", "logit_mean", "logit_std",
        "weighting_scheme", "mode_scale", "min_timestep", "max_timestep", "preserve_distribution_shape",
        "num_timestep_buckets", "model", "data_dir", "lora_format", "batch_size",
    }
    assert expected <= names
