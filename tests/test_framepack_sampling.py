"""FramePack sampling without ComfyUI: section bookkeeping against musubi-tuner's rules, the
schedule and UniPC against their formulas, MagCache per section, and checkpoint recognition.

The expected section layouts are written out from musubi-tuner's ``fpack_generate_video.py``
rules (quoted in each test), not computed by the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from musubi.errors import MusubiError
from musubi.framepack.calibration import magcache_plan
from musubi.framepack.loading import inspect_source
from musubi.framepack.sampling import FramePackRun, MagCachePlan, sample_video
from musubi.framepack.sampling_sections import SectionHistory, plan_sections, sampling_paddings, sections_for_duration
from musubi.framepack.schedule import auto_shift, shifted_sigmas
from musubi.framepack.unipc import sample_unipc
from musubi.magcache.published import default_calibration
from musubi.magcache.settings import MagCacheSettings
from musubi.magcache.state import MagCacheState
from tiny_checkpoints import build_framepack_model, tiny_state_dict, write_tiny_checkpoint
from tiny_framepack import (framepack_conditioning, write_framepack_file, write_framepack_folder, write_plain_fp8_file,
                            write_unprefixed_without_metadata)

# --- sections ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds, fps, window, expected", [
    (5.0, 30, 9, 4),     # 150 / 36 = 4.17 -> 4 (musubi's example)
    (60.0, 30, 9, 50),   # 1800 / 36 = 50
    (3.0, 30, 9, 2),     # 90 / 36 = 2.5 -> 2: Python's round, halves to even
    (1.0, 30, 9, 1),     # 0.83 -> 1
    (0.1, 30, 9, 1),     # 0.08 -> 0 -> at least one section
    (2.0, 24, 4, 3),     # 48 / 16 = 3
])
def test_section_count_from_duration(seconds, fps, window, expected):
    assert sections_for_duration(seconds, fps, window) == expected


@pytest.mark.parametrize("sections, expected", [
    (1, [0]), (2, [1, 0]), (3, [2, 1, 0]), (4, [3, 2, 1, 0]),
    (5, [3, 2, 2, 1, 0]), (7, [3, 2, 2, 2, 2, 1, 0]),
])
def test_vanilla_paddings_in_sampling_order(sections, expected):
    # musubi: reversed(range(S)); for S > 4: [3] + [2] * (S - 3) + [1, 0]
    assert sampling_paddings(sections) == expected


def test_vanilla_indices_follow_musubis_split():
    # musubi: arange(1 + pad·W + W + 1 + 2 + 16).split([1, pad·W, W, 1, 2, 16]);
    # clean = pre ++ post. Two sections of 9: paddings 1 then 0.
    first, second = plan_sections(2, 9, "vanilla")
    assert (first.order, first.time_position, first.padding, first.last) == (0, 1, 1, False)
    assert first.latent_indices == tuple(range(10, 19))
    assert first.clean_indices == (0, 19)
    assert first.history_2x_indices == (20, 21)
    assert first.history_4x_indices == tuple(range(22, 38))
    assert (second.order, second.time_position, second.padding, second.last) == (1, 0, 0, True)
    assert second.latent_indices == tuple(range(1, 10))
    assert second.clean_indices == (0, 10)
    assert second.history_2x_indices == (11, 12)
    assert second.history_4x_indices == tuple(range(13, 29))


def test_f1_indices_are_the_same_for_every_section():
    # musubi F1: arange(1 + 16 + 2 + 1 + W).split([1, 16, 2, 1, W]); clean = start ++ 1x.
    plan = plan_sections(3, 9, "f1")
    assert [section.time_position for section in plan] == [0, 1, 2]
    for section in plan:
        assert section.latent_indices == tuple(range(20, 29))
        assert section.clean_indices == (0, 19)
        assert section.history_2x_indices == (17, 18)
        assert section.history_4x_indices == tuple(range(1, 17))
    assert [section.last for section in plan] == [False, False, True]


def _frames(values, channels=1) -> torch.Tensor:
    """A [1, C, T, 1, 1] latent whose frame t holds the number values[t]."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, -1, 1, 1).expand(1, channels, -1, 1, 1).clone()


def _values(tensor: torch.Tensor) -> list[float]:
    return tensor[0, 0, :, 0, 0].tolist()


def test_vanilla_history_puts_later_frames_first_and_the_start_frame_in_front():
    window = 9
    plan = plan_sections(2, window, "vanilla")
    history = SectionHistory(_frames([-1.0]), "vanilla")
    clean, two, four = history.context()
    assert _values(clean) == [-1.0, 0.0] and _values(two) == [0.0] * 2 and _values(four) == [0.0] * 16
    later = _frames([100 + i for i in range(window)])  # generated first: the end of the video
    history.add(plan[0], later)
    clean, two, four = history.context()
    # musubi: clean_post, 2x, 4x = history[:, :, :19].split([1, 2, 16]) with the new section in front
    assert _values(clean) == [-1.0, 100.0]
    assert _values(two) == [101.0, 102.0]
    assert _values(four) == [103.0 + i for i in range(6)] + [0.0] * 10
    earlier = _frames([200 + i for i in range(window)])
    history.add(plan[1], earlier)
    assert _values(history.video()) == [-1.0] + [200.0 + i for i in range(9)] + [100.0 + i for i in range(9)]


def test_vanilla_end_frame_is_the_first_history_frame_and_not_part_of_the_video():
    # musubi: history_latents[:, :, :1] = end_latent (vanilla only)
    plan = plan_sections(1, 2, "vanilla")
    history = SectionHistory(_frames([-1.0]), "vanilla", end=_frames([-2.0]))
    clean, two, four = history.context()
    assert _values(clean) == [-1.0, -2.0] and _values(two) == [0.0, 0.0]
    history.add(plan[0], _frames([5.0, 6.0]))
    assert _values(history.video()) == [-1.0, 5.0, 6.0]
    with pytest.raises(MusubiError, match="vanilla"):
        SectionHistory(_frames([-1.0]), "f1", end=_frames([-2.0]))


def test_f1_history_appends_and_sees_the_last_nineteen_frames():
    window = 9
    plan = plan_sections(2, window, "f1")
    history = SectionHistory(_frames([-1.0]), "f1")
    clean, two, four = history.context()
    # musubi F1: history = zeros(19) ++ start; 4x, 2x, 1x = history[-19:].split([16, 2, 1])
    assert _values(clean) == [-1.0, -1.0] and _values(two) == [0.0, 0.0] and _values(four) == [0.0] * 16
    history.add(plan[0], _frames([100 + i for i in range(window)]))
    clean, two, four = history.context()
    assert _values(clean) == [-1.0, 108.0]
    assert _values(two) == [106.0, 107.0]
    assert _values(four) == [0.0] * 9 + [-1.0] + [100.0 + i for i in range(6)]
    history.add(plan[1], _frames([200 + i for i in range(window)]))
    assert _values(history.video()) == [-1.0] + [100.0 + i for i in range(9)] + [200.0 + i for i in range(9)]


# --- schedule ----------------------------------------------------------------------------------


def test_shifted_sigmas_follow_the_time_shift_formula():
    # σ = s / (s + 1/t − 1), t = 1 − i/n: n = 4, s = 3 → t = 1, ¾, ½, ¼, 0
    assert shifted_sigmas(4, 3.0) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    assert shifted_sigmas(5, 1.0) == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])


def test_auto_shift_is_fluxs_line_capped_at_seven():
    assert auto_shift(256) == pytest.approx(math.exp(0.5))
    assert auto_shift(4096) == pytest.approx(math.exp(1.15))
    assert auto_shift(9 * 80 * 80 // 4) == pytest.approx(7.0)  # 640×640, FramePack's usual size


# --- UniPC --------------------------------------------------------------------------------------


def test_unipc_first_step_is_the_flow_euler_step():
    seen = []

    def predict(x, sigma, step):
        seen.append((x.clone(), sigma, step))
        return torch.full_like(x, 2.0) if step == 0 else x

    start = torch.tensor([5.0])
    sample_unipc(predict, start, [1.0, 0.6, 0.0])
    # x_1 = (σ1/σ0)·x_0 + (1 − σ1/σ0)·x0_pred = 0.6·5 + 0.4·2
    assert [step for _, _, step in seen] == [0, 1]
    assert seen[1][0].item() == pytest.approx(3.8)
    assert seen[1][1] == 0.6


def test_unipc_returns_a_constant_clean_prediction_unchanged():
    target = torch.tensor([0.3, -1.2, 4.0])
    result = sample_unipc(lambda x, sigma, step: target.clone(), torch.randn(3), shifted_sigmas(7, 3.0))
    assert torch.allclose(result, target)


def _gaussian_problem(mean=1.5, spread=0.5):
    """Data N(mean, spread²): the exact clean prediction and the exact ODE path from x(1) = noise."""

    def predict(x, sigma, step):
        variance = (1 - sigma) ** 2 * spread**2 + sigma**2
        return mean + (1 - sigma) * spread**2 / variance * (x - (1 - sigma) * mean)

    def exact_prediction(noise, sigma):
        deviation = math.sqrt((1 - sigma) ** 2 * spread**2 + sigma**2)
        return mean + (1 - sigma) * spread**2 * noise / deviation

    return predict, exact_prediction


def test_unipc_is_a_third_order_solver_of_the_flow_ode():
    # Levels evenly spaced in λ = −log σ (from 1 to e⁻⁴, then 0), where the step size shrinks
    # everywhere as steps grow: the error must fall ~8× per halving (3rd order), far beyond
    # Euler's 2× (a 1st-order solver).
    predict, exact = _gaussian_problem()
    noise = torch.tensor([0.7, -1.3], dtype=torch.float64)
    errors = []
    for steps in (16, 32, 64):
        sigmas = [math.exp(-4 * i / (steps - 1)) for i in range(steps)] + [0.0]
        result = sample_unipc(predict, noise.clone(), sigmas)
        errors.append(float((result - exact(noise, sigmas[-2])).abs().max()))
    assert errors[1] < errors[0] / 6 and errors[2] < errors[1] / 6, errors


# --- sampling with MagCache -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's matmuls are too small to share between threads; contention only slows them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(one_thread):
    model = build_framepack_model()
    model.load_state_dict({key: value.float() for key, value in tiny_state_dict("framepack").items()})
    return model.eval().requires_grad_(False)


def _model_function(model, calls: list | None = None):
    conditioning = framepack_conditioning()

    def predict(x, sigma, inputs):
        if calls is not None:
            calls.append((inputs.section.order, inputs.branch))
        section = inputs.section
        index = torch.tensor
        velocity = model(
            hidden_states=x, timestep=torch.tensor([sigma * 1000.0]), encoder_hidden_states=conditioning["context"],
            encoder_attention_mask=torch.ones(1, conditioning["context"].shape[1], dtype=torch.long),
            pooled_projections=conditioning["pooled"], image_embeds=conditioning["image_embeds"],
            indices_latents=index(section.latent_indices), guidance=torch.tensor([10000.0]),
            latents_clean=inputs.clean_latents, indices_latents_clean=index(section.clean_indices),
            latents_history_2x=inputs.history_2x, indices_latents_history_2x=index(section.history_2x_indices),
            latents_history_4x=inputs.history_4x, indices_latents_history_4x=index(section.history_4x_indices),
            return_dict=False)[0]
        return x - sigma * velocity

    return predict


def _magcache(threshold: float, states: list | None = None, ratios: str = "framepack") -> MagCachePlan:
    calibration = default_calibration(ratios)

    def make_state(steps):
        state = MagCacheState.for_run(MagCacheSettings(threshold=threshold, K=3, retention_ratio=0.2), steps, calibration)
        if states is not None:
            states.append(state)
        return state

    return MagCachePlan(make_state=make_state)


@pytest.mark.parametrize("direction", ["vanilla", "f1"])
def test_magcache_threshold_zero_is_exact_and_a_positive_one_skips_per_section(tiny_model, direction):
    start = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    run = FramePackRun(sections=2, window=2, steps=5, direction=direction, seed=4)
    with torch.no_grad():
        plain = sample_video(_model_function(tiny_model), start, run)
        zero = sample_video(_model_function(tiny_model), start, run, tiny_model, _magcache(0.0))
        states = []
        skipping = sample_video(_model_function(tiny_model), start, run, tiny_model, _magcache(10.0, states))
    assert plain.video.shape == (1, 16, 5, 4, 4)
    assert torch.equal(plain.video[:, :, :1], start), "the video starts with the start frame"
    assert torch.equal(zero.video, plain.video)
    assert zero.skipped_calls == 0 and zero.computed_calls == 10
    # a fresh decision state per section, and each section skips the same steps from its own start
    assert len(states) == 2 and states[0] is not states[1]
    assert states[0].skipped_step_indices == states[1].skipped_step_indices != []
    assert skipping.skipped_calls == 2 * len(states[0].skipped_step_indices)
    assert not torch.equal(skipping.video, plain.video)
    for block in [*tiny_model.transformer_blocks, *tiny_model.single_transformer_blocks]:
        assert "forward" not in block.__dict__, "the blocks are restored after the run"


def test_real_cfg_calls_both_branches_and_shares_one_decision(tiny_model):
    start = torch.zeros(1, 16, 1, 4, 4)
    calls = []
    run = FramePackRun(sections=1, window=2, steps=5, cfg=2.0)
    with torch.no_grad():
        result = sample_video(_model_function(tiny_model, calls), start, run, tiny_model, _magcache(10.0))
    assert calls[:4] == [(0, "cond"), (0, "uncond"), (0, "cond"), (0, "uncond")]
    assert result.skipped_calls % 2 == 0 and result.skipped_calls > 0


def test_calibration_records_every_step_of_every_section(tiny_model):
    run = FramePackRun(sections=2, window=1, steps=3, direction="f1")
    with torch.no_grad():
        result = sample_video(_model_function(tiny_model), torch.zeros(1, 16, 1, 4, 4), run, tiny_model,
                              MagCachePlan(calibrate=True))
    assert [len(recorder.ratios()) for recorder in result.recorders] == [3, 3]
    assert all(recorder.ratios()[0] == 1.0 for recorder in result.recorders)


def test_magcache_options_choose_the_direction_curve_or_explain_what_is_wrong():
    options = dict(saved_path=None, saved_folder="models/magcache")
    assert magcache_plan("off", "vanilla", 25, 0.1, 3, 0.2, "auto", "", **options) == (None, "MagCache off")
    plan, label = magcache_plan("on", "f1", 25, 0.1, 3, 0.2, "auto", "", **options)
    assert label == "MagCache ratios framepack_f1, threshold 0.1, K 3, retention_ratio 0.2"
    state = plan.make_state(25)
    assert state.settings.max_step_deviation == default_calibration("framepack_f1").max_step_deviation
    plan, label = magcache_plan("on", "vanilla", 25, 0.1, 3, 0.2, "auto", "1, 1.1", **options)
    assert label == "MagCache pasted ratios (2 values)" and len(plan.make_state(5).ratios) == 5
    with pytest.raises(MusubiError, match="neither a published FramePack curve nor a file in models/magcache"):
        magcache_plan("on", "vanilla", 25, 0.1, 3, 0.2, "mine.json", "", **options)
    with pytest.raises(MusubiError, match="at least 2 steps"):
        magcache_plan("calibrate", "vanilla", 1, 0.1, 3, 0.2, "auto", "", **options)


# --- recognising checkpoints ----------------------------------------------------------------------


def test_folder_and_single_file_are_recognised(tmp_path):
    folder = inspect_source(str(write_framepack_folder(tmp_path / "FramePackI2V_HY")))
    single = inspect_source(str(write_framepack_file(tmp_path / "framepack.safetensors")))
    assert folder.layout == "folder" and len(folder.files) == 3
    assert single.layout == "file" and single.files == (str(tmp_path / "framepack.safetensors"),)
    for source in (folder, single):
        assert source.config["num_layers"] == 2 and tuple(source.config["rope_axes_dim"]) == (8, 12, 12)
        assert not source.prequantized


@pytest.mark.parametrize("writer, expected", [
    (lambda path: write_plain_fp8_file(path), "fp8_scaled"),
    (lambda path: write_tiny_checkpoint("hunyuan_video", path), "not FramePack"),
    (lambda path: write_tiny_checkpoint("wan21_t2v", path), "not a FramePack transformer"),
    (lambda path: write_unprefixed_without_metadata(path), "rotary split"),
])
def test_unusable_files_are_refused_with_what_to_load(tmp_path, writer, expected):
    path = tmp_path / "model.safetensors"
    writer(path)
    with pytest.raises(MusubiError, match=expected):
        inspect_source(str(path))


def test_folder_missing_a_shard_is_refused(tmp_path):
    folder = write_framepack_folder(tmp_path / "FramePackI2V_HY")
    (folder / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(MusubiError, match="incomplete"):
        inspect_source(str(folder))


def test_single_file_without_metadata_gets_its_config_from_the_shapes(tmp_path):
    # With FramePack's real 128-wide heads the rotary split (16, 56, 56) is known, so a file
    # without a config (as the single-file conversions are) loads from its shapes alone.
    from safetensors.torch import save_file

    from tiny_checkpoints import FRAMEPACK_TINY_CONFIG

    config = {**FRAMEPACK_TINY_CONFIG, "num_attention_heads": 1, "attention_head_dim": 128, "rope_axes_dim": [16, 56, 56],
              "num_layers": 1, "num_single_layers": 1, "num_refiner_layers": 1}
    model = build_framepack_model(config)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(tmp_path / "conversion.safetensors"))
    source = inspect_source(str(tmp_path / "conversion.safetensors"))
    recovered = {key: source.config[key] for key in config}
    assert recovered == {**config, "rope_axes_dim": [16, 56, 56]}
