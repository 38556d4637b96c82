"""The library side of samples during training: when they are due, their names and pictures, and
``Trainer.evaluating`` — a callback that evaluates the LoRA (eval mode, schedule-free averaged
weights, no grad) and draws random numbers must leave training exactly as it was."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from test_trainer import network_weights, settings, write_items

from musubi.lora.network import LoRANetwork
from musubi.training.adapter import ToyAdapter
from musubi.training.loop import TrainCallbacks, Trainer, preserved_random_state
from musubi.training.optimizers import eval_mode
from musubi.training.samples import (
    SampleTiming,
    encode_frames,
    sample_file_name,
    to_uint8_frames,
    write_sample,
)

torch.set_num_threads(1)


def test_timing_names_and_encoding(tmp_path):
    timing = SampleTiming(every_n_steps=50, at_checkpoints=False, at_start=True)
    assert [step for step in range(1, 201) if timing.due_after_step(step)] == [50, 100, 150, 200]
    assert not SampleTiming().due_after_step(100)  # by default: at checkpoints only
    assert timing.describe() == "at the start, every 50 steps"
    assert sample_file_name("my_lora", 200, 0, 1) == "my_lora-step000200-p1.png"
    assert sample_file_name("my_lora", 1234567, 3, 9) == "my_lora-step1234567-p4.webp"

    # A still is a PNG of exactly these pixels; a video an animated WebP with every frame.
    still = torch.rand(1, 12, 16, 3)
    path = write_sample(str(tmp_path / "samples"), "run", 7, 0, still)
    assert path.endswith("run-step000007-p1.png")
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), (still[0].numpy() * 255).clip(0, 255).astype(np.uint8))
    video = torch.linspace(0, 1, 5).reshape(5, 1, 1, 1).expand(5, 16, 16, 3).contiguous()
    path = write_sample(str(tmp_path / "samples"), "run", 8, 1, video, fps=8)
    with Image.open(path) as picture:
        assert picture.format == "WEBP" and picture.n_frames == 5 and picture.size == (16, 16)
        first = np.asarray(picture.convert("RGB")).mean()
        picture.seek(4)
        assert np.asarray(picture.convert("RGB")).mean() > first + 200  # the frames in order, dark to light
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["run-step000007-p1.png", "run-step000008-p2.webp"]
    assert to_uint8_frames(torch.full((1, 2, 2, 1), 2.0)).shape == (1, 2, 2, 3)  # grey to RGB, clipped
    assert encode_frames(to_uint8_frames(still))[:8] == b"\x89PNG\r\n\x1a\n"


def test_preserved_random_state_puts_every_stream_back():
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    with preserved_random_state():
        torch.manual_seed(99)  # what comfy.sample.prepare_noise does
        torch.rand(10), random.random(), np.random.rand(4)
    after = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]


class Evaluates(TrainCallbacks):
    """Does what a sampling callback does at every step: evaluates the LoRA and draws random numbers."""

    def __init__(self):
        self.trainer = None
        self.modes = []

    def on_step(self, step, loss, lrs):
        with self.trainer.evaluating() as network:
            self.modes.append((network.training, torch.is_grad_enabled()))
            torch.manual_seed(step)
            torch.randn(100), random.random(), np.random.rand(3)
            self.averaged = network_weights(network)


@pytest.mark.parametrize("optimizer_type", ["AdamW", "AdamWScheduleFree"])
def test_evaluating_during_training_changes_nothing(tmp_path, optimizer_type):
    if optimizer_type == "AdamWScheduleFree":
        pytest.importorskip("schedulefree")
    dataset = write_items(tmp_path / "data", [(4, 4, 4)] * 3)

    def run(name, callbacks=None):
        adapter = ToyAdapter()
        torch.manual_seed(0)
        # Dropout draws from the global generator: evaluating must leave its stream alone.
        network = LoRANetwork(adapter.lora_root(), "generic", network_dim=4, network_alpha=4.0, dropout=0.1)
        trainer = Trainer(adapter, network, dataset, settings(tmp_path, name, optimizer_type=optimizer_type,
                                                              max_train_steps=5, save_state=False), callbacks=callbacks)
        if callbacks is not None:
            callbacks.trainer = trainer
        trainer.train()
        return trainer, network

    _, plain = run("plain")
    callbacks = Evaluates()
    trainer, evaluated = run("evaluated", callbacks)
    for key, value in network_weights(plain).items():
        assert torch.equal(value, network_weights(evaluated)[key]), key
    assert callbacks.modes == [(False, False)] * 5
    assert evaluated.training  # back in train mode
    if optimizer_type == "AdamWScheduleFree":  # the LoRA evaluated is the averaged one, as saved
        with eval_mode(trainer.optimizer):
            averaged = network_weights(evaluated)
        for key, value in averaged.items():
            assert torch.equal(value, callbacks.averaged[key]), key
