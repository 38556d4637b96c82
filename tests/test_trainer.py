"""The training loop on the toy model: learning, flow matching, loss weights, exact resume,
checkpoints (keep-last-K, atomic writes, NaN stop), LoRA+ rates, TensorBoard, plus the latent
cache and the model adapter it builds on.

Reference values are computed here from the formulas (x_t = (1−t)·x0 + t·ε, target ε − x0,
per-sample MSE × weight, lr schedules), from what the model module itself receives, or by
comparing two runs that must agree; never from the trainer's own code.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from musubi.errors import MusubiError
from musubi.data.latent_cache import LatentCacheDataset, write_latent_cache_item
from musubi.lora.formats import load_lora_state_dict
from musubi.lora.network import LoRANetwork
from musubi.training.adapter import ToyAdapter, load_adapter
from musubi.training.timesteps import TimestepSettings
from musubi.training.checkpoints import find_latest_state, plan_run
from musubi.training.loop import TrainCallbacks, Trainer
from musubi.training.settings import TrainSettings

torch.set_num_threads(1)

PATTERN = torch.tensor([3.0, -3.0, 2.0, -2.0]).reshape(4, 1, 1)


# --- building blocks -----------------------------------------------------------------------------------


def write_items(folder, shapes, seed=0, context_lengths=None):
    """One item per latent shape [C, H, W]; random latents and contexts from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    for index, shape in enumerate(shapes):
        length = 3 if context_lengths is None else context_lengths[index]
        write_latent_cache_item(
            folder, f"item{index:02d}", torch.randn(shape, generator=generator),
            context=torch.randn(length, 8, generator=generator),
        )
    return LatentCacheDataset(folder)


def make_network(adapter, seed=0, **options):
    torch.manual_seed(seed)
    return LoRANetwork(adapter.lora_root(), "generic", network_dim=options.pop("network_dim", 4),
                       network_alpha=options.pop("network_alpha", 4.0), **options)


def settings(tmp_path, name="out", **values):
    values.setdefault("learning_rate", 1e-2)
    values.setdefault("seed", 7)
    values.setdefault("timesteps", TimestepSettings(timestep_sampling="uniform"))
    return TrainSettings(output_dir=str(tmp_path / name), **values)


class StopAt(TrainCallbacks):
    def __init__(self, step):
        self.step, self.seen = step, 0

    def on_step(self, step, loss, lrs):
        self.seen = step

    def should_stop(self):
        return self.seen >= self.step


class Recorder(TrainCallbacks):
    def __init__(self):
        self.steps, self.checkpoints = [], []

    def on_step(self, step, loss, lrs):
        self.steps.append((step, loss, dict(lrs)))

    def on_checkpoint(self, path):
        self.checkpoints.append(path)


class RecordingAdapter(ToyAdapter):
    """Records what the trainer hands over, and what the model module itself receives."""

    def __init__(self, **options):
        super().__init__(**options)
        self.calls, self.targets, self.model_timesteps = [], [], []
        self.model.register_forward_pre_hook(lambda module, args: self.model_timesteps.append(args[1].detach().clone()))

    def predict_velocity(self, noisy_latents, noise_level, batch):
        prediction = super().predict_velocity(noisy_latents, noise_level, batch)
        self.calls.append({"noisy": noisy_latents.detach().clone(), "t": noise_level.detach().clone(),
                           "prediction": prediction.detach().clone(), "context": batch["context"].clone()})
        return prediction

    def velocity_target(self, latents, noise):
        self.targets.append((latents.detach().clone(), noise.detach().clone()))
        return super().velocity_target(latents, noise)


def network_weights(network):
    return {key: value.detach().clone() for key, value in network.state_dict().items()}


# --- learning ----------------------------------------------------------------------------------


def test_toy_lora_learns_the_flow_matching_objective(tmp_path):
    generator = torch.Generator().manual_seed(0)
    contexts = [torch.randn(3, 8, generator=generator) for _ in range(2)]
    latents = PATTERN.expand(4, 4, 4).clone()
    for index, context in enumerate(contexts):
        write_latent_cache_item(tmp_path / "data", f"item{index}", latents, context=context)
    adapter = ToyAdapter()
    network = make_network(adapter)

    def held_out_loss():
        # An independent estimate of E‖v(x_t, t) − (ε − x0)‖² on fixed draws in the trained range.
        g = torch.Generator().manual_seed(123)
        x0 = latents.expand(64, 4, 4, 4)
        noise = torch.randn(x0.shape, generator=g)
        t = (0.2 + 0.8 * torch.rand(64, generator=g)).reshape(-1, 1, 1, 1)
        with torch.no_grad():
            prediction = adapter.model((1 - t) * x0 + t * noise, 1000 * t.reshape(-1), contexts[0].expand(64, 3, 8))
        return ((prediction - (noise - x0)) ** 2).mean().item()

    before = held_out_loss()
    result = Trainer(adapter, network, LatentCacheDataset(tmp_path / "data"), settings(
        tmp_path, max_train_steps=200, batch_size=2, save_state=False,
        timesteps=TimestepSettings(timestep_sampling="uniform", min_timestep=200),
    )).train()
    network.eval()
    after = held_out_loss()
    assert result.global_step == 200 and len(result.losses) == 200
    assert before / after > 5, (before, after)
    # The saved LoRA is what was trained.
    saved, _, _ = load_lora_state_dict(result.final_lora_path)
    trained = network.state_dict()
    assert set(saved) == set(trained)
    for key in trained:
        torch.testing.assert_close(saved[key], trained[key].float(), rtol=0, atol=0)


# --- flow matching and the loss ----------------------------------------------------------------


def test_flow_matching_input_target_and_exact_model_timestep(tmp_path):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 3)
    adapter = RecordingAdapter()
    recorder = Recorder()
    Trainer(adapter, make_network(adapter), dataset, settings(
        tmp_path, max_train_steps=3, save_state=False,
        timesteps=TimestepSettings(timestep_sampling="shift", discrete_flow_shift=3.0, min_timestep=100, max_timestep=900),
    ), recorder).train()

    stored = {tuple(dataset[i]["latents"].flatten()[:4].tolist()): dataset[i]["latents"] for i in range(3)}
    assert len(adapter.calls) == 3
    for call, (latents, noise), model_timestep in zip(adapter.calls, adapter.targets, adapter.model_timesteps):
        t = call["t"]
        assert t.dtype == torch.float32 and t.shape == (1,)
        assert 0.1 <= float(t) <= 0.9
        # The clean latent is the cached one; the noise is standard normal noise of its shape.
        assert torch.equal(latents[0], stored[tuple(latents[0].flatten()[:4].tolist())])
        assert noise.shape == latents.shape and not torch.equal(noise, latents)
        expected_noisy = (1 - float(t)) * latents.double() + float(t) * noise.double()
        torch.testing.assert_close(call["noisy"].double(), expected_noisy, rtol=0, atol=1e-6)
        # The model module is given exactly 1000·t (no +1).
        assert torch.equal(model_timestep, 1000.0 * t)
    # The reported loss is the MSE of the prediction against ε − x0.
    for (step, loss, _), call, (latents, noise) in zip(recorder.steps, adapter.calls, adapter.targets):
        expected = ((call["prediction"].double() - (noise.double() - latents.double())) ** 2).mean().item()
        assert loss == pytest.approx(expected, rel=1e-6)
    # Fresh noise every step.
    assert not torch.equal(adapter.targets[0][1], adapter.targets[1][1])


def test_sigma_sqrt_weights_each_sample_of_the_batch(tmp_path):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 2)
    adapter = RecordingAdapter()
    recorder = Recorder()
    Trainer(adapter, make_network(adapter), dataset, settings(
        tmp_path, max_train_steps=2, batch_size=2, save_state=False,
        timesteps=TimestepSettings(timestep_sampling="uniform", weighting_scheme="sigma_sqrt", min_timestep=50),
    ), recorder).train()
    for (_, loss, _), call, (latents, noise) in zip(recorder.steps, adapter.calls, adapter.targets):
        t = call["t"].double()
        assert t.shape == (2,) and t[0] != t[1]
        errors = ((call["prediction"].double() - (noise.double() - latents.double())) ** 2).reshape(2, -1).mean(dim=1)
        weights = t ** -2  # sigma_sqrt: 1/σ², σ = t
        by_hand = (weights[0] * errors[0] + weights[1] * errors[1]) / 2
        assert loss == pytest.approx(by_hand.item(), rel=1e-5)
        # Not musubi's mis-broadcast mean(w)·mean(error).
        assert loss != pytest.approx((weights.mean() * errors.mean()).item(), rel=1e-3)


def test_stratified_timesteps_cover_every_bucket_each_epoch(tmp_path):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 4)
    adapter = RecordingAdapter()
    Trainer(adapter, make_network(adapter), dataset, settings(
        tmp_path, max_train_steps=8, save_state=False,
        timesteps=TimestepSettings(timestep_sampling="uniform", num_timestep_buckets=4),
    )).train()
    t = torch.cat([call["t"] for call in adapter.calls])
    for epoch in range(2):
        buckets = sorted(int(value * 4) for value in t[4 * epoch: 4 * epoch + 4])
        assert buckets == [0, 1, 2, 3]


def test_each_epoch_visits_every_item_once_in_a_new_order(tmp_path):
    # Two latent shapes: batches never mix them. max_train_epochs wins over max_train_steps.
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 3 + [(4, 2, 6)] * 2)
    adapter = RecordingAdapter()
    result = Trainer(adapter, make_network(adapter), dataset, settings(
        tmp_path, max_train_steps=1000, max_train_epochs=3, batch_size=2, gradient_accumulation_steps=2, save_state=False,
    )).train()
    assert dataset.num_batches(2) == 3  # [2 + 1] of the first shape, [2] of the second
    assert result.global_step == 3 * 2  # 2 optimizer steps per epoch: 2 batches + 1 batch
    contexts = {tuple(dataset[i]["context"].flatten().tolist()): i for i in range(5)}
    orders = []
    for epoch in range(3):
        seen = []
        for call in adapter.calls[3 * epoch: 3 * epoch + 3]:
            seen += [contexts[tuple(row.flatten().tolist())] for row in call["context"]]
        assert sorted(seen) == [0, 1, 2, 3, 4]
        orders.append(seen)
    assert len({tuple(order) for order in orders}) > 1


# --- resume ------------------------------------------------------------------------------------


def resume_settings(tmp_path, name, **values):
    values.setdefault("gradient_accumulation_steps", 1)
    return settings(
        tmp_path, name, max_train_steps=10, batch_size=2, lr_scheduler="cosine", lr_warmup_steps=2,
        optimizer_args=["weight_decay=0.05"],
        timesteps=TimestepSettings(timestep_sampling="sigmoid", num_timestep_buckets=3), **values,
    )


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_gives_the_same_lora_as_an_uninterrupted_run(tmp_path, accumulation):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 3 + [(4, 2, 6)] * 2)

    def fresh(init_seed):
        adapter = ToyAdapter()
        return adapter, make_network(adapter, seed=init_seed, dropout=0.1, rank_dropout=0.2)

    adapter, network = fresh(0)
    straight = Trainer(adapter, network, dataset, resume_settings(
        tmp_path, "straight", gradient_accumulation_steps=accumulation, save_every_n_steps=5)).train()
    expected = network_weights(network)
    assert straight.global_step == 10

    # (a) Stop on request at step 5 (a forced state even with save_state off), resume in a new trainer.
    adapter, network = fresh(0)
    first = Trainer(adapter, network, dataset, resume_settings(
        tmp_path, "stopped", gradient_accumulation_steps=accumulation, save_state=False), StopAt(5)).train()
    assert first.interrupted and first.global_step == 5 and first.final_lora_path is None
    assert not os.path.exists(tmp_path / "stopped" / "lora.safetensors")
    assert first.last_state_dir == find_latest_state(str(tmp_path / "stopped"), "lora")
    adapter, network = fresh(1)  # other initial weights: the state must bring back the trained ones
    second = Trainer(adapter, network, dataset, resume_settings(
        tmp_path, "stopped", gradient_accumulation_steps=accumulation, save_state=False)).train(resume_from="latest")
    assert second.start_step == 5 and second.global_step == 10 and not second.interrupted
    assert first.losses + second.losses == straight.losses
    for key, value in network_weights(network).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)

    # (b) Resume from the periodic checkpoint at step 5 of the uninterrupted run.
    adapter, network = fresh(2)
    state = str(tmp_path / "straight" / "lora-step000005-state")
    resumed = Trainer(adapter, network, dataset, resume_settings(
        tmp_path, "from_periodic", gradient_accumulation_steps=accumulation)).train(resume_from=state)
    assert resumed.losses == straight.losses[5:]
    for key, value in network_weights(network).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)


def test_resume_warns_when_the_data_or_batch_size_changed(tmp_path):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 4)
    adapter = ToyAdapter()
    Trainer(adapter, make_network(adapter), dataset, settings(tmp_path, max_train_steps=4, batch_size=2), StopAt(2)).train()
    adapter = ToyAdapter()
    with pytest.warns(UserWarning, match="batch_size 2 → 1"):
        Trainer(adapter, make_network(adapter), dataset, settings(tmp_path, max_train_steps=4, batch_size=1)).train(resume_from="latest")


def test_resume_errors_name_the_problem(tmp_path):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 2)
    adapter = ToyAdapter()
    with pytest.raises(MusubiError, match="not found"):
        Trainer(adapter, make_network(adapter), dataset, settings(tmp_path, max_train_steps=2)).train(resume_from=str(tmp_path / "nope"))
    Trainer(adapter, make_network(adapter), dataset, settings(tmp_path, max_train_steps=2)).train()
    adapter = ToyAdapter()
    with pytest.raises(MusubiError, match="another layout"):
        Trainer(adapter, make_network(adapter, network_dim=2), dataset, settings(tmp_path, max_train_steps=4)).train(resume_from="latest")


# --- checkpoints -------------------------------------------------------------------------------


def test_keep_last_k_checkpoints_deletes_older_files_and_states(tmp_path):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora-step000020.safetensors").write_bytes(b"from an earlier, longer run")
    adapter = ToyAdapter()
    recorder = Recorder()
    result = Trainer(adapter, make_network(adapter), dataset, settings(
        tmp_path, max_train_steps=10, save_every_n_steps=2, save_last_n_checkpoints=2), recorder).train()
    assert sorted(os.listdir(out)) == [
        "lora-step000008-state", "lora-step000008.safetensors",
        "lora-step000010-state", "lora-step000010.safetensors",
        "lora-step000020.safetensors", "lora.safetensors",
    ]
    assert recorder.checkpoints == [str(out / f"lora-step{step:06d}.safetensors") for step in (2, 4, 6, 8, 10)] + [str(out / "lora.safetensors")]
    assert result.checkpoints == recorder.checkpoints[:-1]
    _, metadata, layout = load_lora_state_dict(str(out / "lora-step000008.safetensors"))
    assert metadata["ss_steps"] == "8" and layout == "comfyui"


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 2)
    out = tmp_path / "out"
    calls = {"count": 0}
    real_save = torch.save

    def failing_save(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 5:  # the second checkpoint: optimizer, scheduler, rng → fails in the middle
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    adapter = ToyAdapter()
    with pytest.raises(MusubiError, match="step 4.*No space left"):
        Trainer(adapter, make_network(adapter), dataset, settings(tmp_path, max_train_steps=6, save_every_n_steps=2)).train()
    monkeypatch.setattr(torch, "save", real_save)

    # Nothing of the failed checkpoint is visible; the previous one is complete.
    assert sorted(os.listdir(out)) == ["lora-step000002-state", "lora-step000002.safetensors"]
    # A hard crash (process killed) can leave a temporary or an incomplete folder: both are ignored.
    (out / ".lora-step000004-state.tmp-dead").mkdir()
    (out / "lora-step000006-state").mkdir()
    assert find_latest_state(str(out), "lora") == str(out / "lora-step000002-state")
    state = load_file(str(out / "lora-step000002-state" / "network.safetensors"))
    lora, _, _ = load_lora_state_dict(str(out / "lora-step000002.safetensors"))
    assert state.keys() == lora.keys()

    adapter = ToyAdapter()
    result = Trainer(adapter, make_network(adapter), dataset, settings(tmp_path, max_train_steps=6)).train(resume_from="latest")
    assert result.start_step == 2 and result.global_step == 6 and os.path.exists(result.final_lora_path)


class NaNFromStep(ToyAdapter):
    def __init__(self, step):
        super().__init__()
        self.step, self.calls = step, 0

    def predict_velocity(self, noisy_latents, noise_level, batch):
        self.calls += 1
        prediction = super().predict_velocity(noisy_latents, noise_level, batch)
        return prediction * float("nan") if self.calls >= self.step else prediction


def test_nan_loss_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 2)
    adapter = NaNFromStep(5)
    network = make_network(adapter)
    with pytest.raises(MusubiError) as error:
        Trainer(adapter, network, dataset, settings(tmp_path, max_train_steps=10, save_every_n_steps=2)).train()
    message = str(error.value)
    assert "step 5" in message and "learning_rate" in message and "bf16" in message
    assert "lora-step000004-state" in message
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == [f"lora-step00000{s}{suffix}" for s in (2, 4) for suffix in ("-state", ".safetensors")]
    assert all(bool(torch.isfinite(value).all()) for value in network.state_dict().values())
    lora, _, _ = load_lora_state_dict(str(out / "lora-step000004.safetensors"))
    assert all(bool(torch.isfinite(value).all()) for value in lora.values())


def test_schedule_free_saves_its_averaged_weights_and_saving_changes_nothing(tmp_path):
    from musubi.training.optimizers import eval_mode

    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 3)

    def run(name, init_seed=0, resume=None, **values):
        adapter = ToyAdapter()
        network = make_network(adapter, seed=init_seed)
        trainer = Trainer(adapter, network, dataset, settings(
            tmp_path, name, optimizer_type="AdamWScheduleFree", max_train_steps=6, **values))
        return trainer, network, trainer.train(resume_from=resume)

    trainer, network, result = run("saving", save_every_n_steps=3)
    training_weights = network_weights(network)
    with eval_mode(trainer.optimizer):
        averaged = network_weights(network)
    saved, _, _ = load_lora_state_dict(result.final_lora_path)
    for key in averaged:
        torch.testing.assert_close(saved[key], averaged[key], rtol=0, atol=0)
    assert any(not torch.equal(averaged[key], training_weights[key]) for key in averaged if "lora_up" in key)
    # Checkpoints in between do not disturb the training weights ...
    _, quiet, _ = run("quiet", save_state=False)
    for key, value in network_weights(quiet).items():
        torch.testing.assert_close(value, training_weights[key], rtol=0, atol=0)
    # ... and a resume from one continues exactly.
    _, resumed, _ = run("resumed", init_seed=5, resume=str(tmp_path / "saving" / "lora-step000003-state"))
    for key, value in network_weights(resumed).items():
        torch.testing.assert_close(value, training_weights[key], rtol=0, atol=1e-6)


# --- learning rates ----------------------------------------------------------------------------


def test_loraplus_ratio_holds_at_every_step_including_warmup(tmp_path):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 2)
    adapter = ToyAdapter()
    recorder = Recorder()
    network = make_network(adapter, loraplus_lr_ratio=4.0)
    lr, total, warmup = 1e-3, 8, 3
    Trainer(adapter, network, dataset, settings(
        tmp_path, learning_rate=lr, max_train_steps=total, lr_scheduler="linear", lr_warmup_steps=warmup, save_state=False,
    ), recorder).train()
    assert [step for step, _, _ in recorder.steps] == list(range(1, total + 1))
    for step, _, lrs in recorder.steps:
        k = step - 1  # scheduler steps taken before this optimizer step
        factor = k / warmup if k < warmup else (total - k) / (total - warmup)
        assert lrs["unet"] == pytest.approx(lr * factor, abs=1e-12)
        assert lrs["unet plus"] == pytest.approx(4.0 * lr * factor, abs=1e-12)


# --- logging -----------------------------------------------------------------------------------


def test_tensorboard_event_files_hold_losses_rates_and_the_timestep_histogram(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 2)
    adapter = ToyAdapter()
    Trainer(adapter, make_network(adapter), dataset, settings(
        tmp_path, max_train_steps=4, save_state=False, logging_dir=str(tmp_path / "logs"), log_prefix="run-",
        log_tracker_name="toy",
    )).train()
    files = glob.glob(str(tmp_path / "logs" / "run-*" / "toy" / "events.out.tfevents.*"))
    assert files
    events = EventAccumulator(files[0], size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    assert {"loss/current", "loss/average", "lr/unet"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("loss/current")] == [1, 2, 3, 4]
    assert "timesteps" in events.Tags()["histograms"]
    histogram = events.Histograms("timesteps")[-1].histogram_value
    assert histogram.num == 4 and 0 <= histogram.min and histogram.max <= 1000


def test_wandb_without_the_package_is_a_clear_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    dataset = write_items(tmp_path / "data", [(4, 4, 4)])
    adapter = ToyAdapter()
    with pytest.raises(MusubiError, match="pip install wandb"):
        Trainer(adapter, make_network(adapter), dataset, settings(tmp_path, max_train_steps=1, log_with="wandb")).train()


# --- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("values, match", [
    ({"learning_rate": "1e-4"}, "learning_rate must be a number.*without quotes"),
    ({"max_train_steps": 0}, "max_train_steps must be at least 1"),
    ({"mixed_precision": "fp8"}, "mixed_precision.*no, fp16, bf16"),
    ({"log_with": "tensorboard"}, "logging_dir"),
    ({"output_dir": None}, "output_dir is required"),
    ({"lr_warmup_steps": "ten"}, "lr_warmup_steps"),
])
def test_settings_errors_name_the_option(tmp_path, values, match):
    base = {"output_dir": str(tmp_path), **values}
    with pytest.raises(MusubiError, match=match):
        TrainSettings(**base).validate()


def test_mixed_precision_bf16_trains_on_cpu(tmp_path):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 2)
    adapter = RecordingAdapter()
    result = Trainer(adapter, make_network(adapter), dataset, settings(
        tmp_path, max_train_steps=2, mixed_precision="bf16", save_state=False)).train()
    assert adapter.calls[0]["prediction"].dtype == torch.bfloat16
    assert all(math.isfinite(loss) for loss in result.losses)


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 2)
    weights = []
    for enabled in (False, True):
        adapter = ToyAdapter()
        network = make_network(adapter)
        Trainer(adapter, network, dataset, settings(
            tmp_path, name=f"gc{enabled}", max_train_steps=3, gradient_checkpointing=enabled, save_state=False)).train()
        weights.append(network_weights(network))
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=1e-6)


# --- latent cache ------------------------------------------------------------------------------


def test_latent_cache_pads_contexts_and_buckets_by_shape(tmp_path):
    dataset = write_items(tmp_path / "data", [(4, 4, 4), (4, 4, 4), (4, 2, 6)], context_lengths=[2, 5, 3])
    assert len(dataset) == 3 and dataset.architecture == "generic"
    assert dataset.buckets() == {(4, 4, 4): [0, 1], (4, 2, 6): [2]}
    batch = dataset.collate([dataset[0], dataset[1]])
    assert batch["latents"].shape == (2, 4, 4, 4)
    assert batch["context"].shape == (2, 5, 8)
    assert batch["context_mask"].tolist() == [[True, True, False, False, False], [True] * 5]
    assert torch.equal(batch["context"][0, :2], dataset[0]["context"]) and not batch["context"][0, 2:].any()
    for _ in range(3):
        for indices in dataset.batches(2, torch.Generator().manual_seed(_)):
            assert len({dataset.items[i].latent_shape for i in indices}) == 1


def test_latent_cache_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MusubiError, match="no .safetensors items"):
        LatentCacheDataset(tmp_path / "empty")
    write_latent_cache_item(tmp_path / "mixed", "a", torch.zeros(4, 2, 2), architecture="wan", context=torch.zeros(1, 8))
    write_latent_cache_item(tmp_path / "mixed", "b", torch.zeros(4, 2, 2), architecture="flux", context=torch.zeros(1, 8))
    with pytest.raises(MusubiError, match="several architectures.*flux.*wan|several architectures.*wan.*flux"):
        LatentCacheDataset(tmp_path / "mixed")
    from safetensors.torch import save_file

    (tmp_path / "bad").mkdir()
    save_file({"context": torch.zeros(1, 8)}, str(tmp_path / "bad" / "x.safetensors"), {"architecture": "generic"})
    with pytest.raises(MusubiError, match="no 'latents' tensor"):
        LatentCacheDataset(tmp_path / "bad")
    dataset = write_items(tmp_path / "wan", [(4, 2, 2)])
    adapter = ToyAdapter()
    adapter.architecture = "wan"
    with pytest.raises(MusubiError, match="made for 'generic' but the model is 'wan'"):
        Trainer(adapter, make_network(ToyAdapter()), dataset, settings(tmp_path))


# --- model adapter -----------------------------------------------------------------------------


def test_load_adapter_specs():
    toy = load_adapter("toy", width=16, seed=3)
    assert toy.architecture == "generic" and toy.model.patch_in.out_features == 16
    assert not any(param.requires_grad for param in toy.lora_root().parameters())
    same = load_adapter("musubi.training.adapter:ToyAdapter", width=16, seed=3)
    assert torch.equal(same.model.proj_out.weight, toy.model.proj_out.weight)
    latents, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    assert torch.equal(toy.velocity_target(latents, noise), noise - latents)
    with pytest.raises(MusubiError, match=r"not a built-in model \(comfyui, wan, .*toy\) nor an import path 'package.module:factory'"):
        load_adapter("sd15")
    with pytest.raises(MusubiError, match="cannot import"):
        load_adapter("no_such_package_xyz.adapters:make")
    with pytest.raises(MusubiError, match="no callable named nothing"):
        load_adapter("musubi.training.adapter:nothing")
    with pytest.raises(MusubiError, match="not a model adapter"):
        load_adapter("musubi.training.adapter:flow_matching_velocity", latents=latents, noise=noise)
    with pytest.raises(MusubiError, match="does not take colour"):
        load_adapter("toy", colour="red")


# --- runs: where files go, which run a call continues, damaged states ------------------------------


def _file_bytes(folder):
    return {path: open(path, "rb").read() for path in sorted(glob.glob(os.path.join(str(folder), "**", "*"), recursive=True))
            if os.path.isfile(path)}


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])


def test_a_fresh_run_never_overwrites_another_runs_files(tmp_path):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 2)
    first = settings(tmp_path, max_train_steps=2, save_every_n_steps=1)
    adapter = ToyAdapter()
    Trainer(adapter, make_network(adapter), dataset, first).train()
    before = _file_bytes(tmp_path / "out")

    with pytest.raises(MusubiError, match=r"already holds files of a run named 'lora'.*resume = 'latest'.*output_name"):
        plan_run(first, None)
    assert plan_run(first, "latest").resume_from == "latest"  # a run with a state continues
    stateless = dataclasses.replace(first, output_name="stateless", save_state=False, save_every_n_steps=None)
    adapter = ToyAdapter()
    Trainer(adapter, make_network(adapter), dataset, stateless).train()
    with pytest.raises(MusubiError, match="found no resumable state of it, and a fresh run would overwrite"):
        plan_run(stateless, "latest")

    plan = plan_run(first, None, on_existing="new_name")
    assert plan.renamed_from == "lora" and plan.settings.output_name == "lora_2"
    assert plan.settings.output_dir == first.output_dir  # the folder is not named after the run: only the name changes
    assert "lora-step000001.safetensors" in plan.describe()
    adapter = ToyAdapter()
    second = Trainer(adapter, make_network(adapter, seed=1), dataset, plan.settings).train(resume_from=plan.resume_from)
    assert second.final_lora_path == str(tmp_path / "out" / "lora_2.safetensors")
    after = _file_bytes(tmp_path / "out")
    assert {path: after[path] for path in before} == before  # the first run's files are untouched
    assert plan_run(first, None, on_existing="new_name").settings.output_name == "lora_3"

    # A folder named after the run moves with the new name (the node's my_lora/ → my_lora_2/).
    named = settings(tmp_path, "lora", max_train_steps=1, state_dir=str(tmp_path / "states" / "lora"))
    adapter = ToyAdapter()
    Trainer(adapter, make_network(adapter), dataset, named).train()
    moved = plan_run(named, None, on_existing="new_name").settings
    assert (moved.output_dir, moved.state_dir, moved.output_name) == (
        str(tmp_path / "lora_2"), str(tmp_path / "states" / "lora_2"), "lora_2")


def test_states_go_to_state_dir_and_old_states_in_output_dir_still_resume(tmp_path):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 2)
    out, states = tmp_path / "out", tmp_path / "states"
    adapter = ToyAdapter()
    Trainer(adapter, make_network(adapter), dataset, settings(tmp_path, max_train_steps=4, save_every_n_steps=2)).train()
    assert (out / "lora-step000004-state").is_dir()  # default: beside the LoRA files, as musubi-tuner

    # The same run continued with a separate state folder: the old state is found, new ones go there.
    adapter = ToyAdapter()
    result = Trainer(adapter, make_network(adapter), dataset, settings(
        tmp_path, max_train_steps=8, save_every_n_steps=2, save_last_n_checkpoints=2, state_dir=str(states),
    )).train(resume_from="latest")
    assert result.start_step == 4 and result.resumed_from == str(out / "lora-step000004-state")
    assert sorted(os.listdir(states)) == ["lora-step000006-state", "lora-step000008-state"]
    # keep-last-2 pruned the old layout's states with their LoRA files
    assert sorted(os.listdir(out)) == ["lora-step000006.safetensors", "lora-step000008.safetensors", "lora.safetensors"]
    assert "max_train_steps 4 → 8" in result.resume_changes


def test_resume_falls_back_past_a_damaged_state_and_names_it(tmp_path):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 2)
    out = tmp_path / "out"

    def run(steps, resume=None, **values):
        adapter = ToyAdapter()
        return Trainer(adapter, make_network(adapter), dataset, settings(
            tmp_path, max_train_steps=steps, save_every_n_steps=2, **values)).train(resume_from=resume)

    straight = run(6)
    _truncate(out / "lora-step000006-state" / "network.safetensors")
    with pytest.raises(MusubiError, match=r"lora-step000006-state/network\.safetensors.*damaged or truncated"):
        run(8, resume=str(out / "lora-step000006-state"))  # asked for by name: no fallback

    result = run(8, resume="latest")
    assert result.start_step == 4 and result.resumed_from == str(out / "lora-step000004-state")
    assert len(result.skipped_states) == 1
    assert "lora-step000006-state/network.safetensors" in result.skipped_states[0]
    assert result.losses[:2] == straight.losses[4:6]  # it really continued from step 4

    # Nothing readable left: an error naming every file at fault, nothing trained or written.
    for step in (2, 4, 6, 8):
        optimizer = out / f"lora-step{step:06d}-state" / "optimizer.pt"
        if optimizer.exists():
            _truncate(optimizer)
    before = _file_bytes(out)
    with pytest.raises(MusubiError, match=r"no state of 'lora' could be read.*lora-step000008-state/optimizer\.pt"
                                          r".*lora-step000002-state/optimizer\.pt"):
        run(10, resume="latest")
    assert _file_bytes(out) == before


def test_zero_learning_rates_are_explained(tmp_path):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 2)
    adapter = ToyAdapter()
    with pytest.raises(MusubiError, match="learning_rate is 0: nothing would train; set e.g. 1e-4"):
        Trainer(adapter, make_network(adapter), dataset, settings(tmp_path, learning_rate=0.0))
    with pytest.raises(MusubiError, match="loraplus_lr_ratio is 0.*never change"):
        Trainer(adapter, make_network(adapter, loraplus_lr_ratio=0.0), dataset, settings(tmp_path))
    assert not (tmp_path / "out").exists()


def test_a_run_that_fails_before_saving_leaves_no_folder(tmp_path):
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 2)
    adapter = ToyAdapter()
    trainer = Trainer(adapter, make_network(adapter), dataset, settings(
        tmp_path, "nested/out", optimizer_type="NoSuchOptimizer", state_dir=str(tmp_path / "states")))
    with pytest.raises(MusubiError, match="NoSuchOptimizer"):
        trainer.train()
    assert sorted(os.listdir(tmp_path)) == ["data"]
